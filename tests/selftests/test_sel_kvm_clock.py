"""Port of tools/testing/selftests/kvm/x86_64/kvm_clock_test.c: for four KVM_SET_CLOCK settings
(base 0, base 180 s, realtime 180 s behind and ahead of the host's CLOCK_REALTIME), the
kvm-clock the guest reads from its pvclock page lies between KVM_GET_CLOCK before and after the
run, and both KVM_GET_CLOCK results carry KVM_CLOCK_REALTIME | KVM_CLOCK_HOST_TSC. Needs
KVM_CAP_ADJUST_CLOCK with KVM_CLOCK_REALTIME and a TSC-based host clocksource, as the C test.

pykvm's ioctl table has no KVM_SET_CLOCK / KVM_GET_CLOCK rows (so ``vm.ioctl`` cannot issue
them) and its ffi no ``struct kvm_clock_data``: the test packs the struct itself and calls
``fcntl.ioctl`` on ``vm.fd`` with the uAPI numbers."""
import fcntl
import struct
import time

import pytest

pytestmark = [pytest.mark.requires_kvm, pytest.mark.requires_arch("x86_64")]
NSEC_PER_SEC = 1_000_000_000
KVM_CLOCK_REALTIME, KVM_CLOCK_HOST_TSC = 1 << 2, 1 << 3
EXPECTED_FLAGS = KVM_CLOCK_REALTIME | KVM_CLOCK_HOST_TSC
CASES = [(0, 0), (180 * NSEC_PER_SEC, 0), (0, -180 * NSEC_PER_SEC), (0, 180 * NSEC_PER_SEC)]
CLOCKSOURCE = "/sys/devices/system/clocksource/clocksource0/current_clocksource"


def _clocksource_is_tsc() -> bool:
    """sys_clocksource_is_based_on_tsc(): "tsc" or "hyperv_clocksource_tsc_page"."""
    try:
        with open(CLOCKSOURCE) as f:
            return f.read().strip() in ("tsc", "hyperv_clocksource_tsc_page")
    except OSError:
        return False


# struct kvm_clock_data: __u64 clock; __u32 flags, pad0; __u64 realtime, host_tsc; __u32 pad[4]
CLOCK_DATA = struct.Struct("<QIIQQ16x")
KVM_SET_CLOCK = 1 << 30 | CLOCK_DATA.size << 16 | 0xAE << 8 | 0x7B      # _IOW(KVMIO, 0x7b, ...)
KVM_GET_CLOCK = 2 << 30 | CLOCK_DATA.size << 16 | 0xAE << 8 | 0x7C      # _IOR(KVMIO, 0x7c, ...)


def _set_clock(vm, clock, flags=0, realtime=0):
    fcntl.ioctl(vm.fd, KVM_SET_CLOCK, CLOCK_DATA.pack(clock, flags, 0, realtime, 0))


def _get_clock(vm):
    buf = bytearray(CLOCK_DATA.size)
    fcntl.ioctl(vm.fd, KVM_GET_CLOCK, buf)
    clock, flags, _, _, _ = CLOCK_DATA.unpack(buf)
    assert flags & EXPECTED_FLAGS == EXPECTED_FLAGS, \
        f"unexpected clock data flags: {flags:#x} (want set: {EXPECTED_FLAGS:#x})"
    return clock


def test_kvm_clock(kvm, guest_vm):
    if not kvm.check_extension("ADJUST_CLOCK") & KVM_CLOCK_REALTIME:
        pytest.skip("pykvm: host lacks KVM_CLOCK_REALTIME in KVM_CAP_ADJUST_CLOCK")
    if not _clocksource_is_tsc():
        pytest.skip("pykvm: host lacks a TSC-based clocksource")
    m = guest_vm("sel_kvm_clock.c")
    for i, (base, realtime_offset) in enumerate(CASES):
        if realtime_offset:
            _set_clock(m.vm, base, KVM_CLOCK_REALTIME,
                       time.clock_gettime_ns(time.CLOCK_REALTIME) + realtime_offset)
        else:
            _set_clock(m.vm, base)
        lo = _get_clock(m.vm)
        (obs,) = m.sync(stage=i)
        hi = _get_clock(m.vm)
        assert lo <= obs <= hi, f"unexpected kvm-clock value: {obs} expected range: [{lo}, {hi}]"
    m.done()
