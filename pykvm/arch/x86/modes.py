"""x86 boot states: long mode (ELF64), 32-bit protected mode (multiboot) and real mode.

Each ``setup_*`` function writes what the mode needs into guest memory (page tables, GDT, TSS —
all inside the VMM-reserved window, see :mod:`pykvm.arch.x86.layout`) and sets the vCPU's
special and general registers. They use only ``vcpu.get_sregs/set_sregs/get_regs/set_regs``
and ``mem.write``; the ``fill_*`` helpers work on any object with the ``kvm_sregs`` field names,
so they can be tested without KVM.
"""
from __future__ import annotations

import struct

from . import layout as L

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Optional

# control register / EFER bits (architectural values)
CR0_PE = 1 << 0
CR0_MP = 1 << 1
CR0_ET = 1 << 4
CR0_NE = 1 << 5
CR0_WP = 1 << 16
CR0_PG = 1 << 31
CR4_PAE = 1 << 5
EFER_SCE = 1 << 0
EFER_LME = 1 << 8
EFER_LMA = 1 << 10

# page table entry bits
PTE_P = 1 << 0
PTE_RW = 1 << 1
PTE_PS = 1 << 7

RFLAGS_FIXED = 0x2

# segment types (S = 1: code/data; S = 0: system)
TYPE_DATA_RW_ACCESSED = 0x3
TYPE_CODE_RX_ACCESSED = 0xB
TYPE_LDT = 0x2
TYPE_TSS_BUSY = 0xB            # 64-bit busy TSS in long mode, 32-bit busy TSS otherwise

_GPRS = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
         "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")


# ---- descriptors and tables in memory -------------------------------------------------------------

def descriptor(base: int, limit: int, access: int, flags: int) -> int:
    """An 8-byte segment descriptor. ``access`` is the byte P|DPL|S|type, ``flags`` the nibble
    G|D/B|L|AVL; ``limit`` is the 20-bit field value."""
    return ((limit & 0xFFFF) | ((base & 0xFFFFFF) << 16) | ((access & 0xFF) << 40) |
            (((limit >> 16) & 0xF) << 48) | ((flags & 0xF) << 52) | (((base >> 24) & 0xFF) << 56))


# access bytes: present, DPL 0, S = 1 + type
_ACC_CODE = 0x80 | 0x10 | TYPE_CODE_RX_ACCESSED
_ACC_DATA = 0x80 | 0x10 | TYPE_DATA_RW_ACCESSED
_ACC_TSS = 0x80 | TYPE_TSS_BUSY
# flag nibbles
_FL_G = 0x8
_FL_DB = 0x4
_FL_L = 0x2


def gdt_bytes(mode: str, tss_addr: int = L.TSS_ADDR) -> bytes:
    """The VMM's GDT for ``mode`` ("long" or "protected"): code at SEL_CODE, data at SEL_DATA,
    a 32-bit code segment at SEL_CODE32 and a busy TSS (at ``tss_addr``) at SEL_TSS."""
    if mode == "long":
        code = descriptor(0, 0xFFFFF, _ACC_CODE, _FL_G | _FL_L)
    elif mode == "protected":
        code = descriptor(0, 0xFFFFF, _ACC_CODE, _FL_G | _FL_DB)
    else:
        raise ValueError(f"no GDT for mode {mode!r}")
    data = descriptor(0, 0xFFFFF, _ACC_DATA, _FL_G | _FL_DB)
    code32 = descriptor(0, 0xFFFFF, _ACC_CODE, _FL_G | _FL_DB)
    tss_lo = descriptor(tss_addr, L.TSS_LIMIT, _ACC_TSS, 0)
    tss_hi = tss_addr >> 32              # upper half of a 16-byte system descriptor
    return struct.pack("<6Q", 0, code, data, code32, tss_lo, tss_hi)


