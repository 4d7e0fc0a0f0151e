"""QEMU's ``edu`` educational PCI device (QEMU docs/specs/edu.rst), which kvm-unit-tests drives
to test DMA remapping and interrupt remapping through an IOMMU.

PCI 1234:11e8, class 00ff00, revision 0x10, one 1 MiB 32-bit memory BAR, INTA#, an MSI
capability. Registers in BAR 0, served through the device protocol of :mod:`pykvm.devices.bus`
(``read(offset, size)``/``write(offset, size, value)``, ``offset`` from BAR 0's base) as QEMU's
hw/misc/edu.c serves them (``edu_mmio_ops``: ``.valid``/``.impl`` 4..8 bytes, so the bus range
takes accesses of up to 8 bytes): only naturally aligned 4-byte accesses below 0x80 and 4- or
8-byte ones from 0x80 on; any other size or alignment reads 0 (QEMU's unassigned read) and a
write is ignored; an 8-byte read below 0x80 and a read at an offset without a register read
all-ones. The bus, as QEMU's memory core, first cuts a guest access into naturally aligned
pieces of at most 8 bytes: an 8-byte access at 0x84 is a 4-byte one at 0x84 (no register) and
one at 0x88 (the low half of the DMA destination), as in QEMU.

=====  ==  ==========================================================================
0x00   RO  identification 0x010000ed (version 1.0)
0x04   RW  liveness check: reads the bitwise NOT of what was written
0x08   RW  factorial: writing n computes n! (32-bit, wrapping); status bit 0 is busy
0x20   RW  status: bit 0 computing (RO), bit 7 raise interrupt 0x1 after a factorial
0x24   RO  interrupt status
0x60   WO  interrupt raise: the value is ORed into the interrupt status
0x64   WO  interrupt acknowledge: the value's bits are cleared from the status
0x80   RW  DMA source address          0x88  RW  DMA destination address
0x90   RW  DMA count                   0x98  RW  DMA command: bit 0 start (clears when
           done), bit 1 direction (1: device buffer to RAM), bit 2 raise interrupt 0x100;
           a write without bit 0 is ignored
=====  ==  ==========================================================================

The device's own DMA buffer is 4 KiB at device address 0x40000 (not reachable through the BAR,
as in QEMU). DMA runs at once (the start bit reads 0 right away), only with PCI bus mastering
on, with the RAM address clamped to 28 bits (QEMU's ``dma_mask``), page by page through
``translate`` (the IOMMU, if the machine has one). A page the IOMMU blocks or that is not RAM
is unassigned memory, as in QEMU: reads give zeros, writes are dropped; the completion
interrupt is raised all the same. While the interrupt status is non-zero the device
interrupts: an MSI when MSI is enabled (each raise sends one, only with bus mastering on, as
an MSI is a memory write), else INTA# held high. No value a guest writes makes a method here
raise.
"""
from __future__ import annotations

import threading

from ..errors import GuestMemoryError
from .pci_host import PciFunction
from .vtd import DmaFault

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Callable, Optional

VENDOR_QEMU = 0x1234
DEVICE_EDU = 0x11E8
BAR_SIZE = 1 << 20
DMA_START = 0x40000
DMA_SIZE = 4096
DMA_MASK = (1 << 28) - 1            # QEMU's default dma_mask property: 28-bit DMA addresses
ID = 0x010000ED

REG_ID, REG_ALIVE, REG_FACTORIAL = 0x00, 0x04, 0x08
REG_STATUS, REG_INTR_STATUS, REG_INTR_RAISE, REG_INTR_ACK = 0x20, 0x24, 0x60, 0x64
REG_DMA_SRC, REG_DMA_DST, REG_DMA_COUNT, REG_DMA_CMD = 0x80, 0x88, 0x90, 0x98
STATUS_COMPUTING = 0x01
STATUS_IRQFACT = 0x80
DMA_CMD_START, DMA_CMD_FROM_DEV, DMA_CMD_IRQ = 0x1, 0x2, 0x4
IRQ_FACTORIAL = 0x1
IRQ_DMA = 0x100


