"""An Intel VT-d IOMMU (Intel Virtualization Technology for Directed I/O, architecture
specification, "VT-d spec" below) at 0xFED90000, where QEMU's q35 puts it: DMA remapping with
second-level page tables, interrupt remapping of MSIs, queued invalidation, and fault reporting
through fault recording registers and the fault event interrupt.

Registers (one 4 KiB page; VT-d spec chapter 11), served through the device protocol of
:mod:`pykvm.devices.bus` (``read(offset, size)``/``write(offset, size, value)``, ``offset`` from
:data:`BASE`; the range is :attr:`Vtd.MMIO_RANGES`, accesses of up to 8 bytes). As QEMU's
``intel_iommu`` (``vtd_mem_ops``: ``.valid``/``.impl`` 4..8 bytes, aligned), only naturally
aligned 4- and 8-byte accesses reach them; any other size reads 0 and a write is ignored. The
bus, as QEMU's memory core, first cuts a guest access into naturally aligned pieces of at most
8 bytes (an 8-byte access at a 4-aligned address becomes two 4-byte ones, a 4-byte access at an
odd address 1- and 2-byte ones, which read 0); the device refuses a misaligned piece all the
same when called directly. An 8-byte access at a 32-bit register covers it and the next one.
Every register keeps its read-only, reserved (read 0) and write-1-to-clear bits for every
access, and GSTS changes only through GCMD.

======  ==  ========================================================================
0x00    RO  VER 1.0
0x08    RO  CAP: ND 16-bit domain ids, SAGAW 39-bit (3-level), MGAW 39, FRO 0x220, NFR 8
            (NFR field 7), SLLPS 2 MiB and 1 GiB, DWD, DRD
0x10    RO  ECAP: QI, IR, PT (pass-through), IRO 0x200 (IOTLB registers at 0x200/0x208)
0x18    WO  GCMD: TE, SRTP, WBF, QIE, IRE, SIRTP, CFI (reads 0)
0x1C    RO  GSTS: TES, RTPS, WBFS (never pending), QIES, IRES, IRTPS, CFIS
0x20    RW  RTADDR (bits 63:12), latched by GCMD.SRTP
0x28    RW  CCMD: ICC (done at once, CAIG = CIRG), CIRG, FM, SID, DID
0x34        FSTS: PFO, IQE, ICE, ITE RW1C; PPF (any fault record's F bit) and FRI RO
0x38        FECTL: IM RW (set at reset), IP RO
0x3C    RW  FEDATA (15:0)   0x40 FEADDR (31:2)   0x44 FEUADDR
0x80    RO  IQH (18:4)      0x88 IQT (18:4)       0x90 IQA (63:12, QS 2:0)
0x9C        ICS: IWC RW1C
0xA0        IECTL: IM RW (set at reset), IP RO; 0xA4 IEDATA, 0xA8 IEADDR, 0xAC IEUADDR
0xB8    RW  IRTA (63:12, S 3:0), latched by GCMD.SIRTP
0x200   RW  IVA             0x208 IOTLB: IVT (done at once, IAIG = IIRG), IIRG, DR, DW, DID
0x220       fault recording registers 0-7, 16 bytes each: F (bit 127) RW1C, the rest RO
======  ==  ========================================================================

* Translation (GSTS.TES, VT-d spec 3.4-3.7): root table [bus] → context table [devfn] →
  3-level second-level page table (context AW 1), 4 KiB, 2 MiB and 1 GiB pages; pass-through
  contexts (TT 2) translate to themselves. A request that cannot be translated is blocked and,
  unless the context entry's FPD bit suppresses it (for the faults it qualifies), recorded as a
  primary fault (VT-d spec 7.2.1, 7.3) with the fault reasons of VT-d spec appendix "Non-
  Recoverable Fault Reason Encodings": 1 root entry not present, 2 context entry not present,
  3 invalid context entry (TT or AW not supported), 4 address beyond the context's width,
  5 write / 6 read without permission (or not present), 7 second-level paging entry access
  error, 8 root table access error, 9 context table access error, 0xA/0xB/0xC reserved bits set
  in a root / context / second-level paging entry. An access error is a table entry that is not
  in guest RAM (beyond RAM, on a device's registers, beyond 2^64).
* Interrupt remapping (GSTS.IRES, VT-d spec 5.1): an MSI in remappable format (address bit 4)
  is looked up in the IRTE table (latched IRTA) by its handle (+ subhandle with SHV) and
  delivered in compatibility format with the entry's vector, delivery mode, trigger mode and
  destination (xAPIC: DST[15:8]); its source id is checked as the IRTE's SVT/SQ/SID say.
  Blocked interrupts are recorded (unless the IRTE's FPD suppresses it) with reasons 0x21 handle
  beyond the table (IRTA.S), 0x22 IRTE not present, 0x23 IRTE not in guest RAM, 0x24 reserved
  IRTE bits set, 0x26 source id check failed; the fault information is the handle (bits 63:48).
  Compatibility-format MSIs pass unchanged (as QEMU does). Interrupts from the in-kernel IOAPIC
  are not remapped: a remappable-format redirection entry is read by it as a compatibility one.
* Fault events (VT-d spec 7.3.1): PPF (a new record while none was pending), PFO and IQE set
  FECTL.IP when no earlier condition is pending; with FECTL.IM clear the MSI FEADDR/FEUADDR +
  FEDATA is sent (not remapped) and IP cleared, else it is sent when software clears IM. IP
  clears when software has cleared every condition.
* Queued invalidation (VT-d spec 6.5.2): the 128-bit descriptors from IQH to IQT are fetched
  asynchronously, as hardware does: an IQT write consumes up to ``IQ_BATCH`` (64) at once and,
  while more remain, the machine's timer thread goes on in steps of up to 64 every
  ``IQ_STEP_NS`` (2 ms), IQH advancing past each step (an IQT write while a step is scheduled
  only moves the tail); software learns of completion from wait descriptors' status writes,
  ICS.IWC and IQH. Descriptor types: context-cache 1, IOTLB 2, interrupt entry cache 4,
  invalidation wait 5; there are no caches, so only the wait descriptor acts (its status
  write, ICS.IWC and the invalidation completion event IECTL/IEDATA/IEADDR). An invalid tail (beyond the queue), a descriptor not in guest RAM,
  an unsupported type (3 device-TLB: no ECAP.DT; 6, 7 and higher) or reserved bits set, and a
  wait descriptor whose status address is not in guest RAM, set FSTS.IQE with IQH left at the
  faulting descriptor; nothing more is fetched until software clears IQE and writes IQT.
  FSTS.ICE and FSTS.ITE only concern device-TLB invalidations, which this IOMMU does not offer
  (ECAP.DT clear): they never set, but are write-1-to-clear as the spec defines them.

No value a guest writes makes a method here raise: faults are reported as above.
"""
from __future__ import annotations

