"""What every boot format shares: reading an image or a file handed to the guest (bounded by
the input's size, only regular files), the load plan (segments, entry, boot mode), validating
a plan against guest RAM and writing it with zero fills that commit no host memory.

Images come from untrusted places, so reading is bounded by the size of the input: only regular
files are read, never more than :data:`MAX_IMAGE_SIZE` (a file may be larger than the guest's
RAM, as an ELF with debug information is, when what it loads fits; the Linux boot protocol's
images and initrds are held to the RAM size); segment data are views into the image, never
copies per header. Every failure is a :class:`LoadError` with a one-line message.
"""
from __future__ import annotations

import errno
import functools
import mmap
import os
import stat
import struct

from .._record import field, Record
from ..arch.x86 import layout as x86_layout
from ..errors import PykvmError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Dict, Iterator, List, Optional, Tuple, Union

# what a loader takes as an image: its bytes, or the path of a file holding them (for the type
# checker a Union; at run time the same types as a tuple, e.g. for isinstance, since importing
# typing would cost ~5 ms of every start)
if TYPE_CHECKING:
    Image = Union[bytes, bytearray, memoryview, str, os.PathLike]
else:
    Image = (bytes, bytearray, memoryview, str, os.PathLike)

# Limits on what the loader accepts (see the module docstring).
MAX_IMAGE_SIZE = 1 << 30          # bytes read when the guest RAM size is not known
STREAM_CHUNK = 1 << 20            # bytes read and written at a time (host memory bound)
_MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000)    # Linux's value on x86_64/riscv64
PF_X, PF_W, PF_R = 1, 2, 4        # segment permissions (ELF p_flags bits)
ARCHES = ("x86_64", "riscv64")    # what the boot formats know

# The VMM's own boot window per architecture (x86: GDT, page tables and stacks below 640 KiB;
# see pykvm.arch.x86.layout), which segments of a protected- or long-mode image must avoid.
_RESERVED = {"x86_64": (x86_layout.RESERVED_START, x86_layout.RESERVED_END)}


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



class Segment(Record, frozen=True, slots=True):
    """One piece of the image: ``data`` goes to guest-physical ``addr``; bytes from
    ``len(data)`` up to ``memsz`` are zero-filled. ``data`` is bytes-like: a read-only view
    into the image, so that no header can make the loader copy the file many times."""
    addr: int
    data: Union[bytes, memoryview]
    memsz: int
    flags: int = PF_R | PF_W | PF_X
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



class LoadPlan(Record):
    """Where every byte of an image goes, the entry point and the boot mode."""
    format: str                       # "elf64", "elf32-multiboot", "elf64-multiboot-aout",
                                      # "multiboot-aout", "linux-image" or "flat"
    arch: str                         # "x86_64" or "riscv64"
    mode: str                         # "long", "protected", "real" or "riscv"
    entry: int                        # guest-physical entry address
    segments: List[Segment] = field(default_factory=list)
    multiboot: Optional[object] = None    # a .multiboot.MultibootHeader, for multiboot images

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




class LoadedImage(Record):
    """What a boot format's loader did."""
    plan: LoadPlan
    entry: int
    mode: str
    multiboot_info: Optional[int] = None    # address of the multiboot info (EBX), if any
    params_addr: Optional[int] = None       # guest-physical address of ``pykvm_params``, if any
    written: List[Tuple[int, int]] = field(default_factory=list)   # (gpa, length) written
    boot_regs: Dict[str, int] = field(default_factory=dict)   # registers the protocol sets
                                                              # (multiboot: EAX, EBX)


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
        except Exception:  # noqa: BLE001 — __del__ must not raise (e.g. at interpreter exit)
            pass



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




def _as_bytes(data) -> bytes:
    """``data`` as ``bytes``; an ``mmap`` from :func:`_read_image` is used as it is (it has
    the bytes methods the parsers use: slicing, ``find``, the buffer protocol)."""
    if type(data) is bytes or isinstance(data, mmap.mmap):
        return data
    if isinstance(data, (bytes, bytearray, memoryview)):
        return bytes(data)
    raise LoadError(f"image data must be bytes, not {type(data).__name__}")



def _check_int(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise LoadError(f"{name} must be an integer, not {type(value).__name__}")




def _check_overlaps(segments: List[Segment]) -> None:
    """Refuse segments that overlap (after :func:`_qemu_load_sizes`). QEMU's -kernel refuses
    them as well: its ROM loader reports "Some ROM regions are overlapping", or the multiboot
    loader "Error while fetching elf kernel from rom" (hw/core/loader.c, hw/i386/multiboot.c)."""
    ordered = sorted(segments, key=lambda s: s.addr)
    for a, b in zip(ordered, ordered[1:]):
        if a.end > b.addr:
            raise LoadError(f"overlapping segments: {a.describe()} and {b.describe()} (QEMU's "
                            f"-kernel refuses them too: \"Some ROM regions are overlapping\")")




def _default_reserved(plan: LoadPlan) -> Optional[Tuple[int, int]]:
    return None if plan.mode == "real" else _RESERVED.get(plan.arch)


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


def read_head(image: Image, n: int = 8192) -> bytes:
    """The first ``n`` bytes of ``image`` (a path or bytes), enough for
    :func:`pykvm.boot.detect`; b"" when it cannot be read (the loader then reports what is
    wrong). Never opens anything but a regular file, so a FIFO or device cannot block."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        return bytes(image[:n])
    try:
        if not stat.S_ISREG(os.stat(image).st_mode):
            return b""
        fd = os.open(image, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except (OSError, TypeError, ValueError):
        return b""
    try:
        return os.read(fd, n)
    except OSError:
        return b""
    finally:
        os.close(fd)
