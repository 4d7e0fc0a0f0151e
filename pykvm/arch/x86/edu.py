"""QEMU's ``edu`` educational PCI device (QEMU docs/specs/edu.rst), which kvm-unit-tests drives
to test DMA remapping and interrupt remapping through an IOMMU.

PCI 1234:11e8, class 00ff00, revision 0x10, one 1 MiB memory BAR, INTA#, an MSI capability.
Registers in BAR 0 (4- and 8-byte accesses):

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
           done), bit 1 direction (1: device buffer to RAM), bit 2 raise interrupt 0x100
=====  ==  ==========================================================================

The device's own DMA buffer is 4 KiB at device address 0x40000. DMA runs at once (the start bit
reads 0 right away) and goes through ``translate`` (the IOMMU, if the machine has one). While the
interrupt status is non-zero the device interrupts: an MSI when MSI is enabled (each raise sends
one), else INTA# held high.
"""
import threading
from typing import Callable, Optional

from .pci import PciFunction

VENDOR_QEMU = 0x1234
DEVICE_EDU = 0x11E8
BAR_SIZE = 1 << 20
DMA_START = 0x40000
DMA_SIZE = 4096
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
    """The device. ``memory``: guest memory (read/write by guest-physical address);
    ``translate(requester_id, address, write)``: device address -> guest-physical (default:
    identity); ``msi(address, data)`` and ``set_intx(level)`` deliver its interrupts."""

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

    def decodes(self, addr: int) -> bool:
        """Whether guest-physical ``addr`` falls in BAR 0 (with memory decoding on)."""
        base = self.pci.bar_address(0)
        return self.pci.memory_enabled and base <= addr < base + BAR_SIZE

    # -- interrupts ------------------------------------------------------------------------
    def _update_irq(self, raised: bool) -> None:
        enabled, address, data = self.pci.msi()
        if enabled:
            if self._intx:
                self._intx = 0
                self.set_intx(0)
            if raised and self.intr_status:
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
    def _ram(self, addr: int, n: int, write: bool, data: bytes = b"") -> bytes:
        """Read or write ``n`` bytes at device address ``addr``, page by page through the
        IOMMU."""
        out = bytearray()
        pos = 0
        while pos < n:
            a = addr + pos
            chunk = min(n - pos, 0x1000 - (a & 0xFFF))
            gpa = self.translate(self.bdf, a, write) if self.translate else a
            if write:
                self.memory.write(gpa, data[pos:pos + chunk])
            else:
                out += self.memory.read(gpa, chunk)
            pos += chunk
        return bytes(out)

    def _dma(self) -> None:
        n = self.dma_count
        try:
            if self.dma_cmd & DMA_CMD_FROM_DEV:
                off = self.dma_src - DMA_START
                if not (0 <= off and off + n <= DMA_SIZE):
                    raise ValueError("DMA source outside the device buffer")
                self._ram(self.dma_dst, n, True, bytes(self.buffer[off:off + n]))
            else:
                off = self.dma_dst - DMA_START
                if not (0 <= off and off + n <= DMA_SIZE):
                    raise ValueError("DMA destination outside the device buffer")
                self.buffer[off:off + n] = self._ram(self.dma_src, n, False)
        except Exception:
            self.dma_errors += 1               # an IOMMU fault or a bad address: no transfer
        self.dma_cmd &= ~DMA_CMD_START
        if self.dma_cmd & DMA_CMD_IRQ:
            self._raise(IRQ_DMA)

    # -- registers ----------------------------------------------------------------------
    def mmio_read(self, addr: int, n: int) -> bytes:
        """``n`` bytes read at guest-physical ``addr`` in BAR 0."""
        off = addr - self.pci.bar_address(0)
        with self._lock:
            regs = {REG_ID: ID, REG_ALIVE: ~self.alive & 0xFFFFFFFF,
                    REG_FACTORIAL: self.factorial, REG_STATUS: self.status,
                    REG_INTR_STATUS: self.intr_status, REG_DMA_SRC: self.dma_src,
                    REG_DMA_DST: self.dma_dst, REG_DMA_COUNT: self.dma_count,
                    REG_DMA_CMD: self.dma_cmd}
            if DMA_START <= off < DMA_START + DMA_SIZE:
                chunk = bytes(self.buffer[off - DMA_START:off - DMA_START + n])
                return chunk + b"\xff" * (n - len(chunk))
            value = regs.get(off & ~7 if off >= 0x80 else off)
            if value is None:
                return b"\xff" * n
            if off >= 0x80 and off & 7:
                value >>= 32
            return (value & ((1 << (8 * n)) - 1)).to_bytes(n, "little")

    def mmio_write(self, addr: int, data: bytes) -> None:
        """A write of ``data`` at guest-physical ``addr`` in BAR 0."""
        off = addr - self.pci.bar_address(0)
        value = int.from_bytes(data, "little")
        with self._lock:
            if DMA_START <= off < DMA_START + DMA_SIZE:
                o = off - DMA_START
                self.buffer[o:o + len(data)] = data[:DMA_SIZE - o]
            elif off == REG_ALIVE:
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
            elif off >= 0x80 and (off & ~7) in (REG_DMA_SRC, REG_DMA_DST, REG_DMA_COUNT,
                                                 REG_DMA_CMD):
                reg = off & ~7
                shift = 32 * ((off & 7) // 4)
                mask = ((1 << (8 * len(data))) - 1) << shift
                name = {REG_DMA_SRC: "dma_src", REG_DMA_DST: "dma_dst",
                        REG_DMA_COUNT: "dma_count", REG_DMA_CMD: "dma_cmd"}[reg]
                setattr(self, name, (getattr(self, name) & ~mask) | ((value << shift) & mask))
                if reg == REG_DMA_CMD and self.dma_cmd & DMA_CMD_START:
                    self._dma()

    def config_changed(self) -> None:
        """After a configuration-space write: MSI may have been switched on or off."""
        with self._lock:
            self._update_irq(False)
