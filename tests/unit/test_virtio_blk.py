"""virtio-blk (pykvm.devices.virtio.blk) driven through a real split virtqueue in real guest RAM
(anonymous mappings in a :class:`GuestMemory`, as a VM has), with real image files: requests
built as a driver builds them (virtio 1.2 section 5.2.6), the image checked with plain file
reads, hostile requests answered with their status byte, the image lock, and a write that
survives SIGKILL after FLUSH."""
import os
import struct

import pytest

from pykvm.devices.virtio import F_VERSION_1, ID_BLOCK, INT_VRING
from pykvm.devices.virtio.blk import (
    F_BLK_SIZE, F_DISCARD, F_FLUSH, F_RO, F_SEG_MAX, F_WRITE_ZEROES, MAX_RANGE_SECTORS,
    MAX_RANGE_SEGS, S_IOERR, S_OK, S_UNSUPP, T_DISCARD, T_FLUSH, T_GET_ID, T_IN, T_OUT,
    T_WRITE_ZEROES, DiskError, DiskLocked, VirtioBlk)
from pykvm.devices.virtio.queue import DESC_F_NEXT
from pykvm.errors import PykvmError
from pykvm.memory import GuestMemory, MemorySlot, new_mapping
from pykvm.testing.blk_driver import (AVAIL, DESC, HEAP, HOSTILE, IMAGE, KILLED_AT, SLOT,
                                      BlkDriver, kill_after_flush, make_image, segment)


@pytest.fixture(scope="module")
def memory():
    mem = GuestMemory()
    for slot in range(2):
        m, pin = new_mapping(SLOT)
        mem._add(MemorySlot(slot, slot * SLOT, SLOT, 0, m, pin))
    yield mem
    mem._close()


def file_bytes(path, off=0, n=None):
    with open(path, "rb") as f:
        f.seek(off)
        return f.read() if n is None else f.read(n)


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
        d = BlkDriver(memory, dev)
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
        d = BlkDriver(memory, dev)
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
        d = BlkDriver(memory, dev)
        assert d.request(T_OUT, 0, out=b"x" * 512)[0] == S_IOERR
        assert d.request(T_WRITE_ZEROES, 0, out=segment(0, 8))[0] == S_UNSUPP  # not offered
        assert d.request(T_DISCARD, 0, out=segment(0, 8))[0] == S_UNSUPP
        # a driver that claims the features anyway is still refused
        d2 = BlkDriver(memory, dev, features=dev.device_features() | (1 << F_DISCARD) |
                    (1 << F_WRITE_ZEROES))
        assert d2.request(T_WRITE_ZEROES, 0, out=segment(0, 8))[0] == S_IOERR
        assert d2.request(T_DISCARD, 0, out=segment(0, 8))[0] == S_IOERR
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
            d = BlkDriver(memory, dev)
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
        d = BlkDriver(memory, dev)
        os.fsync(os.open(img, os.O_RDONLY))
        blocks0 = os.stat(img).st_blocks
        # write zeroes without unmap: two segments in one request
        st, _, _ = d.request(T_WRITE_ZEROES, out=segment(16, 8) + segment(64, 3))
        assert st == S_OK
        want = bytearray(orig)
        want[16 * 512:24 * 512] = bytes(8 * 512)
        want[64 * 512:67 * 512] = bytes(3 * 512)
        assert file_bytes(img) == want
        # write zeroes with unmap: zeroes, and a hole where the host punches one
        st, _, _ = d.request(T_WRITE_ZEROES, out=segment(256, 256, 1))
        assert st == S_OK
        want[256 * 512:512 * 512] = bytes(256 * 512)
        assert file_bytes(img) == want
        if dev.may_unmap:
            assert os.stat(img).st_blocks <= blocks0 - 128      # 256 freed, less metadata
        # discard: the rest of the disk is untouched, the range is deallocated where allowed
        blocks1 = os.stat(img).st_blocks
        assert d.request(T_DISCARD, out=segment(1024, 512))[0] == S_OK
        got = file_bytes(img)
        assert got[:1024 * 512] == want[:1024 * 512] and got[1536 * 512:] == want[1536 * 512:]
        if dev.may_unmap:
            assert os.stat(img).st_blocks <= blocks1 - 256      # 512 freed, less metadata
        # refused: UNMAP on a discard and unknown flags (UNSUPP), ranges off the disk, too
        # long, or a torn segment list (IOERR); nothing changes
        before = file_bytes(img)
        assert d.request(T_DISCARD, out=segment(0, 8, 1))[0] == S_UNSUPP
        assert d.request(T_WRITE_ZEROES, out=segment(0, 8, 2))[0] == S_UNSUPP
        assert d.request(T_WRITE_ZEROES, out=segment(0, 8) + segment(8, 8, 4))[0] == S_UNSUPP
        assert d.request(T_WRITE_ZEROES, out=segment(0, 8) + segment(2047, 2))[0] == S_IOERR
        assert d.request(T_WRITE_ZEROES, out=segment(2 ** 64 - 1, 1))[0] == S_IOERR
        assert d.request(T_WRITE_ZEROES, out=segment(0, MAX_RANGE_SECTORS + 1))[0] == S_IOERR
        assert d.request(T_DISCARD, out=segment(0, 8)[:12])[0] == S_IOERR
        assert d.request(T_DISCARD)[0] == S_IOERR                         # no segment
        assert d.request(T_DISCARD, out=segment(0, 1) * (MAX_RANGE_SEGS + 1))[0] == S_IOERR
        assert file_bytes(img) == before
        # not negotiated: UNSUPP
        d2 = BlkDriver(memory, dev, features=1 << F_VERSION_1)
        assert d2.request(T_WRITE_ZEROES, out=segment(0, 8))[0] == S_UNSUPP
        assert d2.request(T_DISCARD, out=segment(0, 8))[0] == S_UNSUPP
        assert file_bytes(img) == before
    finally:
        dev.close()


