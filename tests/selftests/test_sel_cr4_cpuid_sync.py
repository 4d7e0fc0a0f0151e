"""Port of tools/testing/selftests/kvm/x86_64/cr4_cpuid_sync_test.c: with XSAVE offered, the
guest's CPUID.1:ECX.OSXSAVE follows CR4.OSXSAVE when the guest sets it and when the host clears
it through KVM_SET_SREGS."""
import pytest

from pykvm.arch.x86.regs import cpuid_has

pytestmark = [pytest.mark.requires_kvm, pytest.mark.requires_arch("x86_64")]
X86_CR4_OSXSAVE = 1 << 18


def test_cr4_cpuid_sync(kvm, guest_vm):
    if not cpuid_has(kvm.supported_cpuid(), "xsave"):        # TEST_REQUIRE(kvm_cpu_has(XSAVE))
        pytest.skip("pykvm: host lacks CPUID feature xsave (KVM_GET_SUPPORTED_CPUID 1:ECX[26])")
    m = guest_vm("sel_cr4_cpuid_sync.c")
    m.sync(stage=1)
    vcpu = m.vcpus[0]
    s = vcpu.get_sregs()
    s.cr4 &= ~X86_CR4_OSXSAVE                     # the hypervisor clears CR4.OSXSAVE
    vcpu.set_sregs(s)
    m.done()
