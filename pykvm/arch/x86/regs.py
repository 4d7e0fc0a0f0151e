"""x86 register helpers for users of :class:`~pykvm.vcpu.Vcpu`: ONE_REG ids of MSRs and CPUID
entries as returned by ``Kvm.supported_cpuid()`` / accepted by ``Vcpu.set_cpuid()``.

    from pykvm.arch.x86.regs import msr_reg_id
    vcpu.get_one_reg(msr_reg_id(0xC0000081))     # MSR STAR
"""
from __future__ import annotations

from ... import abi

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Iterable, List, Optional

REG_TYPE_MSR = abi.arch.REG_TYPE_MSR


def msr_reg_id(index: int) -> int:
    """The ONE_REG id of MSR ``index`` (Linux 6.18+): X86 | U64 | type MSR << 32 | index."""
    if not 0 <= index <= 0xFFFFFFFF:
        raise ValueError(f"MSR index {index:#x} out of range")
    return abi.REG_X86 | abi.REG_SIZES["U64"] | (REG_TYPE_MSR << 32) | index


class CpuidEntry(tuple):
    """(function, index, flags, eax, ebx, ecx, edx)."""
    __slots__ = ()

    def __new__(cls, function, index, flags, eax, ebx, ecx, edx):
        return tuple.__new__(cls, (function, index, flags, eax, ebx, ecx, edx))

    function = property(lambda s: s[0], doc='CPUID leaf (the EAX input).')
    index = property(lambda s: s[1], doc='CPUID sub-leaf (the ECX input), meaningful when ``flags`` has KVM_CPUID_FLAG_SIGNIFCANT_INDEX.')
    flags = property(lambda s: s[2], doc='KVM_CPUID_FLAG_* bits.')
    eax = property(lambda s: s[3], doc='EAX output.')
    ebx = property(lambda s: s[4], doc='EBX output.')
    ecx = property(lambda s: s[5], doc='ECX output.')
    edx = property(lambda s: s[6], doc='EDX output.')

    def _replace_ebx(self, ebx: int) -> "CpuidEntry":
        return CpuidEntry(self[0], self[1], self[2], self[3], ebx, self[5], self[6])


def cpuid_lookup(entries: Iterable[CpuidEntry], function: int, index: int = 0) -> Optional[CpuidEntry]:
    """The entry for leaf ``function`` (and sub-leaf ``index`` where the entry is indexed,
    ``KVM_CPUID_FLAG_SIGNIFCANT_INDEX``), or None."""
    for e in entries:
        if e.function == function and (e.index == index or not e.flags & 1):
            return e
    return None


# CPUID.1:ECX bit 31: "running under a hypervisor". KVM_GET_SUPPORTED_CPUID leaves it to the VMM
# (QEMU, kvmtool and Firecracker set it); without it a Linux guest never looks at the KVM leaves
# 0x40000000+ (hypervisor_cpuid_base() requires it), so it gets no kvm-clock and falls back to
# the ACPI PM timer or the TSC, with a port read per clock read on the first.
CPUID_1_ECX_HYPERVISOR = 1 << 31


def cpuid_for_vcpu(entries: Iterable, index: int, *, hypervisor: bool = True) -> List[CpuidEntry]:
    """``entries`` (as from ``Kvm.supported_cpuid()``) as vCPU ``index`` gets them: its APIC id
    patched in, as a firmware gives each CPU its own — leaf 1 EBX[31:24] (the initial xAPIC id,
    its low 8 bits) and leaves 0xB and 0x1F EDX (the x2APIC id, whole), Intel SDM vol. 2A,
    CPUID — and, with ``hypervisor`` (default), leaf 1 ECX bit 31 (:data:`CPUID_1_ECX_HYPERVISOR`)
    set, as every VMM does, so that guests find KVM's paravirtual leaves (Linux
    ``Documentation/virt/kvm/x86/cpuid.rst``); ``hypervisor=False`` leaves ECX as given."""
    out = []
    for e in entries:
        e = CpuidEntry(*e)
        if e.function == 1:
            e = e._replace_ebx((e.ebx & 0x00FFFFFF) | ((index & 0xFF) << 24))
            if hypervisor:
                e = CpuidEntry(e.function, e.index, e.flags, e.eax, e.ebx, e.ecx | CPUID_1_ECX_HYPERVISOR, e.edx)
        elif e.function in (0xB, 0x1F):
            e = CpuidEntry(e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, index)
        out.append(e)
    return out
