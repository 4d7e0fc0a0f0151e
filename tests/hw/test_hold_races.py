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
import signal
import threading

import pytest

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


def gate_claims(v, name):
    """Gate vCPU ``v``'s claims for KVM_RUN (Vcpu._enter_run) by the thread called ``name``:
    each sets the returned ``claimed`` Event, then waits (holding the claim) until the
    returned ``go`` Event is set."""
    claimed, go = threading.Event(), threading.Event()
    real_enter = v._enter_run

    def enter(kick):
        real_enter(kick)
        if threading.current_thread().name == name:
            claimed.set()
            go.wait(PATIENCE)
    v._enter_run = enter
    return claimed, go


def gate_call(obj, name, thread=None):
    """Gate ``obj``'s method ``name`` (e.g. a vCPU's complete_io, a snapshot's or
    checkpoint's; the machine's _settle, a run's end), for calls from the thread called
    ``thread`` (None: every call): each sets the returned ``at`` Event, then waits until the
    returned ``go`` Event is set before it does its work."""
    at, go = threading.Event(), threading.Event()
    real = getattr(obj, name)

    def gated(*args, **kwargs):
        if thread is None or threading.current_thread().name == thread:
            at.set()
            go.wait(PATIENCE)
        return real(*args, **kwargs)
    setattr(obj, name, gated)
    return at, go


def assert_snapshot_left_the_guest_alone(m, v, addr, snap, gate):
    """Open ``gate`` (the snapshot ``snap`` waits at it, the run already ended) and assert the
    snapshot ends with its complete_io's KVM_RUN returning at once: the guest's counter at
    ``addr`` does not move. A snapshot stuck in KVM_RUN is kicked free before failing."""
    at_end = v.run_struct.immediate_exit
    before = m.memory.read_u64(addr)
    gate.set()
    done = snap.join()
    if not done:                                     # free the snapshot's thread from KVM_RUN
        v.kick()
        snap.join()
    after = m.memory.read_u64(addr)
    assert done, ("the snapshot's complete_io entered KVM_RUN without immediate_exit "
                  f"(cleared to {at_end} by the run's end) and ran the guest until kicked")
    assert snap.error is None, repr(snap.error)
    assert after == before, "the guest ran during its snapshot"


def gate_steps(m, name):
    """Gate the run's steps (Machine._step) on the thread called ``name``: until the returned
    ``gate`` Event is set, each sets ``in_step`` and waits there, a vCPU that does not come
    back to the run loop (to be held) meanwhile."""
    in_step, gate = threading.Event(), threading.Event()
    real_step = m._step

    def gated(*args):
        if threading.current_thread().name == name and not gate.is_set():
            in_step.set()
            gate.wait(PATIENCE)
        return real_step(*args)
    m._step = gated
    return in_step, gate


def run_then_snapshot(m, tmp_path, name):
    """Start ``m.run`` (a thread called ``name``), wait until vCPU 0 is in KVM_RUN, then start
    a snapshot of the running machine (a thread called "snapshot"); both as :class:`Bg`."""
    run = Bg(m.run, 120, name=name)
    wait_until(lambda: m.vcpus[0].running, "vCPU 0 to enter KVM_RUN")
    return run, Bg(m.snapshot, str(tmp_path / "s.snap"), name="snapshot")


def finish_run(m, bg, why="test over"):
    """Stop the run ``bg`` carries out (if it still runs) and return its RunResult."""
    if bg.thread.is_alive():
        m.stop(why)
    assert bg.join(), "the run did not end after stop()"
    assert bg.error is None, repr(bg.error)
    return bg.result


# -- behaviour that held from the start -----------------------------------------------------

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
    in_step, gate = gate_steps(m, "runner2")
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


# -- interleavings that failed before 66d1dfc / 080a2d2 (each fixed there) -----------------

