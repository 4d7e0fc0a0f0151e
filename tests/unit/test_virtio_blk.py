"""virtio-blk (pykvm.devices.virtio.blk) driven through a real split virtqueue in real guest RAM
(anonymous mappings in a :class:`GuestMemory`, as a VM has), with real image files: requests
built as a driver builds them (virtio 1.2 section 5.2.6), the image checked with plain file
reads, hostile requests answered with their status byte, the image lock, and a write that
survives SIGKILL after FLUSH."""
import os
import signal
import struct
import subprocess
import sys
import textwrap

import pytest

from pykvm.devices.virtio import F_VERSION_1, ID_BLOCK, INT_VRING, DeviceHandles
from pykvm.devices.virtio.blk import (
    F_BLK_SIZE, F_DISCARD, F_FLUSH, F_RO, F_SEG_MAX, F_WRITE_ZEROES, MAX_RANGE_SECTORS,
    MAX_RANGE_SEGS, S_IOERR, S_OK, S_UNSUPP, T_DISCARD, T_FLUSH, T_GET_ID, T_IN, T_OUT,
    T_WRITE_ZEROES, DiskError, DiskLocked, VirtioBlk)
from pykvm.devices.virtio.queue import DESC_F_NEXT, DESC_F_WRITE, Virtqueue
from pykvm.errors import PykvmError
from pykvm.memory import GuestMemory, MemorySlot, new_mapping

SLOT = 1 << 20                  # two adjacent slots: [0, 1 MiB) and [1 MiB, 2 MiB)
DESC, AVAIL, USED = 0x1000, 0x2000, 0x3000
HEAP = 0x10000
QSIZE = 64
IMAGE = 1 << 20                 # 2048 sectors


@pytest.fixture(scope="module")
def memory():
    mem = GuestMemory()
    for slot in range(2):
        m, pin = new_mapping(SLOT)
        mem._add(MemorySlot(slot, slot * SLOT, SLOT, 0, m, pin))
    yield mem
    mem._close()


def make_image(path, size=IMAGE, fill=None):
    data = fill if fill is not None else bytes(i * 7 % 251 for i in range(size))
    with open(path, "wb") as f:
        f.write(data)
    return data


def file_bytes(path, off=0, n=None):
    with open(path, "rb") as f:
        f.seek(off)
        return f.read() if n is None else f.read(n)


class Driver:
    """The driver's side of one request queue, written from the spec: it lays out each
    request's descriptors (header, data, status) in guest RAM, makes the chain available,
    notifies, and reads the used ring and the status byte."""

    def __init__(self, mem, dev, features=None, event_idx=False):
        self.mem, self.dev = mem, dev
        mem.zero(0, 2 * SLOT)
        self.q = Virtqueue(mem, 0, QSIZE, DESC, AVAIL, USED, event_idx=event_idx,
                           indirect=True)
        self.avail_idx = 0
        self.irqs = []
        self.resets = 0
        if features is None:
            features = dev.device_features() | (1 << F_VERSION_1)
        handles = DeviceHandles(lambda cause, queue=-1: self.irqs.append((cause, queue)),
                                self._reset)
        dev.activate(features, [self.q], handles)

    def _reset(self):
        self.resets += 1

    def submit(self, bufs, at=HEAP):
        """bufs: (bytes, False) device-readable or (length or bytes, True) device-writable,
        laid out from ``at`` on; returns [(gpa, len, writable)]."""
        laid, gpa = [], at
        for k, (b, w) in enumerate(bufs):
            n = b if isinstance(b, int) else len(b)
            if not isinstance(b, int):
                self.mem.write(gpa, b)
            else:
                self.mem.write(gpa, b"\xee" * n)           # poison: the device must fill it
            last = k == len(bufs) - 1
            self.mem.write(DESC + 16 * k, struct.pack(
                "<QIHH", gpa, n, (DESC_F_WRITE if w else 0) | (0 if last else DESC_F_NEXT),
                k + 1))
            laid.append((gpa, n, w))
            gpa += n + 64
        self.mem.write(AVAIL + 4 + 2 * (self.avail_idx % QSIZE), struct.pack("<H", 0))
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.mem.write(AVAIL + 2, struct.pack("<H", self.avail_idx))
        self.dev.notify(0)
        return laid

    def used(self):
        """(id, len) of the last used element."""
        idx = struct.unpack("<H", self.mem.read(USED + 2, 2))[0]
        assert idx == self.avail_idx, "the device did not return the request"
        return struct.unpack("<II", self.mem.read(USED + 4 + 8 * ((idx - 1) % QSIZE), 8))

    def request(self, rtype, sector=0, out=b"", in_len=0, split=None, at=HEAP):
        """One well-formed request: (status, data read, used length). ``split``: the data
        buffer's descriptor sizes."""
        bufs = [(struct.pack("<IIQ", rtype, 0, sector), False)]
        sizes = split or ([len(out)] if out else [in_len] if in_len else [])
        pos = 0
        for n in sizes:
            bufs.append((out[pos:pos + n], False) if out else (n, True))
            pos += n
        bufs.append((1, True))
        laid = self.submit(bufs, at)
        data = b"".join(self.mem.read(g, n) for g, n, w in laid[1:-1] if w)
        status = self.mem.read(laid[-1][0], 1)[0]
        return status, data, self.used()[1]


