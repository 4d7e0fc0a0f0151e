"""The virtio-mmio transport, register layout version 2 (modern devices only; virtio 1.2
section 4.2.2), one 0x200-byte window per device on the MMIO bus.

======  =====================  ===  ==================================================
offset  register               dir  what
======  =====================  ===  ==================================================
0x000   MagicValue             R    0x74726976 ("virt")
0x004   Version                R    2
0x008   DeviceID               R    the device type (section 5)
0x00C   VendorID               R    :data:`VENDOR_ID`
0x010   DeviceFeatures         R    32 bits of the offered features, window
0x014   DeviceFeaturesSel      W    ... chosen here (0-3; later windows read 0)
0x020   DriverFeatures         W    32 accepted bits, window
0x024   DriverFeaturesSel      W    ... chosen here
0x030   QueueSel               W    the queue the registers below address
0x034   QueueNumMax            R    its maximum size (0: no such queue)
0x038   QueueNum               W    the size the driver uses
0x044   QueueReady             RW   1: the queue is set up
0x050   QueueNotify            W    a queue index: it has new buffers
0x060   InterruptStatus        R    bit 0 used buffers, bit 1 configuration change
0x064   InterruptACK           W    clears the bits written
0x070   Status                 RW   device status (section 2.1); 0 resets
0x080   QueueDescLow/High      W    the descriptor table's GPA (0x080, 0x084)
0x090   QueueDriverLow/High    W    the available ring's GPA (0x090, 0x094)
0x0A0   QueueDeviceLow/High    W    the used ring's GPA (0x0A0, 0x0A4)
0x0AC   SHMSel                 W    shared memory regions: there are none, so
0x0B0   SHMLen/SHMBase         R    ... each half reads 0xFFFFFFFF (length -1)
0x0FC   ConfigGeneration       R    changes when the configuration space does
0x100   Config                 RW   the device's configuration space
======  =====================  ===  ==================================================

The driver must use aligned 32-bit accesses for the registers below 0x100 (4.2.2.2); any other
width or offset there reads 0 and is dropped on write, as are reads of write-only registers,
writes of read-only ones and offsets no register has. The configuration space takes any width
the device model does (1, 2, 4 or 8 bytes). A queue size (QueueNum) that is not a power of two
up to QueueNumMax leaves the queue unusable: QueueReady cannot be set to 1 until a valid size is
written. Queue registers change only while the queue is not ready and the driver has not set
DRIVER_OK (4.2.2.2); the feature and status rules are those of :mod:`.transport` (FEATURES_OK
needs VERSION_1 and is final; 0 resets).

The interrupt is one level-triggered line, high while InterruptStatus is not 0: a used-buffer
notification sets bit 0, a configuration change (or DEVICE_NEEDS_RESET, section 2.1.2) bit 1.
One lock (:attr:`TransportCore.lock`) serializes every access, so several vCPU threads and the
device's own threads may use it at once.

Where the platform gives the line's GSI (:meth:`VirtioMmio.enable_fastpath`), InterruptStatus
and the line live in C (:class:`.fastpath.MmioLine`): the C run loops answer the driver's
32-bit InterruptStatus reads and InterruptACK writes without returning to Python, and
virtio-blk's C worker raises its used-buffer interrupts itself, so a request costs no Python at
all; this class reads and changes the same state for everything else.
"""
from __future__ import annotations

from . import INT_CONFIG, INT_VRING, STATUS_DRIVER_OK, VirtioDevice
from .fastpath import MmioLine
from .transport import TransportCore

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Callable, Optional

MMIO_SIZE = 0x200
MAX_ACCESS = 8                  # the bus hands 8-byte accesses whole (config space may use them)
MAGIC = 0x74726976              # "virt", little-endian
VERSION = 2
VENDOR_ID = 0x4D564B50          # "PKVM", little-endian
CONFIG = 0x100

# register offsets (section 4.2.2, table 4.1)
MAGIC_VALUE, VERSION_REG, DEVICE_ID, VENDOR_ID_REG = 0x000, 0x004, 0x008, 0x00C
DEVICE_FEATURES, DEVICE_FEATURES_SEL = 0x010, 0x014
DRIVER_FEATURES, DRIVER_FEATURES_SEL = 0x020, 0x024
QUEUE_SEL, QUEUE_NUM_MAX, QUEUE_NUM, QUEUE_READY, QUEUE_NOTIFY = 0x030, 0x034, 0x038, 0x044, 0x050
INTERRUPT_STATUS, INTERRUPT_ACK, STATUS = 0x060, 0x064, 0x070
QUEUE_DESC_LOW, QUEUE_DESC_HIGH = 0x080, 0x084
QUEUE_DRIVER_LOW, QUEUE_DRIVER_HIGH = 0x090, 0x094
QUEUE_DEVICE_LOW, QUEUE_DEVICE_HIGH = 0x0A0, 0x0A4
SHM_SEL, SHM_LEN_LOW, SHM_LEN_HIGH, SHM_BASE_LOW, SHM_BASE_HIGH = 0x0AC, 0x0B0, 0x0B4, 0x0B8, 0x0BC
QUEUE_RESET = 0x0C0
CONFIG_GENERATION = 0x0FC

