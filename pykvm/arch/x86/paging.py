"""Guest page tables from the host, as the kernel selftests' ``virt_map``/``vm_vaddr_alloc``: map
more guest-virtual ranges into the 4-level long-mode tables a guest runs on, and hand out free
guest-physical pages for them and for the tables themselves.

pykvm's long-mode boot (:func:`pykvm.arch.x86.modes.write_identity_map`) identity-maps the first
max(4 GiB, RAM) with 2 MiB pages from one PML4 entry; :func:`virt_map` adds 4 KiB mappings
anywhere else in the 48-bit canonical space (a new PDPT, PD or PT is taken from the allocator
where the walk finds none), and refuses to touch what is already mapped. Page-table entries
follow the Intel SDM vol. 3A, 4.5 ("4-level paging"): bit 0 present, bit 1 writable, bit 7 a
large page at the PDPT/PD level, bits 12-51 the next table's (or the page's) address.

Every table the walk reads is read through ``mem`` (a :class:`pykvm.memory.GuestMemory`), so a
table pointer that leads outside guest RAM raises :class:`pykvm.errors.GuestMemoryError`; a walk
is at most four reads per page and a call maps at most :data:`MAX_MAP_PAGES` pages.
"""
from __future__ import annotations

import struct

from ...errors import PykvmError
from .modes import PTE_P, PTE_PS, PTE_RW

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Callable, List, Optional, Sequence, Tuple

PAGE_SIZE = 0x1000
PTE_ADDR = 0x000F_FFFF_FFFF_F000       # bits 12-51: the next level's (or the page's) address
MAX_MAP_PAGES = 1 << 18                # 1 GiB of 4 KiB pages per virt_map call, at most
VADDR_ALLOC_BASE = 512 << 30           # where vaddr_alloc looks first: PML4 entry 1, above
                                       # pykvm's identity map (at most 32 GiB, PML4 entry 0)
_LEVEL_NAMES = ("PML4", "PDPT", "PD", "PT")
_LEVEL_SIZES = (512 << 30, 1 << 30, 2 << 20, PAGE_SIZE)   # what one entry of each level maps


class PagingError(PykvmError, ValueError):
    """A mapping that cannot be made: an address not page-aligned or not canonical, a page
    already mapped, or no free guest RAM for a page table."""


def canonical(vaddr: int) -> bool:
    """Whether ``vaddr`` is a canonical 48-bit virtual address (bits 63-47 all equal)."""
    return 0 <= vaddr < (1 << 47) or (1 << 64) - (1 << 47) <= vaddr < (1 << 64)


def _index(vaddr: int, level: int) -> int:
    return (vaddr >> (39 - 9 * level)) & 0x1FF


def _entry(mem, table: int, index: int) -> int:
    return struct.unpack("<Q", mem.read(table + 8 * index, 8))[0]


def translate(mem, cr3: int, vaddr: int) -> Optional[int]:
    """The guest-physical address ``vaddr`` maps to in the 4-level tables at ``cr3`` (1 GiB,
    2 MiB and 4 KiB pages), or None if it is not mapped (or not canonical). Raises
    :class:`pykvm.errors.GuestMemoryError` for a table outside guest RAM."""
    if not canonical(vaddr):
        return None
    table = cr3 & PTE_ADDR
    for level in range(4):
        e = _entry(mem, table, _index(vaddr, level))
        if not e & PTE_P:
            return None
        size = _LEVEL_SIZES[level]
        if level == 3 or (level in (1, 2) and e & PTE_PS):
            return (e & PTE_ADDR & ~(size - 1)) | (vaddr & (size - 1))
        table = e & PTE_ADDR
    return None                                          # not reached


