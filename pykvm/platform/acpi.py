"""ACPI tables for the PC machine (ACPI specification 6.x, chapter 5), built from scratch.

:func:`build_tables` lays out, from a base address in the BIOS area:

* RSDP, revision 2 (16-byte aligned, both checksums) → RSDT (32-bit pointers) and XSDT
  (64-bit pointers), each listing the FADT and the MADT;
* FADT, revision 3 (244 bytes): FACS and DSDT (32- and 64-bit pointers), SCI on IRQ 9, no SMI
  command port (always in ACPI mode, SCI_EN reads 1), the PM1a event block at 0x600 (4 bytes),
  the PM1a control block at 0x604 (2 bytes), the 24-bit PM timer at 0x608 (4 bytes), no GPE
  block, RTC century at CMOS 0x32, the reset register (0xCF9, value 6) — QEMU's pc ports;
* FACS, 64-byte aligned, version 2: the firmware waking vector the OS writes before S3;
* DSDT: ``\\_S3_`` = Package {1, 1, 0, 0} and ``\\_S5_`` = Package {0, 0, 0, 0}, the SLP_TYP
  values QEMU's DSDT names (a 16-bit write of 0x2400 to PM1a_CNT enters S3, 0x2000 S5), and
  the PCI root bridge ``\\_SB.PCI0`` (``PNP0A03``, bus 0, its I/O and 32-bit memory windows in
  ``_CRS``, a ``_PRT`` giving each slot's INTA#-INTD# the GSI of its PIRQ) so that an ACPI OS
  scans the bus;
* MADT: the local APIC address 0xFEE00000 with PCAT_COMPAT, one enabled local APIC per vCPU
  (processor uid = APIC id = index), the IOAPIC (id 0, 0xFEC00000, GSI base 0), the interrupt
  source overrides QEMU's pc declares (ISA IRQ 0 → GSI 2, edge; IRQs 5, 9, 10, 11 → the same
  GSI, level active-high) and a local APIC NMI on LINT1 for all processors.

Everything is pure data: the PC machine writes the bytes into guest RAM.
"""
from __future__ import annotations

import struct

from .._record import field, Record
from ..devices import acpi_pm

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Dict, Sequence

OEM_ID = b"PYKVM "
OEM_TABLE_ID = b"PYKVMPC "
OEM_REVISION = 1
CREATOR_ID = b"PYKV"
CREATOR_REVISION = 1

# the PM block where the device model sits by default (the FADT points the guest at it)
PM_BASE = acpi_pm.STS_PORT
PM1A_EVT_BLK = acpi_pm.STS_PORT
PM1A_CNT_BLK = acpi_pm.CNT_PORT
PM_TMR_BLK = acpi_pm.TMR_PORT
PM1_EVT_LEN = 4
PM1_CNT_LEN = 2
PM_TMR_LEN = 4
SCI_IRQ = 9
RESET_PORT = 0xCF9
RESET_VALUE = 0x06
CMOS_CENTURY = 0x32

SLP_TYP_S3 = 1
SLP_TYP_S5 = 0

IOAPIC_ID = 0
IOAPIC_ADDR = 0xFEC00000
LAPIC_ADDR = 0xFEE00000

# FADT flags (5.2.9, table "Fixed ACPI Description Table Flags")
FADT_WBINVD = 1 << 0
FADT_PROC_C1 = 1 << 2
FADT_SLP_BUTTON = 1 << 5
FADT_RTC_S4 = 1 << 7
FADT_TMR_VAL_EXT = 1 << 8
FADT_RESET_REG_SUP = 1 << 10
# IA-PC boot architecture flags
IAPC_LEGACY_DEVICES = 1 << 0

MADT_PCAT_COMPAT = 1
MADT_LAPIC, MADT_IOAPIC, MADT_ISO, MADT_LAPIC_NMI = 0, 1, 2, 4

GAS_SYSTEM_IO = 1
HEADER_LEN = 36


