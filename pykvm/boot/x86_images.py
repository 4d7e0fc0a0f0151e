"""Putting an x86 image into a machine's RAM: the image where it is linked, multiboot modules,
the multiboot information and the VMM's own boot structures where the image is not.

The rules (docs/guest-abi.md, "Memory layout"):

* the image may use any RAM the platform does not claim — below 1 MiB too (a multiboot kernel
  linked at 0x8000 is fine, and so is one with bytes in the EBDA [0x9FC00, 0xA0000), which is
  RAM on QEMU's pc: its multiboot option ROM copies a ``-kernel`` image there, and pykvm keeps
  nothing of its own there); the PC machine claims [0xA0000, 1 MiB)
  (:data:`pykvm.arch.x86.layout.PC_NO_RAM_FOR_IMAGES`: the legacy video window, the option-ROM
  and BIOS shadow, where pykvm keeps its ACPI tables);
* image bytes that fall in a claimed range are not loaded, as QEMU's pc loses the bytes of a
  ``-kernel`` image that land in its VGA window and write-protected BIOS shadow: GNU ld's
  default layout for a kernel linked at 1 MiB starts with a read-only LOAD segment a page below
  1 MiB that holds only the ELF and program headers, and such kernels boot. The platform's
  tables stay intact. An image whose entry point (or ``pykvm_params``) lies in a claimed range
  cannot work there and is refused;
* pykvm's own placements (modules, the multiboot information, boot structures) use only RAM
  the E820 map calls usable, so they never land in the EBDA or another reserved range;
* multiboot modules (QEMU's ``-initrd a,b args``) go page-aligned right after the image, in the
  order given, each with its string ("file args"), as QEMU's multiboot loader places them; they
  are streamed into guest RAM (:class:`pykvm.InputFile`: holes and zero chunks commit no
  host memory);
* the multiboot information goes at 0x9000 when that is free, else after the modules;
* the GDT, TSS, page tables (long mode) and boot stacks keep the classic layout
  (:mod:`pykvm.arch.x86.layout`) when it is free, else move as a block to the first free
  64 KiB-aligned window below 4 GiB.

Nothing is written before every placement has been checked; failures are
:class:`pykvm.LoadError`.
"""
from __future__ import annotations

import contextlib
import os

from .._record import field, Record
from ..arch.x86 import layout as L
from ..errors import PykvmError
from .elf import PARAMS_SIZE, _params_symbol
from .formats import parse_image
from .image import InputFile, LoadedImage, LoadError, LoadPlan, Segment, _read_image, write_plan
from .multiboot import E820_RAM, MULTIBOOT_BOOT_MAGIC, build_multiboot_info, initrd_module_path

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import List, Optional, Sequence, Tuple

    Range = Tuple[int, int]

PAGE = 0x1000
FOUR_GIB = 1 << 32


def _overlaps(a: Range, b: Range) -> bool:
    return a[0] < b[1] and b[0] < a[1]


class _Space:
    """Free-space bookkeeping over RAM ranges: what is taken, what is free."""

    def __init__(self, ram: Sequence[Range], taken: Sequence[Range] = ()):
        self.ram = sorted(ram)
        self.taken: List[Range] = [r for r in taken if r[1] > r[0]]

    def in_ram(self, r: Range) -> bool:
        return any(lo <= r[0] and r[1] <= hi for lo, hi in self.ram)

    def free(self, r: Range) -> bool:
        return self.in_ram(r) and not any(_overlaps(r, t) for t in self.taken)

    def take(self, r: Range) -> None:
        if r[1] > r[0]:
            self.taken.append(r)

    def alloc(self, size: int, align: int = PAGE, lo: int = 0, hi: int = FOUR_GIB) -> int:
        """The lowest ``align``-aligned address >= ``lo`` where ``size`` free bytes fit below
        ``hi``; raises LoadError if there is none."""
        size = max(size, 1)
        starts = sorted({lo} | {t[1] for t in self.taken} | {r[0] for r in self.ram})
        for s in starts:
            a = max(s, lo)
            a = (a + align - 1) // align * align
            for _ in range(64):                  # step past whatever is in the way
                r = (a, a + size)
                if r[1] > hi:
                    break
                if self.free(r):
                    return a
                blocker = [t[1] for t in self.taken if _overlaps(r, t)]
                if not blocker:
                    break                        # not in RAM here: try the next start
                a = (max(blocker) + align - 1) // align * align
        raise LoadError(f"no room for {size:#x} bytes of boot data in guest RAM below "
                               f"{hi:#x}; give the guest more --mem")


class PlacedImage(Record):
    """What :func:`load` did: the loader's view plus where pykvm put its own things.
    ``dropped``: [(start, end)) guest-physical ranges of image segments that were not loaded
    because the platform claims them or (multiboot images) because no RAM is there (see the
    module docstring)."""
    loaded: "LoadedImage"
    layout: L.BootLayout
    modules: List[Tuple[int, int, str]] = field(default_factory=list)
    cmdline: str = ""
    dropped: List[Range] = field(default_factory=list)


