"""QEMU's ``pc-testdev`` (the device kvm-unit-tests runs with), as its realize function places it:

* ports 0xe0-0xe3: a 32-bit scratch register; an access of any width at 0xe0 + n reads or
  writes the bytes of the register from byte n (what a test writes, it reads back);
* ports 0xe8-0xeb: the same register, one byte per port;
* port 0xe4 (32-bit write): "flush this page" (QEMU remaps the page; pykvm has nothing to
  flush, the write is accepted); it reads 0;
* ports 0x2000-0x2017: a byte written to 0x2000 + n sets ISA IRQ line n to (value != 0) (a
  wider write sets one line per byte); they read 0;
* accesses of every width and alignment are cut as QEMU cuts them, by the port bus (:mod:`.bus`)
  at the four blocks :attr:`PcTestdev.PIO_RANGES` declares;
* MMIO 0xff000000-0xff00ffff: 64 KiB of "I/O memory": every access exits to the VMM, which
  keeps the bytes (a way to test emulated MMIO). It sits on the MMIO bus as a second object,
  :attr:`PcTestdev.iomem` (:class:`TestdevIomem`), taking accesses of up to 8 bytes.

The port blocks' offsets in the device's register map: the scratch register at 0x00, the flush
port at 0x04, the scratch bytes at 0x08, IRQ line n at 0x20 + n.
"""
from __future__ import annotations

import threading
from ..errors import SnapshotError
from .snapstate import DeviceState

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Callable, Optional, Union

SCRATCH_PORT = 0xE0
FLUSH_PORT = 0xE4
SCRATCH_BYTE_PORT = 0xE8
IRQ_PORT = 0x2000
IRQ_LINES = 24
IOMEM_BASE = 0xFF000000
IOMEM_SIZE = 0x10000

# the blocks' offsets in the device's register map
SCRATCH_OFFSET = 0x00
FLUSH_OFFSET = 0x04
SCRATCH_BYTE_OFFSET = 0x08
IRQ_OFFSET = 0x20


class TestdevIomem(DeviceState):
    """pc-testdev's 64 KiB of I/O memory, the device's MMIO-bus object: bytes kept as written,
    little-endian. Slicing it (``iomem[a:b]``) gives the bytes at those offsets."""

    SNAPSHOT_FIELDS = ('data',)

    MMIO_RANGES = ((IOMEM_BASE, IOMEM_SIZE, 0, 8),)
    __test__ = False                      # not a pytest class, whatever its name says

    def __init__(self, lock: threading.Lock):
        self.data = bytearray(IOMEM_SIZE)
        self._lock = lock

    def read(self, offset: int, size: int) -> int:
        """``size`` bytes (1-8) at ``offset`` of the window, little-endian; bytes past its end
        read 0."""
        with self._lock:
            chunk = bytes(self.data[max(0, offset):max(0, offset) + size])
        return int.from_bytes(chunk + bytes(size - len(chunk)), "little")

    def write(self, offset: int, size: int, value: int) -> None:
        """Store ``size`` bytes of ``value`` at ``offset``; bytes past the window's end are
        dropped."""
        if offset < 0:
            return
        data = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")
        with self._lock:
            n = max(0, min(size, IOMEM_SIZE - offset))
            self.data[offset:offset + n] = data[:n]

    def __getitem__(self, index: Union[int, slice]) -> Union[int, bytes]:
        with self._lock:
            return bytes(self.data[index]) if isinstance(index, slice) else self.data[index]

    def __len__(self) -> int:
        return IOMEM_SIZE


class PcTestdev(DeviceState):
    """QEMU's ``pc-testdev``: the scratch register, the flush port, the IRQ ports and 64 KiB of I/O
    memory (see the module docstring). ``set_irq(line, level)``, if given, drives ISA IRQ
    ``line``. Its port-bus object is itself (:attr:`PIO_RANGES`); its MMIO-bus object is
    :attr:`iomem` (:attr:`TestdevIomem.MMIO_RANGES`)."""

    SNAPSHOT_FIELDS = ('data', 'flushes')

    def snapshot_state(self) -> dict:
        """As :meth:`DeviceState.snapshot_state`, with the MMIO window's bytes."""
        out = super().snapshot_state()
        out["iomem"] = self.iomem.snapshot_state()
        return out

    def restore_state(self, state: dict, *, mono_delta: int = 0) -> None:
        """As :meth:`DeviceState.restore_state`, with the MMIO window's bytes."""
        if not isinstance(state, dict) or "iomem" not in state:
            raise SnapshotError("PcTestdev state lacks its MMIO window")
        rest = {k: v for k, v in state.items() if k != "iomem"}
        self._check_state(rest)
        self.iomem._check_state(state["iomem"])
        super().restore_state(rest, mono_delta=mono_delta)
        self.iomem.restore_state(state["iomem"], mono_delta=mono_delta)

    # QEMU's pc-testdev I/O regions, each with its largest valid access
    PIO_RANGES = ((SCRATCH_PORT, 4, SCRATCH_OFFSET, 4), (FLUSH_PORT, 4, FLUSH_OFFSET, 4),
                  (SCRATCH_BYTE_PORT, 4, SCRATCH_BYTE_OFFSET, 1),
                  (IRQ_PORT, IRQ_LINES, IRQ_OFFSET, 1))

    def __init__(self, set_irq: Optional[Callable[[int, int], None]] = None):
        self.set_irq = set_irq
        self.data = 0
        self.flushes = 0
        self._lock = threading.Lock()
        self.iomem = TestdevIomem(self._lock)

    @staticmethod
    def _scratch(offset: int) -> bool:
        return SCRATCH_OFFSET <= offset < SCRATCH_OFFSET + 4 or \
            SCRATCH_BYTE_OFFSET <= offset < SCRATCH_BYTE_OFFSET + 4

    def read(self, offset: int, size: int) -> int:
        """``size`` bytes read at ``offset``, as the bus cuts them: the scratch register from
        byte ``offset & 3`` (at most 4 bytes from the scratch block, 1 from the byte block);
        the write-only flush and IRQ blocks read 0 (QEMU's regions without a read handler);
        any other offset reads all-ones."""
        mask = (1 << (8 * size)) - 1
        with self._lock:
            if self._scratch(offset):
                return (self.data >> (8 * (offset & 3))) & mask
        if FLUSH_OFFSET <= offset < FLUSH_OFFSET + 4 or \
                IRQ_OFFSET <= offset < IRQ_OFFSET + IRQ_LINES:
            return 0
        return mask

    def write(self, offset: int, size: int, value: int) -> None:
        """``size`` bytes of ``value`` written at ``offset``: set the scratch register's bytes
        from byte ``offset & 3``, count a flush (flush block), or set ISA IRQ line ``offset -
        0x20`` to (value != 0) (IRQ block, one byte per line). Other offsets are ignored."""
        v = value & ((1 << (8 * size)) - 1)
        if self._scratch(offset):
            shift = 8 * (offset & 3)
            mask = (((1 << (8 * size)) - 1) << shift) & 0xFFFFFFFF
            with self._lock:
                self.data = (self.data & ~mask) | ((v << shift) & mask)
        elif FLUSH_OFFSET <= offset < FLUSH_OFFSET + 4:
            with self._lock:
                self.flushes += 1
        elif IRQ_OFFSET <= offset < IRQ_OFFSET + IRQ_LINES and self.set_irq:
            self.set_irq(offset - IRQ_OFFSET, 1 if v else 0)
