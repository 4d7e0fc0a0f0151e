"""x86 register helpers for users of :class:`~pykvm.vcpu.Vcpu`: ONE_REG ids of MSRs and CPUID
entries as returned by ``Kvm.supported_cpuid()`` / accepted by ``Vcpu.set_cpuid()``.

    from pykvm.arch.x86.regs import msr_reg_id
    vcpu.get_one_reg(msr_reg_id(0xC0000081))     # MSR STAR
"""
from __future__ import annotations

from ... import abi

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Dict, Iterable, List, Optional, Tuple

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

    _fields = ("function", "index", "flags", "eax", "ebx", "ecx", "edx")

    def _replace(self, **changes: int) -> "CpuidEntry":
        """A copy with the named fields (``function``, ``index``, ``flags``, ``eax``, ``ebx``,
        ``ecx``, ``edx``) replaced, as :meth:`collections.namedtuple._replace` does. Raises
        ValueError for an unknown field name."""
        bad = set(changes) - set(self._fields)
        if bad:
            raise ValueError(f"CpuidEntry has no field {', '.join(sorted(bad))}")
        return CpuidEntry(*(changes.get(f, v) for f, v in zip(self._fields, self)))

    def _asdict(self) -> Dict[str, int]:
        """The entry as ``{field name: value}``."""
        return dict(zip(self._fields, self))

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


def cpuid_set(entries: Iterable, function: int, index: int = 0, **regs: int) -> List[CpuidEntry]:
    """``entries`` (tuples or :class:`CpuidEntry`, e.g. from ``Kvm.supported_cpuid()``) with the
    registers named in ``regs`` (``eax``, ``ebx``, ``ecx``, ``edx``: 32-bit ints) of leaf
    ``function`` / sub-leaf ``index`` replaced; the leaf is appended (flags 0, other registers
    0) when ``entries`` has none. For :meth:`pykvm.vcpu.Vcpu.set_cpuid`. Raises ValueError for
    another register name or a value that does not fit 32 bits."""
    for k, v in regs.items():
        if k not in ("eax", "ebx", "ecx", "edx"):
            raise ValueError(f"CPUID register must be eax, ebx, ecx or edx, not {k!r}")
        if not 0 <= v <= 0xFFFFFFFF:
            raise ValueError(f"CPUID {k}={v:#x} does not fit 32 bits")
    out = [CpuidEntry(*e) for e in entries]
    hit = cpuid_lookup(out, function, index)
    if hit is None:
        out.append(CpuidEntry(function, index, 0, 0, 0, 0, 0)._replace(**regs))
    else:
        out[out.index(hit)] = hit._replace(**regs)
    return out


