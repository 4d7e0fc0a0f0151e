"""A hostile guest or a careless caller never crashes pykvm (issue 8): closes racing runs, methods
of closed objects, one vCPU's failure stopping the machine, bounded retention under flooding
guests, exit budgets that count, exit statuses that do not collide, and lazily-backed RAM.

The guests are tiny real-mode programs assembled here with binutils (loaded flat at 0x8000,
CS = DS = 0, so their addresses are guest-physical)."""
import threading
import time

import pytest

from pykvm import status
from pykvm.errors import Busy, Closed, PykvmError
from pykvm.machine import Machine
from pykvm.runloop import RunLoop
from pykvm.testing import wait_until

from _asm import BY_VCPU, PRINT_FLOOD, REPORT, SPIN, asm16, rss_kib
from _loops import LOOP_IDS, LOOPS, pc_config

pytestmark = pytest.mark.requires_kvm

LOAD = 0x8000
PATIENCE = 60.0                 # seconds to wait for a thread to be in its run (a hang guard)


CONSOLE_LOOP = """
    mov al, 0x78
l:  out 0xe9, al
    jmp l
"""


def machine(code: str, **kw) -> Machine:
    return Machine(asm16(code), flat_addr=LOAD, **kw)


# -- 1: closing while a vCPU runs, and every method of a closed object ------------------------
@pytest.mark.parametrize("loop_cls", LOOPS, ids=LOOP_IDS)
@pytest.mark.parametrize("vcpus", [1, 3])
def test_close_while_running_waits_for_every_vcpu(loop_cls, vcpus):
    m = machine(SPIN, vcpus=vcpus, loop=loop_cls)
    out = {}

    def runner():
        try:
            out["result"] = m.run(timeout=30)
        except BaseException as e:  # noqa: BLE001 — we assert on it below
            out["error"] = e

    t = threading.Thread(target=runner)
    t.start()
    # every vCPU in its run (a fixed sleep let a loaded host close before the run began)
    wait_until(lambda: all(v.running for v in m.vcpus) or not t.is_alive(),
               "every vCPU running", timeout=PATIENCE)
    assert t.is_alive(), out
    m.close()                                     # kicks, waits, then unmaps and closes
    t.join(10)
    assert not t.is_alive()
    assert isinstance(out.get("error"), Closed), out
    for call in (lambda: m.run(timeout=1), m.kick_all, lambda: m.step(0),
                 lambda: m.memory, lambda: m.set_params(1)):
        with pytest.raises(Closed):
            call()
    m.close()                                     # idempotent


@pytest.mark.parametrize("loop_cls", LOOPS, ids=LOOP_IDS)
def test_closed_vcpu_and_loop_raise_closed_and_never_drive_a_reused_fd(kvm, loop_cls):
    vm = kvm.create_vm()
    vm.add_memory(0, 1 << 20)
    vm.memory.write(0x1000, b"\xf4")              # hlt
    v = vm.create_vcpu()
    s = v.get_sregs()
    s.cs.base = s.cs.selector = 0
    v.set_sregs(s)
    r = v.get_regs()
    r.rip, r.rflags = 0x1000, 2
    v.set_regs(r)
    loop = loop_cls(v, pc_config())
    v.close()
    for call in (v.run, v.kick, loop.kick, lambda: loop.run(deadline=time.monotonic() + 1),
                 v.get_regs, lambda: v.get_one_reg(0x2030000200000010)):
        with pytest.raises(Closed):
            call()
    # A new vCPU fd may reuse the number; the old loop must not drive it.
    other = kvm.create_vm()
    other.add_memory(0, 1 << 20)
    w = other.create_vcpu()
    with pytest.raises(Closed):
        loop.run(deadline=time.monotonic() + 1)
    assert w.run_seq == 0
    other.close()
    vm.close()
    with pytest.raises(Closed):
        vm.memory.read(0, 1)
    with pytest.raises(Closed):
        vm.create_vcpu()
    kvm2 = type(kvm)()
    kvm2.close()
    with pytest.raises(Closed):
        kvm2.create_vm()


def test_vcpu_close_from_inside_its_own_run_completes_when_the_run_returns():
    m = machine(CONSOLE_LOOP)
    seen = []

    def on_console(data):
        if not seen:
            seen.append(len(data))
            m.vcpus[0].close()                    # same thread: deferred, no deadlock

    m.loops[0].on_console = on_console
    m.loops[0]._l.console_flush_ns = 1_000_000
    stop = m.loops[0].run(deadline=time.monotonic() + 10)
    assert stop.kind == "kick" and seen
    assert m.vcpus[0].closed
    m.close()


