"""PCI configuration space through configuration mechanism #1 (ports 0xCF8-0xCFF), with the
functions of QEMU's ``pc`` (i440FX) board that pykvm models.

Each access is answered as QEMU 7.2 answers it (``hw/pci/pci_host.c`` and the PIIX3 reset
control register, run under TCG, where an IN or OUT reaches the region holding its first port
whole; checked against it):

* 0xCF8-0xCFB: CONFIG_ADDRESS — bit 31 enable, bits 23:16 bus, 15:11 device, 10:8 function,
  7:0 register. Only a 32-bit write at 0xCF8 sets it. A naturally aligned read of any width
  (a byte at 0xCF8, 0xCFA or 0xCFB, a word at 0xCF8 or 0xCFA, the dword) gives the register's
  low bits (QEMU's handler ignores the offset); an unaligned one reads 0.
* 0xCF9: the PIIX reset control register (it overlays CONFIG_ADDRESS's second byte): every byte
  of an access reads the register; every byte written sets it to bit 1 (hard reset type) and
  requests a reset when bit 2 is set.
* 0xCFC-0xCFF: CONFIG_DATA. QEMU's data region takes naturally aligned accesses only (its ops
  leave ``.valid.unaligned`` false): a byte anywhere, a word at 0xCFC or 0xCFE, the dword at
  0xCFC. An unaligned access (a word at 0xCFD or 0xCFF, a dword at 0xCFD-0xCFF) reads 0 and
  its write is dropped. A valid access reads or writes configuration space at the selected
  register plus the port's low two bits ORed with CONFIG_ADDRESS's (as QEMU's
  ``pci_data_read`` does), ``size`` bytes from there, possibly past the dword; bytes past the
  256-byte space read 0. With bit 31 clear or no function there, reads are all-ones and
  writes are dropped.

Functions on bus 0 (IDs as QEMU presents them; command and status registers as the guest finds
them after SeaBIOS: I/O, memory and SERR# enabled, QEMU's DEVSEL timing):

======  ===========  ===========  ========  ======  =================================
dev.fn  vendor:dev   class        command   status  what
======  ===========  ===========  ========  ======  =================================
00.0    8086:1237    06 00 00     0x0103    0x0000  i440FX host bridge (PMC), rev 02
01.0    8086:7000    06 01 00     0x0103    0x0200  PIIX3 PCI-to-ISA bridge
                                                    (multi-function)
01.3    8086:7113    06 80 00     0x0103    0x0280  PIIX4 ACPI power management, rev 03:
                                                    PMBA (0x40) = 0x0601, PMREGMISC
                                                    (0x80) = 1
======  ===========  ===========  ========  ======  =================================

Writable bits are QEMU's (``pci_init_wmask``): command bits 0-2, 8 and 10, cache line size
(0x0C), interrupt line (0x3C) and, on these three chipset functions, every byte from 0x40 to
0xFF. Everything else is read-only: IDs, status, revision, class, the latency timer (0x0D,
which QEMU keeps 0: the datasheets make it writable on the PIIX3 and i440FX), header type, BIST
and interrupt pin. Values written above 0x40 are stored and read back; only PMBA and PMREGMISC
have an effect (the PC machine moves or turns off the PM I/O block, see :meth:`PciHost.
pm_io_space`). QEMU does not implement the i440FX SMRAM register's fixed C_BASE_SEG bits nor
D_LCK: 0x72 resets to 0x02 and takes any byte (the datasheet fixes bits 2:0 at 010 and locks
the register once D_LCK is set). PIIX3 registers hold QEMU's reset values (``piix3_reset``);
PIRQ routing (0x60-0x63) stays disabled (0x80) where SeaBIOS would route PIRQA-D to IRQ 10, 10,
11, 11.
"""
from __future__ import annotations

import threading
from .snapstate import DeviceState, decode, encode
from ..errors import SnapshotError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Dict, Optional, Tuple

CONFIG_ADDRESS = 0xCF8
CONFIG_DATA = 0xCFC
RESET_CONTROL = 0xCF9
RCR_OFFSET = RESET_CONTROL - CONFIG_ADDRESS       # offsets in the device's map: port - 0xCF8
DATA_OFFSET = CONFIG_DATA - CONFIG_ADDRESS

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
                          (PCI_INTERRUPT_LINE, 0xFF)) + tuple(writable):
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


