"""PCI configuration space through configuration mechanism #1 (ports 0xCF8-0xCFF), with the
functions of QEMU's ``pc`` (i440FX) board that pykvm models.

* 0xCF8, 32-bit: CONFIG_ADDRESS — bit 31 enable, bits 23:16 bus, 15:11 device, 10:8 function,
  7:2 register (dword). Only 32-bit accesses reach it; a byte at 0xCF9 is the PIIX reset
  control register (bit 2 with bit 1: hard reset).
* 0xCFC-0xCFF: CONFIG_DATA — the dword at the selected register; the low two bits of the port
  (ORed, as QEMU does, with the low two bits written to CONFIG_ADDRESS) pick the byte an 8- or
  16-bit access starts at. As QEMU's memory core does, an access is split into naturally
  aligned pieces inside 0xCFC-0xCFF (a 4-byte IN at 0xCFD is a byte and a word), each piece
  reading or writing configuration space on its own; bytes past 0xCFF belong to other
  (unassigned) ports: all-ones on read, dropped on write.

Functions on bus 0 (IDs as QEMU presents them):

======  ===========  ===========  ===========================================
dev.fn  vendor:dev   class        what
======  ===========  ===========  ===========================================
00.0    8086:1237    06 00 00     i440FX host bridge (PMC), revision 02
01.0    8086:7000    06 01 00     PIIX3 PCI-to-ISA bridge (multi-function)
01.3    8086:7113    06 80 00     PIIX4 ACPI power management, revision 03:
                                  PMBA (0x40) = 0x0601, PMREGMISC (0x80) = 1
======  ===========  ===========  ===========================================

Absent functions and disabled accesses read all-ones; writes to them are dropped. Writes to a
present function change only the bytes that function lets software write (command, latency
timer, interrupt line and the chipset registers above 0x40 that firmware programs: PAM, SMRAM...),
which are stored and read back but have no other effect.
"""
import threading
from typing import Dict, Optional, Tuple

CONFIG_ADDRESS = 0xCF8
CONFIG_DATA = 0xCFC
RESET_CONTROL = 0xCF9

PCI_VENDOR_ID = 0x00
PCI_DEVICE_ID = 0x02
PCI_COMMAND = 0x04
PCI_STATUS = 0x06
PCI_REVISION = 0x08
PCI_CLASS_PROG = 0x09
PCI_HEADER_TYPE = 0x0E
PCI_SUBSYSTEM_VENDOR_ID = 0x2C
PCI_SUBSYSTEM_ID = 0x2E
PCI_BAR0 = 0x10
PCI_CAPABILITY_LIST = 0x34
PCI_INTERRUPT_LINE = 0x3C
PCI_INTERRUPT_PIN = 0x3D

VENDOR_INTEL = 0x8086
SUBSYSTEM_VENDOR_QEMU = 0x1AF4        # Red Hat / Qumranet, as QEMU fills subsystem ids
SUBSYSTEM_QEMU = 0x1100


