"""The C run loop's Python side (csrc/pyexit.c): handlers called through the CPython C API, exit
fields filled in C, ``value``/``respond`` served in C while the exit is current, and what never
reaches a handler (guest reports, MMIO in guarded RAM). Each behaviour is checked against the
reference loop, whose exits read kvm_run from Python (the slow paths)."""
import time

import pytest

from pykvm import Closed, GuestError, StaleExit
from pykvm._loopstate import RunState, run_handlers
from pykvm.errors import GuestMemoryError
from pykvm.machine import Machine
from pykvm.runloop import LoopConfig, RunLoop
from pykvm.testing.reference_loop import ReferenceLoop

from _asm import real_mode_vm

pytestmark = [pytest.mark.requires_kvm, pytest.mark.requires_arch("x86_64")]

OUT_WORD = "B83412" "E780" "EBF9"                 # mov ax, 0x1234; out 0x80, ax; jmp back
OUT_DWORD = "66B878563412" "66E780" "EBF5"        # mov eax, 0x12345678; out 0x80, eax; jmp
REP_OUTSB = "BE0020" "B90300" "BA8000" "F36E" "F4"    # si=0x2000 cx=3 dx=0x80; rep outsb; hlt
REP_INSW = "BF0030" "B90400" "BA8000" "F36D" "F4"     # di=0x3000 cx=4 dx=0x80; rep insw; hlt
# ds = 0xf000, bx = 0: byte, word and dword reads of 0xf0000, each stored at 0x4000+ (es = 0)
MMIO_READS = ("B800F08ED831DB31C08EC0" "8A07" "26A20040" "8B07" "26A30240"
              "668B07" "2666A30440" "F4")
MMIO_WRITE = "B800F08ED831DB" "66B8EFBEADDE" "668907" "EBFB"   # mov [0xf0000], 0xdeadbeef; loop


BARE = LoopConfig()                               # serves no port: every exit is the handlers'


def _vcpu(kvm, code_hex):
    """A VM with 512 KiB of RAM at GPA 0, ``code_hex`` at 0x1000, one vCPU in real mode there."""
    return real_mode_vm(kvm, bytes.fromhex(code_hex), 0x80000)


@pytest.fixture(params=[RunLoop, ReferenceLoop], ids=["c", "py"])
def loop_cls(request):
    return request.param


def _first(loop, reason, handler, budget=1):
    loop.on(reason, handler)
    return loop.run(budget=budget)


@pytest.mark.parametrize("code,size,value", [(OUT_WORD, 2, 0x1234), (OUT_DWORD, 4, 0x12345678)])
def test_out_value_is_what_kvm_run_holds(kvm, loop_cls, code, size, value):
    vm, v = _vcpu(kvm, code)
    with vm:
        loop = loop_cls(v, BARE)
        seen = []
        _first(loop, "IO", lambda ex: seen.append((ex.value, ex.size, ex.port,
                                                   int.from_bytes(ex.data, "little"))), 5)
        assert seen == [(value, size, 0x80, value)] * 5


def test_rep_outs_value_is_the_first_element_and_data_is_all(kvm, loop_cls):
    vm, v = _vcpu(kvm, REP_OUTSB)
    with vm:
        vm.memory.write(0x2000, b"\x11\x22\x33")
        loop = loop_cls(v, BARE)
        seen = []
        loop.on("IO", lambda ex: seen.append((ex.value, ex.count, ex.data)))
        loop.run(budget=4)
        got = b"".join(d for _, _, d in seen)
        assert got == b"\x11\x22\x33" and seen[0][0] == 0x11


def test_rep_ins_respond_repeats_the_int_for_each_element(kvm, loop_cls):
    vm, v = _vcpu(kvm, REP_INSW)
    with vm:
        loop = loop_cls(v, BARE)
        loop.on("IO", lambda ex: ex.respond(0x1BEEF))          # masked to the element size
        stop = loop.run(budget=6)
        assert stop.kind == "exit" and stop.exit.name == "HLT"
        assert vm.memory.read(0x3000, 8) == b"\xef\xbe" * 4


def test_respond_with_bytes_of_the_wrong_length_is_value_error(kvm, loop_cls):
    vm, v = _vcpu(kvm, REP_INSW)
    with vm:
        loop = loop_cls(v, BARE)
        loop.on("IO", lambda ex: ex.respond(b"\x01"))
        with pytest.raises(ValueError, match="needs"):
            loop.run(budget=2)
        assert loop.failed_exit is not None and loop.failed_exit.port == 0x80


