"""virtio-blk backed by a raw image file (OASIS virtio 1.2, section 5.2), one request queue.

Requests (section 5.2.6): a 16-byte device-readable header (type u32, reserved u32, sector
u64, little-endian), the data, and a one-byte device-writable status at the very end.

==============  ==============================================================================
type            what the device does
==============  ==============================================================================
IN (0)          ``preadv`` straight into the guest's buffers (host views of guest RAM, no copy)
OUT (1)         ``pwritev`` straight from the guest's buffers; IOERR on a read-only disk
FLUSH (4)       ``fdatasync``
GET_ID (8)      the serial number, NUL-padded to 20 bytes (no NUL when it is 20 long)
DISCARD (11)    ``fallocate(PUNCH_HOLE | KEEP_SIZE)`` where the host allows, else nothing
WRITE_ZEROES    with the UNMAP flag a punched hole, else (or where punching is refused)
(13)            ``fallocate(ZERO_RANGE)``, else zeroes written; reads return zeroes after
other           UNSUPP
==============  ==============================================================================

Status: OK (0), IOERR (1) for a request the device cannot honour (past the end of the disk,
a length not a multiple of 512 or a start or length not a multiple of ``block_size``, an IN
with data in the readable part or an OUT with data in the writable part, a header shorter
than 16 bytes, a write to a read-only disk, a host I/O error), UNSUPP (2) for an unknown type,
a discard or write-zeroes the driver did not negotiate, an unknown flag in a segment, or the
UNMAP flag on a discard (section 5.2.6.2). A chain with no writable byte has nowhere to put a
status: it is returned unused (length 0) and nothing is done. A chain that breaks the ring
rules (:class:`~.queue.QueueError`) sets DEVICE_NEEDS_RESET. Nothing the guest sends makes
:meth:`VirtioBlk.notify` raise.

Durability: a write is in the file once a FLUSH after it completes (section 5.2.6.1). A
driver that did not negotiate FLUSH gets write-through: every OUT, DISCARD and WRITE_ZEROES
is followed by ``fdatasync`` before it completes.

The image is locked with an open-file-description lock over the whole file (``F_OFD_SETLK``,
``flock`` where the host has no OFD locks): a write lock for a writable disk, a read lock for a
read-only one, so a second writable :class:`VirtioBlk` (in this or another process, or a QEMU
holding the image) fails at construction with :class:`DiskLocked`.

The C path (:mod:`.fastpath`): on a transport that tells the device where its notify address is
(:meth:`VirtioBlk.fastpath_update`, virtio-pci on the pc machine), queue 0 is served by a C
worker thread instead of :meth:`VirtioBlk.notify`, with the same checks and the same results;
the code here stays the reference and serves every other case (``native=False``,
``PYKVM_VIRTIO_BLK_NATIVE=0``, virtio-mmio, a host that refuses the worker).
"""
from __future__ import annotations

import errno
import fcntl
import os
import stat
import struct
import weakref

from ...errors import GuestMemoryError, PykvmError
from . import ID_BLOCK, INT_VRING, QUEUE_MAX, DeviceHandles, VirtioDevice
from .fastpath import BlkWorker, FastPathUnavailable, enabled_by_default
from .queue import QueueError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Dict, List, Optional, Sequence, Tuple

SECTOR = 512

# feature bits (section 5.2.3)
F_SIZE_MAX, F_SEG_MAX, F_GEOMETRY, F_RO, F_BLK_SIZE = 1, 2, 4, 5, 6
F_FLUSH, F_TOPOLOGY, F_CONFIG_WCE, F_MQ, F_DISCARD, F_WRITE_ZEROES = 9, 10, 11, 12, 13, 14

# request types and status values (section 5.2.6)
T_IN, T_OUT, T_FLUSH, T_GET_ID, T_DISCARD, T_WRITE_ZEROES = 0, 1, 4, 8, 11, 13
S_OK, S_IOERR, S_UNSUPP = 0, 1, 2
FLAG_UNMAP = 1                     # struct virtio_blk_discard_write_zeroes flags bit 0
ID_BYTES = 20                      # VIRTIO_BLK_ID_BYTES

