"""Hostile interleavings of Machine's holds (pause, hold, holding: snapshots, checkpoints,
resets, a debugger's stop, the control socket's dump) with the runs, steps, stops and kicks of
other threads, on real KVM. A hold that returns True must leave no vCPU able to enter KVM_RUN
until it ends, and no two threads may issue ioctls on one vCPU at once (one of them would
raise Busy, or wait in KVM_RUN's vCPU mutex).

Each race is made deterministic by instance-patching a method of the machine or of a vCPU with
an Event (a gate the test opens), never by sleeping: the instrumentation only delays a thread
at a chosen point, KVM is the real one. The guest (control_counter.c) counts in RAM without
ever exiting. No test asserts a duration; the waits are hang guards."""
import functools
import threading

from pykvm import testing

PATIENCE = 30.0                 # seconds to wait for something that should happen promptly
GUEST = "control_counter.c"

wait_until = functools.partial(testing.wait_until, timeout=PATIENCE)


class Bg:
    """``fn(*args)`` in a daemon thread; its result or exception kept."""

    def __init__(self, fn, *args, name="bg"):
        self.result = self.error = None
        self.thread = threading.Thread(target=self._go, args=(fn, args), name=name, daemon=True)
        self.thread.start()

    def _go(self, fn, args):
        try:
            self.result = fn(*args)
        except BaseException as e:  # noqa: BLE001 — kept for the test to look at
            self.error = e

    def join(self, timeout=PATIENCE):
        self.thread.join(timeout)
        return not self.thread.is_alive()

    def is_me(self):
        return threading.current_thread() is self.thread


def counting(guest_vm, vcpus=1):
    """A machine whose guest is past its first sync (now it counts forever) and the counter's
    guest-physical address."""
    m = guest_vm(GUEST, vcpus=vcpus)
    addr = m.sync(stage=1)[0]
    return m, addr


def record_entries(m, log):
    """Append (thread name, holders at that moment) to ``log`` whenever a thread claims a vCPU
    for KVM_RUN (Vcpu._enter_run: a run loop's run, Vcpu.run, complete_io)."""
    for v in m.vcpus:
        def enter(kick, real=v._enter_run):
            real(kick)
            log.append((threading.current_thread().name, m.holders))
        v._enter_run = enter


def finish_run(m, bg, why="test over"):
    """Stop the run ``bg`` carries out (if it still runs) and return its RunResult."""
    if bg.thread.is_alive():
        m.stop(why)
    assert bg.join(), "the run did not end after stop()"
    assert bg.error is None, repr(bg.error)
    return bg.result


# -- behaviour that holds now ------------------------------------------------------------------

def test_a_pause_of_the_idle_machine_holds_the_next_run_from_its_start(guest_vm):
    """pause() between runs, then run(): the run's vCPU is held before its first KVM_RUN (no
    claim of the vCPU while the pause is in force), paused turns True, resume() lets the guest
    count on, stop() ends the run as "stopped"."""
    m, addr = counting(guest_vm)
    assert m.pause(timeout=PATIENCE)                   # nothing runs: held at once
    entries = []
    record_entries(m, entries)
    run = Bg(m.run, 120, name="runner")
    wait_until(lambda: m.running and m.paused, "the new run's vCPU to be held")
    assert entries == [], entries
    held = m.memory.read_u64(addr)
    m.resume()
    wait_until(lambda: m.memory.read_u64(addr) != held, "the guest's counter to advance")
    assert all(not holders for _name, holders in entries), entries
    assert finish_run(m, run).exit == "stopped"


