"""Guest RAM: private anonymous (MAP_NORESERVE) mappings registered as KVM memory slots, and a
bounds-checked guest-physical view over them. A slot may instead be *shared*: a memfd
(``memfd_create``) mapped ``MAP_SHARED``, whose file descriptor another process can map to reach
the same pages (a vhost-user backend such as virtiofsd, :mod:`pykvm.devices.virtio.vhost_user`)."""
from __future__ import annotations

import mmap
import os

from ._record import Record
from . import abi
from ._native import lib as _nlib
from .abi import CData, ffi
from .errors import Closed, GuestMemoryError, HostMemoryError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Callable, Iterator, List, Optional, Tuple, Union

PAGE_SIZE = mmap.PAGESIZE
# Linux's MAP_NORESERVE (0x4000 on x86_64 and riscv64; Python's mmap module does not export it):
# guest RAM is declared without reserving swap, so a large guest costs host memory only as it
# touches pages.
MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000)
# madvise(2) advice that drops pages of a private anonymous mapping: they read as zeros after.
_MADV_DONTNEED = getattr(mmap, "MADV_DONTNEED", 4)
# madvise(2) advice that frees the pages of a shared mapping in its backing file (a memfd):
# MADV_DONTNEED only drops this process's view of them, the file keeps the data.
_MADV_REMOVE = getattr(mmap, "MADV_REMOVE", 9)


class MemorySlot(Record):
    """One KVM memory slot backed by an anonymous mapping, or, when :attr:`fd` is not -1, by a
    shared mapping of that memfd (:attr:`shared`)."""
    slot: int
    gpa: int
    size: int
    flags: int
    _map: mmap.mmap
    _pin: object               # cffi buffer export that gives the host address
    fd: int = -1               # the memfd behind a shared slot (owned by the slot), else -1

    @property
    def shared(self) -> bool:
        """True if the slot is a ``MAP_SHARED`` mapping of the memfd :attr:`fd`, which another
        process may map (at offset 0, :attr:`size` bytes) to see the same guest RAM."""
        return self.fd >= 0

    @property
    def host_addr(self) -> int:
        """Host virtual address of the slot's mapping (int; valid while the slot exists)."""
        return int(ffi.cast("uintptr_t", self._pin))

    @property
    def readonly(self) -> bool:
        """True if the guest cannot write the slot (``KVM_MEM_READONLY``: writes exit as MMIO)."""
        return bool(self.flags & abi.MEM_READONLY)

    @property
    def log_dirty(self) -> bool:
        """True if KVM logs the pages the guest writes (``KVM_MEM_LOG_DIRTY_PAGES``)."""
        return bool(self.flags & abi.MEM_LOG_DIRTY_PAGES)

    @property
    def end(self) -> int:
        """Guest-physical address one past the slot's last byte."""
        return self.gpa + self.size

    def contains(self, gpa: int, n: int = 1) -> bool:
        """True if guest-physical [gpa, gpa + n) lies wholly inside this slot."""
        return self.gpa <= gpa and gpa + n <= self.end

    def resident(self) -> int:
        """Bytes of this slot's host mapping resident in host RAM now (the ``Rss`` of the
        mapping that holds :attr:`host_addr` in ``/proc/self/smaps``): what the guest (or a
        loader) has touched. Where the kernel merged an adjacent anonymous mapping with it,
        that is counted too. Raises :class:`LookupError` if the mapping is not found."""
        base = self.host_addr
        with open("/proc/self/smaps") as f:
            inside = False
            for line in f:
                head = line.split(None, 1)[0]
                if "-" in head and not head.endswith(":"):
                    lo, hi = (int(x, 16) for x in head.split("-"))
                    inside = lo <= base < hi
                elif inside and line.startswith("Rss:"):
                    return int(line.split()[1]) * 1024
        raise LookupError(f"no mapping at host address {base:#x} in /proc/self/smaps")

    def _release(self) -> None:
        """Give the host memory back. The address range is first replaced by fresh anonymous
        pages (so a late access through an old address reads zeroes rather than faulting or
        hitting a later mapping), then unmapped unless a view of it is still exported, in which
        case it goes with the last view."""
        if self._pin is None:
            return
        host = self.host_addr
        ffi.release(self._pin)
        self._pin = None
        _nlib.pykvm_retire_mapping(host, self.size)
        try:
            self._map.close()
        except BufferError:
            pass
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)