def checksum(data: bytes) -> int:
    """The byte that makes ``data`` (with this byte in place of a zero) sum to 0 mod 256."""
    return (-sum(data)) & 0xFF


def table(signature: bytes, revision: int, body: bytes) -> bytes:
    """A system description table: the 36-byte header (checksum filled in) + ``body``."""
    assert len(signature) == 4
    length = HEADER_LEN + len(body)
    hdr = struct.pack("<4sIBB6s8sI4sI", signature, length, revision, 0, OEM_ID, OEM_TABLE_ID,
                      OEM_REVISION, CREATOR_ID, CREATOR_REVISION)
    raw = bytearray(hdr + body)
    raw[9] = checksum(raw)
    return bytes(raw)


def gas(space: int, bit_width: int, address: int, access_size: int = 0) -> bytes:
    """A Generic Address Structure (12 bytes)."""
    return struct.pack("<BBBBQ", space, bit_width, 0, access_size, address)


def rsdp(rsdt_addr: int, xsdt_addr: int) -> bytes:
    """The Root System Description Pointer, revision 2 (36 bytes)."""
    raw = bytearray(struct.pack("<8sB6sBIIQB3x", b"RSD PTR ", 0, OEM_ID, 2, rsdt_addr, 36,
                                xsdt_addr, 0))
    raw[8] = checksum(raw[:20])
    raw[32] = checksum(raw)
    return bytes(raw)


def rsdt(entries: Sequence[int]) -> bytes:
    """The Root System Description Table (ACPI 6.x §5.2.7): the header and one 32-bit
    guest-physical table address per item of ``entries``."""
    return table(b"RSDT", 1, b"".join(struct.pack("<I", a) for a in entries))


def xsdt(entries: Sequence[int]) -> bytes:
    """The Extended System Description Table (ACPI 6.x §5.2.8): the header and one 64-bit
    guest-physical table address per item of ``entries``."""
    return table(b"XSDT", 1, b"".join(struct.pack("<Q", a) for a in entries))


def facs() -> bytes:
    """The Firmware ACPI Control Structure (64 bytes, no checksum)."""
    return struct.pack("<4sIIIIIQB3xI24x", b"FACS", 64, 0, 0, 0, 0, 0, 2, 0)


FACS_WAKING_VECTOR = 12          # offset of Firmware_Waking_Vector (u32)
FACS_X_WAKING_VECTOR = 24        # offset of X_Firmware_Waking_Vector (u64)
FACS_FLAGS = 20
FACS_64BIT_WAKE_SUPPORTED = 1 << 1


def _aml_pkglength(n: int) -> bytes:
    """AML PkgLength for a package whose contents (after the PkgLength) are ``n`` bytes (ACPI
    6.5, 20.2.4: one byte up to 63, else 2-4 bytes, the low nibble first)."""
    if n + 1 < 0x40:
        return bytes([n + 1])
    for extra in (1, 2, 3):
        total = n + 1 + extra
        if total < 1 << (4 + 8 * extra):
            return bytes([(extra << 6) | (total & 0xF)]) + (total >> 4).to_bytes(extra, "little")
    raise ValueError(f"AML package of {n} bytes is too long")


def _aml_sleep_object(name: bytes, typ: int) -> bytes:
    """Name (<name>, Package (4) {typ, typ, Zero, Zero})."""
    def integer(v):
        return {0: b"\x00", 1: b"\x01"}.get(v) or bytes([0x0A, v])     # Zero/One/ByteConst
    elems = integer(typ) + integer(typ) + b"\x00\x00"
    body = bytes([4]) + elems
    return b"\x08" + name + b"\x12" + _aml_pkglength(len(body)) + body


def _aml_int(v: int) -> bytes:
    """An AML integer: Zero, One, or the shortest of Byte/Word/DWordConst (ACPI 20.2.3)."""
    if v in (0, 1):
        return bytes([v])
    for prefix, n in ((0x0A, 1), (0x0B, 2), (0x0C, 4)):
        if v < 1 << (8 * n):
            return bytes([prefix]) + v.to_bytes(n, "little")
    return b"\x0E" + v.to_bytes(8, "little")


