"""Guest image loader: ELF64, ELF32 + multiboot v1 (including the a.out kludge) and flat binaries.

Loading happens in three steps, each usable on its own:

1. :func:`parse_image` turns the file into a :class:`LoadPlan` (segments, entry, boot mode);
   nothing touches guest memory yet, and every structural problem raises :class:`LoadError`.
2. :meth:`LoadPlan.validate` checks the plan against the guest's RAM (and the VMM's reserved
   window on x86).
3. :func:`write_plan` copies the segments into guest memory and zero-fills their tails.

:func:`load_image` does all three and, for multiboot images, also writes the multiboot
information structure. The memory object only needs ``size``, ``write(gpa, data)`` and
``read(gpa, n)``.

Images come from untrusted places, so the loader bounds everything it does by the size of the
input: only regular files are read, never more than :data:`MAX_IMAGE_SIZE` (a file may be
larger than the guest's RAM, as an ELF with debug information is, when what it loads fits;
the Linux boot protocol's images and initrds are held to the RAM size); the ELF header counts
are capped (:data:`MAX_PROGRAM_HEADERS`, :data:`MAX_SECTION_HEADERS`, :data:`MAX_SYMBOLS`);
each distinct symbol table is read once; segment data are views into the image, never copies per header.
Every failure is a :class:`LoadError` with a one-line message, and nothing is written to guest
memory before all checks have passed.
"""
from __future__ import annotations

import bisect
import errno
import functools
import mmap
import os
import stat
import struct
from collections import namedtuple
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Tuple, Union

from . import linux_image
from .arch.x86 import layout as x86_layout
from .errors import PykvmError

Image = Union[bytes, bytearray, memoryview, str, os.PathLike]

# Limits on what the loader accepts (see the module docstring).
MAX_IMAGE_SIZE = 1 << 30          # bytes read when the guest RAM size is not known
STREAM_CHUNK = 1 << 20            # bytes read and written at a time (host memory bound)
_MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000)    # Linux's value on x86_64/riscv64
MAX_PROGRAM_HEADERS = 1024        # Linux's binfmt_elf takes at most 64 KiB of program headers
MAX_SECTION_HEADERS = 0xFF00      # SHN_LORESERVE: the most an ELF names without escapes
MAX_SYMBOLS = 1 << 20             # symbols read in all, over every symbol table
MAX_SYMBOL_NAME = 4096            # longer names are skipped (never searched for)
PARAMS_SYMBOL = "pykvm_params"
PARAMS_SIZE = 16 * 8              # uint64_t pykvm_params[16] (docs/guest-abi.md)

# ELF constants (from the ELF specification)
_ELF_MAGIC = b"\x7fELF"
_ELFCLASS32, _ELFCLASS64 = 1, 2
_ELFDATA2LSB = 1
_PT_LOAD = 1
_PF_X, _PF_W, _PF_R = 1, 2, 4
_SHT_SYMTAB, _SHT_STRTAB, _SHT_DYNSYM = 2, 3, 11
_SHN_UNDEF = 0
_ET_NAMES = {0: "ET_NONE", 1: "ET_REL", 2: "ET_EXEC", 3: "ET_DYN", 4: "ET_CORE"}
_ET_EXEC = 2
_EM_386, _EM_X86_64, _EM_RISCV = 3, 62, 243
_EM_NAMES = {_EM_386: "i386", _EM_X86_64: "x86-64", _EM_RISCV: "RISC-V", 40: "ARM",
             183: "AArch64", 8: "MIPS", 20: "PowerPC", 21: "PowerPC64", 22: "S/390"}

# Header layouts after e_ident, program headers, section headers and symbols, per ELF class.
_EHDR = {_ELFCLASS32: struct.Struct("<HHIIIIIHHHHHH"), _ELFCLASS64: struct.Struct("<HHIQQQIHHHHHH")}
_PHDR = {_ELFCLASS32: struct.Struct("<IIIIIIII"), _ELFCLASS64: struct.Struct("<IIQQQQQQ")}
_SHDR = {_ELFCLASS32: struct.Struct("<IIIIIIIIII"), _ELFCLASS64: struct.Struct("<IIQQQQIIQQ")}
_SYM = {_ELFCLASS32: struct.Struct("<IIIBBH"), _ELFCLASS64: struct.Struct("<IBBHQQ")}
_EHSIZE = {_ELFCLASS32: 52, _ELFCLASS64: 64}
_ADDR_LIMIT = {_ELFCLASS32: 1 << 32, _ELFCLASS64: 1 << 64}

_Ehdr = namedtuple("_Ehdr", "cls type machine version entry phoff shoff flags ehsize "
                            "phentsize phnum shentsize shnum shstrndx")
_Phdr = namedtuple("_Phdr", "type offset vaddr paddr filesz memsz flags")
_Shdr = namedtuple("_Shdr", "type offset size link entsize")

# multiboot v1 constants (from the multiboot specification)
MULTIBOOT_HEADER_MAGIC = 0x1BADB002
MULTIBOOT_BOOT_MAGIC = 0x2BADB002
MULTIBOOT_SEARCH_LEN = 8192
MB_HDR_PAGE_ALIGN = 1 << 0
MB_HDR_MEMORY_INFO = 1 << 1
MB_HDR_VIDEO_MODE = 1 << 2
MB_HDR_AOUT_KLUDGE = 1 << 16
# Required-feature bits 3..15 define nothing. The spec says a boot loader that does not know a
# requested bit must refuse the image; QEMU's -kernel loader (hw/i386/multiboot.c) ignores every
# flag but bits 2 (video mode: a warning) and 16 (a.out kludge), and pykvm boots what QEMU boots.
_MB_HDR_UNDEFINED = 0xFFF8

MBI_FLAG_MEM = 1 << 0
MBI_FLAG_BOOT_DEVICE = 1 << 1
MBI_FLAG_CMDLINE = 1 << 2
MBI_FLAG_MODS = 1 << 3
MBI_FLAG_MMAP = 1 << 6
MBI_FLAG_BOOT_LOADER_NAME = 1 << 9

E820_RAM = 1
E820_RESERVED = 2

# what each supported architecture accepts: ELF class -> (e_machine, boot mode)
_ARCHES = {
    "x86_64": {_ELFCLASS64: (_EM_X86_64, "long"), _ELFCLASS32: (_EM_386, "protected")},
    "riscv64": {_ELFCLASS64: (_EM_RISCV, "riscv")},
}


class LoadError(PykvmError, ValueError):
    """The image cannot be loaded; the message names the problem, on one line."""

    def __init__(self, message: str = ""):
        super().__init__(" ".join(str(message).split()))


# Exceptions that malformed input could still raise from arithmetic or unpacking in spite of the
# explicit checks; the public entry points turn them into LoadError rather than a traceback.
_INTERNAL_ERRORS = (struct.error, OverflowError, IndexError, KeyError, UnicodeError)


