"""virtio-rng, the entropy device (virtio 1.2 section 5.4): device type 4, one queue
(requestq), no feature bits and no configuration space. Every buffer chain the driver makes
available is filled, up to :data:`MAX_PER_REQUEST` bytes, with bytes of the host's
``getrandom(2)`` (the kernel's CSPRNG, as QEMU's ``rng-random``/kvmtool do) and returned with
the number of bytes written; a chain with no writable buffer is returned with 0.
"""
from __future__ import annotations

import os

from . import ID_RNG, INT_VRING, DeviceHandles, VirtioDevice

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Optional, Sequence

MAX_PER_REQUEST = 64 << 10       # bytes filled per chain at most (bounds the work per request)


class VirtioRng(VirtioDevice):
    """The entropy device (module docstring). ``requests``/``bytes_served`` count what it did
    (tests, stats)."""

    device_id = ID_RNG
    num_queues = 1

    def __init__(self) -> None:
        self._queue: Optional[Any] = None
        self._handles: Optional[DeviceHandles] = None
        self.requests = 0
        self.bytes_served = 0

    def activate(self, features: int, queues: Sequence[Optional[Any]],
                 handles: DeviceHandles) -> None:
        """Take the requestq (None when the driver did not enable it: then nothing is served)."""
        self._queue = queues[0] if queues else None
        self._handles = handles

    def notify(self, index: int) -> None:
        """Fill every chain available in the requestq, then interrupt the driver if it wants.
        A :class:`.queue.QueueError` (a broken ring) goes to the transport, which sets
        DEVICE_NEEDS_RESET."""
        q, handles = self._queue, self._handles
        if index != 0 or q is None or handles is None:
            return
        while True:
            chain = q.pop()
            if chain is None:
                break
            n = min(chain.writable_len, MAX_PER_REQUEST)
            data = bytearray()
            while len(data) < n:          # getrandom may return fewer bytes (a signal)
                data += os.getrandom(n - len(data))
            written = chain.write(data) if n else 0
            q.push(chain, written)
            self.requests += 1
            self.bytes_served += written
        if q.needs_interrupt():
            handles.interrupt(INT_VRING, 0)

    def reset(self) -> None:
        """Forget the queue (the driver reset the device)."""
        self._queue = None
        self._handles = None