def _wait_running(v, t):
    """Until thread ``t`` is inside its run of vCPU ``v`` (``v.running``): only then is a
    second caller's Busy the behaviour under test (a fixed sleep let a loaded host ask first,
    and the second run or ioctl then simply succeeded)."""
    wait_until(lambda: v.running or not t.is_alive(), "the first thread's run to begin",
               timeout=PATIENCE)
    assert t.is_alive(), "the first thread's run ended before it was observed running"


def test_a_second_thread_cannot_run_a_running_vcpu():
    with machine(SPIN) as m:
        t = threading.Thread(target=m.step, kwargs={"timeout": 120})
        t.start()
        _wait_running(m.vcpus[0], t)
        with pytest.raises(Busy):
            m.loops[0].run(deadline=time.monotonic() + 1)
        m.kick_all()
        t.join(10)
        assert not t.is_alive()


# -- 3: one vCPU's failure stops the machine and becomes the result ----------------------------
@pytest.mark.parametrize("vcpus", [1, 2, 4])
def test_bad_report_on_one_vcpu_stops_all_and_is_the_result(vcpus):
    code = BY_VCPU.format(first=REPORT.format(addr="0xfffff000") + SPIN, others=SPIN)
    with machine(code, vcpus=vcpus) as m:
        r = m.run(timeout=60)
    assert r.exit == "guest_error" and r.exit_code == status.GUEST_FAILURE
    assert "outside guest RAM" in r.detail and r.vcpu == 0


def test_exit_handler_exception_stops_all_vcpus_and_is_the_result():
    code = BY_VCPU.format(first=SPIN, others="    mov al, 1\n    out 0x80, al\n" + SPIN)

    def handler(machine, index, ex):
        raise RuntimeError(f"handler refused port {ex.port:#x}")

    with machine(code, vcpus=3) as m:
        m.on("IO", handler)
        r = m.run(timeout=60)
    assert r.exit == "handler_error" and r.exit_code == status.VMM_ERROR
    assert "RuntimeError: handler refused port 0x80" in r.detail
    assert isinstance(r.error, RuntimeError)


def test_unhandled_exit_status():
    with machine("    mov al, 1\n    out 0x80, al\n" + SPIN) as m:
        r = m.run(timeout=10)
    assert r.exit == "IO" and r.exit_code == status.UNHANDLED_EXIT


# -- 4: bounded retention ---------------------------------------------------------------------
def test_print_flood_is_bounded_and_counted():
    seen = [0]
    with machine(PRINT_FLOOD, console_limit=64 << 10,
                 on_console=lambda b: seen.__setitem__(0, seen[0] + len(b))) as m:
        r = m.run(timeout=1.5)
    assert r.exit == "timeout"
    assert len(r.console) <= 64 << 10
    assert r.console_dropped > 0 and r.console_dropped + len(r.console) == seen[0]
    assert len(r.reports) == 0


def test_console_flood_in_the_loop_is_bounded():
    with machine(CONSOLE_LOOP, console_limit=4096) as m:
        r = m.run(timeout=1.0)
        loop = m.loops[0]
        assert len(loop.console) <= loop.config.console_limit
        assert loop.console_buffer.held <= 2 * loop.config.console_limit
    assert len(r.console) <= 4096 and r.console_dropped > 0


# -- 5: the exit budget is a budget -------------------------------------------------------------
@pytest.mark.parametrize("loop_cls", LOOPS, ids=LOOP_IDS)
def test_budget_counts_exits_across_console_streaming(loop_cls):
    streamed = []
    with machine(CONSOLE_LOOP, loop=loop_cls, on_console=streamed.append) as m:
        loop = m.loops[0]
        if loop_cls is RunLoop:
            loop._l.console_flush_ns = 1           # return to Python after every exit
        stop = loop.run(deadline=time.monotonic() + 60, budget=3000)
        assert stop.kind == "budget"
        assert loop.exits_total == 3000
        assert sum(map(len, streamed)) == 3000
        ev = m.step(0, timeout=60, budget=500)
        assert ev.kind == "budget" and loop.exits_total == 3500


# -- 9: exit statuses ---------------------------------------------------------------------------
@pytest.mark.parametrize("port", [0xF4, 0xF5, 0xF6, 0xF7])
@pytest.mark.parametrize("loop_cls", LOOPS, ids=LOOP_IDS)
def test_isa_debug_exit_on_its_whole_range(port, loop_cls):
    with machine(f"    mov al, 0\n    out {port:#x}, al\n" + SPIN, loop=loop_cls) as m:
        r = m.run(timeout=10)
    assert r.exit == "debug_exit" and r.exit_code == 1 and r.debug_exit_value == 0
    with machine("    mov al, 0\n    out 0xf8, al\n" + SPIN, loop=loop_cls) as m:
        assert m.run(timeout=10).exit_code == status.UNHANDLED_EXIT