def _load_errors_only(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except LoadError:
            raise
        except _INTERNAL_ERRORS as e:
            raise LoadError(f"malformed image ({type(e).__name__}: {e})") from e
    return wrapper


@dataclass(frozen=True)
class Segment:
    """One piece of the image: ``data`` goes to guest-physical ``addr``; bytes from
    ``len(data)`` up to ``memsz`` are zero-filled. ``data`` is bytes-like: a read-only view
    into the image, so that no header can make the loader copy the file many times."""
    addr: int
    data: Union[bytes, memoryview]
    memsz: int
    flags: int = _PF_R | _PF_W | _PF_X
    vaddr: Optional[int] = None
    index: int = 0                    # program header index (for messages)

    @property
    def filesz(self) -> int:
        """Bytes the file supplies for this segment (the rest up to memsz is zero-filled)."""
        return len(self.data)

    @property
    def end(self) -> int:
        """Guest-physical address one past the segment's last byte (addr + memsz)."""
        return self.addr + self.memsz

    def describe(self) -> str:
        """A short name for messages, e.g. segment 1 [0x100000, 0x102000)."""
        return f"segment {self.index} [{self.addr:#x}, {self.end:#x})"


@dataclass(frozen=True)
class MultibootHeader:
    offset: int                       # file offset of the header
    flags: int
    checksum: int
    header_addr: int = 0
    load_addr: int = 0
    load_end_addr: int = 0
    bss_end_addr: int = 0
    entry_addr: int = 0
    mode_type: int = 0
    width: int = 0
    height: int = 0
    depth: int = 0

    @property
    def aout_kludge(self) -> bool:
        """True if flags bit 16 says the header's address fields (a.out kludge) give the layout."""
        return bool(self.flags & MB_HDR_AOUT_KLUDGE)

    @property
    def size(self) -> int:
        """Bytes the header occupies: 12, 32 with the address fields, 48 with the video ones."""
        return multiboot_header_size(self.flags)


@dataclass
class LoadPlan:
    """Where every byte of an image goes, the entry point and the boot mode."""
    format: str                       # "elf64", "elf32-multiboot", "elf64-multiboot-aout",
                                      # "multiboot-aout", "linux-image" or "flat"
    arch: str                         # "x86_64" or "riscv64"
    mode: str                         # "long", "protected", "real" or "riscv"
    entry: int                        # guest-physical entry address
    segments: List[Segment] = field(default_factory=list)
    multiboot: Optional[MultibootHeader] = None

    @property
    def low(self) -> int:
        """Lowest guest-physical address any segment occupies (0 with no segments)."""
        return min((s.addr for s in self.segments), default=0)

    @property
    def high(self) -> int:
        """Guest-physical address one past the highest segment byte (0 with no segments)."""
        return max((s.end for s in self.segments), default=0)

    def validate(self, ram_size: int, *, ram_base: int = 0,
                 reserved: Optional[Tuple[int, int]] = "default") -> None:
        """Check every segment against RAM ``[ram_base, ram_base + ram_size)`` and against the
        ``reserved`` window (default: the x86 VMM window, except for real-mode images;
        ``None``: no reserved window). Raises :class:`LoadError`."""
        validate_plan(self, ram_size, ram_base=ram_base, reserved=reserved)


@dataclass
class LoadedImage:
    """What :func:`load_image` did."""
    plan: LoadPlan
    entry: int
    mode: str
    multiboot_info: Optional[int] = None    # address of the multiboot info (EBX), if any
    params_addr: Optional[int] = None       # guest-physical address of ``pykvm_params``, if any
    written: List[Tuple[int, int]] = field(default_factory=list)   # (gpa, length) written

    @property
    def boot_regs(self) -> dict:
        """Register values the boot protocol asks for (multiboot: EAX and EBX)."""
        if self.multiboot_info is not None:
            return {"eax": MULTIBOOT_BOOT_MAGIC, "ebx": self.multiboot_info}
        return {}


# ---- input ----------------------------------------------------------------------------------

def _file_kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISBLK(mode):
        return "a block device"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "a special file"


def _too_big(what: str, size: int, limit: int, limit_name: str) -> LoadError:
    return LoadError(f"{what} is too large: {size:#x} bytes, more than {limit_name} "
                     f"({limit:#x} bytes)")


def _open_regular(image, what: str):
    """(fd, fstat result, the name for messages) of the regular file ``image`` names, opened
    read-only. Raises :class:`LoadError` for anything that is not a readable regular file."""
    if not isinstance(image, (str, os.PathLike)):
        raise LoadError(f"{what} must be bytes or a path, not {type(image).__name__}")
    shown = repr(image)
    try:
        path = os.fspath(image)
        shown = repr(path)
        # Look before opening (opening some devices has side effects), then check the opened
        # file again: O_NONBLOCK keeps a FIFO without a writer from blocking the open.
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            raise LoadError(f"{what} {shown} is {_file_kind(st.st_mode)}, not an image file")
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    except (OSError, ValueError, TypeError) as e:
        if isinstance(e, LoadError):
            raise
        why = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise LoadError(f"cannot read {what} {shown}: {why}") from e
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise LoadError(f"{what} {shown} is {_file_kind(st.st_mode)}, not an image file")
    except BaseException as e:
        os.close(fd)
        if isinstance(e, OSError):
            raise LoadError(f"cannot read {what} {shown}: {e.strerror or e}") from e
        raise
    return fd, st, shown


def _read_to_eof(fd: int, limit: int, what: str, limit_name: str) -> bytes:
    """The bytes of ``fd`` up to EOF, reading one byte past ``limit`` at most (for files whose
    st_size is 0 or wrong: /proc, a file growing under us)."""
    chunks, total = [], 0
    while total <= limit:
        chunk = os.read(fd, min(STREAM_CHUNK, limit + 1 - total))
        if not chunk:
            break
        chunks.append(chunk)
        total += len(chunk)
    if total > limit:
        raise _too_big(what, total, limit, limit_name)
    return b"".join(chunks)


def _data_extents(fd: int, size: int) -> Iterator[Tuple[int, int]]:
    """[start, end) file ranges of ``fd`` below ``size`` that may hold data, in order: the
    file system's extents (``lseek`` SEEK_DATA/SEEK_HOLE, lseek(2)) where it reports them,
    else the whole file. Holes between them read as zeros."""
    seek_data = getattr(os, "SEEK_DATA", None)
    seek_hole = getattr(os, "SEEK_HOLE", None)
    if seek_data is None or seek_hole is None:
        if size:
            yield 0, size
        return
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, seek_data)
        except OSError as e:
            if e.errno == errno.ENXIO:        # no data at or after pos
                return
            yield pos, size                   # SEEK_DATA not supported: all of it is data
            return
        if start >= size:
            return
        try:
            end = min(os.lseek(fd, start, seek_hole), size)
        except OSError:
            end = size
        if end <= start:                      # a file changing under us: take the rest as data
            end = size
        yield start, end
        pos = end


