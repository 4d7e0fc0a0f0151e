"""Options of a Machine that the caller gets wrong are refused before anything is created, each
as one ValueError naming the option; the empty defaults are accepted on every machine."""
import pytest

from pykvm.errors import InvalidArgument
from pykvm.machine import Machine
from pykvm.testing.reference_loop import ReferenceLoop


@pytest.mark.requires_kvm
@pytest.mark.parametrize("options, message", [
    ({"loop": int}, "loop must be a run-loop class"),
    ({"loop": "c"}, "loop must be a run-loop class"),
    ({"devices": "edu"}, "devices must be a sequence of device names"),
    ({"devices": [1]}, "devices must be a sequence of device names"),
    ({"vcpus": 2.0}, "vcpus must be an integer"),
    ({"vcpus": True}, "vcpus must be an integer"),
    ({"vcpus": 0}, "at least one vCPU"),
    ({"mem_size": "64M"}, "mem_size must be a positive number of bytes"),
    ({"mem_size": 0}, "mem_size must be a positive number of bytes"),
    ({"mem_size": 64.0 * 2**20}, "mem_size must be a positive number of bytes"),
    ({"machine": ["pc"]}, "machine must be a name"),
    ({"machine": "x" * 10000}, r"no machine 'x{40}'\.\.\. on this"),
    ({"machine": "pc", "cpu_type": "max"}, "the pc machine has no option 'cpu_type'"),
    ({"console_limit": -1}, r"console_limit must be an int >= 0, not -1"),
    ({"console_limit": 1.5}, r"console_limit must be an int >= 0"),
    ({"report_limit": -3}, r"report_limit must be an int >= 0, not -3"),
    ({"report_limit": "9"}, r"report_limit must be an int >= 0"),
    ({"vm_setup": 5}, r"vm_setup must be callable or None, not 5"),
    ({"on_console": "print"}, r"on_console must be callable or None"),
    ({"kvm": "x"}, r"kvm must be a pykvm.kvm.Kvm"),
])
def test_wrong_options_are_one_value_error(options, message):
    with pytest.raises(ValueError, match=message) as e:
        Machine("hello", **options)
    assert "\n" not in str(e.value) and len(str(e.value)) < 300


@pytest.mark.requires_kvm
@pytest.mark.parametrize("options", [{"devices": ()}, {"devices": None}, {"loop": ReferenceLoop},
                                     {"machine": "auto"}])
def test_empty_defaults_are_accepted(options):
    with Machine("hello", **options) as m:
        assert m.run(timeout=10).exit == "done"
        assert m.platform.name == "bare"


@pytest.mark.requires_kvm
def test_a_bad_console_limit_set_later_is_refused_and_kept():
    with Machine("hello", console_limit=100) as m:
        with pytest.raises(InvalidArgument, match="console_limit must be an int >= 0"):
            m.console_limit = -1
        assert m.console_limit == 100
        m.console_limit = 0
        assert m.run(timeout=10).exit == "done" and m.console == b""


@pytest.mark.requires_kvm
def test_an_empty_guest_name_is_refused():
    with pytest.raises(InvalidArgument, match="guest must name a built-in guest"):
        Machine("")


BAD_SECONDS = [float("nan"), float("inf"), -1, 10**30, "1", True, b"1"]


@pytest.mark.requires_kvm
def test_bad_timeouts_are_argument_errors_and_the_machine_runs_on():
    """A duration that is not None or a finite number of seconds >= 0 is refused by the call
    (InvalidArgument, one line naming the call) before anything runs: NaN once ran the guest
    and then reported a failing exit handler. The machine is unharmed and runs afterwards."""
    with Machine("hello") as m:
        for bad in BAD_SECONDS:
            for call, args in ((m.run, ()), (m.step, ()), (m.pause, ()), (m.hold, ("x",))):
                with pytest.raises(InvalidArgument, match=r"timeout must be a ") as e:
                    call(*args, timeout=bad)
                assert "\n" not in str(e.value) and len(str(e.value)) < 200
            with pytest.raises(InvalidArgument, match="Machine.holding: timeout"):
                with m.holding("test", bad):
                    pass
        for bad in (-1, 1.5, "2", True):
            with pytest.raises(InvalidArgument, match="budget must be an int"):
                m.step(budget=bad)
        assert not m.paused and not m.held_for("x")
        r = m.run(timeout=60)
        assert r.exit == "done", r