@pytest.mark.parametrize("name,bufs,status", HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_request_gets_its_status_and_the_device_stays_usable(memory, tmp_path, name,
                                                                     bufs, status):
    img = tmp_path / "d.img"
    orig = make_image(img)
    dev = VirtioBlk(str(img))
    try:
        d = BlkDriver(memory, dev)
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
        d = BlkDriver(memory, dev)
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
        d2 = BlkDriver(memory, dev)                 # after the reset, a fresh queue works
        assert d2.request(T_FLUSH)[0] == S_OK
    finally:
        dev.close()


def test_block_size_alignment_and_event_index(memory, tmp_path):
    img = tmp_path / "d.img"
    orig = make_image(img)
    dev = VirtioBlk(str(img), block_size=4096)
    try:
        d = BlkDriver(memory, dev, event_idx=True)
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
    d = BlkDriver(memory, dev)
    dev.close()
    dev.close()                                   # idempotent
    d = BlkDriver(memory, dev)
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
        (("/proc/self/status",), {"readonly": True}, "cannot tell the image's size"),
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


def test_a_fifo_is_refused_without_blocking_and_disk_options_do_not_contradict(tmp_path):
    import os
    from pykvm.devices.virtio.blk import disk_from_spec
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for readonly in (True, False):                # O_RDONLY on a FIFO would wait for a writer
        with pytest.raises(DiskError, match="not a file"):
            VirtioBlk(str(fifo), readonly=readonly)
    good = tmp_path / "good.img"
    make_image(good, 4096)
    for spec, msg in ((f"{good},ro,rw", "both read-only and read-write"),
                      (f"{good},readonly=off,ro", "both read-only and read-write"),
                      (f"{good},serial=a,serial=b", "serial= given twice")):
        with pytest.raises(DiskError, match=msg):
            disk_from_spec(spec)
    d = disk_from_spec(f"{good},ro,readonly=on,serial=s1")
    assert d.readonly and d.serial == "s1" and not d.closed
    d.close()
    assert d.closed


def test_empty_image_has_no_sectors(memory, tmp_path):
    img = tmp_path / "empty.img"
    make_image(img, 0)
    dev = VirtioBlk(str(img))
    try:
        assert dev.config_read(0, 8) == 0
        d = BlkDriver(memory, dev)
        assert d.request(T_IN, 0, in_len=512)[0] == S_IOERR
    finally:
        dev.close()


def test_flushed_write_survives_sigkill(tmp_path):
    img = tmp_path / "d.img"
    orig = make_image(img)
    payload = os.urandom(4 * 512)

    def locked():
        with pytest.raises(DiskLocked):          # the lock holds across processes
            VirtioBlk(str(img))

    kill_after_flush(img, payload, native=False, while_alive=locked)
    assert file_bytes(img, KILLED_AT * 512, len(payload)) == payload
    assert file_bytes(img, 0, KILLED_AT * 512) == orig[:KILLED_AT * 512]
    VirtioBlk(str(img)).close()                  # the dead process's lock is gone
