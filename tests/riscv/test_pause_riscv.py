"""Machine.pause() on RISC-V KVM holds the guest's time still, as QEMU does for a stopped VM
(kvm_riscv_vm_state_change): the last vCPU to be held saves the timer's ``time`` register and
the first to leave the hold puts it back before any vCPU runs on. A Linux guest therefore sees
no jump after a pause and its soft-lockup watchdog stays quiet (RISC-V KVM has no counterpart
of x86's KVM_KVMCLOCK_CTRL notice).

The guest is time_hold (guests/riscv/time_hold.c): every hart reads the time CSR in a tight
loop and keeps the largest step between two reads and a count of reads that went backwards.
A hold of HOLD seconds must not show up as a step of anywhere near that length; the bound,
half the hold, leaves the rest for the host's own scheduling of a loaded lab."""
import subprocess
import sys
import threading
import time

import pytest

from pykvm.machine import Machine
from pykvm.testing import wait_until

pytestmark = [
    pytest.mark.requires_arch("riscv64"),
    pytest.mark.filterwarnings("ignore:record_property is incompatible:pytest.PytestWarning"),
]
HOLD = 4.0                      # seconds the guest is held
PATIENCE = 120.0                # seconds to wait for guest progress (QEMU TCG is slow)


def _wait(cond, what):
    wait_until(cond, what, timeout=PATIENCE, interval=0.02)


class Watching:
    """time_hold run by Machine.run in a thread; reads its per-hart counters by address."""

    def __init__(self, m, vcpus):
        self.m, self.vcpus, self.box = m, vcpus, {}
        self.where = {n: m.globals.where(n)[0] for n in ("max_step", "reads", "backwards")}
        self.freq = m.vcpus[0].get_reg("timer.frequency")
        self.t = threading.Thread(target=lambda: self.box.setdefault("r", m.run(timeout=600)),
                                  daemon=True)
        self.t.start()

    def per_hart(self, name):
        return [self.m.memory.read_u64(self.where[name] + 8 * h) for h in range(self.vcpus)]

    def advance(self, by=1000):
        first = self.per_hart("reads")
        _wait(lambda: all(r >= f + by for r, f in zip(self.per_hart("reads"), first))
              or not self.t.is_alive(), f"every hart to read the time {by} more times")
        assert self.t.is_alive(), f"the run ended: {self.box.get('r')}"

    def largest_step_s(self):
        assert self.per_hart("backwards") == [0] * self.vcpus, "the guest's time went backwards"
        return max(self.per_hart("max_step")) / self.freq

    def finish(self):
        if self.t.is_alive():
            self.m.stop("test over")
            self.t.join(PATIENCE)



@pytest.mark.parametrize("vcpus", [1, 2])
def test_the_guests_time_stands_still_while_paused(vcpus, record_property):
    m = Machine("time_hold", vcpus=vcpus)
    w = Watching(m, vcpus)
    try:
        w.advance()
        before = w.largest_step_s()
        for _ in range(2):
            assert m.pause(timeout=PATIENCE)
            time.sleep(HOLD)
            m.resume()
            w.advance()
        step = w.largest_step_s()
        record_property(f"riscv_pause_max_step_s_{vcpus}", round(step, 3))
        assert step < HOLD / 2, (
            f"the guest's time moved {step:.2f} s between two reads across a {HOLD} s pause "
            f"(largest step before the pause: {before:.3f} s)")
    finally:
        w.finish()
        m.close()
    assert w.box["r"].exit == "stopped", w.box["r"]


def test_a_reset_while_running_resumes_at_the_checkpoints_time():
    """Machine.reset() of a running machine holds it, loads the checkpoint (RAM and the
    timer's time with it) and lets it run on: from the checkpoint's time, not from the time the
    hold began, which lies HOLD seconds of running later."""
    m = Machine("time_hold", vcpus=2)
    w = Watching(m, 2)
    try:
        w.advance()
        assert m.checkpoint() > 0
        time.sleep(HOLD)                           # the guest runs on meanwhile
        w.advance()
        assert m.reset() > 0
        w.advance()
        assert w.largest_step_s() < HOLD / 2, f"a step of {w.largest_step_s():.2f} s"
    finally:
        w.finish()
        m.close()


_RESTORED = """
import sys, threading, time
from pykvm.machine import Machine
path, freq, reads, steps, backwards = sys.argv[1], *map(int, sys.argv[2:])
m = Machine.restore(path)
t = threading.Thread(target=lambda: m.run(timeout=600), daemon=True)
t.start()
first = m.memory.read_u64(reads)
end = time.monotonic() + 120
while m.memory.read_u64(reads) < first + 1000 and time.monotonic() < end and t.is_alive():
    time.sleep(0.02)
print(m.memory.read_u64(reads) - first, m.memory.read_u64(steps) / freq,
      m.memory.read_u64(backwards))
m.stop("test over")
t.join(60)
m.close()
"""


def test_a_snapshot_of_a_paused_guest_has_the_time_it_was_held_at(tmp_path):
    """Paused HOLD seconds, then snapshotted: the snapshot records the time the guest was held
    at, so the guest restored in another process sees no jump either."""
    path = str(tmp_path / "held.snap")
    m = Machine("time_hold")
    w = Watching(m, 1)
    try:
        w.advance()
        assert m.pause(timeout=PATIENCE)
        time.sleep(HOLD)
        m.snapshot(path)
        m.resume()
        w.advance()
        assert w.largest_step_s() < HOLD / 2, f"a step of {w.largest_step_s():.2f} s here"
    finally:
        w.finish()
        m.close()
    p = subprocess.run([sys.executable, "-c", _RESTORED, path, str(w.freq),
                        *(str(w.where[n]) for n in ("reads", "max_step", "backwards"))],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    more, step, back = p.stdout.split()
    assert int(more) >= 1000, p.stdout                  # the restored guest ran
    assert int(back) == 0 and float(step) < HOLD / 2, (
        f"the restored guest saw a step of {float(step):.2f} s after a {HOLD} s hold")
