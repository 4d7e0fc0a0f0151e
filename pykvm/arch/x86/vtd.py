"""An Intel VT-d IOMMU (Intel Virtualization Technology for Directed I/O, architecture
specification) at 0xFED90000, where QEMU's q35 puts it: DMA remapping with second-level page
tables and interrupt remapping of MSIs, with queued invalidation.

Registers (4 KiB, 4- and 8-byte accesses): VER 0x00 (1.0), CAP 0x08 (39-bit AGAW, 2 MiB and
1 GiB pages, 16-bit domain ids), ECAP 0x10 (queued invalidation, interrupt remapping, no x2APIC
mode), GCMD 0x18 / GSTS 0x1C (TE, SRTP, QIE, IRE, SIRTP; the status bits follow the commands at
once), RTADDR 0x20, CCMD 0x28, FSTS 0x34, FECTL 0x38, IQH 0x80 / IQT 0x88 / IQA 0x90 / ICS 0x9C,
IRTA 0xB8, IOTLB at 0x208 (IRO = 0x20).

* Translation (GSTS.TES): root table [bus] → context table [devfn] → 3- or 4-level second-level
  page table (context AW 1 or 2), 4 KiB, 2 MiB and 1 GiB pages; pass-through contexts (TT 2)
  translate to themselves. A fault (no present entry, no permission) makes the access fail; it
  sets FSTS.PPF but keeps no fault record.
* Interrupt remapping (GSTS.IRES): an MSI in remappable format (address bit 4) is looked up in
  the IRTE table at IRTA by its handle (+ subhandle with SHV) and delivered in compatibility
  format with the entry's vector, delivery mode, trigger mode and destination (xAPIC:
  DST[15:8]). Compatibility-format MSIs pass unchanged. Interrupts from the in-kernel IOAPIC are
  not remapped: a remappable-format redirection entry is read by it as a compatibility one (its
  vector and low destination bits still reach the CPU the entry names in the common case of
  APIC id 0).
* Queued invalidation: writing IQT processes the descriptors from IQH; every type is accepted
  (there are no caches to invalidate) and wait descriptors write their status word / set
  ICS.IWC.
"""
import struct
import threading
from typing import Callable, Optional

BASE = 0xFED90000
SIZE = 0x1000

VER, CAP, ECAP, GCMD, GSTS, RTADDR, CCMD = 0x00, 0x08, 0x10, 0x18, 0x1C, 0x20, 0x28
FSTS, FECTL, IQH, IQT, IQA, ICS, IRTA = 0x34, 0x38, 0x80, 0x88, 0x90, 0x9C, 0xB8
IRO = 0x20                                 # IOTLB registers at IRO * 16
IOTLB = IRO * 16 + 8

GCMD_TE, GCMD_SRTP, GCMD_WBF, GCMD_QIE = 1 << 31, 1 << 30, 1 << 27, 1 << 26
GCMD_IRE, GCMD_SIRTP, GCMD_CFI = 1 << 25, 1 << 24, 1 << 23
GSTS_TES, GSTS_RTPS, GSTS_QIES, GSTS_IRES, GSTS_IRTPS = 1 << 31, 1 << 30, 1 << 26, 1 << 25, \
    1 << 24
FSTS_PPF = 1 << 1
ICS_IWC = 1

CAP_VALUE = (2                              # ND: 16-bit domain ids
             | (0x2 << 8)                   # SAGAW: 39-bit (3-level)
             | (38 << 16)                   # MGAW - 1
             | ((0x220 >> 4) << 24)         # FRO: fault recording registers at 0x220
             | (1 << 34) | (1 << 35)        # SLLPS: 2 MiB and 1 GiB pages
             | (1 << 54) | (1 << 55))       # DWD, DRD
ECAP_VALUE = (1 << 1) | (1 << 3) | (IRO << 8)   # QI, IR, IOTLB register offset


class DmaFault(Exception):
    """A DMA address the IOMMU does not translate."""


