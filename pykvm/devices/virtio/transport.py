"""What every virtio transport does the same way (virtio 1.2 sections 2.1-2.2 and 3.1): the
device status field and its reset, feature negotiation, the per-queue configuration the driver
writes before DRIVER_OK, turning it into :class:`.queue.Virtqueue` objects for the device, and
routing the device's interrupts and DEVICE_NEEDS_RESET back to the transport's own signalling.
A transport (:mod:`.pci`) subclasses :class:`TransportCore` and maps its registers onto it.
"""
from __future__ import annotations

import threading

from . import (F_VERSION_1, F_EVENT_IDX, F_INDIRECT_DESC, INT_CONFIG, STATUS_DEVICE_NEEDS_RESET,
               STATUS_DRIVER, STATUS_DRIVER_OK, STATUS_FAILED, STATUS_FEATURES_OK,
               TRANSPORT_FEATURES, DeviceHandles, VirtioDevice)
from .queue import QueueError, Virtqueue

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import List, Optional


class QueueConfig:
    """What the driver wrote for one queue (section 4.1.4.3 / 4.2.2): its size, whether it is
    enabled, the GPAs of its descriptor table, driver area (available ring) and device area
    (used ring), and (PCI) its MSI-X vector."""

    __slots__ = ("size", "enabled", "desc", "driver", "device", "vector")

    def __init__(self, size: int):
        self.size = size
        self.enabled = False
        self.desc = self.driver = self.device = 0
        self.vector = 0xFFFF                     # VIRTIO_MSI_NO_VECTOR


