"""The virtio-pci transport, modern interface only (virtio 1.2 section 4.1), as a PCI function
of the pc machine's bus 0.

Configuration space: vendor 0x1AF4, device 0x1040 + the virtio device type, revision 1,
subsystem ids of QEMU's; the class code of the device kind. A capability list of vendor-specific
capabilities (id 0x09, ``struct virtio_pci_cap``, section 4.1.4) pointing into BAR 4, then the
VIRTIO_PCI_CAP_PCI_CFG window (4.1.4.9), then MSI-X (id 0x11, table and PBA in BAR 1):

==========  =========================  =================================================
BAR 4 at    what                       section
==========  =========================  =================================================
0x0000      common configuration       4.1.4.3 (``struct virtio_pci_common_cfg``)
0x1000      ISR status (read clears)   4.1.4.5
0x2000      device configuration       4.1.4.6 (the device's own layout)
0x3000      notifications              4.1.4.4, ``notify_off_multiplier`` 4: queue *n*
                                       is notified by a write at 0x3000 + 4 *n*
==========  =========================  =================================================

Interrupts: with MSI-X enabled, each queue's and the configuration's vector (``queue_msix_vector``
/ ``config_msix_vector``; 0xFFFF is none) sends its table entry's message unless the entry or
the function is masked, in which case the PBA bit is set and the message goes when unmasked
(PCI Local Bus 3.0, 6.8.2). Without MSI-X, INTA# is held while the ISR is non-zero.

Every register answers any width and offset the guest uses: reserved bytes read 0, writes to
read-only fields are dropped, and a value out of range (a queue size that is not a power of
two, a vector past the table) is ignored or, for vectors, read back as 0xFFFF (4.1.4.3.2).
"""
from __future__ import annotations

from . import INT_CONFIG, ID_BLOCK, ID_CONSOLE, ID_NET, ID_RNG, VirtioDevice
from .transport import TransportCore
from ..pci_host import PciFunction

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Callable, Optional

VENDOR_VIRTIO = 0x1AF4
DEVICE_BASE = 0x1040                     # modern device id = 0x1040 + virtio device type
CLASS_CODES = {ID_NET: 0x020000, ID_BLOCK: 0x018000, ID_CONSOLE: 0x078000, ID_RNG: 0x00FF00}

BAR_MSIX = 1
BAR_VIRTIO = 4
BAR_MSIX_SIZE = 0x1000
BAR_VIRTIO_SIZE = 0x4000
COMMON, ISR, DEVICE, NOTIFY = 0x0000, 0x1000, 0x2000, 0x3000
REGION_SIZE = 0x1000
NOTIFY_MULTIPLIER = 4
MSIX_TABLE, MSIX_PBA = 0x000, 0x800
MAX_VECTORS = 64
NO_VECTOR = 0xFFFF
# the common-configuration fields whose writes change what a device's C path mirrors
# (:meth:`VirtioPci.fastpath_sync`): device_status (the device starts, stops or resets) and
# queue_msix_vector (queue 0's message); the notify address and MSI-X enable / function mask live
# in configuration space (:meth:`VirtioPci.config_changed`), table entries in BAR 1
FASTPATH_FIELDS = (0x14, 0x1A)

CAP_VENDOR, CAP_MSIX = 0x09, 0x11
CFG_COMMON, CFG_NOTIFY, CFG_ISR, CFG_DEVICE, CFG_PCI = 1, 2, 3, 4, 5
CAPS_AT = 0x40                           # first capability
PCI_CFG_CAP = 0x80                       # VIRTIO_PCI_CAP_PCI_CFG: bar, offset, length, data
MSIX_CAP = 0x98


