"""QEMU's firmware configuration device (fw_cfg), legacy I/O interface, as QEMU's x86 machines
have it (docs/specs/fw_cfg.rst and hw/nvram/fw_cfg.c in QEMU).

QEMU's x86 fw_cfg is one 2-port I/O region at 0x510 (``fw_cfg_comb_mem_ops``, whose
``fw_cfg_comb_valid`` accepts 1-byte accesses and 2-byte writes, naturally aligned): both ports
behave the same, and what an access does depends on its width only. An IN or OUT reaches the
region whole (as in QEMU 7.2 under TCG, checked against it), never cut into bytes:

=============  ====================================================================
access         effect
=============  ====================================================================
8-bit read     the next byte of the selected item (0 past its end, or if none is),
               at 0x510 or 0x511
8-bit write    a data write: ignored (QEMU 2.4 and later have no writable items)
16-bit write   at 0x510: select the item whose key is the value, rewind to its start
other          not valid: 16- and 32-bit reads at either port give 0 and do not move
               the read position (each unit of a ``rep insw``/``insd`` likewise); a
               16-bit write at 0x511 and 32-bit writes do nothing
=============  ====================================================================

Keys (16 bits): bit 15 (FW_CFG_ARCH_LOCAL) picks the architecture's table, bit 14
(FW_CFG_WRITE_CHANNEL) is ignored for reads, and bits 13:0 index the table; an index at or
past 0x40 (the 0x20 generic keys and QEMU's 0x20 default file slots) selects no item, and an
index with no item reads zeros. The items pykvm provides:

======  ================  ==========================================================
key     name              value
======  ================  ==========================================================
0x00    signature         ``b"QEMU"``
0x01    id                u32 1: the traditional interface only (bit 1, DMA, is clear:
                          pykvm has no DMA register at 0x514)
0x03    ram_size          u64 bytes of RAM (all of it, both sides of the 32-bit hole)
0x04    nographic         u16 1
0x05    nb_cpus           u16 vCPUs the machine starts with
0x0f    max_cpus          u16 the most vCPUs it can have (= nb_cpus here)
0x19    file_dir          u32 big-endian file count (0): no named files
0x8000  acpi_tables       absent, as in QEMU without ``-acpitable`` (no data: reads 0)
0x8001  smbios_entries    absent, as in QEMU's current (non-legacy) machine types
0x8002  irq0_override     u32 1: ISA IRQ 0 is routed to GSI 2 (the MADT says so too)
0x8003  e820_table        absent: QEMU serves its E820 map as the file ``etc/e820`` only
0x8004  hpet              QEMU's ``struct hpet_fw_config`` with no HPET: count 0xff, then
                          8 zeroed 15-byte entries (121 bytes)
======  ================  ==========================================================

On the port bus (:mod:`.bus`) the device is two one-port ranges (0x510 at offset 0, 0x511 at
offset 1) taking accesses of up to 4 bytes, so that each access reaches it whole and it judges
the width itself. A string read (``rep insb``) is served in one call by
:meth:`FwCfg.read_repeated`, which :meth:`.bus.Bus.read_bytes` uses. Each access costs work in
proportion to the bytes it moves, however many a ``rep insb`` asks for.
"""
from __future__ import annotations

import struct
import threading
from .snapstate import DeviceState

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Dict, Optional


SELECTOR_PORT = 0x510
DATA_PORT = 0x511
SELECTOR_OFFSET = 0            # the ports' offsets in the device's map
DATA_OFFSET = 1

FW_CFG_SIGNATURE = 0x00
FW_CFG_ID = 0x01
FW_CFG_UUID = 0x02
FW_CFG_RAM_SIZE = 0x03
FW_CFG_NOGRAPHIC = 0x04
FW_CFG_NB_CPUS = 0x05
FW_CFG_MACHINE_ID = 0x06
FW_CFG_MAX_CPUS = 0x0F
FW_CFG_FILE_DIR = 0x19
FW_CFG_FILE_FIRST = 0x20
FW_CFG_FILE_SLOTS = 0x20           # QEMU's default number of file slots
FW_CFG_MAX_ENTRY = FW_CFG_FILE_FIRST + FW_CFG_FILE_SLOTS   # exclusive

FW_CFG_WRITE_CHANNEL = 0x4000
FW_CFG_ARCH_LOCAL = 0x8000
FW_CFG_ENTRY_MASK = 0x3FFF
FW_CFG_INVALID = 0xFFFF

FW_CFG_ACPI_TABLES = FW_CFG_ARCH_LOCAL + 0
FW_CFG_SMBIOS_ENTRIES = FW_CFG_ARCH_LOCAL + 1
FW_CFG_IRQ0_OVERRIDE = FW_CFG_ARCH_LOCAL + 2
FW_CFG_E820_TABLE = FW_CFG_ARCH_LOCAL + 3
FW_CFG_HPET = FW_CFG_ARCH_LOCAL + 4

ID_TRADITIONAL = 1            # bit 0: the traditional (port) interface; bit 1 would be DMA
HPET_FW_ENTRIES = 8           # struct hpet_fw_config: u8 count, 8 x {u32, u64, u16, u8}
HPET_FW_ENTRY_SIZE = 15