def write_gdt(mem, mode: str, layout: L.BootLayout = L.DEFAULT_LAYOUT) -> None:
    """Write the GDT and a zeroed TSS (I/O bitmap base past the limit: no bitmap)."""
    gdt = gdt_bytes(mode, layout.tss)
    assert len(gdt) == L.GDT_LIMIT + 1
    mem.write(layout.gdt, gdt)
    tss = bytearray(L.TSS_LIMIT + 1)
    struct.pack_into("<H", tss, 0x66, L.TSS_LIMIT + 1)
    mem.write(layout.tss, bytes(tss))


def ram_top(mem) -> int:
    """The end of the highest RAM slot of ``mem`` (its ``size`` if it does not list slots)."""
    try:
        ends = [s.end for s in mem]
    except TypeError:
        ends = []
    return max(ends + [mem.size])


def write_identity_map(mem, ram_size: Optional[int] = None,
                       layout: L.BootLayout = L.DEFAULT_LAYOUT) -> int:
    """Write PML4/PDPT/PDs identity-mapping max(4 GiB, the top of RAM) with 2 MiB pages;
    returns CR3. ``ram_size`` defaults to the end of the highest RAM slot (RAM above the
    32-bit hole included)."""
    if ram_size is None:
        ram_size = ram_top(mem)
    size = L.identity_map_size(ram_size)
    n_pd = size // L.GiB
    if n_pd > L.PD_MAX_PAGES:
        raise ValueError(f"guest RAM reaches GPA {ram_size:#x}, above the {L.PD_MAX_PAGES} GiB the "
                         f"boot page tables map (RAM beyond 3 GiB sits above the 32-bit PCI "
                         f"hole, from 4 GiB): give a long-mode guest at most "
                         f"{L.PD_MAX_PAGES - 1} GiB")
    pml4 = bytearray(L.PAGE_SIZE)
    struct.pack_into("<Q", pml4, 0, layout.pdpt | PTE_P | PTE_RW)
    pdpt = bytearray(L.PAGE_SIZE)
    for i in range(n_pd):
        struct.pack_into("<Q", pdpt, 8 * i, (layout.pd + i * L.PAGE_SIZE) | PTE_P | PTE_RW)
    flags = PTE_P | PTE_RW | PTE_PS
    big = 2 * L.MiB
    pds = struct.pack(f"<{512 * n_pd}Q", *(i * big | flags for i in range(512 * n_pd)))
    mem.write(layout.pml4, bytes(pml4))
    mem.write(layout.pdpt, bytes(pdpt))
    mem.write(layout.pd, pds)
    return layout.pml4


# ---- register state --------------------------------------------------------------------------------

def fill_segment(seg, *, selector: int, base: int = 0, limit: int = 0xFFFFFFFF, type: int,
                 s: int = 1, dpl: int = 0, present: int = 1, db: int = 0,
                 l: int = 0,  # noqa: E741 — the descriptor's L bit, as struct kvm_segment names it
                 g: int = 1, avl: int = 0, unusable: int = 0) -> None:
    """Set every field of a ``struct kvm_segment`` (limit is in bytes, as KVM wants it)."""
    seg.base, seg.limit, seg.selector, seg.type = base, limit, selector, type
    seg.present, seg.dpl, seg.db, seg.s, seg.l, seg.g = present, dpl, db, s, l, g
    seg.avl, seg.unusable = avl, unusable
    seg.padding = 0


def _data_segments(sregs, **kw) -> None:
    for name in ("ds", "es", "fs", "gs", "ss"):
        fill_segment(getattr(sregs, name), **kw)


def _ldt(sregs) -> None:
    fill_segment(sregs.ldt, selector=0, limit=0xFFFF, type=TYPE_LDT, s=0, g=0)


