"""virtio-console (pykvm.devices.virtio.console) driven through real split virtqueues in real
guest RAM: guest output reaches ``on_output`` in order, host input reaches the driver's receive
buffers whenever the driver posts them (also input fed before any buffer existed), the input
buffer is bounded with drops counted, feeding from other threads loses nothing, and hostile
rings set DEVICE_NEEDS_RESET without an exception."""
import struct
import threading

import pytest

from pykvm.devices.virtio import F_VERSION_1, ID_CONSOLE, INT_CONFIG, INT_VRING, DeviceHandles
from pykvm.devices.virtio.console import (
    F_EMERG_WRITE, F_SIZE, INPUT_LIMIT, OUTPUT_PIECE, VirtioConsole)
from pykvm.devices.virtio.queue import DESC_F_NEXT, DESC_F_WRITE, Virtqueue
from pykvm.memory import GuestMemory

RAM = 4 << 20
QSIZE = 32
# per queue: descriptor table, available ring, used ring, data area
RINGS = {0: (0x1000, 0x2000, 0x3000, 0x100000), 1: (0x5000, 0x6000, 0x7000, 0x200000)}


@pytest.fixture(scope="module")
def memory():
    mem = GuestMemory.anonymous(RAM)
    yield mem
    mem._close()


class Ring:
    """The driver's side of one queue: posts chains, reads the used ring."""

    def __init__(self, mem, index):
        self.mem, self.index = mem, index
        self.desc, self.avail, self.used, self.data = RINGS[index]
        self.q = Virtqueue(mem, index, QSIZE, self.desc, self.avail, self.used,
                           event_idx=False, indirect=True)
        self.avail_idx = 0
        self.next_desc = 0
        self.next_data = self.data
        self.seen = 0
        self.chains = {}
        self.got = bytearray()           # what the device wrote into used chains, in order

    def post(self, bufs):
        """bufs: (bytes, False) device-readable or (length, True) device-writable; returns
        the chain's head and its buffers."""
        head = self.next_desc % QSIZE
        laid = []
        for k, (b, w) in enumerate(bufs):
            n = b if w else len(b)
            gpa = self.next_data
            self.next_data += n + 16
            if not w:
                self.mem.write(gpa, b)
            i = (head + k) % QSIZE
            last = k == len(bufs) - 1
            self.mem.write(self.desc + 16 * i, struct.pack(
                "<QIHH", gpa, n, (DESC_F_WRITE if w else 0) | (0 if last else DESC_F_NEXT),
                (i + 1) % QSIZE))
            laid.append((gpa, n))
        self.next_desc += len(bufs)
        self.chains[head] = laid
        self.mem.write(self.avail + 4 + 2 * (self.avail_idx % QSIZE), struct.pack("<H", head))
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.mem.write(self.avail + 2, struct.pack("<H", self.avail_idx))
        return head, laid

    def take_used(self):
        """[(head, len)] of used elements not seen before; the bytes written into them are
        added to :attr:`got`."""
        idx = struct.unpack("<H", self.mem.read(self.used + 2, 2))[0]
        out = []
        while self.seen != idx:
            head, n = struct.unpack("<II", self.mem.read(
                self.used + 4 + 8 * (self.seen % QSIZE), 8))
            out.append((head, n))
            for gpa, k in self.chains[head]:
                take = min(n, k)
                self.got += self.mem.read(gpa, take)
                n -= take
            self.seen = (self.seen + 1) & 0xFFFF
        return out


class Console:
    def __init__(self, mem, dev=None, **kw):
        mem.zero(0, RAM)
        self.out = []
        self.dev = dev or VirtioConsole(self.out.append, **kw)
        self.irqs = []
        self.resets = 0
        self.rx, self.tx = Ring(mem, 0), Ring(mem, 1)

    def activate(self):
        handles = DeviceHandles(lambda cause, queue=-1: self.irqs.append((cause, queue)),
                                self._reset)
        self.dev.activate(self.dev.device_features() | (1 << F_VERSION_1),
                          [self.rx.q, self.tx.q], handles)

    def _reset(self):
        self.resets += 1


