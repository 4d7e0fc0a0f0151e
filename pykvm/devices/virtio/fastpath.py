"""virtio-blk's data path off the GIL: the request queue served by a C worker thread
(``csrc/virtio_blk.c`` in :mod:`pykvm._native`) while Python does nothing.

How a request travels with the worker on:

* the driver's notification (a write to the queue's notify address in BAR 4) signals an eventfd
  registered with KVM_IOEVENTFD: no exit to user space, the vCPU goes on;
* the worker thread, blocked in ``poll`` on that eventfd, takes the chains with the same checks as
  :mod:`.queue` (chain length bounded by the queue size, indirect tables, every buffer in guest
  RAM, lengths summing past 32 bits, ...), does the request as :mod:`.blk` does (``preadv`` /
  ``pwritev`` on host views of guest RAM, ``fdatasync``, ``fallocate``), and fills the used ring
  and the status byte, honouring EVENT_IDX and NO_INTERRUPT;
* the interrupt: while the queue's MSI-X vector is enabled and unmasked and no IOMMU remaps it,
  the worker sends its message itself (KVM_SIGNAL_MSI on the VM fd); otherwise it hands the
  interrupt to Python (an events thread that sleeps in C until then), which raises it through
  the transport exactly as the Python path does (pending bit of a masked vector, ISR and INTx).
  A ring that breaks a rule stops the worker's service and the events thread sets
  DEVICE_NEEDS_RESET through the device's handles.

The transport (:class:`.pci.VirtioPci`) tells the device where the notify address is and what
the vector's message is after every write that may change them (:meth:`VirtioBlk.fastpath_update
<.blk.VirtioBlk.fastpath_update>`); the worker is stopped, and joined, on reset, on status 0,
when BAR 4 moves or stops decoding, and on close, so no thread touches guest memory after the
device is closed (the pc machine closes devices after its vCPUs and before its memory).
Stopping hands the queue's indices back to the Python :class:`.queue.Virtqueue`, which can go
on from there.

``PYKVM_VIRTIO_BLK_NATIVE=0`` in the environment (or ``VirtioBlk(native=False)``) keeps the
Python path.
"""
from __future__ import annotations

import os
import threading

from ...errors import KvmError, PykvmError
from ..._native import ffi, lib

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Callable, Optional, Tuple

ENV = "PYKVM_VIRTIO_BLK_NATIVE"
_ERRLEN = 200


def enabled_by_default() -> bool:
    """Whether the environment leaves the C path on (``PYKVM_VIRTIO_BLK_NATIVE`` is not "0")."""
    return os.environ.get(ENV, "1") != "0"


class FastPathUnavailable(PykvmError):
    """The C path cannot take this queue (too many memory slots, the host refused the
    ioeventfd or the thread); the device stays on the Python path. One line saying why."""


class MmioLine:
    """A virtio-mmio transport's InterruptStatus and its level-triggered interrupt line, kept
    in C (``csrc/virtio_irq.c``) so that the C run loops serve the driver's InterruptStatus
    reads and InterruptACK writes (virtio 1.2 section 4.2.2) and a C worker raises used-buffer
    interrupts without any of them passing through Python. ``base``: the window's GPA;
    ``vm_fd``: the VM whose KVM_IRQ_LINE drives ``gsi`` (x86: a GSI; RISC-V: an APLIC
    source); ``quiet()``: true once a refused KVM_IRQ_LINE is no error (the machine is stopping).
    The line is high exactly while the status is not 0. Freed with the object (the transport
    keeps it as long as the machine's loops and workers can use it)."""

    def __init__(self, base: int, vm_fd: int, gsi: int,
                 quiet: Optional[Callable[[], bool]] = None):
        self._quiet = quiet
        h = lib.pykvm_vmmio_new(base, vm_fd, gsi)
        if h == ffi.NULL:
            raise MemoryError("virtio-mmio interrupt state")
        self._h = ffi.gc(h, lib.pykvm_vmmio_free)
        self.address = int(ffi.cast("uintptr_t", h))
        self.base, self.gsi = base, gsi
        self._out = ffi.new("struct pykvm_vmmio_counts *")

    def _check(self, r: int, what: str) -> None:
        if r and not (self._quiet is not None and self._quiet()):
            raise KvmError("KVM_IRQ_LINE", r, f"virtio-mmio {what}, line {self.gsi}")

    def signal(self, bits: int) -> None:
        """Set ``bits`` (1: used buffers, 2: configuration change) and raise the line. Raises
        :class:`pykvm.errors.KvmError` when KVM refuses KVM_IRQ_LINE, unless ``quiet()`` (the
        constructor's: the machine is stopping) says to drop it."""
        self._check(lib.pykvm_vmmio_signal(self._h, bits & 3), "signal")

    def ack(self, bits: int) -> None:
        """Clear ``bits`` (InterruptACK; 0xFFFFFFFF on reset), lowering the line at 0. Raises
        as :meth:`signal`."""
        self._check(lib.pykvm_vmmio_ack(self._h, bits & 0xFFFFFFFF), "ack")

    def counts(self) -> dict:
        """``status`` and ``level`` now; ``raised`` (times the line went high), ``served``
        (register accesses the C run loops answered), ``last_errno`` (0: KVM took every
        level)."""
        o = self._out
        lib.pykvm_vmmio_get(self._h, o)
        return {"status": o.status, "level": o.level, "raised": o.raised, "served": o.served,
                "last_errno": o.last_errno}

    @property
    def status(self) -> int:
        """InterruptStatus now."""
        return self.counts()["status"]