import struct
import threading

from ..errors import GuestMemoryError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Callable, Optional, Tuple

BASE = 0xFED90000
SIZE = 0x1000

VER, CAP, ECAP, GCMD, GSTS, RTADDR, CCMD = 0x00, 0x08, 0x10, 0x18, 0x1C, 0x20, 0x28
FSTS, FECTL, FEDATA, FEADDR, FEUADDR = 0x34, 0x38, 0x3C, 0x40, 0x44
IQH, IQT, IQA, ICS, IECTL, IEDATA, IEADDR, IEUADDR = 0x80, 0x88, 0x90, 0x9C, 0xA0, 0xA4, 0xA8, 0xAC
IRTA = 0xB8
IRO = 0x20                                 # IOTLB registers at IRO * 16
IVA = IRO * 16
IOTLB = IRO * 16 + 8
FRO = 0x220                                # fault recording registers
NFR = 8                                    # how many

GCMD_TE, GCMD_SRTP, GCMD_WBF, GCMD_QIE = 1 << 31, 1 << 30, 1 << 27, 1 << 26
GCMD_IRE, GCMD_SIRTP, GCMD_CFI = 1 << 25, 1 << 24, 1 << 23
GSTS_TES, GSTS_RTPS, GSTS_WBFS, GSTS_QIES = 1 << 31, 1 << 30, 1 << 27, 1 << 26
GSTS_IRES, GSTS_IRTPS, GSTS_CFIS = 1 << 25, 1 << 24, 1 << 23
FSTS_PFO, FSTS_PPF, FSTS_IQE, FSTS_ICE, FSTS_ITE = 1 << 0, 1 << 1, 1 << 4, 1 << 5, 1 << 6
FSTS_FRI_SHIFT = 8
FECTL_IM, FECTL_IP = 1 << 31, 1 << 30
ICS_IWC = 1
FRCD_F = 1 << 63                           # in the record's high quadword
FRCD_T_READ = 1 << 62

