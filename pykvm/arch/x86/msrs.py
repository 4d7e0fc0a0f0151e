"""x86 MSR names by index, for output meant for people (``pykvm regs``) and for tests that
want to write ``msr_index("IA32_PAT")`` instead of ``0x277``.

The names are the vendors' own: the Intel SDM vol. 4 ("Model-Specific Registers", table
"IA32 Architectural MSRs") for the ``IA32_*`` MSRs and the few model-specific ones KVM lists
(``MSR_PLATFORM_INFO``, ``MSR_SMI_COUNT`` ...), the AMD APM vol. 2 appendix A for the AMD-only
ones (``CSTAR``, ``HWCR``, ``VM_HSAVE_PA`` ...), Linux ``Documentation/virt/kvm/x86/msr.rst``
for KVM's paravirtual MSRs (``MSR_KVM_*``) and the Hyper-V TLFS for ``HV_X64_MSR_*``.

    >>> msr_name(0xC0000080)
    'IA32_EFER'
    >>> hex(msr_index("efer"))
    '0xc0000080'
"""
from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Dict, Optional


def _table() -> Dict[int, str]:
    t: Dict[int, str] = {
        0x0: "IA32_P5_MC_ADDR", 0x1: "IA32_P5_MC_TYPE", 0x6: "IA32_MONITOR_FILTER_SIZE",
        0x10: "IA32_TIME_STAMP_COUNTER", 0x17: "IA32_PLATFORM_ID", 0x1B: "IA32_APIC_BASE",
        0x34: "MSR_SMI_COUNT", 0x35: "MSR_CORE_THREAD_COUNT", 0x3A: "IA32_FEATURE_CONTROL",
        0x3B: "IA32_TSC_ADJUST", 0x48: "IA32_SPEC_CTRL", 0x49: "IA32_PRED_CMD",
        0x79: "IA32_BIOS_UPDT_TRIG", 0x8B: "IA32_BIOS_SIGN_ID", 0x9B: "IA32_SMM_MONITOR_CTL",
        0x9E: "IA32_SMBASE", 0xCE: "MSR_PLATFORM_INFO", 0xE1: "IA32_UMWAIT_CONTROL",
        0xE7: "IA32_MPERF", 0xE8: "IA32_APERF", 0xFE: "IA32_MTRRCAP",
        0x10A: "IA32_ARCH_CAPABILITIES", 0x10B: "IA32_FLUSH_CMD", 0x122: "IA32_TSX_CTRL",
        0x140: "MSR_MISC_FEATURES_ENABLES",
        0x174: "IA32_SYSENTER_CS", 0x175: "IA32_SYSENTER_ESP", 0x176: "IA32_SYSENTER_EIP",
        0x179: "IA32_MCG_CAP", 0x17A: "IA32_MCG_STATUS", 0x17B: "IA32_MCG_CTL",
        0x198: "IA32_PERF_STATUS", 0x199: "IA32_PERF_CTL", 0x19A: "IA32_CLOCK_MODULATION",
        0x19B: "IA32_THERM_INTERRUPT", 0x19C: "IA32_THERM_STATUS", 0x1A0: "IA32_MISC_ENABLE",
        0x1C4: "IA32_XFD", 0x1C5: "IA32_XFD_ERR", 0x1D9: "IA32_DEBUGCTL",
        # AMD APM names (LastBranchFromIP ...); Intel's P6-family MSRs at the same indices
        0x1DB: "LAST_BRANCH_FROM_IP", 0x1DC: "LAST_BRANCH_TO_IP",
        0x1DD: "LAST_EXCEPTION_FROM_IP", 0x1DE: "LAST_EXCEPTION_TO_IP",
        0x1FC: "MSR_POWER_CTL",
        0x250: "IA32_MTRR_FIX64K_00000", 0x258: "IA32_MTRR_FIX16K_80000",
        0x259: "IA32_MTRR_FIX16K_A0000", 0x277: "IA32_PAT", 0x2FF: "IA32_MTRR_DEF_TYPE",
        0x309: "IA32_FIXED_CTR0", 0x30A: "IA32_FIXED_CTR1", 0x30B: "IA32_FIXED_CTR2",
        0x345: "IA32_PERF_CAPABILITIES", 0x38D: "IA32_FIXED_CTR_CTRL",
        0x38E: "IA32_PERF_GLOBAL_STATUS", 0x38F: "IA32_PERF_GLOBAL_CTRL",
        0x390: "IA32_PERF_GLOBAL_OVF_CTRL", 0x3F1: "IA32_PEBS_ENABLE",
        0x570: "IA32_RTIT_CTL", 0x571: "IA32_RTIT_STATUS", 0x600: "IA32_DS_AREA",
        0x6A0: "IA32_U_CET", 0x6A2: "IA32_S_CET", 0x6A4: "IA32_PL0_SSP", 0x6A5: "IA32_PL1_SSP",
        0x6A6: "IA32_PL2_SSP", 0x6A7: "IA32_PL3_SSP", 0x6A8: "IA32_INTERRUPT_SSP_TABLE_ADDR",
        0x6E0: "IA32_TSC_DEADLINE", 0x6E1: "IA32_PKRS", 0xD90: "IA32_BNDCFGS", 0xDA0: "IA32_XSS",
        # x2APIC registers (SDM vol. 3A, "x2APIC Register Address Space")
        0x802: "IA32_X2APIC_APICID", 0x803: "IA32_X2APIC_VERSION", 0x808: "IA32_X2APIC_TPR",
        0x80A: "IA32_X2APIC_PPR", 0x80B: "IA32_X2APIC_EOI", 0x80D: "IA32_X2APIC_LDR",
        0x80F: "IA32_X2APIC_SIVR", 0x828: "IA32_X2APIC_ESR", 0x82F: "IA32_X2APIC_LVT_CMCI",
        0x830: "IA32_X2APIC_ICR", 0x832: "IA32_X2APIC_LVT_TIMER",
        0x833: "IA32_X2APIC_LVT_THERMAL", 0x834: "IA32_X2APIC_LVT_PMI",
        0x835: "IA32_X2APIC_LVT_LINT0", 0x836: "IA32_X2APIC_LVT_LINT1",
        0x837: "IA32_X2APIC_LVT_ERROR", 0x838: "IA32_X2APIC_INIT_COUNT",
        0x839: "IA32_X2APIC_CUR_COUNT", 0x83E: "IA32_X2APIC_DIV_CONF",
        0x83F: "IA32_X2APIC_SELF_IPI",
        # long mode (SDM names; CSTAR is AMD's, the SDM has no name for it)
        0xC0000080: "IA32_EFER", 0xC0000081: "IA32_STAR", 0xC0000082: "IA32_LSTAR",
        0xC0000083: "CSTAR", 0xC0000084: "IA32_FMASK", 0xC0000100: "IA32_FS_BASE",
        0xC0000101: "IA32_GS_BASE", 0xC0000102: "IA32_KERNEL_GS_BASE",
        0xC0000103: "IA32_TSC_AUX", 0xC0000104: "TSC_RATIO",
        # AMD (APM vol. 2 appendix A)
        0xC0010010: "SYSCFG", 0xC0010015: "HWCR", 0xC0010016: "IORR_BASE0",
        0xC0010017: "IORR_MASK0", 0xC0010018: "IORR_BASE1", 0xC0010019: "IORR_MASK1",
        0xC001001A: "TOP_MEM", 0xC001001D: "TOP_MEM2", 0xC0010114: "VM_CR",
        0xC0010115: "IGNNE", 0xC0010116: "SMM_CTL", 0xC0010117: "VM_HSAVE_PA",
        0xC0010118: "SVM_KEY", 0xC001011F: "VIRT_SPEC_CTRL", 0xC0010131: "SEV_STATUS",
        0xC0010140: "OSVW_ID_LENGTH", 0xC0010141: "OSVW_STATUS", 0xC0011029: "DE_CFG",
        # KVM's paravirtual MSRs (Documentation/virt/kvm/x86/msr.rst)
        0x11: "MSR_KVM_WALL_CLOCK", 0x12: "MSR_KVM_SYSTEM_TIME",
        0x4B564D00: "MSR_KVM_WALL_CLOCK_NEW", 0x4B564D01: "MSR_KVM_SYSTEM_TIME_NEW",
        0x4B564D02: "MSR_KVM_ASYNC_PF_EN", 0x4B564D03: "MSR_KVM_STEAL_TIME",
        0x4B564D04: "MSR_KVM_PV_EOI_EN", 0x4B564D05: "MSR_KVM_POLL_CONTROL",
        0x4B564D06: "MSR_KVM_ASYNC_PF_INT", 0x4B564D07: "MSR_KVM_ASYNC_PF_ACK",
        0x4B564D08: "MSR_KVM_MIGRATION_CONTROL",
        # Hyper-V (TLFS, "Synthetic MSRs")
        0x40000000: "HV_X64_MSR_GUEST_OS_ID", 0x40000001: "HV_X64_MSR_HYPERCALL",
        0x40000002: "HV_X64_MSR_VP_INDEX", 0x40000003: "HV_X64_MSR_RESET",
        0x40000010: "HV_X64_MSR_VP_RUNTIME", 0x40000020: "HV_X64_MSR_TIME_REF_COUNT",
        0x40000021: "HV_X64_MSR_REFERENCE_TSC", 0x40000022: "HV_X64_MSR_TSC_FREQUENCY",
        0x40000023: "HV_X64_MSR_APIC_FREQUENCY", 0x40000070: "HV_X64_MSR_EOI",
        0x40000071: "HV_X64_MSR_ICR", 0x40000072: "HV_X64_MSR_TPR",
        0x40000073: "HV_X64_MSR_VP_ASSIST_PAGE", 0x40000080: "HV_X64_MSR_SCONTROL",
        0x40000081: "HV_X64_MSR_SVERSION", 0x40000082: "HV_X64_MSR_SIEFP",
        0x40000083: "HV_X64_MSR_SIMP", 0x40000084: "HV_X64_MSR_EOM",
        0x40000105: "HV_X64_MSR_CRASH_CTL", 0x40000106: "HV_X64_MSR_REENLIGHTENMENT_CONTROL",
        0x40000107: "HV_X64_MSR_TSC_EMULATION_CONTROL",
        0x40000108: "HV_X64_MSR_TSC_EMULATION_STATUS",
        0x40000118: "HV_X64_MSR_TSC_INVARIANT_CONTROL",
    }
    # numbered families
    for i in range(8):
        t[0xC1 + i] = f"IA32_PMC{i}"
        t[0x186 + i] = f"IA32_PERFEVTSEL{i}"
        t[0x200 + 2 * i] = f"IA32_MTRR_PHYSBASE{i}"
        t[0x201 + 2 * i] = f"IA32_MTRR_PHYSMASK{i}"
        t[0x4C1 + i] = f"IA32_A_PMC{i}"
        t[0x810 + i] = f"IA32_X2APIC_ISR{i}"
        t[0x818 + i] = f"IA32_X2APIC_TMR{i}"
        t[0x820 + i] = f"IA32_X2APIC_IRR{i}"
    for i, base in enumerate(("C0000", "C8000", "D0000", "D8000", "E0000", "E8000", "F0000",
                              "F8000")):
        t[0x268 + i] = f"IA32_MTRR_FIX4K_{base}"
    for bank in range(32):                            # machine-check banks
        for j, what in enumerate(("CTL", "STATUS", "ADDR", "MISC")):
            t[0x400 + 4 * bank + j] = f"IA32_MC{bank}_{what}"
    for i, what in enumerate(("BASIC", "PINBASED_CTLS", "PROCBASED_CTLS", "EXIT_CTLS",
                              "ENTRY_CTLS", "MISC", "CR0_FIXED0", "CR0_FIXED1", "CR4_FIXED0",
                              "CR4_FIXED1", "VMCS_ENUM", "PROCBASED_CTLS2", "EPT_VPID_CAP",
                              "TRUE_PINBASED_CTLS", "TRUE_PROCBASED_CTLS", "TRUE_EXIT_CTLS",
                              "TRUE_ENTRY_CTLS", "VMFUNC", "PROCBASED_CTLS3")):
        t[0x480 + i] = f"IA32_VMX_{what}"
    for i in range(4):                                # AMD legacy PerfEvtSel/PerfCtr
        t[0xC0010000 + i] = f"PERF_LEGACY_CTL{i}"
        t[0xC0010004 + i] = f"PERF_LEGACY_CTR{i}"
    for i in range(6):                                # AMD core performance counters
        t[0xC0010200 + 2 * i] = f"PERF_CTL{i}"
        t[0xC0010201 + 2 * i] = f"PERF_CTR{i}"
    for i in range(16):
        t[0x40000090 + i] = f"HV_X64_MSR_SINT{i}"
    for i in range(4):
        t[0x400000B0 + 2 * i] = f"HV_X64_MSR_STIMER{i}_CONFIG"
        t[0x400000B1 + 2 * i] = f"HV_X64_MSR_STIMER{i}_COUNT"
    for i in range(5):
        t[0x40000100 + i] = f"HV_X64_MSR_CRASH_P{i}"
    return t


