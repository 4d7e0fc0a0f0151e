"""The x86 guest-physical memory map pykvm uses when it boots a guest.

Everything the VMM itself puts into guest RAM lives in the reserved window
``RESERVED_START``..``RESERVED_END`` (0x1000–0x9ffff); images are linked at 1 MiB or above
(see docs/guest-abi.md). This module is the single place these addresses are defined; the loader
and :mod:`pykvm.arch.x86.modes` import them from here.

    0x00000 - 0x00fff   free (real-mode IVT area)
    0x01000 - 0x01fff   GDT (0x1000) and TSS (0x1800)
    0x02000 - 0x02fff   PML4
    0x03000 - 0x03fff   PDPT
    0x09000 - 0x09fff   multiboot information (protected-mode boots)
    0x10000 - 0x2ffff   page directories: one 4 KiB page per GiB, 2 MiB pages (max 32 GiB)
    0x30000 - 0x6ffff   boot stacks: vCPU i owns the 4 KiB page at 0x30000 + i * 0x1000
    0x100000 -          guest images
"""

PAGE_SIZE = 0x1000
KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30

# The window the VMM owns; the loader refuses images that overlap it (except real-mode ones,
# which need no page tables, GDT or boot stack).
RESERVED_START = 0x1000
RESERVED_END = 0xA0000

GDT_ADDR = 0x1000
GDT_LIMIT = 0x30 - 1            # null, code, data, code32, 16-byte TSS descriptor
TSS_ADDR = 0x1800
TSS_LIMIT = 0x67

PML4_ADDR = 0x2000
PDPT_ADDR = 0x3000

MULTIBOOT_INFO_ADDR = 0x9000
MULTIBOOT_INFO_SIZE = 0x1000

PD_ADDR = 0x10000
PD_MAX_PAGES = 32               # each page directory maps 1 GiB with 2 MiB pages
IDENTITY_MAP_MIN = 4 * GiB      # always map at least the first 4 GiB (MMIO lives there)

STACKS_ADDR = 0x30000
STACK_SIZE = PAGE_SIZE
MAX_VCPUS = 64

IMAGE_BASE = 0x100000           # where the built-in guests are linked

# Real mode: flat binaries default to 0000:8000 with the stack just below them.
REAL_MODE_LOAD_ADDR = 0x8000
REAL_MODE_STACK_TOP = 0x7000

# Segment selectors of the VMM's GDT (the same in long and protected mode).
SEL_CODE = 0x08
SEL_DATA = 0x10
SEL_CODE32 = 0x18               # long-mode GDT only: a 32-bit code segment
SEL_TSS = 0x20

assert STACKS_ADDR + MAX_VCPUS * STACK_SIZE <= RESERVED_END
assert PD_ADDR + PD_MAX_PAGES * PAGE_SIZE <= STACKS_ADDR


def stack_top(vcpu_index: int) -> int:
    """Initial stack pointer of vCPU ``vcpu_index`` (the top of its own 4 KiB stack page)."""
    if not 0 <= vcpu_index < MAX_VCPUS:
        raise ValueError(f"vCPU index {vcpu_index} out of range: the boot layout has stacks "
                         f"for {MAX_VCPUS} vCPUs")
    return STACKS_ADDR + (vcpu_index + 1) * STACK_SIZE


def identity_map_size(ram_size: int) -> int:
    """Bytes identity-mapped in long mode: max(4 GiB, RAM), rounded up to whole GiB."""
    size = max(IDENTITY_MAP_MIN, ram_size)
    return (size + GiB - 1) // GiB * GiB


# ---- where the VMM's boot structures go ------------------------------------------------------
#
# The structures above keep their relative places but may move as a block: an image linked into
# the low window (e.g. a multiboot kernel at 0x8000) gets them somewhere it does not use.

BOOT_WINDOW_START = RESERVED_START
BOOT_WINDOW_END = RESERVED_END
BOOT_WINDOW_ALIGN = 0x10000


class BootLayout:
    """Addresses of the VMM's boot structures, all ``base`` bytes above the defaults of this
    module (``base`` = 0: the classic layout)."""

    __slots__ = ("base",)

    def __init__(self, base: int = 0):
        if base < 0 or base % BOOT_WINDOW_ALIGN:
            raise ValueError(f"boot layout base {base:#x} is not a multiple of "
                             f"{BOOT_WINDOW_ALIGN:#x}")
        self.base = base

    @property
    def gdt(self) -> int:
        """The GDT's guest-physical address."""
        return self.base + GDT_ADDR

    @property
    def tss(self) -> int:
        """The TSS's guest-physical address."""
        return self.base + TSS_ADDR

    @property
    def pml4(self) -> int:
        """The PML4 (CR3 of a long-mode boot)."""
        return self.base + PML4_ADDR

    @property
    def pdpt(self) -> int:
        """The page-directory-pointer table."""
        return self.base + PDPT_ADDR

    @property
    def pd(self) -> int:
        """The first page directory (one 4 KiB page per GiB mapped)."""
        return self.base + PD_ADDR

    @property
    def stacks(self) -> int:
        """The first boot stack page (vCPU i owns the i-th page)."""
        return self.base + STACKS_ADDR

    def stack_top(self, vcpu_index: int) -> int:
        """Initial stack pointer of vCPU ``vcpu_index`` in this layout."""
        return self.base + stack_top(vcpu_index)

    def ranges(self, mode: str, vcpus: int = 1, ram_top: int = 0):
        """[(start, end)] this layout writes for a ``mode`` boot ("long", "protected", "real")
        of ``vcpus`` vCPUs whose RAM ends at ``ram_top``."""
        if mode not in ("long", "protected"):
            return []
        out = [(self.gdt, self.tss + TSS_LIMIT + 1)]
        if mode == "long":
            n_pd = identity_map_size(ram_top) // GiB
            out += [(self.pml4, self.pdpt + PAGE_SIZE), (self.pd, self.pd + n_pd * PAGE_SIZE)]
        out.append((self.stacks, self.stacks + max(1, vcpus) * STACK_SIZE))
        return out

    def __eq__(self, other):
        return isinstance(other, BootLayout) and other.base == self.base

    def __hash__(self):
        return hash(self.base)

    def __repr__(self):
        return f"BootLayout(base={self.base:#x})"