def test_a_run_after_stop_does_not_race_a_snapshot_in_progress(guest_vm, tmp_path):
    """stop() while a snapshot holds the running machine, then run() again (a CLI or test
    loop does): the snapshot's hold must outlast the stop, so the new run does not enter
    KVM_RUN while the snapshot reads the vCPUs. Gate: the snapshot waits just before it
    completes vCPU 0's pending exit."""
    m, _addr = counting(guest_vm)
    v = m.vcpus[0]
    at_gate, gate = gate_call(v, "complete_io")
    run1, snap = run_then_snapshot(m, tmp_path, "runner1")
    assert at_gate.wait(PATIENCE), "the snapshot did not hold the machine"
    assert finish_run(m, run1, "stopped during a snapshot").exit == "stopped"
    claimed, go = gate_claims(v, "runner2")
    go.set()                                         # recorded, not held
    run2 = Bg(m.run, 120, name="runner2")
    claimed.wait(5.0)            # the fault: the new run claims vCPU 0 during the snapshot
    raced = claimed.is_set()
    gate.set()
    assert snap.join(), "the snapshot hangs"
    try:
        assert not raced and snap.error is None, \
            f"the new run entered KVM_RUN while the snapshot held the machine ({raced}); " \
            f"snapshot: {snap.error!r}"
    finally:
        res = finish_run(m, run2)
    assert res.exit == "stopped", res


def test_a_run_ending_during_a_snapshot_does_not_make_its_complete_io_run_the_guest(
        guest_vm, tmp_path):
    """The run ends (kick_all() here; a deadline that passes while held, or any vCPU's end,
    does the same) while a snapshot holds it, just as the snapshot's complete_io has set
    kvm_run.immediate_exit and is about to enter KVM_RUN on the snapshot's thread. The run's
    end (_settle: RunLoop.clear_kick) must not clear that immediate_exit: else the
    snapshot's KVM_RUN runs the guest, which (never exiting) keeps the snapshot's thread in
    KVM_RUN for ever, and the guest advances during its own snapshot."""
    m, addr = counting(guest_vm)
    v = m.vcpus[0]
    at_gate, gate = gate_call(v, "run", thread="snapshot")
    run, snap = run_then_snapshot(m, tmp_path, "runner")
    assert at_gate.wait(PATIENCE), "the snapshot did not reach complete_io"
    m.kick_all()                                     # the run ends while the snapshot holds
    assert run.join() and run.error is None, run.error
    assert run.result.exit in ("kick", "stopped"), run.result
    assert_snapshot_left_the_guest_alone(m, v, addr, snap, gate)


def test_a_run_started_after_one_ended_during_a_snapshot_waits_for_it(guest_vm, tmp_path):
    """A run ends while a snapshot holds it (kick_all(); a deadline passing while held does the
    same) and another run starts at once: its vCPU thread's first vCPU ioctl (notify_paused:
    KVM_KVMCLOCK_CTRL, the hold still in force) must not meet the snapshot's complete_io
    (a KVM_RUN on the snapshot's thread) — the CI failure of 1860339 again, by this road:
    holding() of a running machine does not keep a new run from starting. Gate: the
    snapshot has claimed vCPU 0 for its complete_io."""
    m, _addr = counting(guest_vm)
    v = m.vcpus[0]
    at_complete, go_complete = gate_call(v, "complete_io")
    claimed, go_run = gate_claims(v, "snapshot")
    told = threading.Event()
    real_notify = v.notify_paused

    def notify():
        if threading.current_thread().name == "runner2":
            told.set()
        return real_notify()
    v.notify_paused = notify
    run1, snap = run_then_snapshot(m, tmp_path, "runner1")
    assert at_complete.wait(PATIENCE), "the snapshot did not hold the machine"
    m.kick_all()
    assert run1.join() and run1.error is None and run1.result.exit == "kick", \
        (run1.result, run1.error)
    go_complete.set()
    assert claimed.wait(PATIENCE)                    # the snapshot is in complete_io's run
    run2 = Bg(m.run, 120, name="runner2")
    if told.wait(5.0):           # the fault: run2's vCPU thread reaches its hold's ioctl now
        run2.join()
    ended = None if run2.thread.is_alive() else (run2.result, run2.error)
    go_run.set()
    done = snap.join()
    if not done:                 # see the test above: free the snapshot's thread
        v.kick()
        snap.join()
    try:
        assert ended is None, f"the second run ended during the snapshot: {ended!r}"
        assert done and snap.error is None, (done, snap.error)
    finally:
        res = finish_run(m, run2)
    assert res.exit == "stopped", res