def test_features_and_config():
    dev = VirtioConsole(lambda b: None, cols=132, rows=43)
    assert dev.device_id == ID_CONSOLE == 3 and dev.num_queues == 2
    assert dev.device_features() == (1 << F_SIZE) | (1 << F_EMERG_WRITE)
    assert dev.config_read(0, 2) == 132 and dev.config_read(2, 2) == 43
    assert dev.config_read(0, 4) == 132 | 43 << 16
    assert dev.config_read(4, 4) == 1 and dev.config_read(8, 4) == 0     # max_nr_ports, emerg
    assert dev.config_read(12, 4) == 0 and dev.config_read(1, 1) == 0
    for bad in ((0, 25), (80, 65536), ("80", 25), (True, 25)):
        with pytest.raises(ValueError, match="console"):
            VirtioConsole(lambda b: None, cols=bad[0], rows=bad[1])
    with pytest.raises(TypeError):
        VirtioConsole(None)


def test_guest_output_reaches_on_output_in_order(memory):
    c = Console(memory)
    c.activate()
    h1, _ = c.tx.post([(b"hello, ", False), (b"wor", False)])
    h2, _ = c.tx.post([(b"ld\n", False), (8, True)])        # writable part: ignored
    c.dev.notify(1)
    assert b"".join(c.out) == b"hello, world\n"
    assert c.tx.take_used() == [(h1, 0), (h2, 0)]
    assert c.irqs == [(INT_VRING, 1)] and c.dev.output_bytes == 13
    c.dev.notify(1)                                          # nothing new: no output, no irq
    assert len(c.irqs) == 1 and b"".join(c.out) == b"hello, world\n"


def test_large_output_is_handed_over_in_bounded_pieces(memory):
    c = Console(memory)
    c.activate()
    big = bytes(range(256)) * 1024                           # 256 KiB in one buffer
    c.tx.post([(big, False)])
    c.dev.notify(1)
    assert b"".join(c.out) == big
    assert max(map(len, c.out)) <= OUTPUT_PIECE and len(c.out) >= 4


def test_input_fed_before_buffers_is_delivered_when_they_come(memory):
    c = Console(memory)
    assert c.dev.feed(b"hello") == 5                         # before the driver is there
    c.activate()
    assert c.dev.input_pending == 5 and c.irqs == []
    c.rx.post([(3, True)])
    c.rx.post([(10, True)])
    c.dev.notify(0)
    used = c.rx.take_used()
    assert [n for _, n in used] == [3, 2]
    assert bytes(c.rx.got) == b"hello"
    assert c.irqs == [(INT_VRING, 0)] and c.dev.input_pending == 0
    # the 10-byte buffer was used for 2 bytes; the next input needs a new buffer
    c.dev.feed(b"xy")
    assert c.rx.take_used() == [] and c.dev.input_pending == 2
    c.rx.post([(4, True), (4, True)])
    c.dev.notify(0)
    c.rx.take_used()
    assert bytes(c.rx.got) == b"helloxy"


def test_input_fed_while_buffers_wait_is_delivered_at_once(memory):
    c = Console(memory)
    c.activate()
    laid = [c.rx.post([(64, True)])]
    c.dev.notify(0)                                          # no input yet: buffer stays
    assert c.rx.take_used() == [] and c.irqs == []
    c.dev.feed(b"ls -l\r")
    used = c.rx.take_used()
    assert used == [(laid[0][0], 6)] and bytes(c.rx.got) == b"ls -l\r"
    assert c.irqs == [(INT_VRING, 0)]


