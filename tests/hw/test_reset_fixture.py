"""The ``fresh_vm`` fixture (pykvm.testing): one machine per test module, returned to its
checkpoint by Machine.reset() before each test. The tests below run in file order and leave
the machine dirty for the next one."""
import pytest

GUEST = "reset_dirty.c"
SEEN: list = []                 # (id of the machine, what the test found)


def at_baseline(m):
    m.set_params(5)
    m.sync(stage=0)


@pytest.fixture
def counter_vm(fresh_vm):
    return fresh_vm(GUEST, setup=at_baseline)


def _first_round(m):
    values = m.sync(stage=1)
    m.done()
    return values


def test_first_test_runs_the_guest_and_dirties_the_machine(counter_vm):
    m = counter_vm
    assert m.console == b"" and m.reports == []
    first = _first_round(m)
    assert first[:2] == (1001, 1)
    SEEN.append((id(m), first))
    m.memory.write(0x200000, b"left behind")
    m.on("HLT", lambda *a: None)
    m.trace = print


def test_next_test_gets_the_same_machine_fresh(counter_vm):
    m = counter_vm
    assert SEEN and id(m) == SEEN[0][0]              # made once for the module
    assert m.console == b"" and m.reports == []
    assert m.handlers == {} and m.trace is None
    assert m.memory.read(0x200000, 11) == bytes(11)
    assert _first_round(m) == SEEN[0][1]              # the guest counts from the checkpoint
    m.close()                                        # a test may even close it


def test_a_closed_machine_is_made_again(counter_vm, fresh_vm):
    m = counter_vm
    assert not m.closed
    assert _first_round(m) == SEEN[0][1]
    other = fresh_vm(GUEST)                          # other arguments: another machine
    assert other is not m
    assert other.sync(stage=0)[0] == 1000


SPIN = "gdb_target"             # pykvm_params[0] = 1: it spins until gdb_hold is cleared
SETUPS: list = []


def spinning(m):
    m.set_params(1)


def flaky(m):
    """A setup that changes the machine, then fails the first time it runs."""
    SETUPS.append(1)
    m.write_global("gdb_value", 99)
    if len(SETUPS) == 1:
        raise RuntimeError("setup failed once")
    m.write_global("gdb_value", 7)


def test_a_test_may_leave_a_run_going(fresh_vm):
    import threading
    m = fresh_vm(SPIN, setup=spinning)
    t = threading.Thread(target=lambda: m.run(timeout=120), daemon=True)
    t.start()
    for _ in range(2000):
        if m.running:
            break
        t.join(0.005)
    assert m.running
    SEEN.append(("spin", id(m), t))


def test_the_next_test_gets_it_stopped_and_reset(fresh_vm):
    m = fresh_vm(SPIN, setup=spinning)
    (_, made, t), = [s for s in SEEN if s[0] == "spin"]
    assert id(m) == made and not m.running
    t.join(10)
    assert not t.is_alive()
    m.set_params(0)                          # no spinning this time
    r = m.run(timeout=60)                    # a stop() meant for the old run does not end it
    assert (r.exit, r.exit_code) == ("done", 0), r.detail


def test_a_setup_that_fails_fails_its_test(fresh_vm):
    with pytest.raises(RuntimeError, match="setup failed once"):
        fresh_vm(SPIN, setup=flaky)


def test_the_next_test_gets_the_setup_run_again(fresh_vm):
    m = fresh_vm(SPIN, setup=flaky)
    assert len(SETUPS) == 2 and m.read_global("gdb_value") == 7