def test_a_pause_holds_a_step_of_another_thread(guest_vm):
    """pause() while another thread steps the machine (Machine.step/sync between runs, as a
    test drives a guest): pause() returns True once the step is out of KVM_RUN, the guest
    does not advance while paused reads True, and the step is not ended by the pause: after
    resume() it steps on (the guest advances) until something ends it (kick_all here)."""
    m, addr = counting(guest_vm)
    v = m.vcpus[0]
    entries = []
    record_entries(m, entries)
    s = Bg(functools.partial(m.step, 0, timeout=600), name="stepper")
    wait_until(lambda: v.running, "the step to enter KVM_RUN")
    assert m.pause(timeout=PATIENCE)
    held = m.memory.read_u64(addr)
    entries.clear()
    s.join(0.5)                                       # a step the pause did not hold runs on
    try:
        assert m.paused and s.thread.is_alive(), (s.result, s.error)
        advanced = m.memory.read_u64(addr) != held
        in_run = [e for e in entries if e[0] == "stepper"]
        assert not in_run and not advanced, \
            f"paused, yet the stepping thread entered KVM_RUN {len(in_run)} time(s) " \
            f"(guest advanced: {advanced}; its step: {s.result or s.error!r})"
    finally:
        m.resume()
    wait_until(lambda: m.memory.read_u64(addr) != held, "the step to run the guest on")
    m.kick_all()
    assert s.join() and s.error is None and s.result.kind == "kick", (s.result, s.error)


def test_holds_leave_no_kick_for_later_steps(guest_vm, tmp_path):
    """A checkpoint taken from another thread while vCPU 0 is stepped, a pause of the idle
    machine: neither leaves a kick behind that makes a later step of any vCPU return "kick"
    without running the guest (a sync() would then fail with "got kick"); a step waiting
    through an idle pause runs the guest once resumed."""
    m = guest_vm(GUEST, vcpus=2)
    addr = m.sync(0, stage=1)[0]
    m.sync(1, stage=1)
    s = Bg(functools.partial(m.step, 0, timeout=600), name="stepper")
    wait_until(lambda: m.vcpus[0].running, "the step to enter KVM_RUN")
    m.checkpoint()                                    # holds the step, then lets it go on
    at = m.memory.read_u64(addr)
    wait_until(lambda: m.memory.read_u64(addr) != at, "the step to run the guest on")
    assert m.step(1, timeout=0.5).kind == "timeout"   # no kick left for idle vCPU 1
    m.kick_all()
    assert s.join() and s.result.kind == "kick", (s.result, s.error)
    m.reset()                                         # withdraws kick_all's pending kicks
    assert m.step(1, timeout=0.5).kind == "timeout"
    assert m.pause(timeout=PATIENCE)                  # idle: nothing to kick
    s = Bg(functools.partial(m.step, 0, timeout=600), name="stepper2")
    s.join(0.3)
    assert s.thread.is_alive(), (s.result, s.error)   # waits while paused
    at = m.memory.read_u64(addr)
    m.resume()
    wait_until(lambda: m.memory.read_u64(addr) != at, "the waiting step to run the guest")
    m.kick_all()
    assert s.join() and s.result.kind == "kick", (s.result, s.error)


def test_a_checkpoint_from_the_stepping_threads_own_callback(guest_vm):
    """A console callback (or exit handler) of a step that checkpoints the machine: the
    stepped vCPU is out of KVM_RUN on that very thread, so the block proceeds at once instead
    of waiting 10 s for a hold that vCPU can never reach, and the step goes on to its sync."""
    src = "print_then_sync.c"
    m = guest_vm(src)
    took = []

    def on_console(data):
        if not took:
            took.append(m.checkpoint())
    m.on_console = on_console
    assert m.sync(stage=1, timeout=PATIENCE) == (7,)
    assert took and took[0] > 0
    m.done(timeout=PATIENCE)


