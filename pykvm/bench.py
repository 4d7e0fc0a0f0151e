"""``pykvm bench``: speed and memory as ratios against baselines measured in the same run
(absolute numbers on these machines are noisy; ratios are what to compare).

* exit loop: a guest writes N bytes to the debug console port. The C loop serves them without
  returning to Python; the Python loop crosses into Python on every exit. Both are compared
  with the baseline cost of a trivial vCPU ioctl (KVM_RUN with immediate_exit set).
* memory: resident-set growth per :class:`~pykvm.machine.Machine` against a bare VM with the
  same RAM, the same guest image loaded and one vCPU, made with the raw API.
"""
import gc
import json
import time

from .abi import ioctls
from ._ioctl import ioctl


def _rss_kib() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4


def _best(fn, repeat=3):
    return min(fn() for _ in range(repeat))


def exit_loop(n: int) -> dict:
    from .machine import Machine

    def timed(native: bool) -> float:
        with Machine("exits", native=native) as m:
            m.set_params(n, 0xE9)
            t0 = time.perf_counter()
            m.sync(stage=1, timeout=120)
            dt = time.perf_counter() - t0
            assert len(m.console) == n
            return dt

    c = _best(lambda: timed(True))
    py = _best(lambda: timed(False))

    def baseline() -> float:
        from .kvm import Kvm
        with Kvm() as kvm, kvm.create_vm() as vm:
            v = vm.create_vcpu()
            k = 2000
            t0 = time.perf_counter()
            for _ in range(k):
                v.run_struct.immediate_exit = 1
                try:
                    ioctl(v.fd, "KVM_RUN", ioctls.KVM_RUN)
                except OSError:
                    pass
            return (time.perf_counter() - t0) / k
    base = _best(baseline)
    c_us, py_us = c / n * 1e6, py / n * 1e6
    return {"exits": n, "c_loop_us_per_exit": round(c_us, 3), "py_loop_us_per_exit": round(py_us, 3),
            "baseline_ioctl_us": round(base * 1e6, 3),
            "ratio_py_over_c": round(py / c, 3),
            "ratio_c_exit_over_ioctl": round(c_us / (base * 1e6), 3)}


def memory(count: int = 10, ram: int = 16 << 20) -> dict:
    from .kvm import Kvm
    from .machine import Machine
    with Kvm() as kvm:
        def grow(make):
            gc.collect()
            r0 = _rss_kib()
            objs = [make() for _ in range(count)]
            r1 = _rss_kib()
            for o in objs:
                o.close()
            return (r1 - r0) / count

        from . import guests, loader
        from .arch import current

        def raw():                    # the same guest pages touched, with the raw API
            vm = kvm.create_vm()
            vm.add_memory(current.Platform.ram_base, ram)
            loader.load_image(vm.memory, guests.path("hello"))
            vm.create_vcpu()
            return vm
        base = grow(raw)
        mach = grow(lambda: Machine("hello", kvm=kvm, mem_size=ram))
    return {"vms": count, "raw_vm_kib": round(base, 1), "machine_kib": round(mach, 1),
            "ratio_machine_over_raw": round(mach / base, 3) if base > 0 else None}


def run(n: int = 20000) -> dict:
    return {"exit_loop": exit_loop(n), "memory": memory()}


def main(args) -> int:
    res = run(args.exits)
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        e, m = res["exit_loop"], res["memory"]
        print(f"exit loop ({e['exits']} console exits): C {e['c_loop_us_per_exit']} µs/exit, "
              f"Python {e['py_loop_us_per_exit']} µs/exit → Python/C = {e['ratio_py_over_c']}×; "
              f"C exit / bare KVM_RUN ioctl = {e['ratio_c_exit_over_ioctl']}×")
        print(f"memory per VM: Machine {m['machine_kib']} KiB vs raw VM {m['raw_vm_kib']} KiB "
              f"→ {m['ratio_machine_over_raw']}×")
    return 0