def _claimed_by(claimed: Sequence[Range], addr: int, n: int = 1) -> Optional[Range]:
    """The first claimed range that [addr, addr + n) overlaps, or None."""
    for c in claimed:
        if _overlaps((addr, addr + max(n, 1)), c):
            return c
    return None


def clip_segments(segments: Sequence["Segment"], claimed: Sequence[Range]):
    """Split ``segments`` around the ``claimed`` ranges: (the pieces outside every claimed
    range, as :class:`pykvm.Segment` objects that keep their file bytes, zero-fill and
    virtual addresses; the [start, end) ranges left out). Work is linear in segments times
    claimed ranges."""
    kept, dropped = [], []
    cuts = sorted(c for c in claimed if c[1] > c[0])
    for s in segments:
        pieces = [(s.addr, s.end)]
        for c0, c1 in cuts:
            nxt = []
            for a, b in pieces:
                if not _overlaps((a, b), (c0, c1)):
                    nxt.append((a, b))
                    continue
                dropped.append((max(a, c0), min(b, c1)))
                if a < c0:
                    nxt.append((a, c0))
                if c1 < b:
                    nxt.append((c1, b))
            pieces = nxt
        if pieces == [(s.addr, s.end)]:
            kept.append(s)
            continue
        for a, b in pieces:
            lo, hi = a - s.addr, b - s.addr
            data = s.data[min(lo, s.filesz):min(hi, s.filesz)]
            vaddr = None if s.vaddr is None else s.vaddr + lo
            kept.append(Segment(a, data, b - a, s.flags, vaddr, s.index))
    return kept, dropped


def _holes(ram: Sequence[Range]) -> List[Range]:
    """The [start, end) ranges of the 64-bit guest-physical space that ``ram`` leaves out."""
    out, pos = [], 0
    for lo, hi in sorted(ram):
        if lo > pos:
            out.append((pos, lo))
        pos = max(pos, hi)
    if pos < 1 << 64:
        out.append((pos, 1 << 64))
    return out


def _module_items(initrd) -> List[Tuple[str, str]]:
    """(file name, module string) per ``initrd`` item, by QEMU's rule
    (:func:`pykvm.initrd_module_path`)."""
    out = []
    for item in initrd:
        text = os.fspath(item) if not isinstance(item, str) else item
        out.append((initrd_module_path(text), text))
    return out


def load(mem, image, *, cmdline: str = "", initrd: Sequence[str] = (),
         name: Optional[str] = None, ram: Sequence[Range], memory_map,
         claimed: Sequence[Range] = (), flat_addr: Optional[int] = None,
         flat_mode: str = "real", boot_vcpus: int = 1, ram_top: int = 0) -> PlacedImage:
    """Load ``image`` (a path or bytes) into ``mem``.

    ``ram``: the guest's RAM ranges; ``memory_map``: the E820 map the guest is told about;
    ``claimed``: ranges the platform owns (image bytes there are not loaded; an entry point
    there is refused); ``boot_vcpus``: how
    many vCPUs start at the entry (each needs a boot stack); ``ram_top``: the end of the highest
    RAM (how much a long-mode boot identity-maps). Multiboot images get the command line
    ``"<name> <cmdline>"`` (the image's file name first, as QEMU and GRUB pass it) and one module
    per ``initrd`` item."""
    low_ram = max((hi for lo, hi in ram if lo == 0), default=0)
    # the file may be larger than RAM (an ELF with debug information, as QEMU boots it): what
    # is loaded must fit RAM, and no file over MAX_IMAGE_SIZE is read
    data = _read_image(image)
    plan = parse_image(data, arch="x86_64", flat_addr=flat_addr, flat_mode=flat_mode,
                              max_size=len(data))
    space = _Space(ram, claimed)
    # the VMM's own placements keep to E820 RAM (the image's bytes may use the EBDA, as on QEMU)
    for base, length, kind in memory_map or ():
        if kind != E820_RAM:
            space.take((base, base + length))
    shown_ram = ', '.join(f'[{a:#x}, {b:#x})' for a, b in ram)
    segments, beyond = plan.segments, []
    if plan.multiboot is not None:
        # QEMU's multiboot loader copies the image to its load address through fw_cfg (and
        # its ELF ROM blobs at reset): bytes that land where the pc has no RAM are lost and the
        # kernel boots (a bss_end_addr or p_memsz past the end of RAM is common in hand-made
        # images). The same here: what lies outside RAM is not loaded.
        segments, beyond = clip_segments(plan.segments, _holes(ram))
    for s in segments:
        if not space.in_ram((s.addr, s.end)):
            raise LoadError(f"{s.describe()} is outside guest RAM ({shown_ram})")
    if not any(s.addr <= plan.entry < s.end for s in segments):
        raise LoadError(f"entry point {plan.entry:#x} is outside guest RAM "
                               f"({shown_ram}); the image bytes there cannot be loaded")
    c = _claimed_by(claimed, plan.entry)
    if c is not None:
        raise LoadError(f"entry point {plan.entry:#x} lies in [{c[0]:#x}, {c[1]:#x}), "
                               f"which the platform uses (video window, option ROM/BIOS "
                               f"area, ACPI tables): image bytes there are not loaded, as on "
                               f"QEMU's pc")
    kept, dropped = clip_segments(segments, claimed)
    dropped = sorted(dropped + beyond)
    image_ranges = [(s.addr, s.end) for s in segments]
    for s in kept:
        space.take((s.addr, s.end))
    multiboot = plan.multiboot is not None
    if initrd and not multiboot:
        raise LoadError("--initrd modules need a multiboot image (or a Linux bzImage)")

    # modules, page-aligned after the image, in order
    with contextlib.ExitStack() as files:
        return _place(mem, image, data, plan, space, kept, dropped, image_ranges, files,
                      cmdline=cmdline, initrd=initrd, name=name, claimed=claimed,
                      memory_map=memory_map, boot_vcpus=boot_vcpus, ram_top=ram_top,
                      low_ram=low_ram)