def test_a_stop_as_a_run_ends_is_kept_for_the_next_run(guest_vm):
    """stop() landing while a run ends by its deadline (between its vCPUs' end and the
    run's settling): the run takes the stop as a whole, ending as "timeout" or "stopped",
    and the next run is neither stopped by stale kicks nor by a reason the first run
    consumed. Gate: the run's _settle waits for the stop."""
    m, addr = counting(guest_vm)
    real_settle = m._settle
    settling, go = gate_call(m, "_settle")
    run = Bg(m.run, 0.3, name="runner")
    assert settling.wait(PATIENCE)
    stopper = Bg(m.stop, "stopped as the run ended", name="stopper")
    stopper.join(0.3)                                 # a stop that can land now does
    go.set()
    assert run.join() and stopper.join() and run.error is None, run.error
    assert run.result.exit in ("timeout", "stopped"), run.result
    m._settle = real_settle
    second = m.run(timeout=0.5)
    if run.result.exit == "stopped":                  # the first run took the stop
        assert second.exit == "timeout", (second.exit, second.detail)
    else:                                             # the stop came after: for this run
        assert second.exit == "stopped", (second.exit, second.detail)
    third = m.run(timeout=0.5)
    assert third.exit == "timeout", (third.exit, third.detail)


def test_a_snapshot_during_a_step_of_another_thread(guest_vm, tmp_path):
    """A snapshot (or checkpoint, reset, control dump) while another thread steps the machine:
    holding() counts only Machine.run as running, so it takes the stepped machine for idle
    and reads its vCPU while the step has it in KVM_RUN. It must either hold the step or
    fail as a SnapshotError; the step must not be disturbed."""
    m, addr = counting(guest_vm)
    v = m.vcpus[0]
    s = Bg(m.step, 0, name="stepper")
    wait_until(lambda: v.running, "the step to enter KVM_RUN")
    snap = Bg(m.snapshot, str(tmp_path / "s.snap"), name="snapshot")
    assert snap.join()
    m.kick_all()
    assert s.join()
    assert s.error is None and s.result.kind in ("kick", "timeout"), (s.result, s.error)
    assert snap.error is None or type(snap.error).__name__ == "SnapshotError", repr(snap.error)


def test_a_step_started_during_a_snapshot_of_the_idle_machine_waits_for_it(guest_vm, tmp_path):
    """A thread steps the machine (Machine.step) while a snapshot of the idle machine has vCPU
    0 in its complete_io (a KVM_RUN on the snapshot's thread): 1860339 made a run() started
    then wait for the block, but step() does not, and raises Busy in the stepping thread (a
    test's own m.sync() failing because a control client took a snapshot). Gate: the
    snapshot has claimed vCPU 0."""
    m, _addr = counting(guest_vm)
    v = m.vcpus[0]
    claimed, go = gate_claims(v, "snapshot")
    snap = Bg(m.snapshot, str(tmp_path / "s.snap"), name="snapshot")
    assert claimed.wait(PATIENCE)
    step = Bg(functools.partial(m.step, 0, timeout=2.0), name="stepper")
    step.join(5.0)
    early = None if step.thread.is_alive() else (step.result, step.error)
    go.set()
    assert snap.join() and step.join()
    assert snap.error is None, repr(snap.error)
    assert early is None or early[1] is None, f"the step failed during the snapshot: {early!r}"
    assert step.error is None, repr(step.error)


class _InterruptingVcpus(list):
    """Machine.vcpus with SIGINT raised (once) when run() counts them: what a Ctrl-C landing
    just after run() has claimed the machine does (its handler runs at that point)."""
    fired = False

    def __len__(self):
        if not self.fired and threading.current_thread() is threading.main_thread():
            self.fired = True
            signal.raise_signal(signal.SIGINT)
        return super().__len__()


def test_a_keyboard_interrupt_as_run_starts_leaves_the_machine_runnable(guest_vm):
    """Ctrl-C (KeyboardInterrupt in run()'s thread) landing just as run() has claimed the
    machine: the exception propagates, and the machine is not left "running" for ever
    (every later run() Busy, holding() waiting on a run that does not exist)."""
    m, _addr = counting(guest_vm)
    m.vcpus = _InterruptingVcpus(m.vcpus)
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            m.run(timeout=1)
    finally:
        signal.signal(signal.SIGINT, old)
    assert m.vcpus.fired
    assert not m.running, "run() left the machine claimed"
    assert m.run(timeout=0.5).exit == "timeout"