def test_mmio_reads_of_each_width_get_the_answer(kvm, loop_cls):
    vm, v = _vcpu(kvm, MMIO_READS)
    with vm:
        loop = loop_cls(v, BARE)
        lens = []

        def answer(ex):
            lens.append((ex.len, ex.is_write, ex.phys_addr))
            ex.respond(0x8877665544332211)
        loop.on("MMIO", answer)
        stop = loop.run(budget=10)
        assert stop.kind == "exit" and stop.exit.name == "HLT"
        assert lens == [(1, False, 0xF0000), (2, False, 0xF0000), (4, False, 0xF0000)]
        assert vm.memory.read(0x4000, 8) == bytes.fromhex("11" "00" "1122" "11223344")


def test_mmio_write_value(kvm, loop_cls):
    vm, v = _vcpu(kvm, MMIO_WRITE)
    with vm:
        loop = loop_cls(v, BARE)
        seen = []
        loop.on("MMIO", lambda ex: seen.append((ex.value, ex.len, ex.data)))
        loop.run(budget=3)
        assert seen == [(0xDEADBEEF, 4, b"\xef\xbe\xad\xde")] * 3


def test_a_kept_exit_goes_stale_for_value_and_respond(kvm, loop_cls):
    vm, v = _vcpu(kvm, OUT_WORD)
    with vm:
        loop = loop_cls(v, BARE)
        kept = []
        loop.on("IO", kept.append)
        loop.run(budget=3)
        loop.on("IO", None)
        loop.run(budget=1)                          # the guest runs again
        assert len({id(e) for e in kept}) == 3      # kept ones are never refilled
        for ex in kept:
            with pytest.raises(StaleExit):
                _ = ex.value
            with pytest.raises(StaleExit):
                ex.respond(1)
            assert not ex.current


def test_closing_from_a_handler_makes_the_exit_closed(kvm, loop_cls):
    vm, v = _vcpu(kvm, OUT_WORD)
    with vm:
        loop = loop_cls(v, BARE)
        kept = []

        def close(ex):
            kept.append(ex)
            v.close()
        loop.on("IO", close)
        assert loop.run(budget=5).kind == "kick"
        with pytest.raises(Closed):
            _ = kept[0].value


def test_the_report_port_never_reaches_a_handler(kvm, loop_cls):
    vm, v = _vcpu(kvm, OUT_WORD)
    with vm:
        loop = loop_cls(v, LoopConfig(report_port=0x80))
        calls = []
        loop.on("IO", calls.append)
        stop = loop.run(budget=3)
        assert stop.kind == "exit" and stop.exit.port == 0x80 and stop.result is None
        assert calls == []


def test_mmio_in_guarded_ram_never_reaches_a_handler(kvm, loop_cls):
    vm, v = _vcpu(kvm, MMIO_WRITE)
    with vm:
        loop = loop_cls(v, BARE)
        calls = []
        loop.on("MMIO", calls.append)
        loop.guard_ram([(0xF0000, 1)])
        stop = loop.run(budget=3)
        assert stop.kind == "exit" and stop.exit.phys_addr == 0xF0000 and calls == []
        loop.guard_ram([(0xF0001, 0x1000), (0, 0xF0000)])    # around it: the handler again
        loop.run(budget=3)
        assert len(calls) == 3


def test_guard_ram_merges_to_four_covering_ranges_and_refuses_bad_ones(kvm):
    vm, v = _vcpu(kvm, OUT_WORD)
    with vm:
        loop = RunLoop(v, BARE)
        loop.guard_ram([(0x1000 * k * k, 0x100) for k in range(7)])
        assert len(loop._guard) == 4
        covered = [g for g, n in loop._guard for g in (g, g + n - 1)]
        assert min(covered) == 0 and max(covered) == 0x1000 * 36 + 0xFF
        for bad in ([(0, 0)], [(-1, 5)], [(1 << 64, 1)]):
            with pytest.raises(ValueError):
                loop.guard_ram(bad)


def test_a_handler_exception_propagates_with_its_frame_and_exit(kvm, loop_cls):
    vm, v = _vcpu(kvm, OUT_WORD)
    with vm:
        loop = loop_cls(v, BARE)

        def broken_handler(ex):
            raise KeyError("from the handler")
        loop.on("IO", broken_handler)
        with pytest.raises(KeyError) as ei:
            loop.run(budget=3)
        assert "broken_handler" in [t.name for t in ei.traceback]
        assert loop.failed_exit is not None and loop.failed_exit.name == "IO"
        loop.on("IO", None)
        assert loop.run(budget=1).kind == "exit" and loop.failed_exit is None


def _machine(code, **kw):
    return Machine(bytes.fromhex(code), flat_addr=0x1000, flat_mode="real", mem_size=1 << 20,
                   **kw)