def _flat_tables(sregs, layout: L.BootLayout = L.DEFAULT_LAYOUT) -> None:
    """What long and protected mode share: flat data segments, the TSS, no LDT, our GDT, no
    IDT."""
    _data_segments(sregs, selector=L.SEL_DATA, type=TYPE_DATA_RW_ACCESSED, db=1)
    fill_segment(sregs.tr, selector=L.SEL_TSS, base=layout.tss, limit=L.TSS_LIMIT,
                 type=TYPE_TSS_BUSY, s=0, g=0)
    _ldt(sregs)
    sregs.gdt.base, sregs.gdt.limit = layout.gdt, L.GDT_LIMIT
    sregs.idt.base, sregs.idt.limit = 0, 0


def fill_long_mode_sregs(sregs, cr3: int = L.PML4_ADDR,
                         layout: L.BootLayout = L.DEFAULT_LAYOUT) -> None:
    """Long mode with paging: flat 64-bit CS 0x08, data 0x10, TR 0x20, GDT at GDT_ADDR, no
    IDT."""
    fill_segment(sregs.cs, selector=L.SEL_CODE, type=TYPE_CODE_RX_ACCESSED, l=1, db=0)
    _flat_tables(sregs, layout)
    sregs.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG
    sregs.cr3 = cr3
    sregs.cr4 = CR4_PAE
    sregs.efer = EFER_LME | EFER_LMA


def fill_protected_mode_sregs(sregs, layout: L.BootLayout = L.DEFAULT_LAYOUT) -> None:
    """32-bit protected mode, paging off: flat CS 0x08 / data 0x10 (base 0, 4 GiB), TR 0x20."""
    fill_segment(sregs.cs, selector=L.SEL_CODE, type=TYPE_CODE_RX_ACCESSED, db=1)
    _flat_tables(sregs, layout)
    sregs.cr0 = CR0_PE | CR0_ET
    sregs.cr3 = 0
    sregs.cr4 = 0
    sregs.efer = 0


def fill_real_mode_sregs(sregs, entry_cs: int) -> None:
    """Real mode: CS = entry_cs (base entry_cs * 16), other segments 0, 64 KiB limits, the IVT
    at 0."""
    fill_segment(sregs.cs, selector=entry_cs, base=entry_cs << 4, limit=0xFFFF,
                 type=TYPE_CODE_RX_ACCESSED, g=0)
    _data_segments(sregs, selector=0, limit=0xFFFF, type=TYPE_DATA_RW_ACCESSED, g=0)
    fill_segment(sregs.tr, selector=0, limit=0xFFFF, type=TYPE_TSS_BUSY, s=0, g=0)
    _ldt(sregs)
    sregs.gdt.base, sregs.gdt.limit = 0, 0xFFFF
    sregs.idt.base, sregs.idt.limit = 0, 0x3FF
    sregs.cr0 = CR0_ET
    sregs.cr3 = 0
    sregs.cr4 = 0
    sregs.efer = 0


def _set_regs(vcpu, *, rip: int, rsp: int, **values: int) -> None:
    regs = vcpu.get_regs()
    for name in _GPRS:
        setattr(regs, name, 0)
    for name, v in values.items():
        setattr(regs, name, v)
    regs.rsp = rsp
    regs.rip = rip
    regs.rflags = RFLAGS_FIXED
    vcpu.set_regs(regs)


# ---- the three entry modes ------------------------------------------------------------------------

def setup_long_mode(vcpu, mem, entry: int, stack_top: Optional[int] = None, *,
                    vcpu_index: int = 0, write_tables: bool = True,
                    layout: L.BootLayout = L.DEFAULT_LAYOUT) -> None:
    """Enter ``entry`` in 64-bit long mode with the first max(4 GiB, RAM) identity-mapped.

    ``stack_top`` defaults to the top of vCPU ``vcpu_index``'s stack page. With several vCPUs,
    pass ``write_tables=False`` after the first to skip rewriting the (identical) tables.
    ``layout``: where the page tables, GDT, TSS and stacks go."""
    if stack_top is None:
        stack_top = layout.stack_top(vcpu_index)
    cr3 = layout.pml4
    if write_tables:
        cr3 = write_identity_map(mem, layout=layout)
        write_gdt(mem, "long", layout)
    sregs = vcpu.get_sregs()
    fill_long_mode_sregs(sregs, cr3, layout)
    vcpu.set_sregs(sregs)
    _set_regs(vcpu, rip=entry, rsp=stack_top)


