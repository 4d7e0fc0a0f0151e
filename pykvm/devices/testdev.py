"""QEMU's ``pc-testdev`` (the device kvm-unit-tests runs with), as its realize function places it:

* ports 0xe0-0xe3: a 32-bit scratch register; an access of any width at 0xe0 + n reads or
  writes the bytes of the register from byte n (what a test writes, it reads back);
* ports 0xe8-0xeb: the same register, one byte per port;
* port 0xe4 (32-bit write): "flush this page" (QEMU remaps the page; pykvm has nothing to
  flush, the write is accepted); it reads 0;
* ports 0x2000-0x2017: a byte written to 0x2000 + n sets ISA IRQ line n to (value != 0) (a
  wider write sets one line per byte); they read 0;
* accesses of every width and alignment are cut as QEMU cuts them (:mod:`.ioaccess`);
* MMIO 0xff000000-0xff00ffff: 64 KiB of "I/O memory": every access exits to the VMM, which
  keeps the bytes (a way to test emulated MMIO).
"""
import threading
from typing import Callable, Optional

from .ioaccess import pieces

SCRATCH_PORT = 0xE0
FLUSH_PORT = 0xE4
SCRATCH_BYTE_PORT = 0xE8
IRQ_PORT = 0x2000
IRQ_LINES = 24
IOMEM_BASE = 0xFF000000
IOMEM_SIZE = 0x10000

# QEMU's pc-testdev I/O regions: (first port, ports, largest valid access)
_SCRATCH, _FLUSH, _SCRATCH_BYTE, _IRQ = 0, 1, 2, 3
_PORTS = ((SCRATCH_PORT, 4, 4), (FLUSH_PORT, 4, 4), (SCRATCH_BYTE_PORT, 4, 1),
          (IRQ_PORT, IRQ_LINES, 1))


class PcTestdev:
    """QEMU's ``pc-testdev``: the scratch register, the flush port, the IRQ ports and 64 KiB of I/O
    memory (see the module docstring). ``set_irq(line, level)``, if given, drives ISA IRQ
    ``line``."""
    def __init__(self, set_irq: Optional[Callable[[int, int], None]] = None):
        self.set_irq = set_irq
        self.data = 0
        self.iomem = bytearray(IOMEM_SIZE)
        self.flushes = 0
        self._lock = threading.Lock()

    def read(self, port: int, size: int) -> int:
        """An IN of ``size`` bytes (1, 2 or 4) at I/O ``port``, cut as QEMU cuts it
        (:mod:`.ioaccess`): the scratch register from byte ``port & 3`` (0xe0-0xe3 any width,
        0xe8-0xeb a byte per port); the write-only flush and IRQ ports read 0 (QEMU's regions
        without a read handler); ports no region claims read all-ones."""
        value = 0
        with self._lock:
            for region, off, n, pos in pieces(port, size, _PORTS):
                mask = (1 << (8 * n)) - 1
                if region is None:
                    v = mask
                elif region in (_SCRATCH, _SCRATCH_BYTE):
                    v = (self.data >> (8 * (off & 3))) & mask
                else:
                    v = 0
                value |= v << (8 * pos)
        return value

    def write(self, port: int, size: int, value: int) -> None:
        """An OUT of ``size`` bytes of ``value`` at I/O ``port``, cut as :meth:`read`: set the
        scratch register's bytes from byte ``port & 3``, count a flush (0xe4-0xe7), or set ISA IRQ
        line ``port - 0x2000`` to (byte != 0), one byte per line. Other ports are ignored."""
        irqs = []
        with self._lock:
            for region, off, n, pos in pieces(port, size, _PORTS):
                v = (value >> (8 * pos)) & ((1 << (8 * n)) - 1)
                if region in (_SCRATCH, _SCRATCH_BYTE):
                    shift = 8 * (off & 3)
                    mask = (((1 << (8 * n)) - 1) << shift) & 0xFFFFFFFF
                    self.data = (self.data & ~mask) | ((v << shift) & mask)
                elif region == _FLUSH:
                    self.flushes += 1
                elif region == _IRQ:
                    irqs.append((off, 1 if v else 0))
        if self.set_irq:
            for line, level in irqs:
                self.set_irq(line, level)

    def mmio_read(self, addr: int, n: int) -> bytes:
        """``n`` bytes of I/O memory at guest-physical ``addr`` (inside 0xff000000-0xff00ffff),
        zero-padded where the access runs past the end of the window."""
        off = addr - IOMEM_BASE
        with self._lock:
            chunk = bytes(self.iomem[off:off + n])
        return chunk + bytes(n - len(chunk))

    def mmio_write(self, addr: int, data: bytes) -> None:
        """Store ``data`` at guest-physical ``addr`` in the I/O memory window; bytes past its end
        are dropped."""
        off = addr - IOMEM_BASE
        with self._lock:
            n = min(len(data), IOMEM_SIZE - off)
            self.iomem[off:off + n] = data[:n]
