"""Split virtqueues, the device side (OASIS virtio 1.2, section 2.7): taking the descriptor
chains the driver made available, returning them through the used ring, and the notification
suppression of both directions (the ring flags, or the event index of section 2.7.7/2.7.10
when ``VIRTIO_F_EVENT_IDX`` was negotiated), with indirect descriptor tables (2.7.5.3).

Layout in guest memory (all little-endian; ``size`` is the queue size, a power of 2):

=================  ======================================================================
descriptor table   ``size`` x 16 bytes: addr u64, len u32, flags u16, next u16
                   (16-byte aligned)
available ring     flags u16, idx u16, ring[size] u16, used_event u16 (2-byte aligned)
used ring          flags u16, idx u16, ring[size] of (id u32, len u32), avail_event u16
                   (4-byte aligned)
=================  ======================================================================

The driver is untrusted. Every rule of section 2.7 the device depends on is checked when a
chain is taken, and a broken one raises :class:`QueueError` (after which the device sets
DEVICE_NEEDS_RESET and the queue refuses further use): a descriptor index past the table, a
chain longer than the queue (a loop), an indirect table that is empty, not a multiple of 16
bytes, longer than the queue, nested or whose ``next`` leaves it, ``INDIRECT`` without the
feature or together with ``NEXT``, a device-readable descriptor after a device-writable one,
buffer lengths summing past 32 bits, an available index more than ``size`` ahead, and rings or
buffers not in guest RAM. Work per :meth:`Virtqueue.pop` is bounded by the queue size (at most
``size`` descriptors walked, plus the avail index re-read once).

Ordering: x86 keeps stores in order and loads in order, but a load may pass an earlier store;
where the protocol needs a store to be visible before a later load (the used index before the
driver's suppression flags are read, the avail_event before the avail index is re-read) a
full barrier is made by taking and releasing a lock (a locked instruction on x86).
"""
from __future__ import annotations

import struct
import threading

from ...errors import GuestMemoryError, PykvmError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import List, Optional, Tuple, Union

# descriptor flags (section 2.7.5)
DESC_F_NEXT = 1
DESC_F_WRITE = 2
DESC_F_INDIRECT = 4
# available ring flags (2.7.6) and used ring flags (2.7.8)
AVAIL_F_NO_INTERRUPT = 1
USED_F_NO_NOTIFY = 1

DESC_SIZE = 16
MAX_QUEUE_SIZE = 32768            # split virtqueues (section 2.7)
MAX_CHAIN_BYTES = 0xFFFFFFFF      # the used ring's len is 32 bits

_DESC = struct.Struct("<QIHH")
_U16 = struct.Struct("<H")
_USED_ELEM = struct.Struct("<II")
_fence = threading.Lock()


def _mb() -> None:
    """A full memory barrier (the lock's locked read-modify-write orders stores before loads)."""
    _fence.acquire()
    _fence.release()


class QueueError(PykvmError):
    """The driver broke the ring rules (section 2.7): the device must set DEVICE_NEEDS_RESET.
    The message names the rule and the queue."""