# CPUID feature flags by QEMU's name (``-cpu host,+name``; "_" and "-" are the same): (leaf,
# sub-leaf, register, bit), from the Intel SDM vol. 2A "CPUID" and AMD APM vol. 3 tables.
CPUID_FEATURES: Dict[str, Tuple[int, int, str, int]] = {
    # leaf 1 EDX
    "fpu": (1, 0, "edx", 0), "vme": (1, 0, "edx", 1), "de": (1, 0, "edx", 2),
    "pse": (1, 0, "edx", 3), "tsc": (1, 0, "edx", 4), "msr": (1, 0, "edx", 5),
    "pae": (1, 0, "edx", 6), "mce": (1, 0, "edx", 7), "cx8": (1, 0, "edx", 8),
    "apic": (1, 0, "edx", 9), "sep": (1, 0, "edx", 11), "mtrr": (1, 0, "edx", 12),
    "pge": (1, 0, "edx", 13), "mca": (1, 0, "edx", 14), "cmov": (1, 0, "edx", 15),
    "pat": (1, 0, "edx", 16), "pse36": (1, 0, "edx", 17), "clflush": (1, 0, "edx", 19),
    "mmx": (1, 0, "edx", 23), "fxsr": (1, 0, "edx", 24), "sse": (1, 0, "edx", 25),
    "sse2": (1, 0, "edx", 26), "ss": (1, 0, "edx", 27), "ht": (1, 0, "edx", 28),
    # leaf 1 ECX
    "pni": (1, 0, "ecx", 0), "pclmulqdq": (1, 0, "ecx", 1), "monitor": (1, 0, "ecx", 3),
    "vmx": (1, 0, "ecx", 5), "smx": (1, 0, "ecx", 6), "ssse3": (1, 0, "ecx", 9),
    "fma": (1, 0, "ecx", 12), "cx16": (1, 0, "ecx", 13), "pdcm": (1, 0, "ecx", 15),
    "pcid": (1, 0, "ecx", 17), "sse4.1": (1, 0, "ecx", 19), "sse4.2": (1, 0, "ecx", 20),
    "x2apic": (1, 0, "ecx", 21), "movbe": (1, 0, "ecx", 22), "popcnt": (1, 0, "ecx", 23),
    "tsc-deadline": (1, 0, "ecx", 24), "aes": (1, 0, "ecx", 25), "xsave": (1, 0, "ecx", 26),
    "osxsave": (1, 0, "ecx", 27), "avx": (1, 0, "ecx", 28), "f16c": (1, 0, "ecx", 29),
    "rdrand": (1, 0, "ecx", 30), "hypervisor": (1, 0, "ecx", 31),
    # leaf 7.0 EBX / ECX / EDX
    "fsgsbase": (7, 0, "ebx", 0), "bmi1": (7, 0, "ebx", 3), "hle": (7, 0, "ebx", 4),
    "avx2": (7, 0, "ebx", 5), "smep": (7, 0, "ebx", 7), "bmi2": (7, 0, "ebx", 8),
    "erms": (7, 0, "ebx", 9), "invpcid": (7, 0, "ebx", 10), "rtm": (7, 0, "ebx", 11),
    "avx512f": (7, 0, "ebx", 16), "rdseed": (7, 0, "ebx", 18), "adx": (7, 0, "ebx", 19),
    "smap": (7, 0, "ebx", 20), "clflushopt": (7, 0, "ebx", 23), "clwb": (7, 0, "ebx", 24),
    "sha-ni": (7, 0, "ebx", 29),
    "umip": (7, 0, "ecx", 2), "pku": (7, 0, "ecx", 3), "ospke": (7, 0, "ecx", 4),
    "waitpkg": (7, 0, "ecx", 5), "la57": (7, 0, "ecx", 16), "rdpid": (7, 0, "ecx", 22),
    "md-clear": (7, 0, "edx", 10), "spec-ctrl": (7, 0, "edx", 26),
    "arch-capabilities": (7, 0, "edx", 29),
    # leaf 0xD.1 EAX
    "xsaveopt": (0xD, 1, "eax", 0), "xsavec": (0xD, 1, "eax", 1), "xgetbv1": (0xD, 1, "eax", 2),
    "xsaves": (0xD, 1, "eax", 3),
    # leaf 0x80000001 ECX / EDX
    "lahf-lm": (0x80000001, 0, "ecx", 0), "svm": (0x80000001, 0, "ecx", 2),
    "abm": (0x80000001, 0, "ecx", 5), "sse4a": (0x80000001, 0, "ecx", 6),
    "3dnowprefetch": (0x80000001, 0, "ecx", 8),
    "syscall": (0x80000001, 0, "edx", 11), "nx": (0x80000001, 0, "edx", 20),
    "pdpe1gb": (0x80000001, 0, "edx", 26), "rdtscp": (0x80000001, 0, "edx", 27),
    "lm": (0x80000001, 0, "edx", 29),
    # leaf 0x80000007 EDX
    "invtsc": (0x80000007, 0, "edx", 8),
}


def _feature_key(name: str) -> str:
    return name.strip().lower().replace("_", "-").replace(".", "-")


_FEATURES_BY_KEY = {_feature_key(k): v for k, v in CPUID_FEATURES.items()}


def cpuid_feature_bit(name: str) -> Tuple[int, int, str, int]:
    """(leaf, sub-leaf, register, bit) of the CPU feature ``name`` in QEMU's spelling
    (``"rdtscp"``, ``"sse4.2"``, ``"tsc-deadline"``; "_", "-" and "." are the same, any case; see
    :data:`CPUID_FEATURES`). Raises ValueError for a name not in the table."""
    try:
        return _FEATURES_BY_KEY[_feature_key(name)]
    except KeyError:
        raise ValueError(f"unknown CPUID feature {name!r} (known: "
                         f"{', '.join(sorted(CPUID_FEATURES))})") from None


def cpuid_has(entries: Iterable, name: str) -> bool:
    """Whether ``entries`` (tuples or :class:`CpuidEntry`) set feature ``name`` (as
    :func:`cpuid_feature_bit` spells it); False when they lack the leaf. Raises ValueError for
    an unknown name."""
    leaf, sub, reg, bit = cpuid_feature_bit(name)
    e = cpuid_lookup([CpuidEntry(*x) for x in entries], leaf, sub)
    return e is not None and bool(getattr(e, reg) >> bit & 1)


def cpuid_with_feature(entries: Iterable, name: str, on: bool = True) -> List[CpuidEntry]:
    """``entries`` with feature ``name`` (as :func:`cpuid_feature_bit` spells it) set, or
    cleared with ``on=False``, in its leaf (appended when missing). KVM may still refuse, in
    KVM_SET_CPUID2 or when the guest uses it, a feature it cannot give (compare
    ``Kvm.supported_cpuid()``). Raises ValueError for an unknown name."""
    leaf, sub, reg, bit = cpuid_feature_bit(name)
    es = [CpuidEntry(*x) for x in entries]
    e = cpuid_lookup(es, leaf, sub)
    old = getattr(e, reg) if e is not None else 0
    return cpuid_set(es, leaf, sub, **{reg: old | 1 << bit if on else old & ~(1 << bit)})
