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