CAP_VALUE = (2                              # ND: 16-bit domain ids
             | (0x2 << 8)                   # SAGAW: 39-bit (3-level)
             | (38 << 16)                   # MGAW - 1
             | ((FRO >> 4) << 24)           # FRO
             | (1 << 34) | (1 << 35)        # SLLPS: 2 MiB and 1 GiB pages
             | ((NFR - 1) << 40)            # NFR - 1
             | (1 << 54) | (1 << 55))       # DWD, DRD
ECAP_VALUE = (1 << 1) | (1 << 3) | (1 << 6) | (IRO << 8)   # QI, IR, PT, IOTLB register offset
MGAW = 39

# fault reasons (VT-d spec, non-recoverable fault reason encodings)
FR_ROOT_NOT_PRESENT, FR_CONTEXT_NOT_PRESENT, FR_CONTEXT_INVALID, FR_ADDRESS_BEYOND = 1, 2, 3, 4
FR_WRITE, FR_READ, FR_PAGING_ENTRY_ACCESS, FR_ROOT_TABLE_ACCESS = 5, 6, 7, 8
FR_CONTEXT_TABLE_ACCESS, FR_ROOT_RESERVED, FR_CONTEXT_RESERVED, FR_PAGING_RESERVED = 9, 0xA, 0xB, 0xC
FR_IR_INDEX_OVER, FR_IR_ENTRY_NOT_PRESENT, FR_IR_TABLE_ACCESS = 0x21, 0x22, 0x23
FR_IR_IRTE_RESERVED, FR_IR_SID = 0x24, 0x26
_FPD_QUALIFIED = frozenset((FR_ADDRESS_BEYOND, FR_WRITE, FR_READ, FR_PAGING_ENTRY_ACCESS,
                            FR_PAGING_RESERVED, FR_IR_ENTRY_NOT_PRESENT, FR_IR_IRTE_RESERVED,
                            FR_IR_SID))

# reserved bits of the 128-bit invalidation descriptors (low, high), per type
_DESC_RESERVED = {
    1: (0xFFFC00000000FFC0, ~0 & 0xFFFFFFFFFFFFFFFF),      # context-cache invalidate
    2: (0xFFFFFFFF0000F100, 0xF80),                        # IOTLB invalidate
    4: (0xFFFF000007FFF1E0, ~0 & 0xFFFFFFFFFFFFFFFF),      # interrupt entry cache invalidate
    5: (0x00000000FFFFF180, 0x3),                          # invalidation wait
}
_M64 = (1 << 64) - 1
# queued invalidation runs in steps (VT-d spec 6.5.2: hardware fetches descriptors
# asynchronously, software learns of completion through wait descriptors, ICS.IWC and IQH)
IQ_BATCH = 64                              # descriptors one step consumes at most
IQ_STEP_NS = 2_000_000                     # nanoseconds from one scheduled step to the next
_PHYS = (1 << 52) - 1 & ~0xFFF             # address bits of table pointers and PTEs


class DmaFault(Exception):
    """A DMA address the IOMMU does not translate (the fault has been recorded as the VT-d spec
    says); ``reason`` is the fault reason code."""

    def __init__(self, message: str, reason: int = 0):
        super().__init__(message)
        self.reason = reason


def _layout():
    """(write mask, write-1-to-clear mask) bytearrays of the register page."""
    wmask, w1c = bytearray(SIZE), bytearray(SIZE)

    def put(arr, off, value, size):
        arr[off:off + size] = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")

    put(wmask, RTADDR, ~0xFFF, 8)
    put(wmask, CCMD, (1 << 63) | (3 << 61) | (3 << 32) | 0xFFFFFFFF, 8)
    put(w1c, FSTS, FSTS_PFO | FSTS_IQE | FSTS_ICE | FSTS_ITE, 4)
    put(wmask, FECTL, FECTL_IM, 4)
    put(wmask, FEDATA, 0xFFFF, 4)
    put(wmask, FEADDR, 0xFFFFFFFC, 4)
    put(wmask, FEUADDR, 0xFFFFFFFF, 4)
    put(wmask, IQT, 0x7FFF0, 8)
    put(wmask, IQA, ~0xFFF | 0x7, 8)
    put(w1c, ICS, ICS_IWC, 4)
    put(wmask, IECTL, FECTL_IM, 4)
    put(wmask, IEDATA, 0xFFFF, 4)
    put(wmask, IEADDR, 0xFFFFFFFC, 4)
    put(wmask, IEUADDR, 0xFFFFFFFF, 4)
    put(wmask, IRTA, ~0xFFF | 0xF, 8)
    put(wmask, IVA, ~0xFFF | 0x7F, 8)
    put(wmask, IOTLB, (1 << 63) | (3 << 60) | (3 << 48) | (0xFFFF << 32), 8)
    for i in range(NFR):
        put(w1c, FRO + 16 * i + 8, FRCD_F, 8)
    return bytes(wmask), bytes(w1c)


