"""The split virtqueue's device side (pykvm.devices.virtio.queue) against rings built in real
guest RAM (:class:`pykvm.memory.GuestMemory` over anonymous mappings, as a VM has): chains
taken and returned as section 2.7 of virtio 1.2 says, every hostile layout the driver can make
ending in :class:`QueueError` (never another exception), and notification suppression by
flags and by event index."""
import struct

import pytest
from hypothesis import given, settings, strategies as st

from pykvm.devices.virtio.queue import (
    AVAIL_F_NO_INTERRUPT, DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE, USED_F_NO_NOTIFY, Chain,
    QueueError, Virtqueue)
from pykvm.memory import GuestMemory, MemorySlot, new_mapping

RAM = 1 << 20                   # slot 0: [0, 1 MiB); slot 1: [2 MiB, 3 MiB); a hole between
HIGH = 2 << 20
DESC, AVAIL, USED = 0x1000, 0x2000, 0x3000
DATA = 0x10000
SIZE = 16


@pytest.fixture(scope="module")
def memory():
    mem = GuestMemory()
    for slot, gpa in enumerate((0, HIGH)):
        m, pin = new_mapping(RAM)
        mem._add(MemorySlot(slot, gpa, RAM, 0, m, pin))
    yield mem
    mem._close()


class Driver:
    """The driver's side, written from the spec: descriptors, the available ring, reading the
    used ring."""

    def __init__(self, mem, size=SIZE, event_idx=False, indirect=True):
        self.mem, self.size = mem, size
        mem.zero(0, RAM)
        mem.zero(HIGH, RAM)
        self.avail_idx = 0
        self.q = Virtqueue(mem, 0, size, DESC, AVAIL, USED, event_idx=event_idx,
                           indirect=indirect)

    def desc(self, i, addr, length, flags=0, nxt=0, table=DESC):
        self.mem.write(table + 16 * i, struct.pack("<QIHH", addr, length, flags, nxt))

    def offer(self, head, bump=1):
        self.mem.write(AVAIL + 4 + 2 * (self.avail_idx % self.size), struct.pack("<H", head))
        self.avail_idx = (self.avail_idx + bump) & 0xFFFF
        self.mem.write(AVAIL + 2, struct.pack("<H", self.avail_idx))

    def chain(self, bufs, table=DESC, first=0):
        """Descriptors first..first+len-1 of ``table`` linked in order; bufs: (addr, len, write)."""
        for k, (addr, length, w) in enumerate(bufs):
            last = k == len(bufs) - 1
            self.desc(first + k, addr, length, (DESC_F_WRITE if w else 0) |
                      (0 if last else DESC_F_NEXT), first + k + 1, table)

    def used(self, k):
        return struct.unpack("<II", self.mem.read(USED + 4 + 8 * (k % self.size), 8))

    def used_idx(self):
        return struct.unpack("<H", self.mem.read(USED + 2, 2))[0]


def test_simple_chain_round_trip(memory):
    d = Driver(memory)
    memory.write(DATA, b"hello, device")
    d.chain([(DATA, 13, False), (DATA + 0x100, 8, True), (DATA + 0x200, 8, True)])
    d.offer(0)
    c = d.q.pop()
    assert isinstance(c, Chain)
    assert c.head == 0 and c.readable == [(DATA, 13)]
    assert c.writable == [(DATA + 0x100, 8), (DATA + 0x200, 8)]
    assert (c.readable_len, c.writable_len) == (13, 16)
    assert c.read() == b"hello, device" and c.read(7, 3) == b"dev" and c.read(20) == b""
    assert c.write(b"0123456789ABCDEFxyz") == 16          # short: the chain holds 16 bytes
    assert memory.read(DATA + 0x100, 8) == b"01234567"
    assert memory.read(DATA + 0x200, 8) == b"89ABCDEF"
    assert c.write(b"zz", offset=7) == 2
    assert memory.read(DATA + 0x107, 1) + memory.read(DATA + 0x200, 1) == b"zz"
    assert d.q.pop() is None
    d.q.push(c, 16)
    assert d.used_idx() == 1 and d.used(0) == (0, 16)
    assert d.q.needs_interrupt() is True
    assert d.q.needs_interrupt() is False                  # nothing pushed since


def test_written_is_clamped_to_the_writable_part(memory):
    d = Driver(memory)
    d.chain([(DATA, 4, True)])
    d.offer(0)
    d.q.push(d.q.pop(), 1 << 40)
    assert d.used(0) == (0, 4)


def test_buffers_may_span_memory_slots_only_where_ram_is_contiguous(memory):
    d = Driver(memory)
    d.chain([(HIGH + RAM - 4, 4, True)])
    d.offer(0)
    assert d.q.pop().writable == [(HIGH + RAM - 4, 4)]
    d.chain([(HIGH + RAM - 4, 8, True)])                  # runs past the end of RAM
    d.offer(0)
    with pytest.raises(QueueError, match="not in guest RAM"):
        d.q.pop()