PM_FUNCTION = (1, 3)               # (device, function) of the PIIX4 PM function
PMBA = 0x40
PMREGMISC = 0x80
PMBA_MASK = 0xFFC0                 # the PM block is 64 ports, aligned (QEMU: io_base & 0xffc0)
SEABIOS_COMMAND = 0x0103           # I/O, memory space, SERR# enabled
DEVSEL_MEDIUM = 0x0200
FAST_BACK_TO_BACK = 0x0080
I440FX_SMRAM = 0x72
I440FX_SMRAM_RESET = 0x02          # C_BASE_SEG = 010 (0xA0000)


def _chipset(vendor: int, device: int, class_code: int, *, status: int, **kw) -> PciFunction:
    f = PciFunction(vendor, device, class_code, writable=_range(0x40, 0x100), **kw)
    f.put16(PCI_COMMAND, SEABIOS_COMMAND)
    f.put16(PCI_STATUS, status)
    return f


def i440fx_host_bridge() -> PciFunction:
    """Function 00.0: the i440FX host bridge (8086:1237, revision 2), SMRAM (0x72) at its reset
    value 0x02; 0x40-0xFF writable and without effect (PAM, SMRAM: pykvm maps no shadow RAM nor
    SMRAM)."""
    f = _chipset(VENDOR_INTEL, 0x1237, 0x060000, status=0, revision=0x02)
    f.config[I440FX_SMRAM] = I440FX_SMRAM_RESET
    return f


# QEMU's piix3_reset values above 0x40 (the PIRQ route registers 0x60-0x63 are 0x80)
_PIIX3_RESET = {0x4C: 0x4D, 0x4E: 0x03, 0x60: 0x80, 0x61: 0x80, 0x62: 0x80, 0x63: 0x80,
                0x69: 0x02, 0x70: 0x80, 0x76: 0x0C, 0x77: 0x0C, 0x78: 0x02, 0xA0: 0x08,
                0xA8: 0x0F}


def piix3_isa_bridge() -> PciFunction:
    """Function 01.0: the PIIX3 PCI-to-ISA bridge (8086:7000, multi-function header) with
    QEMU's reset values (IORT 0x4C = 0x4D, XBCS 0x4E = 0x03, PIRQ routing 0x60-0x63 disabled,
    TOM 0x69 = 0x02, MBIRQ 0x70 = 0x80, MBDMA 0x76-0x77 = 0x0C, PCSC 0x78 = 0x02, SMICNTL 0xA0
    = 0x08, SMIREQ... 0xA8 = 0x0F) and DEVSEL medium in the status register."""
    f = _chipset(VENDOR_INTEL, 0x7000, 0x060100, status=DEVSEL_MEDIUM, header_type=0x80)
    for off, v in _PIIX3_RESET.items():
        f.config[off] = v
    return f


def piix4_pm(pm_base: int = 0x600, sci_irq: int = 9) -> PciFunction:
    """Function 01.3: PIIX4 ACPI power management (8086:7113, revision 3), PMBA (0x40) =
    ``pm_base`` (an I/O port) with the I/O space bit, PM I/O enabled (PMREGMISC = 1), as
    SeaBIOS leaves them, INTA# on interrupt line ``sci_irq``. PMBA and PMREGMISC are writable
    (all 8 bits of each byte, as in QEMU: bit 0 of PMBA then reads back as written)."""
    f = _chipset(VENDOR_INTEL, 0x7113, 0x068000, status=DEVSEL_MEDIUM | FAST_BACK_TO_BACK,
                 revision=0x03)
    f.config[PMBA:PMBA + 4] = (pm_base | 1).to_bytes(4, "little")   # PMBA, I/O space indicator
    f.config[PMREGMISC] = 0x01                                     # PMREGMISC: PM I/O enabled
    f.config[PCI_INTERRUPT_PIN] = 0x01                             # INTA#
    f.config[PCI_INTERRUPT_LINE] = sci_irq
    return f


