"""The buses devices sit on: one for x86 port I/O (:data:`PIO_LIMIT` ports) and one for MMIO
(guest-physical addresses), each a sorted map of address ranges to devices that refuses
overlaps (Firecracker's ``vstate/bus.rs``, kvmtool's ``kvm__register_iotrap``).

Every device speaks one protocol, :class:`Device`: ``read(offset, size) -> int`` and
``write(offset, size, value)``, where ``offset`` is the accessed address minus the range's
``base`` plus the ``offset`` the range was inserted with (a device with several register blocks,
such as the i8042's ports 0x60 and 0x64, inserts each block at the offset its register map
gives it) and ``size`` is 1, 2, 4 or 8 bytes. Values are little-endian integers of ``size``
bytes.

A device class declares where it sits by default: ``PIO_RANGES`` (for the port bus) or
``MMIO_RANGES`` (for the MMIO bus), a tuple of ``(base, size, offset, max_access)``; the platform
registers it with one line, :meth:`Bus.attach`. A device on both buses exposes a second object
for the other bus (pc-testdev's ``iomem``).

The bus is also the memory core: it cuts a guest access into the pieces a device accepts, as
QEMU's ``flatview_read_continue``/``memory_access_size`` (``system/physmem.c``) do. An access of
``size`` bytes at ``addr`` goes, piece by piece, to the range holding the piece's first byte; a
piece is as long as what is left, but no longer than the range's ``max_access`` nor than the
alignment of its offset inside the range (``offset & -offset``), rounded down to a power of two;
it is not cut at the range's end (I/O ranges are not RAM). Bytes no range claims behave as
QEMU's unassigned accesses: reads give all-ones, writes are dropped, and both are counted in
:attr:`Bus.unassigned`. A device meeting guest memory it cannot reach while serving an access
(:class:`~pykvm.errors.GuestMemoryError`, e.g. a DMA to a guest-programmed address) ends the
access as a master abort: the read gives all-ones, the write is dropped; it never ends the VM.

Work per access is bounded: at most ``size`` pieces, each found by a binary search.
"""
from __future__ import annotations

import bisect
import threading

from .._record import Record
from ..errors import GuestMemoryError, PykvmError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Dict, Iterator, List, Optional, Protocol, Sequence, Tuple, runtime_checkable
else:
    from .._record import Protocol, runtime_checkable  # run-time stand-ins: typing costs ~5 ms

ACCESS_SIZES = frozenset((1, 2, 4, 8))  # bytes a range may take at once (its max_access)
PIO_LIMIT = 1 << 16               # x86 I/O ports 0..0xFFFF
MMIO_LIMIT = 1 << 64              # guest-physical addresses

# where a device class says it sits (its ``PIO_RANGES`` / ``MMIO_RANGES``): (base address,
# size in bytes or ports, offset of the block in the device's register map, max_access bytes)
if TYPE_CHECKING:
    RangeSpec = Tuple[int, int, int, int]


@runtime_checkable
class Device(Protocol):
    """What a bus calls. ``offset``: bytes from the start of the device's register map (see the
    module docstring); ``size``: 1, 2, 4 or 8 bytes, never more than the ``max_access`` of the
    range it was inserted with. Neither method may raise for any guest-chosen offset, size or
    value (guest nonsense is the device's to answer, as its hardware would)."""

    def read(self, offset: int, size: int) -> int:
        """The value (``size`` bytes, little-endian) the guest reads at ``offset``."""

    def write(self, offset: int, size: int, value: int) -> None:
        """Take the guest's write of ``value`` (``size`` bytes) at ``offset``."""


class BusConflict(PykvmError, ValueError):
    """A range inserted on a bus overlaps one already there, or lies outside the bus."""


class Mapping(Record, frozen=True, slots=True):
    """One range on a bus: ``[base, base + size)`` goes to ``device`` at ``offset`` + (address
    - base); accesses are cut to at most ``max_access`` bytes (a power of two)."""
    base: int
    size: int
    device: Device
    offset: int = 0
    max_access: int = 4
    name: str = ""

    @property
    def end(self) -> int:
        """One past the range's last address."""
        return self.base + self.size

    def describe(self) -> str:
        """e.g. ``i8042 [0x60, 0x61)``."""
        return f"{self.name or type(self.device).__name__} [{self.base:#x}, {self.end:#x})"


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_access(bus: "Bus", addr: int, size: int) -> None:
    # any size from 1 to 8 bytes: a guest's MMIO access may be 3, 5, 6 or 7 bytes wide
    # (kvm_run.mmio.len), and the bus cuts it into the pieces the devices take
    if size.__class__ is not int or not 1 <= size <= 8 or addr.__class__ is not int:
        raise ValueError(f"{bus.name} bus: an access is 1 to 8 bytes at an integer address, "
                         f"not {size!r} bytes at {addr!r}")


