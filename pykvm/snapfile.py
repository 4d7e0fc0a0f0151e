"""The pykvm snapshot file format, version 2 (docs/snapshots.md; version 1 files are read too):
reading, writing and checking it, in pure Python with nothing but the standard library and
:mod:`pykvm.errors`.

Layout (all integers little-endian)::

    offset 0   magic            8 bytes  b"PYKVMSNP"
           8   format version   u32      FORMAT_VERSION (2; READ_VERSIONS are read)
          12   section count    u32      at most MAX_SECTIONS
          16   section table    count x 56 bytes:
                   name         32 bytes ASCII, NUL-padded
                   offset       u64      from the start of the file
                   length       u64      bytes stored (after compression)
                   crc32        u32      zlib.crc32 of the stored bytes
                   flags        u32      bit 0: zlib-compressed
               section data     the sections, in table order, back to back
    end - 32   digest           SHA-256 of every byte before it

:func:`read` parses and verifies the whole file (sizes, offsets inside the file and in
order, each section's CRC, the digest, the decompressed sizes, which are bounded) before it
returns anything, so a caller that restores only what :func:`read` returned never sees a
truncated, corrupted or oversized file: each is refused with one line
(:class:`~pykvm.errors.SnapshotError`).

The RAM section's payload (:func:`encode_ram` / :func:`decode_ram`) is a run of records
``gpa u64, length u32, flags u32, data`` (``length`` bytes, page multiples): only pages that
are not all zeros are stored.
"""
from __future__ import annotations

import hashlib
import json
import os
import stat
import struct
import tempfile
import zlib

from .errors import SnapshotError, shown

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Dict, Iterable, Iterator, List, Optional, Tuple

MAGIC = b"PYKVMSNP"
FORMAT_VERSION = 2
# version 2 added meta.finished_vcpus, which a reader must act on (version 1: none finished)
READ_VERSIONS = (1, 2)
MAX_SECTIONS = 4096
NAME_LEN = 32
_HEAD = struct.Struct("<8sII")
_ENTRY = struct.Struct(f"<{NAME_LEN}sQQII")
_RUN = struct.Struct("<QII")
DIGEST_LEN = 32
FLAG_ZLIB = 1
PAGE = 4096
# the most bytes a JSON section may decompress to (the metadata, device and vCPU states are
# kilobytes; this bounds what a hostile file can make the reader allocate)
MAX_JSON = 64 << 20
# bytes of output a zlib stream is inflated by at a time (its bound is checked after each)
INFLATE_STEP = 1 << 20
# characters of a path the user named that an error line quotes (a value from a file: 60)
PATH_SHOWN = 200


class Section:
    """One section as read: ``name`` (str), ``data`` (the bytes stored, still compressed when
    ``compressed``)."""

    __slots__ = ("name", "data", "compressed")

    def __init__(self, name: str, data: bytes, compressed: bool):
        self.name, self.data, self.compressed = name, data, compressed

    def payload(self, limit: int, why: str = "") -> bytes:
        """The section's bytes, decompressed; at most ``limit`` bytes (``why``: what sets that
        bound, named in the error). The zlib stream is inflated :data:`INFLATE_STEP` bytes at
        a time and refused as soon as its output passes ``limit``, so a stream that inflates
        to far more (a "zip bomb") costs at most ``limit`` bytes of memory and the time to
        inflate them. Raises :class:`~pykvm.errors.SnapshotError` for more bytes than
        ``limit`` and for a corrupt, truncated or overlong zlib stream."""
        bound = f" ({why})" if why else ""
        if not self.compressed:
            if len(self.data) > limit:
                raise SnapshotError(f"section {self.name!r} holds {len(self.data)} bytes, more "
                                    f"than the {limit} it may{bound}")
            return self.data
        d = zlib.decompressobj()
        out = bytearray()
        pending: Any = self.data
        try:
            while True:
                piece = d.decompress(pending, min(INFLATE_STEP, limit + 1 - len(out)))
                out += piece
                if len(out) > limit:
                    raise SnapshotError(f"section {self.name!r} decompresses to more than the "
                                        f"{limit} bytes it may{bound}")
                pending = d.unconsumed_tail
                if d.eof or (not pending and not piece):
                    break
        except zlib.error as e:
            raise SnapshotError(f"section {self.name!r}: corrupt compressed data "
                                f"({shown(str(e))})") from None
        if not d.eof or d.unused_data:
            raise SnapshotError(f"section {self.name!r}: compressed data is truncated or has "
                                "bytes after its end")
        return bytes(out)