def seg(sector, count, flags=0):
    return struct.pack("<QII", sector, count, flags)


def test_features_and_config_space(tmp_path):
    img = tmp_path / "d.img"
    make_image(img)
    dev = VirtioBlk(str(img), serial="abc", block_size=4096)
    try:
        f = dev.device_features()
        for bit in (F_SEG_MAX, F_BLK_SIZE, F_FLUSH, F_DISCARD, F_WRITE_ZEROES):
            assert f >> bit & 1
        assert not f >> F_RO & 1
        assert dev.device_id == ID_BLOCK == 2 and dev.num_queues == 1
        assert dev.config_read(0, 8) == IMAGE // 512                  # capacity, in sectors
        assert dev.config_read(0, 4) == IMAGE // 512 and dev.config_read(4, 4) == 0
        assert dev.config_read(12, 4) == dev.queue_max - 2            # seg_max
        assert dev.config_read(20, 4) == 4096                         # blk_size
        assert dev.config_read(36, 4) == MAX_RANGE_SECTORS            # max_discard_sectors
        assert dev.config_read(40, 4) == MAX_RANGE_SEGS
        assert dev.config_read(44, 4) == 8                            # alignment, sectors
        assert dev.config_read(48, 4) == MAX_RANGE_SECTORS            # max_write_zeroes_*
        assert dev.config_read(52, 4) == MAX_RANGE_SEGS
        assert dev.config_read(56, 1) == int(dev.may_unmap)
        assert dev.config_read(21, 1) == 0x10 and dev.config_read(20, 2) == 4096
        assert dev.config_read(200, 4) == 0 and dev.config_read(58, 8) == 0
        dev.config_write(0, 8, 0)                                    # read-only: ignored
        assert dev.config_read(0, 8) == IMAGE // 512
    finally:
        dev.close()