class Chain:
    """One descriptor chain the driver made available: ``head`` (the index that goes into the
    used ring), ``readable`` and ``writable`` (``(GPA, length)`` buffers, driver->device and
    device->driver, each in chain order; zero-length descriptors are left out) and their
    totals in bytes ``readable_len`` / ``writable_len``. Every buffer was checked to lie in
    guest RAM when the chain was taken."""

    __slots__ = ("head", "readable", "writable", "readable_len", "writable_len", "_memory")

    def __init__(self, memory, head: int, readable: List[Tuple[int, int]],
                 writable: List[Tuple[int, int]]):
        self._memory = memory
        self.head = head
        self.readable = readable
        self.writable = writable
        self.readable_len = sum(n for _, n in readable)
        self.writable_len = sum(n for _, n in writable)

    def __repr__(self) -> str:
        return (f"Chain(head={self.head}, readable={self.readable_len} B in "
                f"{len(self.readable)}, writable={self.writable_len} B in {len(self.writable)})")

    def read(self, offset: int = 0, n: Optional[int] = None) -> bytes:
        """``n`` bytes (all that is left when None) of the readable part from byte ``offset``;
        fewer when the part ends first. Raises :class:`QueueError` if the RAM is gone."""
        if offset < 0:
            raise ValueError(f"negative offset {offset}")
        end = self.readable_len if n is None else min(self.readable_len, offset + max(n, 0))
        out = []
        pos = 0
        try:
            for gpa, length in self.readable:
                if pos >= end:
                    break
                lo, hi = max(offset, pos), min(end, pos + length)
                if lo < hi:
                    out.append(self._memory.read(gpa + lo - pos, hi - lo))
                pos += length
        except GuestMemoryError as e:
            raise QueueError(f"readable buffer of chain {self.head}: {e}") from None
        return b"".join(out)

    def write(self, data: Union[bytes, bytearray, memoryview], offset: int = 0) -> int:
        """Copy ``data`` into the writable part from byte ``offset``; returns the bytes
        written (fewer than ``len(data)`` when the part is smaller). Raises
        :class:`QueueError` if the RAM is gone."""
        if offset < 0:
            raise ValueError(f"negative offset {offset}")
        mv = memoryview(data).cast("B")
        done = 0
        pos = 0
        try:
            for gpa, length in self.writable:
                if done >= len(mv):
                    break
                start = offset + done
                if start < pos + length:
                    k = min(pos + length - start, len(mv) - done)
                    self._memory.write(gpa + start - pos, mv[done:done + k])
                    done += k
                pos += length
        except GuestMemoryError as e:
            raise QueueError(f"writable buffer of chain {self.head}: {e}") from None
        return done