class Sections(dict):
    """The sections of a file as read (``{name: Section}`` in file order), with ``version``:
    the format version its header gives (one of :data:`READ_VERSIONS`), which decides what
    its metadata must hold (docs/snapshots.md "The file format")."""

    def __init__(self, version: int) -> None:
        super().__init__()
        self.version = version


class Writer:
    """Builds a snapshot file: :meth:`add` sections, then :meth:`write` them to a path."""

    def __init__(self) -> None:
        self._sections: List[Tuple[str, bytes, int]] = []

    def add(self, name: str, data: bytes, *, compress: bool = False) -> None:
        """Add section ``name`` (ASCII, at most 32 bytes, unique) holding ``data``
        (zlib-compressed, level 1, when ``compress``). Raises ValueError for a bad name."""
        raw = name.encode("ascii", "strict")
        if not raw or len(raw) > NAME_LEN or b"\0" in raw:
            raise ValueError(f"section name {name!r} is not 1-{NAME_LEN} ASCII bytes")
        if any(n == name for n, _, _ in self._sections):
            raise ValueError(f"section {name!r} added twice")
        if len(self._sections) >= MAX_SECTIONS:
            raise ValueError(f"a snapshot holds at most {MAX_SECTIONS} sections")
        if compress:
            self._sections.append((name, zlib.compress(data, 1), FLAG_ZLIB))
        else:
            self._sections.append((name, bytes(data), 0))

    def add_json(self, name: str, value: Any) -> None:
        """Add section ``name`` holding ``value`` as compact UTF-8 JSON (compressed)."""
        self.add(name, json.dumps(value, separators=(",", ":"), sort_keys=True).encode(),
                 compress=True)

    def write(self, path: str) -> int:
        """Write the file to ``path`` (a str or os.PathLike) through a temporary file made
        with O_CREAT|O_EXCL|O_NOFOLLOW under a random name in the same directory
        (:func:`tempfile.mkstemp`, mode 0600), renamed over ``path``, so a reader never sees
        half a file and no link planted in the directory is followed. Returns its size in
        bytes. Raises :class:`~pykvm.errors.SnapshotError` (one line) for a path
        :func:`check_target` refuses and for any OSError while the file is made, written or
        renamed (naming ``path`` and the error's strerror: no space left, a read-only file
        system, ...); the temporary file is removed then."""
        n = len(self._sections)
        offset = _HEAD.size + n * _ENTRY.size
        h = hashlib.sha256()
        head = bytearray(_HEAD.pack(MAGIC, FORMAT_VERSION, n))
        for name, data, flags in self._sections:
            head += _ENTRY.pack(name.encode("ascii"), offset, len(data),
                                zlib.crc32(data) & 0xFFFFFFFF, flags)
            offset += len(data)
        check_target(path)
        path = os.fspath(path)
        d = os.path.dirname(os.path.abspath(path))
        try:
            # a fresh, unpredictable name made with O_CREAT|O_EXCL (and never through a link)
            fd, tmp = tempfile.mkstemp(prefix=".pykvm-snap-", suffix=".tmp", dir=d)
        except OSError as e:
            raise _cannot_write(path, e) from None
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(head)
                h.update(head)
                for _, data, _ in self._sections:
                    f.write(data)
                    h.update(data)
                f.write(h.digest())
            os.replace(tmp, path)
        except BaseException as e:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            if isinstance(e, OSError):
                raise _cannot_write(path, e) from None
            raise
        return offset + DIGEST_LEN