class Vtd:
    """The IOMMU's registers and what they control. ``memory``: guest memory (read/write by
    guest-physical address); ``signal_msi(address, data)``: deliver a compatibility MSI."""

    def __init__(self, memory, signal_msi: Callable[[int, int], None]):
        self.memory = memory
        self.signal_msi = signal_msi
        self.regs = bytearray(SIZE)
        struct.pack_into("<I", self.regs, VER, 0x10)
        struct.pack_into("<Q", self.regs, CAP, CAP_VALUE)
        struct.pack_into("<Q", self.regs, ECAP, ECAP_VALUE)
        self._lock = threading.RLock()
        self.faults = 0

    def _r(self, off: int, size: int = 4) -> int:
        return int.from_bytes(self.regs[off:off + size], "little")

    def _w(self, off: int, value: int, size: int = 4) -> None:
        self.regs[off:off + size] = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")

    @property
    def gsts(self) -> int:
        """The global status register."""
        return self._r(GSTS)

    # -- registers ---------------------------------------------------------------------------
    def mmio_read(self, addr: int, n: int) -> bytes:
        """``n`` bytes read at guest-physical ``addr`` in the register page."""
        off = addr - BASE
        with self._lock:
            if off == GCMD:
                return bytes(n)                 # write-only
            return bytes(self.regs[off:off + n]) + bytes(max(0, off + n - SIZE))

    def mmio_write(self, addr: int, data: bytes) -> None:
        """A write of ``data`` at guest-physical ``addr`` in the register page."""
        off = addr - BASE
        value = int.from_bytes(data, "little")
        with self._lock:
            if off == GCMD:
                self._command(value & 0xFFFFFFFF)
            elif off in (VER, VER + 4, CAP, CAP + 4, ECAP, ECAP + 4, GSTS, IQH, IQH + 4):
                pass                                           # read-only
            elif off == ICS:
                self._w(ICS, self._r(ICS) & ~value)            # write 1 to clear
            elif off == FSTS:
                self._w(FSTS, self._r(FSTS) & ~(value & 0x7F))
            elif off in (CCMD, CCMD + 4) or off in (IOTLB, IOTLB + 4):
                self.regs[off:off + len(data)] = data
                top = (CCMD if off < IOTLB else IOTLB) + 4
                self._w(top, self._r(top) & 0x7FFFFFFF)       # ICC / IVT: done at once
            elif off == IQT:
                self._w(IQT, value & 0x7FFF0, 4)
                self._process_queue()
            else:
                self.regs[off:off + len(data)] = data[:SIZE - off]

    def _command(self, cmd: int) -> None:
        sts = self._r(GSTS)
        for c, s in ((GCMD_TE, GSTS_TES), (GCMD_QIE, GSTS_QIES), (GCMD_IRE, GSTS_IRES)):
            sts = (sts | s) if cmd & c else (sts & ~s)
        if cmd & GCMD_SRTP:
            sts |= GSTS_RTPS                       # root table pointer latched
        if cmd & GCMD_SIRTP:
            sts |= GSTS_IRTPS
        if cmd & GCMD_QIE and not self._r(GSTS) & GSTS_QIES:
            self._w(IQH, 0, 8)
        self._w(GSTS, sts)

    def _process_queue(self) -> None:
        if not self._r(GSTS) & GSTS_QIES:
            return
        iqa = self._r(IQA, 8)
        base, entries = iqa & ~0xFFF, 256 << (iqa & 7)
        head, tail = self._r(IQH, 8) >> 4, self._r(IQT, 8) >> 4
        for _ in range(entries):
            if head == tail:
                break
            lo, hi = struct.unpack("<QQ", self.memory.read(base + head * 16, 16))
            if lo & 0xF == 5:                      # invalidation wait descriptor
                if lo & (1 << 5):                  # SW: write the status data
                    self.memory.write(hi & ~3, struct.pack("<I", lo >> 32))
                if lo & (1 << 4):                  # IF
                    self._w(ICS, self._r(ICS) | ICS_IWC)
            head = (head + 1) % entries
        self._w(IQH, head << 4, 8)

    # -- DMA remapping -------------------------------------------------------------------------
    def translate(self, source_id: int, addr: int, write: bool) -> int:
        """The guest-physical address DMA to ``addr`` from PCI requester ``source_id``
        (bus << 8 | devfn) reaches; raises :class:`DmaFault`."""
        with self._lock:
            if not self._r(GSTS) & GSTS_TES:
                return addr
            try:
                return self._walk(source_id, addr, write)
            except DmaFault:
                self.faults += 1
                self._w(FSTS, self._r(FSTS) | FSTS_PPF)
                raise

    def _q(self, gpa: int) -> int:
        return struct.unpack("<Q", self.memory.read(gpa, 8))[0]

    def _walk(self, sid: int, addr: int, write: bool) -> int:
        root = self._r(RTADDR, 8) & ~0xFFF
        re = self._q(root + (sid >> 8) * 16)
        if not re & 1:
            raise DmaFault(f"no root entry for bus {sid >> 8}")
        ctx = re & ~0xFFF & ((1 << 52) - 1)
        lo, hi = self._q(ctx + (sid & 0xFF) * 16), self._q(ctx + (sid & 0xFF) * 16 + 8)
        if not lo & 1:
            raise DmaFault(f"no context entry for {sid:#06x}")
        tt = (lo >> 2) & 3
        if tt == 2:
            return addr                            # pass-through
        levels = {1: 3, 2: 4}.get(hi & 7)
        if levels is None:
            raise DmaFault(f"unsupported address width {hi & 7}")
        if addr >> (12 + 9 * levels):
            raise DmaFault(f"address {addr:#x} beyond the context's width")
        table = lo & ~0xFFF & ((1 << 52) - 1)
        for level in range(levels, 0, -1):
            shift = 12 + 9 * (level - 1)
            pte = self._q(table + ((addr >> shift) & 0x1FF) * 8)
            if not pte & (2 if write else 1):
                raise DmaFault(f"no {'write' if write else 'read'} permission at {addr:#x}")
            page = pte & ((1 << 52) - 1) & ~0xFFF
            if level == 1 or (pte & 0x80 and level in (2, 3)):
                return (page & ~((1 << shift) - 1)) | (addr & ((1 << shift) - 1))
            table = page
        raise DmaFault("walk ended without a page")

    # -- interrupt remapping -----------------------------------------------------------------
    def remap_msi(self, address: int, data: int) -> Optional[tuple]:
        """The compatibility-format (address, data) an MSI turns into, or None if it is
        blocked (no present IRTE)."""
        with self._lock:
            if not self._r(GSTS) & GSTS_IRES or not address & (1 << 4):
                return address, data
            handle = ((address >> 5) & 0x7FFF) | (((address >> 2) & 1) << 15)
            if address & (1 << 3):                 # SHV: the subhandle comes from the data
                handle += data & 0xFFFF
            irta = self._r(IRTA, 8)
            if handle >= 1 << ((irta & 0xF) + 1):
                return None
            lo, hi = struct.unpack("<QQ", self.memory.read((irta & ~0xFFF) + handle * 16, 16))
            if not lo & 1:
                return None
            dest_mode = (lo >> 2) & 1
            redir_hint = (lo >> 3) & 1
            trigger = (lo >> 4) & 1
            delivery = (lo >> 5) & 7
            vector = (lo >> 16) & 0xFF
            dest = (lo >> 40) & 0xFF                # xAPIC mode: DST[15:8]
            addr = 0xFEE00000 | dest << 12 | redir_hint << 3 | dest_mode << 2
            return addr, vector | delivery << 8 | trigger << 15

    def deliver_msi(self, address: int, data: int) -> None:
        """Send a device's MSI on, remapped (see :meth:`remap_msi`); a blocked one is dropped."""
        out = self.remap_msi(address, data)
        if out is not None:
            self.signal_msi(*out)