def _pow2floor(n: int) -> int:
    return 1 << (n.bit_length() - 1)


class Bus:
    """Address ranges mapped to devices (see the module docstring). ``name``: "pio" or "mmio",
    for messages; ``limit``: one past the highest address. Thread-safe: vCPU threads access it
    while the guest's configuration writes move ranges (a PCI BAR, the ACPI PM block)."""

    def __init__(self, name: str, limit: int):
        if not _is_int(limit) or limit <= 0:
            raise ValueError(f"bus limit must be a positive integer, not {limit!r}")
        self.name = name
        self.limit = limit
        # (starts, mappings), sorted by base; replaced whole under the lock so that a reader
        # takes one consistent pair without locking
        self._table: Tuple[Tuple[int, ...], Tuple[Mapping, ...]] = ((), ())
        self._lock = threading.Lock()
        self.unassigned: Dict[int, int] = {}     # address -> accesses no range answered
        self._unassigned_cap = 4096              # distinct addresses counted (bounded memory)

    # -- ranges ----------------------------------------------------------------------------
    def insert(self, base: int, size: int, device: Device, *, offset: int = 0,
               max_access: int = 4, name: str = "") -> Mapping:
        """Map ``[base, base + size)`` to ``device`` (see :class:`Mapping`). Raises
        :class:`BusConflict` naming both ranges if it overlaps a range already inserted, or
        if it does not lie inside the bus; :class:`ValueError` for a size or ``max_access``
        that is no positive power of two where one is needed."""
        if not (_is_int(base) and _is_int(size)) or size <= 0:
            raise ValueError(f"{self.name} bus: bad range base={base!r} size={size!r}")
        if not _is_int(offset) or offset < 0:
            raise ValueError(f"{self.name} bus: offset must be an integer >= 0, not {offset!r}")
        if not _is_int(max_access) or max_access not in ACCESS_SIZES:
            raise ValueError(f"{self.name} bus: max_access must be 1, 2, 4 or 8, not {max_access!r}")
        if not (callable(getattr(device, "read", None)) and
                callable(getattr(device, "write", None))):
            raise TypeError(f"{self.name} bus: {type(device).__name__} is no device (it needs "
                            "read(offset, size) and write(offset, size, value))")
        m = Mapping(base, size, device, offset, max_access, name)
        if base < 0 or m.end > self.limit:
            raise BusConflict(f"{self.name} bus: {m.describe()} lies outside the bus "
                              f"[0, {self.limit:#x})")
        with self._lock:
            starts, maps = self._table
            i = bisect.bisect_right(starts, base)
            for other in maps[max(i - 1, 0):i + 1]:
                if other.base < m.end and base < other.end:
                    raise BusConflict(f"{self.name} bus: {m.describe()} overlaps "
                                      f"{other.describe()}")
            self._table = (starts[:i] + (base,) + starts[i:], maps[:i] + (m,) + maps[i:])
        return m

    def attach(self, device: Device, ranges: Optional[Sequence[RangeSpec]] = None) \
            -> List[Mapping]:
        """Insert every range of ``device``: ``ranges`` if given, else the class's declared
        ``PIO_RANGES`` (on a bus named "pio") or ``MMIO_RANGES`` (on one named "mmio"), each a
        ``(base, size, offset, max_access)`` tuple (see :meth:`insert`). All or nothing: if
        one range is refused (:class:`BusConflict`, :class:`ValueError`) the ones already
        inserted are taken off again before the error propagates. Returns the new mappings,
        in the order given. Raises :class:`ValueError` if ``ranges`` is omitted and the
        device declares none for this bus."""
        if ranges is None:
            attr = {"pio": "PIO_RANGES", "mmio": "MMIO_RANGES"}.get(self.name)
            ranges = getattr(device, attr, None) if attr else None
            if ranges is None:
                raise ValueError(f"{self.name} bus: {type(device).__name__} declares no "
                                 f"ranges for this bus")
        done: List[Mapping] = []
        try:
            for spec in ranges:
                if not (isinstance(spec, tuple) and len(spec) == 4):
                    raise ValueError(f"{self.name} bus: a range of {type(device).__name__} must "
                                     f"be (base, size, offset, max_access), not {spec!r}")
                base, size, offset, max_access = spec
                done.append(self.insert(base, size, device, offset=offset,
                                        max_access=max_access))
        except BaseException:
            self._drop(done)
            raise
        return done

    def _drop(self, gone: Sequence[Mapping]) -> None:
        with self._lock:
            keep = tuple(m for m in self._table[1] if not any(m is g for g in gone))
            self._table = (tuple(m.base for m in keep), keep)

    def remove(self, device: Device) -> int:
        """Take every range of ``device`` off the bus; returns how many there were."""
        with self._lock:
            maps = self._table[1]
            keep = tuple(m for m in maps if m.device is not device)
            self._table = (tuple(m.base for m in keep), keep)
        return len(maps) - len(keep)

    def find(self, addr: int) -> Optional[Mapping]:
        """The range holding ``addr``, or None."""
        starts, maps = self._table                   # one consistent pair, without the lock
        i = bisect.bisect_right(starts, addr) - 1
        if i >= 0 and addr < maps[i].end:
            return maps[i]
        return None

    def mappings(self) -> Tuple[Mapping, ...]:
        """Every range, by address."""
        return self._table[1]

    # -- accesses --------------------------------------------------------------------------
    def _pieces(self, addr: int, size: int) \
            -> Iterator[Tuple[Optional[Mapping], int, int, int]]:
        done = 0
        while done < size:
            a = addr + done
            m = self.find(a)
            cap = m.max_access if m is not None else 8
            off = a - m.base if m is not None else a
            if off:
                cap = min(cap, off & -off)
            n = _pow2floor(min(size - done, cap))
            yield m, a, n, done
            done += n

    def _count_unassigned(self, addr: int) -> None:
        n = self.unassigned.get(addr)
        if n is not None or len(self.unassigned) < self._unassigned_cap:
            self.unassigned[addr] = (n or 0) + 1

    def read(self, addr: int, size: int) -> int:
        """The value a guest read of ``size`` bytes at ``addr`` gets (see the module
        docstring: cut into pieces, unassigned bytes and master aborts read all-ones). Raises
        :class:`ValueError` for a ``size`` outside 1..8 (a caller's mistake: a guest's
        accesses are never wider)."""
        _check_access(self, addr, size)
        value = 0
        for m, a, n, pos in self._pieces(addr, size):
            if m is None:
                self._count_unassigned(a)
                v = (1 << (8 * n)) - 1
            else:
                try:
                    v = m.device.read(m.offset + (a - m.base), n) & ((1 << (8 * n)) - 1)
                except GuestMemoryError:
                    v = (1 << (8 * n)) - 1
            value |= v << (8 * pos)
        return value

    def write(self, addr: int, size: int, value: int) -> None:
        """Hand a guest write of ``value`` (``size`` bytes) at ``addr`` to the devices it
        covers (unassigned bytes and master aborts are dropped). Raises :class:`ValueError`
        for a ``size`` outside 1..8 (a caller's mistake: a guest's accesses are never wider)."""
        _check_access(self, addr, size)
        for m, a, n, pos in self._pieces(addr, size):
            if m is None:
                self._count_unassigned(a)
                continue
            try:
                m.device.write(m.offset + (a - m.base), n, (value >> (8 * pos)) & ((1 << (8 * n)) - 1))
            except GuestMemoryError:
                pass

    def read_bytes(self, addr: int, size: int, count: int = 1) -> bytes:
        """``count`` reads of ``size`` bytes at ``addr`` (a string ``INS``), as bytes. A device
        with ``read_repeated(offset, size, count) -> bytes`` serves all of them in one call
        when one range holds the whole access (fw_cfg's data port: a 4 KiB ``rep insb``)."""
        _check_access(self, addr, size)
        if not _is_int(count) or count < 0:
            raise ValueError(f"{self.name} bus: count must be an integer >= 0, not {count!r}")
        m = self.find(addr)
        fast = getattr(m.device, "read_repeated", None) if m is not None else None
        if m is not None and fast is not None and addr + size <= m.end and \
                size <= m.max_access and not (addr - m.base) % size:
            try:
                return bytes(fast(m.offset + (addr - m.base), size, count))
            except GuestMemoryError:
                return b"\xff" * (size * count)
        return b"".join(self.read(addr, size).to_bytes(size, "little") for _ in range(count))

    def write_bytes(self, addr: int, size: int, data: bytes) -> None:
        """Writes of ``size`` bytes at ``addr``, one per ``size``-byte piece of ``data`` (a
        string ``OUTS``)."""
        _check_access(self, addr, size)
        for i in range(0, len(data) - size + 1, size):
            self.write(addr, size, int.from_bytes(data[i:i + size], "little"))
