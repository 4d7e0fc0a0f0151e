"""A virtio-blk driver's side of one request queue, for tests of :mod:`pykvm.devices.virtio.blk`
(the Python path and its C worker alike): requests laid out in guest RAM as a driver lays them
out (virtio 1.2 section 5.2.6), a fixed ring layout, the image pattern the tests check against,
the hostile requests both paths must answer with a status byte, and a child process killed after
a FLUSH.

Not loaded by the pytest plugin: a test imports it (it imports pykvm's devices)."""
from __future__ import annotations

import os
import signal
import struct
import subprocess
import sys
import time

from ..devices.virtio import F_VERSION_1, DeviceHandles
from ..devices.virtio.blk import S_IOERR, S_OK, S_UNSUPP, T_FLUSH, T_IN, T_OUT, VirtioBlk
from ..devices.virtio.queue import DESC_F_NEXT, DESC_F_WRITE, Virtqueue
from ..kvm import Kvm
from ..memory import GuestMemory

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Callable, List, Optional, Sequence, Tuple

SLOT = 1 << 20                  # tests map two adjacent slots: [0, 1 MiB) and [1 MiB, 2 MiB)
DESC, AVAIL, USED = 0x1000, 0x2000, 0x3000     # queue 0's rings (GPAs)
HEAP = 0x10000                  # where requests' buffers are laid out by default
QSIZE = 64
IMAGE = 1 << 20                 # bytes of the default image: 2048 sectors
NOTIFY = 0xFE004000 + 0x3000    # where the pc machine's first virtio-pci function's notify is


def make_image(path: Any, size: int = IMAGE, fill: Optional[bytes] = None) -> bytes:
    """Write an image file at ``path`` of ``size`` bytes (``fill``, or a pattern no two
    neighbouring sectors share) and return its contents."""
    data = fill if fill is not None else bytes(i * 7 % 251 for i in range(size))
    with open(path, "wb") as f:
        f.write(data)
    return data


def header(rtype: int, sector: int = 0) -> bytes:
    """A request header (``struct virtio_blk_req``'s type, reserved, sector)."""
    return struct.pack("<IIQ", rtype, 0, sector)


def segment(sector: int, count: int, flags: int = 0) -> bytes:
    """One discard / write-zeroes range (``struct virtio_blk_discard_write_zeroes``)."""
    return struct.pack("<QII", sector, count, flags)


# (name, buffers, the status the Python path answers, None where there is no status byte);
# every one leaves the device usable and the image as it was, on a 2048-sector image
HOSTILE: List[Tuple[str, list, Optional[int]]] = [
    ("header too short", [(header(T_IN)[:8], False), (512, True), (1, True)], S_IOERR),
    ("header in a writable buffer", [(16, True), (1, True)], S_IOERR),
    ("no status byte", [(header(T_FLUSH), False)], None),
    ("read past the end", [(header(T_IN, 2047), False), (1024, True), (1, True)], S_IOERR),
    ("write past the end", [(header(T_OUT, 2048), False), (b"w" * 512, False), (1, True)],
     S_IOERR),
    ("sector near 2**64", [(header(T_IN, 2 ** 64 - 1), False), (512, True), (1, True)],
     S_IOERR),
    ("read not a multiple of 512", [(header(T_IN), False), (100, True), (1, True)], S_IOERR),
    ("write not a multiple of 512", [(header(T_OUT), False), (b"w" * 100, False), (1, True)],
     S_IOERR),
    ("read with device-readable data", [(header(T_IN), False), (b"r" * 512, False),
                                        (512, True), (1, True)], S_IOERR),
    ("write with device-writable data", [(header(T_OUT), False), (b"w" * 512, False),
                                         (512, True), (1, True)], S_IOERR),
    ("unknown type", [(header(99), False), (1, True)], S_UNSUPP),
    ("secure erase (not offered)", [(header(14), False), (segment(0, 8), False), (1, True)],
     S_UNSUPP),
]


