"""Port of tools/testing/selftests/kvm/x86_64/tsc_msrs_test.c: IA32_TSC and IA32_TSC_ADJUST, as
the guest and the host see them (rounded to 2^30 ticks), start at 0; a guest write to either
moves both; a host write to IA32_TSC moves only the TSC (the offset), a host write to
IA32_TSC_ADJUST moves only TSC_ADJUST; five guest stages, each checked from both sides."""
import pytest
from _selftest import host_fails

pytestmark = [pytest.mark.requires_kvm, pytest.mark.requires_arch("x86_64")]
MSR_IA32_TSC, MSR_IA32_TSC_ADJUST = 0x10, 0x3B
UNITY = 1 << 30
HOST_ADJUST = UNITY * 64
GUEST_STEP = UNITY * 4
MASK = (1 << 64) - 1


def _rounded(vcpu, msr):
    return (vcpu.get_msr(msr) + UNITY // 2) & -UNITY & MASK


def _check(vcpu, tsc, adjust):
    got = _rounded(vcpu, MSR_IA32_TSC)
    assert got == tsc & MASK, f"{got:#x} != {tsc & MASK:#x} (rounded_host_rdmsr(MSR_IA32_TSC))"
    got = _rounded(vcpu, MSR_IA32_TSC_ADJUST)
    assert got == adjust & MASK, \
        f"{got:#x} != {adjust & MASK:#x} (rounded_host_rdmsr(MSR_IA32_TSC_ADJUST))"


@host_fails("rounded_host_rdmsr(MSR_IA32_TSC) != 0 before the first run: a new vCPU's TSC "
            "is the host's, not 0")
def test_tsc_msrs(guest_vm):
    m = guest_vm("sel_tsc_msrs.c")
    vcpu = m.vcpus[0]
    _check(vcpu, 0, 0)
    m.sync(stage=2)                                   # guest wrote IA32_TSC
    val = 1 * GUEST_STEP
    _check(vcpu, val, val)
    m.sync(stage=3)                                   # guest wrote IA32_TSC_ADJUST
    val = 2 * GUEST_STEP
    _check(vcpu, val, val)
    vcpu.set_msr(MSR_IA32_TSC, HOST_ADJUST + val)     # host: the TSC offset only
    _check(vcpu, HOST_ADJUST + val, val)
    m.sync(stage=4)
    vcpu.set_msr(MSR_IA32_TSC_ADJUST, UNITY * 123456)  # host: TSC_ADJUST does not move the TSC
    assert _rounded(vcpu, MSR_IA32_TSC) == HOST_ADJUST + val
    assert vcpu.get_msr(MSR_IA32_TSC_ADJUST) == UNITY * 123456
    vcpu.set_msr(MSR_IA32_TSC_ADJUST, val)            # restore
    _check(vcpu, HOST_ADJUST + val, val)
    m.sync(stage=5)
    val = 3 * GUEST_STEP
    _check(vcpu, HOST_ADJUST + val, val)
    m.done()
    val = 4 * GUEST_STEP
    _check(vcpu, val, val - HOST_ADJUST)