def virt_map(mem, cr3: int, vaddr: int, gpa: int, size: int,
             alloc_page: Callable[[], int], *, writable: bool = True) -> List[int]:
    """Map guest-virtual ``[vaddr, vaddr + size)`` to guest-physical ``[gpa, gpa + size)`` with
    4 KiB pages in the 4-level tables at ``cr3``. ``alloc_page()`` returns the guest-physical
    address of a free 4 KiB page for each table the walk needs (it is zeroed here).
    ``writable``: set the leaf entries' R/W bit. Nothing is written until every page of the
    range has been checked to be unmapped. Returns the tables made (guest-physical).

    Raises :class:`PagingError` for an address or size not a multiple of 4 KiB, a range not
    canonical or more than :data:`MAX_MAP_PAGES` pages, or a page already mapped (by a 4 KiB or
    a large page); :class:`pykvm.errors.GuestMemoryError` for tables outside guest RAM."""
    for what, v in (("virtual address", vaddr), ("guest-physical address", gpa),
                    ("size", size)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 0 or v % PAGE_SIZE:
            raise PagingError(f"virt_map: the {what} {v!r} is not a multiple of 4 KiB")
    pages = size // PAGE_SIZE
    if not 0 < pages <= MAX_MAP_PAGES:
        raise PagingError(f"virt_map maps 1 to {MAX_MAP_PAGES} pages, not {pages}")
    if not canonical(vaddr) or not canonical(vaddr + size - 1) or \
            (vaddr < (1 << 47) <= vaddr + size - 1):
        raise PagingError(f"virt_map: [{vaddr:#x}, {vaddr + size:#x}) is not a canonical "
                          f"48-bit range")
    if gpa + size > 1 << 52:
        raise PagingError(f"virt_map: guest-physical {gpa:#x} + {size:#x} is beyond 52 bits")
    for i in range(pages):                           # check first, write after
        va = vaddr + i * PAGE_SIZE
        _check_unmapped(mem, cr3, va)
    # every table the range needs is allocated before anything is written: a run out of RAM
    # leaves no half-made mapping
    spare = [alloc_page() for _ in range(tables_needed(mem, cr3, vaddr, pages))]
    made: List[int] = []
    leaf = PTE_P | (PTE_RW if writable else 0)
    for i in range(pages):
        va = vaddr + i * PAGE_SIZE
        table = cr3 & PTE_ADDR
        for level in range(3):
            idx = _index(va, level)
            e = _entry(mem, table, idx)
            if not e & PTE_P:
                new = spare.pop()
                mem.write(new, bytes(PAGE_SIZE))
                made.append(new)
                e = new | PTE_P | PTE_RW
                mem.write(table + 8 * idx, struct.pack("<Q", e))
            table = e & PTE_ADDR
        mem.write(table + 8 * _index(va, 3), struct.pack("<Q", (gpa + i * PAGE_SIZE) | leaf))
    return made


def tables_needed(mem, cr3: int, vaddr: int, pages: int) -> int:
    """How many new page tables mapping ``pages`` 4 KiB pages from ``vaddr`` takes in the
    tables at ``cr3``: one per PDPT, page directory or page table that is not there yet."""
    missing = set()
    for i in range(pages):
        va = vaddr + i * PAGE_SIZE
        table: Optional[int] = cr3 & PTE_ADDR
        for level in range(3):
            key = (level, va >> (39 - 9 * level))
            if key in missing:
                continue
            e = _entry(mem, table, _index(va, level)) if table is not None else 0
            if not e & PTE_P:
                missing.add(key)
                table = None                          # everything below it is new too
                continue
            table = e & PTE_ADDR
    return len(missing)


def find_unmapped(mem, cr3: int, start: int, pages: int) -> int:
    """The lowest page-aligned guest-virtual address >= ``start`` where ``pages`` pages are all
    unmapped, looking at most :data:`MAX_MAP_PAGES` pages past ``start``. Raises
    :class:`PagingError` when there is none there."""
    va = (start + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1)
    end = va + (MAX_MAP_PAGES + pages) * PAGE_SIZE
    run = 0
    probe = va
    while probe < end and canonical(probe):
        if translate(mem, cr3, probe) is None:
            run += 1
            if run == pages:
                return probe - (pages - 1) * PAGE_SIZE
        else:
            run = 0
        probe += PAGE_SIZE
    raise PagingError(f"no {pages} unmapped guest-virtual pages near {start:#x}")


def _check_unmapped(mem, cr3: int, va: int) -> None:
    table = cr3 & PTE_ADDR
    for level in range(4):
        e = _entry(mem, table, _index(va, level))
        if not e & PTE_P:
            return
        if level == 3 or (level in (1, 2) and e & PTE_PS):
            what = "a 4 KiB page" if level == 3 else \
                f"a {_LEVEL_SIZES[level] >> 20} MiB page of the {_LEVEL_NAMES[level]}"
            raise PagingError(f"virt_map: guest-virtual {va:#x} is already mapped (by {what}, "
                              f"to {translate(mem, cr3, va):#x})")
        table = e & PTE_ADDR


class PageAllocator:
    """Free 4 KiB guest-physical pages, handed out from the top of RAM down (as ``kvm_util``
    takes page-table and data pages from memory the guest image does not use).

    ``ram``: [(start, end)) ranges of guest RAM; ``taken``: [(start, end)) ranges already used
    (the image, the VMM's boot structures, modules). Pages are never handed out twice."""

    def __init__(self, ram: Sequence[Tuple[int, int]], taken: Sequence[Tuple[int, int]] = ()):
        self._free: List[Tuple[int, int]] = []             # page-aligned, by address
        cuts = sorted((a, b) for a, b in taken if b > a)
        for lo, hi in sorted(ram):
            lo = (lo + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1)
            hi &= ~(PAGE_SIZE - 1)
            pieces = [(lo, hi)] if hi > lo else []
            for c0, c1 in cuts:
                c0 &= ~(PAGE_SIZE - 1)
                c1 = (c1 + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1)
                nxt = []
                for a, b in pieces:
                    if c1 <= a or b <= c0:
                        nxt.append((a, b))
                        continue
                    if a < c0:
                        nxt.append((a, c0))
                    if c1 < b:
                        nxt.append((c1, b))
                pieces = nxt
            self._free += pieces
        self._free.sort()

    @property
    def free_bytes(self) -> int:
        """Bytes still free."""
        return sum(b - a for a, b in self._free)

    def alloc(self, pages: int = 1) -> int:
        """The guest-physical address of ``pages`` contiguous free 4 KiB pages, the highest
        such run. Raises :class:`PagingError` when no free range is that large, ValueError for
        ``pages`` < 1."""
        if not isinstance(pages, int) or pages < 1:
            raise ValueError(f"allocate at least one page, not {pages!r}")
        n = pages * PAGE_SIZE
        for i in range(len(self._free) - 1, -1, -1):
            a, b = self._free[i]
            if b - a >= n:
                self._free[i] = (a, b - n)
                if b - n == a:
                    del self._free[i]
                return b - n
        raise PagingError(f"no {pages} free contiguous guest pages left ({self.free_bytes:#x} "
                          f"bytes free in all): give the guest more memory")
