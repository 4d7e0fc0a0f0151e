"""Compare pykvm's ABI description with the kernel headers installed on this machine.

A C probe that includes ``<linux/kvm.h>`` prints, for every struct size, field offset and size,
constant and ioctl number pykvm defines, the header's value. Items the installed header does not
have (newer than it) are dropped after the compiler names them, and reported as such.

The two sides are computed independently: pykvm's ioctl numbers come from ``ioctl_opt.IOC`` over
the sizes of our cffi declarations (:mod:`pykvm.abi.ioctls`), the header's from the C compiler
expanding ``<linux/kvm.h>``'s own ``_IOW``/``_IOR``/``_IOWR`` over the kernel's structs, so a
wrong direction, command number or struct size in our table shows as a mismatch.
"""
from __future__ import annotations

import os
import re
import subprocess
import tempfile

from . import ARCH, CData, arch, common, ffi, ioctls

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Dict, List, Optional, Tuple

# Structs that are pykvm's own or are named differently in the kernel.
_SKIP_STRUCTS = {"user_regs_struct"}
_CONST_GROUPS = [
    ("KVM_EXIT_", common.EXIT_REASONS),
    ("KVM_CAP_", common.CAPS),
    ("KVM_SYSTEM_EVENT_", common.SYSTEM_EVENTS),
    ("KVM_INTERNAL_ERROR_", common.INTERNAL_ERROR_SUBERRORS),
    ("KVM_MP_STATE_", common.MP_STATES),
    ("KVM_REG_SIZE_", common.REG_SIZES),
    ("KVM_STATS_TYPE_", common.STATS_TYPES),
    ("KVM_STATS_UNIT_", common.STATS_UNITS),
]
_SINGLE_CONSTS = {
    "KVMIO": common.KVMIO,
    "KVM_EXIT_IO_IN": common.KVM_EXIT_IO_IN, "KVM_EXIT_IO_OUT": common.KVM_EXIT_IO_OUT,
    "KVM_MEM_LOG_DIRTY_PAGES": common.MEM_LOG_DIRTY_PAGES, "KVM_MEM_READONLY": common.MEM_READONLY,
    "KVM_MEM_GUEST_MEMFD": common.MEM_GUEST_MEMFD,
    "KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE": common.DIRTY_LOG_MANUAL_PROTECT_ENABLE,
    "KVM_DIRTY_LOG_INITIALLY_SET": common.DIRTY_LOG_INITIALLY_SET,
    "KVM_DIRTY_GFN_F_DIRTY": common.DIRTY_GFN_F_DIRTY,
    "KVM_DIRTY_GFN_F_RESET": common.DIRTY_GFN_F_RESET,
    "KVM_DIRTY_GFN_F_MASK": common.DIRTY_GFN_F_MASK,
    "KVM_MEMORY_ATTRIBUTE_PRIVATE": common.MEMORY_ATTRIBUTE_PRIVATE,
    "KVM_IOEVENTFD_FLAG_DATAMATCH": common.IOEVENTFD_FLAG_DATAMATCH,
    "KVM_IOEVENTFD_FLAG_PIO": common.IOEVENTFD_FLAG_PIO,
    "KVM_IOEVENTFD_FLAG_DEASSIGN": common.IOEVENTFD_FLAG_DEASSIGN,
    "KVM_IRQFD_FLAG_DEASSIGN": common.IRQFD_FLAG_DEASSIGN,
    "KVM_IRQFD_FLAG_RESAMPLE": common.IRQFD_FLAG_RESAMPLE,
    "KVM_PIT_SPEAKER_DUMMY": common.PIT_SPEAKER_DUMMY,
    "KVM_CLOCK_TSC_STABLE": common.CLOCK_TSC_STABLE,
    "KVM_CLOCK_REALTIME": common.CLOCK_REALTIME, "KVM_CLOCK_HOST_TSC": common.CLOCK_HOST_TSC,
    "KVM_IRQ_ROUTING_IRQCHIP": common.IRQ_ROUTING_IRQCHIP,
    "KVM_IRQ_ROUTING_MSI": common.IRQ_ROUTING_MSI,
    "KVM_GUESTDBG_ENABLE": common.GUESTDBG_ENABLE,
    "KVM_GUESTDBG_SINGLESTEP": common.GUESTDBG_SINGLESTEP,
    "KVM_REG_ARCH_MASK": common.REG_ARCH_MASK, "KVM_REG_GENERIC": common.REG_GENERIC,
    "KVM_REG_X86": common.REG_X86, "KVM_REG_RISCV": common.REG_RISCV,
    "KVM_REG_ARM64": common.REG_ARM64, "KVM_REG_S390": common.REG_S390,
    "KVM_REG_PPC": common.REG_PPC, "KVM_REG_MIPS": common.REG_MIPS,
    "KVM_REG_LOONGARCH": common.REG_LOONGARCH,
    "KVM_REG_SIZE_SHIFT": common.REG_SIZE_SHIFT, "KVM_REG_SIZE_MASK": common.REG_SIZE_MASK,
    "KVM_STATS_TYPE_SHIFT": common.STATS_TYPE_SHIFT, "KVM_STATS_TYPE_MASK": common.STATS_TYPE_MASK,
    "KVM_STATS_UNIT_SHIFT": common.STATS_UNIT_SHIFT, "KVM_STATS_UNIT_MASK": common.STATS_UNIT_MASK,
    "KVM_STATS_BASE_SHIFT": common.STATS_BASE_SHIFT, "KVM_STATS_BASE_MASK": common.STATS_BASE_MASK,
    "KVM_COALESCED_MMIO_PAGE_OFFSET": arch.COALESCED_MMIO_PAGE_OFFSET,
    "KVM_RUN_X86_SMM": common.RUN_FLAGS["X86_SMM"],
    "KVM_RUN_X86_BUS_LOCK": common.RUN_FLAGS["X86_BUS_LOCK"],
    "KVM_RUN_X86_GUEST_MODE": common.RUN_FLAGS["X86_GUEST_MODE"],
}
if ARCH == "x86_64":
    _SINGLE_CONSTS.update({
        "KVM_PIO_PAGE_OFFSET": arch.PIO_PAGE_OFFSET,
        # (riscv's uAPI of 6.12 leaves it at the generic header's 0: no dirty ring there)
        "KVM_DIRTY_LOG_PAGE_OFFSET": arch.DIRTY_LOG_PAGE_OFFSET,
        "KVM_IRQCHIP_PIC_MASTER": common.IRQCHIP_PIC_MASTER,
        "KVM_IRQCHIP_PIC_SLAVE": common.IRQCHIP_PIC_SLAVE,
        "KVM_IRQCHIP_IOAPIC": common.IRQCHIP_IOAPIC,
        "KVM_X86_REG_TYPE_MSR": arch.REG_TYPE_MSR, "KVM_X86_REG_TYPE_KVM": arch.REG_TYPE_KVM,
        "KVM_STATE_NESTED_FORMAT_VMX": arch.NESTED_STATE_FORMATS["VMX"],
        "KVM_STATE_NESTED_FORMAT_SVM": arch.NESTED_STATE_FORMATS["SVM"],
        "KVM_STATE_NESTED_VMX_VMCS_SIZE": arch.NESTED_STATE_VMX_VMCS_SIZE,
        "KVM_STATE_NESTED_SVM_VMCB_SIZE": arch.NESTED_STATE_SVM_VMCB_SIZE,
        "KVM_GUESTDBG_USE_SW_BP": arch.GUESTDBG_USE_SW_BP,
        "KVM_GUESTDBG_USE_HW_BP": arch.GUESTDBG_USE_HW_BP,
        "KVM_GUESTDBG_INJECT_DB": arch.GUESTDBG_INJECT_DB,
        "KVM_GUESTDBG_INJECT_BP": arch.GUESTDBG_INJECT_BP,
        "KVM_CPUID_FLAG_SIGNIFCANT_INDEX": arch.CPUID_FLAG_SIGNIFCANT_INDEX,
        "KVM_APIC_REG_SIZE": arch.APIC_REG_SIZE,
        "KVM_SREGS2_FLAGS_PDPTRS_VALID": arch.SREGS2_FLAGS_PDPTRS_VALID,
        "KVM_X86_SHADOW_INT_MOV_SS": arch.X86_SHADOW_INT_MOV_SS,
        "KVM_X86_SHADOW_INT_STI": arch.X86_SHADOW_INT_STI,
        "KVM_MAX_XCRS": arch.MAX_XCRS,
        "KVM_MSR_FILTER_READ": arch.MSR_FILTER_READ,
        "KVM_MSR_FILTER_WRITE": arch.MSR_FILTER_WRITE,
        "KVM_MSR_FILTER_MAX_RANGES": arch.MSR_FILTER_MAX_RANGES,
        "KVM_MSR_FILTER_MAX_BITMAP_SIZE": arch.MSR_FILTER_MAX_BITMAP_SIZE,
        "KVM_MSR_FILTER_DEFAULT_ALLOW": arch.MSR_FILTER_DEFAULT_ALLOW,
        "KVM_MSR_FILTER_DEFAULT_DENY": arch.MSR_FILTER_DEFAULT_DENY,
        "KVM_MSR_EXIT_REASON_INVAL": arch.MSR_EXIT_REASON_INVAL,
        "KVM_MSR_EXIT_REASON_UNKNOWN": arch.MSR_EXIT_REASON_UNKNOWN,
        "KVM_MSR_EXIT_REASON_FILTER": arch.MSR_EXIT_REASON_FILTER,
    })
    for n, v in arch.VM_TYPES.items():
        _SINGLE_CONSTS[f"KVM_X86_{n}_VM"] = v
    for n, v in arch.VCPUEVENT_VALID.items():
        _SINGLE_CONSTS[f"KVM_VCPUEVENT_VALID_{n}"] = v
    for n, v in arch.NESTED_STATE_FLAGS.items():
        _SINGLE_CONSTS[f"KVM_STATE_NESTED_{n}"] = v
    for n, v in arch.NESTED_VMX_SMM_FLAGS.items():
        _SINGLE_CONSTS[f"KVM_STATE_NESTED_SMM_{n}"] = v
    _SINGLE_CONSTS["KVM_STATE_VMX_PREEMPTION_TIMER_DEADLINE"] = \
        arch.NESTED_VMX_FLAGS["PREEMPTION_TIMER_DEADLINE"]