class FwCfg(DeviceState):
    """The two item tables and the selector state. Thread-safe: vCPUs share one selector, as on
    a real machine (a guest serialises its accesses itself). ``ram_size``: bytes of RAM;
    ``nb_cpus``/``max_cpus``: vCPUs at start and at most (default ``nb_cpus``). Items beyond
    the built-in ones are added with :meth:`add`."""

    SNAPSHOT_FIELDS = ('selected', 'offset')
    SNAPSHOT_RANGES = {"selected": (0, 0xFFFF), "offset": (0, 1 << 32)}

    PIO_RANGES = ((SELECTOR_PORT, 1, SELECTOR_OFFSET, 4), (DATA_PORT, 1, DATA_OFFSET, 4))

    def __init__(self, *, ram_size: int, nb_cpus: int, max_cpus: Optional[int] = None):
        self.items: Dict[int, bytes] = {}      # by key (bit 15 set for the arch table)
        self._lock = threading.Lock()
        self.selected = FW_CFG_SIGNATURE       # the current key, FW_CFG_INVALID when none
        self.offset = 0
        self.add(FW_CFG_SIGNATURE, b"QEMU")
        self.add(FW_CFG_ID, struct.pack("<I", ID_TRADITIONAL))
        self.add(FW_CFG_RAM_SIZE, struct.pack("<Q", ram_size))
        self.add(FW_CFG_NOGRAPHIC, struct.pack("<H", 1))
        self.add(FW_CFG_NB_CPUS, struct.pack("<H", nb_cpus))
        self.add(FW_CFG_MAX_CPUS, struct.pack("<H", nb_cpus if max_cpus is None else max_cpus))
        self.add(FW_CFG_FILE_DIR, struct.pack(">I", 0))
        self.add(FW_CFG_IRQ0_OVERRIDE, struct.pack("<I", 1))
        self.add(FW_CFG_HPET, bytes([0xFF]) + bytes(HPET_FW_ENTRIES * HPET_FW_ENTRY_SIZE))

    def add(self, key: int, data: bytes) -> None:
        """Add or replace item ``key``: an index below 0x40, with bit 15 for the arch table.
        Raises ValueError for any other key (a host-side programming error)."""
        if key & ~(FW_CFG_ARCH_LOCAL | FW_CFG_ENTRY_MASK) or \
                key & FW_CFG_ENTRY_MASK >= FW_CFG_MAX_ENTRY:
            raise ValueError(f"fw_cfg key {key:#x} out of range")
        self.items[key] = bytes(data)

    def select(self, key: int) -> bool:
        """Select item ``key`` (16 bits) and rewind its read offset to 0, as a 16-bit write to
        the selector does (QEMU's ``fw_cfg_select``); a key whose index is 0x40 or more selects
        nothing. Returns whether the key names a valid entry."""
        key &= 0xFFFF
        with self._lock:
            self.offset = 0
            if key & FW_CFG_ENTRY_MASK >= FW_CFG_MAX_ENTRY:
                self.selected = FW_CFG_INVALID
                return False
            self.selected = key
            return True

    def _item(self) -> bytes:
        sel = self.selected
        if sel == FW_CFG_INVALID:
            return b""
        return self.items.get(sel & (FW_CFG_ARCH_LOCAL | FW_CFG_ENTRY_MASK), b"")

    def read_data(self, n: int) -> bytes:
        """The next ``n`` bytes of the selected item (zeros past its end, or when nothing is
        selected), advancing the read offset: ``n`` 8-bit data reads. Costs O(n)."""
        with self._lock:
            data = self._item()
            chunk = data[self.offset:self.offset + n]
            self.offset = min(len(data), self.offset + n)
        return chunk + bytes(n - len(chunk))

    def read_byte(self) -> int:
        """One 8-bit data read (:meth:`read_data` of 1 byte)."""
        return self.read_data(1)[0]

    # -- the bus protocol (offset 0: port 0x510, 1: port 0x511) -------------------------------
    def read(self, offset: int, size: int) -> int:
        """One read of ``size`` bytes (1-4) at ``offset`` (0 or 1), as QEMU answers it (module
        docstring): an 8-bit read is the next byte of the item, wider reads give 0 and do not
        move the read position; any other offset reads all-ones."""
        if offset not in (SELECTOR_OFFSET, DATA_OFFSET):
            return (1 << (8 * size)) - 1
        return self.read_byte() if size == 1 else 0

    def read_repeated(self, offset: int, size: int, count: int) -> bytes:
        """``count`` reads of ``size`` bytes at ``offset`` (a ``rep insb``/``insw``/``insd``),
        as bytes: one slice of the item for 8-bit units, zeros otherwise (each unit as
        :meth:`read` answers it). Work is O(count * size); a count below 0 is taken as 0."""
        count = max(0, count)
        if offset not in (SELECTOR_OFFSET, DATA_OFFSET):
            return b"\xff" * (size * count)
        if size == 1:
            return self.read_data(count)
        return bytes(size * count)                    # not a valid access: QEMU reads 0

    def write(self, offset: int, size: int, value: int) -> None:
        """A write of ``size`` bytes of ``value`` at ``offset``: only a 16-bit write at the
        selector (offset 0) selects (:meth:`select`); other writes do nothing (module
        docstring)."""
        if size == 2 and offset == SELECTOR_OFFSET:
            self.select(value & 0xFFFF)