_WMASK, _W1C = _layout()


class Vtd:
    """The IOMMU's registers and what they control. ``memory``: guest memory (``read(gpa, n)``,
    ``write(gpa, data)`` by guest-physical address, raising
    :class:`~pykvm.errors.GuestMemoryError` where there is no RAM, a write before it changes
    anything); ``signal_msi(address, data)``: deliver a compatibility-format MSI (64-bit
    address, 32-bit data); ``defer(delay_ns, fn)``: call ``fn()`` once, on another thread,
    ``delay_ns`` nanoseconds from now (the machine's timer thread), for the invalidation
    queue's later steps. Without ``defer`` a queue longer than :data:`IQ_BATCH` descriptors
    moves on one step per IQT write.

    Host work per guest access is bounded: a register write consumes at most
    :data:`IQ_BATCH` invalidation descriptors (none while a step is scheduled), the rest
    follow in scheduled steps of at most :data:`IQ_BATCH`, one per :data:`IQ_STEP_NS`;
    translation and interrupt remapping read a fixed number of table entries. Counters:
    ``iq_fetched`` descriptors consumed, ``iq_sync_max`` the most consumed by one register
    write, ``iq_deferred_steps`` scheduled steps run.

    On a bus: :attr:`MMIO_RANGES` (``(base, size, offset, max_access)``: the 4 KiB page at
    :data:`BASE`, offsets from 0, accesses of up to 8 bytes as QEMU's ``valid.max_access_size``)
    for ``Bus.attach``; the range never moves."""

    MMIO_RANGES = ((BASE, SIZE, 0, 8),)

    def __init__(self, memory, signal_msi: Callable[[int, int], None],
                 defer: Optional[Callable[[int, Callable[[], None]], None]] = None):
        self.memory = memory
        self.signal_msi = signal_msi
        self.defer = defer
        self.regs = bytearray(SIZE)
        self._lock = threading.RLock()
        self.faults = 0                    # DMA requests blocked (recorded or not)
        self.ir_faults = 0                 # interrupt requests blocked
        self.iq_fetched = 0                # invalidation descriptors consumed
        self.iq_sync_max = 0               # the most consumed by one register write
        self.iq_deferred_steps = 0         # scheduled queue steps run
        self._iq_deferred = False          # a queue step is scheduled
        self.reset()

    def reset(self) -> None:
        """The registers as at power-on (VT-d spec chapter 11 reset values)."""
        with self._lock:
            self.regs[:] = bytes(SIZE)
            self._w(VER, 0x10)
            self._w(CAP, CAP_VALUE, 8)
            self._w(ECAP, ECAP_VALUE, 8)
            self._w(FECTL, FECTL_IM)
            self._w(IECTL, FECTL_IM)
            self._root = 0                 # RTADDR as latched by SRTP
            self._irta = 0                 # IRTA as latched by SIRTP
            self._next_frcd = 0

    def _r(self, off: int, size: int = 4) -> int:
        return int.from_bytes(self.regs[off:off + size], "little")

    def _w(self, off: int, value: int, size: int = 4) -> None:
        self.regs[off:off + size] = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")

    def _set(self, off: int, bits: int) -> None:
        self._w(off, self._r(off) | bits)

    def _clear(self, off: int, bits: int) -> None:
        self._w(off, self._r(off) & ~bits)

    @property
    def gsts(self) -> int:
        """The global status register."""
        return self._r(GSTS)

    # -- guest memory: never raises ------------------------------------------------------------
    def _read(self, gpa: int, n: int) -> Optional[bytes]:
        """``n`` bytes at guest-physical ``gpa``, or None where any of them is not RAM."""
        if gpa < 0 or gpa + n > 1 << 64:
            return None
        try:
            data = self.memory.read(gpa, n)
        except (GuestMemoryError, ValueError, OverflowError, IndexError):
            return None
        return data if len(data) == n else None

    def _read_q(self, gpa: int) -> Optional[int]:
        data = self._read(gpa, 8)
        return None if data is None else int.from_bytes(data, "little")

    def _write(self, gpa: int, data: bytes) -> bool:
        """Store ``data`` at guest-physical ``gpa``; False (nothing written) if not all RAM
        (``memory.write`` checks the whole range before it writes anything)."""
        if gpa < 0 or gpa + len(data) > 1 << 64:
            return False
        try:
            self.memory.write(gpa, data)
        except (GuestMemoryError, ValueError, OverflowError, IndexError):
            return False
        return True

    def _msi(self, address: int, data: int) -> None:
        try:
            self.signal_msi(address, data)
        except Exception:  # noqa: BLE001 — a closing VM: the interrupt has nowhere to go
            pass

    # -- registers ---------------------------------------------------------------------------
    @staticmethod
    def _valid(off: int, n: int) -> bool:
        """QEMU's vtd_mem_ops ``.valid``: 4- or 8-byte, naturally aligned, inside the page."""
        return n in (4, 8) and off % n == 0 and 0 <= off <= SIZE - n

    def read(self, offset: int, size: int) -> int:
        """The ``size``-byte little-endian value read at ``offset`` bytes into the register page
        (:class:`~pykvm.devices.bus.Device`); 0 for an access of another size or alignment, or
        one not inside the page (QEMU's unassigned read for an invalid access)."""
        if not self._valid(offset, size):
            return 0
        with self._lock:
            return self._r(offset, size)

    def write(self, offset: int, size: int, value: int) -> None:
        """A write of ``value`` (``size`` bytes, little-endian) at ``offset`` bytes into the
        register page (:class:`~pykvm.devices.bus.Device`): ignored unless a naturally aligned
        4- or 8-byte access inside the page; only writable bits change, write-1-to-clear bits
        clear, and the register's side effects follow (module docstring)."""
        if not self._valid(offset, size):
            return
        off, n = offset, size
        value &= (1 << (8 * n)) - 1
        with self._lock:
            old = self._r(off, n)
            wm = int.from_bytes(_WMASK[off:off + n], "little")
            w1c = int.from_bytes(_W1C[off:off + n], "little")
            self._w(off, ((old & ~wm) | (value & wm)) & ~(w1c & value), n)
            end = off + n

            def hit(reg: int) -> bool:
                return off <= reg < end

            if hit(GCMD):
                self._command((value >> (8 * (GCMD - off))) & 0xFFFFFFFF)
            if hit(CCMD + 4) and self._r(CCMD + 4) & (1 << 31):
                hi = self._r(CCMD + 4)             # ICC: done at once, CAIG = CIRG
                hi = (hi & ~((1 << 31) | (3 << 27))) | (((hi >> 29) & 3) << 27)
                self._w(CCMD + 4, hi)
            if hit(IOTLB + 4) and self._r(IOTLB + 4) & (1 << 31):
                hi = self._r(IOTLB + 4)            # IVT: done at once, IAIG = IIRG
                hi = (hi & ~((1 << 31) | (3 << 25))) | (((hi >> 28) & 3) << 25)
                self._w(IOTLB + 4, hi)
            if any(hit(FRO + 16 * i + 12) for i in range(NFR)):
                self._update_ppf()
            if hit(FSTS) or any(hit(FRO + 16 * i + 12) for i in range(NFR)):
                self._maybe_clear_fault_ip()
            if hit(FECTL) and not self._r(FECTL) & FECTL_IM and self._r(FECTL) & FECTL_IP:
                self._clear(FECTL, FECTL_IP)
                self._send_event(FEADDR, FEDATA, FEUADDR)
            if hit(ICS) and not self._r(ICS) & ICS_IWC:
                self._clear(IECTL, FECTL_IP)
            if hit(IECTL) and not self._r(IECTL) & FECTL_IM and self._r(IECTL) & FECTL_IP:
                self._clear(IECTL, FECTL_IP)
                self._send_event(IEADDR, IEDATA, IEUADDR)
            if hit(IQT):
                self._process_queue()

    def _send_event(self, addr_reg: int, data_reg: int, uaddr_reg: int) -> None:
        self._msi(self._r(addr_reg) | self._r(uaddr_reg) << 32, self._r(data_reg))

    def _command(self, cmd: int) -> None:
        """A GCMD write (VT-d spec 10.4.4): the state bits follow the command, one-shot bits
        latch their pointer."""
        old = self._r(GSTS)
        sts = old
        for c, s in ((GCMD_TE, GSTS_TES), (GCMD_QIE, GSTS_QIES), (GCMD_IRE, GSTS_IRES),
                     (GCMD_CFI, GSTS_CFIS)):
            sts = (sts | s) if cmd & c else (sts & ~s)
        if cmd & GCMD_SRTP:
            self._root = self._r(RTADDR, 8) & ~0xFFF
            sts |= GSTS_RTPS
        if cmd & GCMD_SIRTP:
            self._irta = self._r(IRTA, 8)
            sts |= GSTS_IRTPS
        if (sts ^ old) & GSTS_QIES:
            self._w(IQH, 0, 8)                     # the queue starts at its base
        self._w(GSTS, sts)

    # -- faults --------------------------------------------------------------------------------
    def _frcd_hi(self, i: int) -> int:
        return self._r(FRO + 16 * i + 8, 8)

    def _update_ppf(self) -> None:
        if any(self._frcd_hi(i) & FRCD_F for i in range(NFR)):
            self._set(FSTS, FSTS_PPF)
        else:
            self._clear(FSTS, FSTS_PPF)

    def _maybe_clear_fault_ip(self) -> None:
        if not self._r(FSTS) & (FSTS_PFO | FSTS_PPF | FSTS_IQE | FSTS_ICE | FSTS_ITE):
            self._clear(FECTL, FECTL_IP)

    def _fault_event(self, before: int) -> None:
        """A new fault condition: the fault event interrupt unless one is already pending
        (``before``: FSTS before the condition was set)."""
        if before & (FSTS_PFO | FSTS_PPF | FSTS_IQE | FSTS_ICE | FSTS_ITE):
            return
        if self._r(FECTL) & FECTL_IM:
            self._set(FECTL, FECTL_IP)
        else:
            self._send_event(FEADDR, FEDATA, FEUADDR)

    def _record(self, source_id: int, reason: int, info: int, read: bool) -> None:
        """Primary fault logging (VT-d spec 7.3.1): into the next fault recording register, or
        FSTS.PFO when it is still in use."""
        fsts = self._r(FSTS)
        if fsts & FSTS_PFO:
            return
        i = self._next_frcd
        if self._frcd_hi(i) & FRCD_F:
            self._set(FSTS, FSTS_PFO)
            self._fault_event(fsts)
            return
        hi = FRCD_F | (FRCD_T_READ if read else 0) | (reason & 0xFF) << 32 | (source_id & 0xFFFF)
        self._w(FRO + 16 * i, info & _M64, 8)
        self._w(FRO + 16 * i + 8, hi, 8)
        self._next_frcd = (i + 1) % NFR
        if not fsts & FSTS_PPF:
            self._w(FSTS, (self._r(FSTS) & ~(0xFF << FSTS_FRI_SHIFT)) | i << FSTS_FRI_SHIFT)
        self._set(FSTS, FSTS_PPF)
        self._fault_event(fsts)

    def fault_records(self) -> list:
        """The pending fault records: (index, source id, reason, fault info, is read)."""
        with self._lock:
            out = []
            for i in range(NFR):
                hi = self._frcd_hi(i)
                if hi & FRCD_F:
                    out.append((i, hi & 0xFFFF, (hi >> 32) & 0xFF, self._r(FRO + 16 * i, 8),
                                bool(hi & FRCD_T_READ)))
            return out

    # -- queued invalidation -------------------------------------------------------------------
    def _queue_error(self) -> None:
        before = self._r(FSTS)
        self._set(FSTS, FSTS_IQE)
        self._fault_event(before)

    def _process_queue(self) -> None:
        """An IQT write (VT-d spec 6.5.2): with a step already scheduled, the new tail only
        extends its work; otherwise one step runs now."""
        if self._iq_deferred:
            return
        n = self._iq_step()
        if n > self.iq_sync_max:
            self.iq_sync_max = n

    def _iq_continue(self) -> None:
        """A scheduled step (on the ``defer`` caller's thread)."""
        with self._lock:
            self._iq_deferred = False
            self.iq_deferred_steps += 1
            self._iq_step()

    def _iq_step(self) -> int:
        """Fetch and carry out at most :data:`IQ_BATCH` descriptors from IQH towards IQT, advance
        IQH past them and, if the queue is still not empty, ask ``defer`` to run the next step
        :data:`IQ_STEP_NS` later. Returns how many descriptors were consumed. Nothing is
        fetched while QIES is clear or FSTS.IQE is set."""
        if not self._r(GSTS) & GSTS_QIES or self._r(FSTS) & FSTS_IQE:
            return 0
        iqa = self._r(IQA, 8)
        base, entries = iqa & ~0xFFF, 256 << (iqa & 7)
        head, tail = (self._r(IQH, 8) >> 4) % entries, self._r(IQT, 8) >> 4
        if tail >= entries:                        # a tail beyond the queue
            self._queue_error()
            return 0
        done = 0
        while head != tail and done < IQ_BATCH:
            # one read for a run of contiguous descriptors; one by one where that fails, to
            # find the first that is not in RAM
            run = min((tail - head) if tail > head else (entries - head), IQ_BATCH - done)
            blob = self._read(base + head * 16, run * 16)
            if blob is not None:
                descs = struct.iter_unpack("<QQ", blob)
            else:
                descs = (self._desc_at(base + (head + k) * 16) for k in range(run))
            k = 0
            for desc in descs:
                if desc is None or not self._descriptor(*desc):
                    self._w(IQH, (head + k) << 4, 8)
                    self.iq_fetched += done + k
                    self._queue_error()
                    return done + k
                k += 1
            done += run
            head = (head + run) % entries
        self._w(IQH, head << 4, 8)
        self.iq_fetched += done
        if head != tail and self.defer is not None:
            self._iq_deferred = True
            self.defer(IQ_STEP_NS, self._iq_continue)
        return done

    def _desc_at(self, gpa: int) -> Optional[Tuple[int, int]]:
        raw = self._read(gpa, 16)
        return None if raw is None else struct.unpack("<QQ", raw)

    def _descriptor(self, lo: int, hi: int) -> bool:
        """Carry out one descriptor; False for an invalid one (an IQE)."""
        kind = lo & 0xF
        if (lo >> 9) & 7 or kind not in _DESC_RESERVED:    # type[6:4] or an unsupported type
            return False
        rlo, rhi = _DESC_RESERVED[kind]
        if lo & rlo or hi & rhi:
            return False
        if kind == 5:                              # invalidation wait
            if lo & (1 << 5) and not self._write(hi & ~3, struct.pack("<I", lo >> 32)):
                return False                       # SW: the status write failed
            if lo & (1 << 4) and not self._r(ICS) & ICS_IWC:    # IF
                self._set(ICS, ICS_IWC)
                if self._r(IECTL) & FECTL_IM:
                    self._set(IECTL, FECTL_IP)
                else:
                    self._send_event(IEADDR, IEDATA, IEUADDR)
        return True

    # -- DMA remapping -------------------------------------------------------------------------
    def translate(self, source_id: int, addr: int, write: bool) -> int:
        """The guest-physical address DMA to ``addr`` from PCI requester ``source_id``
        (bus << 8 | devfn) reaches; raises :class:`DmaFault` for a blocked request, after
        recording it (VT-d spec 7.3.1)."""
        with self._lock:
            if not self._r(GSTS) & GSTS_TES:
                return addr
            out = self._walk(source_id & 0xFFFF, addr & _M64, write)
            if isinstance(out, int):
                return out
            reason, fpd = out
            self.faults += 1
            if not (fpd and reason in _FPD_QUALIFIED):
                self._record(source_id, reason, addr & ~0xFFF & _M64, not write)
            raise DmaFault(f"DMA {'write' if write else 'read'} at {addr:#x} from "
                           f"{source_id:#06x} blocked (fault reason {reason:#x})", reason)

    def _walk(self, sid: int, addr: int, write: bool):
        """The translated address, or (fault reason, context FPD)."""
        re = self._read(self._root + (sid >> 8) * 16, 16)
        if re is None:
            return FR_ROOT_TABLE_ACCESS, False
        rlo, rhi = struct.unpack("<QQ", re)
        if not rlo & 1:
            return FR_ROOT_NOT_PRESENT, False
        if rlo & 0xFFE or rhi:
            return FR_ROOT_RESERVED, False
        ce = self._read((rlo & _PHYS) + (sid & 0xFF) * 16, 16)
        if ce is None:
            return FR_CONTEXT_TABLE_ACCESS, False
        lo, hi = struct.unpack("<QQ", ce)
        if not lo & 1:
            return FR_CONTEXT_NOT_PRESENT, False
        fpd = bool(lo & 2)
        if lo & 0xFF0 or hi & ~((0xFFFF << 8) | 0x7F) & _M64:
            return FR_CONTEXT_RESERVED, fpd
        tt, aw = (lo >> 2) & 3, hi & 7
        if tt not in (0, 2) or aw != 1:            # TT 1 needs ECAP.DT; SAGAW: 39-bit only
            return FR_CONTEXT_INVALID, fpd
        if addr >> MGAW:
            return FR_ADDRESS_BEYOND, fpd
        if tt == 2:
            return addr                            # pass-through
        table = lo & _PHYS
        for level in (3, 2, 1):
            shift = 12 + 9 * (level - 1)
            pte = self._read_q(table + ((addr >> shift) & 0x1FF) * 8)
            if pte is None:
                return FR_PAGING_ENTRY_ACCESS, fpd
            if not pte & (2 if write else 1):
                return (FR_WRITE if write else FR_READ), fpd
            page = pte & _PHYS
            if level == 1 or pte & 0x80:
                if level > 1 and page & ((1 << shift) - 1):
                    return FR_PAGING_RESERVED, fpd     # a large page's low address bits
                return (page & ~((1 << shift) - 1)) | (addr & ((1 << shift) - 1))
            table = page
        return FR_PAGING_ENTRY_ACCESS, fpd             # not reached

    # -- interrupt remapping -----------------------------------------------------------------
    def remap_msi(self, address: int, data: int,
                  source_id: Optional[int] = None) -> Optional[Tuple[int, int]]:
        """The compatibility-format (address, data) an MSI from requester ``source_id``
        (bus << 8 | devfn; None: not checked) turns into, or None if it is blocked (the fault
        recorded as the VT-d spec says)."""
        with self._lock:
            if not self._r(GSTS) & GSTS_IRES or not address & (1 << 4):
                return address, data
            handle = ((address >> 5) & 0x7FFF) | (((address >> 2) & 1) << 15)
            if address & (1 << 3):                 # SHV: the subhandle comes from the data
                handle = (handle + (data & 0xFFFF)) & 0xFFFF
            reason, entry = self._irte(handle, source_id)
            if reason:
                self.ir_faults += 1
                fpd = entry is not None and entry[0] & 2
                if not (fpd and reason in _FPD_QUALIFIED):
                    self._record(source_id or 0, reason, handle << 48, False)
                return None
            lo = entry[0]
            dest_mode = (lo >> 2) & 1
            redir_hint = (lo >> 3) & 1
            trigger = (lo >> 4) & 1
            delivery = (lo >> 5) & 7
            vector = (lo >> 16) & 0xFF
            dest = (lo >> 40) & 0xFF                # xAPIC mode: DST[15:8]
            addr = 0xFEE00000 | dest << 12 | redir_hint << 3 | dest_mode << 2
            return addr, vector | delivery << 8 | trigger << 15

    def _irte(self, handle: int, source_id: Optional[int]):
        """(0, (lo, hi)) for a usable IRTE, else (fault reason, entry or None)."""
        irta = self._irta
        if handle >= 1 << ((irta & 0xF) + 1):
            return FR_IR_INDEX_OVER, None
        raw = self._read((irta & ~0xFFF & _M64) + handle * 16, 16)
        if raw is None:
            return FR_IR_TABLE_ACCESS, None
        lo, hi = struct.unpack("<QQ", raw)
        if not lo & 1:
            return FR_IR_ENTRY_NOT_PRESENT, (lo, hi)
        if lo & ((7 << 12) | (0xFF << 24)) or hi >> 20:
            return FR_IR_IRTE_RESERVED, (lo, hi)
        svt, sq, sid = (hi >> 18) & 3, (hi >> 16) & 3, hi & 0xFFFF
        if source_id is not None and svt:
            if svt == 1:
                mask = (0xFFFF, 0xFFFB, 0xFFF9, 0xFFF8)[sq]
                ok = (source_id & mask) == (sid & mask)
            elif svt == 2:
                ok = (sid >> 8) <= (source_id >> 8) <= (sid & 0xFF)
            else:
                ok = False
            if not ok:
                return FR_IR_SID, (lo, hi)
        return 0, (lo, hi)

    def deliver_msi(self, address: int, data: int, source_id: Optional[int] = None) -> None:
        """Send a device's MSI on, remapped (see :meth:`remap_msi`); a blocked one is dropped."""
        out = self.remap_msi(address, data, source_id)
        if out is not None:
            self._msi(*out)