def _place(mem, image, data, plan, space, kept, dropped, image_ranges, files, *, cmdline,
           initrd, name, claimed, memory_map, boot_vcpus, ram_top, low_ram) -> PlacedImage:
    """The rest of :func:`load` once the image is parsed: modules (opened into ``files``, an
    ExitStack that closes them), multiboot information, boot structures, then the writes."""
    multiboot = plan.multiboot is not None
    modules: List[Tuple[int, int, str]] = []
    blobs = []
    if multiboot:
        pos = (max(e for _, e in image_ranges) + PAGE - 1) // PAGE * PAGE
        for path, text in _module_items(initrd):
            blob = files.enter_context(InputFile(path, low_ram, "guest RAM",
                                                        what="multiboot module"))
            start = space.alloc(blob.size, PAGE, lo=pos)
            space.take((start, start + max(blob.size, 1)))
            modules.append((start, start + blob.size, text))
            blobs.append(blob)
            pos = (start + blob.size + PAGE - 1) // PAGE * PAGE

    # the multiboot information
    mbi = None
    mbi_addr = None
    mb_cmdline = ""
    if multiboot:
        label = name if name is not None else (os.fspath(image) if isinstance(
            image, (str, os.PathLike)) else "kernel")
        mb_cmdline = f"{label} {cmdline or ''}"
        probe = build_multiboot_info(low_ram, mb_cmdline, addr=0, size=1 << 20,
                                            memory_map=memory_map, modules=modules)
        size = max(L.MULTIBOOT_INFO_SIZE, (len(probe) + PAGE - 1) // PAGE * PAGE)
        mbi_addr = L.MULTIBOOT_INFO_ADDR
        if not space.free((mbi_addr, mbi_addr + size)):
            mbi_addr = space.alloc(size, PAGE, lo=modules[-1][1] if modules else 0)
        mbi = build_multiboot_info(low_ram, mb_cmdline, addr=mbi_addr, size=size,
                                          memory_map=memory_map, modules=modules)
        space.take((mbi_addr, mbi_addr + size))

    # the VMM's boot structures
    layout = L.DEFAULT_LAYOUT
    need = layout.ranges(plan.mode, boot_vcpus, ram_top)
    if need and not all(space.free(r) for r in need):
        span = L.BOOT_WINDOW_END
        base = space.alloc(span, L.BOOT_WINDOW_ALIGN, lo=L.BOOT_WINDOW_ALIGN)
        layout = L.BootLayout(base)
    for r in layout.ranges(plan.mode, boot_vcpus, ram_top):
        space.take(r)

    params = _params_symbol(image, data, plan)
    if params is not None and (_claimed_by(claimed, params, PARAMS_SIZE) or not any(
            s.addr <= params and params + PARAMS_SIZE <= s.end for s in kept)):
        params = None         # not loaded (claimed or outside RAM): the image has no parameters
    to_write = LoadPlan(plan.format, plan.arch, plan.mode, plan.entry, kept,
                               plan.multiboot)
    written = [(s.addr, s.memsz) for s in kept]
    try:
        write_plan(to_write, mem)
        for (start, end, _), blob in zip(modules, blobs):
            blob.copy_to(mem, start)
            written.append((start, end - start))
        if mbi is not None:
            mem.write(mbi_addr, mbi)
            written.append((mbi_addr, len(mbi)))
    except LoadError:
        raise
    except (ValueError, PykvmError) as e:
        raise LoadError(f"cannot write the image into guest RAM: {e}") from e
    regs = {"eax": MULTIBOOT_BOOT_MAGIC, "ebx": mbi_addr} if mbi_addr is not None else {}
    li = LoadedImage(plan, plan.entry, plan.mode, mbi_addr, params, written, regs)
    return PlacedImage(li, layout, modules, mb_cmdline, dropped)