def _cannot_write(path: str, e: OSError) -> SnapshotError:
    return SnapshotError(f"cannot write the snapshot {shown(path, PATH_SHOWN)}: "
                         f"{e.strerror or type(e).__name__}")


def check_target(path: Any) -> None:
    """Refuse (:class:`~pykvm.errors.SnapshotError`, one line) a path a snapshot cannot be
    written to: not a str/PathLike, empty, in a directory that does not exist or in which
    :meth:`Writer.write`'s temporary file cannot be made (it is made and removed here, as
    the write will: a read-only or pseudo file system such as /proc or /sys, no permission),
    or naming something that exists and is not a regular file (a directory, a FIFO, a
    device), which the rename that writes the file would replace. The line names the path
    and the error's strerror."""
    if not isinstance(path, (str, os.PathLike)):
        raise SnapshotError(f"a snapshot path must be a str or os.PathLike, not "
                            f"{type(path).__name__}")
    path = os.fspath(path)
    if not isinstance(path, str) or not path or "\0" in path:
        raise SnapshotError(f"bad snapshot path {shown(path, PATH_SHOWN)}")
    d = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(d):
        raise SnapshotError(f"cannot write the snapshot {shown(path, PATH_SHOWN)}: no "
                            f"directory {shown(d, PATH_SHOWN)}")
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        raise _cannot_write(path, e) from None
    else:
        if not stat.S_ISREG(st.st_mode):
            raise SnapshotError(f"cannot write the snapshot {shown(path, PATH_SHOWN)}: it "
                                "exists and is not a regular file")
    try:
        fd, tmp = tempfile.mkstemp(prefix=".pykvm-snap-", suffix=".tmp", dir=d)
    except OSError as e:
        raise _cannot_write(path, e) from None
    os.close(fd)
    try:
        os.unlink(tmp)
    except OSError as e:
        raise _cannot_write(path, e) from None


def printable(text: str, n: int = 400) -> str:
    """``text`` (a message line) with every character that is not printable ASCII shown as
    its escape (as :func:`pykvm.errors.shown` does, without the quotes) and cut to ``n`` characters: for a
    line built elsewhere that may hold a value from a file."""
    r = ascii(text)[1:-1] if any(not " " <= c <= "~" for c in text) else text
    return r if len(r) <= n else r[:max(n - 3, 1)] + "..."