def setup_protected_mode(vcpu, mem, entry: int, eax: int = 0, ebx: int = 0,
                         esp: Optional[int] = None, *, vcpu_index: int = 0,
                         layout: L.BootLayout = L.DEFAULT_LAYOUT) -> None:
    """Enter ``entry`` in flat 32-bit protected mode, paging and interrupts off, as the multiboot
    specification describes (pass EAX = 0x2BADB002 and EBX = the info address for multiboot).
    ``esp`` defaults to the vCPU's boot stack (multiboot leaves ESP undefined)."""
    if esp is None:
        esp = layout.stack_top(vcpu_index)
    write_gdt(mem, "protected", layout)
    sregs = vcpu.get_sregs()
    fill_protected_mode_sregs(sregs, layout)
    vcpu.set_sregs(sregs)
    _set_regs(vcpu, rip=entry, rsp=esp, rax=eax & 0xFFFFFFFF, rbx=ebx & 0xFFFFFFFF)


def setup_real_mode(vcpu, entry_cs: int, entry_ip: int, *,
                    sp: int = L.REAL_MODE_STACK_TOP) -> None:
    """Enter real mode at ``entry_cs:entry_ip`` (writes nothing into guest memory)."""
    if not 0 <= entry_cs <= 0xFFFF or not 0 <= entry_ip <= 0xFFFF:
        raise ValueError(f"real-mode entry {entry_cs:#x}:{entry_ip:#x} does not fit 16 bits")
    sregs = vcpu.get_sregs()
    fill_real_mode_sregs(sregs, entry_cs)
    vcpu.set_sregs(sregs)
    _set_regs(vcpu, rip=entry_ip, rsp=sp)


def real_mode_entry(addr: int) -> tuple:
    """(CS, IP) for a linear entry address below 1 MiB: CS = 0 if it fits, else the segment
    that puts IP in 0..15."""
    if not 0 <= addr < 0x100000:
        raise ValueError(f"real-mode entry {addr:#x} is not below 1 MiB")
    if addr <= 0xFFFF:
        return 0, addr
    return addr >> 4, addr & 0xF


def setup_for_image(vcpu, mem, loaded, *, vcpu_index: int = 0,
                    stack_top: Optional[int] = None,
                    layout: L.BootLayout = L.DEFAULT_LAYOUT) -> None:
    """Prepare ``vcpu`` to run a :class:`pykvm.boot.LoadedImage` according to its mode
    (``layout``: where the VMM's page tables, GDT, TSS and stacks go)."""
    mode = loaded.mode
    if mode == "long":
        setup_long_mode(vcpu, mem, loaded.entry, stack_top, vcpu_index=vcpu_index,
                        layout=layout)
    elif mode == "protected":
        regs = loaded.boot_regs
        setup_protected_mode(vcpu, mem, loaded.entry, regs.get("eax", 0), regs.get("ebx", 0),
                             stack_top, vcpu_index=vcpu_index, layout=layout)
    elif mode == "real":
        cs, ip = real_mode_entry(loaded.entry)
        setup_real_mode(vcpu, cs, ip)
    else:
        raise ValueError(f"x86 cannot boot an image in mode {mode!r}")


__all__ = [
    "setup_long_mode", "setup_protected_mode", "setup_real_mode", "setup_for_image",
    "real_mode_entry", "write_identity_map", "write_gdt", "gdt_bytes", "descriptor",
    "fill_segment", "fill_long_mode_sregs", "fill_protected_mode_sregs", "fill_real_mode_sregs",
]