def _aml_package(elems: Sequence[bytes]) -> bytes:
    body = bytes([len(elems)]) + b"".join(elems)
    return b"\x12" + _aml_pkglength(len(body)) + body


def _aml_buffer(data: bytes) -> bytes:
    body = _aml_int(len(data)) + data
    return b"\x11" + _aml_pkglength(len(body)) + body


# PCI interrupt links as SeaBIOS programs the PIIX: INTx pin p (0 = INTA#) of slot s reaches
# PIRQ (s + p) & 3, and PIRQA-D are ISA IRQs 10, 10, 11, 11 (pc.PIRQ_LINES)
PIRQ_IRQS = (10, 10, 11, 11)
PCI_HOLE_END = 0xFEBFFFFF          # below the IOAPIC: the 32-bit window PCI BARs take


def _pci_host_bridge(hole_start: int) -> bytes:
    """``Scope (\\_SB) { Device (PCI0) {...} }``: the PCI root bridge (``PNP0A03``) on bus 0,
    decoding configuration mechanism #1, every I/O port but 0xCF8-0xCFF, the VGA window and
    the 32-bit hole [``hole_start``, 0xFEBFFFFF] (``_CRS``, ACPI 6.5 section 6.4), with a
    ``_PRT`` routing every slot's INTA#-INTD# to the GSI of its PIRQ (section 6.2.13)."""
    word = "<BHBBBHHHHH"                  # Word Address Space Descriptor (6.4.3.5.3)
    flags = 0x0C                          # producer, positive decode, min and max fixed
    crs = (struct.pack(word, 0x88, 13, 2, flags, 0, 0, 0x00, 0xFF, 0, 0x100) +       # bus
           struct.pack("<BBHHBB", 0x47, 1, 0xCF8, 0xCF8, 1, 8) +                    # conf1 ports
           struct.pack(word, 0x88, 13, 1, flags, 3, 0, 0x0000, 0x0CF7, 0, 0x0CF8) +
           struct.pack(word, 0x88, 13, 1, flags, 3, 0, 0x0D00, 0xFFFF, 0, 0xF300))
    dword = "<BHBBBIIIII"                 # DWord Address Space Descriptor (6.4.3.5.2)
    for lo, hi in ((0x000A0000, 0x000BFFFF), (hole_start, PCI_HOLE_END)):
        if lo < hi:
            crs += struct.pack(dword, 0x87, 23, 0, flags, 0x03, 0, lo, hi, 0, hi - lo + 1)
    crs += b"\x79\x00"                   # End Tag, checksum 0 (6.4.2.9)
    prt = [_aml_package([_aml_int((slot << 16) | 0xFFFF), _aml_int(pin), b"\x00",
                         _aml_int(PIRQ_IRQS[(slot + pin) & 3])])
           for slot in range(1, 32) for pin in range(4)]
    body = (b"PCI0" +
            b"\x08_HID\x0C" + bytes((0x41, 0xD0, 0x0A, 0x03)) +        # EISAID ("PNP0A03")
            b"\x08_ADR" + _aml_int(0) + b"\x08_UID" + _aml_int(0) +
            b"\x08_BBN" + _aml_int(0) +
            b"\x08_CRS" + _aml_buffer(crs) +
            b"\x08_PRT" + _aml_package(prt))
    device = b"\x5B\x82" + _aml_pkglength(len(body)) + body
    scope = b"\\_SB_" + device
    return b"\x10" + _aml_pkglength(len(scope)) + scope