class VirtioPci:
    """One virtio device as a PCI function. ``device``: the model; ``memory``: guest RAM;
    ``bars``: (BAR 1 address, BAR 4 address) as firmware assigns them; ``intx_line``: the ISA
    IRQ INTA# is routed to (what the guest reads in the Interrupt Line register);
    ``send_msi(address, data)``: deliver a message; ``set_intx(level)``: drive INTA#.

    :attr:`pci` is the configuration space for :class:`pykvm.devices.pci_host.PciHost`; after
    each configuration write the platform calls :meth:`config_changed` and re-maps
    :meth:`windows`. The function itself is a bus device (``read``/``write`` with the offset
    into BAR 4) and :attr:`msix` one for BAR 1."""

    def __init__(self, device: VirtioDevice, memory, *, bars, intx_line: int,
                 send_msi: Callable[[int, int], None], set_intx: Callable[[int], None]):
        self.core = _PciCore(self, device, memory)
        self.send_msi = send_msi
        self.set_intx = set_intx
        self.isr = 0
        self._intx = 0
        self.nvectors = min(MAX_VECTORS, device.num_queues + 1)
        self.table = bytearray(16 * self.nvectors)
        for i in range(self.nvectors):
            self.table[16 * i + 12] = 1                  # vector control: masked at reset
        self.pba = 0
        self.msis_sent = 0
        kind = device.device_id
        f = _VirtioFunction(self, VENDOR_VIRTIO, DEVICE_BASE + kind,
                            CLASS_CODES.get(kind, 0xFF0000), revision=1)
        f.put16(0x2C, VENDOR_VIRTIO)                      # subsystem vendor
        f.put16(0x2E, 0x1100)                             # subsystem id (QEMU's)
        f.add_bar(BAR_MSIX, BAR_MSIX_SIZE, bars[0])
        f.add_bar(BAR_VIRTIO, BAR_VIRTIO_SIZE, bars[1])
        f.config[0x3D] = 0x01                             # INTA#
        f.config[0x3C] = intx_line
        f.config[0x04] = 0x02                             # memory decoding on, as firmware
        f.config[0x06] |= 0x10                            # capabilities list
        f.config[0x34] = CAPS_AT
        caps = ((CFG_COMMON, COMMON, 0x3C), (CFG_NOTIFY, NOTIFY, 4 * device.num_queues),
                (CFG_ISR, ISR, 1), (CFG_DEVICE, DEVICE, REGION_SIZE))
        off = CAPS_AT
        for i, (typ, start, length) in enumerate(caps):
            size = 20 if typ == CFG_NOTIFY else 16
            nxt = off + size if i + 1 < len(caps) else PCI_CFG_CAP
            f.config[off:off + 16] = bytes((CAP_VENDOR, nxt, size, typ, BAR_VIRTIO, 0, 0, 0)) + \
                start.to_bytes(4, "little") + length.to_bytes(4, "little")
            if typ == CFG_NOTIFY:
                f.config[off + 16:off + 20] = NOTIFY_MULTIPLIER.to_bytes(4, "little")
            off += size
        # VIRTIO_PCI_CAP_PCI_CFG: bar, offset and length writable; data (4 bytes) is a window
        f.config[PCI_CFG_CAP:PCI_CFG_CAP + 4] = bytes((CAP_VENDOR, MSIX_CAP, 20, CFG_PCI))
        f.wmask[PCI_CFG_CAP + 4] = 0xFF
        f.wmask[PCI_CFG_CAP + 8:PCI_CFG_CAP + 16] = b"\xff" * 8
        # MSI-X: table size - 1, table in BAR 1 at 0, PBA in BAR 1 at 0x800
        f.config[MSIX_CAP:MSIX_CAP + 2] = bytes((CAP_MSIX, 0))
        f.put16(MSIX_CAP + 2, self.nvectors - 1)
        f.wmask[MSIX_CAP + 3] = 0xC0                      # enable, function mask
        f.config[MSIX_CAP + 4:MSIX_CAP + 8] = (MSIX_TABLE | BAR_MSIX).to_bytes(4, "little")
        f.config[MSIX_CAP + 8:MSIX_CAP + 12] = (MSIX_PBA | BAR_MSIX).to_bytes(4, "little")
        self.pci = f
        self.msix = _MsixBar(self)
        self.fastpath_vm = None        # the Vm, where the platform lets a device's C path in
        # [(base, size, bus device)] the platform's bus really decodes (a BAR placed over another
        # device is refused there); None: no platform says, so :meth:`windows` is taken
        self.mapped_windows: Optional[list] = None

    def fastpath_sync(self) -> None:
        """Tell a device with a C path (``fastpath_update``, :mod:`.fastpath`) where queue 0's
        notification lands and the message its vector sends now (None while MSI-X is off,
        the function or the entry is masked, or the queue has no vector). Under the core lock.
        The notify address is None while BAR 4 is not decoded, or not mapped by the platform
        (:attr:`mapped_windows`)."""
        fn = getattr(self.core.device, "fastpath_update", None)
        if fn is None:
            return
        wins = self.windows() if self.mapped_windows is None else self.mapped_windows
        # only a BAR the bus decodes: an ioeventfd elsewhere would take another device's writes
        notify = next((base + NOTIFY for base, _size, dev in wins if dev is self), None)
        msi = None
        q = self.core.queues[0] if self.core.queues else None
        if q is not None and self.msix_enabled and not self.msix_function_masked \
                and q.vector < self.nvectors:
            address, data, masked = self._entry(q.vector)
            msi = None if masked else (address, data)
        fn(self.fastpath_vm, notify, msi)

    # -- where the BARs decode -------------------------------------------------------------
    def windows(self):
        """[(base, size, bus device)] of the BARs decoded now: none while memory decoding is
        off, nor a BAR at 0 or one that would reach past 4 GiB (being sized)."""
        if not self.pci.memory_enabled:
            return []
        out = []
        for bar, size, dev in ((BAR_MSIX, BAR_MSIX_SIZE, self.msix),
                               (BAR_VIRTIO, BAR_VIRTIO_SIZE, self)):
            base = self.pci.bar_address(bar) & ~(size - 1)
            if base and base + size <= 0xFFFFFFFF:
                out.append((base, size, dev))
        return out

    def config_changed(self) -> None:
        """After a configuration write: MSI-X may have been switched on, off or unmasked."""
        with self.core.lock:
            self._deliver_pending()
            self._update_intx()
            self.fastpath_sync()

    # -- MSI-X ---------------------------------------------------------------------------
    @property
    def msix_enabled(self) -> bool:
        return bool(self.pci.config[MSIX_CAP + 3] & 0x80)

    @property
    def msix_function_masked(self) -> bool:
        return bool(self.pci.config[MSIX_CAP + 3] & 0x40)

    def _entry(self, vector: int):
        e = self.table[16 * vector:16 * vector + 16]
        return (int.from_bytes(e[0:8], "little"), int.from_bytes(e[8:12], "little"),
                bool(e[12] & 1))

    def _send_vector(self, vector: int) -> None:
        if vector >= self.nvectors:
            return
        address, data, masked = self._entry(vector)
        if masked or self.msix_function_masked:
            self.pba |= 1 << vector
            return
        self.pba &= ~(1 << vector)
        self.msis_sent += 1
        self.send_msi(address, data)

    def _deliver_pending(self) -> None:
        if not self.msix_enabled or self.msix_function_masked or not self.pba:
            return
        for v in range(self.nvectors):
            if self.pba >> v & 1 and not self._entry(v)[2]:
                self._send_vector(v)

    def _update_intx(self) -> None:
        level = 1 if self.isr and not self.msix_enabled else 0
        if level != self._intx:
            self._intx = level
            self.set_intx(level)

    def signal(self, cause: int, queue: int) -> None:
        """An interrupt of ``cause`` for ``queue`` (-1: configuration), under the core lock."""
        self.isr |= cause
        if self.msix_enabled:
            q = self.core.queues[queue] if 0 <= queue < len(self.core.queues) else None
            if cause == INT_CONFIG:
                vector = self.core.config_vector
            elif q is not None:
                vector = q.vector
            else:                                # a device that did not say which queue
                for c in self.core.queues:
                    if c.enabled and c.vector != NO_VECTOR:
                        self._send_vector(c.vector)
                return
            if vector != NO_VECTOR:
                self._send_vector(vector)
            return
        self._update_intx()

    # -- BAR 4 (the bus device protocol; offset into the BAR) -------------------------------
    def read(self, offset: int, size: int) -> int:
        core = self.core
        with core.lock:
            if COMMON <= offset < COMMON + REGION_SIZE:
                return self._common_read(offset - COMMON, size)
            if offset == ISR:
                v, self.isr = self.isr, 0               # reading clears it (4.1.4.5.1)
                self._update_intx()
                return v
            if DEVICE <= offset < DEVICE + REGION_SIZE:
                return core.device.config_read(offset - DEVICE, size)
            return 0

    def write(self, offset: int, size: int, value: int) -> None:
        core = self.core
        if NOTIFY <= offset < NOTIFY + REGION_SIZE:
            if (offset - NOTIFY) % NOTIFY_MULTIPLIER == 0:
                core.notify((offset - NOTIFY) // NOTIFY_MULTIPLIER)
            return
        with core.lock:
            if COMMON <= offset < COMMON + REGION_SIZE:
                self._common_write(offset - COMMON, size, value)
                if offset - COMMON in FASTPATH_FIELDS:
                    self.fastpath_sync()
            elif DEVICE <= offset < DEVICE + REGION_SIZE:
                core.device.config_write(offset - DEVICE, size, value)

    # common configuration, by field offset (struct virtio_pci_common_cfg)
    def _common_fields(self):
        c = self.core
        q = c.selected
        return {
            0x00: (4, c.device_feature_select), 0x04: (4, c.device_features_word()),
            0x08: (4, c.driver_feature_select), 0x0C: (4, c.driver_features_word()),
            0x10: (2, c.config_vector), 0x12: (2, len(c.queues)), 0x14: (1, c.status),
            0x15: (1, c.config_generation), 0x16: (2, c.queue_select),
            0x18: (2, q.size if q else 0), 0x1A: (2, q.vector if q else NO_VECTOR),
            0x1C: (2, int(q.enabled) if q else 0), 0x1E: (2, c.queue_select if q else 0),
            0x20: (8, q.desc if q else 0), 0x28: (8, q.driver if q else 0),
            0x30: (8, q.device if q else 0),
        }

    def _common_read(self, off: int, size: int) -> int:
        out = 0
        fields = self._common_fields()
        for i in range(size):                     # byte by byte: any width, any offset
            b = off + i
            for start, (width, value) in fields.items():
                if start <= b < start + width:
                    out |= ((value >> (8 * (b - start))) & 0xFF) << (8 * i)
                    break
        return out

    def _common_write(self, off: int, size: int, value: int) -> None:
        c = self.core
        q = c.selected
        mask = (1 << (8 * size)) - 1
        value &= mask
        if off == 0x00 and size == 4:
            c.device_feature_select = value
        elif off == 0x08 and size == 4:
            c.driver_feature_select = value
        elif off == 0x0C and size == 4:
            c.write_driver_features_word(value)
        elif off == 0x10 and size == 2:
            c.config_vector = value if value < self.nvectors else NO_VECTOR
        elif off == 0x14 and size == 1:
            c.write_status(value)
        elif off == 0x16 and size == 2:
            c.queue_select = value
        elif off == 0x18 and size == 2:
            c.set_queue_size(value)
        elif off == 0x1A and size == 2 and q is not None:
            q.vector = value if value < self.nvectors else NO_VECTOR
        elif off == 0x1C and size == 2 and q is not None:
            if value == 1 and c.queue_writable():
                q.enabled = True                   # 0 is not a way to disable (4.1.4.3.2)
        elif off in (0x20, 0x24, 0x28, 0x2C, 0x30, 0x34) and (size == 4 or size == 8 and not off & 4):
            c.write_queue_address({0x20: "desc", 0x28: "driver", 0x30: "device"}[off & ~7], value,
                                  32 if off & 4 else 0, 8 * size)


class _PciCore(TransportCore):
    """The transport core, signalling through its :class:`VirtioPci`."""

    def __init__(self, owner: VirtioPci, device: VirtioDevice, memory):
        self.owner = owner
        super().__init__(device, memory)

    def signal(self, cause: int, queue: int) -> None:
        self.owner.signal(cause, queue)

    def reset_signals(self) -> None:
        self.owner.isr = 0                       # only reset() calls it: owner is complete
        self.owner._update_intx()


class _VirtioFunction(PciFunction):
    """The function's configuration space, with the VIRTIO_PCI_CAP_PCI_CFG data window: a read
    or write of its ``pci_cfg_data`` reaches BAR ``cap.bar`` at ``cap.offset`` for
    ``cap.length`` (1, 2 or 4) bytes (4.1.4.9.1); any other BAR or length reads 0 and drops
    the write."""

    def __init__(self, owner: VirtioPci, *args, **kw):
        super().__init__(*args, **kw)
        self.owner = owner

    def _window(self):
        c = self.config
        bar = c[PCI_CFG_CAP + 4]
        offset = int.from_bytes(c[PCI_CFG_CAP + 8:PCI_CFG_CAP + 12], "little")
        length = int.from_bytes(c[PCI_CFG_CAP + 12:PCI_CFG_CAP + 16], "little")
        if bar != BAR_VIRTIO or length not in (1, 2, 4) or offset >= BAR_VIRTIO_SIZE:
            return None
        return offset, length

    def read(self, off: int, size: int) -> int:
        if PCI_CFG_CAP + 16 <= off < PCI_CFG_CAP + 20:
            w = self._window()
            return 0 if w is None else self.owner.read(w[0], w[1]) & ((1 << (8 * size)) - 1)
        return super().read(off, size)

    def write(self, off: int, size: int, value: int) -> None:
        if PCI_CFG_CAP + 16 <= off < PCI_CFG_CAP + 20:
            w = self._window()
            if w is not None:
                self.owner.write(w[0], w[1], value & ((1 << (8 * w[1])) - 1))
            return
        super().write(off, size, value)


class _MsixBar:
    """BAR 1: the MSI-X table (16 bytes per vector: address, data, vector control) and the
    pending bit array; the bus device protocol with the offset into the BAR."""

    def __init__(self, owner: VirtioPci):
        self.owner = owner

    def read(self, offset: int, size: int) -> int:
        o = self.owner
        with o.core.lock:
            if MSIX_TABLE <= offset < MSIX_TABLE + len(o.table):
                return int.from_bytes(o.table[offset:offset + size].ljust(size, b"\0"), "little")
            if MSIX_PBA <= offset < MSIX_PBA + 8:
                return (o.pba >> (8 * (offset - MSIX_PBA))) & ((1 << (8 * size)) - 1)
            return 0

    def write(self, offset: int, size: int, value: int) -> None:
        o = self.owner
        with o.core.lock:
            if MSIX_TABLE <= offset < MSIX_TABLE + len(o.table):
                end = min(offset + size, len(o.table))
                data = value.to_bytes(size, "little")[:end - offset]
                for i, b in enumerate(data):
                    pos = offset + i
                    if pos % 16 == 12:
                        b &= 1                      # vector control: only the mask bit
                    elif pos % 16 > 12:
                        b = 0
                    o.table[pos] = b
                o._deliver_pending()               # an unmasked entry sends what was pending
                q = o.core.queues[0] if o.core.queues else None
                if q is not None and q.vector < o.nvectors and \
                        offset < 16 * (q.vector + 1) and 16 * q.vector < end:
                    o.fastpath_sync()              # queue 0's entry: the C path's message