def test_indirect_table(memory):
    d = Driver(memory)
    table = DATA + 0x1000
    d.chain([(DATA, 3, False), (DATA + 0x40, 5, True)], table=table)
    d.desc(0, table, 32, DESC_F_INDIRECT | DESC_F_WRITE)    # WRITE on the pointer is ignored
    d.offer(0)
    c = d.q.pop()
    assert c.readable == [(DATA, 3)] and c.writable == [(DATA + 0x40, 5)]
    d.q.push(c, 5)
    assert d.used(0) == (0, 5)


def test_direct_descriptors_before_an_indirect_one(memory):
    d = Driver(memory)
    table = DATA + 0x1000
    d.chain([(DATA + 0x40, 5, True)], table=table)
    d.desc(3, DATA, 3, DESC_F_NEXT, 5)
    d.desc(5, table, 16, DESC_F_INDIRECT)
    d.offer(3)
    c = d.q.pop()
    assert c.head == 3 and c.readable == [(DATA, 3)] and c.writable == [(DATA + 0x40, 5)]


def test_ring_wraps_past_65535(memory):
    d = Driver(memory, size=4)
    d.chain([(DATA, 1, True)])
    for _ in range(66003):
        d.offer(0)
        c = d.q.pop()
        assert c is not None and c.head == 0
        d.q.push(c, 1)
    assert d.used_idx() == d.avail_idx == 66003 & 0xFFFF


# ---- hostile drivers --------------------------------------------------------------------

def _broken(d, match):
    with pytest.raises(QueueError, match=match):
        d.q.pop()
    with pytest.raises(QueueError):                       # and it stays broken
        d.q.pop()


def test_chain_that_loops(memory):
    d = Driver(memory)
    d.desc(0, DATA, 4, DESC_F_NEXT, 1)
    d.desc(1, DATA, 4, DESC_F_NEXT, 0)
    d.offer(0)
    _broken(d, "longer than the queue size")


def test_chain_longer_than_the_queue_without_a_loop_is_impossible_but_self_loop_is(memory):
    d = Driver(memory)
    d.desc(2, DATA, 4, DESC_F_NEXT, 2)
    d.offer(2)
    _broken(d, "longer than the queue size")


def test_head_past_the_table(memory):
    d = Driver(memory)
    d.offer(SIZE)
    _broken(d, "past the table")


def test_next_past_the_table(memory):
    d = Driver(memory)
    d.desc(0, DATA, 4, DESC_F_NEXT, SIZE)
    d.offer(0)
    _broken(d, "next 16 is past the descriptor table")


@pytest.mark.parametrize("length", [0, 8, 24, 17 * 16])
def test_indirect_table_of_a_bad_length(memory, length):
    d = Driver(memory)
    d.desc(0, DATA + 0x1000, length, DESC_F_INDIRECT)
    d.offer(0)
    _broken(d, "indirect table of")


def test_nested_indirect(memory):
    d = Driver(memory)
    table = DATA + 0x1000
    d.desc(0, table + 0x100, 16, DESC_F_INDIRECT, table=table)
    d.desc(0, table, 16, DESC_F_INDIRECT)
    d.offer(0)
    _broken(d, "inside an indirect table")


def test_indirect_next_leaves_the_table(memory):
    d = Driver(memory)
    table = DATA + 0x1000
    d.desc(0, DATA, 4, DESC_F_NEXT, 2, table=table)        # the table has 2 entries
    d.desc(0, table, 32, DESC_F_INDIRECT)
    d.offer(0)
    _broken(d, "past the indirect table of 2")


def test_indirect_loop(memory):
    d = Driver(memory)
    table = DATA + 0x1000
    d.desc(0, DATA, 4, DESC_F_NEXT, 1, table=table)
    d.desc(1, DATA, 4, DESC_F_NEXT, 0, table=table)
    d.desc(0, table, 32, DESC_F_INDIRECT)
    d.offer(0)
    _broken(d, "longer than the queue size")


def test_indirect_with_next(memory):
    d = Driver(memory)
    d.chain([(DATA, 4, False)], table=DATA + 0x1000)
    d.desc(0, DATA + 0x1000, 16, DESC_F_INDIRECT | DESC_F_NEXT, 1)
    d.desc(1, DATA, 4)
    d.offer(0)
    _broken(d, "INDIRECT together with NEXT")