elif ARCH == "riscv64":
    _SINGLE_CONSTS.update({"KVM_INTERRUPT_SET": arch.KVM_INTERRUPT_SET,
                           "KVM_INTERRUPT_UNSET": arch.KVM_INTERRUPT_UNSET})


def _struct_names(f: Optional[CData] = None) -> List[str]:
    """The KVM structs ``f`` (default: pykvm's ffi) declares; pykvm._native's own ``pykvm_*``
    structs, which share its compiled ffi, are not KVM ABI, and our names for members of
    kvm_run (``kvm_run_*``) are checked as fields of kvm_run."""
    names = []
    for decl in (f or ffi).list_types()[1]:
        if decl not in _SKIP_STRUCTS and not decl.startswith(("pykvm_", "kvm_run_")):
            names.append(decl)
    return sorted(names)


def _fields(ctype: CData, prefix: str = "") -> List[Tuple[str, CData]]:
    """(designator, field type) for every named field, recursing into anonymous and named
    struct/union members (flexible arrays included)."""
    out = []
    for name, f in ctype.fields or []:
        desig = f"{prefix}{name}" if name else prefix.rstrip(".")
        if name:
            out.append((desig, f.type))
        t = f.type
        if t.kind == "struct" and t.fields:
            out.extend(_fields(t, f"{desig}." if name else prefix))
    return out