class Edu:
    """The device. ``bdf``: its PCI requester id (bus << 8 | device << 3 | function); ``bar``:
    the guest-physical address firmware leaves BAR 0 at; ``intx_line``: the interrupt line
    register's value; ``memory``: guest memory (``read(gpa, n)``/``write(gpa, data)`` by
    guest-physical address, :class:`~pykvm.errors.GuestMemoryError` where there is no RAM);
    ``translate(requester_id, address, write)``: device address -> guest-physical (the IOMMU;
    default: identity), raising :class:`~pykvm.devices.vtd.DmaFault` for a blocked request;
    ``msi(requester_id, address, data)`` and ``set_intx(level)`` deliver its interrupts.

    Its register window moves: the guest reprograms BAR 0 and the command register through PCI
    configuration space (``self.pci``). :meth:`bar0_window` says where the window decodes now
    (None: nowhere). The platform maps it on its MMIO bus and, after every configuration write
    (``pci.on_write``, which must also call :meth:`config_changed`), maps it again::

        mmio.remove(edu)
        base = edu.bar0_window()
        if base is not None:
            mmio.insert(base, Edu.MMIO_SIZE, edu, max_access=Edu.MMIO_MAX_ACCESS)

    A guest may program BAR 0 over another device's range; ``insert`` then raises
    :class:`~pykvm.devices.bus.BusConflict`, which the platform must catch (the window then
    decodes nowhere) so that no guest write ends the VM."""

    MMIO_SIZE = BAR_SIZE                   # bytes in BAR 0's window
    MMIO_MAX_ACCESS = 8                    # QEMU's edu_mmio_ops .valid.max_access_size

    def __init__(self, *, bdf: int, bar: int, intx_line: int, memory,
                 msi: Callable[[int, int, int], None], set_intx: Callable[[int], None],
                 translate: Optional[Callable[[int, int, bool], int]] = None):
        self.bdf = bdf
        self.memory = memory
        self.msi_out = msi
        self.set_intx = set_intx
        self.translate = translate
        self.pci = PciFunction(VENDOR_QEMU, DEVICE_EDU, 0x00FF00, revision=0x10)
        self.pci.add_bar(0, BAR_SIZE, bar)
        self.pci.config[0x3D] = 0x01                       # INTA#
        self.pci.config[0x3C] = intx_line
        self.pci.config[0x04] = 0x02                       # memory decoding on, as firmware
        self.pci.add_msi(0x40)
        self.alive = 0
        self.factorial = 0
        self.status = 0
        self.intr_status = 0
        self.dma_src = self.dma_dst = self.dma_count = self.dma_cmd = 0
        self.buffer = bytearray(DMA_SIZE)
        self._intx = 0
        self._lock = threading.RLock()
        self.dma_errors = 0

    def bar0_window(self) -> Optional[int]:
        """The guest-physical base of BAR 0's :data:`MMIO_SIZE`-byte window, or None where it
        decodes nowhere. As QEMU's ``pci_bar_address``: None while Memory Space Enable
        (command register bit 1) is clear, while the BAR holds 0 (unprogrammed), and where the
        window would wrap or, for a 32-bit BAR, reach 0xFFFFFFFF (software writing all-ones
        to size the BAR)."""
        if not self.pci.memory_enabled:
            return None
        base = self.pci.bar_address(0) & ~(BAR_SIZE - 1)
        last = base + BAR_SIZE - 1
        mem64 = self.pci.bars[0][1]
        if base == 0 or last >= (1 << 64) - 1 or (not mem64 and last >= 0xFFFFFFFF):
            return None
        return base

    # -- interrupts ------------------------------------------------------------------------
    def _update_irq(self, raised: bool) -> None:
        enabled, address, data = self.pci.msi()
        if enabled:
            if self._intx:
                self._intx = 0
                self.set_intx(0)
            if raised and self.intr_status and self.pci.bus_master:
                self.msi_out(self.bdf, address, data)
            return
        level = 1 if self.intr_status else 0
        if level != self._intx:
            self._intx = level
            self.set_intx(level)

    def _raise(self, bits: int) -> None:
        self.intr_status |= bits
        self._update_irq(True)

    # -- DMA --------------------------------------------------------------------------------
    def _page(self, addr: int, n: int, write: bool, data: bytes = b"") -> bytes:
        """One transfer of ``n`` bytes within a page at device address ``addr``: through the
        IOMMU to guest RAM. Where the request is blocked (bus mastering off, an IOMMU fault) or
        lands outside RAM, it meets unassigned memory as in QEMU: a read gives zeros
        (``unassigned_mem_read``), a write is dropped."""
        try:
            if not self.pci.bus_master:
                raise DmaFault("bus mastering is off")
            gpa = self.translate(self.bdf, addr, write) if self.translate else addr
            if write:
                self.memory.write(gpa, data)
                return b""
            out = self.memory.read(gpa, n)
            if len(out) != n:
                raise GuestMemoryError(f"{gpa:#x}+{n:#x} is not RAM")
            return out
        except (DmaFault, GuestMemoryError, ValueError, OverflowError, IndexError):
            self.dma_errors += 1
            return b"" if write else bytes(n)

    def _ram(self, addr: int, n: int, write: bool, data: bytes = b"") -> bytes:
        """Read or write ``n`` bytes (at most :data:`DMA_SIZE`) at device address ``addr``, page
        by page (see :meth:`_page`)."""
        out = bytearray()
        pos = 0
        while pos < n:
            a = (addr + pos) & ((1 << 64) - 1)
            chunk = min(n - pos, 0x1000 - (a & 0xFFF))
            out += self._page(a, chunk, write, data[pos:pos + chunk])
            pos += chunk
        return bytes(out)

    def _dma(self) -> None:
        """Carry out the programmed transfer at once (QEMU's ``edu_dma_timer``). The device side
        must lie in the 4 KiB buffer at :data:`DMA_START` (QEMU only logs a transfer outside it;
        here it moves nothing), the RAM side address is clamped to :data:`DMA_MASK` as QEMU's
        ``edu_clamp_addr`` does. The start bit clears and, with bit 2 of the command, interrupt
        0x100 is raised whatever became of the transfer."""
        n = self.dma_count
        to_ram = self.dma_cmd & DMA_CMD_FROM_DEV
        dev = self.dma_src if to_ram else self.dma_dst
        off = dev - DMA_START
        if 0 <= off and off + n <= DMA_SIZE:
            if to_ram:
                self._ram(self.dma_dst & DMA_MASK, n, True, bytes(self.buffer[off:off + n]))
            else:
                self.buffer[off:off + n] = self._ram(self.dma_src & DMA_MASK, n, False)
        else:
            self.dma_errors += 1
        self.dma_cmd &= ~DMA_CMD_START
        if self.dma_cmd & DMA_CMD_IRQ:
            self._raise(IRQ_DMA)

    # -- registers ----------------------------------------------------------------------
    @staticmethod
    def _valid(off: int, n: int) -> bool:
        """QEMU's edu_mmio_ops ``.valid``: 4- or 8-byte, naturally aligned."""
        return n in (4, 8) and off % n == 0

    def read(self, offset: int, size: int) -> int:
        """The ``size``-byte little-endian value read at ``offset`` bytes into BAR 0, as QEMU's
        ``edu_mmio_read``: an access of another size or alignment reads 0; below 0x80 only
        4-byte reads answer (8-byte ones read all-ones), from 0x80 4- and 8-byte ones; an
        offset with no register reads all-ones."""
        off, n = offset, size
        if not self._valid(off, n):
            return 0
        with self._lock:
            if off < 0x80 and n != 4:
                return (1 << (8 * n)) - 1
            regs = {REG_ID: ID, REG_ALIVE: ~self.alive & 0xFFFFFFFF,
                    REG_FACTORIAL: self.factorial, REG_STATUS: self.status,
                    REG_INTR_STATUS: self.intr_status, REG_DMA_SRC: self.dma_src,
                    REG_DMA_DST: self.dma_dst, REG_DMA_COUNT: self.dma_count,
                    REG_DMA_CMD: self.dma_cmd}
            value = regs.get(off)
            if value is None:
                return (1 << (8 * n)) - 1
            return value & ((1 << (8 * n)) - 1)

    def write(self, offset: int, size: int, value: int) -> None:
        """A write of ``value`` (``size`` bytes, little-endian) at ``offset`` bytes into BAR 0,
        as QEMU's ``edu_mmio_write``: ignored unless a naturally aligned 4-byte access (4 or 8
        from 0x80 on); read-only and unknown offsets ignore it; the command register takes a
        value only with the start bit."""
        off = offset
        if not self._valid(off, size) or (off < 0x80 and size != 4):
            return
        value &= (1 << (8 * size)) - 1
        with self._lock:
            if off == REG_ALIVE:
                self.alive = value & 0xFFFFFFFF
            elif off == REG_FACTORIAL:
                n, f = value & 0xFFFFFFFF, 1
                for i in range(2, min(n, 64) + 1):
                    f = (f * i) & 0xFFFFFFFF
                self.factorial = f if n <= 64 else 0
                if self.status & STATUS_IRQFACT:
                    self._raise(IRQ_FACTORIAL)
            elif off == REG_STATUS:
                self.status = value & STATUS_IRQFACT
            elif off == REG_INTR_RAISE:
                self._raise(value & 0xFFFFFFFF)
            elif off == REG_INTR_ACK:
                self.intr_status &= ~value & 0xFFFFFFFF
                self._update_irq(False)
            elif off == REG_DMA_SRC:
                self.dma_src = value
            elif off == REG_DMA_DST:
                self.dma_dst = value
            elif off == REG_DMA_COUNT:
                self.dma_count = value
            elif off == REG_DMA_CMD and value & DMA_CMD_START:
                self.dma_cmd = value
                self._dma()

    def config_changed(self) -> None:
        """After a configuration-space write: MSI may have been switched on or off."""
        with self._lock:
            self._update_irq(False)