def test_indirect_without_the_feature(memory):
    d = Driver(memory, indirect=False)
    d.chain([(DATA, 4, False)], table=DATA + 0x1000)
    d.desc(0, DATA + 0x1000, 16, DESC_F_INDIRECT)
    d.offer(0)
    _broken(d, "without VIRTIO_F_INDIRECT_DESC")


def test_indirect_table_outside_ram(memory):
    d = Driver(memory)
    d.desc(0, RAM + 0x1000, 64, DESC_F_INDIRECT)
    d.offer(0)
    _broken(d, "indirect table .* is not in guest RAM")


@pytest.mark.parametrize("zero_len", [False, True])
def test_readable_after_writable(memory, zero_len):
    d = Driver(memory)
    d.chain([(DATA, 4, True), (DATA + 8, 0 if zero_len else 4, False)])
    d.offer(0)
    _broken(d, "readable buffer after a device-writable")


def test_readable_after_writable_across_the_indirect_pointer(memory):
    d = Driver(memory)
    table = DATA + 0x1000
    d.chain([(DATA, 4, False)], table=table)
    d.desc(0, DATA + 0x40, 4, DESC_F_WRITE | DESC_F_NEXT, 1)
    d.desc(1, table, 16, DESC_F_INDIRECT)
    d.offer(0)
    _broken(d, "readable buffer after a device-writable")


def test_lengths_overflow_32_bits(memory):
    # every buffer is in RAM (they overlap, as the spec does not forbid); only their sum is
    # too long for the used ring's 32-bit length
    mem = GuestMemory.anonymous(1 << 30)
    try:
        q = Virtqueue(mem, 0, 8, DESC, AVAIL, USED, event_idx=False, indirect=False)
        for i in range(5):                                 # 5 x (1 GiB - 64 KiB) > 4 GiB
            mem.write(DESC + 16 * i, struct.pack("<QIHH", 0x10000, (1 << 30) - 0x10000,
                                                 DESC_F_WRITE | DESC_F_NEXT, i + 1))
        mem.write(DESC + 16 * 4, struct.pack("<QIHH", 0x10000, (1 << 30) - 0x10000,
                                             DESC_F_WRITE, 0))
        mem.write(AVAIL + 2, struct.pack("<H", 1))
        with pytest.raises(QueueError, match="sum past 32 bits"):
            q.pop()
    finally:
        mem._close()


def test_avail_idx_jumps_more_than_size_ahead(memory):
    d = Driver(memory)
    d.chain([(DATA, 4, False)])
    d.offer(0, bump=SIZE + 1)
    _broken(d, "more than the queue size")


def test_avail_idx_exactly_size_ahead_is_fine(memory):
    d = Driver(memory)
    d.chain([(DATA, 4, False)])
    d.offer(0, bump=SIZE)
    assert d.q.pending() == SIZE


def test_buffer_outside_ram(memory):
    d = Driver(memory)
    d.chain([(RAM + 0x100, 4, False)])
    d.offer(0)
    _broken(d, "buffer 0x100100\\+0x4 is not in guest RAM")


def test_buffer_address_wraps_64_bits(memory):
    d = Driver(memory)
    d.chain([((1 << 64) - 2, 4, True)])
    d.offer(0)
    _broken(d, "not in guest RAM")


@pytest.mark.parametrize("where", ["desc", "avail", "used"])
def test_rings_outside_ram(memory, where):
    addrs = dict(desc=DESC, avail=AVAIL, used=USED)
    addrs[where] = RAM - 16                                 # runs past the end of slot 0
    with pytest.raises(QueueError, match="not in guest RAM"):
        Virtqueue(memory, 0, SIZE, addrs["desc"], addrs["avail"], addrs["used"],
                  event_idx=False, indirect=False)


@pytest.mark.parametrize("size,desc,avail,used,match", [
    (0, DESC, AVAIL, USED, "power of 2"), (12, DESC, AVAIL, USED, "power of 2"),
    (65536, DESC, AVAIL, USED, "power of 2"), (SIZE, DESC + 8, AVAIL, USED, "aligned"),
    (SIZE, DESC, AVAIL + 1, USED, "aligned"), (SIZE, DESC, AVAIL, USED + 2, "aligned")])
def test_bad_geometry(memory, size, desc, avail, used, match):
    with pytest.raises(QueueError, match=match):
        Virtqueue(memory, 0, size, desc, avail, used, event_idx=False, indirect=False)


def test_pop_work_is_bounded_by_the_queue_size(memory):
    """A hostile loop costs at most ``size`` descriptor reads: count them."""
    d = Driver(memory, size=256)
    for i in range(256):
        d.desc(i, DATA, 1, DESC_F_NEXT, (i + 1) % 256)
    d.offer(0)
    reads = []
    real = memory.read

    class Counting:
        def read(self, gpa, n):
            reads.append(gpa)
            return real(gpa, n)

        def __getattr__(self, name):
            return getattr(memory, name)

    d.q._memory = Counting()
    with pytest.raises(QueueError):
        d.q.pop()
    assert len(reads) <= 256 + 2