def layouts(f: Optional[CData] = None) -> Dict[str, int]:
    """Every struct size, field offset and field size that ``f`` (default: pykvm's ffi, the
    one compiled into pykvm._native) declares."""
    f = f or ffi
    items: Dict[str, int] = {}
    for s in _struct_names(f):
        t = f.typeof(f"struct {s}")
        items[f"sizeof(struct {s})"] = f.sizeof(t)
        for desig, ft in _fields(t):
            items[f"offsetof(struct {s}, {desig})"] = f.offsetof(t, *desig.split("."))
            if ft.kind != "array" or ft.length is not None:
                items[f"sizeof(((struct {s} *)0)->{desig})"] = f.sizeof(ft)
    return items


def ours() -> Dict[str, int]:
    """Every checkable item: name → pykvm's value."""
    items = layouts()
    for prefix, group in _CONST_GROUPS:
        for n, v in group.items():
            items[f"{prefix}{n}"] = v
    items.update(_SINGLE_CONSTS)
    for i in ioctls.available():
        items[i.name] = i.request
    return items


def _probe_source(names: List[str]) -> str:
    lines = ["#include <stdio.h>", "#include <stddef.h>", "#include <linux/kvm.h>",
             "int main(void) {"]
    for n in names:
        if n.startswith(("sizeof", "offsetof")):
            expr = n.replace("offsetof(", "__builtin_offsetof(", 1)
            lines.append(f'  printf("%s\\t%llu\\n", "{n}", (unsigned long long)({expr}));')
        else:
            lines.append(f'#ifdef {n}\n  printf("%s\\t%llu\\n", "{n}", '
                         f'(unsigned long long)({n}));\n#endif')
    lines.append("  return 0;\n}")
    return "\n".join(lines) + "\n"