def test_machine_handler_is_called_with_machine_index_and_exit(kvm):
    with _machine(OUT_DWORD, kvm=kvm) as m:
        seen = []
        m.on("IO", lambda machine, index, ex: seen.append((machine is m, index, ex.value)))
        assert m.step(budget=4, timeout=None).kind == "budget"
        assert seen == [(True, 0, 0x12345678)] * 4
        m.on("IO", lambda machine, index, ex: "stop")
        ev = m.step(budget=4, timeout=None)
        assert ev.kind == "exit" and ev.exit.port == 0x80
        m.on("IO", None)
        ev = m.step(budget=4, timeout=None)              # no handler: the exit ends the step
        assert ev.kind == "exit" and ev.exit.name == "IO"


def test_machine_trace_sees_every_exit_a_handler_serves(kvm):
    with _machine(OUT_WORD, kvm=kvm) as m:
        lines, seen = [], []
        m.on("IO", lambda machine, index, ex: seen.append(ex.value))
        m.trace = lines.append
        m.step(budget=3, timeout=None)
        assert seen == [0x1234] * 3 and len([x for x in lines if "Io" in x]) == 3
        m.trace = None
        m.step(budget=3, timeout=None)
        assert len(seen) == 6 and len([x for x in lines if "Io" in x]) == 3


def test_machine_handler_guest_memory_error_is_the_guests_fault_naming_the_exit(kvm):
    with _machine(OUT_WORD, kvm=kvm) as m:
        def read_far(machine, index, ex):
            machine.vm.memory.read(1 << 40, 4)
        m.on("IO", read_far)
        with pytest.raises(GuestError, match="guest fault.*IO exit") as ei:
            m.step(budget=3, timeout=None)
        assert isinstance(ei.value.__cause__, GuestMemoryError)


def test_run_handlers_and_run_state_refuse_bad_arguments(kvm):
    vm, v = _vcpu(kvm, OUT_WORD)
    with vm:
        rs = v._rs
        slots = [None] * 64
        with pytest.raises(ValueError):
            run_handlers(0, slots, list(slots), v, rs, None, None)
        with pytest.raises(TypeError):
            run_handlers(1, {}, list(slots), v, rs, None, None)
        with pytest.raises(ValueError, match="lists of 64"):
            run_handlers(1, [None] * 3, list(slots), v, rs, None, None)
        with pytest.raises(TypeError):
            run_handlers(1, slots, list(slots), v, object(), None, None)
        with pytest.raises(ValueError):
            RunState(0, 1 << 12)
        with pytest.raises(ValueError):
            RunState(0x1000, 16)                          # smaller than struct kvm_run
        with pytest.raises(AttributeError):
            rs.run = 0                                    # read-only: exits write through it


# -- a caller who writes the exit's private fields, or calls things at the wrong moment ---------
def test_fields_written_from_python_take_the_exit_off_the_c_path(kvm, loop_cls):
    """Whatever is written into the decoded fields, respond() and value stay inside kvm_run (the
    checked Python path answers) and never hang: sizes 0 and 0xff, huge counts, a foreign _rs."""
    vm, v = _vcpu(kvm, MMIO_READS)
    with vm:
        loop = loop_cls(v, BARE)
        outcomes = []

        def meddle(ex):
            for field, value in (("_info", 0x100), ("_info", 0xFF), ("_a", 0xFFFF_FFFF_FFFF)):
                setattr(ex, field, value)
                for call in (lambda: ex.respond(5), lambda: ex.value):
                    try:
                        call()
                        outcomes.append("ok")
                    except GuestError:
                        outcomes.append("GuestError")
            with pytest.raises(TypeError):
                ex._rs = b"\xff" * 8
            with pytest.raises(TypeError):
                del ex._seq
            return "stop"
        loop.on("MMIO", meddle)
        stop = loop.run(budget=3)
        assert stop.result == "stop" and outcomes      # answered, one way or the other
        run_bytes = bytes(v._run_bytes)
        assert len(run_bytes) == v.run_size             # nothing beyond it was asked for


def test_a_foreign_object_in_the_exit_cache_is_replaced(kvm):
    vm, v = _vcpu(kvm, OUT_WORD)
    with vm:
        loop = RunLoop(v, BARE)
        seen = []
        loop.on("IO", lambda ex: seen.append(ex.value))
        loop.run(budget=1)
        loop._exit_slots[2] = bytearray(8)              # IO is exit reason 2
        assert loop.run(budget=3).kind == "budget" and seen == [0x1234] * 4


def test_value_after_respond_is_what_the_guest_reads(kvm, loop_cls):
    vm, v = _vcpu(kvm, REP_INSW)
    with vm:
        loop = loop_cls(v, BARE)
        seen = []

        def answer(ex):
            ex.respond(0x1BEEF)
            seen.append(ex.value)
        loop.on("IO", answer)
        loop.run(budget=1)
        assert seen == [0xBEEF]


