"""AMD SVM facts the host side of nested tests needs: #VMEXIT codes and their names, the
VMCB offsets pykvm reads, SVM MSRs and EFER.SVME (AMD APM vol. 2, appendix B/C).

A VMCB is one 4 KiB page: the control area at 0x000 and the state save area at 0x400. With
KVM_GET_NESTED_STATE on SVM, ``NestedState.data`` holds a VMCB image (L1's vmcb12 control
area and L1's own saved state), so :func:`vmcb_field` can read it.
"""
from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Dict

MSR_EFER = 0xC0000080
MSR_VM_CR = 0xC0010114
MSR_VM_HSAVE_PA = 0xC0010117
EFER_SVME = 1 << 12
CPUID_SVM_LEAF, CPUID_SVM_ECX_BIT = 0x80000001, 2      # CPUID 0x80000001 ECX[2]
CPUID_SVM_FEATURES = 0x8000000A                        # revision, ASIDs, feature bits

VMCB_SIZE = 0x1000

# VMCB offsets (byte offset, size in bytes).
VMCB = {
    "intercept_cr": (0x000, 4), "intercept_dr": (0x004, 4), "intercept_exceptions": (0x008, 4),
    "intercept_word3": (0x00C, 4), "intercept_word4": (0x010, 4), "intercept_word5": (0x014, 4),
    "iopm_base_pa": (0x040, 8), "msrpm_base_pa": (0x048, 8), "tsc_offset": (0x050, 8),
    "asid": (0x058, 4), "tlb_ctl": (0x05C, 1), "int_ctl": (0x060, 4),
    "exit_code": (0x070, 8), "exit_info_1": (0x078, 8), "exit_info_2": (0x080, 8),
    "exit_int_info": (0x088, 4), "nested_ctl": (0x090, 8), "event_inj": (0x0A8, 4),
    "nested_cr3": (0x0B0, 8), "clean": (0x0C0, 4), "next_rip": (0x0C8, 8),
    "save.cs.selector": (0x410, 2), "save.cpl": (0x4CB, 1), "save.efer": (0x4D0, 8),
    "save.cr4": (0x548, 8), "save.cr3": (0x550, 8), "save.cr0": (0x558, 8),
    "save.dr7": (0x560, 8), "save.dr6": (0x568, 8), "save.rflags": (0x570, 8),
    "save.rip": (0x578, 8), "save.rsp": (0x5D8, 8), "save.rax": (0x5F8, 8),
    "save.cr2": (0x640, 8), "save.g_pat": (0x668, 8),
}

# Intercept bits: (intercept word offset, bit).
INTERCEPTS = {
    "INTR": (0x00C, 0), "NMI": (0x00C, 1), "CPUID": (0x00C, 18), "HLT": (0x00C, 24),
    "INVLPG": (0x00C, 25), "INVLPGA": (0x00C, 26), "IOIO_PROT": (0x00C, 27), "MSR_PROT": (0x00C, 28),
    "SHUTDOWN": (0x00C, 31), "VMRUN": (0x010, 0), "VMMCALL": (0x010, 1), "VMLOAD": (0x010, 2),
    "VMSAVE": (0x010, 3), "STGI": (0x010, 4), "CLGI": (0x010, 5),
}

EXIT_CODES: Dict[int, str] = {
    0x060: "INTR", 0x061: "NMI", 0x062: "SMI", 0x063: "INIT", 0x064: "VINTR",
    0x065: "CR0_SEL_WRITE", 0x066: "IDTR_READ", 0x067: "GDTR_READ", 0x068: "LDTR_READ",
    0x069: "TR_READ", 0x06A: "IDTR_WRITE", 0x06B: "GDTR_WRITE", 0x06C: "LDTR_WRITE",
    0x06D: "TR_WRITE", 0x06E: "RDTSC", 0x06F: "RDPMC", 0x070: "PUSHF", 0x071: "POPF",
    0x072: "CPUID", 0x073: "RSM", 0x074: "IRET", 0x075: "SWINT", 0x076: "INVD", 0x077: "PAUSE",
    0x078: "HLT", 0x079: "INVLPG", 0x07A: "INVLPGA", 0x07B: "IOIO", 0x07C: "MSR",
    0x07D: "TASK_SWITCH", 0x07E: "FERR_FREEZE", 0x07F: "SHUTDOWN", 0x080: "VMRUN",
    0x081: "VMMCALL", 0x082: "VMLOAD", 0x083: "VMSAVE", 0x084: "STGI", 0x085: "CLGI",
    0x086: "SKINIT", 0x087: "RDTSCP", 0x088: "ICEBP", 0x089: "WBINVD", 0x08A: "MONITOR",
    0x08B: "MWAIT", 0x08C: "MWAIT_COND", 0x08D: "XSETBV", 0x08E: "RDPRU",
    0x08F: "EFER_WRITE_TRAP", 0x400: "NPF", 0x401: "AVIC_INCOMPLETE_IPI",
    0x402: "AVIC_UNACCELERATED_ACCESS", 0x403: "VMGEXIT",
    0xFFFFFFFFFFFFFFFF: "INVALID",
}
EXIT_NUMBERS = {v: k for k, v in EXIT_CODES.items()}
EXIT_VMMCALL, EXIT_HLT, EXIT_IOIO, EXIT_INVLPGA = 0x081, 0x078, 0x07B, 0x07A

