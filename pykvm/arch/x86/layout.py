"""The x86 guest-physical memory map pykvm uses when it boots a guest.

Everything the VMM itself puts into guest RAM lives in the reserved window
``RESERVED_START``..``RESERVED_END`` (0x1000–0x9ffff); images are linked at 1 MiB or above
(see docs/guest-abi.md). This module is the single place these addresses are defined; the loader
and :mod:`pykvm.arch.x86.boot` import them from here.

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