def _chunks_of(start: int, end: int, chunk: int) -> Iterator[Tuple[int, int]]:
    """(offset, length) pieces of [start, end) that end on ``chunk`` boundaries."""
    pos = start
    while pos < end:
        k = min(end, (pos // chunk + 1) * chunk) - pos
        yield pos, k
        pos += k


def _pread_exact(fd: int, n: int, off: int, what: str) -> bytes:
    out = os.pread(fd, n, off)
    if len(out) != n:
        raise LoadError(f"{what} changed while it was read (it ends at {off + len(out):#x}, "
                        f"it had {off + n:#x} bytes or more)")
    return out


def _is_zero(chunk) -> bool:
    """True if bytes-like ``chunk`` holds only zero bytes (one bounded copy and compare)."""
    b = bytes(chunk)
    return not b or (b[0] == 0 and b == bytes(len(b)))


def _map_file(fd: int, size: int, what: str) -> mmap.mmap:
    """The first ``size`` bytes of ``fd`` in a private anonymous mapping: only the file's data
    extents are read (holes stay untouched pages), in :data:`STREAM_CHUNK` pieces, and a piece
    that turns out all zeros is not stored (the untouched pages read as zeros), so host memory
    follows the file's non-zero bytes, not its size."""
    try:
        m = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_NORESERVE)
    except (OSError, OverflowError, ValueError) as e:
        raise LoadError(f"cannot map {size:#x} bytes for {what}: "
                        f"{getattr(e, 'strerror', None) or e}") from e
    for lo, hi in _data_extents(fd, size):
        for off, k in _chunks_of(lo, hi, STREAM_CHUNK):
            data = _pread_exact(fd, k, off, what)
            if _is_zero(data):
                continue                      # the mapping already reads as zeros there
            m[off:off + k] = data
    return m


def _read_image(image: Image, limit: Optional[int] = None,
                limit_name: str = "guest RAM", what: str = "guest image"):
    """The image's bytes: ``bytes`` (or the ``mmap`` given), or for a file larger than
    :data:`STREAM_CHUNK` a private anonymous ``mmap`` that holds only its non-zero data
    (:func:`_map_file`: a 1 GiB file of mostly zeros costs host memory for its non-zero
    bytes only). Paths must name regular files; nothing larger than ``limit`` (the guest RAM
    size when known, else :data:`MAX_IMAGE_SIZE`) is read. Raises :class:`LoadError`."""
    if limit is None or limit > MAX_IMAGE_SIZE:
        # never more than MAX_IMAGE_SIZE, however large the RAM
        limit, limit_name = MAX_IMAGE_SIZE, "the loader's limit MAX_IMAGE_SIZE"
    _check_int("size limit", limit)
    limit = max(0, limit)
    if isinstance(image, (bytes, bytearray, memoryview, mmap.mmap)):
        n = image.nbytes if isinstance(image, memoryview) else len(image)
        if n > limit:
            raise _too_big(what, n, limit, limit_name)
        return image if type(image) in (bytes, mmap.mmap) else bytes(image)
    if not isinstance(image, (str, os.PathLike)):
        raise LoadError(f"{what} must be bytes or a path, not {type(image).__name__}")
    fd, st, shown = _open_regular(image, what)
    try:
        if st.st_size > limit:
            raise _too_big(f"{what} {shown}", st.st_size, limit, limit_name)
        if st.st_size <= STREAM_CHUNK:
            return _read_to_eof(fd, limit, f"{what} {shown}", limit_name)
        m = _map_file(fd, st.st_size, f"{what} {shown}")
        if os.pread(fd, 1, st.st_size):
            raise LoadError(f"{what} {shown} changed while it was read (it grew past "
                            f"{st.st_size:#x} bytes)")
        return m
    except OSError as e:
        raise LoadError(f"cannot read {what} {shown}: {e.strerror or e}") from e
    finally:
        os.close(fd)


class InputFile:
    """A loader input that goes into guest RAM whole — a multiboot module, a Linux initrd —
    opened but not read: :attr:`size` is known at once, :meth:`copy_to` streams the bytes into
    guest memory in :data:`STREAM_CHUNK` pieces, skipping the file's holes and turning all-zero
    pieces into :func:`zero_fill`, so host memory stays bounded by the chunk size (plus the
    guest pages that get non-zero bytes) whatever the file's size. A path must name a regular
    file of at most ``limit`` bytes (``limit_name`` names that limit in messages); bytes-like
    sources are taken as they are. Files whose ``st_size`` is 0 (``/proc``) are read whole,
    bounded by ``limit``. Raises :class:`LoadError`; use as a context manager or call
    :meth:`close`."""

    def __init__(self, source, limit: int, limit_name: str = "guest RAM",
                 what: str = "initrd"):
        _check_int("size limit", limit)
        self.what = what
        self._fd = None
        self._data = None
        if isinstance(source, (bytes, bytearray, memoryview, mmap.mmap)):
            self._data = memoryview(source).cast("B")
            self.name = "<bytes>"
            if len(self._data) > limit:
                raise _too_big(what, len(self._data), limit, limit_name)
            self.size = len(self._data)
            return
        fd, st, shown = _open_regular(source, what)
        self.name = shown
        try:
            if st.st_size > limit:
                raise _too_big(f"{what} {shown}", st.st_size, limit, limit_name)
            if st.st_size == 0:
                self._data = memoryview(_read_to_eof(fd, max(0, limit), f"{what} {shown}",
                                                     limit_name))
                os.close(fd)
                fd = None
                self.size = len(self._data)
            else:
                self.size = st.st_size
        except OSError as e:
            os.close(fd)
            raise LoadError(f"cannot read {what} {shown}: {e.strerror or e}") from e
        except BaseException:
            if fd is not None:
                os.close(fd)
            raise
        self._fd = fd

    def copy_to(self, mem, gpa: int, *, fresh: bool = False) -> None:
        """Make guest-physical ``[gpa, gpa + size)`` of ``mem`` hold the file's bytes. Holes
        and all-zero pieces are zero-filled (:func:`zero_fill`: no host memory committed), or
        left alone with ``fresh=True`` (RAM known to read as zeros already). Raises
        :class:`LoadError` if the file shrank since it was opened; ``mem``'s own errors
        (unbacked addresses) pass through."""
        if self._data is not None:
            copy_into(mem, gpa, self._data, fresh=fresh)
            return
        if self._fd is None:
            raise LoadError(f"{self.what} {self.name} is closed")
        fd, size, what = self._fd, self.size, f"{self.what} {self.name}"
        try:
            pos = 0
            for lo, hi in _data_extents(fd, size):
                if lo > pos and not fresh:
                    zero_fill(mem, gpa + pos, lo - pos)
                for off, k in _chunks_of(lo, hi, STREAM_CHUNK):
                    data = _pread_exact(fd, k, off, what)
                    if not _is_zero(data):
                        mem.write(gpa + off, data)
                    elif not fresh:
                        zero_fill(mem, gpa + off, k)
                pos = hi
            if pos < size:
                _pread_exact(fd, 1, size - 1, what)        # a hole at the end, or a shrunk file
                if not fresh:
                    zero_fill(mem, gpa + pos, size - pos)
        except OSError as e:
            raise LoadError(f"cannot read {what}: {e.strerror or e}") from e

    def close(self) -> None:
        """Close the file (idempotent)."""
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


def is_elf(data: bytes) -> bool:
    """True if ``data`` starts with the ELF magic (0x7f, ``ELF``)."""
    return bytes(data[:4]) == _ELF_MAGIC


# ---- multiboot --------------------------------------------------------------------------------

def multiboot_header_size(flags: int) -> int:
    """Bytes of a multiboot v1 header with these flags (spec §3.1.1): the magic, flags and
    checksum (12); the a.out-kludge address fields at 12..28 (flag bit 16); the video mode fields
    at 32..44 (flag bit 2; they come after the address fields whether or not those are used)."""
    if flags & MB_HDR_VIDEO_MODE:
        return 48
    if flags & MB_HDR_AOUT_KLUDGE:
        return 32
    return 12


@_load_errors_only
def find_multiboot_header(data: bytes) -> Optional[MultibootHeader]:
    """The first multiboot v1 header that lies wholly in the first 8 KiB (32-bit aligned, magic
    and checksum OK), or None. A candidate that starts in the first 8 KiB but whose header (with
    the optional fields its flags ask for) runs past byte 8192 is not a header, as the spec
    says, and the search goes on. Raises :class:`LoadError` if a header with a valid checksum is
    cut off by the end of the file."""
    data = _as_bytes(data)
    window = data[:MULTIBOOT_SEARCH_LEN]
    magic = struct.pack("<I", MULTIBOOT_HEADER_MAGIC)
    off = window.find(magic)
    while off >= 0:
        # The 12 fixed bytes must be in the file and in the window, else there is no checksum
        # to trust and this is just data.
        if off % 4 == 0 and off + 12 <= len(window):
            m, flags, csum = struct.unpack_from("<III", window, off)
            if (m + flags + csum) & 0xFFFFFFFF == 0:
                size = multiboot_header_size(flags)
                if off + size <= MULTIBOOT_SEARCH_LEN:
                    if off + size > len(window):
                        raise LoadError(f"multiboot header at offset {off:#x} is truncated "
                                        f"(flags {flags:#x} need {size} bytes, the file ends "
                                        f"at {len(data):#x})")
                    extra = [0] * 9
                    n = (size - 12) // 4
                    extra[:n] = struct.unpack_from(f"<{n}I", window, off + 12)
                    return MultibootHeader(off, flags, csum, *extra)
        off = window.find(magic, off + 1)
    return None


@_load_errors_only
def parse_multiboot_aout(data: bytes, h: MultibootHeader) -> LoadPlan:
    """A plan from a multiboot header's a.out-kludge address fields (flag bit 16)."""
    data = _as_bytes(data)
    if not 0 <= h.offset <= len(data) - 12:
        raise LoadError(f"multiboot header offset {h.offset:#x} is outside the image")
    if h.load_addr > h.header_addr:
        raise LoadError(f"multiboot header: load_addr {h.load_addr:#x} is above header_addr "
                        f"{h.header_addr:#x}")
    start = h.offset - (h.header_addr - h.load_addr)
    if start < 0:
        raise LoadError(f"multiboot header: header_addr - load_addr "
                        f"({h.header_addr - h.load_addr:#x}) is larger than the header's file "
                        f"offset ({h.offset:#x})")
    if h.load_end_addr:
        if h.load_end_addr < h.load_addr:
            raise LoadError(f"multiboot header: load_end_addr {h.load_end_addr:#x} is below "
                            f"load_addr {h.load_addr:#x}")
        size = h.load_end_addr - h.load_addr
        if start + size > len(data):
            raise LoadError(f"image truncated: multiboot load range needs {start + size:#x} "
                            f"bytes of file, it has {len(data):#x}")
    else:
        size = len(data) - start
    memsz = size
    if h.bss_end_addr:
        if h.bss_end_addr < h.load_addr + size:
            raise LoadError(f"multiboot header: bss_end_addr {h.bss_end_addr:#x} is below the "
                            f"end of the loaded data {h.load_addr + size:#x}")
        memsz = h.bss_end_addr - h.load_addr
    if h.load_addr + memsz > 1 << 32:
        raise LoadError(f"multiboot load range [{h.load_addr:#x}, {h.load_addr + memsz:#x}) "
                        f"runs past 4 GiB")
    seg = Segment(h.load_addr, memoryview(data)[start:start + size], memsz)
    if not seg.addr <= h.entry_addr < seg.end or memsz == 0:
        raise LoadError(f"entry point {h.entry_addr:#x} is outside the loaded image "
                        f"[{seg.addr:#x}, {seg.end:#x})")
    return LoadPlan("multiboot-aout", "x86_64", "protected", h.entry_addr, [seg], h)


def split_initrd_option(text: str) -> List[str]:
    """QEMU's ``-initrd`` list for multiboot, item by item (hw/i386/multiboot.c with
    ``get_opt_value``, as QEMU 7.2 runs it): items are separated by ``,``; ``,,`` stands for
    one comma inside an item ("mod1.bin a,,b,mod2.bin" -> ["mod1.bin a,b", "mod2.bin"]); a
    single ``,`` at the very end starts no item; "" is no item at all. Items are kept verbatim
    (no stripping: each is the module's string, :func:`initrd_module_path` its file), so an
    empty or blank first item is a file name QEMU cannot open either ("Failed to open file
    ''"). Raises :class:`LoadError` if ``text`` is not a string. Work is linear in its
    length."""
    if not isinstance(text, str):
        raise LoadError(f"initrd list must be a string, not {type(text).__name__}")
    items, cur, i, n = [], [], 0, len(text)
    if n == 0:
        return items
    while i < n:
        ch = text[i]
        if ch == ",":
            if i + 1 < n and text[i + 1] == ",":
                cur.append(",")
                i += 2
                continue
            items.append("".join(cur))
            cur = []
            i += 1
            if i == n:               # a trailing separator ends the list
                return items
            continue
        cur.append(ch)
        i += 1
    items.append("".join(cur))
    return items


def initrd_module_path(item: str) -> str:
    """The file name of one ``-initrd`` item: everything before its first space (QEMU's
    multiboot loader cuts at ``strchr(item, ' ')``; the rest are the module's arguments, and the
    whole item is its string). An item that starts with a space names the file ""."""
    return item.split(" ", 1)[0]


def _c_string(what: str, text) -> bytes:
    """``text`` as a NUL-terminated C string (UTF-8; ``surrogateescape`` gives back the bytes of
    a command line that came from argv undecoded)."""
    if not isinstance(text, str):
        raise LoadError(f"{what} must be a string, not {type(text).__name__}")
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError as e:
        raise LoadError(f"{what} cannot be encoded: {e.reason} at position {e.start}") from e
    if b"\0" in raw:
        raise LoadError(f"{what} contains a NUL byte at position {raw.index(0)}")
    return raw + b"\0"


@_load_errors_only
def build_multiboot_info(ram_size: int, cmdline: str = "", *,
                         addr: int = x86_layout.MULTIBOOT_INFO_ADDR,
                         size: int = x86_layout.MULTIBOOT_INFO_SIZE,
                         loader_name: str = "pykvm",
                         memory_map: Optional[List[Tuple[int, int, int]]] = None,
                         modules: List[Tuple[int, int, str]] = ()) -> bytes:
    """The multiboot information block, as QEMU's ``-kernel`` builds it, to be written at
    ``addr``: flags MEM | BOOT_DEVICE | CMDLINE | MODS | MMAP | BOOT_LOADER_NAME,
    mem_lower = the RAM entry at 0 in KiB (639), mem_upper = (RAM below 4 GiB - 1 MiB) / 1 KiB,
    an e820 memory map, the module list, the command line and the boot loader name. Everything
    fits in ``size`` bytes.

    ``memory_map``: (base, length, type) entries (default: RAM contiguous from 0, the classic
    legacy holes reserved); mem_upper is then the length of the RAM entry at 1 MiB.
    ``modules``: (start, end, string) of modules already in guest memory (multiboot spec
    3.3: mods_addr points at 16-byte entries mod_start, mod_end, string, reserved)."""
    info_len = 0x80                           # the fixed part (0x78 bytes) rounded up
    _check_int("RAM size", ram_size)
    _check_int("multiboot information address", addr)
    if not 0 <= ram_size < 1 << 64:
        raise LoadError(f"bad RAM size {ram_size:#x}")
    if not 0 <= addr or addr + size > 1 << 32:
        raise LoadError(f"multiboot information [{addr:#x}, {addr + size:#x}) must lie below "
                        f"4 GiB")
    ranges = list(memory_map) if memory_map is not None else _e820(ram_size)
    mmap = b"".join(struct.pack("<IQQI", 20, base, length, kind) for base, length, kind in ranges)
    name = _c_string("boot loader name", loader_name)
    cmd = _c_string("command line", "" if cmdline is None else cmdline)
    mod_strings = [_c_string("module string", m[2]) for m in modules]
    mmap_addr = addr + info_len
    mods_addr = mmap_addr + len(mmap)
    name_addr = mods_addr + 16 * len(modules)
    cmd_addr = name_addr + len(name)
    strings_addr = cmd_addr + len(cmd)
    total = strings_addr + sum(len(m) for m in mod_strings) - addr
    if total > size:
        what = "command line and module strings" if modules else "command line"
        raise LoadError(f"{what} too long for the multiboot information area ({total} bytes, "
                        f"room for {size})")
    # mem_lower: the RAM entry at 0 (639 KiB: the EBDA's 1 KiB below 640 KiB is reserved, as
    # QEMU's multiboot ROM reports it after SeaBIOS)
    low = min(640 * 1024, next((n for a, n, t in ranges if a == 0 and t == E820_RAM), 0))
    if memory_map is None:
        upper = max(0, min(ram_size, 4 << 30) - (1 << 20)) // 1024
    else:
        upper = next((n for a, n, t in ranges if a == 0x100000 and t == E820_RAM), 0) // 1024
    mods = bytearray()
    pos = strings_addr
    for (start, end, _), text in zip(modules, mod_strings):
        mods += struct.pack("<IIII", start, end, pos, 0)
        pos += len(text)
    info = bytearray(info_len)
    struct.pack_into("<IIIII", info, 0,
                     MBI_FLAG_MEM | MBI_FLAG_BOOT_DEVICE | MBI_FLAG_CMDLINE | MBI_FLAG_MODS |
                     MBI_FLAG_MMAP | MBI_FLAG_BOOT_LOADER_NAME,
                     low // 1024, min(upper, 0xFFFFFFFF), 0x8000FFFF, cmd_addr)
    struct.pack_into("<II", info, 20, len(modules), mods_addr if modules else mmap_addr)
    struct.pack_into("<II", info, 44, len(mmap), mmap_addr)
    struct.pack_into("<I", info, 64, name_addr)
    return bytes(info) + mmap + bytes(mods) + name + cmd + b"".join(mod_strings)


def _e820(ram_size: int) -> List[Tuple[int, int, int]]:
    """The e820 map of a pykvm x86 guest: RAM is contiguous from 0; the classic legacy holes
    (EBDA tail, BIOS area) are reported reserved."""
    out = []
    low_end = min(ram_size, 0x9FC00)
    if low_end:
        out.append((0, low_end, E820_RAM))
    if ram_size > 0x9FC00:
        out.append((0x9FC00, 0x400, E820_RESERVED))
    if ram_size > 0xF0000:
        out.append((0xF0000, 0x10000, E820_RESERVED))
    if ram_size > 0x100000:
        out.append((0x100000, ram_size - 0x100000, E820_RAM))
    return out


# ---- ELF ----------------------------------------------------------------------------------------

def _as_bytes(data) -> bytes:
    """``data`` as ``bytes``; an ``mmap`` from :func:`_read_image` is used as it is (it has
    the bytes methods the parsers use: slicing, ``find``, the buffer protocol)."""
    if type(data) is bytes or isinstance(data, mmap.mmap):
        return data
    if isinstance(data, (bytes, bytearray, memoryview)):
        return bytes(data)
    raise LoadError(f"image data must be bytes, not {type(data).__name__}")


def _elf_header(data: bytes) -> _Ehdr:
    """The ELF header of a little-endian ELF32/ELF64 file, unchecked beyond its size."""
    if len(data) < 16:
        raise LoadError(f"image truncated: {len(data)} bytes is too short for an ELF header")
    if not is_elf(data):
        raise LoadError("not an ELF file (bad magic)")
    cls, enc = data[4], data[5]
    if cls not in (_ELFCLASS32, _ELFCLASS64):
        raise LoadError(f"bad ELF class {cls}")
    if enc != _ELFDATA2LSB:
        raise LoadError("ELF file is not little-endian")
    if len(data) < _EHSIZE[cls]:
        raise LoadError(f"image truncated: {len(data)} bytes is too short for the ELF header "
                        f"({_EHSIZE[cls]} bytes)")
    return _Ehdr(cls, *_EHDR[cls].unpack_from(data, 16))


def _entries(data: bytes, what: str, off: int, count: int, entsize: int, layout: struct.Struct,
             cap: int) -> Iterator[tuple]:
    """The ``count`` table entries at ``off``, ``entsize`` bytes apart, each unpacked by
    ``layout`` (its first ``layout.size`` bytes; ELF spec: the header's e_phentsize or
    e_shentsize is the stride, and may be larger than the structure the class defines)."""
    if count > cap:
        raise LoadError(f"too many ELF {what}s: {count} (at most {cap})")
    if count == 0:
        return iter(())
    # the last entry needs only its structure's bytes in the file, not a whole stride
    end = off + (count - 1) * entsize + layout.size
    if end > len(data):
        raise LoadError(f"image truncated: {what}s end at {end:#x}, the file has "
                        f"{len(data):#x} bytes")
    return (layout.unpack_from(data, off + i * entsize) for i in range(count))


def _program_headers(data: bytes, h: _Ehdr) -> List[_Phdr]:
    """The program headers, ``e_phentsize`` bytes apart (the ELF spec's stride: at least
    sizeof(Elf32_Phdr) = 32 or sizeof(Elf64_Phdr) = 56; larger strides are legal and their
    extra bytes are skipped)."""
    if h.phnum == 0:
        raise LoadError("ELF has no program headers")
    if h.phnum > MAX_PROGRAM_HEADERS:
        raise LoadError(f"too many ELF program headers: {h.phnum} (at most "
                        f"{MAX_PROGRAM_HEADERS})")
    if h.phentsize < _PHDR[h.cls].size:
        raise LoadError(f"bad ELF program header size {h.phentsize} (e_phentsize must be at "
                        f"least {_PHDR[h.cls].size} for this ELF class)")
    out = []
    for f in _entries(data, "program header", h.phoff, h.phnum, h.phentsize, _PHDR[h.cls],
                      MAX_PROGRAM_HEADERS):
        if h.cls == _ELFCLASS32:       # type offset vaddr paddr filesz memsz flags align
            out.append(_Phdr(f[0], f[1], f[2], f[3], f[4], f[5], f[6]))
        else:                          # type flags offset vaddr paddr filesz memsz align
            out.append(_Phdr(f[0], f[2], f[3], f[4], f[5], f[6], f[1]))
    return out


def _section_headers(data: bytes, h: _Ehdr) -> List[_Shdr]:
    """The section headers ([] when there are none); extended numbering (e_shnum 0 and the count
    in section 0's sh_size) is understood, and the count is capped."""
    if h.shoff == 0:
        return []
    layout = _SHDR[h.cls]
    if h.shentsize < layout.size:
        if h.shnum == 0:
            return []
        raise LoadError(f"bad ELF section header size {h.shentsize} (e_shentsize must be at "
                        f"least {layout.size} for this ELF class)")
    shnum = h.shnum
    if shnum == 0:
        first = list(_entries(data, "section header", h.shoff, 1, h.shentsize, layout, 1))
        shnum = first[0][5]                              # sh_size of section 0
        if shnum == 0:
            return []
    # sh_name sh_type sh_flags sh_addr sh_offset sh_size sh_link sh_info sh_addralign sh_entsize
    return [_Shdr(f[1], f[4], f[5], f[6], f[9])
            for f in _entries(data, "section header", h.shoff, shnum, h.shentsize, layout,
                              MAX_SECTION_HEADERS)]


@_load_errors_only
def parse_elf(data: bytes, *, arch: str = "x86_64") -> LoadPlan:
    """A plan from an ELF executable. x86_64: ELF64 (long mode, needs p_paddr == p_vaddr) or
    ELF32 i386 with a multiboot header (protected mode, loaded by p_paddr); any ELF whose
    multiboot header sets flag bit 16 is loaded by the a.out kludge fields instead, in
    protected mode, as QEMU does. riscv64: ELF64 loaded by p_paddr.
    Segment sizes follow QEMU's ``load_elf`` (:func:`_qemu_load_sizes`); ``e_type`` must be
    ET_EXEC only for the x86-64 long-mode boot (QEMU loads any type by p_paddr).
    The work done is O(n log n) in the number of program headers, which is capped."""
    if arch not in _ARCHES:
        raise LoadError(f"unknown architecture {arch!r} (known: {', '.join(_ARCHES)})")
    data = _as_bytes(data)
    hdr = _elf_header(data)
    cls = hdr.cls
    if arch == "x86_64":
        # A multiboot header asking for the a.out kludge (flag bit 16) decides the layout of
        # any ELF, 32- or 64-bit: QEMU's -kernel (hw/i386/multiboot.c) looks at the flag before
        # the ELF headers and then loads by the header's address fields alone, entering in
        # protected mode. 64-bit kernels with a 32-bit entry stub boot under QEMU this way
        # (without the flag QEMU refuses an x86-64 ELF; pykvm boots it in long mode).
        kludge = find_multiboot_header(data)
        if kludge is not None and kludge.aout_kludge:
            plan = parse_multiboot_aout(data, kludge)
            plan.format = "elf32-multiboot" if cls == _ELFCLASS32 else "elf64-multiboot-aout"
            return plan
    allowed = _ARCHES[arch]
    if cls not in allowed:
        raise LoadError(f"{arch} cannot boot a {32 if cls == _ELFCLASS32 else 64}-bit ELF")
    want_machine, mode = allowed[cls]
    if hdr.machine != want_machine:
        got = _EM_NAMES.get(hdr.machine, f"e_machine {hdr.machine}")
        raise LoadError(f"wrong machine: {got} ELF, {arch} needs {_EM_NAMES[want_machine]}")
    # QEMU's load_elf (multiboot ELF32, RISC-V -kernel) loads any e_type by p_paddr; pykvm's
    # own identity-mapped x86-64 ELF boot (which QEMU has no counterpart of) wants ET_EXEC.
    if hdr.type != _ET_EXEC and mode == "long":
        raise LoadError(f"not an executable ELF (e_type {_ET_NAMES.get(hdr.type, hdr.type)}); "
                        f"link with a fixed address (-no-pie, -static)")
    phdrs = _program_headers(data, hdr)

    mb = None
    if arch == "x86_64" and cls == _ELFCLASS32:
        mb = find_multiboot_header(data)
        if mb is None:
            raise LoadError("32-bit ELF without a multiboot v1 header wholly inside its first "
                            "8 KiB (or its checksum is wrong)")

    view = memoryview(data)
    addr_limit = _ADDR_LIMIT[cls]
    segments = []
    memsz = _qemu_load_sizes(phdrs)
    for i, ph in enumerate(phdrs):
        if ph.type != _PT_LOAD:
            continue
        if ph.filesz > ph.memsz:
            raise LoadError(f"segment {i}: p_filesz {ph.filesz:#x} is larger than p_memsz "
                            f"{ph.memsz:#x}")
        if ph.filesz and ph.offset + ph.filesz > len(data):    # no file bytes: no p_offset
            raise LoadError(f"image truncated: segment {i} needs file bytes up to "
                            f"{ph.offset + ph.filesz:#x}, the file has {len(data):#x}")
        if memsz[i] == 0:
            continue
        if ph.paddr + memsz[i] > addr_limit:      # loaded by p_paddr; p_vaddr is not used
            raise LoadError(f"segment {i}: [{ph.paddr:#x} + {memsz[i]:#x}) wraps around the "
                            f"{'32' if cls == _ELFCLASS32 else '64'}-bit address space")
        if mode == "long" and ph.paddr != ph.vaddr:
            raise LoadError(f"segment {i}: p_paddr {ph.paddr:#x} != p_vaddr {ph.vaddr:#x}; "
                            f"64-bit x86 images run identity-mapped and must be linked that way")
        data_view = view[ph.offset:ph.offset + ph.filesz] if ph.filesz else b""
        segments.append(Segment(ph.paddr, data_view, memsz[i], ph.flags, ph.vaddr, i))
    if not segments:
        raise LoadError("ELF has no loadable (PT_LOAD) segments")
    _check_overlaps(segments)

    entry = _entry_address(phdrs, hdr.entry, addr_limit)
    if not any(s.addr <= entry < s.end for s in segments):
        shown = f"{hdr.entry:#x}" if entry == hdr.entry else \
            f"{hdr.entry:#x} (physical {entry:#x})"
        raise LoadError(f"entry point {shown} is outside every loadable segment")
    fmt = "elf32-multiboot" if mb else "elf64"
    return LoadPlan(fmt, arch, mode, entry, segments, mb)


def _entry_address(phdrs: List[_Phdr], e_entry: int, addr_limit: int) -> int:
    """The guest-physical entry of an ELF whose segments load by ``p_paddr``, by QEMU's rule
    (``load_elf`` in include/hw/elf_ops.h, used by -kernel on x86 multiboot and RISC-V):
    ``e_entry`` is translated by a ``PT_LOAD`` segment that is executable (``PF_X``), has
    ``p_vaddr != p_paddr`` and whose file bytes ``[p_vaddr, p_vaddr + p_filesz)`` hold it (the
    last such segment wins); otherwise ``e_entry`` is already physical (a higher-half kernel
    linked with ``ENTRY(_start - KERNEL_VMA)``). Arithmetic wraps at the class's address size."""
    entry = e_entry
    for ph in phdrs:
        if (ph.type == _PT_LOAD and ph.flags & _PF_X and ph.vaddr != ph.paddr and
                ph.vaddr <= e_entry < ph.vaddr + ph.filesz):
            entry = (e_entry - ph.vaddr + ph.paddr) % addr_limit
    return entry


def _virt_to_phys(segments: List[Segment], vaddr: int, n: int = 1) -> Optional[int]:
    """The guest-physical address of ``[vaddr, vaddr + n)`` if one segment holds all of it
    (segments without a virtual address are identity-mapped)."""
    for s in segments:
        base = s.addr if s.vaddr is None else s.vaddr
        if base <= vaddr and vaddr + n <= base + s.memsz:
            return s.addr + (vaddr - base)
    return None


def _qemu_load_sizes(phdrs: List[_Phdr]) -> Dict[int, int]:
    """{program header index: bytes loaded} for each PT_LOAD, by QEMU's ``load_elf``
    (include/hw/elf_ops.h), which ``-kernel`` uses for multiboot ELF kernels and RISC-V
    images: a segment whose zero-filled tail ``[p_paddr + p_filesz, p_paddr + p_memsz)``
    overlaps another PT_LOAD's ``[p_paddr, p_paddr + p_memsz)`` (as given in its header; an
    empty one counts where it lies strictly inside the tail) is taken to be zeroed at run time
    by the image itself and is loaded as ``p_filesz`` bytes; every other segment as
    ``p_memsz`` bytes. GNU ld never emits such layouts, but hand-made and embedded-style images
    (BSS given as memsz but packed behind the next segment) do, and QEMU boots them.

    Work is O(n log n) in the number of program headers: the intervals are sorted by start,
    and for each tail the largest end among the intervals starting below the tail's end is
    looked up (the two largest are kept, so the segment itself can be left out)."""
    loads = [(ph.paddr, ph.paddr + ph.memsz, i) for i, ph in enumerate(phdrs)
             if ph.type == _PT_LOAD]
    sizes = {i: phdrs[i].memsz for _, _, i in loads}
    tails = [i for i in sizes if phdrs[i].memsz > phdrs[i].filesz]
    if not tails or len(loads) < 2:
        return sizes
    loads.sort()
    starts = [a for a, _, _ in loads]
    # best[k]: ((largest end, its index), second largest end) over loads[:k + 1]
    best, top, second = [], (-1, -1), -1
    for _, end, i in loads:
        if end > top[0]:
            top, second = (end, i), top[0]
        elif end > second:
            second = end
        best.append((top, second))
    for i in tails:
        ph = phdrs[i]
        lo, hi = ph.paddr + ph.filesz, ph.paddr + ph.memsz
        k = bisect.bisect_left(starts, hi) - 1       # loads[:k + 1] start below the tail's end
        if k < 0:
            continue
        (end, who), runner_up = best[k]
        other_end = runner_up if who == i else end
        if other_end > lo:
            sizes[i] = ph.filesz
    return sizes


def _check_overlaps(segments: List[Segment]) -> None:
    """Refuse segments that overlap (after :func:`_qemu_load_sizes`). QEMU's -kernel refuses
    them as well: its ROM loader reports "Some ROM regions are overlapping", or the multiboot
    loader "Error while fetching elf kernel from rom" (hw/core/loader.c, hw/i386/multiboot.c)."""
    ordered = sorted(segments, key=lambda s: s.addr)
    for a, b in zip(ordered, ordered[1:]):
        if a.end > b.addr:
            raise LoadError(f"overlapping segments: {a.describe()} and {b.describe()} (QEMU's "
                            f"-kernel refuses them too: \"Some ROM regions are overlapping\")")


# ---- flat binaries and dispatch -------------------------------------------------------------------

def _check_int(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise LoadError(f"{name} must be an integer, not {type(value).__name__}")


@_load_errors_only
def parse_flat(data: bytes, addr: int, *, mode: str = "real", entry: Optional[int] = None,
               arch: str = "x86_64") -> LoadPlan:
    """A plan for a flat binary loaded at ``addr`` (entry defaults to ``addr``)."""
    if arch not in _ARCHES:
        raise LoadError(f"unknown architecture {arch!r} (known: {', '.join(_ARCHES)})")
    if mode not in ("real", "protected", "long", "riscv"):
        raise LoadError(f"unknown boot mode {mode!r} for a flat binary")
    _check_int("load address", addr)
    data = _as_bytes(data)
    if not data:
        raise LoadError("flat binary is empty")
    if addr < 0 or addr + len(data) > 1 << 64:
        raise LoadError(f"bad load address {addr:#x} for a {len(data):#x}-byte image")
    entry = addr if entry is None else entry
    _check_int("entry point", entry)
    seg = Segment(addr, memoryview(data), len(data))
    if not seg.addr <= entry < seg.end:
        raise LoadError(f"entry point {entry:#x} is outside the image [{seg.addr:#x}, "
                        f"{seg.end:#x})")
    if mode == "real" and seg.end > 0x100000:
        raise LoadError(f"real-mode image [{seg.addr:#x}, {seg.end:#x}) does not fit below 1 MiB")
    return LoadPlan("flat", arch, mode, entry, [seg])


@_load_errors_only
def parse_image(image: Image, *, arch: str = "x86_64", flat_addr: Optional[int] = None,
                flat_mode: str = "real", flat_entry: Optional[int] = None,
                max_size: Optional[int] = None, ram_base: Optional[int] = None) -> LoadPlan:
    """Parse any supported image: ELF (see :func:`parse_elf`), a Linux Image (RISC-V/arm64
    header, loaded at ``ram_base`` + its text_offset: :mod:`pykvm.linux_image`), a non-ELF file
    with a multiboot header using the a.out kludge, or a flat binary (needs ``flat_addr``).
    Images larger than ``max_size`` (default :data:`MAX_IMAGE_SIZE`) are refused without being
    read."""
    if arch not in _ARCHES:
        raise LoadError(f"unknown architecture {arch!r} (known: {', '.join(_ARCHES)})")
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


def _default_reserved(plan: LoadPlan) -> Optional[Tuple[int, int]]:
    if plan.arch != "x86_64" or plan.mode == "real":
        return None
    return (x86_layout.RESERVED_START, x86_layout.RESERVED_END)


@_load_errors_only
def validate_plan(plan: LoadPlan, ram_size: int, *, ram_base: int = 0,
                  reserved: Optional[Tuple[int, int]] = "default") -> None:
    """Raise :class:`LoadError` unless every segment lies in RAM, outside ``reserved``, and no two
    segments overlap."""
    _check_int("RAM size", ram_size)
    _check_int("RAM base", ram_base)
    if reserved == "default":
        reserved = _default_reserved(plan)
    ram_end = ram_base + ram_size
    for s in plan.segments:
        if s.addr < ram_base or s.end > ram_end:
            raise LoadError(f"{s.describe()} is outside guest RAM [{ram_base:#x}, {ram_end:#x})")
        if reserved and s.addr < reserved[1] and reserved[0] < s.end:
            raise LoadError(f"{s.describe()} overlaps the VMM-reserved region "
                            f"[{reserved[0]:#x}, {reserved[1]:#x}); link the image at "
                            f"{x86_layout.IMAGE_BASE:#x} or above")
    _check_overlaps(plan.segments)


def write_plan(plan: LoadPlan, mem, *, chunk: int = 1 << 20) -> None:
    """Copy every segment into guest memory and make ``memsz - filesz`` read as zeros. The plan
    must have been validated against ``mem`` (:meth:`LoadPlan.validate`).

    The zero fill commits no host memory for RAM that is already zero (a BSS or image size
    field may name most of the guest's RAM; docs/guest-abi.md): with a memory object that has
    ``zero(gpa, n)`` (:meth:`pykvm.memory.GuestMemory.zero`: whole pages dropped with
    ``madvise``), that does it; otherwise each ``chunk``-byte piece is read and written only if
    it is not all zeros already. Either way the range reads as zeros afterwards, also in RAM
    that an earlier run wrote. File bytes are copied ``chunk`` bytes at a time and all-zero
    chunks are zero-filled the same way (:func:`copy_into`), so an image of mostly zeros
    commits host memory only for its non-zero bytes."""
    for s in plan.segments:
        if s.filesz:
            copy_into(mem, s.addr, s.data, chunk=chunk)
        if s.end > s.addr + s.filesz:
            zero_fill(mem, s.addr + s.filesz, s.end - s.addr - s.filesz, chunk=chunk)


def copy_into(mem, gpa: int, data, *, chunk: int = STREAM_CHUNK, fresh: bool = False) -> None:
    """Copy bytes-like ``data`` to guest-physical ``gpa`` of ``mem``, ``chunk`` bytes at a time
    (pieces end on ``chunk`` boundaries of ``data``); a piece of zeros is zero-filled
    (:func:`zero_fill`, committing no host memory), or skipped with ``fresh=True`` (RAM known
    to read as zeros). ``mem``'s errors pass through."""
    view = memoryview(data).cast("B")
    for off, k in _chunks_of(0, len(view), max(1, chunk)):
        piece = view[off:off + k]
        if not _is_zero(piece):
            mem.write(gpa + off, piece)
        elif not fresh:
            zero_fill(mem, gpa + off, k, chunk=chunk)


def zero_fill(mem, gpa: int, n: int, *, chunk: int = 1 << 20) -> None:
    """Make guest-physical ``[gpa, gpa + n)`` of ``mem`` read as zeros, committing host memory
    only where it held something else (see :func:`write_plan`)."""
    zero = getattr(mem, "zero", None)
    if callable(zero):
        zero(gpa, n)
        return
    pos, end = gpa, gpa + n
    zeros = bytes(min(chunk, n))
    while pos < end:
        k = min(chunk, end - pos)
        want = zeros if k == len(zeros) else zeros[:k]
        if bytes(mem.read(pos, k)) != want:
            mem.write(pos, want)
        pos += k


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
    return LoadedImage(plan, plan.entry, plan.mode, mbi_addr, params, written)


def _params_symbol(image: Image, data: bytes, plan: LoadPlan) -> Optional[int]:
    """Guest-physical address of ``pykvm_params`` of an ELF image; for a flat binary given by
    path, of the ELF next to it (``guest.bin`` -> ``guest.elf``, as the guest build leaves
    them); None if there is none. The whole array must lie inside one loaded segment.

    Section headers and symbol tables do not decide whether an image boots: QEMU's
    ``load_elf`` reads symbols only for its debugger and boots an image whose tables are bad,
    so a malformed table, or a ``pykvm_params`` outside every loaded segment, means "no
    parameters" (:meth:`pykvm.machine.Machine.set_params` then says the image has none)."""
    if is_elf(data):
        try:
            value = find_symbol(data, PARAMS_SYMBOL)
        except LoadError:
            return None
        if value is None:
            return None
        return _virt_to_phys(plan.segments, value, PARAMS_SIZE)
    if isinstance(image, (str, os.PathLike)):
        try:
            elf = os.path.splitext(os.fspath(image))[0] + ".elf"
            if not os.path.isfile(elf):
                return None
            value = find_symbol(elf, PARAMS_SYMBOL)
        except (LoadError, OSError, ValueError):
            return None
        if value is None:
            return None
        return _virt_to_phys(plan.segments, value, PARAMS_SIZE)
    return None


# ---- symbols ------------------------------------------------------------------------------------

def _symbol_tables(data: bytes, h: _Ehdr) -> List[Tuple[int, _Shdr, _Shdr]]:
    """(section index, symbol table, its string table) for each distinct symbol table (by file
    offset and size), checked: in the file, right entry size, a string table that is one, and
    no two tables overlapping, so that the symbols read in all never exceed the file size."""
    shdrs = _section_headers(data, h)
    out, seen = [], set()
    for i, sh in enumerate(shdrs):
        if sh.type not in (_SHT_SYMTAB, _SHT_DYNSYM) or sh.size == 0:
            continue
        key = (sh.offset, sh.size)
        if key in seen:
            continue                          # another header for a table already listed
        seen.add(key)
        entsize = _SYM[h.cls].size
        if sh.entsize != entsize:
            raise LoadError(f"section {i}: bad symbol entry size {sh.entsize} (want {entsize})")
        if sh.size % entsize:
            raise LoadError(f"section {i}: symbol table size {sh.size:#x} is not a multiple of "
                            f"{entsize}")
        if sh.offset + sh.size > len(data):
            raise LoadError(f"image truncated: symbol table of section {i} ends at "
                            f"{sh.offset + sh.size:#x}, the file has {len(data):#x} bytes")
        if not 0 < sh.link < len(shdrs):
            raise LoadError(f"section {i}: string table index {sh.link} is not a section")
        st = shdrs[sh.link]
        if st.type != _SHT_STRTAB:
            raise LoadError(f"section {i}: its string table (section {sh.link}) is not one")
        if st.offset + st.size > len(data):
            raise LoadError(f"image truncated: string table of section {sh.link} ends at "
                            f"{st.offset + st.size:#x}, the file has {len(data):#x} bytes")
        out.append((i, sh, st))
    ordered = sorted(out, key=lambda t: t[1].offset)
    for (i, a, _), (j, b, _) in zip(ordered, ordered[1:]):
        if a.offset + a.size > b.offset:
            raise LoadError(f"symbol tables of sections {i} and {j} overlap")
    total = sum(sh.size // _SYM[h.cls].size for _, sh, _ in out)
    if total > MAX_SYMBOLS:
        raise LoadError(f"too many ELF symbols: {total} (at most {MAX_SYMBOLS})")
    return out


def _read_symbols(data: bytes, h: _Ehdr, sh: _Shdr, st: _Shdr,
                  want: Optional[bytes] = None) -> Iterator[Tuple[bytes, int]]:
    """(name, value) of the named, defined symbols of one table (only those called ``want``
    if given). A name is found with one bounded search in the string table (at most
    :data:`MAX_SYMBOL_NAME` bytes; longer or unterminated names are skipped), so the cost per
    symbol does not grow with the string table."""
    str_lo, str_hi = st.offset, st.offset + st.size
    key = None if want is None else want + b"\0"
    cls = h.cls
    for f in _SYM[cls].iter_unpack(memoryview(data)[sh.offset:sh.offset + sh.size]):
        if cls == _ELFCLASS32:             # st_name st_value st_size st_info st_other st_shndx
            name_off, value, shndx = f[0], f[1], f[5]
        else:                              # st_name st_info st_other st_shndx st_value st_size
            name_off, value, shndx = f[0], f[4], f[3]
        if name_off == 0 or shndx == _SHN_UNDEF or name_off >= st.size:
            continue
        start = str_lo + name_off
        if key is not None:
            if start + len(key) <= str_hi and data[start:start + len(key)] == key:
                yield want, value
            continue
        end = data.find(b"\0", start, min(str_hi, start + MAX_SYMBOL_NAME + 1))
        if end > start:
            yield data[start:end], value


def _symbols(image: Image, want: Optional[bytes] = None) -> Iterator[Tuple[bytes, int]]:
    data = _read_image(image)
    if not is_elf(data):
        return
    h = _elf_header(data)
    for _, sh, st in _symbol_tables(data, h):
        yield from _read_symbols(data, h, sh, st, want)


@_load_errors_only
def elf_symbols(image: Image) -> Dict[str, int]:
    """{name: value} of every named, defined symbol in the ELF's symbol tables, the first
    definition winning ({} if not an ELF). Each distinct table is read once; the symbols read
    are bounded by the file size and :data:`MAX_SYMBOLS`."""
    out: Dict[str, int] = {}
    for name, value in _symbols(image):
        out.setdefault(name.decode("utf-8", "replace"), value)
    return out


@_load_errors_only
def find_symbol(image: Image, name: str) -> Optional[int]:
    """The value (address) of symbol ``name`` in an ELF image, or None."""
    if not isinstance(name, str) or not name or "\0" in name:
        raise LoadError(f"bad symbol name {name!r}")
    for _, value in _symbols(image, name.encode("utf-8", "surrogateescape")):
        return value
    return None


__all__ = [
    "LoadError", "Segment", "MultibootHeader", "LoadPlan", "LoadedImage",
    "MULTIBOOT_HEADER_MAGIC", "MULTIBOOT_BOOT_MAGIC", "MAX_IMAGE_SIZE", "MAX_PROGRAM_HEADERS",
    "MAX_SECTION_HEADERS", "MAX_SYMBOLS",
    "parse_image", "parse_elf", "parse_flat", "parse_multiboot_aout", "find_multiboot_header",
    "multiboot_header_size", "build_multiboot_info", "validate_plan", "write_plan", "zero_fill",
    "copy_into", "InputFile", "STREAM_CHUNK",
    "load_image",
    "elf_symbols", "find_symbol", "is_elf", "split_initrd_option", "initrd_module_path",
]