class _InterruptingList(list):
    """Machine._exclusive with SIGINT raised (once) right after holding() registers in it."""
    fired = False

    def append(self, item):
        super().append(item)
        if not self.fired:
            self.fired = True
            signal.raise_signal(signal.SIGINT)


def test_a_keyboard_interrupt_as_holding_starts_does_not_block_later_runs(guest_vm):
    """Ctrl-C landing just as holding() of the idle machine (a snapshot, checkpoint or reset
    from the main thread) has registered itself: the exception propagates, and a run another
    thread starts afterwards is not left waiting for the end of a block that never began."""
    m, _addr = counting(guest_vm)
    m._exclusive = _InterruptingList(m._exclusive)
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            with m.holding("interrupted"):
                pass
    finally:
        signal.signal(signal.SIGINT, old)
    assert m._exclusive.fired
    run = Bg(m.run, 0.5, name="runner")
    stuck = not run.join()          # a hang guard (PATIENCE): the run lasts 0.5 s
    if stuck:
        del m._exclusive[:]      # free the waiting run (test cleanup only)
        run.join()
    assert not stuck, "a run started after the interrupted holding() waits for ever"
    assert run.error is None and run.result.exit == "timeout", (run.result, run.error)


def test_a_snapshot_as_a_run_ends_by_its_deadline_does_not_run_the_guest(guest_vm, tmp_path):
    """No stop, no kick: a run ends by its deadline, and a snapshot begins while that run is
    still settling (holding() sees it running; its hold is granted at once, no vCPU being
    left in the run). The run's _settle (RunLoop.clear_kick) then clears the
    kvm_run.immediate_exit that the snapshot's complete_io has just set, and the
    snapshot's KVM_RUN runs the guest (never exiting: until kicked). Gates: the run's
    _settle waits for the snapshot to reach complete_io's KVM_RUN."""
    m, addr = counting(guest_vm)
    v = m.vcpus[0]
    settling, go_settle = gate_call(m, "_settle")
    at_gate, gate = gate_call(v, "run", thread="snapshot")
    run = Bg(m.run, 0.5, name="runner")
    assert settling.wait(PATIENCE)
    snap = Bg(m.snapshot, str(tmp_path / "s.snap"), name="snapshot")
    at_gate.wait(5.0)            # the fault's order: complete_io begins during the _settle
    go_settle.set()
    assert run.join() and run.error is None and run.result.exit == "timeout", \
        (run.result, run.error)
    assert_snapshot_left_the_guest_alone(m, v, addr, snap, gate)


def test_a_reset_after_a_stop_of_the_idle_machine_lets_the_next_run_run(guest_vm):
    """stop() between runs, then reset(): reset() drops the stop ("a stop() that found no run:
    not for the next"), but not the kicks stop() left pending in the run loops, so the next
    run ends at once as "kick" ("run stopped before the guest finished") instead of running
    the guest (here until it is seen counting on, then stopped: a 1 s deadline that a loaded
    host let pass before the vCPU thread's first increment failed the count)."""
    m, addr = counting(guest_vm)
    m.checkpoint()
    m.stop("before the reset")
    m.reset()
    before = m.memory.read_u64(addr)
    run = Bg(m.run, 120, name="runner")
    wait_until(lambda: m.memory.read_u64(addr) != before or not run.thread.is_alive(),
               "the guest's counter to advance")
    assert run.thread.is_alive(), (run.result, run.error)
    r = finish_run(m, run)
    assert r.exit == "stopped", (r.exit, r.detail)