class PciFunction:
    """256 bytes of configuration space and a mask of the bytes software may write."""

    def __init__(self, vendor: int, device: int, class_code: int, *, revision: int = 0,
                 header_type: int = 0, writable: Tuple[Tuple[int, int], ...] = ()):
        self.config = bytearray(256)
        self.wmask = bytearray(256)
        self.put16(PCI_VENDOR_ID, vendor)
        self.put16(PCI_DEVICE_ID, device)
        self.config[PCI_REVISION] = revision
        self.config[PCI_CLASS_PROG:PCI_CLASS_PROG + 3] = class_code.to_bytes(3, "little")
        self.config[PCI_HEADER_TYPE] = header_type
        self.put16(PCI_SUBSYSTEM_VENDOR_ID, SUBSYSTEM_VENDOR_QEMU)
        self.put16(PCI_SUBSYSTEM_ID, SUBSYSTEM_QEMU)
        for off, mask in ((PCI_COMMAND, 0x07), (PCI_COMMAND + 1, 0x05), (0x0C, 0xFF),
                          (0x0D, 0xFF), (PCI_INTERRUPT_LINE, 0xFF)) + tuple(writable):
            self.wmask[off] = mask
        self.bars = {}
        self.msi_offset = 0
        self.on_write = None               # called after a configuration write, if set

    def put16(self, off: int, v: int) -> None:
        """Store the 16-bit ``v`` little-endian at configuration offset ``off``, regardless of the
        write mask."""
        self.config[off:off + 2] = v.to_bytes(2, "little")

    def read(self, off: int, size: int) -> int:
        """The ``size``-byte little-endian value at configuration offset ``off``; bytes past the
        256-byte space read 0 (as QEMU's pci_host_config_read_common shortens the access)."""
        if off < 0:
            return 0
        return int.from_bytes(self.config[off:off + size], "little")

    def write(self, off: int, size: int, value: int) -> None:
        """A software write of ``size`` bytes of ``value`` (little-endian) at configuration offset
        ``off``: only the bits the write mask allows change."""
        for i in range(max(0, min(size, 256 - off))):
            m = self.wmask[off + i]
            if m:
                b = (value >> (8 * i)) & 0xFF
                self.config[off + i] = (self.config[off + i] & ~m) | (b & m)

    # -- BARs and MSI (devices that have them) ----------------------------------------------
    def add_bar(self, index: int, size: int, addr: int, *, mem64: bool = False) -> None:
        """A memory BAR of ``size`` bytes (a power of two, >= 16) at ``addr``, as firmware
        leaves it assigned. Software sizes it the usual way (write all-ones, read the mask)."""
        off = PCI_BAR0 + 4 * index
        flags = 0x4 if mem64 else 0x0
        mask = ~(size - 1) & 0xFFFFFFF0
        self.config[off:off + 4] = ((addr & mask) | flags).to_bytes(4, "little")
        self.wmask[off:off + 4] = mask.to_bytes(4, "little")
        if mem64:
            self.config[off + 4:off + 8] = (addr >> 32).to_bytes(4, "little")
            self.wmask[off + 4:off + 8] = b"\xff" * 4
        self.bars[index] = (size, mem64)

    def bar_address(self, index: int) -> int:
        """Where memory BAR ``index`` is decoded now (its register, less the flag bits)."""
        off = PCI_BAR0 + 4 * index
        addr = self.read(off, 4) & 0xFFFFFFF0
        if self.bars[index][1]:
            addr |= self.read(off + 4, 4) << 32
        return addr

    @property
    def memory_enabled(self) -> bool:
        """Whether Memory Space Enable (bit 1 of the command register) is set."""
        return bool(self.config[PCI_COMMAND] & 0x02)

    @property
    def bus_master(self) -> bool:
        """Whether Bus Master Enable (bit 2 of the command register) is set: the function may
        DMA."""
        return bool(self.config[PCI_COMMAND] & 0x04)

    def add_msi(self, offset: int = 0x40) -> None:
        """An MSI capability with a 64-bit address and one vector (the capability list
        starts here)."""
        self.msi_offset = offset
        self.config[offset] = 0x05                 # capability id: MSI
        self.config[offset + 1] = self.config[PCI_CAPABILITY_LIST]
        self.put16(offset + 2, 0x0080)             # 64-bit address capable, 1 vector
        self.wmask[offset + 2] = 0x01              # MSI enable
        self.wmask[offset + 4:offset + 8] = b"\xfc\xff\xff\xff"      # address, dword aligned
        self.wmask[offset + 8:offset + 12] = b"\xff" * 4                # upper address
        self.wmask[offset + 12:offset + 14] = b"\xff\xff"              # data
        self.config[PCI_CAPABILITY_LIST] = offset
        self.config[PCI_STATUS] |= 0x10            # capabilities list present

    def msi(self):
        """(enabled, address, data) of the MSI capability (enabled False without one)."""
        o = self.msi_offset
        if not o or not self.config[o + 2] & 1:
            return False, 0, 0
        return True, self.read(o + 4, 4) | self.read(o + 8, 4) << 32, self.read(o + 12, 2)


def _range(lo: int, hi: int, mask: int = 0xFF):
    return tuple((o, mask) for o in range(lo, hi))


def i440fx_host_bridge() -> PciFunction:
    """Function 00.0: the i440FX host bridge (8086:1237, revision 2), with the chipset registers
    firmware programs writable (0x50-0x5f: PAM and DRAM control; 0x72: SMRAM)."""
    # 0x50-0x5f: PMCCFG, DRAM control, PAM0-6; 0x72: SMRAM; 0x57-0x5f DRB...: firmware writes
    return PciFunction(VENDOR_INTEL, 0x1237, 0x060000, revision=0x02,
                       writable=_range(0x50, 0x60) + _range(0x72, 0x73))


def piix3_isa_bridge() -> PciFunction:
    """Function 01.0: the PIIX3 PCI-to-ISA bridge (8086:7000, multi-function header), PIRQ routing
    (0x60-0x63) disabled as at reset, its ISA and APIC control registers writable."""
    # 0x60-0x63: PIRQ route control; 0x4c-0x4f, 0x69..., 0xa0-0xaf: misc ISA/APIC control
    f = PciFunction(VENDOR_INTEL, 0x7000, 0x060100, header_type=0x80,
                    writable=_range(0x4C, 0x50) + _range(0x60, 0x64) + _range(0x69, 0x6A) +
                    _range(0x70, 0x72) + _range(0x76, 0x78) + _range(0x80, 0x81) +
                    _range(0x82, 0x83) + _range(0xA0, 0xB0))
    f.config[0x60:0x64] = b"\x80\x80\x80\x80"       # PIRQA-D routing disabled at reset
    return f


def piix4_pm(pm_base: int = 0x600, sci_irq: int = 9) -> PciFunction:
    """Function 01.3: PIIX4 ACPI power management (8086:7113, revision 3), PMBA (0x40) =
    ``pm_base`` (an I/O port) with the I/O space bit, PM I/O enabled (PMREGMISC = 1) and INTA# on
    interrupt line ``sci_irq``."""
    f = PciFunction(VENDOR_INTEL, 0x7113, 0x068000, revision=0x03)
    f.config[0x40:0x44] = (pm_base | 1).to_bytes(4, "little")     # PMBA, I/O space indicator
    f.config[0x80] = 0x01                                          # PMREGMISC: PM I/O enabled
    f.config[PCI_INTERRUPT_PIN] = 0x01                             # INTA#
    f.config[PCI_INTERRUPT_LINE] = sci_irq
    return f