class GuestMemory:
    """All memory slots of a VM, addressed by guest-physical address."""

    def __init__(self) -> None:
        self._slots: List[MemorySlot] = []
        self.closed = False
        # called as hook(gpa, size) after write() and zero() change guest RAM (a reset's RAM
        # baseline, pykvm.rewind, records the host's writes, which KVM's dirty log misses)
        self.write_hooks: List[Callable[[int, int], None]] = []

    @classmethod
    def anonymous(cls, size: int) -> "GuestMemory":
        """Guest RAM with no VM behind it: one private anonymous mapping of ``size`` bytes at
        guest-physical 0 (:func:`new_mapping`), as slot 0, for driving a device model or a
        loader without KVM (unit tests, :mod:`pykvm.testing.blk_driver`). ``_close()``
        releases it. Raises what :func:`new_mapping` raises."""
        mem = cls()
        m, pin = new_mapping(size)
        mem._add(MemorySlot(0, 0, size, 0, m, pin))
        return mem

    def _close(self) -> None:
        for s in list(self._slots):
            self._slots.remove(s)
            s._release()
        self.closed = True

    def __iter__(self) -> Iterator[MemorySlot]:
        return iter(sorted(self._slots, key=lambda s: s.gpa))

    def _add(self, slot: MemorySlot) -> None:
        self._slots.append(slot)

    def _remove(self, slot: MemorySlot) -> None:
        self._slots.remove(slot)

    @property
    def size(self) -> int:
        """Bytes of RAM contiguous from guest-physical address 0."""
        end = 0
        for s in self:
            if s.gpa != end:
                break
            end = s.end
        return end

    def slot_at(self, gpa: int) -> Optional[MemorySlot]:
        """The slot backing guest-physical ``gpa``, or None. Raises :class:`~pykvm.errors.Closed` after the VM is closed."""
        if self.closed:
            raise Closed("guest memory is closed (its VM was closed)")
        for s in self._slots:
            if s.gpa <= gpa < s.end:
                return s
        return None

    def _chunks(self, gpa: int, n: int) -> Iterator[Tuple["MemorySlot", int, int]]:
        """(slot, offset, length) pieces covering [gpa, gpa+n); raises if any byte is unbacked."""
        if not isinstance(gpa, int) or not isinstance(n, int) or gpa < 0 or n < 0:
            raise GuestMemoryError(f"bad guest range gpa={gpa!r} len={n!r}")
        while n > 0:
            s = self.slot_at(gpa)
            if s is None:
                raise GuestMemoryError(f"guest-physical address {gpa:#x} is not backed by RAM")
            take = min(n, s.end - gpa)
            yield s, gpa - s.gpa, take
            gpa += take
            n -= take

    def read(self, gpa: int, n: int) -> bytes:
        """Copy ``n`` bytes from guest-physical ``gpa``."""
        return b"".join(bytes(s._map[o:o + k]) for s, o, k in self._chunks(gpa, n))

    def write(self, gpa: int, data: Union[bytes, bytearray, memoryview]) -> None:
        """Copy ``data`` to guest-physical ``gpa`` (host writes succeed on read-only slots too:
        read-only applies to the guest)."""
        try:
            data = memoryview(data).cast("B")
        except TypeError:
            raise GuestMemoryError(f"guest memory takes bytes-like data, not "
                                   f"{type(data).__name__}") from None
        pos = 0
        for s, o, k in list(self._chunks(gpa, len(data))):
            s._map[o:o + k] = data[pos:pos + k]
            pos += k
        for hook in self.write_hooks:
            hook(gpa, len(data))

    def zero(self, gpa: int, n: int) -> None:
        """Make guest-physical ``[gpa, gpa + n)`` read as zeros without committing host memory
        for it: whole pages are handed back with ``madvise(MADV_DONTNEED)`` (guest RAM is a
        private anonymous mapping, so they read as zeros again and cost no host memory until
        touched), partial pages at either end are written with zeros. A shared slot's pages are
        freed in its memfd (``MADV_REMOVE``), so every process mapping it reads zeros. Correct
        whatever the RAM held before (a reload after a run); KVM drops its mappings of the pages
        through its MMU notifier. Raises :class:`~pykvm.errors.GuestMemoryError` if any byte is unbacked
        (checked before anything changes)."""
        chunks = list(self._chunks(gpa, n))
        for hook in self.write_hooks:
            hook(gpa, n)
        for s, o, k in chunks:
            start = -(-o // PAGE_SIZE) * PAGE_SIZE          # first whole page
            end = (o + k) // PAGE_SIZE * PAGE_SIZE          # end of the last whole page
            if end <= start:
                s._map[o:o + k] = bytes(k)
                continue
            if o < start:
                s._map[o:start] = bytes(start - o)
            if end < o + k:
                s._map[end:o + k] = bytes(o + k - end)
            try:
                s._map.madvise(_MADV_REMOVE if s.shared else _MADV_DONTNEED, start, end - start)
            except (OSError, ValueError, AttributeError):
                # no madvise here: write the zeros, a page-sized piece at a time, skipping
                # pages that already read as zero (an untouched page reads as the shared zero
                # page and stays uncommitted)
                zero_page = bytes(PAGE_SIZE)
                for p in range(start, end, PAGE_SIZE):
                    if s._map[p:p + PAGE_SIZE] != zero_page:
                        s._map[p:p + PAGE_SIZE] = zero_page

    def view(self, gpa: int, n: int) -> memoryview:
        """A zero-copy view of ``n`` bytes at ``gpa``; the range must lie within one slot."""
        chunks = list(self._chunks(gpa, n))
        if len(chunks) > 1:
            raise GuestMemoryError(f"range {gpa:#x}+{n:#x} spans more than one memory slot")
        if not chunks:
            return memoryview(b"")
        s, o, k = chunks[0]
        return memoryview(s._map)[o:o + k]

    def read_u64(self, gpa: int) -> int:
        """The little-endian u64 at guest-physical ``gpa`` (raises GuestMemoryError if unbacked)."""
        return int.from_bytes(self.read(gpa, 8), "little")

    def write_u64(self, gpa: int, value: int) -> None:
        """Store ``value`` (taken mod 2**64) little-endian at guest-physical ``gpa``."""
        _check_value(value)
        self.write(gpa, (value & (2**64 - 1)).to_bytes(8, "little"))

    def read_u32(self, gpa: int) -> int:
        """The little-endian u32 at guest-physical ``gpa`` (raises GuestMemoryError if unbacked)."""
        return int.from_bytes(self.read(gpa, 4), "little")

    def write_u32(self, gpa: int, value: int) -> None:
        """Store ``value`` (taken mod 2**32) little-endian at guest-physical ``gpa``."""
        _check_value(value)
        self.write(gpa, (value & 0xFFFFFFFF).to_bytes(4, "little"))

    def read_cstring(self, gpa: int, limit: int = 4096) -> str:
        """A NUL-terminated string of at most ``limit`` bytes, stopping at the end of RAM."""
        out = bytearray()
        while len(out) < limit:
            s = self.slot_at(gpa + len(out))
            if s is None:
                if not out:
                    raise GuestMemoryError(f"string at {gpa:#x} is not in guest RAM")
                break
            o = gpa + len(out) - s.gpa
            k = min(limit - len(out), s.size - o)
            chunk = s._map[o:o + k]
            nul = chunk.find(b"\0")
            if nul >= 0:
                out += chunk[:nul]
                break
            out += chunk
        return out.decode("utf-8", "replace")


def _check_value(value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise GuestMemoryError(f"guest memory values are ints, not {type(value).__name__}")


def new_mapping(size: int, gpa: int = 0, *, shared: bool = False
                ) -> Tuple[mmap.mmap, CData]:
    """A private anonymous ``MAP_NORESERVE`` mapping of ``size`` bytes for guest RAM at
    guest-physical ``gpa`` (used only in messages), and the cffi pin that gives its host address.
    With ``shared``, see :func:`new_shared_mapping` (this form closes the memfd at once).

    Raises :class:`ValueError` for a size that is not a positive multiple of the page size and
    :class:`~pykvm.errors.HostMemoryError` when the host cannot map that much."""
    if shared:
        m, pin, fd = new_shared_mapping(size, gpa)
        os.close(fd)
        return m, pin
    _check_size(size)
    try:
        m = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_NORESERVE,
                      prot=mmap.PROT_READ | mmap.PROT_WRITE)
    except (OSError, OverflowError) as e:
        raise _no_memory(size, gpa, e) from None
    pin = ffi.from_buffer(m)
    return m, pin


def new_shared_mapping(size: int, gpa: int = 0) -> Tuple[mmap.mmap, CData, int]:
    """Shareable guest RAM: a memfd of ``size`` bytes (``memfd_create`` with ``MFD_CLOEXEC``,
    sized with ``ftruncate``: a sparse file, so it costs host memory only as pages are touched)
    mapped ``MAP_SHARED`` read-write; returns (mapping, cffi pin, memfd). The caller owns the
    memfd (another process maps it to share the RAM: vhost-user's SET_MEM_TABLE).

    Raises :class:`ValueError` for a bad size and :class:`~pykvm.errors.HostMemoryError` when
    the host cannot make or map the memfd (no fds left counts too: one line saying why)."""
    _check_size(size)
    try:
        fd = os.memfd_create("pykvm-guest-ram", os.MFD_CLOEXEC)
    except OSError as e:
        raise _no_memory(size, gpa, e, "memfd_create") from None
    try:
        os.ftruncate(fd, size)
        m = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    except (OSError, OverflowError) as e:
        os.close(fd)
        raise _no_memory(size, gpa, e, "shared memfd") from None
    return m, ffi.from_buffer(m), fd


def _check_size(size: int) -> None:
    if not isinstance(size, int) or size <= 0 or size % PAGE_SIZE:
        raise ValueError(f"memory size must be a positive multiple of {PAGE_SIZE}, got {size!r}")


def _no_memory(size: int, gpa: int, e: BaseException, how: str = "") -> HostMemoryError:
    why = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
    return HostMemoryError(f"cannot map {_human(size)} of guest RAM at GPA {gpa:#x}"
                           f"{' (' + how + ')' if how else ''}: {why}")


def _human(n: int) -> str:
    for unit, shift in (("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift} {unit}"
    return f"{n} bytes"
