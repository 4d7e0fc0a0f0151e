"""Machine.pause() on RISC-V KVM holds the guest's time still, as QEMU does for a stopped VM
(kvm_riscv_vm_state_change): the last vCPU to be held saves the timer's ``time`` register and
the first to leave the hold puts it back before any vCPU runs on. A Linux guest therefore sees
no jump after a pause and its soft-lockup watchdog stays quiet (RISC-V KVM has no counterpart
of x86's KVM_KVMCLOCK_CTRL notice).

The guest is time_hold (guests/riscv/time_hold.c): every hart reads the time CSR in a tight
loop and keeps the largest step between two reads and a count of reads that went backwards.
A hold of HOLD seconds must not show up as a step of anywhere near that length; the bound,
half the hold, leaves the rest for the host's own scheduling of a loaded lab."""
import threading
import time

import pytest

from pykvm.machine import Machine

pytestmark = pytest.mark.requires_arch("riscv64")
HOLD = 4.0                      # seconds the guest is held
PATIENCE = 120.0                # seconds to wait for guest progress (QEMU TCG is slow)


def _wait(cond, what):
    end = time.monotonic() + PATIENCE
    while not cond():
        assert time.monotonic() < end, f"gave up waiting: {what}"
        time.sleep(0.02)


@pytest.mark.parametrize("vcpus", [1, 2])
def test_the_guests_time_stands_still_while_paused(vcpus, record_property):
    m = Machine("time_hold", vcpus=vcpus)
    box: dict = {}
    t = threading.Thread(target=lambda: box.setdefault("r", m.run(timeout=600)), daemon=True)
    try:
        where = {n: m.globals.where(n)[0] for n in ("max_step", "reads", "backwards")}

        def per_hart(name):
            return [m.memory.read_u64(where[name] + 8 * h) for h in range(vcpus)]

        def all_advance(by):
            first = per_hart("reads")
            _wait(lambda: all(r >= f + by for r, f in zip(per_hart("reads"), first))
                  or not t.is_alive(), f"every hart to read the time {by} more times")
            assert t.is_alive(), f"the run ended: {box.get('r')}"

        freq = m.vcpus[0].get_reg("timer.frequency")
        t.start()
        all_advance(1000)
        before = per_hart("max_step")
        for _ in range(2):
            assert m.pause(timeout=PATIENCE)
            time.sleep(HOLD)
            m.resume()
            all_advance(1000)
        steps = [s / freq for s in per_hart("max_step")]
        record_property(f"riscv_pause_max_step_s_{vcpus}", [round(s, 3) for s in steps])
        record_property(f"riscv_pause_step_before_s_{vcpus}", [round(s / freq, 3) for s in before])
        assert per_hart("backwards") == [0] * vcpus, "the guest's time went backwards"
        assert max(steps) < HOLD / 2, (
            f"the guest's time moved {max(steps):.2f} s between two reads across a "
            f"{HOLD} s pause (largest step before the pause: {max(before) / freq:.3f} s)")
    finally:
        if t.is_alive():
            m.stop("test over")
            t.join(PATIENCE)
        m.close()
    assert box["r"].exit == "stopped", box["r"]