class TransportCore:
    """The transport-independent state of one virtio device. ``device``: the model;
    ``memory``: guest RAM (:class:`pykvm.memory.GuestMemory`) the queues live in. Every method
    takes :attr:`lock` (re-entrant: a device may raise an interrupt while the transport is in
    one of its calls). Subclasses implement :meth:`signal` (send an interrupt of ``cause``
    for queue ``queue``, -1 for the configuration)."""

    def __init__(self, device: VirtioDevice, memory):
        self.device = device
        self.memory = memory
        self.lock = threading.RLock()
        self.config_generation = 0
        self.resets = 0                          # driver-initiated resets, for tests and stats
        self.queue_errors = 0                    # rule breaks that set DEVICE_NEEDS_RESET
        self._handles = DeviceHandles(self._interrupt, self._needs_reset)
        self._reset_state()

    def _reset_state(self) -> None:
        self.status = 0
        self.device_feature_select = 0
        self.driver_feature_select = 0
        self.driver_features = 0
        self.queue_select = 0
        self.config_vector = 0xFFFF
        self.queues = [QueueConfig(self.device.queue_max) for _ in range(self.device.num_queues)]
        self.active: Optional[List[Optional[Virtqueue]]] = None

    # -- features (section 2.2) ------------------------------------------------------------
    def offered_features(self) -> int:
        """Every feature bit the device offers: its own and :data:`TRANSPORT_FEATURES`."""
        return self.device.device_features() | TRANSPORT_FEATURES

    def device_features_word(self) -> int:
        """The 32 feature bits the selected window (``device_feature_select``) shows."""
        sel = self.device_feature_select
        if sel > 3:
            return 0
        return (self.offered_features() >> (32 * sel)) & 0xFFFFFFFF

    def write_driver_features_word(self, value: int) -> None:
        """The driver's 32 accepted bits for the selected window; ignored once FEATURES_OK is
        set (section 3.1.1: negotiation ends there) and limited to what is offered."""
        with self.lock:
            sel = self.driver_feature_select
            if sel > 3 or self.status & STATUS_FEATURES_OK:
                return
            mask = 0xFFFFFFFF << (32 * sel)
            word = (value & 0xFFFFFFFF) << (32 * sel)
            self.driver_features = (self.driver_features & ~mask) | (word & self.offered_features())

    def driver_features_word(self) -> int:
        sel = self.driver_feature_select
        return 0 if sel > 3 else (self.driver_features >> (32 * sel)) & 0xFFFFFFFF

    # -- status (section 2.1) ----------------------------------------------------------------
    def write_status(self, value: int) -> None:
        """A driver write of the device status. 0 resets the device. FEATURES_OK stays clear
        (the driver reads it back and gives up, section 3.1.1 step 6) unless the accepted
        features include VERSION_1 (modern devices only). Setting DRIVER_OK after
        FEATURES_OK starts the device on the queues the driver enabled."""
        with self.lock:
            value &= 0xFF
            if value == 0:
                self.reset()
                return
            if value & STATUS_FEATURES_OK and not self.status & STATUS_FEATURES_OK:
                if not (self.driver_features >> F_VERSION_1) & 1 or not value & STATUS_DRIVER:
                    value &= ~STATUS_FEATURES_OK
            keep = self.status & STATUS_DEVICE_NEEDS_RESET
            start = (value & STATUS_DRIVER_OK and not self.status & STATUS_DRIVER_OK and
                     value & STATUS_FEATURES_OK and not value & STATUS_FAILED)
            self.status = value | keep
            if start:
                self._start()

    def _start(self) -> None:
        ev = bool((self.driver_features >> F_EVENT_IDX) & 1)
        ind = bool((self.driver_features >> F_INDIRECT_DESC) & 1)
        queues: List[Optional[Virtqueue]] = []
        for i, q in enumerate(self.queues):
            if not q.enabled:
                queues.append(None)
                continue
            try:
                queues.append(Virtqueue(self.memory, i, q.size, q.desc, q.driver, q.device,
                                        event_idx=ev, indirect=ind))
            except QueueError:
                queues.append(None)
                self._needs_reset()
        self.active = queues
        self.device.activate(self.driver_features, queues, self._handles)

    def reset(self) -> None:
        """Back to the state after power-on (section 2.4): the device drops its queues."""
        with self.lock:
            if self.status:
                self.resets += 1
            self.device.reset()
            self._reset_state()
            self.reset_signals()

    def reset_signals(self) -> None:
        """A transport lowers its interrupt line / clears its ISR on reset (override)."""

    # -- queues --------------------------------------------------------------------------
    @property
    def selected(self) -> Optional[QueueConfig]:
        """The queue ``queue_select`` names, or None past the last one."""
        s = self.queue_select
        return self.queues[s] if s < len(self.queues) else None

    def queue_writable(self) -> bool:
        """Whether the driver may still change the selected queue's set-up: before DRIVER_OK
        and while it is not enabled (sections 4.1.4.3.2, 4.2.2.2)."""
        q = self.selected
        return q is not None and not q.enabled and not self.status & STATUS_DRIVER_OK

    def set_queue_size(self, size: int) -> None:
        """QueueSize / QueueNum: a power of two up to the device's maximum, else ignored."""
        with self.lock:
            q = self.selected
            if (q is not None and self.queue_writable() and 0 < size <= self.device.queue_max
                    and size & (size - 1) == 0):
                q.size = size

    def write_queue_address(self, field: str, value: int, shift: int, width: int = 32) -> None:
        """The driver's write of ``width`` bits (32 or 64) of the selected queue's ``field``
        ("desc", "driver" or "device": a GPA) at bit ``shift`` (0 or 32); the other bits stay.
        Ignored once the queue's set-up is final (:meth:`queue_writable`)."""
        with self.lock:
            q = self.selected
            if q is None or not self.queue_writable():
                return
            mask = ((1 << width) - 1) << shift
            setattr(q, field, (getattr(q, field) & ~mask) | ((value << shift) & mask))

    def notify(self, index: int) -> None:
        """The driver's notification for queue ``index``: the device processes it when it is
        running and the queue is live; anything else is dropped (a notification for a queue
        never set up is not an error of the device's)."""
        with self.lock:
            if self.active is None or not 0 <= index < len(self.active):
                return
            if self.active[index] is None or self.status & STATUS_DEVICE_NEEDS_RESET:
                return
            try:
                self.device.notify(index)
            except QueueError:
                self._needs_reset()

    # -- what the device may do ----------------------------------------------------------
    def _interrupt(self, cause: int, queue: int = -1) -> None:
        with self.lock:
            if cause & INT_CONFIG:               # the configuration changed (section 2.5.1)
                self.config_generation = (self.config_generation + 1) & 0xFF
            self.signal(cause, queue)

    def _needs_reset(self) -> None:
        with self.lock:
            self.queue_errors += 1
            if self.status & STATUS_DRIVER_OK and not self.status & STATUS_DEVICE_NEEDS_RESET:
                self.status |= STATUS_DEVICE_NEEDS_RESET
                self.config_generation = (self.config_generation + 1) & 0xFF
                self.signal(INT_CONFIG, -1)
            else:
                self.status |= STATUS_DEVICE_NEEDS_RESET

    def signal(self, cause: int, queue: int) -> None:
        """Send an interrupt of ``cause`` (INT_VRING for ``queue``, INT_CONFIG with -1)."""
        raise NotImplementedError

    def close(self) -> None:
        """Release the device's host resources."""
        self.device.close()