class PciHost(DeviceState):
    """Configuration mechanism #1 over a set of functions on bus 0, keyed (device, function).
    ``on_reset`` is called for a hard reset request through 0xCF9.

    On the port bus: eight one-port ranges (0xCF8-0xCFF, offsets 0-7) taking accesses of up to
    4 bytes, so that every IN or OUT reaches the device whole at the port it starts at and the
    device judges its alignment (module docstring). The platform keeps the PM block where
    00:01.3 says: it sets ``functions[PM_FUNCTION].on_write`` and reads :meth:`pm_io_space`."""

    SNAPSHOT_FIELDS = ('address', 'rcr')
    SNAPSHOT_RANGES = {"address": (0, 0xFFFFFFFF), "rcr": (0, 0xFF)}

    def snapshot_state(self) -> dict:
        """As :meth:`DeviceState.snapshot_state`, with every function's configuration space
        (``"functions"``: ``{"slot.fn": bytes}``)."""
        out = super().snapshot_state()
        with self._lock:
            out["functions"] = {f"{s}.{f}": encode(bytes(fn.config))
                                for (s, f), fn in sorted(self.functions.items())}
        return out

    def restore_state(self, state: dict, *, mono_delta: int = 0) -> None:
        """As :meth:`DeviceState.restore_state`, with the functions' configuration spaces;
        the snapshot must have the same functions (checked before anything is set)."""
        if not isinstance(state, dict) or not isinstance(state.get("functions"), dict):
            raise SnapshotError("PciHost state lacks its functions")
        rest = {k: v for k, v in state.items() if k != "functions"}
        self._check_state(rest)
        want = {f"{s}.{f}": fn for (s, f), fn in self.functions.items()}
        got = state["functions"]
        if set(got) != set(want):
            raise SnapshotError(f"PCI functions {sorted(got)} in the snapshot, "
                                f"{sorted(want)} here")
        configs = {k: decode(v) for k, v in got.items()}
        for k, c in configs.items():
            if not isinstance(c, bytes) or len(c) != len(want[k].config):
                raise SnapshotError(f"PCI function {k}: configuration space is not "
                                    f"{len(want[k].config)} bytes")
        super().restore_state(rest, mono_delta=mono_delta)
        with self._lock:
            for k, c in configs.items():
                want[k].config[:] = c

    PIO_RANGES = tuple((CONFIG_ADDRESS + i, 1, i, 4) for i in range(8))

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

    def pm_io_space(self) -> Tuple[int, bool]:
        """(base port, enabled) of the PIIX4 PM I/O block as 00:01.3's configuration says:
        PMBA & 0xFFC0 and PMREGMISC bit 0 (QEMU's ``pm_io_space_update``); (0, False) without
        that function."""
        f = self.functions.get(PM_FUNCTION)
        if f is None:
            return 0, False
        return f.read(PMBA, 4) & PMBA_MASK, bool(f.config[PMREGMISC] & 1)

    # -- the bus protocol (offset = port - 0xCF8) ------------------------------------------
    def read(self, offset: int, size: int) -> int:
        """An access of ``size`` bytes (1-4) starting at port 0xCF8 + ``offset``, whole, as the
        module docstring says: CONFIG_ADDRESS (offsets 0-3, aligned only), the reset control
        register (1), CONFIG_DATA (4-7, aligned only); any other offset reads all-ones."""
        with self._lock:
            if offset == RCR_OFFSET:
                return self.rcr * (0x01010101 & ((1 << (8 * size)) - 1))
            if 0 <= offset < DATA_OFFSET:
                if offset % size:
                    return 0                            # unaligned: not a valid access
                return self.address & ((1 << (8 * size)) - 1)
            if DATA_OFFSET <= offset < DATA_OFFSET + 4:
                pos = offset - DATA_OFFSET
                if pos % size:
                    return 0                            # unaligned: not a valid access
                return self.config_read(self.address, (pos | self.address) & 3, size)
        return (1 << (8 * size)) - 1

    def write(self, offset: int, size: int, value: int) -> None:
        """An access of ``size`` bytes of ``value`` starting at port 0xCF8 + ``offset``, whole:
        set CONFIG_ADDRESS (a 32-bit write at offset 0), write the reset control register
        (each byte at offset 1; bit 2 calls ``on_reset``, outside the lock) or write
        configuration data through CONFIG_DATA (offsets 4-7, naturally aligned only); anything
        else is dropped."""
        reset = False
        with self._lock:
            if offset == RCR_OFFSET:
                for i in range(size):
                    b = (value >> (8 * i)) & 0xFF
                    if b & 0x04:                        # PIIX RCR: reset CPU
                        reset = True
                        break
                    self.rcr = b & 0x02                 # keep the hard reset type only
            elif offset == 0 and size == 4:
                self.address = value & 0xFFFFFFFF
            elif DATA_OFFSET <= offset < DATA_OFFSET + 4:
                pos = offset - DATA_OFFSET
                if pos % size == 0:
                    self.config_write(self.address, (pos | self.address) & 3, size,
                                      value & ((1 << (8 * size)) - 1))
        if reset and self.on_reset:
            self.on_reset()