#: MSR index → name (see the module's docstring for the sources).
MSR_NAMES: Dict[int, str] = _table()

# other spellings people use for the same MSRs (Linux's, the short AMD ones)
_ALIASES = {"IA32_TSC": 0x10, "TSC": 0x10, "SFMASK": 0xC0000084, "SYSCALL_MASK": 0xC0000084,
            "IA32_CR_PAT": 0x277, "APICBASE": 0x1B, "IA32_APICBASE": 0x1B,
            "IA32_CSTAR": 0xC0000083}


def _key(name: str) -> str:
    k = name.strip().upper().replace("-", "_").replace(".", "_")
    for prefix in ("MSR_IA32_", "IA32_", "MSR_"):
        if k.startswith(prefix) and not k.startswith("MSR_KVM_"):
            return k[len(prefix):]
    return k


_BY_KEY: Dict[str, int] = {}
for _i, _n in sorted(MSR_NAMES.items()):
    _BY_KEY.setdefault(_key(_n), _i)
for _n, _i in _ALIASES.items():
    _BY_KEY.setdefault(_key(_n), _i)


def msr_name(index: int) -> Optional[str]:
    """The name of MSR ``index`` (an int, 0..0xFFFFFFFF), or None when the table has none."""
    return MSR_NAMES.get(index)


def msr_index(name: str) -> int:
    """The index of the MSR called ``name``: any case, with or without the ``IA32_`` /
    ``MSR_`` / ``MSR_IA32_`` prefix (``"IA32_EFER"``, ``"efer"``, ``"MSR_IA32_PAT"``), or a
    common other spelling (``"IA32_TSC"``, ``"SFMASK"``). Raises ValueError for a name the
    table does not know."""
    try:
        return _BY_KEY[_key(name)]
    except KeyError:
        raise ValueError(f"unknown MSR name {name!r}") from None


def msr_label(index: int) -> str:
    """``"msr 0x10 IA32_TIME_STAMP_COUNTER"``, or ``"msr 0x10"`` for an MSR with no name:
    the row label ``pykvm regs`` prints."""
    name = MSR_NAMES.get(index)
    return f"msr {index:#x}" + (f" {name}" if name else "")
