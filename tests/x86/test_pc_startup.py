"""The pc machine's start-up: lost PIT ticks follow QEMU's kvm-pit ``lost_tick_policy``
("discard", the default here, issues KVM_REINJECT_CONTROL; "delay" leaves the PIT re-injecting
and pays the kernel's SRCU grace period at teardown instead), and the PIT delivers its ticks
under both. KVM's PIT is created at the guest's first access to its ports, which the guest
sees as a PIT that was always there, whatever the form of that access."""
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


SENTINEL = 0x5A5A5A5A5A5A5A5A
FORMS = {0: ("inb $0x61", 1), 1: ("inb %dx", 1), 2: ("inw $0x61", 2), 3: ("inw %dx", 2),
         4: ("outb $0x43", 0), 5: ("outb %dx", 0)}


@pytest.mark.parametrize("form", sorted(FORMS), ids=[FORMS[f][0] for f in sorted(FORMS)])
def test_first_pit_access_reaches_kvms_pit_in_every_form(guest_vm, form):
    m = guest_vm("pit_first.c", machine="pc")
    assert m.platform.pit_created is False           # nothing made before the guest asks
    m.set_params(form)
    rax, status, count = m.sync(stage=1)
    assert m.platform.pit_created is True
    width = FORMS[form][1]
    if width:
        bits = 8 * width
        assert rax >> bits == SENTINEL >> bits       # only AL / AX replaced, as by one IN
        port61 = rax & ((1 << bits) - 1)
        assert port61 & ~0x30 == 0, hex(port61)      # gate 2 and speaker data off after reset
    # the control word took effect: lo/hi byte access, mode 0, binary (i8254 read-back status)
    assert status & 0x3F == 0x30, hex(status)
    assert 0 < count <= 0x1234
    m.done()


def test_a_guest_that_never_touches_the_pit_never_gets_one():
    with Machine("hello", machine="pc") as m:
        res = m.run(timeout=20)
        assert res.exit_code == 0 and "Hello" in res.console_text, (res.exit, res.detail)
        assert m.platform.pit_created is False
