"""A deadline ends one run, not the machine (issue 16, fault 10): after ``run(timeout=...)``
times out, the next ``run()`` runs the guest on from where it stopped — both run loops, one
vCPU and several — and a machine that cannot run again (the guest powered off) says why in
one line."""
import threading

import pytest

from pykvm import status
from pykvm.errors import Busy, MachineEnded
from pykvm.machine import Machine
from pykvm.testing import wait_until

from _elfguest import elf_guest
from _loops import LOOP_IDS, LOOPS

COUNTER = 0x210000
# every vCPU increments the same counter in RAM, forever
COUNT = """
    mov rbx, offset counter
1:  lock inc qword ptr [rbx]
    jmp 1b
.data
.globl counter
counter: .quad 0
"""
# multiboot (pc machine): ACPI S5 through PM1a_CNT (0x604: SLP_TYP 0 | SLP_EN), then spin
POWEROFF = """
    mov dx, 0x604
    mov ax, 0x2000
    out dx, ax
1:  jmp 1b
"""


def _progress(m, short_run, after, tries=200):
    """Call ``short_run()`` (a step or run with a short deadline, which it asserts ends in
    "timeout") until the guest's counter passes ``after``; returns the counter then. What is
    tested is that a run after a deadline runs the guest on; how many short runs a loaded host
    (or an ASan build) needs before the guest's next increment is not, so a few are allowed
    (one 0.1 s step once ended before the guest's first increment under ASan in CI)."""
    for _ in range(tries):
        short_run()
        now = m.memory.read_u64(COUNTER)
        if now > after:
            return now
    raise AssertionError(f"the guest's counter stayed at {after} through {tries} short runs")


@pytest.mark.parametrize("vcpus", [1, 2])
@pytest.mark.parametrize("loop_cls", LOOPS, ids=LOOP_IDS)
def test_run_after_a_timeout_runs_the_guest_on(tmp_path, loop_cls, vcpus):
    path = elf_guest(tmp_path, COUNT)
    with Machine(path, loop=loop_cls, vcpus=vcpus) as m:
        def run():
            r = m.run(timeout=0.2)
            assert (r.exit, r.exit_code) == ("timeout", status.TIMEOUT), r.detail
            assert r.seconds >= 0.15                 # the deadline never ends it early
        seen = [0]
        for _ in range(3):
            seen.append(_progress(m, run, seen[-1]))     # progress after every timeout


# counts, and writes a byte to the debug console port 0xe9 (an exit served in the loop)
COUNT_AND_EXIT = """
    mov rbx, offset counter
1:  inc qword ptr [rbx]
    mov al, 0x2e
    out 0xe9, al
    jmp 1b
.data
.globl counter
counter: .quad 0
"""


@pytest.mark.parametrize("loop_cls", LOOPS, ids=LOOP_IDS)
def test_step_after_a_deadline_runs_on(tmp_path, loop_cls):
    path = elf_guest(tmp_path, COUNT)
    with Machine(path, loop=loop_cls) as m:
        def step():
            assert m.step(timeout=0.1).kind == "timeout"

        def run():
            assert m.run(timeout=0.1).exit == "timeout"
        a = _progress(m, step, 0)
        b = _progress(m, step, a)
        assert _progress(m, run, b) > b


@pytest.mark.parametrize("loop_cls", LOOPS, ids=LOOP_IDS)
def test_step_after_its_exit_budget_runs_on(tmp_path, loop_cls):
    path = elf_guest(tmp_path, COUNT_AND_EXIT)
    with Machine(path, loop=loop_cls) as m:
        counts = []
        for _ in range(3):
            assert m.step(budget=50, timeout=10).kind == "budget"
            counts.append(m.memory.read_u64(COUNTER))
        assert counts[0] >= 49 and counts[1] - counts[0] == 50 and counts[2] - counts[1] == 50

        def run():
            assert m.run(timeout=0.1).exit == "timeout"
        assert _progress(m, run, counts[2]) > counts[2]


def test_kick_all_then_run_again(tmp_path):
    """A kick that stopped a run is used up: the run after it runs the guest. The kick lands
    once both vCPUs are seen in KVM_RUN (a 0.1 s timer stood in for that, and a run whose
    5 s deadline passed first on a loaded host would have ended as "timeout")."""
    path = elf_guest(tmp_path, COUNT)
    with Machine(path, vcpus=2) as m:
        got = []
        t = threading.Thread(target=lambda: got.append(m.run(timeout=600)))
        t.start()
        wait_until(lambda: all(v.running for v in m.vcpus) or not t.is_alive(),
                   "both vCPUs to enter KVM_RUN", timeout=60)
        assert t.is_alive(), got
        m.kick_all()
        t.join(60)
        assert not t.is_alive() and got[0].exit == "kick", got
        before = m.memory.read_u64(COUNTER)

        def run():
            assert m.run(timeout=0.2).exit == "timeout"
        assert _progress(m, run, before) > before


def test_a_powered_off_machine_says_why_it_cannot_run_again(tmp_path):
    path = elf_guest(tmp_path, POWEROFF, bits=32, text=0x100000, data=0x180000)
    with Machine(path) as m:
        r = m.run(timeout=10)
        assert r.exit_code == status.OK and "powered off" in r.detail
        with pytest.raises(MachineEnded, match="cannot run again: the guest powered off") as ei:
            m.run(timeout=1)
        assert "\n" not in str(ei.value)


def test_a_second_concurrent_run_raises_busy(tmp_path):
    """Calling run() while another thread runs the machine is the caller's mistake: Busy,
    at once, and the first run is not disturbed."""
    path = elf_guest(tmp_path, COUNT)
    with Machine(path) as m:
        got = []
        # the first run lasts until stop(): a 1 s deadline let a test thread that a loaded
        # host did not schedule for a second call run() after the first run had ended
        t = threading.Thread(target=lambda: got.append(m.run(timeout=600)))
        t.start()
        wait_until(lambda: m.vcpus[0].running or not t.is_alive(), "the first run to begin",
                   timeout=60, interval=0.001)
        assert t.is_alive(), got
        with pytest.raises(Busy, match="already running"):
            m.run(timeout=0.1)
        assert t.is_alive(), got                       # not disturbed: it runs the guest on
        before = m.memory.read_u64(COUNTER)
        wait_until(lambda: m.memory.read_u64(COUNTER) != before or not t.is_alive(),
                   "the first run to count on", timeout=60)
        m.stop("test over")
        t.join(60)
        assert not t.is_alive() and got[0].exit == "stopped", got