HEADER = struct.Struct("<IIQ")     # type, reserved, sector
SEGMENT = struct.Struct("<QII")    # sector, num_sectors, flags
# max_discard_sectors / max_write_zeroes_sectors: 1 GiB per segment; max_*_seg
MAX_RANGE_SECTORS = (1 << 30) // SECTOR
MAX_RANGE_SEGS = 32
CONFIG_SIZE = 60                   # through write_zeroes_may_unmap and its padding

# fallocate(2) modes
_FL_KEEP_SIZE, _FL_PUNCH_HOLE, _FL_ZERO_RANGE = 0x01, 0x02, 0x10
_IOV_MAX = 1024
_ZERO_CHUNK = 1 << 20


class DiskError(PykvmError, ValueError):
    """A disk image cannot be used: a bad path or option, a directory, a size that is not a
    multiple of 512 bytes, a file the host will not open. One line naming the file."""


class DiskLocked(DiskError):
    """Another user (this process, another VMM) holds a conflicting lock on the image: a
    writable disk needs it alone, a read-only one needs no writer."""


_libc: Any = None


def _fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2); raises OSError (EOPNOTSUPP where the host has no fallocate)."""
    global _libc
    if _libc is None:
        import ctypes                       # only where a disk punches holes: ~2 ms of import
        import ctypes.util
        try:
            lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
            fn = lib.fallocate
            fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
            fn.restype = ctypes.c_int
            _libc = fn
        except (OSError, AttributeError):
            _libc = False
    if _libc is False:
        raise OSError(errno.EOPNOTSUPP, "fallocate is not available")
    if _libc(fd, mode, offset, length) != 0:
        import ctypes
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _lock(fd: int, path: str, exclusive: bool) -> None:
    """Take the image's lock (module docstring); raises :class:`DiskLocked`."""
    what = "write" if exclusive else "shared"
    setlk = getattr(fcntl, "F_OFD_SETLK", None)
    if setlk is not None:
        # struct flock: l_type, l_whence (short), l_start, l_len (off_t), l_pid (0 for OFD)
        arg = struct.pack("hhqqi4x", fcntl.F_WRLCK if exclusive else fcntl.F_RDLCK,
                          os.SEEK_SET, 0, 0, 0)
        try:
            fcntl.fcntl(fd, setlk, arg)
            return
        except OSError as e:
            if e.errno in (errno.EAGAIN, errno.EACCES):
                raise DiskLocked(f"{path}: failed to get {what} lock: the image is in use "
                                 "(another VM, or another disk of this one)") from None
            if e.errno not in (errno.EINVAL, errno.ENOLCK, errno.EOPNOTSUPP):
                raise DiskError(f"{path}: cannot lock the image: {e.strerror}") from None
    try:
        fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in (errno.EAGAIN, errno.EWOULDBLOCK):
            raise DiskLocked(f"{path}: failed to get {what} lock: the image is in use "
                             "(another VM, or another disk of this one)") from None
        raise DiskError(f"{path}: cannot lock the image: {e.strerror}") from None


def _views(memory: Any, segs: List[Tuple[int, int]], skip: int, n: int) -> List[memoryview]:
    """Host views of ``n`` bytes of the guest buffers ``segs`` from byte ``skip`` on, one per
    buffer and memory slot. Raises GuestMemoryError where a byte is not guest RAM."""
    out: List[memoryview] = []
    for gpa, length in segs:
        if n <= 0:
            break
        if skip >= length:
            skip -= length
            continue
        gpa, length, skip = gpa + skip, length - skip, 0
        take = min(length, n)
        n -= take
        while take:
            slot = memory.slot_at(gpa)
            if slot is None:
                raise GuestMemoryError(f"guest-physical address {gpa:#x} is not backed by RAM")
            k = min(take, slot.end - gpa)
            out.append(memory.view(gpa, k))
            gpa += k
            take -= k
    return out