class PciHost:
    """Configuration mechanism #1 over a set of functions on bus 0, keyed (device, function).
    ``on_reset`` is called for a hard reset request through 0xCF9."""

    def __init__(self, functions: Optional[Dict[Tuple[int, int], PciFunction]] = None,
                 on_reset=None):
        self.functions = dict(functions) if functions is not None else {
            (0, 0): i440fx_host_bridge(),
            (1, 0): piix3_isa_bridge(),
            (1, 3): piix4_pm(),
        }
        self.address = 0
        self.rcr = 0
        self.on_reset = on_reset
        self._lock = threading.Lock()

    def _target(self, address: int) -> Optional[Tuple[PciFunction, int]]:
        if not address & 0x80000000:
            return None
        bus = (address >> 16) & 0xFF
        dev = (address >> 11) & 0x1F
        fn = (address >> 8) & 0x7
        if bus != 0:
            return None
        f = self.functions.get((dev, fn))
        if f is None:
            return None
        return f, address & 0xFC

    def config_read(self, address: int, offset_in_dword: int, size: int) -> int:
        """The ``size``-byte value at byte ``offset_in_dword`` of the dword ``address``
        selects (all-ones if nothing answers)."""
        t = self._target(address)
        if t is None:
            return (1 << (8 * size)) - 1
        f, reg = t
        return f.read(reg + offset_in_dword, size)

    def config_write(self, address: int, offset_in_dword: int, size: int, value: int) -> None:
        """Write the ``size``-byte ``value`` at byte ``offset_in_dword`` of the dword that
        CONFIG_ADDRESS value ``address`` selects, then call the function's ``on_write``; dropped if
        nothing answers."""
        t = self._target(address)
        if t is not None:
            f, reg = t
            f.write(reg + offset_in_dword, size, value)
            if f.on_write is not None:
                f.on_write()

    @staticmethod
    def _data_pieces(port: int, size: int):
        """How QEMU's memory core splits an access of ``size`` bytes at CONFIG_DATA port
        ``port``: naturally aligned pieces (offset in the dword, bytes) inside 0xCFC-0xCFF, then
        (None, bytes) for what lies past 0xCFF (other, unassigned ports)."""
        pos = port - CONFIG_DATA
        left = size
        while left > 0 and pos < 4:
            n = min(left, 4 - pos)
            while n > 1 and (n & (n - 1) or pos % n):
                n -= 1
            yield pos, n
            pos += n
            left -= n
        if left > 0:
            yield None, left

    # -- ports -----------------------------------------------------------------------------
    def read(self, port: int, size: int) -> int:
        """An IN of ``size`` bytes at ``port``: CONFIG_ADDRESS (0xCF8, 32-bit only), the reset
        control register (0xCF9, 8-bit only) or CONFIG_DATA (0xCFC-0xCFF), as in PCI Local Bus
        Specification configuration mechanism #1; anything else reads all-ones."""
        with self._lock:
            if port == CONFIG_ADDRESS and size == 4:
                return self.address
            if port == RESET_CONTROL and size == 1:
                return self.rcr
            if CONFIG_DATA <= port <= CONFIG_DATA + 3:
                value = done = 0
                for pos, n in self._data_pieces(port, size):
                    if pos is None:
                        piece = (1 << (8 * n)) - 1          # past 0xCFF: unassigned ports
                    else:
                        piece = self.config_read(self.address, (pos | self.address) & 3, n)
                    value |= piece << (8 * done)
                    done += n
                return value
        return (1 << (8 * size)) - 1

    def write(self, port: int, size: int, value: int) -> None:
        """An OUT of ``size`` bytes of ``value`` at ``port``: set CONFIG_ADDRESS (0xCF8, 32-bit),
        write the reset control register (0xCF9, 8-bit; setting bit 2 calls ``on_reset``, outside
        the lock) or write configuration data through CONFIG_DATA (0xCFC-0xCFF)."""
        reset = False
        with self._lock:
            if port == CONFIG_ADDRESS and size == 4:
                self.address = value & 0xFFFFFFFF
            elif port == RESET_CONTROL and size == 1:
                # PIIX RCR: bit 1 = hard reset, bit 2 = reset CPU (the 0 -> 1 transition)
                if value & 0x04 and not self.rcr & 0x04:
                    reset = True
                self.rcr = value & 0x02
            elif CONFIG_DATA <= port <= CONFIG_DATA + 3:
                done = 0
                for pos, n in self._data_pieces(port, size):
                    if pos is not None:
                        self.config_write(self.address, (pos | self.address) & 3, n,
                                          (value >> (8 * done)) & ((1 << (8 * n)) - 1))
                    done += n
        if reset and self.on_reset:
            self.on_reset()
