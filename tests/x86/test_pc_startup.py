"""The pc machine's start-up: lost PIT ticks follow QEMU's kvm-pit ``lost_tick_policy``
("discard", the default here, issues KVM_REINJECT_CONTROL; "delay" leaves the PIT re-injecting
and pays the kernel's SRCU grace period at teardown instead), and the PIT delivers its ticks
under both."""
import pytest

from pykvm.machine import Machine

pytestmark = [pytest.mark.requires_kvm, pytest.mark.requires_arch("x86_64")]


@pytest.mark.parametrize("policy", [None, "delay", "discard"])
def test_pit_ticks_reach_the_guest_under_each_lost_tick_policy(guest_vm, policy):
    kw = {} if policy is None else {"lost_tick_policy": policy}
    m = guest_vm("timer.c", machine="pc", **kw)
    assert m.platform.lost_tick_policy == (policy or "discard")
    m.set_params(10)
    ticks, tsc_delta = m.sync(stage=1)
    assert ticks == 10 and tsc_delta > 0
    m.done()


@pytest.mark.parametrize("bad", ["slew", "", 0, None])
def test_unknown_lost_tick_policy_is_refused_in_one_line(bad):
    with pytest.raises(ValueError, match="lost_tick_policy") as ei:
        Machine("hello", machine="pc", lost_tick_policy=bad)
    assert "\n" not in str(ei.value)


def test_bare_machine_has_no_lost_tick_policy():
    with pytest.raises(ValueError, match="no option 'lost_tick_policy'"):
        Machine("hello", machine="bare", lost_tick_policy="delay")
