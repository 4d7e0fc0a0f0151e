"""QEMU's ``pc-testdev`` (the device kvm-unit-tests runs with), as its realize function places it:

* ports 0xe0-0xe3: a 32-bit scratch register; an access of any width at 0xe0 + n reads or
  writes the bytes of the register from byte n (what a test writes, it reads back);
* ports 0xe8-0xeb: the same register, one byte per port;
* port 0xe4 (32-bit write): "flush this page" (QEMU remaps the page; pykvm has nothing to
  flush, the write is accepted);
* ports 0x2000-0x2017: a byte written to 0x2000 + n sets ISA IRQ line n to (value != 0);
* MMIO 0xff000000-0xff00ffff: 64 KiB of "I/O memory": every access exits to the VMM, which
  keeps the bytes (a way to test emulated MMIO).
"""
import threading
from typing import Callable, Optional

SCRATCH_PORT = 0xE0
FLUSH_PORT = 0xE4
SCRATCH_BYTE_PORT = 0xE8
IRQ_PORT = 0x2000
IRQ_LINES = 24
IOMEM_BASE = 0xFF000000
IOMEM_SIZE = 0x10000


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
        """An IN of ``size`` bytes (1, 2 or 4) at I/O ``port``: the scratch register starting at
        byte ``port & 3``; the write-only flush and IRQ ports (and any other) read all-ones."""
        if SCRATCH_PORT <= port < SCRATCH_PORT + 4 or \
                SCRATCH_BYTE_PORT <= port < SCRATCH_BYTE_PORT + 4:
            shift = 8 * (port & 3)
            with self._lock:
                return (self.data >> shift) & ((1 << (8 * size)) - 1)
        return (1 << (8 * size)) - 1          # flush and IRQ ports are write-only

    def write(self, port: int, size: int, value: int) -> None:
        """An OUT of ``size`` bytes of ``value`` at I/O ``port``: set the scratch register's bytes
        from byte ``port & 3``, count a flush (0xe4-0xe7), or set ISA IRQ line ``port - 0x2000`` to
        (low byte of ``value`` != 0). Other ports are ignored."""
        if SCRATCH_PORT <= port < SCRATCH_PORT + 4 or \
                SCRATCH_BYTE_PORT <= port < SCRATCH_BYTE_PORT + 4:
            shift = 8 * (port & 3)
            mask = (((1 << (8 * size)) - 1) << shift) & 0xFFFFFFFF
            with self._lock:
                self.data = (self.data & ~mask) | ((value << shift) & mask)
        elif FLUSH_PORT <= port < FLUSH_PORT + 4:
            self.flushes += 1
        elif IRQ_PORT <= port < IRQ_PORT + IRQ_LINES:
            if self.set_irq:
                self.set_irq(port - IRQ_PORT, 1 if value & 0xFF else 0)

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
