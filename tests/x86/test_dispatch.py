"""Python exit handlers called from inside the C run loop (RunLoop.on, Machine.on): what they see,
what their return values and exceptions do, exit objects reused only when nobody keeps them,
StaleExit safety, and exits the loop counts and resumes by itself (RunLoop.resume)."""
import threading
import time

import pytest

from pykvm import Closed, StaleExit
from pykvm.abi import ffi
from pykvm.machine import Machine
from pykvm.runloop import LoopConfig, RunLoop
from pykvm.testing.reference_loop import ReferenceLoop

pytestmark = [pytest.mark.requires_kvm, pytest.mark.requires_arch("x86_64")]

BARE = LoopConfig()                        # serves no port: every exit is the handlers'
OUT_LOOP = "B07AE680EBFC"                  # mov al, 'z'; out 0x80, al; jmp back to the out
IN_OUT_LOOP = "E480E681EBFA"               # in al, 0x80; out 0x81, al; jmp back
MMIO_LOOP = "B800F08ED831DB" "B055" "8807" "8A07" "8807" "EBF6"   # ds:bx = 0xf0000: write
                                            # 0x55, read, write back what was read


def _vcpu(kvm, code_hex):
    vm = kvm.create_vm()
    vm.add_memory(0, 0x80000)
    vm.memory.write(0x1000, bytes.fromhex(code_hex))
    v = vm.create_vcpu()
    s = v.get_sregs()
    s.cs.base = s.cs.selector = 0
    v.set_sregs(s)
    r = ffi.new("struct kvm_regs *")
    r.rip, r.rflags = 0x1000, 2
    v.set_regs(r)
    return vm, v


@pytest.fixture(params=[RunLoop, ReferenceLoop], ids=["c", "py"])
def loop_cls(request):
    return request.param


def test_handler_sees_every_exit_and_resumes_inside_the_loop(kvm, loop_cls):
    vm, v = _vcpu(kvm, OUT_LOOP)
    with vm:
        loop = loop_cls(v, BARE)
        seen = []
        loop.on("IO", lambda ex: seen.append((ex.port, ex.value, ex.is_out, ex.size, ex.count)))
        stop = loop.run(budget=100)
        assert stop.kind == "budget"
        assert seen == [(0x80, ord("z"), True, 1, 1)] * 100
        assert loop.handled_in_python == 100 and loop.exits_total == 100


def test_in_and_mmio_answers_reach_the_guest(kvm, loop_cls):
    vm, v = _vcpu(kvm, IN_OUT_LOOP)
    with vm:
        loop = loop_cls(v, BARE)
        outs = []

        def io(ex):
            if ex.is_out:
                outs.append(ex.value)
            else:
                ex.respond(len(outs) + 0x40)
        loop.on("IO", io)
        assert loop.run(budget=20).kind == "budget"
        assert outs == [0x40 + i for i in range(10)]
    vm, v = _vcpu(kvm, MMIO_LOOP)
    with vm:
        loop = loop_cls(v, BARE)
        log = []

        def mmio(ex):
            if ex.is_write:
                log.append(("w", ex.phys_addr, ex.len, ex.value, ex.data))
            else:
                log.append(("r", ex.phys_addr, ex.len))
                ex.respond(0x77)
        loop.on("MMIO", mmio)
        assert loop.run(budget=6).kind == "budget"
        assert log == [("w", 0xF0000, 1, 0x55, b"\x55"), ("r", 0xF0000, 1),
                       ("w", 0xF0000, 1, 0x77, b"\x77")] * 2    # the read got the handler's


def test_a_handler_value_ends_the_run_with_that_exit(kvm, loop_cls):
    vm, v = _vcpu(kvm, OUT_LOOP)
    with vm:
        loop = loop_cls(v, BARE)
        n = [0]

        def h(ex):
            n[0] += 1
            return "enough" if n[0] == 5 else None
        loop.on("IO", h)
        stop = loop.run(budget=100)
        assert stop.kind == "exit" and stop.result == "enough" and n[0] == 5
        assert stop.exit.name == "IO" and stop.exit.port == 0x80    # still current
        loop.on("IO", None)                                        # no handler: plain exits
        stop2 = loop.run(budget=100)
        assert stop2.kind == "exit" and stop2.result is None
        with pytest.raises(StaleExit):
            _ = stop.exit.port


def test_handler_exception_propagates_from_run(kvm, loop_cls):
    vm, v = _vcpu(kvm, OUT_LOOP)
    with vm:
        loop = loop_cls(v, BARE)

        def h(ex):
            raise KeyError("from the handler")
        loop.on("IO", h)
        with pytest.raises(KeyError, match="from the handler"):
            loop.run(budget=10)
        loop.on("IO", lambda ex: None)               # the loop is usable afterwards
        assert loop.run(budget=10).kind == "budget"


