"""Lifecycle stress (issue 8): thousands of create → run → close cycles, with closes racing a
running vCPU, kicks at random moments and objects abandoned to the garbage collector. Afterwards
file descriptors, threads and resident memory are back at their baseline."""
import gc
import os
import random
import threading
import time

import pytest

from pykvm.errors import Busy, Closed
from pykvm.runloop import RunLoop
from pykvm.testing.reference_loop import ReferenceLoop

from _asm import rss_kib

pytestmark = pytest.mark.requires_kvm

CYCLES = int(os.environ.get("PYKVM_STRESS_CYCLES", "2000"))
HLT = b"\xf4"
SPIN = b"\xeb\xfe"                       # jmp $


def _vm_with(kvm, code: bytes):
    vm = kvm.create_vm()
    vm.add_memory(0, 1 << 20)
    vm.memory.write(0x1000, code)
    v = vm.create_vcpu()
    s = v.get_sregs()
    s.cs.base = s.cs.selector = 0
    v.set_sregs(s)
    r = v.get_regs()
    r.rip, r.rflags = 0x1000, 2
    v.set_regs(r)
    return vm, v


def _run_to_halt(kvm, rng):
    vm, v = _vm_with(kvm, HLT)
    loop = (RunLoop if rng.random() < 0.8 else ReferenceLoop)(v)
    stop = loop.run(deadline=time.monotonic() + 10)
    assert stop.kind == "exit" and stop.exit.name == "HLT"
    vm.close()


def _close_racing_run(kvm, rng):
    vm, v = _vm_with(kvm, SPIN)
    loop = (RunLoop if rng.random() < 0.7 else ReferenceLoop)(v)
    box = {}

    def runner():
        try:
            box["stop"] = loop.run(deadline=time.monotonic() + 30)
        except (Closed, Busy) as e:
            box["error"] = e

    t = threading.Thread(target=runner)
    t.start()
    time.sleep(rng.random() * 0.003)
    (vm.close if rng.random() < 0.5 else v.close)()
    t.join(10)
    assert not t.is_alive()
    assert box.get("stop") is not None and box["stop"].kind == "kick" or \
        isinstance(box.get("error"), Closed)
    vm.close()


def _kick_at_random(kvm, rng):
    vm, v = _vm_with(kvm, SPIN)
    loop = (RunLoop if rng.random() < 0.7 else ReferenceLoop)(v)
    t = threading.Thread(target=lambda: loop.run(deadline=time.monotonic() + 30))
    t.start()
    time.sleep(rng.random() * 0.003)
    loop.kick()
    t.join(10)
    assert not t.is_alive()
    stop = loop.run(deadline=time.monotonic() + 0.002)      # runs again after a kick
    assert stop.kind in ("deadline", "kick")
    vm.close()


def _abandon(kvm, rng):
    vm, v = _vm_with(kvm, HLT)
    if rng.random() < 0.5:
        RunLoop(v).run(deadline=time.monotonic() + 10)
    # dropped without close(): the finalizers close fds and unmap memory


ACTIONS = [(_run_to_halt, 0.45), (_close_racing_run, 0.25), (_kick_at_random, 0.15),
           (_abandon, 0.15)]


def test_thousands_of_cycles_leave_nothing_behind(kvm, leftovers):
    rng = random.Random(8)
    funcs, weights = zip(*ACTIONS)
    for _ in range(50):                                  # warm up caches and allocators
        rng.choices(funcs, weights)[0](kvm, rng)
    gc.collect()
    snap, rss = leftovers(), rss_kib()
    done = {f.__name__: 0 for f in funcs}
    for i in range(CYCLES):
        f = rng.choices(funcs, weights)[0]
        f(kvm, rng)
        done[f.__name__] += 1
        if i % 200 == 0:
            gc.collect()
    gc.collect()
    assert all(done.values()), done
    snap.check()
    grown = rss_kib() - rss
    assert grown < 16 << 10, f"RSS grew {grown} KiB over {CYCLES} cycles {done}"
