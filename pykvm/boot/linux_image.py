"""Linux boot-image headers: recognising a kernel image and planning where it goes.

Today: the 64-byte header that RISC-V and arm64 ``Image`` files start with (Linux
``Documentation/arch/riscv/boot-image-header.rst`` and ``Documentation/arch/arm64/booting.rst``).
Both share one shape::

    offset  size  RISC-V                      arm64
    0       4     code0 (jump over header)    code0
    4       4     code1                       code1
    8       8     text_offset                 text_offset
    16      8     image_size                  image_size
    24      8     flags                       flags (bit 0: big-endian, bits 1-2: page size,
                                                     bit 3: may load anywhere in RAM)
    32      4     version (major << 16 | minor)   res2 (u64)
    36      4     res1
    40      8     res2                        res3 (u64)
    48      8     magic "RISCV\\0\\0\\0"        res4 (u64)
            (deprecated since header 0.2)
    56      4     magic2 "RSC\\x05"            magic "ARM\\x64"
    60      4     res3                        res5 (PE/COFF offset)

All fields are little-endian. The kernel is loaded at a 2 MiB aligned RAM base plus
``text_offset`` and occupies ``image_size`` bytes from there (its BSS and early stacks included,
so ``image_size`` — not the file size — decides whether it fits); it is entered at its first
byte with the DTB address in a register (RISC-V: a0 = hart id, a1 = DTB; arm64: x0 = DTB).
Old arm64 images (before Linux 3.17) have ``image_size`` 0 and ``text_offset`` 0x80000: the
file size is used then.

Other boot headers (the x86 bzImage setup header) belong beside this one: :func:`detect` names
the kind of header a file has, :func:`plan_image` turns it into a loader plan.
"""
from __future__ import annotations

import struct

from .._record import Record
from .image import LoadError, LoadPlan, Segment

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Optional

__all__ = ["HEADER_SIZE", "LinuxImageHeader", "detect", "parse_header", "load_plan", "plan_image"]

HEADER_SIZE = 64
RISCV_MAGIC = b"RISCV\0\0\0"      # at 48; deprecated, kept by every image so far
RISCV_MAGIC2 = b"RSC\x05"         # at 56
ARM64_MAGIC = b"ARM\x64"          # at 56
_HDR = struct.Struct("<IIQQQIIQ8s4sI")
# The kernel's image must start this aligned in RAM (both architectures); pykvm's RAM bases are.
IMAGE_ALIGN = 2 << 20
# A sanity bound on text_offset + image_size: nothing booted here is larger.
MAX_SPAN = 1 << 40

# Linux Image architecture -> pykvm architecture name (the loader's ``arch``)
_ARCH = {"riscv64": "riscv64", "arm64": "arm64"}


class LinuxImageHeader(Record, frozen=True, slots=True):
    """A parsed Image header. ``arch``: "riscv64" or "arm64"; ``image_size``: as declared (0 on
    old arm64 images); ``version``: (major, minor) of a RISC-V header, None for arm64."""
    arch: str
    code0: int
    code1: int
    text_offset: int
    image_size: int
    flags: int
    version: Optional[tuple]

    @property
    def big_endian(self) -> bool:
        """arm64 flags bit 0: a big-endian kernel (RISC-V defines no such bit)."""
        return self.arch == "arm64" and bool(self.flags & 1)

    def span(self, file_size: int) -> int:
        """Bytes the kernel occupies from its load address: ``image_size``, or the file size
        when that is larger or ``image_size`` is 0 (old arm64 images)."""
        return max(self.image_size, file_size)

    def describe(self) -> str:
        """A one-line summary for messages: the architecture, the header version if it has one, and
        ``text_offset`` and ``image_size`` (bytes) in hex."""
        v = f" v{self.version[0]}.{self.version[1]}" if self.version else ""
        return (f"{self.arch} Linux Image{v} (text_offset {self.text_offset:#x}, image_size "
                f"{self.image_size:#x})")


def detect(data) -> Optional[str]:
    """The kind of Linux boot header ``data`` starts with: "riscv64" or "arm64" (an Image
    header), or None."""
    b = bytes(data[:HEADER_SIZE])
    if len(b) < HEADER_SIZE:
        return None
    if b[56:60] == RISCV_MAGIC2 or b[48:56] == RISCV_MAGIC:
        return "riscv64"
    if b[56:60] == ARM64_MAGIC:
        return "arm64"
    return None


def parse_header(data) -> Optional[LinuxImageHeader]:
    """The Image header at the start of ``data``, or None if there is none. Raises ValueError
    for a header whose fields cannot describe a kernel (the message names the field)."""
    arch = detect(data)
    if arch is None:
        return None
    code0, code1, text_offset, image_size, flags, ver, _res1, _res2, _magic, _magic2, _res3 = \
        _HDR.unpack_from(bytes(data[:HEADER_SIZE]))
    version = None
    if arch == "riscv64":
        version = (ver >> 16, ver & 0xFFFF)
    if text_offset % 4096:
        raise ValueError(f"{arch} Linux Image: text_offset {text_offset:#x} is not page-aligned")
    if text_offset + image_size > MAX_SPAN:
        raise ValueError(f"{arch} Linux Image: text_offset {text_offset:#x} + image_size "
                         f"{image_size:#x} is implausibly large")
    if arch == "arm64" and flags & 1:
        raise ValueError("arm64 Linux Image is big-endian (flags bit 0); only little-endian "
                         "kernels are supported")
    return LinuxImageHeader(arch, code0, code1, text_offset, image_size, flags, version)


# The RAM base of QEMU's ``virt`` machine per architecture, for callers that do not give one.
DEFAULT_RAM_BASE = {"riscv64": 0x80000000, "arm64": 0x40000000}


def load_plan(data, *, arch: str, ram_base: Optional[int] = None):
    """The loader's entry (``pykvm.boot.parse_image``): parse the header of ``data`` and plan
    it for a machine of ``arch`` whose RAM starts at ``ram_base`` (default: QEMU ``virt``'s).
    Raises :class:`pykvm.boot.LoadError` for a bad header or another architecture's
    kernel."""
    try:
        header = parse_header(data)
    except ValueError as e:
        raise LoadError(str(e)) from e
    if header is None:
        raise LoadError("not a Linux Image (no header magic)")
    if header.arch != arch:
        raise LoadError(f"{header.describe()} cannot boot on {arch}")
    base = DEFAULT_RAM_BASE.get(arch, 0) if ram_base is None else ram_base
    return plan_image(data, header, ram_base=base)


def plan_image(data, header: LinuxImageHeader, *, ram_base: int):
    """A :class:`pykvm.boot.LoadPlan` for an Image: one segment at ``ram_base +
    text_offset`` holding the file and zero-filled up to ``image_size``, entry at its first
    byte. ``ram_base`` must be 2 MiB aligned (the boot protocols ask for it)."""
    if ram_base % IMAGE_ALIGN:
        raise LoadError(f"{header.describe()} needs a 2 MiB aligned RAM base, not {ram_base:#x}")
    view = memoryview(bytes(data) if not isinstance(data, (bytes, memoryview)) else data)
    addr = ram_base + header.text_offset
    seg = Segment(addr, view, header.span(len(view)))
    mode = "riscv" if header.arch == "riscv64" else header.arch
    return LoadPlan("linux-image", header.arch, mode, addr, [seg])