def test_two_holders_keep_the_guest_held_until_both_release(guest_vm):
    """Holds of two owners on a running 2-vCPU machine: the release of one leaves every vCPU
    held (none claims KVM_RUN) until the other releases too."""
    m, addr = counting(guest_vm, vcpus=2)
    run = Bg(m.run, 120, name="runner")
    wait_until(lambda: all(v.running for v in m.vcpus), "both vCPUs to enter KVM_RUN")
    assert m.hold("a", timeout=PATIENCE)
    assert m.hold("b", timeout=PATIENCE)
    entries = []
    record_entries(m, entries)
    m.release("a")
    assert m.held_for("b") and not m.held_for("a")
    held = m.memory.read_u64(addr)
    assert m.hold("b", timeout=PATIENCE)               # idempotent, still held
    assert entries == [] and m.memory.read_u64(addr) == held
    m.release("b")
    wait_until(lambda: m.memory.read_u64(addr) != held, "the guest's counter to advance")
    assert finish_run(m, run).exit == "stopped"


def test_holding_nested_in_one_thread_of_a_running_machine(guest_vm):
    """holding() inside holding() in the same thread, the machine running: the inner block's
    end does not release the outer one (no vCPU claims KVM_RUN until the outer ends)."""
    m, addr = counting(guest_vm, vcpus=2)
    run = Bg(m.run, 120, name="runner")
    wait_until(lambda: all(v.running for v in m.vcpus), "both vCPUs to enter KVM_RUN")
    entries = []
    with m.holding("outer", PATIENCE):
        record_entries(m, entries)
        with m.holding("inner", PATIENCE):
            assert len(m.holders) == 2
            inner = m.vcpus[1].get_regs().rip          # vCPU ioctls: nobody runs it
        assert len(m.holders) == 1
        assert m.vcpus[1].get_regs().rip == inner and not any(v.running for v in m.vcpus)
        assert entries == []
        held = m.memory.read_u64(addr)
    assert m.holders == frozenset()
    wait_until(lambda: m.memory.read_u64(addr) != held, "the guest's counter to advance")
    assert finish_run(m, run).exit == "stopped"


def test_holding_nested_in_one_thread_of_the_idle_machine(guest_vm):
    """holding() inside holding() of the idle machine: a run another thread starts waits for
    the outer block's end, not the inner's."""
    m, addr = counting(guest_vm)
    entries = []
    record_entries(m, entries)
    with m.holding("outer"):
        with m.holding("inner"):
            run = Bg(m.run, 120, name="runner")
        assert run.thread.is_alive() and not m.running
        assert entries == []
        m.vcpus[0].get_regs()                          # the block's own vCPU ioctls
    wait_until(lambda: m.running, "the run to start once the block ended")
    held = m.memory.read_u64(addr)
    wait_until(lambda: m.memory.read_u64(addr) != held, "the guest's counter to advance")
    assert finish_run(m, run).exit == "stopped"


def test_stop_ends_a_paused_run_and_close_ends_a_waiting_hold(guest_vm):
    """stop() of a paused run ends it as "stopped"; a hold waiting for a vCPU that cannot be
    held (stuck in an exit handler here: a gate) returns False once the machine is closed,
    and the run raises Closed."""
    m, _addr = counting(guest_vm)
    run = Bg(m.run, 120, name="runner")
    wait_until(lambda: m.vcpus[0].running, "vCPU 0 to enter KVM_RUN")
    assert m.pause(timeout=PATIENCE)
    assert finish_run(m, run, "stopped while paused").exit == "stopped"
    assert m.holders == frozenset()

    # a vCPU that never comes back to the loop: the hold waits until close()
    in_step, gate = threading.Event(), threading.Event()
    real_step = m.step

    def stuck_step(index=0, **kw):
        if threading.current_thread().name == "runner2":
            in_step.set()
            gate.wait(PATIENCE)
        return real_step(index, **kw)
    m.step = stuck_step
    run2 = Bg(m.run, 120, name="runner2")
    assert in_step.wait(PATIENCE)
    hold = Bg(m.hold, "h", None)                      # no wait: returns at once, not held
    assert hold.join() and hold.result is False
    waiter = Bg(m.hold, "w", PATIENCE)
    wait_until(lambda: "w" in m.holders, "the second hold to begin")
    closer = Bg(m.close)
    assert waiter.join() and waiter.result is False, (waiter.result, waiter.error)
    gate.set()
    assert closer.join() and closer.error is None
    assert run2.join()
    assert type(run2.error).__name__ == "Closed", repr(run2.error)