def test_a_handler_running_its_own_loop_again_is_busy_and_the_run_goes_on(kvm, loop_cls):
    vm, v = _vcpu(kvm, OUT_WORD)
    with vm:
        loop = loop_cls(v, BARE)
        errors = []

        def again(ex):
            try:
                loop.run(budget=1)
            except Exception as e:  # noqa: BLE001 — what it raises is the point
                errors.append(type(e).__name__)
            _ = ex.value                                # still current
        loop.on("IO", again)
        stop = loop.run(budget=3)
        assert stop.kind == "budget" and loop.exits_total == 3
        assert errors == ["Busy"] * 3


@pytest.mark.parametrize("name", ["io", "KVM_EXIT_IO", 2])
def test_machine_on_takes_any_spelling_of_an_exit_reason(kvm, name):
    with _machine(OUT_WORD, kvm=kvm) as m:
        seen = []
        m.on(name, lambda machine, index, ex: seen.append(ex.port))
        m.step(budget=2, timeout=None)
        m.trace = lambda line: None
        m.step(budget=2, timeout=None)
        assert seen == [0x80] * 4


def test_guard_ram_refuses_sizes_beyond_64_bits_and_the_loop_stays_usable(kvm, loop_cls):
    vm, v = _vcpu(kvm, MMIO_WRITE)
    with vm:
        loop = loop_cls(v, BARE)
        with pytest.raises(ValueError):
            loop.guard_ram([(0, 1 << 64)])
        loop.guard_ram([(0, 1 << 63), (1 << 63, 1 << 63)])   # merged: all but the last byte
        calls = []
        loop.on("MMIO", calls.append)
        stop = loop.run(budget=2)
        assert stop.kind == "exit" and calls == []


def test_a_closing_vcpu_cannot_be_reopened(kvm):
    vm, v = _vcpu(kvm, OUT_WORD)
    with vm:
        v.close()
        with pytest.raises(ValueError):
            v._rs.closing = False
        assert v._rs.closing


def test_repr_of_a_kept_exit_never_raises(kvm, loop_cls):
    vm, v = _vcpu(kvm, OUT_WORD)
    with vm:
        loop = loop_cls(v, BARE)
        kept = []
        loop.on("IO", kept.append)
        loop.run(budget=2)
        loop.on("IO", None)
        loop.run(budget=1)
        assert repr(kept[0]) == "<Io (stale)>"
        v.close()
        assert repr(kept[1]) == "<Io (closed)>"


@pytest.mark.parametrize("reason,error", [("bogus", ValueError), ("MIMO", ValueError),
                                          (99, ValueError), (None, TypeError), (2.0, TypeError),
                                          (True, TypeError)])
def test_unknown_or_odd_exit_reasons_are_refused_at_registration(kvm, reason, error):
    with _machine(OUT_WORD, kvm=kvm) as m:
        with pytest.raises(error):
            m.on(reason, lambda machine, index, ex: None)
        with pytest.raises(error):
            m.loops[0].on(reason, lambda ex: None)
        assert m.handlers == {}


def test_a_handler_that_is_not_callable_is_refused(kvm):
    with _machine(OUT_WORD, kvm=kvm) as m:
        with pytest.raises(TypeError):
            m.on("IO", 42)
        with pytest.raises(TypeError):
            m.loops[0].on("IO", "not a function")


def test_what_a_machine_handler_returns_is_the_events_value(kvm):
    with _machine(OUT_WORD, kvm=kvm) as m:
        m.on("IO", lambda machine, index, ex: ("stopped at", ex.port))
        ev = m.step(timeout=None, budget=5)
        assert ev.kind == "exit" and ev.value == ("stopped at", 0x80)
        m.trace = lambda line: None                      # the step() path says the same
        ev = m.step(timeout=None, budget=5)
        assert ev.kind == "exit" and ev.value == ("stopped at", 0x80)


OUT_THEN_SPIN = "E680" "EBFE"                       # out 0x80, al; then spin without exiting


def test_a_thread_a_handler_starts_runs_while_the_guest_spins(kvm, loop_cls):
    """Alone in the interpreter, the C loop keeps the GIL across KVM_RUN; a thread started by a
    handler must still run while the guest spins without exits (its kick ends the run)."""
    import threading
    vm, v = _vcpu(kvm, OUT_THEN_SPIN)
    with vm:
        loop = loop_cls(v, BARE)
        started = []

        def start_kicker(ex):
            t = threading.Thread(target=lambda: (started.append(1), loop.kick()), daemon=True)
            t.start()
        loop.on("IO", start_kicker)
        stop = loop.run(deadline=time.monotonic() + 20)
        assert stop.kind == "kick" and started == [1]