class BlkWorker:
    """One virtio-blk queue served by a C worker thread. ``vm_fd``: the VM's file descriptor;
    ``image_fd``: the open image; ``queue``: the :class:`.queue.Virtqueue` whose state the worker
    takes over (and gives back on :meth:`stop`); ``memory``: guest RAM
    (:class:`pykvm.memory.GuestMemory`); ``notify_gpa``: the guest-physical address of the
    queue's notification; ``serial``: the GET_ID bytes (20, NUL-padded); ``on_irq()`` /
    ``on_broken(why)``: called from the events thread for an interrupt Python must raise and
    for a ring that broke a rule; ``line``: a virtio-mmio transport's :class:`MmioLine`, through
    which the worker raises its interrupts itself (None: MSI or Python). Raises
    :class:`FastPathUnavailable`."""

    def __init__(self, *, vm_fd: int, image_fd: int, readonly: bool, block_size: int,
                 capacity: int, features: int, may_unmap: bool, serial: bytes, queue: Any,
                 memory: Any, notify_gpa: int, on_irq: Callable[[], None],
                 on_broken: Callable[[str], None], line: Optional[MmioLine] = None):
        slots = [(s.gpa, s.size, s.host_addr) for s in memory]
        if len(slots) > lib.PYKVM_BLK_MAX_SLOTS:
            raise FastPathUnavailable(f"{len(slots)} memory slots, the C path takes at most "
                                      f"{lib.PYKVM_BLK_MAX_SLOTS}")
        c = ffi.new("struct pykvm_blk_cfg *")
        c.vm_fd, c.image_fd, c.readonly = vm_fd, image_fd, int(readonly)
        c.block_size, c.capacity, c.features = block_size, capacity, features
        c.notify_gpa, c.qsize = notify_gpa, queue.size
        c.event_idx, c.indirect, c.may_unmap = int(queue.event_idx), int(queue.indirect), \
            int(may_unmap)
        c.desc, c.avail, c.used = queue.desc, queue.avail, queue.used
        c.last_avail, c.used_idx = queue.last_avail, queue.used_idx
        c.signalled, c.notify_on = queue._signalled, int(queue._notify)
        c.serial = serial[:20].ljust(20, b"\0")
        c.vmmio_irq = line.address if line is not None else 0
        self._line = line                      # kept alive while the worker may use it
        c.nslots = len(slots)
        for i, (gpa, size, hva) in enumerate(slots):
            c.slots[i].gpa, c.slots[i].size, c.slots[i].hva = gpa, size, hva
        err = ffi.new("char[]", _ERRLEN)
        h = lib.pykvm_blk_start(c, err, _ERRLEN)
        if h == ffi.NULL:
            raise FastPathUnavailable(f"virtio-blk C path: {ffi.string(err).decode()}")
        self._h = h
        self.queue = queue
        self.notify_gpa = notify_gpa
        self.msi: Optional[Tuple[int, int]] = None
        self.stats = {"requests": 0, "direct_msis": 0, "python_irqs": 0, "direct_lines": 0}
        self._stopped = False
        self._on_irq, self._on_broken = on_irq, on_broken
        self._why = ""
        t = threading.Thread(target=self._events, name="virtio-blk-events", daemon=True)
        t.start()

    def set_msi(self, msi: Optional[Tuple[int, int]]) -> None:
        """The message (address, data) the worker may send itself, or None: hand interrupts to
        Python."""
        if self._stopped or msi == self.msi:
            return
        self.msi = msi
        a, d = msi if msi is not None else (0, 0)
        lib.pykvm_blk_set_msi(self._h, a, d, int(msi is not None))

    def kick(self) -> None:
        """Have the worker look at the queue (a notification that did not come through the
        ioeventfd, e.g. one of another width)."""
        if not self._stopped:
            lib.pykvm_blk_kick(self._h)

    def stop(self) -> Optional[str]:
        """Stop and join the worker, give the queue's state back to the Virtqueue; returns why
        the ring broke (the Virtqueue is marked broken too) or None. Idempotent."""
        if self._stopped:
            return self._why or None
        self._stopped = True
        st = ffi.new("struct pykvm_blk_state *")
        lib.pykvm_blk_stop(self._h, st)          # the events thread frees the handle later
        q = self.queue
        q.last_avail, q.used_idx, q._signalled = st.last_avail, st.used_idx, st.signalled
        q._notify = bool(st.notify_on)
        self.stats = {"requests": st.requests, "direct_msis": st.direct_msis,
                      "python_irqs": st.python_irqs, "direct_lines": st.direct_lines}
        if st.broken:
            self._why = ffi.string(st.why).decode(errors="replace")
            q.broken = self._why
            return self._why
        return None

    def _events(self) -> None:
        h = self._h
        while True:
            ev = lib.pykvm_blk_wait_events(h)    # sleeps in C, without the GIL
            try:
                if ev & lib.PYKVM_BLK_EV_BROKEN:
                    self._on_broken("the ring broke a rule (the C path)")
                if ev & lib.PYKVM_BLK_EV_IRQ:
                    self._on_irq()
            except (PykvmError, OSError):        # the VM is going away under us: nothing to tell
                pass
            if ev & lib.PYKVM_BLK_EV_QUIT:
                lib.pykvm_blk_free(h)
                return
