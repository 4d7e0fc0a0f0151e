"""Machine.pause() tells the guest it was held, as QEMU does when a VM stops: each held vCPU
issues KVM_KVMCLOCK_CTRL, and a guest with kvmclock enabled finds PVCLOCK_GUEST_STOPPED in its
pvclock flags when it runs on. Without that notice a Linux guest held for longer than its
watchdog threshold (20 s) reports a soft lockup, and its console lines interleave with the
report (the nested lab's control test once failed that way).

The guest (kvmclock_pause.c) enables kvmclock and counts, in its own memory, the notices it
sees, clearing each as Linux does. No test asserts a duration: progress is waited for with a
generous limit."""
import functools
import threading

import pytest

from pykvm import testing

pytestmark = [pytest.mark.requires_kvm, pytest.mark.requires_arch("x86_64")]
PATIENCE = 30.0                 # seconds to wait for something that should happen promptly
wait_until = functools.partial(testing.wait_until, timeout=PATIENCE)


class Counting:
    """The guest run by Machine.run in a thread, past its SYNC(1)."""

    def __init__(self, m, before_run=lambda: None):
        self.m = m
        stops, loops, vec, self.flags = m.sync(stage=1)
        assert vec == 0, f"the guest's wrmsr of MSR_KVM_SYSTEM_TIME_NEW took vector {vec}"
        self.stops, self.loops = stops, loops
        before_run()
        self.box: dict = {}
        self.thread = threading.Thread(target=lambda: self.box.setdefault(
            "r", m.run(timeout=300)), daemon=True)
        self.thread.start()
        wait_until(lambda: m.running, "the run to start")

    def read(self, addr):
        return self.m.memory.read_u64(addr)

    def runs_on(self):
        first = self.read(self.loops)
        wait_until(lambda: self.read(self.loops) > first or not self.thread.is_alive(),
                   "the guest's loop counter to advance")
        assert self.thread.is_alive(), f"the run ended: {self.box.get('r')}"

    def finish(self):
        self.m.stop("test over")
        self.thread.join(PATIENCE)
        assert self.box["r"].exit == "stopped", self.box["r"]


def test_each_pause_reaches_the_guest_as_pvclock_guest_stopped(guest_vm, kvm):
    if not kvm.check_extension("KVMCLOCK_CTRL"):
        pytest.skip("pykvm: host lacks KVM_CAP_KVMCLOCK_CTRL")
    c = Counting(guest_vm("kvmclock_pause.c"))
    assert not c.flags & 2, f"PVCLOCK_GUEST_STOPPED set before any pause: flags {c.flags:#x}"
    c.runs_on()
    assert c.read(c.stops) == 0                      # running alone sets no notice
    for n in range(1, 4):
        assert c.m.pause(timeout=PATIENCE)
        c.m.resume()
        wait_until(lambda n=n: c.read(c.stops) >= n, f"the guest to see notice {n}")
        assert c.read(c.stops) == n                  # one notice per pause, none repeated
        c.runs_on()
    c.finish()


def test_notify_paused_without_kvmclock_is_false_and_harmless(guest_vm, kvm):
    """A guest that never enabled kvmclock: KVM answers EINVAL, which is "nothing to tell"
    (False), and pausing such a guest works as before."""
    m = guest_vm("control_counter.c")
    assert m.vcpus[0].notify_paused() is False
    addr = m.sync(stage=1)[0]
    box: dict = {}
    t = threading.Thread(target=lambda: box.setdefault("r", m.run(timeout=300)), daemon=True)
    t.start()
    wait_until(lambda: m.running, "the run to start")
    assert m.pause(timeout=PATIENCE)
    held = m.memory.read_u64(addr)
    m.resume()
    wait_until(lambda: m.memory.read_u64(addr) != held or not t.is_alive(),
               "the counter to advance after resume")
    m.stop("test over")
    t.join(PATIENCE)
    assert box["r"].exit == "stopped", box["r"]


def test_a_vcpu_with_kvmclock_takes_the_notice_between_runs(guest_vm, kvm):
    """notify_paused() straight on the vCPU, out of KVM_RUN: True once the guest enabled
    kvmclock (at its SYNC(1)), and the guest sees it at its next entry."""
    if not kvm.check_extension("KVMCLOCK_CTRL"):
        pytest.skip("pykvm: host lacks KVM_CAP_KVMCLOCK_CTRL")
    m = guest_vm("kvmclock_pause.c")
    told = []
    c = Counting(m, before_run=lambda: told.append(m.vcpus[0].notify_paused()))
    assert told == [True]
    wait_until(lambda: c.read(c.stops) >= 1, "the guest to see the notice")
    c.runs_on()
    assert c.read(c.stops) == 1
    c.finish()