def test_exit_objects_are_reused_unless_kept_and_kept_ones_go_stale(kvm):
    vm, v = _vcpu(kvm, OUT_LOOP)
    with vm:
        loop = RunLoop(v, BARE)
        ids, kept = [], []

        def h(ex):
            ids.append(id(ex))
            if len(ids) == 3:
                kept.append(ex)
        loop.on("IO", h)
        assert loop.run(budget=6).kind == "budget"
        assert ids[0] == ids[1] == ids[2]             # nobody kept them: one object
        assert ids[3] != ids[2] and ids[3] == ids[4] == ids[5]
        with pytest.raises(StaleExit):
            _ = kept[0].port
        with pytest.raises(StaleExit):
            _ = kept[0].value


def test_resume_counts_exits_in_c(kvm):
    vm, v = _vcpu(kvm, "F4F4F4F4EBFC")              # hlt forever
    with vm:
        loop = RunLoop(v, BARE)
        loop.resume("HLT")
        assert loop.run(budget=50).kind == "budget"
        assert loop.handled_in_c == 50 and loop.counts == {"HLT": 50}
        loop.resume("HLT", on=False)
        stop = loop.run(budget=50)
        assert stop.kind == "exit" and stop.exit.name == "HLT"


def test_kick_and_deadline_reach_a_loop_that_stays_in_c_with_handlers(kvm):
    vm, v = _vcpu(kvm, OUT_LOOP)
    with vm:
        loop = RunLoop(v, BARE)
        loop.on("IO", lambda ex: None)
        stop = loop.run(deadline=time.monotonic() + 0.2)
        assert stop.kind == "deadline" and loop.handled_in_python > 0
        threading.Timer(0.1, loop.kick).start()
        assert loop.run(deadline=time.monotonic() + 30).kind == "kick"


def test_close_from_a_handler_ends_the_run(kvm):
    vm, v = _vcpu(kvm, OUT_LOOP)
    with vm:
        loop = RunLoop(v, BARE)

        def h(ex):
            v.close()
        loop.on("IO", h)
        assert loop.run(budget=100).kind == "kick"
        assert loop.handled_in_python == 0
        with pytest.raises(Closed):
            loop.run(budget=1)


def test_console_reaches_python_before_the_handler_runs(kvm):
    # out 0xe9 'A' (served in C), then out 0x80 (to Python): the handler sees the 'A'
    vm, v = _vcpu(kvm, "B041E6E9E680EBF8")
    with vm:
        loop = RunLoop(v, LoopConfig(debugcon_port=0xE9))
        seen = []
        loop.on("IO", lambda ex: seen.append(len(loop.console)))
        loop.run(budget=10)
        assert seen == [1, 2, 3, 4, 5]


def test_unknown_exit_names_are_refused(kvm):
    vm, v = _vcpu(kvm, OUT_LOOP)
    with vm:
        loop = RunLoop(v, BARE)
        with pytest.raises(ValueError):
            loop.on("NOT_AN_EXIT", lambda ex: None)
        with pytest.raises(ValueError):
            loop.resume(64)


def test_machine_on_runs_inside_the_loop_and_reports_still_come_first():
    code = bytes.fromhex(OUT_LOOP)
    with Machine(code, flat_addr=0x1000, flat_mode="real", mem_size=0x80000) as m:
        calls = []
        m.on("IO", lambda machine, index, ex: calls.append((index, ex.port)))
        ev = m.step(budget=30, timeout=10)
        assert ev.kind == "budget" and calls == [(0, 0x80)] * 30
        assert m.loops[0].handled_in_python == 30
        m.on("IO", lambda machine, index, ex: "stop")
        ev = m.step(budget=30, timeout=10)
        assert ev.kind == "exit" and ev.exit.port == 0x80
    with Machine("msr") as m:                         # reports pass through handlers untouched
        io = []
        m.on("IO", lambda machine, index, ex: io.append(ex.port))
        m.set_params(0xC0000081, 0x0023001044445555, 0x0023001044445555)
        assert m.sync(stage=1)[0] == 0xC0000081
        assert io == []                               # the report port went to step()


def test_machine_on_with_trace_takes_the_step_path():
    code = bytes.fromhex(OUT_LOOP)
    with Machine(code, flat_addr=0x1000, flat_mode="real", mem_size=0x80000) as m:
        lines = []
        m.trace = lines.append
        m.on("IO", lambda machine, index, ex: None)
        assert m.step(budget=5, timeout=10).kind == "budget"
        assert len([ln for ln in lines if "Io" in ln]) == 5