def dsdt(pci_hole_start: int = 0) -> bytes:
    """The DSDT: the \\_S3_ and \\_S5_ sleep type packages and, with ``pci_hole_start`` (the
    first address above low RAM), the PCI root bridge \\_SB.PCI0 that tells an ACPI OS to
    scan bus 0 (:func:`_pci_host_bridge`)."""
    aml = _aml_sleep_object(b"_S3_", SLP_TYP_S3) + _aml_sleep_object(b"_S5_", SLP_TYP_S5)
    if pci_hole_start:
        aml += _pci_host_bridge(pci_hole_start)
    return table(b"DSDT", 2, aml)


def fadt(facs_addr: int, dsdt_addr: int) -> bytes:
    """The Fixed ACPI Description Table, revision 3 (244 bytes)."""
    b = bytearray(244 - HEADER_LEN)

    def put(fmt, off, *v):
        struct.pack_into(fmt, b, off - HEADER_LEN, *v)
    put("<I", 36, facs_addr)
    put("<I", 40, dsdt_addr)
    put("<B", 45, 0)                        # preferred PM profile: unspecified
    put("<H", 46, SCI_IRQ)
    put("<I", 48, 0)                        # SMI_CMD: none, the machine is always in ACPI mode
    put("<I", 56, PM1A_EVT_BLK)
    put("<I", 64, PM1A_CNT_BLK)
    put("<I", 76, PM_TMR_BLK)
    put("<B", 88, PM1_EVT_LEN)
    put("<B", 89, PM1_CNT_LEN)
    put("<B", 91, PM_TMR_LEN)
    put("<H", 96, 0xFFF)                    # P_LVL2_LAT > 100: C2 not supported
    put("<H", 98, 0xFFF)                    # P_LVL3_LAT > 1000: C3 not supported
    put("<B", 108, CMOS_CENTURY)
    put("<H", 109, IAPC_LEGACY_DEVICES)
    put("<I", 112, FADT_WBINVD | FADT_PROC_C1 | FADT_SLP_BUTTON | FADT_RTC_S4 |
        FADT_RESET_REG_SUP)
    b[116 - HEADER_LEN:128 - HEADER_LEN] = gas(GAS_SYSTEM_IO, 8, RESET_PORT, 1)
    put("<B", 128, RESET_VALUE)
    put("<Q", 132, facs_addr)
    put("<Q", 140, dsdt_addr)
    b[148 - HEADER_LEN:160 - HEADER_LEN] = gas(GAS_SYSTEM_IO, 8 * PM1_EVT_LEN, PM1A_EVT_BLK, 2)
    b[172 - HEADER_LEN:184 - HEADER_LEN] = gas(GAS_SYSTEM_IO, 8 * PM1_CNT_LEN, PM1A_CNT_BLK, 2)
    b[208 - HEADER_LEN:220 - HEADER_LEN] = gas(GAS_SYSTEM_IO, 8 * PM_TMR_LEN, PM_TMR_BLK, 3)
    return table(b"FACP", 3, bytes(b))


# interrupt source overrides of QEMU's pc: (ISA IRQ, GSI, MPS INTI flags)
ISO_EDGE = 0x0
ISO_LEVEL_HIGH = 0xD                     # trigger level (3 << 2) | polarity active high (1)
PC_OVERRIDES = ((0, 2, ISO_EDGE), (5, 5, ISO_LEVEL_HIGH), (9, 9, ISO_LEVEL_HIGH),
                (10, 10, ISO_LEVEL_HIGH), (11, 11, ISO_LEVEL_HIGH))


def madt(apic_ids: Sequence[int], overrides=PC_OVERRIDES) -> bytes:
    """The Multiple APIC Description Table."""
    body = bytearray(struct.pack("<II", LAPIC_ADDR, MADT_PCAT_COMPAT))
    for uid, apic_id in enumerate(apic_ids):
        body += struct.pack("<BBBBI", MADT_LAPIC, 8, uid, apic_id, 1)
    body += struct.pack("<BBBBII", MADT_IOAPIC, 12, IOAPIC_ID, 0, IOAPIC_ADDR, 0)
    for irq, gsi, flags in overrides:
        body += struct.pack("<BBBBIH", MADT_ISO, 10, 0, irq, gsi, flags)
    body += struct.pack("<BBBHB", MADT_LAPIC_NMI, 6, 0xFF, 0, 1)
    return table(b"APIC", 1, bytes(body))