def read(path: Any, *, max_size: int = 1 << 40) -> Sections:
    """Read and verify the snapshot file at ``path`` (a str or os.PathLike; module docstring):
    ``{name: Section}`` in file order. The file is opened without blocking (O_NONBLOCK) and
    must be a regular file; its fixed header and section table are read and checked first
    (magic, version, every section inside the file's real size, in order), the SHA-256
    digest is then verified in 1 MiB chunks, and only then are the sections read, so what is
    held in memory is bounded by the sections the header declares and the file really has.
    Returns :class:`Sections` (its ``version``: the header's format version).
    Raises :class:`~pykvm.errors.SnapshotError` (one line) for a file that is not a snapshot,
    of another format version, truncated, corrupted, larger than ``max_size`` bytes (or than
    the host's memory), not a regular file, and for an unreadable path."""
    if not isinstance(path, (str, os.PathLike)) or isinstance(path, bytes):
        raise SnapshotError(f"a snapshot path must be a str or os.PathLike, not "
                            f"{type(path).__name__}")
    what = str(os.fspath(path))
    if len(what) > 200:
        what = what[:200] + "..."
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except (OSError, ValueError) as e:
        raise SnapshotError(f"{what}: cannot read the snapshot: "
                            f"{getattr(e, 'strerror', None) or e}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            kind = "a directory" if stat.S_ISDIR(st.st_mode) else "a FIFO" if \
                stat.S_ISFIFO(st.st_mode) else "a device" if \
                stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) else "a special file"
            raise SnapshotError(f"{what}: not a regular file ({kind})")
        with os.fdopen(fd, "rb", closefd=True) as f:
            fd = -1
            return _read_open(f, st.st_size, what, max_size)
    except SnapshotError:
        raise
    except OSError as e:
        raise SnapshotError(f"{what}: cannot read the snapshot: {e.strerror or e}") from None
    finally:
        if fd >= 0:
            os.close(fd)


def _read_exact(f: Any, n: int, what: str) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise SnapshotError(f"{what}: truncated (the file changed while it was read)")
    return data


def _check_head(version: int, n: int, what: str) -> None:
    """The header's format version and section count, for :func:`read` and :func:`parse`."""
    if version not in READ_VERSIONS:
        raise SnapshotError(f"{what}: snapshot format version {version}; this pykvm reads "
                            f"versions {', '.join(map(str, READ_VERSIONS))}")
    if n > MAX_SECTIONS:
        raise SnapshotError(f"{what}: {n} sections, more than the {MAX_SECTIONS} allowed")


def _read_open(f: Any, size: int, what: str, max_size: int) -> Sections:
    head = f.read(_HEAD.size)
    if len(head) < len(MAGIC) or head[:len(MAGIC)] != MAGIC:
        raise SnapshotError(f"{what}: not a pykvm snapshot (bad magic)")
    if size < _HEAD.size + DIGEST_LEN:
        raise SnapshotError(f"{what}: truncated ({size} bytes)")
    _, version, n = _HEAD.unpack(head)
    _check_head(version, n, what)
    limit = max_size
    host = _host_memory()
    if host:
        limit = min(limit, host)
    if size > limit:
        raise SnapshotError(f"{what}: {size} bytes is larger than the {limit} a snapshot "
                            "may be (the host's memory or the limit given)")
    body_end = size - DIGEST_LEN
    table_end = _HEAD.size + n * _ENTRY.size
    if table_end > body_end:
        raise SnapshotError(f"{what}: truncated (its section table runs past the end)")
    table = _read_exact(f, n * _ENTRY.size, what)
    entries = []
    pos = table_end
    for i in range(n):
        raw_name, off, length, crc, flags = _ENTRY.unpack_from(table, i * _ENTRY.size)
        entries.append((raw_name, off, length, crc, flags))
    # sections declared back to back that end before the digest: the file is longer than
    # its table says (e.g. a valid header padded with gigabytes): refused before hashing it
    end = table_end
    for _, off, length, _, _ in entries:
        if off != end:
            break
        end = off + length
    else:
        if end < body_end:
            raise SnapshotError(f"{what}: corrupted or truncated ({body_end - end} bytes after "
                                "the last section its table declares)")
    # the digest over the whole body, streamed (the sections are not yet held)
    h = hashlib.sha256(head)
    h.update(table)
    left = body_end - table_end
    while left:
        chunk = f.read(min(left, 1 << 20))
        if not chunk:
            raise SnapshotError(f"{what}: truncated (the file changed while it was read)")
        h.update(chunk)
        left -= len(chunk)
    digest = _read_exact(f, DIGEST_LEN, what)
    if h.digest() != digest:
        where = _damaged_entry(f, entries, table_end, body_end)
        raise SnapshotError(f"{what}: corrupted or truncated (SHA-256 digest mismatch"
                            f"{'; ' + where if where else ''})")
    out = Sections(version)
    seen = set()
    for i, (raw_name, off, length, _crc, flags) in enumerate(entries):
        name = _name(raw_name, what, i)
        if off != pos or length > body_end - off:
            raise SnapshotError(f"{what}: section {name!r} at {off} length {length} is not "
                                f"where the file holds it")
        if flags & ~FLAG_ZLIB:
            raise SnapshotError(f"{what}: section {name!r} has unknown flags {flags:#x}")
        if name in seen:
            raise SnapshotError(f"{what}: section {name!r} appears twice")
        seen.add(name)
        pos = off + length
    if pos != body_end:
        raise SnapshotError(f"{what}: {body_end - pos} bytes after the last section")
    f.seek(table_end)
    for i, (raw_name, _off, length, crc, flags) in enumerate(entries):
        name = _name(raw_name, what, i)
        data = _read_exact(f, length, what)
        if zlib.crc32(data) & 0xFFFFFFFF != crc:
            raise SnapshotError(f"{what}: section {name!r} is corrupted (CRC-32 mismatch)")
        out[name] = Section(name, data, bool(flags & FLAG_ZLIB))
    return out


def _damaged_entry(f: Any, entries: List[Tuple[bytes, int, int, int, int]], table_end: int,
                   body_end: int) -> str:
    for i, (raw, off, length, crc, _) in enumerate(entries):
        if off < table_end or off + length > body_end:
            return f"section {i} runs past the end of the file (truncated?)"
        f.seek(off)
        c = 0
        left = length
        while left:
            chunk = f.read(min(left, 1 << 20))
            if not chunk:
                return ""
            c = zlib.crc32(chunk, c)
            left -= len(chunk)
        if c & 0xFFFFFFFF != crc:
            return f"section {_shown_name(raw)} fails its CRC-32"
    return ""


def _host_memory() -> int:
    """The host's physical memory in bytes (0 where the system does not say)."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return 0


def parse(blob: bytes, *, what: str = "snapshot") -> Sections:
    """:func:`read` over bytes already in memory (``what`` names them in errors)."""
    if len(blob) < len(MAGIC) or blob[:len(MAGIC)] != MAGIC:
        raise SnapshotError(f"{what}: not a pykvm snapshot (bad magic)")
    if len(blob) < _HEAD.size + DIGEST_LEN:
        raise SnapshotError(f"{what}: truncated ({len(blob)} bytes)")
    _, version, n = _HEAD.unpack_from(blob, 0)
    _check_head(version, n, what)
    body_end = len(blob) - DIGEST_LEN
    table_end = _HEAD.size + n * _ENTRY.size
    if table_end > body_end:
        raise SnapshotError(f"{what}: truncated (its section table runs past the end)")
    if hashlib.sha256(blob[:body_end]).digest() != blob[body_end:]:
        # say which section is damaged where the table still reads, else the file
        where = _damaged_section(blob, n, table_end, body_end)
        raise SnapshotError(f"{what}: corrupted or truncated (SHA-256 digest mismatch"
                            f"{'; ' + where if where else ''})")
    out = Sections(version)
    pos = table_end
    for i in range(n):
        raw_name, off, length, crc, flags = _ENTRY.unpack_from(blob, _HEAD.size + i * _ENTRY.size)
        name = _name(raw_name, what, i)
        if off != pos or length > body_end - off:
            raise SnapshotError(f"{what}: section {name!r} at {off} length {length} is not "
                                f"where the file holds it")
        if flags & ~FLAG_ZLIB:
            raise SnapshotError(f"{what}: section {name!r} has unknown flags {flags:#x}")
        data = blob[off:off + length]
        if zlib.crc32(data) & 0xFFFFFFFF != crc:
            raise SnapshotError(f"{what}: section {name!r} is corrupted (CRC-32 mismatch)")
        if name in out:
            raise SnapshotError(f"{what}: section {name!r} appears twice")
        out[name] = Section(name, data, bool(flags & FLAG_ZLIB))
        pos = off + length
    if pos != body_end:
        raise SnapshotError(f"{what}: {body_end - pos} bytes after the last section")
    return out


def _shown_name(raw: bytes) -> str:
    """A section name from a table entry not yet checked, as an error line quotes it."""
    name = raw.rstrip(b"\0")
    try:
        return shown(name.decode("ascii"), NAME_LEN + 6)
    except UnicodeDecodeError:
        return shown(name, NAME_LEN + 6)


def _name(raw: bytes, what: str, i: int) -> str:
    name = raw.rstrip(b"\0")
    if not name or b"\0" in name or any(c < 0x20 or c > 0x7E for c in name):
        raise SnapshotError(f"{what}: section {i} has a malformed name")
    return name.decode("ascii")


def _damaged_section(blob: bytes, n: int, table_end: int, body_end: int) -> str:
    try:
        for i in range(n):
            raw, off, length, crc, _ = _ENTRY.unpack_from(blob, _HEAD.size + i * _ENTRY.size)
            if off < table_end or off + length > body_end:
                return f"section {i} runs past the end of the file (truncated?)"
            if zlib.crc32(blob[off:off + length]) & 0xFFFFFFFF != crc:
                return f"section {_shown_name(raw)} fails its CRC-32"
    except struct.error:
        return ""
    return ""


def json_section(sections: Dict[str, Section], name: str, *, what: str = "snapshot",
                 limit: int = MAX_JSON) -> Any:
    """Section ``name`` decoded as JSON (at most ``limit`` bytes decompressed). Raises
    :class:`~pykvm.errors.SnapshotError` when it is missing, larger, not valid UTF-8 JSON, or
    nested too deeply."""
    s = sections.get(name)
    if s is None:
        raise SnapshotError(f"{what}: the {name!r} section is missing")
    try:
        return json.loads(s.payload(limit).decode("utf-8"), parse_constant=_no_constant)
    except RecursionError:
        raise SnapshotError(f"{what}: section {name!r} is JSON nested too deeply") from None
    except (UnicodeDecodeError, ValueError) as e:
        raise SnapshotError(f"{what}: section {name!r} is not valid JSON "
                            f"({shown(str(e), 80)})") from None


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


# -- RAM ---------------------------------------------------------------------------------------

def nonzero_runs(view: memoryview, base: int) -> Iterator[Tuple[int, int]]:
    """(gpa, length) of the runs of pages of ``view`` (guest RAM from guest-physical ``base``)
    that are not all zeros."""
    zero = bytes(PAGE)
    n = len(view) // PAGE
    start: Optional[int] = None
    for i in range(n):
        nz = view[i * PAGE:(i + 1) * PAGE] != zero
        if nz and start is None:
            start = i
        elif not nz and start is not None:
            yield base + start * PAGE, (i - start) * PAGE
            start = None
    if start is not None:
        yield base + start * PAGE, (n - start) * PAGE


def encode_ram(slots: Iterable[Tuple[int, memoryview]]) -> bytes:
    """The RAM section's payload for ``slots`` ((guest-physical base, contents) each): a record
    per run of non-zero pages."""
    out = bytearray()
    for base, view in slots:
        for gpa, length in nonzero_runs(view, base):
            off = gpa - base
            out += _RUN.pack(gpa, length, 0)
            out += view[off:off + length]
    return bytes(out)


def decode_ram(payload: bytes, ranges: List[Tuple[int, int]]) -> List[Tuple[int, int, int]]:
    """The (gpa, offset in ``payload``, length) of each RAM record, checked: each lies inside one
    of ``ranges`` ((start, end) guest-physical, end exclusive), page aligned, the records in
    ascending order, not overlapping. Raises :class:`~pykvm.errors.SnapshotError`."""
    out: List[Tuple[int, int, int]] = []
    i, last = 0, -1
    while i < len(payload):
        if i + _RUN.size > len(payload):
            raise SnapshotError(f"RAM record at byte {i} is truncated")
        gpa, length, flags = _RUN.unpack_from(payload, i)
        i += _RUN.size
        if flags or gpa % PAGE or length % PAGE or not length:
            raise SnapshotError(f"RAM record at GPA {gpa:#x} length {length:#x} is malformed")
        if length > len(payload) - i:
            raise SnapshotError(f"RAM record at GPA {gpa:#x} is truncated")
        if gpa <= last:
            raise SnapshotError(f"RAM record at GPA {gpa:#x} is out of order")
        if not any(lo <= gpa and gpa + length <= hi for lo, hi in ranges):
            raise SnapshotError(f"RAM record [{gpa:#x}, {gpa + length:#x}) lies outside guest "
                                "RAM")
        out.append((gpa, i, length))
        i += length
        last = gpa + length - 1
    return out