def test_pykvm_outcomes_have_distinct_even_statuses():
    own = [status.OK, status.BAD_INPUT, status.GUEST_FAILURE, status.UNHANDLED_EXIT,
           status.VMM_ERROR, status.TIMEOUT, status.SIGINT]
    assert len(set(own)) == len(own) and all(s % 2 == 0 for s in own)
    assert all(status.debug_exit_status(v) % 2 == 1 for v in range(256))


# -- 14: big guests cheaply -------------------------------------------------------------------
def test_64_gib_guest_costs_no_host_memory_until_touched(kvm):
    before = rss_kib()
    with kvm.create_vm() as vm:
        slot = vm.add_memory(0, 64 << 30)
        assert rss_kib() - before < 32 << 10          # < 32 MiB for 64 GiB declared
        vm.memory.write(5 << 30, b"x" * 4096)          # touching one page costs one page
        assert vm.memory.read(5 << 30, 1) == b"x"
        assert slot.size == 64 << 30


def test_ram_the_host_cannot_map_is_a_clear_error(kvm):
    from pykvm.errors import HostMemoryError
    with kvm.create_vm() as vm:
        # 256 TiB is more than a 47-bit user address space can hold.
        with pytest.raises(HostMemoryError, match="cannot map 256 TiB of guest RAM at GPA 0x0"):
            vm.add_memory(0, 256 << 40)
        vm.add_memory(0, 1 << 20)                    # the VM is still fine
    assert isinstance(HostMemoryError("x"), PykvmError)


# -- careless API arguments -----------------------------------------------------------------------
def test_stale_or_foreign_slot_is_refused_before_kvm_is_asked(kvm):
    from pykvm.errors import GuestMemoryError
    with kvm.create_vm() as vm, kvm.create_vm() as other:
        a = vm.add_memory(0, 1 << 20)
        vm.remove_memory(a)
        b = vm.add_memory(0, 2 << 20)                 # reuses slot number 0
        with pytest.raises(GuestMemoryError, match="not a memory slot of this VM"):
            vm.remove_memory(a)
        with pytest.raises(GuestMemoryError, match="not a memory slot of this VM"):
            vm.remove_memory(other.add_memory(0, 4096))
        assert [s for s in vm.memory] == [b]
        vm.memory.write(0x1000, b"\xf4")              # the live slot still backs the guest
        v = vm.create_vcpu()
        s = v.get_sregs()
        s.cs.base = s.cs.selector = 0
        v.set_sregs(s)
        r = v.get_regs()
        r.rip, r.rflags = 0x1000, 2
        v.set_regs(r)
        assert v.run().name == "HLT"


@pytest.mark.parametrize("call", [
    lambda vm: vm.add_memory(2 ** 64, 4096), lambda vm: vm.add_memory("0", 4096),
    lambda vm: vm.add_memory(None, 4096), lambda vm: vm.add_memory(1 << 30, 0),
    lambda vm: vm.add_memory(1 << 30, -4096), lambda vm: vm.add_memory(1 << 30, 4095),
    lambda vm: vm.add_memory(1 << 30, 4096, slot=-1),
    lambda vm: vm.add_memory(1 << 30, 4096, slot=2 ** 32),
    lambda vm: vm.memory.write(0, "text"), lambda vm: vm.memory.write(0, None),
    lambda vm: vm.memory.write_u64(0, 1.5), lambda vm: vm.create_vcpu(-1),
    lambda vm: vm.create_vcpu("1"),
])
def test_careless_arguments_get_typed_errors(kvm, call):
    with kvm.create_vm() as vm:
        vm.add_memory(0, 1 << 20)
        with pytest.raises((PykvmError, ValueError)) as ei:
            call(vm)
        assert isinstance(ei.value, PykvmError) or type(ei.value) is ValueError
        assert not isinstance(ei.value, (OverflowError, TypeError))


def test_other_vcpu_ioctls_while_another_thread_runs_it_are_busy():
    with machine(SPIN) as m:
        v = m.vcpus[0]
        t = threading.Thread(target=m.step, kwargs={"timeout": 120})
        t.start()
        _wait_running(m.vcpus[0], t)
        for call in (v.get_regs, v.get_sregs, lambda: v.get_one_reg(0x2030000200000010)):
            with pytest.raises(Busy):
                call()                   # KVM would block it until the run ends
        m.kick_all()
        t.join(10)
        assert not t.is_alive()
        assert v.get_regs().rip >= 0x8000
