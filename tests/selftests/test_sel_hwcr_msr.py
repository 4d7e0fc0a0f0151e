"""Port of tools/testing/selftests/kvm/x86_64/hwcr_msr_test.c: for each bit 0-63 of MSR_K7_HWCR
written alone from the host, KVM takes the ignored bits (3, 6, 8) and valid ones (18, 24) and
refuses all others; reading back gives only the valid bits written; 0 is always taken."""
import pytest

from pykvm.arch.x86.regs import cpuid_for_vcpu
from pykvm.errors import KvmError

pytestmark = [pytest.mark.requires_kvm, pytest.mark.requires_arch("x86_64")]
MSR_K7_HWCR = 0xC0010015
IGNORED = 1 << 3 | 1 << 6 | 1 << 8
VALID = 1 << 18 | 1 << 24
LEGAL = IGNORED | VALID


def test_hwcr_msr(kvm):
    with kvm.create_vm() as vm:
        vm.create_irqchip()
        vcpu = vm.create_vcpu()
        vcpu.set_cpuid(cpuid_for_vcpu(kvm.supported_cpuid(), 0))
        for bit in range(64):
            val = 1 << bit
            try:
                vcpu.set_msr(MSR_K7_HWCR, val)
                took = True
            except KvmError:
                took = False
            assert took == (not val & ~LEGAL), \
                f"Expected KVM_SET_MSRS(MSR_K7_HWCR) = {val:#x} to {'fail' if val & ~LEGAL else 'succeed'}"
            actual = vcpu.get_msr(MSR_K7_HWCR)
            assert actual == val & VALID, \
                f"Bit {bit}: unexpected HWCR {actual:#x}; expected {val & VALID:#x}"
            vcpu.set_msr(MSR_K7_HWCR, 0)