# TLB_CONTROL, VMCB offset 0x05C (APM vol. 2, 15.16.1 "TLB Flush"): what VMRUN flushes before it
# enters the guest. 3 and 7 exist only with FlushByAsid (CPUID 0x8000000A EDX[6]).
TLB_CONTROL = {
    "DO_NOTHING": 0,        # nothing
    "FLUSH_ALL": 1,         # every ASID's entries
    "FLUSH_ASID": 3,        # the guest's ASID, global entries included
    "FLUSH_ASID_LOCAL": 7,  # the guest's ASID, non-global entries only
}

# CPUID 0x8000000A EDX feature bits the nested tests look at (APM vol. 3, CPUID Fn8000_000A).
SVM_FEATURES_EDX = {"NP": 0, "LBRV": 1, "SVM_LOCK": 2, "NRIPS": 3, "TSC_RATE": 4,
                    "VMCB_CLEAN": 5, "FLUSH_BY_ASID": 6, "DECODE_ASSISTS": 7,
                    "PAUSE_FILTER": 10, "PAUSE_FILTER_THRESHOLD": 12, "AVIC": 13,
                    "V_VMSAVE_VMLOAD": 15, "VGIF": 16}


def svm_features(cpuid) -> Dict[str, object]:
    """The SVM leaf (CPUID 0x8000000A) of ``cpuid`` (entries as
    :meth:`pykvm.kvm.Kvm.supported_cpuid` returns them: ``function``, ``eax``...) as
    ``{"revision": int, "asids": int (NASID: ASIDs 1..asids-1 are usable), "edx": int,
    <each name of SVM_FEATURES_EDX>: bool}``; an empty dict when the leaf is absent."""
    leaf = next((e for e in cpuid if e.function == CPUID_SVM_FEATURES), None)
    if leaf is None:
        return {}
    out: Dict[str, object] = {"revision": leaf.eax & 0xFF, "asids": leaf.ebx, "edx": leaf.edx}
    for name, bit in SVM_FEATURES_EDX.items():
        out[name] = bool(leaf.edx >> bit & 1)
    return out


def exit_name(code: int) -> str:
    """``"VMMCALL"`` for 0x81; CR/DR accesses and exceptions by number; else ``"0x..."``."""
    code &= 0xFFFFFFFFFFFFFFFF
    if code in EXIT_CODES:
        return EXIT_CODES[code]
    if code < 0x10:
        return f"READ_CR{code}"
    if code < 0x20:
        return f"WRITE_CR{code - 0x10}"
    if code < 0x30:
        return f"READ_DR{code - 0x20}"
    if code < 0x40:
        return f"WRITE_DR{code - 0x30}"
    if code < 0x60:
        return f"EXCP{code - 0x40}"
    if 0x90 <= code < 0xA0:
        return f"CR{code - 0x90}_WRITE_TRAP"
    return f"{code:#x}"


def ioio_port(exit_info_1: int) -> int:
    """The port of an IOIO #VMEXIT (EXITINFO1[31:16])."""
    return (exit_info_1 >> 16) & 0xFFFF


def vmcb_field(vmcb: bytes, name: str) -> int:
    """Read a field of a VMCB image (e.g. ``NestedState.data``) by its name in :data:`VMCB`."""
    off, size = VMCB[name]
    if len(vmcb) < off + size:
        raise ValueError(f"VMCB image of {len(vmcb)} bytes has no {name} at {off:#x}")
    return int.from_bytes(vmcb[off:off + size], "little")
