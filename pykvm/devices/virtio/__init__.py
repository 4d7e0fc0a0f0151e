"""Virtio devices (OASIS virtio 1.2, modern devices only, split virtqueues).

The pieces, each in its own module, meet at two narrow interfaces defined here:

* a **device** (:class:`VirtioDevice` subclass: :mod:`.blk`, :mod:`.rng`, :mod:`.console`)
  knows its device type, feature bits, configuration space and what to do with the buffers
  the driver makes available in its queues. It never sees a transport, a bus or the VM: it is
  handed :class:`Virtqueue` objects (:mod:`.queue`) when the driver sets DRIVER_OK and a
  :class:`DeviceHandles` with the one or two things it may do outside itself (raise an
  interrupt, mark itself broken);
* a **transport** (:mod:`.mmio`, virtio 1.2 section 4.2; :mod:`.pci`, section 4.1) is a bus
  device (:class:`pykvm.devices.bus.Device`) that owns feature negotiation, the device status
  field, the queue registers and the interrupt line or vectors, and calls the device.

Guest memory is reached only through the queues, which bound every access to guest RAM
(:class:`pykvm.memory.GuestMemory`); a guest that breaks the rules makes the device set
DEVICE_NEEDS_RESET (section 2.1.2) or drop the request, never the VMM fail.
"""
from __future__ import annotations

from ...errors import PykvmError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Callable, Dict, Optional, Sequence

# device types (virtio 1.2, section 5)
ID_NET, ID_BLOCK, ID_CONSOLE, ID_RNG = 1, 2, 3, 4

# device status bits (section 2.1)
STATUS_ACKNOWLEDGE = 1
STATUS_DRIVER = 2
STATUS_DRIVER_OK = 4
STATUS_FEATURES_OK = 8
STATUS_DEVICE_NEEDS_RESET = 64
STATUS_FAILED = 128

# reserved feature bits (section 6) a transport offers for every device
F_INDIRECT_DESC = 28
F_EVENT_IDX = 29
F_VERSION_1 = 32
F_ACCESS_PLATFORM = 33
TRANSPORT_FEATURES = (1 << F_INDIRECT_DESC) | (1 << F_EVENT_IDX) | (1 << F_VERSION_1)

# interrupt causes (the ISR status / InterruptStatus bits, sections 4.1.4.5 and 4.2.2)
INT_VRING = 1
INT_CONFIG = 2

QUEUE_MAX = 256            # queue size a device offers unless it says otherwise (power of 2)


class BackendUnavailable(PykvmError):
    """A device's host side cannot serve it: the program it runs is missing, will not start,
    exited or does not answer (passt, virtiofsd), or the host refuses the resource it needs
    (/dev/net/tun, creating a tap). A host problem, not bad input: ``pykvm run`` ends with
    status 8. The modules' own error classes (NetError, FsError) are raised with it mixed in,
    so callers that catch those still do."""


class DeviceHandles:
    """What a transport gives its device: ``interrupt(cause, queue=-1)`` raises
    :data:`INT_VRING` (used buffers in queue ``queue``; pass the index, which a transport with
    a vector per queue needs) or :data:`INT_CONFIG` (configuration change) as the transport
    signals it (an interrupt line, an MSI-X vector per queue); the device calls it when
    ``Virtqueue.needs_interrupt()`` says the driver wants one;
    ``needs_reset()`` sets DEVICE_NEEDS_RESET and tells the driver (section 2.1.2)."""

    __slots__ = ("interrupt", "needs_reset")

    def __init__(self, interrupt: Callable[..., None], needs_reset: Callable[[], None]):
        self.interrupt = interrupt
        self.needs_reset = needs_reset


class VirtioDevice:
    """A virtio device model, transport-independent. Subclasses set :attr:`device_id`,
    :attr:`num_queues` (and :attr:`queue_max` if not :data:`QUEUE_MAX`) and override the
    methods below. Methods are called by one transport, from vCPU threads, under the
    transport's lock: a device needs no locking of its own for them."""

    device_id = 0
    num_queues = 1
    queue_max = QUEUE_MAX

    def device_features(self) -> int:
        """The device-specific feature bits offered (bits 0-23 and 50-127 per section 6);
        the transport adds :data:`TRANSPORT_FEATURES`."""
        return 0

    def config_read(self, offset: int, size: int) -> int:
        """``size`` bytes (1, 2, 4 or 8) of the device configuration space at ``offset``,
        little-endian; offsets past its end read 0."""
        return 0

    def config_write(self, offset: int, size: int, value: int) -> None:
        """A driver write to the configuration space (ignored unless the device has writable
        fields)."""

    def activate(self, features: int, queues: Sequence[Optional[Any]],
                 handles: DeviceHandles) -> None:
        """The driver set DRIVER_OK: ``features`` are the negotiated bits; ``queues`` has one
        :class:`.queue.Virtqueue` per queue index (None where the driver did not enable it)."""

    def notify(self, index: int) -> None:
        """The driver notified queue ``index`` (an enabled one): process its available
        buffers. Never raises for anything the guest did."""

    def reset(self) -> None:
        """The driver wrote 0 to the status (or the transport reset): drop every queue and
        pending request, back to the state before :meth:`activate`."""

    def close(self) -> None:
        """Release host resources (files, threads). Idempotent."""

    def counters(self) -> Dict[str, int]:
        """The device's event counters by name (requests served, interrupts sent ...), for
        ``pykvm run --trace`` and :meth:`pykvm.machine.Machine.device_counters`; {} if none."""
        return {}