def uapi_include_dirs(source: str) -> List[str]:
    """The ``-I`` directories (str paths) that make ``<linux/kvm.h>`` the uAPI of the kernel
    source tree ``source``, for :func:`compare` against a kernel newer than the installed
    headers: ``source/usr/include``, where ``make headers`` (headers_install) puts the
    sanitized uAPI headers of the architecture it was run for. Raises FileNotFoundError when
    the tree has none."""
    d = os.path.join(source, "usr", "include")
    if not os.path.exists(os.path.join(d, "linux", "kvm.h")):
        raise FileNotFoundError(f"{source} has no installed uAPI headers (run `make headers`)")
    return [d]


def theirs(names: List[str], cc: str = "cc",
           include: Optional[List[str]] = None) -> Tuple[Dict[str, int], List[str]]:
    """Compile and run the probe. Returns (header values, items the header lacks).

    ``include``: directories searched before the installed headers (see
    :func:`uapi_include_dirs`)."""
    flags = [f"-I{d}" for d in include or ()]
    names = list(names)
    missing: List[str] = []
    with tempfile.TemporaryDirectory() as d:
        src, exe = os.path.join(d, "probe.c"), os.path.join(d, "probe")
        for _ in range(8):
            text = _probe_source(names)
            with open(src, "w") as f:
                f.write(text)
            r = subprocess.run([cc, "-fmax-errors=0", *flags, "-o", exe, src],
                               capture_output=True, text=True)
            if r.returncode == 0:
                break
            src_lines = text.splitlines()
            bad = set()
            for m in re.finditer(r"probe\.c:(\d+):\d+: error", r.stderr):
                line = src_lines[int(m.group(1)) - 1]
                quoted = re.findall(r'"([^"]+)"', line)
                if len(quoted) >= 2:
                    bad.add(quoted[1])
            if not bad:
                raise RuntimeError(f"ABI probe does not compile:\n{r.stderr[-3000:]}")
            missing += sorted(bad)
            names = [n for n in names if n not in bad]
        else:
            raise RuntimeError("ABI probe still failing after dropping unknown items")
        out = subprocess.run([exe], capture_output=True, text=True, check=True).stdout
    vals = {}
    for line in out.splitlines():
        k, v = line.rsplit("\t", 1)
        vals[k] = int(v)
    missing += [n for n in names if n not in vals]   # #ifdef'd out
    return vals, missing


def compare(cc: str = "cc", include: Optional[List[str]] = None
            ) -> Tuple[List[str], List[Tuple[str, int, int]], List[str]]:
    """(checked, mismatches, missing): mismatches are (name, ours, theirs). ``include`` as for
    :func:`theirs` (default: the installed headers only)."""
    mine = ours()
    hdr, missing = theirs(list(mine), cc, include)
    mismatches = [(k, mine[k], v) for k, v in sorted(hdr.items()) if mine[k] != v]
    return sorted(hdr), mismatches, missing
