"""Port of tools/testing/selftests/kvm/x86_64/xss_msr_test.c: with XSAVES offered, IA32_XSS
starts at 0 and takes 0 back; setting any single bit 0-63 through KVM_SET_MSRS either fails or,
if KVM takes it, IA32_XSS is in the save/restore MSR list (KVM_GET_MSR_INDEX_LIST)."""
import pytest

from pykvm.arch.x86.regs import cpuid_for_vcpu, cpuid_has
from pykvm.errors import KvmError

pytestmark = [pytest.mark.requires_kvm, pytest.mark.requires_arch("x86_64")]
MSR_IA32_XSS = 0xDA0


def test_xss_msr(kvm):
    if not cpuid_has(kvm.supported_cpuid(), "xsaves"):      # TEST_REQUIRE(kvm_cpu_has(XSAVES))
        pytest.skip("pykvm: host lacks CPUID feature xsaves (KVM_GET_SUPPORTED_CPUID 0xd.1:EAX[3])")
    with kvm.create_vm() as vm:
        vm.create_irqchip()
        vcpu = vm.create_vcpu()
        vcpu.set_cpuid(cpuid_for_vcpu(kvm.supported_cpuid(), 0))
        xss = vcpu.get_msr(MSR_IA32_XSS)
        assert xss == 0, "MSR_IA32_XSS should be initialized to zero"
        vcpu.set_msr(MSR_IA32_XSS, xss)
        in_list = MSR_IA32_XSS in kvm.msr_index_list()
        for i in range(64):
            try:
                vcpu.set_msr(MSR_IA32_XSS, 1 << i)       # KVM_SET_MSRS: 1 set or 0 refused
            except KvmError as e:
                assert "refused" in str(e), e            # an ioctl error is a test failure
                continue
            assert in_list, "IA32_XSS was able to be set, but was not in save/restore list"
