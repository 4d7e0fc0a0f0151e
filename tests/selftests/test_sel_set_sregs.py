"""Port of tools/testing/selftests/kvm/x86_64/set_sregs_test.c: every CR4 bit KVM supports can
be set before KVM_SET_CPUID2 and reads back; each CR4 bit it does not support, CR0 bits 32-63,
CR0.NW without CD and CR0.PG without PE are refused without changing the sregs; then, in a VM
with an irqchip and CPUID, APIC_BASE with x2APIC enable but xAPIC disabled is refused and a
plain xAPIC-enabled base is taken."""
import pytest
from _selftest import host_fails

from pykvm.arch.x86.regs import cpuid_for_vcpu, cpuid_has
from pykvm.errors import KvmError

pytestmark = [pytest.mark.requires_kvm, pytest.mark.requires_arch("x86_64")]

VME, PVI, TSD, DE, PSE, PAE, MCE, PGE, PCE, OSFXSR, OSXMMEXCPT, UMIP, LA57 = (1 << b for b in range(13))
VMXE, SMXE, FSGSBASE, PCIDE, OSXSAVE, SMEP, SMAP, PKE = (1 << b for b in (13, 14, 16, 17, 18, 20, 21, 22))
CR0_NW, CR0_PG = 1 << 29, 1 << 31
OPTIONAL = {"umip": UMIP, "la57": LA57, "vmx": VMXE, "smx": SMXE, "fsgsbase": FSGSBASE,
            "pcid": PCIDE, "xsave": OSXSAVE, "smep": SMEP, "smap": SMAP, "pku": PKE}


def _snapshot(s):
    from pykvm.abi import ffi
    return bytes(ffi.buffer(s))


def _invalid_bit(vcpu, s, cr, bit):
    """TEST_INVALID_CR_BIT: set ``bit`` in ``cr`` unless already set; KVM must refuse it and
    leave the sregs as they were."""
    if getattr(s, cr) & bit:
        return
    before = _snapshot(s)
    new = vcpu.get_sregs()
    new[0] = s[0]
    setattr(new, cr, getattr(s, cr) | bit)
    with pytest.raises(KvmError):
        vcpu.set_sregs(new)
    assert _snapshot(vcpu.get_sregs()) == before, "KVM modified sregs"


@host_fails("Failed to set supported CR4 bits (0x1fff): KVM_GET_SUPPORTED_CPUID offers UMIP "
            "and LA57 but KVM_SET_SREGS refuses them")
def test_set_sregs(kvm):
    cpuid = kvm.supported_cpuid()
    supported = VME | PVI | TSD | DE | PSE | PAE | MCE | PGE | PCE | OSFXSR | OSXMMEXCPT
    for name, bit in OPTIONAL.items():
        if cpuid_has(cpuid, name):
            supported |= bit
    with kvm.create_vm() as vm:                 # barebones: no irqchip, no KVM_SET_CPUID2
        vcpu = vm.create_vcpu()
        s = vcpu.get_sregs()
        s.cr0 = 0
        s.cr4 |= supported
        cr4 = s.cr4
        try:
            vcpu.set_sregs(s)
        except KvmError as e:
            raise AssertionError(f"Failed to set supported CR4 bits ({cr4:#x}): {e}") from None
        s = vcpu.get_sregs()
        assert s.cr4 == cr4, f"sregs.CR4 ({s.cr4:#x}) != CR4 ({cr4:#x})"
        for bit in OPTIONAL.values():           # unsupported features are rejected
            _invalid_bit(vcpu, s, "cr4", bit)
        for i in range(32, 64):
            _invalid_bit(vcpu, s, "cr0", 1 << i)
        _invalid_bit(vcpu, s, "cr0", CR0_NW)    # NW without CD
        _invalid_bit(vcpu, s, "cr0", CR0_PG)    # PG without PE
    with kvm.create_vm() as vm:                 # "real" VM: irqchip and CPUID
        vm.create_irqchip()
        vcpu = vm.create_vcpu()
        vcpu.set_cpuid(cpuid_for_vcpu(cpuid, 0))
        s = vcpu.get_sregs()
        s.apic_base = 1 << 10
        with pytest.raises(KvmError):
            vcpu.set_sregs(s)                   # x2APIC enable without xAPIC enable
        s.apic_base = 1 << 11
        vcpu.set_sregs(s)                       # "Couldn't set IA32_APIC_BASE" otherwise