def test_a_stop_as_the_run_starts_is_not_lost_after_a_pause(guest_vm):
    """stop() (the control socket's, from another thread) landing as run() begins, while the
    run reads _stop_reason to set _stop: the stop must end the run, as "stopped", also after
    an earlier pause of the idle machine (pause, resume, then run), whose kick the run would
    otherwise take the stop's kick for. The instrumentation: _stop_reason made a property of
    this one machine whose first read on the run's thread lets a stopping thread go and gives
    it a moment to act before the read returns."""
    m, _addr = counting(guest_vm)
    assert m.pause(timeout=PATIENCE)
    m.resume()
    state = {"reason": m._stop_reason, "armed": True}
    go = threading.Event()
    stopper = threading.Thread(target=lambda: (go.wait(PATIENCE),
                                               m.stop("stopped as the run started")),
                               name="stopper", daemon=True)
    stopper.start()

    def get(self):
        value = state["reason"]
        if state["armed"] and threading.current_thread().name == "runner":
            state["armed"] = False
            go.set()
            stopper.join(0.3)       # a stop that can land between this read and its use does
        return value

    def put(self, value):
        state["reason"] = value
    m.__class__ = type("StopAtRunStart", (type(m),), {"_stop_reason": property(get, put)})
    run = Bg(m.run, 3.0, name="runner")
    assert run.join() and run.error is None, run.error
    assert not state["armed"]
    stopper.join(PATIENCE)
    assert run.result.exit == "stopped", (run.result.exit, run.result.detail)


def test_two_holding_blocks_at_once_do_not_meet_on_a_vcpu(guest_vm, tmp_path):
    """Two holders at once on a running machine: a snapshot (its complete_io: a KVM_RUN on
    the snapshot's thread) and a register read (the control socket's dump) in another
    thread. Each holding() is granted (the vCPU threads are held), and both blocks then use
    vCPU 0 at the same time: the reader's KVM_GET_REGS raises Busy (the dump would answer
    "could not hold every vCPU"), or the snapshot's does. Gate: the snapshot has claimed
    vCPU 0 for its complete_io."""
    m, _addr = counting(guest_vm)
    v = m.vcpus[0]
    claimed, go = gate_claims(v, "snapshot")
    run, snap = run_then_snapshot(m, tmp_path, "runner")
    assert claimed.wait(PATIENCE)

    def read():
        with m.holding("reading the registers", PATIENCE):
            return v.get_regs().rip
    reader = Bg(read, name="reader")
    reader.join(5.0)             # the fault: it reads vCPU 0 during the snapshot's KVM_RUN
    early = None if reader.thread.is_alive() else (reader.result, reader.error)
    go.set()
    assert snap.join() and reader.join()
    try:
        assert early is None or early[1] is None, f"the reader met the snapshot: {early!r}"
        assert reader.error is None and snap.error is None, (reader.error, snap.error)
    finally:
        res = finish_run(m, run)
    assert res.exit == "stopped", res


def test_a_keyboard_interrupt_while_holding_waits_leaks_no_hold(guest_vm):
    """Ctrl-C in the main thread while its snapshot/checkpoint/reset of a running machine
    waits for the vCPUs to be held (holding() inside hold()'s wait, up to 10 s): the
    KeyboardInterrupt propagates, and the block's private hold must be withdrawn — else the
    guest stays held for ever (resume() releases only "pause"). The vCPU is kept from being
    held by a gate before its next step; a helper thread sends SIGINT to the main thread once
    the hold is in force."""
    m, addr = counting(guest_vm)
    v = m.vcpus[0]
    in_step, gate = gate_steps(m, "runner")
    run = Bg(m.run, 120, name="runner")
    assert in_step.wait(PATIENCE)
    main = threading.get_ident()

    def interrupt():
        wait_until(lambda: len(m.holders) == 1, "the block's hold")
        signal.pthread_kill(main, signal.SIGINT)
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        sender = Bg(interrupt, name="interrupter")
        with pytest.raises(KeyboardInterrupt):
            with m.holding("snapshot", PATIENCE):
                pass
        assert sender.join() and sender.error is None, sender.error
    finally:
        signal.signal(signal.SIGINT, old)
    leaked = m.holders
    if leaked:
        for owner in leaked:             # let the test end cleanly
            m.release(owner)
    gate.set()
    try:
        assert not leaked, f"the interrupted holding() left its hold: {leaked}"
        wait_until(lambda: v.running, "vCPU 0 to run again")
        held = m.memory.read_u64(addr)
        wait_until(lambda: m.memory.read_u64(addr) != held, "the guest's counter to advance")
    finally:
        res = finish_run(m, run)
    assert res.exit == "stopped", res