class BlkDriver:
    """The driver's side of queue 0 of ``dev`` (a :class:`pykvm.devices.virtio.blk.VirtioBlk`)
    in ``memory`` (:class:`pykvm.memory.GuestMemory`, zeroed here): the rings at
    :data:`DESC` / :data:`AVAIL` / :data:`USED`, the device activated with ``features``
    (default: all it offers and VERSION_1). Interrupts the device raises are kept in
    :attr:`irqs` as (cause, queue), its DEVICE_NEEDS_RESET requests counted in :attr:`resets`."""

    def __init__(self, memory: Any, dev: Any, features: Optional[int] = None, *,
                 event_idx: bool = False, indirect: bool = True):
        self.mem, self.dev = memory, dev
        for s in memory:
            memory.zero(s.gpa, s.size)
        self.q = Virtqueue(memory, 0, QSIZE, DESC, AVAIL, USED, event_idx=event_idx,
                           indirect=indirect)
        self.avail_idx = 0
        self.irqs: List[Tuple[int, int]] = []
        self.resets = 0
        if features is None:
            features = dev.device_features() | (1 << F_VERSION_1)
        self.handles = DeviceHandles(lambda cause, queue=-1: self.irqs.append((cause, queue)),
                                     self._reset)
        dev.activate(features, [self.q], self.handles)

    def _reset(self) -> None:
        self.resets += 1

    def make_available(self, head: int = 0) -> None:
        """Put the chain at descriptor ``head`` in the available ring and notify."""
        self.mem.write(AVAIL + 4 + 2 * (self.avail_idx % QSIZE), struct.pack("<H", head))
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.mem.write(AVAIL + 2, struct.pack("<H", self.avail_idx))
        self.dev.notify(0)

    def wait(self, want_reset: bool = False, timeout: float = 10.0) -> None:
        """Until the used index reaches what was made available (``want_reset``: until the
        device asked for a reset); raises AssertionError after ``timeout`` seconds. Returns at
        once for the Python path, which answers within :meth:`make_available`."""
        deadline = time.monotonic() + timeout
        while True:
            if want_reset and self.resets:
                return
            if not want_reset and self.used_idx() == self.avail_idx:
                return
            if time.monotonic() >= deadline:
                raise AssertionError("the device did not answer")
            time.sleep(0.001)

    def submit(self, bufs: Sequence[Any], at: int = HEAP) -> List[Tuple[int, int, bool]]:
        """One chain of ``bufs``: (bytes, False) device-readable or (length, True)
        device-writable (filled with 0xEE first: the device must fill it), laid out from GPA
        ``at`` on, made available, and waited for; returns [(gpa, length, writable)]."""
        laid, gpa = [], at
        for k, (b, w) in enumerate(bufs):
            n = b if isinstance(b, int) else len(b)
            self.mem.write(gpa, b"\xee" * n if isinstance(b, int) else b)
            last = k == len(bufs) - 1
            self.mem.write(DESC + 16 * k, struct.pack(
                "<QIHH", gpa, n, (DESC_F_WRITE if w else 0) | (0 if last else DESC_F_NEXT),
                k + 1))
            laid.append((gpa, n, w))
            gpa += n + 64
        self.make_available()
        self.wait()
        return laid

    def used_idx(self) -> int:
        return struct.unpack("<H", self.mem.read(USED + 2, 2))[0]

    def used(self) -> Tuple[int, int]:
        """(id, len) of the last used element; AssertionError if the device has not returned
        every chain made available."""
        idx = self.used_idx()
        assert idx == self.avail_idx, "the device did not return the request"
        return struct.unpack("<II", self.mem.read(USED + 4 + 8 * ((idx - 1) % QSIZE), 8))

    def request(self, rtype: int, sector: int = 0, out: bytes = b"", in_len: int = 0,
                split: Optional[Sequence[int]] = None, at: int = HEAP) -> Tuple[int, bytes, int]:
        """One well-formed request: (status, data read, used length). ``out``: the data to
        write; ``in_len``: bytes to read; ``split``: the data buffer's descriptor sizes."""
        bufs: list = [(header(rtype, sector), False)]
        sizes = split or ([len(out)] if out else [in_len] if in_len else [])
        pos = 0
        for n in sizes:
            bufs.append((out[pos:pos + n], False) if out else (n, True))
            pos += n
        bufs.append((1, True))
        laid = self.submit(bufs, at)
        data = b"".join(self.mem.read(g, n) for g, n, w in laid[1:-1] if w)
        return self.mem.read(laid[-1][0], 1)[0], data, self.used()[1]


KILLED_AT = 10                  # the sector the killed child writes at


def kill_after_flush(image: Any, payload: bytes, *, native: bool,
                     while_alive: Optional[Callable[[], None]] = None) -> None:
    """Run this module as a child process that opens ``image``, writes ``payload`` at sector
    :data:`KILLED_AT` and FLUSHes through a :class:`BlkDriver` (``native``: in a VM's RAM with
    the C worker on; else the Python path in plain mappings), then prints ``flushed``; call
    ``while_alive()``, SIGKILL the child and check that the signal ended it (AssertionError
    otherwise, with the child's stderr where it died first)."""
    child = subprocess.Popen([sys.executable, "-m", __name__, os.fspath(image), payload.hex(),
                              "native" if native else "python"], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    out, err = child.stdout, child.stderr
    assert out is not None and err is not None
    try:
        line = out.readline()
        assert line == "flushed\n", err.read() if child.poll() is not None else line
        if while_alive is not None:
            while_alive()
        os.kill(child.pid, signal.SIGKILL)
        assert child.wait(timeout=30) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        out.close()
        err.close()


def _killed_child(image: str, payload_hex: str, path: str) -> None:
    """The child of :func:`kill_after_flush`: never returns (it waits to be killed)."""
    vm = None
    if path == "native":
        kvm = Kvm()
        vm = kvm.create_vm()
        vm.create_irqchip()
        vm.add_memory(0, SLOT)
        vm.add_memory(SLOT, SLOT)
        memory = vm.memory
    else:
        memory = GuestMemory.anonymous(SLOT)
    dev = VirtioBlk(image)
    d = BlkDriver(memory, dev, indirect=False)
    if vm is not None:
        dev.fastpath_update(vm, NOTIFY, None)
        assert dev._worker is not None, dev.native_error
    assert d.request(T_OUT, KILLED_AT, out=bytes.fromhex(payload_hex))[0] == S_OK
    assert d.request(T_FLUSH)[0] == S_OK
    print("flushed", flush=True)
    time.sleep(60)


if __name__ == "__main__":
    _killed_child(*sys.argv[1:4])