def _vectored(fn: Any, fd: int, views: List[memoryview], offset: int) -> None:
    """os.preadv/os.pwritev of every byte of ``views`` at file ``offset``, resuming after
    short transfers; raises OSError (EIO when the file ends first)."""
    while views:
        done = fn(fd, views[:_IOV_MAX], offset)
        if done <= 0:
            raise OSError(errno.EIO, "the image file ended (was it truncated?)")
        offset += done
        i = 0
        while i < len(views) and done >= len(views[i]):
            done -= len(views[i])
            i += 1
        views = views[i:]
        if done:
            views[0] = views[0][done:]


class _Held:
    """What a :class:`VirtioBlk` holds outside Python: the image's fd (and so its lock) and the
    C worker. Released by ``close()`` or, for a disk nobody closed, when the disk is collected
    (a weakref finalizer: it runs before anything of a collected machine, its guest RAM
    included, is torn down, so the worker stops before the memory it uses goes)."""

    __slots__ = ("fd", "worker")

    def __init__(self, fd: int = -1):
        self.fd = fd
        self.worker: Optional[BlkWorker] = None

    def release(self) -> None:
        w, self.worker = self.worker, None
        if w is not None:
            w.stop()
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)


class VirtioBlk(VirtioDevice):
    """A virtio block device on the raw image at ``path``.

    ``readonly``: open the image read-only (``O_RDONLY``, shared lock), offer
    VIRTIO_BLK_F_RO and refuse writes; ``serial``: the GET_ID string (ASCII, at most 20
    bytes); ``block_size``: the logical block size the driver is told (VIRTIO_BLK_F_BLK_SIZE),
    a power of 2 from 512 to 65536 bytes; requests must be aligned to it.

    Raises :class:`DiskError` (a ValueError) for a bad option, a missing or unopenable path, a
    directory or other non-file, an image whose size is not a multiple of 512 bytes, and
    :class:`DiskLocked` when another user holds the image (module docstring). Attributes:
    ``path``, ``readonly``, ``serial``, ``block_size``, ``size`` (bytes), ``capacity`` (512-byte
    sectors), ``may_unmap`` (whether a write-zeroes with UNMAP punches a hole here).

    ``native``: serve the queue with the C worker where the transport allows (module
    docstring); None (default) follows ``PYKVM_VIRTIO_BLK_NATIVE`` (on unless "0").
    ``native_error`` is why the C path was refused (None while it was not)."""

    device_id = ID_BLOCK
    num_queues = 1
    queue_max = QUEUE_MAX

    def __init__(self, path: str, *, readonly: bool = False, serial: str = "",
                 block_size: int = 512, native: Optional[bool] = None):
        if not isinstance(path, (str, os.PathLike)) or not os.fspath(path):
            raise DiskError(f"disk image path must be a non-empty path, not {path!r}")
        path = os.fspath(path)
        if isinstance(path, bytes):
            path = os.fsdecode(path)
        if not isinstance(serial, str) or not serial.isascii() or \
                len(serial.encode()) > ID_BYTES or "\0" in serial:
            raise DiskError(f"{path}: disk serial {serial!r} must be ASCII, at most {ID_BYTES} "
                            "bytes, without NUL")
        if not isinstance(block_size, int) or isinstance(block_size, bool) or \
                not SECTOR <= block_size <= 65536 or block_size & (block_size - 1):
            raise DiskError(f"{path}: block size {block_size!r} must be a power of 2 from "
                            "512 to 65536")
        self.path = path
        self.readonly = bool(readonly)
        self.serial = serial
        self.block_size = block_size
        self._held = _Held()
        # O_NONBLOCK: a FIFO or a device node must not block the open (a FIFO opened O_RDONLY
        # waits for a writer); the type is checked before anything is read
        flags = (os.O_RDONLY if self.readonly else os.O_RDWR) | os.O_CLOEXEC | os.O_NONBLOCK
        try:
            fd = os.open(path, flags)
        except OSError as e:
            hint = "" if self.readonly or e.errno not in (errno.EACCES, errno.EROFS) else \
                " (add ,ro to use it read-only)"
            raise DiskError(f"{path}: cannot open the disk image"
                            f"{' read-only' if self.readonly else ''}: {e.strerror}{hint}") from None
        try:
            st = os.fstat(fd)
            if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
                kind = "a directory" if stat.S_ISDIR(st.st_mode) else "not a file"
                raise DiskError(f"{path}: {kind}, not a disk image")
            os.set_blocking(fd, True)
            try:
                size = os.lseek(fd, 0, os.SEEK_END)
            except OSError as e:                  # e.g. a /proc file: no end to seek to
                raise DiskError(f"{path}: cannot tell the image's size ({e.strerror}), "
                                "not a disk image") from None
            if size % SECTOR:
                raise DiskError(f"{path}: image size {size} bytes is not a multiple of "
                                f"{SECTOR}")
            _lock(fd, path, exclusive=not self.readonly)
        except OSError as e:
            os.close(fd)
            raise DiskError(f"{path}: cannot use the disk image: {e.strerror}") from None
        except BaseException:
            os.close(fd)
            raise
        self._held.fd = fd
        self._finalizer = weakref.finalize(self, _Held.release, self._held)
        self.size = size
        self.capacity = size // SECTOR
        self.may_unmap = False
        if not self.readonly:
            # punching past the end (KEEP_SIZE) changes nothing and tells whether it works
            try:
                _fallocate(fd, _FL_PUNCH_HOLE | _FL_KEEP_SIZE, size, block_size)
                self.may_unmap = True
            except OSError:
                pass
        self._config = self._make_config()
        self._queue: Optional[Any] = None
        self._handles: Optional[DeviceHandles] = None
        self._features = 0
        self._broken = False
        self.native = enabled_by_default() if native is None else bool(native)
        self.native_error: Optional[str] = None
        self.native_stats = {"workers": 0, "requests": 0, "direct_msis": 0, "python_irqs": 0,
                             "direct_lines": 0}
        self.python_requests = 0            # requests served on the Python path

    @property
    def _fd(self) -> int:
        return self._held.fd

    @_fd.setter
    def _fd(self, fd: int) -> None:
        self._held.fd = fd

    @property
    def _worker(self) -> Optional[BlkWorker]:
        return self._held.worker

    @_worker.setter
    def _worker(self, w: Optional[BlkWorker]) -> None:
        self._held.worker = w

    @property
    def closed(self) -> bool:
        """True once :meth:`close` ran (the image is closed and its lock released)."""
        return self._fd < 0

    def __repr__(self) -> str:
        return (f"VirtioBlk({self.path!r}, {self.capacity} sectors"
                f"{', ro' if self.readonly else ''}{', closed' if self._fd < 0 else ''})")

    # ---- features and configuration (sections 5.2.3, 5.2.4) -----------------------------

    def device_features(self) -> int:
        """SEG_MAX, BLK_SIZE, FLUSH, and RO for a read-only disk or DISCARD and WRITE_ZEROES
        for a writable one."""
        f = (1 << F_SEG_MAX) | (1 << F_BLK_SIZE) | (1 << F_FLUSH)
        if self.readonly:
            f |= 1 << F_RO
        else:
            f |= (1 << F_DISCARD) | (1 << F_WRITE_ZEROES)
        return f

    def _make_config(self) -> bytes:
        cfg = bytearray(CONFIG_SIZE)
        struct.pack_into("<Q", cfg, 0, self.capacity)                 # capacity
        struct.pack_into("<I", cfg, 12, self.queue_max - 2)           # seg_max
        struct.pack_into("<I", cfg, 20, self.block_size)              # blk_size
        if not self.readonly:
            struct.pack_into("<III", cfg, 36, MAX_RANGE_SECTORS, MAX_RANGE_SEGS,
                             self.block_size // SECTOR)              # discard limits
            struct.pack_into("<II", cfg, 48, MAX_RANGE_SECTORS, MAX_RANGE_SEGS)
            cfg[56] = 1 if self.may_unmap else 0                     # write_zeroes_may_unmap
        return bytes(cfg)

    def config_read(self, offset: int, size: int) -> int:
        """``size`` bytes of ``struct virtio_blk_config`` at ``offset`` (little-endian; bytes
        past its end read 0): capacity @0, seg_max @12, blk_size @20, max_discard_sectors @36,
        max_discard_seg @40, discard_sector_alignment @44, max_write_zeroes_sectors @48,
        max_write_zeroes_seg @52, write_zeroes_may_unmap @56; the rest 0."""
        if offset < 0 or size <= 0:
            return 0
        return int.from_bytes(self._config[offset:offset + size], "little")

    # ---- lifecycle --------------------------------------------------------------------

    def activate(self, features: int, queues: Sequence[Optional[Any]],
                 handles: DeviceHandles) -> None:
        self._features = features
        self._queue = queues[0] if queues else None
        self._handles = handles
        self._broken = False

    def reset(self) -> None:
        self._stop_worker()
        self._queue = None
        self._handles = None
        self._features = 0
        self._broken = False

    def close(self) -> None:
        """Close the image (which releases its lock). Idempotent; requests after it fail
        with IOERR."""
        self.reset()
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)

    # ---- the C path (module docstring, :mod:`.fastpath`) ---------------------------------

    def fastpath_update(self, vm: Any, notify_gpa: Optional[int],
                        msi: Optional[Tuple[int, int]], line: Any = None) -> None:
        """Called by the transport, under its lock, whenever where queue 0's notification lands
        or how its interrupt is sent may have changed: ``vm`` (:class:`pykvm.vm.Vm`, None: no
        C path on this transport), ``notify_gpa`` (None: BAR 4 is not decoded), ``msi``
        ((address, data) the worker may send itself, None: interrupts go through the
        transport), ``line`` (virtio-mmio: the transport's :class:`.fastpath.MmioLine`, which the
        worker raises itself; None: ``msi`` or Python). Starts, moves or stops the worker; never raises for anything the guest
        did (a refusal leaves the Python path on and sets :attr:`native_error`)."""
        q, h = self._queue, self._handles
        w = self._worker
        if (not self.native or vm is None or notify_gpa is None or q is None or h is None
                or self._broken or self._fd < 0):
            self._stop_worker()
            return
        if w is not None and w.notify_gpa != notify_gpa:
            self._stop_worker()
            w = None
            if self._broken:
                return
        if w is None:
            try:
                w = BlkWorker(vm_fd=vm.fd, image_fd=self._fd, readonly=self.readonly,
                              block_size=self.block_size, capacity=self.capacity,
                              features=self._features, may_unmap=self.may_unmap,
                              serial=self.serial.encode(), queue=q, memory=q._memory,
                              notify_gpa=notify_gpa, on_irq=lambda: self._worker_irq(h),
                              on_broken=lambda why: self._worker_broken(h), line=line)
            except FastPathUnavailable as e:
                self.native_error = str(e)
                self.native = False
                return
            self._worker = w
            self.native_stats["workers"] += 1
        w.set_msi(msi)

    def _worker_irq(self, h: DeviceHandles) -> None:
        if self._handles is h:                    # not after a reset
            h.interrupt(INT_VRING, 0)

    def _worker_broken(self, h: DeviceHandles) -> None:
        if self._handles is h:
            self._broken = True
            h.needs_reset()

    def _stop_worker(self) -> None:
        w, self._worker = self._worker, None
        if w is None:
            return
        if w.stop() is not None:
            self._broken = True
        for k, v in w.stats.items():
            self.native_stats[k] += v

    # ---- requests ---------------------------------------------------------------------

    def notify(self, index: int) -> None:
        """Serve every request the driver made available in queue 0, then interrupt the driver
        if it wants one (or, with the C worker on, have the worker look). Never raises for
        anything the guest did."""
        q, h = self._queue, self._handles
        if index != 0 or q is None or h is None or self._broken:
            return
        if self._worker is not None:
            self._worker.kick()
            return
        pushed = False
        try:
            while True:
                q.set_notification(False)
                while True:
                    chain = q.pop()
                    if chain is None:
                        break
                    q.push(chain, self._serve(chain))
                    pushed = True
                q.set_notification(True)
                chain = q.pop()               # one made available before notifications were on
                if chain is None:
                    break
                q.push(chain, self._serve(chain))
                pushed = True
        except QueueError:
            self._broken = True
            h.needs_reset()
        if pushed:
            try:
                if q.needs_interrupt():
                    h.interrupt(INT_VRING, 0)
            except QueueError:
                self._broken = True
                h.needs_reset()

    def counters(self) -> Dict[str, int]:
        """``python_requests`` (served on the Python path) and the C path's totals over its
        workers so far: ``native_workers`` started, ``native_requests`` served,
        ``native_direct_msis`` (interrupts the worker sent itself with KVM_SIGNAL_MSI) and
        ``native_python_irqs`` (interrupts it handed to Python). A running worker's counts join
        when it stops (reset, close)."""
        return {"python_requests": self.python_requests,
                **{f"native_{k}": v for k, v in self.native_stats.items()}}

    def _serve(self, chain: Any) -> int:
        """Carry out one request; returns the bytes written into its writable part. Raises
        QueueError only when guest RAM under the chain is gone."""
        self.python_requests += 1
        wlen = chain.writable_len
        if wlen < 1:
            return 0                                  # no status byte: nowhere to answer
        status_at = wlen - 1
        try:
            status, data = self._request(chain, status_at)
        except GuestMemoryError as e:
            raise QueueError(f"request {chain.head}: {e}") from None
        chain.write(bytes((status,)), status_at)
        return data + 1

    def _request(self, chain: Any, data_len_in: int) -> Tuple[int, int]:
        """(status, data bytes written) for one request; ``data_len_in``: the writable bytes
        before the status byte."""
        if chain.readable_len < HEADER.size or self._fd < 0:
            return S_IOERR, 0
        rtype, _, sector = HEADER.unpack(chain.read(0, HEADER.size))
        data_len_out = chain.readable_len - HEADER.size
        try:
            if rtype == T_IN:
                if data_len_out:
                    return S_IOERR, 0
                if not self._range_ok(sector, data_len_in):
                    return S_IOERR, 0
                views = _views(chain._memory, chain.writable, 0, data_len_in)
                _vectored(os.preadv, self._fd, views, sector * SECTOR)
                return S_OK, data_len_in
            if rtype == T_OUT:
                if self.readonly or data_len_in:
                    return S_IOERR, 0
                if not self._range_ok(sector, data_len_out):
                    return S_IOERR, 0
                views = _views(chain._memory, chain.readable, HEADER.size, data_len_out)
                _vectored(os.pwritev, self._fd, views, sector * SECTOR)
                self._write_through()
                return S_OK, 0
            if rtype == T_FLUSH:
                os.fdatasync(self._fd)
                return S_OK, 0
            if rtype == T_GET_ID:
                ident = self.serial.encode().ljust(ID_BYTES, b"\0")
                return S_OK, chain.write(ident[:data_len_in])
            if rtype in (T_DISCARD, T_WRITE_ZEROES):
                return self._ranges(chain, rtype, data_len_out), 0
        except OSError:
            return S_IOERR, 0
        return S_UNSUPP, 0

    def _range_ok(self, sector: int, nbytes: int) -> bool:
        """Whether ``nbytes`` at ``sector`` lie on the disk and on block boundaries."""
        bs = self.block_size
        return (nbytes % bs == 0 and (sector * SECTOR) % bs == 0
                and sector <= self.capacity and nbytes // SECTOR <= self.capacity - sector)

    def _write_through(self) -> None:
        if not self._features & (1 << F_FLUSH):
            os.fdatasync(self._fd)

    def _ranges(self, chain: Any, rtype: int, nbytes: int) -> int:
        """A DISCARD or WRITE_ZEROES: every segment checked first, then carried out."""
        feature = F_DISCARD if rtype == T_DISCARD else F_WRITE_ZEROES
        if not self._features & (1 << feature):
            return S_UNSUPP
        if self.readonly:
            return S_IOERR
        if nbytes == 0 or nbytes % SEGMENT.size or nbytes // SEGMENT.size > MAX_RANGE_SEGS:
            return S_IOERR
        segs = [SEGMENT.unpack_from(chain.read(HEADER.size + i, SEGMENT.size))
                for i in range(0, nbytes, SEGMENT.size)]
        for _, _, flags in segs:
            if flags & ~FLAG_UNMAP or (rtype == T_DISCARD and flags & FLAG_UNMAP):
                return S_UNSUPP
        for sector, count, _ in segs:
            if count > MAX_RANGE_SECTORS or not self._range_ok(sector, count * SECTOR):
                return S_IOERR
        for sector, count, flags in segs:
            off, n = sector * SECTOR, count * SECTOR
            if n == 0:
                continue
            if rtype == T_DISCARD:
                try:
                    _fallocate(self._fd, _FL_PUNCH_HOLE | _FL_KEEP_SIZE, off, n)
                except OSError:
                    pass                               # the device MAY deallocate
            else:
                self._zero(off, n, unmap=bool(flags & FLAG_UNMAP))
        self._write_through()
        return S_OK

    def _zero(self, off: int, n: int, *, unmap: bool) -> None:
        """Make ``n`` bytes at ``off`` read as zeroes: a hole (``unmap``), a zeroed range, or
        zeroes written, whichever the host allows first."""
        modes = [_FL_PUNCH_HOLE | _FL_KEEP_SIZE] if unmap and self.may_unmap else []
        modes.append(_FL_ZERO_RANGE | _FL_KEEP_SIZE)
        for mode in modes:
            try:
                _fallocate(self._fd, mode, off, n)
                return
            except OSError as e:
                if e.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL,
                                   errno.ENODEV):
                    raise
        zeros = bytes(min(n, _ZERO_CHUNK))
        while n:
            k = min(n, len(zeros))
            done = os.pwrite(self._fd, memoryview(zeros)[:k], off)
            if done <= 0:
                raise OSError(errno.EIO, "short write")
            off += done
            n -= done