def test_write_read_flush_round_trip(memory, tmp_path):
    img = tmp_path / "d.img"
    orig = make_image(img)
    dev = VirtioBlk(str(img))
    try:
        d = Driver(memory, dev)
        payload = os.urandom(3 * 512)
        st, _, used = d.request(T_OUT, 5, out=payload, split=[512, 1024])
        assert (st, used) == (S_OK, 1)
        assert d.irqs == [(INT_VRING, 0)]
        assert file_bytes(img, 5 * 512, 3 * 512) == payload          # through pwritev
        assert file_bytes(img, 0, 5 * 512) == orig[:5 * 512]         # neighbours untouched
        assert file_bytes(img, 8 * 512) == orig[8 * 512:]
        st, data, used = d.request(T_IN, 4, in_len=5 * 512, split=[1024, 512, 1024])
        assert (st, used) == (S_OK, 5 * 512 + 1)
        assert data == orig[4 * 512:5 * 512] + payload + orig[8 * 512:9 * 512]
        assert d.request(T_FLUSH)[:3:2] == (S_OK, 1)
        # the last sector of the disk, and a zero-length read at the end
        st, data, _ = d.request(T_IN, IMAGE // 512 - 1, in_len=512)
        assert st == S_OK and data == orig[-512:]
        assert d.request(T_IN, IMAGE // 512)[0] == S_OK
        assert len(d.irqs) == 5 and d.resets == 0
    finally:
        dev.close()


def test_buffers_spanning_two_memory_slots(memory, tmp_path):
    img = tmp_path / "d.img"
    orig = make_image(img)
    dev = VirtioBlk(str(img))
    try:
        d = Driver(memory, dev)
        at = SLOT - 600                   # the data buffer runs from slot 0 into slot 1
        payload = os.urandom(1024)
        assert d.request(T_OUT, 100, out=payload, at=at)[0] == S_OK
        assert file_bytes(img, 100 * 512, 1024) == payload
        st, data, _ = d.request(T_IN, 99, in_len=1536, at=at)
        assert st == S_OK and data == orig[99 * 512:100 * 512] + payload
    finally:
        dev.close()


def test_read_only_disk_refuses_writes_and_is_opened_read_only(memory, tmp_path):
    img = tmp_path / "ro.img"
    orig = make_image(img)
    dev = VirtioBlk(str(img), readonly=True)
    try:
        flags = int(open(f"/proc/self/fdinfo/{dev._fd}").read().split("flags:")[1].split()[0],
                    8)
        assert flags & os.O_ACCMODE == os.O_RDONLY
        f = dev.device_features()
        assert f >> F_RO & 1 and not f >> F_DISCARD & 1 and not f >> F_WRITE_ZEROES & 1
        assert dev.config_read(36, 24) == 0                    # no discard/write-zeroes limits
        d = Driver(memory, dev)
        assert d.request(T_OUT, 0, out=b"x" * 512)[0] == S_IOERR
        assert d.request(T_WRITE_ZEROES, 0, out=seg(0, 8))[0] == S_UNSUPP  # not offered
        assert d.request(T_DISCARD, 0, out=seg(0, 8))[0] == S_UNSUPP
        # a driver that claims the features anyway is still refused
        d2 = Driver(memory, dev, features=dev.device_features() | (1 << F_DISCARD) |
                    (1 << F_WRITE_ZEROES))
        assert d2.request(T_WRITE_ZEROES, 0, out=seg(0, 8))[0] == S_IOERR
        assert d2.request(T_DISCARD, 0, out=seg(0, 8))[0] == S_IOERR
        st, data, _ = d2.request(T_IN, 0, in_len=1024)
        assert st == S_OK and data == orig[:1024]
        assert d2.request(T_FLUSH)[0] == S_OK
        assert file_bytes(img) == orig
    finally:
        dev.close()


def test_get_id_serial(memory, tmp_path):
    img = tmp_path / "d.img"
    make_image(img)
    for serial, want in (("disk-7", b"disk-7" + bytes(14)), ("A" * 20, b"A" * 20), ("", bytes(20))):
        dev = VirtioBlk(str(img), serial=serial)
        try:
            d = Driver(memory, dev)
            st, data, used = d.request(T_GET_ID, in_len=20)
            assert (st, data, used) == (S_OK, want, 21)
            st, data, used = d.request(T_GET_ID, in_len=4)               # a short buffer
            assert (st, data, used) == (S_OK, want[:4], 5)
        finally:
            dev.close()


def test_discard_and_write_zeroes(memory, tmp_path):
    img = tmp_path / "d.img"
    orig = make_image(img)
    dev = VirtioBlk(str(img))
    try:
        d = Driver(memory, dev)
        os.fsync(os.open(img, os.O_RDONLY))
        blocks0 = os.stat(img).st_blocks
        # write zeroes without unmap: two segments in one request
        st, _, _ = d.request(T_WRITE_ZEROES, out=seg(16, 8) + seg(64, 3))
        assert st == S_OK
        want = bytearray(orig)
        want[16 * 512:24 * 512] = bytes(8 * 512)
        want[64 * 512:67 * 512] = bytes(3 * 512)
        assert file_bytes(img) == want
        # write zeroes with unmap: zeroes, and a hole where the host punches one
        st, _, _ = d.request(T_WRITE_ZEROES, out=seg(256, 256, 1))
        assert st == S_OK
        want[256 * 512:512 * 512] = bytes(256 * 512)
        assert file_bytes(img) == want
        if dev.may_unmap:
            assert os.stat(img).st_blocks <= blocks0 - 128      # 256 freed, less metadata
        # discard: the rest of the disk is untouched, the range is deallocated where allowed
        blocks1 = os.stat(img).st_blocks
        assert d.request(T_DISCARD, out=seg(1024, 512))[0] == S_OK
        got = file_bytes(img)
        assert got[:1024 * 512] == want[:1024 * 512] and got[1536 * 512:] == want[1536 * 512:]
        if dev.may_unmap:
            assert os.stat(img).st_blocks <= blocks1 - 256      # 512 freed, less metadata
        # refused: UNMAP on a discard and unknown flags (UNSUPP), ranges off the disk, too
        # long, or a torn segment list (IOERR); nothing changes
        before = file_bytes(img)
        assert d.request(T_DISCARD, out=seg(0, 8, 1))[0] == S_UNSUPP
        assert d.request(T_WRITE_ZEROES, out=seg(0, 8, 2))[0] == S_UNSUPP
        assert d.request(T_WRITE_ZEROES, out=seg(0, 8) + seg(8, 8, 4))[0] == S_UNSUPP
        assert d.request(T_WRITE_ZEROES, out=seg(0, 8) + seg(2047, 2))[0] == S_IOERR
        assert d.request(T_WRITE_ZEROES, out=seg(2 ** 64 - 1, 1))[0] == S_IOERR
        assert d.request(T_WRITE_ZEROES, out=seg(0, MAX_RANGE_SECTORS + 1))[0] == S_IOERR
        assert d.request(T_DISCARD, out=seg(0, 8)[:12])[0] == S_IOERR
        assert d.request(T_DISCARD)[0] == S_IOERR                         # no segment
        assert d.request(T_DISCARD, out=seg(0, 1) * (MAX_RANGE_SEGS + 1))[0] == S_IOERR
        assert file_bytes(img) == before
        # not negotiated: UNSUPP
        d2 = Driver(memory, dev, features=1 << F_VERSION_1)
        assert d2.request(T_WRITE_ZEROES, out=seg(0, 8))[0] == S_UNSUPP
        assert d2.request(T_DISCARD, out=seg(0, 8))[0] == S_UNSUPP
        assert file_bytes(img) == before
    finally:
        dev.close()


def _raw(rtype, sector=0):
    return struct.pack("<IIQ", rtype, 0, sector)


# (name, buffers, status expected or None when no status byte exists)
HOSTILE = [
    ("header too short", [(_raw(T_IN)[:8], False), (512, True), (1, True)], S_IOERR),
    ("header in a writable buffer", [(16, True), (1, True)], S_IOERR),
    ("no status byte", [(_raw(T_FLUSH), False)], None),
    ("read past the end", [(_raw(T_IN, 2047), False), (1024, True), (1, True)], S_IOERR),
    ("write past the end", [(_raw(T_OUT, 2048), False), (b"w" * 512, False), (1, True)],
     S_IOERR),
    ("sector near 2**64", [(_raw(T_IN, 2 ** 64 - 1), False), (512, True), (1, True)], S_IOERR),
    ("read not a multiple of 512", [(_raw(T_IN), False), (100, True), (1, True)], S_IOERR),
    ("write not a multiple of 512", [(_raw(T_OUT), False), (b"w" * 100, False), (1, True)],
     S_IOERR),
    ("read with device-readable data", [(_raw(T_IN), False), (b"r" * 512, False),
                                        (512, True), (1, True)], S_IOERR),
    ("write with device-writable data", [(_raw(T_OUT), False), (b"w" * 512, False),
                                         (512, True), (1, True)], S_IOERR),
    ("unknown type", [(_raw(99), False), (1, True)], S_UNSUPP),
    ("secure erase (not offered)", [(_raw(14), False), (seg(0, 8), False), (1, True)],
     S_UNSUPP),
]


@pytest.mark.parametrize("name,bufs,status", HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_request_gets_its_status_and_the_device_stays_usable(memory, tmp_path, name,
                                                                     bufs, status):
    img = tmp_path / "d.img"
    orig = make_image(img)
    dev = VirtioBlk(str(img))
    try:
        d = Driver(memory, dev)
        laid = d.submit(bufs)
        head, used = d.used()
        assert head == 0
        if status is None:
            assert used == 0                      # returned untouched, nothing done
        else:
            assert memory.read(laid[-1][0], 1)[0] == status and used == 1
        assert d.resets == 0
        assert file_bytes(img) == orig
        st, data, _ = d.request(T_IN, 0, in_len=512)
        assert st == S_OK and data == orig[:512]
    finally:
        dev.close()


def test_ring_rule_break_sets_needs_reset_without_raising(memory, tmp_path):
    img = tmp_path / "d.img"
    make_image(img)
    dev = VirtioBlk(str(img))
    try:
        d = Driver(memory, dev)
        # a descriptor chain that loops on itself
        memory.write(DESC, struct.pack("<QIHH", HEAP, 16, DESC_F_NEXT, 0))
        memory.write(AVAIL + 4, struct.pack("<H", 0))
        memory.write(AVAIL + 2, struct.pack("<H", 1))
        dev.notify(0)
        assert d.resets == 1
        dev.notify(0)                            # broken until reset: nothing more happens
        dev.notify(5)                            # a queue that does not exist
        assert d.resets == 1
        dev.reset()
        d2 = Driver(memory, dev)                 # after the reset, a fresh queue works
        assert d2.request(T_FLUSH)[0] == S_OK
    finally:
        dev.close()


def test_block_size_alignment_and_event_index(memory, tmp_path):
    img = tmp_path / "d.img"
    orig = make_image(img)
    dev = VirtioBlk(str(img), block_size=4096)
    try:
        d = Driver(memory, dev, event_idx=True)
        assert d.request(T_IN, 1, in_len=4096)[0] == S_IOERR          # start not aligned
        assert d.request(T_IN, 8, in_len=512)[0] == S_IOERR           # length not aligned
        st, data, _ = d.request(T_IN, 8, in_len=4096)
        assert st == S_OK and data == orig[4096:8192]
        # event index: used_event is 0 (the driver zeroed it), so only the first used buffer
        # crossed it
        assert d.irqs == [(INT_VRING, 0)]
    finally:
        dev.close()


def test_closed_device_answers_ioerr(memory, tmp_path):
    img = tmp_path / "d.img"
    make_image(img)
    dev = VirtioBlk(str(img))
    d = Driver(memory, dev)
    dev.close()
    dev.close()                                   # idempotent
    d = Driver(memory, dev)
    assert d.request(T_IN, 0, in_len=512)[0] == S_IOERR
    VirtioBlk(str(img)).close()                   # the lock went with the fd


def test_image_lock(tmp_path):
    img = tmp_path / "shared.img"
    make_image(img)
    a = VirtioBlk(str(img))
    try:
        with pytest.raises(DiskLocked, match="shared.img: failed to get write lock") as e:
            VirtioBlk(str(img))
        assert "\n" not in str(e.value) and isinstance(e.value, PykvmError)
        with pytest.raises(DiskLocked, match="shared lock"):
            VirtioBlk(str(img), readonly=True)
    finally:
        a.close()
    r1 = VirtioBlk(str(img), readonly=True)
    r2 = VirtioBlk(str(img), readonly=True)       # readers share
    try:
        with pytest.raises(DiskLocked):
            VirtioBlk(str(img))
    finally:
        r1.close()
        r2.close()
    VirtioBlk(str(img)).close()
    # a second open of the same path in another way (a symlink) is the same file
    link = tmp_path / "link.img"
    link.symlink_to(img)
    a = VirtioBlk(str(img))
    try:
        with pytest.raises(DiskLocked, match="link.img"):
            VirtioBlk(str(link))
    finally:
        a.close()


def test_bad_images_and_options(tmp_path):
    good = tmp_path / "good.img"
    make_image(good, 4096)
    odd = tmp_path / "odd.img"
    make_image(odd, 1000)
    cases = [
        ((str(tmp_path / "missing.img"),), {}, "missing.img: cannot open"),
        ((str(tmp_path),), {}, "a directory"),
        ((str(odd),), {}, "1000 bytes is not a multiple of 512"),
        (("/dev/null",), {}, "not a file"),
        ((str(good),), {"serial": "x" * 21}, "serial"),
        ((str(good),), {"serial": "d\u00e9j\u00e0"}, "serial"),
        ((str(good),), {"block_size": 1000}, "block size"),
        ((str(good),), {"block_size": 256}, "block size"),
        (("",), {}, "non-empty path"),
        ((None,), {}, "non-empty path"),
    ]
    for args, kw, msg in cases:
        with pytest.raises(DiskError, match=msg) as e:
            VirtioBlk(*args, **kw)
        assert isinstance(e.value, ValueError) and "\n" not in str(e.value)
    VirtioBlk(str(good)).close()                  # no failed attempt left a lock or an fd


def test_empty_image_has_no_sectors(memory, tmp_path):
    img = tmp_path / "empty.img"
    make_image(img, 0)
    dev = VirtioBlk(str(img))
    try:
        assert dev.config_read(0, 8) == 0
        d = Driver(memory, dev)
        assert d.request(T_IN, 0, in_len=512)[0] == S_IOERR
    finally:
        dev.close()


CHILD = textwrap.dedent("""
    import struct, sys, time
    from pykvm.devices.virtio import DeviceHandles, F_VERSION_1
    from pykvm.devices.virtio.blk import VirtioBlk, T_OUT, T_FLUSH
    from pykvm.devices.virtio.queue import Virtqueue, DESC_F_NEXT, DESC_F_WRITE
    from pykvm.memory import GuestMemory, MemorySlot, new_mapping

    mem = GuestMemory()
    m, pin = new_mapping(1 << 20)
    mem._add(MemorySlot(0, 0, 1 << 20, 0, m, pin))
    dev = VirtioBlk(sys.argv[1])
    q = Virtqueue(mem, 0, 16, 0x1000, 0x2000, 0x3000, event_idx=False, indirect=False)
    dev.activate(dev.device_features() | (1 << F_VERSION_1), [q],
                 DeviceHandles(lambda *a: None, lambda: None))
    payload = bytes.fromhex(sys.argv[2])
    for n, (rtype, data) in enumerate(((T_OUT, payload), (T_FLUSH, b""))):
        mem.write(0x10000, struct.pack("<IIQ", rtype, 0, 10))
        mem.write(0x20000, data)
        descs = [(0x10000, 16, 0)] + ([(0x20000, len(data), 0)] if data else [])
        descs.append((0x30000, 1, DESC_F_WRITE))
        for k, (a, ln, fl) in enumerate(descs):
            nxt = DESC_F_NEXT if k < len(descs) - 1 else 0
            mem.write(0x1000 + 16 * k, struct.pack("<QIHH", a, ln, fl | nxt, k + 1))
        mem.write(0x2000 + 4 + 2 * n, struct.pack("<H", 0))
        mem.write(0x2002, struct.pack("<H", n + 1))
        dev.notify(0)
        assert mem.read(0x30000, 1) == b"\\0"
    print("flushed", flush=True)
    time.sleep(60)
""")


def test_flushed_write_survives_sigkill(tmp_path):
    img = tmp_path / "d.img"
    orig = make_image(img)
    payload = os.urandom(4 * 512)
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(img), payload.hex()],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = child.stdout.readline()
        assert line == "flushed\n", child.stderr.read() if child.poll() is not None else line
        with pytest.raises(DiskLocked):          # the lock holds across processes
            VirtioBlk(str(img))
        os.kill(child.pid, signal.SIGKILL)
        assert child.wait(timeout=30) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        child.stdout.close()
        child.stderr.close()
    assert file_bytes(img, 10 * 512, len(payload)) == payload
    assert file_bytes(img, 0, 10 * 512) == orig[:10 * 512]
    VirtioBlk(str(img)).close()                  # the dead process's lock is gone
