"""Options of a Machine that the caller gets wrong are refused before anything is created, each
as one ValueError naming the option; the empty defaults are accepted on every machine."""
import pytest

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
    ({"machine": ["pc"]}, "machine must be a name"),
    ({"machine": "x" * 10000}, r"no machine 'x{40}'\.\.\. on this"),
    ({"machine": "pc", "cpu_type": "max"}, "the pc machine has no option 'cpu_type'"),
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