def dmar(register_base: int, ioapic_id: int = IOAPIC_ID) -> bytes:
    """The DMA Remapping table (VT-d spec 8.1) of one IOMMU covering every PCI device
    (INCLUDE_PCI_ALL) with interrupt remapping, and the IOAPIC in its device scope (at the
    pseudo bus 0xFF, device 0x1F, as QEMU's q35 declares it)."""
    scope = struct.pack("<BBHBBBB", 3, 8, 0, ioapic_id, 0xFF, 0x1F, 0)     # IOAPIC scope
    drhd = struct.pack("<HHBBHQ", 0, 16 + len(scope), 1, 0, 0, register_base) + scope
    body = struct.pack("<BB10x", 39 - 1, 1) + drhd          # host address width, INTR_REMAP
    return table(b"DMAR", 1, body)


class AcpiTables(Record):
    """The tables laid out at ``base``: ``blob`` is what to write there; ``addr`` maps each
    signature (and "RSDP") to its guest-physical address."""
    base: int
    blob: bytes
    addr: Dict[str, int] = field(default_factory=dict)

    @property
    def end(self) -> int:
        """The guest-physical address just past the last byte of the tables
        (``base + len(blob)``)."""
        return self.base + len(self.blob)


def _align(x: int, a: int) -> int:
    return (x + a - 1) // a * a


def build_tables(base: int, vcpus: int, *, iommu: int = 0, pci_hole_start: int = 0) -> AcpiTables:
    """Every table for a PC with ``vcpus`` vCPUs (APIC ids 0..vcpus-1), laid out from ``base``
    (16-byte aligned): RSDP, FACS (64-byte aligned), DSDT (with the PCI root bridge when
    ``pci_hole_start``, the first address above low RAM, is given), FADT, MADT, (DMAR for a
    VT-d IOMMU whose registers are at ``iommu``), RSDT, XSDT."""
    if base % 16:
        raise ValueError(f"ACPI tables base {base:#x} is not 16-byte aligned")
    addr: Dict[str, int] = {}
    pos = base
    addr["RSDP"] = pos
    pos = _align(pos + 36, 64)
    addr["FACS"] = pos
    pos = _align(pos + 64, 16)
    d = dsdt(pci_hole_start)
    addr["DSDT"] = pos
    pos = _align(pos + len(d), 16)
    f = fadt(addr["FACS"], addr["DSDT"])
    addr["FACP"] = pos
    pos = _align(pos + len(f), 16)
    m = madt(list(range(vcpus)))
    addr["APIC"] = pos
    pos = _align(pos + len(m), 16)
    entries = [addr["FACP"], addr["APIC"]]
    extra = []
    if iommu:
        d2 = dmar(iommu)
        addr["DMAR"] = pos
        pos = _align(pos + len(d2), 16)
        entries.append(addr["DMAR"])
        extra.append(("DMAR", d2))
    r = rsdt(entries)
    addr["RSDT"] = pos
    pos = _align(pos + len(r), 16)
    x = xsdt(entries)
    addr["XSDT"] = pos
    pos += len(x)
    blob = bytearray(pos - base)
    parts = [("RSDP", rsdp(addr["RSDT"], addr["XSDT"])), ("FACS", facs()), ("DSDT", d),
             ("FACP", f), ("APIC", m), ("RSDT", r), ("XSDT", x)] + extra
    for name, data in parts:
        off = addr[name] - base
        blob[off:off + len(data)] = data
    return AcpiTables(base, bytes(blob), addr)


__all__ = ["build_tables", "AcpiTables", "rsdp", "rsdt", "xsdt", "fadt", "facs", "dsdt", "madt",
           "checksum", "table"]
