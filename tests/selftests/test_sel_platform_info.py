"""Port of tools/testing/selftests/kvm/x86_64/platform_info_test.c: with
KVM_CAP_MSR_PLATFORM_INFO, the host sets the max turbo ratio bits of MSR_PLATFORM_INFO; with the
capability enabled the guest reads them, with it disabled the guest's RDMSR raises #GP; the host
restores the MSR at the end (and KVM_SET_MSRS must take it). Every exit is the guest's report (port I/O)."""
import pytest
from _selftest import host_fails

from pykvm.errors import KvmError

pytestmark = [pytest.mark.requires_kvm, pytest.mark.requires_arch("x86_64")]
MSR_PLATFORM_INFO = 0xCE
MAX_TURBO_RATIO = 0xFF00


@pytest.mark.requires_cap("MSR_PLATFORM_INFO")
@host_fails("the host (6.18) refuses to restore MSR_PLATFORM_INFO after KVM_RUN (an immutable "
            "feature MSR there); the C original stops earlier, at an emulation failure in its own "
            "#GP handler (SSE code), see docs/selftests.md")
def test_platform_info(guest_vm):
    m = guest_vm("sel_platform_info.c")
    vcpu = m.vcpus[0]
    orig = vcpu.get_msr(MSR_PLATFORM_INFO)
    vcpu.set_msr(MSR_PLATFORM_INFO, orig | MAX_TURBO_RATIO)
    for stage in (1, 2):
        (enable,) = m.sync(stage=stage)
        m.vm.enable_cap("MSR_PLATFORM_INFO", enable)
    m.done()
    try:
        vcpu.set_msr(MSR_PLATFORM_INFO, orig)
    except KvmError as e:                       # vcpu_set_msr() asserts that it is taken
        raise AssertionError(f"restoring MSR_PLATFORM_INFO: {e}") from None