DEFAULT_LAYOUT = BootLayout(0)


# ---- the PC memory map ----------------------------------------------------------------------
#
# As QEMU's ``pc`` machine lays out RAM (hw/i386/pc_piix.c): RAM below 4 GiB is at most
# 3.5 GiB; a guest with 3.5 GiB or more gets 3 GiB below 4 GiB (gigabyte aligned) and the rest
# from 4 GiB up. Between the end of low RAM and 4 GiB is the 32-bit PCI/MMIO hole: the IOAPIC
# (0xFEC00000), the local APICs (0xFEE00000), the pc-testdev window (0xFF000000), the pages KVM
# keeps for real-mode emulation (TSS and identity map) stay devices at every RAM size.

MAX_RAM_BELOW_4G = 0xE0000000
RAM_BELOW_4G_LARGE = 0xC0000000
HIGH_RAM_START = 4 * GiB
IOAPIC_BASE = 0xFEC00000
LAPIC_BASE = 0xFEE00000
KVM_IDENTITY_MAP_ADDR = 0xFFFBC000          # one page
KVM_TSS_ADDR = 0xFFFBD000                   # three pages
EBDA_START = 0x9FC00                        # the last 1 KiB below 640 KiB, as a PC BIOS keeps it
BIOS_AREA_START = 0xE0000                   # ACPI tables and the RSDP live here (PC machine)
LOW_RAM_END = 0x100000
VGA_WINDOW_START = 0xA0000                  # legacy VGA memory: a device, not RAM, on a PC
OPTION_ROM_START = 0xC0000                  # option ROMs, then the system BIOS, up to 1 MiB

# Where QEMU's pc has no writable RAM when its multiboot option ROM copies a -kernel image into
# place: [0xA0000, 0xC0000) is the VGA window (device memory) and [0xC0000, 1 MiB) is the
# option ROM and BIOS shadow that SeaBIOS write-protects (its make_bios_readonly, through the
# i440FX PAM registers) before it boots. Image bytes QEMU would write there are lost, so a
# kernel linked at 1 MiB whose first LOAD segment (GNU ld's ELF and program headers) starts a
# page below boots all the same. pykvm's PC keeps its ACPI tables in this range.
PC_NO_RAM_FOR_IMAGES = ((VGA_WINDOW_START, LOW_RAM_END),)


def ram_split(size: int):
    """(bytes below 4 GiB, bytes from 4 GiB up) of ``size`` bytes of RAM, as QEMU's pc
    machine splits it."""
    lowmem = MAX_RAM_BELOW_4G
    if size >= lowmem:
        lowmem = RAM_BELOW_4G_LARGE
    if size >= lowmem:
        return lowmem, size - lowmem
    return size, 0


E820_RAM = 1
E820_RESERVED = 2


def e820_map(below: int, above: int = 0, *, bios_area: bool = False):
    """The E820 map of an x86 guest with ``below`` bytes of RAM from 0 and ``above`` bytes from
    4 GiB: (base, length, type) in address order. ``bios_area``: the PC machine's
    [0xE0000, 1 MiB) (ACPI tables, RSDP) is reserved, else only [0xF0000, 1 MiB)."""
    out = []
    low_end = min(below, EBDA_START)
    if low_end:
        out.append((0, low_end, E820_RAM))
    if below > EBDA_START:
        out.append((EBDA_START, 0xA0000 - EBDA_START, E820_RESERVED))
    area = BIOS_AREA_START if bios_area else 0xF0000
    if below > area:
        out.append((area, LOW_RAM_END - area, E820_RESERVED))
    if below > LOW_RAM_END:
        out.append((LOW_RAM_END, below - LOW_RAM_END, E820_RAM))
    if bios_area:
        out.append((KVM_IDENTITY_MAP_ADDR, HIGH_RAM_START - KVM_IDENTITY_MAP_ADDR,
                    E820_RESERVED))
    if above:
        out.append((HIGH_RAM_START, above, E820_RAM))
    return out