def test_input_overflow_is_dropped_and_counted(memory):
    c = Console(memory)
    data = bytes(i % 251 for i in range(INPUT_LIMIT + 100))
    assert c.dev.feed(data) == INPUT_LIMIT
    assert c.dev.input_dropped == 100 and c.dev.input_pending == INPUT_LIMIT
    assert c.dev.feed(b"more") == 0 and c.dev.input_dropped == 104
    c.activate()
    laid = [c.rx.post([(16384, True)]) for _ in range(5)]
    c.dev.notify(0)
    used = c.rx.take_used()
    assert [n for _, n in used] == [16384] * 4               # the fifth buffer was not taken
    assert bytes(c.rx.got) == data[:INPUT_LIMIT]
    assert c.dev.input_pending == 0
    c.dev.feed(b"z")                                         # room again: the waiting buffer
    used = c.rx.take_used()
    assert used == [(laid[4][0], 1)]


def test_feeding_from_threads_loses_nothing(memory):
    c = Console(memory)
    c.activate()
    pieces = {t: [bytes([65 + t]) * (i % 7 + 1) for i in range(200)] for t in range(4)}
    total = sum(len(p) for ps in pieces.values() for p in ps)
    assert total < INPUT_LIMIT

    def feeder(t):
        for p in pieces[t]:
            c.dev.feed(p)

    threads = [threading.Thread(target=feeder, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    posted = used = 0
    for _ in range(100000):
        if len(c.rx.got) >= total:
            break
        if posted - used < QSIZE // 2:
            c.rx.post([(97, True)])
            posted += 1
            c.dev.notify(0)
        used += len(c.rx.take_used())
    for th in threads:
        th.join()
    data = bytes(c.rx.got)
    assert len(data) == total and c.dev.input_dropped == 0
    for t in range(4):                                       # each thread's bytes, in its order
        assert data.count(bytes([65 + t])) == sum(map(len, pieces[t]))


def test_resize_and_emergency_write(memory):
    c = Console(memory)
    c.dev.config_write(8, 4, 0x4121)                          # before DRIVER_OK too
    assert c.out == [b"!"]
    c.activate()
    c.dev.resize(100, 30)
    assert c.dev.config_read(0, 4) == 100 | 30 << 16
    assert c.irqs == [(INT_CONFIG, -1)]
    with pytest.raises(ValueError):
        c.dev.resize(0, 30)
    c.dev.config_write(0, 2, 5)                               # cols is read-only
    assert c.dev.config_read(0, 2) == 100


def test_hostile_rings_set_needs_reset_without_raising(memory):
    c = Console(memory)
    c.activate()
    # a transmit chain that loops on itself
    memory.write(c.tx.desc, struct.pack("<QIHH", c.tx.data, 4, DESC_F_NEXT, 0))
    memory.write(c.tx.avail + 4, struct.pack("<H", 0))
    memory.write(c.tx.avail + 2, struct.pack("<H", 1))
    c.dev.notify(1)
    assert c.resets == 1 and c.out == []
    c.dev.notify(1)
    c.dev.notify(7)                                           # no such queue
    assert c.resets == 1
    # after a reset, a fresh pair of queues works, and input kept across the reset arrives
    c.dev.feed(b"kept")
    c.dev.reset()
    c2 = Console(memory, dev=c.dev)
    c2.activate()
    c2.rx.post([(8, True)])
    c2.dev.notify(0)
    c2.rx.take_used()
    assert bytes(c2.rx.got) == b"kept"
    # a receive chain with no writable byte is returned empty; the input waits
    c2.dev.feed(b"q")
    laid = [c2.rx.post([(b"ro", False)])]
    c2.dev.notify(0)
    assert c2.rx.take_used() == [(laid[0][0], 0)] and c2.dev.input_pending == 1
    # an available index far ahead of the ring breaks the receive queue
    memory.write(c2.rx.avail + 2, struct.pack("<H", 1000))
    c2.dev.notify(0)
    assert c2.resets == 1
    c2.dev.feed(b"after")                                     # still no exception
    c.dev.close()
    c.dev.close()
    assert c.dev.input_pending == 0