class Virtqueue:
    """The device's side of one split virtqueue. ``memory``: :class:`pykvm.memory.GuestMemory`;
    ``index``: the queue's number (for messages); ``size``: entries (a power of 2, at most
    32768); ``desc``/``avail``/``used``: guest-physical addresses of the three parts;
    ``event_idx``/``indirect``: whether VIRTIO_F_EVENT_IDX / VIRTIO_F_INDIRECT_DESC were
    negotiated. Raises :class:`QueueError` if the size or an address breaks section 2.7
    (alignment, or a ring not wholly in guest RAM).

    Not thread-safe: one user at a time (the transport's lock). After a :class:`QueueError`
    the queue is broken: every later :meth:`pop` raises it again without touching memory."""

    def __init__(self, memory, index: int, size: int, desc: int, avail: int, used: int, *,
                 event_idx: bool, indirect: bool):
        if not (1 <= size <= MAX_QUEUE_SIZE) or size & (size - 1):
            raise QueueError(f"queue {index}: size {size} is not a power of 2 in 1..32768")
        for name, addr, align in (("descriptor table", desc, 16), ("available ring", avail, 2),
                                  ("used ring", used, 4)):
            if addr % align:
                raise QueueError(f"queue {index}: {name} at {addr:#x} is not "
                                 f"{align}-byte aligned")
        self._memory = memory
        self.index = index
        self.size = size
        self.desc = desc
        self.avail = avail
        self.used = used
        self.event_idx = event_idx
        self.indirect = indirect
        self.last_avail = 0          # next avail ring entry to take (free-running u16)
        self.used_idx = 0            # next used ring entry to fill (free-running u16)
        self._signalled = 0          # used_idx when needs_interrupt last answered
        self._notify = True          # whether the driver should notify (set_notification)
        self.broken: Optional[str] = None
        self._avail_event = used + 4 + 8 * size
        self._used_event = avail + 4 + 2 * size
        for name, addr, n in (("descriptor table", desc, DESC_SIZE * size),
                              ("available ring", avail, 6 + 2 * size),
                              ("used ring", used, 6 + 8 * size)):
            if not self._in_ram(addr, n):
                raise QueueError(f"queue {index}: {name} {addr:#x}+{n:#x} is not in guest RAM")

    def __repr__(self) -> str:
        return (f"Virtqueue(index={self.index}, size={self.size}, desc={self.desc:#x}, "
                f"avail={self.avail:#x}, used={self.used:#x})")

    # ---- helpers --------------------------------------------------------------------------

    def _in_ram(self, gpa: int, n: int) -> bool:
        """Whether ``[gpa, gpa + n)`` is guest RAM (it may span slots)."""
        if gpa < 0 or n < 0:
            return False
        end = gpa + n
        while gpa < end:
            s = self._memory.slot_at(gpa)
            if s is None:
                return False
            gpa = s.end
        return True

    def _fail(self, why: str) -> QueueError:
        self.broken = f"queue {self.index}: {why}"
        return QueueError(self.broken)

    def _u16(self, gpa: int) -> int:
        return int(_U16.unpack(self._memory.read(gpa, 2))[0])

    # ---- driver -> device ---------------------------------------------------------------

    def pending(self) -> int:
        """Chains the driver made available that :meth:`pop` has not taken yet. Raises
        :class:`QueueError` (the index more than ``size`` ahead, the ring gone)."""
        if self.broken:
            raise QueueError(self.broken)
        try:
            idx = self._u16(self.avail + 2)
        except GuestMemoryError as e:
            raise self._fail(f"available ring: {e}") from None
        n = (idx - self.last_avail) & 0xFFFF
        if n > self.size:
            raise self._fail(f"available index {idx} is {n} entries ahead of {self.last_avail}, "
                             f"more than the queue size {self.size}")
        return n

    def pop(self) -> Optional[Chain]:
        """The next chain the driver made available, or None when there is none. With the
        event index (and notifications enabled) also publishes ``avail_event`` so the driver
        notifies for the next one; when the ring looks empty it re-reads the index once after
        publishing, so a chain added meanwhile is not missed. Raises :class:`QueueError` for
        a chain that breaks section 2.7 (the queue is broken from then on)."""
        n = self.pending()
        if n == 0:
            if not (self.event_idx and self._notify):
                return None
            self._publish_avail_event()
            _mb()
            if self.pending() == 0:
                return None
        try:
            head = self._u16(self.avail + 4 + 2 * (self.last_avail % self.size))
        except GuestMemoryError as e:
            raise self._fail(f"available ring: {e}") from None
        chain = self._walk(head)
        self.last_avail = (self.last_avail + 1) & 0xFFFF
        if self.event_idx and self._notify:
            self._publish_avail_event()
        return chain

    def _publish_avail_event(self) -> None:
        try:
            self._memory.write(self._avail_event, _U16.pack(self.last_avail))
        except GuestMemoryError as e:
            raise self._fail(f"used ring: {e}") from None

    def _walk(self, head: int) -> Chain:
        """The chain starting at descriptor ``head``, every rule checked (module docstring)."""
        size = self.size
        if head >= size:
            raise self._fail(f"available ring entry names descriptor {head}, past the table "
                             f"of {size}")
        mem = self._memory
        readable: List[Tuple[int, int]] = []
        writable: List[Tuple[int, int]] = []
        total = 0
        walked = 0                   # descriptors visited, direct and indirect: at most size
        table, count, i = self.desc, size, head
        in_indirect = False
        while True:
            walked += 1
            if walked > size:
                raise self._fail(f"chain at {head} is longer than the queue size {size} "
                                 "(a loop?)")
            try:
                addr, length, flags, nxt = _DESC.unpack(mem.read(table + DESC_SIZE * i,
                                                                 DESC_SIZE))
            except GuestMemoryError as e:
                raise self._fail(f"descriptor table: {e}") from None
            if flags & DESC_F_INDIRECT:
                if in_indirect:
                    raise self._fail(f"chain at {head}: an indirect table inside an indirect "
                                     "table")
                if not self.indirect:
                    raise self._fail(f"chain at {head}: an indirect descriptor without "
                                     "VIRTIO_F_INDIRECT_DESC")
                if flags & DESC_F_NEXT:
                    raise self._fail(f"chain at {head}: INDIRECT together with NEXT")
                if length == 0 or length % DESC_SIZE:
                    raise self._fail(f"chain at {head}: indirect table of {length} bytes "
                                     "(not a positive multiple of 16)")
                if length // DESC_SIZE > size:
                    raise self._fail(f"chain at {head}: indirect table of "
                                     f"{length // DESC_SIZE} descriptors, more than the "
                                     f"queue size {size}")
                if not self._in_ram(addr, length):
                    raise self._fail(f"chain at {head}: indirect table {addr:#x}+{length:#x} "
                                     "is not in guest RAM")
                table, count, i = addr, length // DESC_SIZE, 0
                in_indirect = True
                walked -= 1              # the pointer itself carries no buffer
                continue
            if length:
                if not self._in_ram(addr, length):
                    raise self._fail(f"chain at {head}: buffer {addr:#x}+{length:#x} is not "
                                     "in guest RAM")
                total += length
                if total > MAX_CHAIN_BYTES:
                    raise self._fail(f"chain at {head}: buffer lengths sum past 32 bits")
                if flags & DESC_F_WRITE:
                    writable.append((addr, length))
                elif writable:
                    raise self._fail(f"chain at {head}: a device-readable buffer after a "
                                     "device-writable one")
                else:
                    readable.append((addr, length))
            elif not flags & DESC_F_WRITE and writable:
                raise self._fail(f"chain at {head}: a device-readable buffer after a "
                                 "device-writable one")
            if not flags & DESC_F_NEXT:
                break
            if nxt >= count:
                where = "indirect table" if in_indirect else "descriptor table"
                raise self._fail(f"chain at {head}: next {nxt} is past the {where} of {count}")
            i = nxt
        return Chain(mem, head, readable, writable)

    # ---- device -> driver ---------------------------------------------------------------

    def push(self, chain: Chain, written: int) -> None:
        """Return ``chain`` to the driver through the used ring, ``written``: bytes the device
        wrote into its writable part (clamped to 0..``chain.writable_len``). Raises
        :class:`QueueError` if the used ring is gone."""
        if self.broken:
            raise QueueError(self.broken)
        written = max(0, min(int(written), chain.writable_len))
        slot = self.used + 4 + 8 * (self.used_idx % self.size)
        try:
            self._memory.write(slot, _USED_ELEM.pack(chain.head, written))
            self.used_idx = (self.used_idx + 1) & 0xFFFF
            # x86 keeps stores in order: the element is visible before the index
            self._memory.write(self.used + 2, _U16.pack(self.used_idx))
        except GuestMemoryError as e:
            raise self._fail(f"used ring: {e}") from None

    def needs_interrupt(self) -> bool:
        """Whether the used buffers pushed since the last call should interrupt the driver:
        never when nothing was pushed; with the event index when the used index passed the
        driver's ``used_event`` (section 2.7.10), else unless the driver set
        VIRTQ_AVAIL_F_NO_INTERRUPT. Starts tracking afresh. Raises :class:`QueueError` if
        the available ring is gone."""
        old, new = self._signalled, self.used_idx
        self._signalled = new
        if old == new:
            return False
        _mb()                        # the used index is visible before the driver's words are read
        try:
            if self.event_idx:
                event = self._u16(self._used_event)
                return ((new - event - 1) & 0xFFFF) < ((new - old) & 0xFFFF)
            return not self._u16(self.avail) & AVAIL_F_NO_INTERRUPT
        except GuestMemoryError as e:
            raise self._fail(f"available ring: {e}") from None

    def set_notification(self, enabled: bool) -> None:
        """Ask the driver to notify (``enabled``) or not to notify the device of new available
        buffers: the used ring's VIRTQ_USED_F_NO_NOTIFY flag, or with the event index its
        ``avail_event`` (enabling sets it to the next entry to take; disabling leaves it, as
        Linux's vhost does, so the driver stops after one more notification at most). A
        device that enables notifications must call :meth:`pop` once more: a buffer made
        available before the driver saw the change sends no notification. Raises
        :class:`QueueError` if the used ring is gone."""
        self._notify = bool(enabled)
        try:
            if self.event_idx:
                if enabled:
                    self._publish_avail_event()
            else:
                flags = self._u16(self.used)
                flags = flags & ~USED_F_NO_NOTIFY if enabled else flags | USED_F_NO_NOTIFY
                self._memory.write(self.used, _U16.pack(flags))
        except GuestMemoryError as e:
            raise self._fail(f"used ring: {e}") from None
        if enabled:
            _mb()
