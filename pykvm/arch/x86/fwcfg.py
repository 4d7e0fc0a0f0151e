"""QEMU's firmware configuration device (fw_cfg), legacy I/O interface, as the PC machine has it.

Two ports (docs/specs/fw_cfg.rst in QEMU):

* selector, port 0x510: a 16-bit write selects an item by key and rewinds its read offset;
* data, port 0x511: each 8-bit read returns the next byte of the selected item, 0 past its end
  (and for keys that name no item).

Items pykvm provides (the keys are QEMU's):

====  ================  =========================================================
key   name              value
====  ================  =========================================================
0x00  signature         ``b"QEMU"``
0x01  id                u32 1 (traditional interface only: no DMA)
0x03  ram_size          u64 bytes of RAM (all of it, both sides of the 32-bit hole)
0x05  nb_cpus           u16 vCPUs the machine starts with
0x0f  max_cpus          u16 the most vCPUs it can have (= nb_cpus here)
0x19  file_dir          u32 big-endian file count (0): no named files
====  ================  =========================================================

The device only keeps bytes; it does not know where its ports are (the PC machine routes them).
"""
import struct
import threading
from typing import Dict, Optional

SELECTOR_PORT = 0x510
DATA_PORT = 0x511

FW_CFG_SIGNATURE = 0x00
FW_CFG_ID = 0x01
FW_CFG_UUID = 0x02
FW_CFG_RAM_SIZE = 0x03
FW_CFG_NOGRAPHIC = 0x04
FW_CFG_NB_CPUS = 0x05
FW_CFG_MACHINE_ID = 0x06
FW_CFG_MAX_CPUS = 0x0F
FW_CFG_FILE_DIR = 0x19

ID_TRADITIONAL = 1            # bit 0: the traditional (port) interface; bit 1 would be DMA


class FwCfg:
    """The item store and the two registers. Thread-safe: vCPUs share one selector, as on a
    real machine (a guest serialises its accesses itself)."""

    def __init__(self, *, ram_size: int, nb_cpus: int, max_cpus: Optional[int] = None):
        self.items: Dict[int, bytes] = {}
        self._lock = threading.Lock()
        self.selected = 0
        self.offset = 0
        self.add(FW_CFG_SIGNATURE, b"QEMU")
        self.add(FW_CFG_ID, struct.pack("<I", ID_TRADITIONAL))
        self.add(FW_CFG_RAM_SIZE, struct.pack("<Q", ram_size))
        self.add(FW_CFG_NOGRAPHIC, struct.pack("<H", 1))
        self.add(FW_CFG_NB_CPUS, struct.pack("<H", nb_cpus))
        self.add(FW_CFG_MAX_CPUS, struct.pack("<H", nb_cpus if max_cpus is None else max_cpus))
        self.add(FW_CFG_FILE_DIR, struct.pack(">I", 0))

    def add(self, key: int, data: bytes) -> None:
        """Add or replace item ``key`` (0..0x3fff)."""
        if not 0 <= key <= 0x3FFF:
            raise ValueError(f"fw_cfg key {key:#x} out of range")
        self.items[key] = bytes(data)

    def select(self, key: int) -> None:
        """Select item ``key`` (the low 16 bits are kept) and rewind its read offset to 0, as a
        write to the selector port does (QEMU fw_cfg legacy I/O interface)."""
        with self._lock:
            self.selected = key & 0xFFFF
            self.offset = 0

    def read_byte(self) -> int:
        """The next byte of the selected item, advancing the read offset: what an 8-bit read of the
        data port returns. Only the low 14 bits of the selector name the item; 0 past the item's end
        and for keys that name no item."""
        with self._lock:
            data = self.items.get(self.selected & 0x3FFF, b"")
            if self.offset < len(data):
                b = data[self.offset]
                self.offset += 1
                return b
            return 0

    # -- port interface (the PC machine calls these) ----------------------------------------
    def io_read(self, port: int, size: int, count: int) -> bytes:
        """Bytes for an IN of ``count`` units of ``size`` bytes at ``port``."""
        out = bytearray()
        for _ in range(count):
            if port == DATA_PORT:
                # wider reads of the data port return one byte each, in the low byte
                unit = bytes([self.read_byte()]) + bytes(size - 1)
            else:
                with self._lock:
                    sel = self.selected
                unit = (sel & ((1 << (8 * size)) - 1)).to_bytes(size, "little") \
                    if port == SELECTOR_PORT else b"\xff" * size
            out += unit
        return bytes(out)

    def io_write(self, port: int, size: int, data: bytes) -> None:
        """An OUT of ``size`` bytes ``data`` (little-endian) at ``port``: at the selector port
        (0x510) it selects that item; writes to the data port, and to any other port, are
        ignored."""
        if port == SELECTOR_PORT:
            # QEMU's selector register is 16 bits wide; a byte write selects that byte's value
            self.select(int.from_bytes(data[-size:], "little") & 0xFFFF)
        # writes to the data port are ignored (no writable items)