# ---- notifications ----------------------------------------------------------------------

def test_no_interrupt_flag(memory):
    d = Driver(memory)
    d.chain([(DATA, 4, True)])
    memory.write(AVAIL, struct.pack("<H", AVAIL_F_NO_INTERRUPT))
    d.offer(0)
    d.q.push(d.q.pop(), 0)
    assert d.q.needs_interrupt() is False
    memory.write(AVAIL, struct.pack("<H", 0))
    d.offer(0)
    d.q.push(d.q.pop(), 0)
    assert d.q.needs_interrupt() is True


def test_no_notify_flag(memory):
    d = Driver(memory)
    d.q.set_notification(False)
    assert struct.unpack("<H", memory.read(USED, 2))[0] & USED_F_NO_NOTIFY
    d.q.set_notification(True)
    assert not struct.unpack("<H", memory.read(USED, 2))[0] & USED_F_NO_NOTIFY


def test_used_event(memory):
    d = Driver(memory, event_idx=True)
    d.chain([(DATA, 4, True)])
    used_event = AVAIL + 4 + 2 * SIZE
    memory.write(used_event, struct.pack("<H", 2))           # interrupt when entry 2 is used
    for expect in (False, False, True, False):
        d.offer(0)
        d.q.push(d.q.pop(), 4)
        assert d.q.needs_interrupt() is expect
    # several pushes between checks: crossing the event in the batch interrupts
    memory.write(used_event, struct.pack("<H", 5))
    for _ in range(3):
        d.offer(0)
        d.q.push(d.q.pop(), 4)
    assert d.q.needs_interrupt() is True                      # used 4 -> 7 passed entry 5


def test_avail_event_follows_pop(memory):
    d = Driver(memory, event_idx=True)
    avail_event = USED + 4 + 8 * SIZE
    d.chain([(DATA, 4, True)])
    d.offer(0)
    d.offer(0)
    d.q.pop()
    assert struct.unpack("<H", memory.read(avail_event, 2))[0] == 1
    d.q.set_notification(False)
    d.q.pop()
    assert struct.unpack("<H", memory.read(avail_event, 2))[0] == 1   # left while disabled
    assert d.q.pop() is None
    d.q.set_notification(True)
    assert struct.unpack("<H", memory.read(avail_event, 2))[0] == 2


# ---- random chains ----------------------------------------------------------------------

buffers = st.lists(st.tuples(st.integers(0, 300), st.booleans()), min_size=1, max_size=SIZE)


@settings(max_examples=150, deadline=None)
@given(bufs=buffers, indirect=st.booleans(), head=st.integers(0, SIZE - 1),
       batch=st.integers(1, 3), event_idx=st.booleans())
def test_random_chains_round_trip(memory, bufs, indirect, head, batch, event_idx):
    bufs = sorted(bufs, key=lambda b: b[1])                 # readable ones first
    d = Driver(memory, event_idx=event_idx)
    layout, addr = [], DATA
    for length, w in bufs:
        layout.append((addr, length, w))
        memory.write(addr, bytes((addr + k) & 0xFF for k in range(length)))
        addr += length + 16
    if indirect:
        table = HIGH
        d.chain(layout, table=table)
        d.desc(head, table, 16 * len(layout), DESC_F_INDIRECT)
    else:
        # descriptors head, head+1, ... modulo the size, linked in order
        for k, (a, length, w) in enumerate(layout):
            i, last = (head + k) % SIZE, k == len(layout) - 1
            d.desc(i, a, length, (DESC_F_WRITE if w else 0) | (0 if last else DESC_F_NEXT),
                   (i + 1) % SIZE)
    for _ in range(batch):
        d.offer(head)
    for n in range(batch):
        c = d.q.pop()
        assert c.head == head
        assert c.readable == [(a, n_) for a, n_, w in layout if not w and n_]
        assert c.writable == [(a, n_) for a, n_, w in layout if w and n_]
        expect = b"".join(bytes((a + k) & 0xFF for k in range(n_))
                          for a, n_, w in layout if not w)
        assert c.read() == expect
        payload = bytes(range(256)) * 20
        assert c.write(payload[:c.writable_len + 3]) == c.writable_len
        d.q.push(c, c.writable_len)
        assert d.used(n) == (head, c.writable_len)
    assert d.q.pop() is None
    assert d.used_idx() == batch
    got = b"".join(memory.read(a, n_) for a, n_, w in layout if w)
    assert got == (bytes(range(256)) * 20)[:len(got)]
    assert d.q.needs_interrupt() is True        # used_event 0 / no flags: every batch
