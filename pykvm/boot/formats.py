"""Which boot format an image is (:func:`detect`, :func:`parse_image`) and loading it into guest
RAM (:func:`load_image`): the dispatcher over the format modules."""
from __future__ import annotations

from ..arch.x86 import layout as x86_layout
from ..errors import PykvmError
from . import linux_image, linux_x86
from .elf import _params_symbol, is_elf, parse_elf
from .flat import parse_flat
from .image import ARCHES, Image, LoadedImage, LoadError, LoadPlan, _check_int, _load_errors_only, _read_image, write_plan
from .multiboot import MULTIBOOT_BOOT_MAGIC, build_multiboot_info, find_multiboot_header, parse_multiboot_aout

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Optional, Tuple


@_load_errors_only
def parse_image(image: Image, *, arch: str = "x86_64", flat_addr: Optional[int] = None,
                flat_mode: str = "real", flat_entry: Optional[int] = None,
                max_size: Optional[int] = None, ram_base: Optional[int] = None) -> LoadPlan:
    """Parse any supported image: ELF (see :func:`parse_elf`), a Linux Image (RISC-V/arm64
    header, loaded at ``ram_base`` + its text_offset: :mod:`pykvm.boot.linux_image`), a non-ELF file
    with a multiboot header using the a.out kludge, or a flat binary (needs ``flat_addr``).
    Images larger than ``max_size`` (default :data:`MAX_IMAGE_SIZE`) are refused without being
    read."""
    if arch not in ARCHES:
        raise LoadError(f"unknown architecture {arch!r} (known: {', '.join(ARCHES)})")
    data = _read_image(image, max_size, "max_size")
    if is_elf(data):
        return parse_elf(data, arch=arch)
    if linux_image.detect(data) is not None:
        return linux_image.load_plan(data, arch=arch, ram_base=ram_base)
    if arch == "x86_64":
        mb = find_multiboot_header(data)
        if mb is not None and mb.aout_kludge:
            return parse_multiboot_aout(data, mb)
    if flat_addr is None:
        raise LoadError("not an ELF file (bad magic) and no load address given for a flat "
                        "binary")
    return parse_flat(data, flat_addr, mode=flat_mode, entry=flat_entry, arch=arch)



@_load_errors_only
def load_image(mem, image: Image, *, arch: str = "x86_64", cmdline: str = "",
               flat_addr: Optional[int] = None, flat_mode: str = "real",
               flat_entry: Optional[int] = None, ram_base: int = 0,
               reserved: Optional[Tuple[int, int]] = "default",
               multiboot_info_addr: int = x86_layout.MULTIBOOT_INFO_ADDR) -> LoadedImage:
    """Parse, validate and write ``image`` into ``mem``; for multiboot images also write the
    multiboot information (with ``cmdline``) at ``multiboot_info_addr``. Files larger than
    :data:`MAX_IMAGE_SIZE` are refused before they are read; a file larger than the guest RAM
    boots when what it loads fits (an ELF with debug information). Every check runs before the first write, so a
    :class:`LoadError` leaves guest memory as it was. ``LoadedImage.written`` lists the ranges
    written."""
    ram_size = mem.size
    _check_int("RAM size", ram_size)
    data = _read_image(image)              # what is loaded must fit RAM (validate, below)
    plan = parse_image(data, arch=arch, flat_addr=flat_addr, flat_mode=flat_mode,
                       flat_entry=flat_entry, max_size=len(data),      # already bounded
                       ram_base=ram_base)
    plan.validate(ram_size, ram_base=ram_base, reserved=reserved)
    mbi_addr = None
    mbi = None
    if plan.multiboot is not None:
        _check_int("multiboot information address", multiboot_info_addr)
        mbi = build_multiboot_info(ram_size, cmdline, addr=multiboot_info_addr)
        if not ram_base <= multiboot_info_addr or \
                multiboot_info_addr + len(mbi) > ram_base + ram_size:
            raise LoadError(f"guest RAM ({ram_size:#x} bytes) too small for the multiboot "
                            f"information at {multiboot_info_addr:#x}")
        for s in plan.segments:
            if s.addr < multiboot_info_addr + len(mbi) and multiboot_info_addr < s.end:
                raise LoadError(f"{s.describe()} overlaps the multiboot information at "
                                f"{multiboot_info_addr:#x}")
        mbi_addr = multiboot_info_addr
    params = _params_symbol(image, data, plan)
    written = [(s.addr, s.memsz) for s in plan.segments]
    try:
        write_plan(plan, mem)
        if mbi is not None:
            mem.write(mbi_addr, mbi)
            written.append((mbi_addr, len(mbi)))
    except (PykvmError, ValueError) as e:     # the memory object disagrees with its size
        raise LoadError(f"cannot write the image into guest RAM: {e}") from e
    regs = {"eax": MULTIBOOT_BOOT_MAGIC, "ebx": mbi_addr} if mbi_addr is not None else {}
    return LoadedImage(plan, plan.entry, plan.mode, mbi_addr, params, written, regs)


def detect(head: bytes, *, arch: str = "x86_64") -> str:
    """The boot format of an image from its first bytes (8 KiB is enough: a multiboot header
    lies in the first 8192 bytes, the Linux setup header and Image header earlier): "linux-x86"
    (a bzImage, Linux boot protocol 2.12+), "multiboot" (an ELF32 with a multiboot header, or
    any file whose header uses the a.out kludge), "elf", "linux-image" (RISC-V/arm64 Image) or
    "flat" (anything else). Never raises for malformed bytes: the loader reports those."""
    head = bytes(head[:MULTIBOOT_SEARCH])
    if arch == "x86_64" and len(head) >= 0x210 and linux_x86.is_bzimage(head[:0x210]):
        return "linux-x86"
    if arch == "x86_64":
        try:
            mb = find_multiboot_header(head)
        except LoadError:
            mb = None
        if mb is not None and (mb.aout_kludge or (is_elf(head) and len(head) > 4
                                                  and head[4] == 1)):      # ELFCLASS32
            return "multiboot"
    if is_elf(head):
        return "elf"
    if linux_image.detect(head) is not None:
        return "linux-image"
    return "flat"


MULTIBOOT_SEARCH = 8192