def disk_from_spec(spec: str) -> VirtioBlk:
    """A :class:`VirtioBlk` from a command-line disk description in kvmtool's ``-d`` form,
    ``FILE[,ro][,serial=NAME]`` (QEMU's ``readonly=on`` is taken as ``ro`` too; a comma in
    FILE is written ``,,`` as in QEMU's options). Raises
    :class:`DiskError` for an unknown option or anything :class:`VirtioBlk` refuses."""
    if not isinstance(spec, str) or not spec:
        raise DiskError(f"a disk is FILE[,ro][,serial=NAME], not {spec!r}")
    # a comma in the file name is written twice, as QEMU's option syntax has it
    path, *opts = (p.replace("\0", ",") for p in spec.replace(",,", "\0").split(","))
    readonly: Optional[bool] = None
    serial: Optional[str] = None
    for o in opts:
        if o in ("ro", "readonly", "readonly=on", "rw", "readonly=off"):
            want = o not in ("rw", "readonly=off")
            if readonly is not None and readonly != want:
                raise DiskError(f"{path}: the disk options say both read-only and read-write")
            readonly = want
        elif o.startswith("serial="):
            if serial is not None:
                raise DiskError(f"{path}: serial= given twice")
            serial = o[len("serial="):]
        else:
            raise DiskError(f"{path}: unknown disk option {o!r} (known: ro, rw, serial=NAME; "
                            "a comma in the file name is written ,,)")
    return VirtioBlk(path, readonly=bool(readonly), serial=serial or "")
