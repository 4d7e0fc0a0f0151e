"""Port of tools/testing/selftests/kvm/x86_64/kvm_clock_test.c: for four KVM_SET_CLOCK settings
(base 0, base 180 s, realtime 180 s behind and ahead of the host's CLOCK_REALTIME), the
kvm-clock the guest reads from its pvclock page lies between KVM_GET_CLOCK before and after the
run, and both KVM_GET_CLOCK results carry KVM_CLOCK_REALTIME | KVM_CLOCK_HOST_TSC. Needs
KVM_CAP_ADJUST_CLOCK with KVM_CLOCK_REALTIME and a TSC-based host clocksource, as the C test.
KVM_SET_CLOCK and KVM_GET_CLOCK are ``vm.set_clock`` and ``vm.get_clock``."""
import time

import pytest

from pykvm import abi

pytestmark = [pytest.mark.requires_kvm, pytest.mark.requires_arch("x86_64")]
NSEC_PER_SEC = 1_000_000_000
EXPECTED_FLAGS = abi.CLOCK_REALTIME | abi.CLOCK_HOST_TSC
CASES = [(0, 0), (180 * NSEC_PER_SEC, 0), (0, -180 * NSEC_PER_SEC), (0, 180 * NSEC_PER_SEC)]
CLOCKSOURCE = "/sys/devices/system/clocksource/clocksource0/current_clocksource"


def _clocksource_is_tsc() -> bool:
    """sys_clocksource_is_based_on_tsc(): "tsc" or "hyperv_clocksource_tsc_page"."""
    try:
        with open(CLOCKSOURCE) as f:
            return f.read().strip() in ("tsc", "hyperv_clocksource_tsc_page")
    except OSError:
        return False


def _get_clock(vm):
    d = vm.get_clock()
    assert d.flags & EXPECTED_FLAGS == EXPECTED_FLAGS, \
        f"unexpected clock data flags: {d.flags:#x} (want set: {EXPECTED_FLAGS:#x})"
    return d.clock


def test_kvm_clock(kvm, guest_vm):
    if not kvm.check_extension("ADJUST_CLOCK") & abi.CLOCK_REALTIME:
        pytest.skip("pykvm: host lacks KVM_CLOCK_REALTIME in KVM_CAP_ADJUST_CLOCK")
    if not _clocksource_is_tsc():
        pytest.skip("pykvm: host lacks a TSC-based clocksource")
    m = guest_vm("sel_kvm_clock.c")
    for i, (base, realtime_offset) in enumerate(CASES):
        if realtime_offset:
            m.vm.set_clock(base, realtime=time.clock_gettime_ns(time.CLOCK_REALTIME)
                           + realtime_offset)
        else:
            m.vm.set_clock(base)
        lo = _get_clock(m.vm)
        (obs,) = m.sync(stage=i)
        hi = _get_clock(m.vm)
        assert lo <= obs <= hi, f"unexpected kvm-clock value: {obs} expected range: [{lo}, {hi}]"
    m.done()