_ADDRESS_REGS = {QUEUE_DESC_LOW: ("desc", 0), QUEUE_DESC_HIGH: ("desc", 32),
                 QUEUE_DRIVER_LOW: ("driver", 0), QUEUE_DRIVER_HIGH: ("driver", 32),
                 QUEUE_DEVICE_LOW: ("device", 0), QUEUE_DEVICE_HIGH: ("device", 32)}


def cmdline_fragment(base: int, irq: int) -> str:
    """The Linux kernel's command-line form for a virtio-mmio device of :data:`MMIO_SIZE`
    bytes at guest-physical ``base`` with interrupt ``irq`` (GSI), e.g.
    ``virtio_mmio.device=512@0xfeb00000:16`` (``CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES``)."""
    return f"virtio_mmio.device={MMIO_SIZE}@{base:#x}:{irq}"


class VirtioMmio(TransportCore):
    """One virtio device behind a virtio-mmio window (module docstring), a bus device
    (:class:`pykvm.devices.bus.Device`). ``device``: the model; ``memory``: guest RAM
    (:class:`pykvm.memory.GuestMemory`) its queues live in; ``set_irq(level)``: drives the
    interrupt line (1 high, 0 low), called only when the level changes, under the lock.
    ``read``/``write`` never raise for any offset, size or value."""

    MMIO_SIZE = MMIO_SIZE

    def __init__(self, device: VirtioDevice, memory, set_irq: Callable[[int], None]):
        self.set_irq = set_irq
        self._status = 0
        self._level = 0
        self._interrupts = 0
        # where the platform lets a device's C path in (:meth:`enable_fastpath`)
        self.fastpath_vm = None
        self.fastpath_notify: Optional[int] = None
        self.line: Optional[MmioLine] = None
        super().__init__(device, memory)

    def enable_fastpath(self, vm, base: int, gsi: Optional[int] = None,
                        quiet: Optional[Callable[[], bool]] = None) -> None:
        """Let a device with a C path (``fastpath_update``, :mod:`.fastpath`: virtio-blk) serve
        queue 0 itself once the driver sets DRIVER_OK: ``vm`` (:class:`pykvm.vm.Vm`) for its
        ioeventfd on this window's QueueNotify (``base`` + 0x050, a GPA). With ``gsi`` (the
        line's KVM_IRQ_LINE number: an x86 GSI, a RISC-V APLIC source), InterruptStatus and
        the line move into C (:attr:`line`, module docstring) and ``set_irq`` is no longer
        called; the platform then gives :meth:`loop_handles` to its run loops; ``quiet()``
        true: a refused KVM_IRQ_LINE is dropped (the machine is stopping). Called by the
        platform once, before the guest runs."""
        self.fastpath_vm, self.fastpath_notify = vm, base + QUEUE_NOTIFY
        if gsi is not None:
            with self.lock:
                line = MmioLine(base, vm.fd, gsi, quiet)
                if self._status:
                    line.signal(self._status)
                self.line = line

    def loop_handles(self) -> tuple:
        """What a run loop's ``vmmio`` configuration takes for this window (the C handle's
        address), or () when InterruptStatus is kept in Python."""
        return (self.line,) if self.line is not None else ()

    # -- the interrupt line ------------------------------------------------------------------
    @property
    def interrupt_status(self) -> int:
        """InterruptStatus now (bit 0: used buffers, bit 1: configuration change)."""
        return self.line.status if self.line is not None else self._status

    @property
    def interrupts(self) -> int:
        """Times the line went high (tests, stats)."""
        return self.line.counts()["raised"] if self.line is not None else self._interrupts

    def _update_line(self) -> None:
        level = 1 if self._status else 0
        if level != self._level:
            self._level = level
            if level:
                self._interrupts += 1
            self.set_irq(level)

    def signal(self, cause: int, queue: int) -> None:
        """Set ``cause`` (:data:`INT_VRING` / :data:`INT_CONFIG`) in InterruptStatus and raise
        the line (the queue does not matter: there is one line)."""
        with self.lock:
            if self.line is not None:
                self.line.signal(cause & (INT_VRING | INT_CONFIG))
                return
            self._status |= cause & (INT_VRING | INT_CONFIG)
            self._update_line()

    def _ack(self, bits: int) -> None:
        if self.line is not None:
            self.line.ack(bits)
            return
        self._status &= ~bits
        self._update_line()

    def reset_signals(self) -> None:
        """A reset clears InterruptStatus and lowers the line."""
        self._ack(0xFFFFFFFF)

    def config_changed(self) -> None:
        """The device's configuration space changed (a disk resized, a console resized): a
        new ConfigGeneration and a configuration-change interrupt once the driver runs."""
        with self.lock:
            self.config_generation = (self.config_generation + 1) & 0xFFFFFFFF
            if self.status & STATUS_DRIVER_OK:
                self.signal(INT_CONFIG, -1)

    # -- the bus device ----------------------------------------------------------------------
    def read(self, offset: int, size: int) -> int:
        """The register or configuration bytes at ``offset`` (module docstring)."""
        with self.lock:
            if offset >= CONFIG:
                if offset + size > MMIO_SIZE:
                    return 0
                try:
                    return self.device.config_read(offset - CONFIG, size) & ((1 << 8 * size) - 1)
                except Exception:            # noqa: BLE001 — a model's bug is not the guest's
                    return 0
            if size != 4 or offset % 4:
                return 0
            return self._register(offset) & 0xFFFFFFFF

    def _register(self, offset: int) -> int:
        if offset == MAGIC_VALUE:
            return MAGIC
        if offset == VERSION_REG:
            return VERSION
        if offset == DEVICE_ID:
            return self.device.device_id
        if offset == VENDOR_ID_REG:
            return VENDOR_ID
        if offset == DEVICE_FEATURES:
            return self.device_features_word()
        if offset == QUEUE_NUM_MAX:
            return self.device.queue_max if self.selected is not None else 0
        if offset == QUEUE_READY:
            q = self.selected
            return 1 if q is not None and q.enabled else 0
        if offset == INTERRUPT_STATUS:
            return self.interrupt_status
        if offset == STATUS:
            return self.status
        if offset in (SHM_LEN_LOW, SHM_LEN_HIGH, SHM_BASE_LOW, SHM_BASE_HIGH):
            return 0xFFFFFFFF                # no shared memory region: length (and base) -1
        if offset == CONFIG_GENERATION:
            return self.config_generation
        return 0                             # write-only and reserved registers

    def write(self, offset: int, size: int, value: int) -> None:
        """Take the driver's write at ``offset`` (module docstring)."""
        with self.lock:
            if offset >= CONFIG:
                if offset + size <= MMIO_SIZE:
                    try:
                        self.device.config_write(offset - CONFIG, size,
                                                 value & ((1 << 8 * size) - 1))
                    except Exception:        # noqa: BLE001 — a model's bug is not the guest's
                        pass
                return
            if size != 4 or offset % 4:
                return
            self._write_register(offset, value & 0xFFFFFFFF)

    def _write_register(self, offset: int, value: int) -> None:
        if offset == DEVICE_FEATURES_SEL:
            self.device_feature_select = value
        elif offset == DRIVER_FEATURES:
            self.write_driver_features_word(value)
        elif offset == DRIVER_FEATURES_SEL:
            self.driver_feature_select = value
        elif offset == QUEUE_SEL:
            self.queue_select = value
        elif offset == QUEUE_NUM:
            q = self.selected
            if q is not None and self.queue_writable():
                valid = 0 < value <= self.device.queue_max and value & (value - 1) == 0
                q.size = value if valid else 0       # 0: unusable until a valid size
        elif offset == QUEUE_READY:
            q = self.selected
            if q is None or self.status & STATUS_DRIVER_OK:     # the set-up is final
                return
            if value & 1:
                q.enabled = q.size != 0
            else:
                q.enabled = False
        elif offset == QUEUE_NOTIFY:
            self.notify(value)
        elif offset == INTERRUPT_ACK:
            self._ack(value)
        elif offset == STATUS:
            self.write_status(value)
            fn = getattr(self.device, "fastpath_update", None)
            if fn is not None and self.status & STATUS_DRIVER_OK:
                fn(self.fastpath_vm, self.fastpath_notify, None, self.line)  # no-op without a vm
        elif offset in _ADDRESS_REGS:
            field, shift = _ADDRESS_REGS[offset]
            self.write_queue_address(field, value, shift)
        # SHMSel, QueueReset (VIRTIO_F_RING_RESET is not offered) and reserved: dropped
