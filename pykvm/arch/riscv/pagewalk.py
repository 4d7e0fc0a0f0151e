"""A RISC-V guest's own address translation, walked in software: guest-virtual address (GVA) to
guest-physical address (GPA) for the satp modes Bare, Sv39, Sv48 and Sv57.

RISC-V KVM has no KVM_TRANSLATE, so a debugger that is handed GVAs (gdb's ``m``/``M`` packets,
breakpoints at a symbol) walks the guest's page tables itself, as the RISC-V privileged ISA
describes it ("Supervisor-Level ISA", "Virtual-Memory System": "Virtual Address Translation
Process", steps 1-8, and the Sv39/Sv48/Sv57 sections; Svnapot for 64 KiB NAPOT pages). For a
VS-mode guest under KVM the satp the walk starts from is the guest's vsatp, which the vCPU's CSR
ONE_REG ``csr.satp`` returns; the tables it points to are read from guest RAM at GPAs (KVM's
G-stage maps those, one to one, onto the VM's memory slots).

The walk is what the hart does for an access with no permission check and no A/D update: a
debugger reads through an execute-only page and must not mark pages accessed or dirty. The leaf's
permission bits come back in :class:`Translation` for a caller that wants to check them.

Every table read goes through ``memory.read(gpa, n)`` (for a Machine: its bounds-checked guest
memory, which raises :class:`~pykvm.errors.GuestMemoryError` outside RAM), so a guest's page
tables can never make the VMM read outside the VM's buffers; a table outside RAM is a failed
walk (None), never an exception.
"""
from __future__ import annotations

from dataclasses import dataclass

from ...errors import GuestMemoryError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import List, Optional, Protocol, Tuple

    class GuestPhysicalMemory(Protocol):
        def read(self, gpa: int, n: int) -> bytes: ...

PAGE_SIZE = 4096
PTE_SIZE = 8
# satp.MODE (RV64: bits 63:60) -> (name, levels); 0 is Bare (no translation)
SATP_MODES = {0: ("Bare", 0), 8: ("Sv39", 3), 9: ("Sv48", 4), 10: ("Sv57", 5)}
SATP_PPN_MASK = (1 << 44) - 1
PTE_V, PTE_R, PTE_W, PTE_X, PTE_U, PTE_G, PTE_A, PTE_D = (1 << b for b in range(8))
PTE_PPN_SHIFT = 10
PTE_PPN_MASK = (1 << 44) - 1          # bits 53:10
PTE_RESERVED = ((1 << 7) - 1) << 54   # bits 60:54, reserved for future standard use
PTE_PBMT = 3 << 61                    # Svpbmt memory type (PMA=0, NC=1, IO=2; 3 reserved)
PTE_N = 1 << 63                       # Svnapot
MASK64 = (1 << 64) - 1


@dataclass(frozen=True)
class Translation:
    """One successful walk: ``gpa`` (the guest-physical address of the byte at the GVA),
    ``page_size`` in bytes (4 KiB, 64 KiB NAPOT, 2 MiB, 1 GiB, 512 GiB or 256 TiB; for Bare the
    whole 2^64 space is one "page", reported as 0), ``level`` of the leaf (0 = 4 KiB page; -1
    for Bare), ``pte`` the leaf PTE (0 for Bare) and ``mode`` the satp mode's name."""
    gpa: int
    page_size: int
    level: int
    pte: int
    mode: str

    @property
    def readable(self) -> bool:
        """R: loads may read the page (Bare: always)."""
        return self.level < 0 or bool(self.pte & PTE_R)

    @property
    def writable(self) -> bool:
        """W: stores may write the page (Bare: always)."""
        return self.level < 0 or bool(self.pte & PTE_W)

    @property
    def executable(self) -> bool:
        """X: the hart may fetch instructions from the page (Bare: always)."""
        return self.level < 0 or bool(self.pte & PTE_X)

    @property
    def user(self) -> bool:
        """U: a U-mode page (S-mode reaches it only with sstatus.SUM, never executes it)."""
        return bool(self.pte & PTE_U)

    @property
    def page_remaining(self) -> int:
        """Bytes from the GVA to the end of its page (for Bare: to the end of the 2^64 space)."""
        if self.page_size == 0:
            return (1 << 64) - self.gpa
        return self.page_size - (self.gpa & (self.page_size - 1))


def satp_mode(satp: int) -> str:
    """The name of satp's MODE field (RV64: bits 63:60): Bare, Sv39, Sv48, Sv57, or
    ``"reserved(N)"`` for an encoding the spec reserves (a hart would not accept it)."""
    mode = (satp >> 60) & 0xF
    return SATP_MODES[mode][0] if mode in SATP_MODES else f"reserved({mode})"


def _read_pte(memory: GuestPhysicalMemory, gpa: int) -> Optional[int]:
    try:
        raw = memory.read(gpa, PTE_SIZE)
    except GuestMemoryError:
        return None
    if len(raw) != PTE_SIZE:
        return None
    return int.from_bytes(raw, "little")


def walk(memory: GuestPhysicalMemory, satp: int, gva: int) -> Optional[Translation]:
    """Translate ``gva`` (a 64-bit guest-virtual address) under ``satp`` (the guest's satp /
    vsatp value: MODE 63:60, ASID 59:44, root PPN 43:0).

    Returns a :class:`Translation`, or None where the hart would raise a page fault whatever
    the access type, or where the walk leaves RAM: a reserved satp mode, a non-canonical GVA
    (bits 63..VALEN-1 not all equal), a PTE with V=0, W without R, reserved bits 60:54 set, the
    reserved PBMT value 3, N on a level other than 0 or with a PPN that is not a 64 KiB NAPOT
    encoding, D/A/U/N/PBMT set on a non-leaf PTE, a pointer PTE at level 0, a misaligned
    superpage, or a table whose GPA ``memory`` cannot read. Never raises for guest data: at
    most five 8-byte reads of ``memory``. (privileged ISA, "Virtual Address Translation
    Process")"""
    gva &= MASK64
    mode = (satp >> 60) & 0xF
    if mode not in SATP_MODES:
        return None
    name, levels = SATP_MODES[mode]
    if levels == 0:
        return Translation(gpa=gva, page_size=0, level=-1, pte=0, mode=name)
    va_bits = 12 + 9 * levels
    top = gva >> (va_bits - 1)
    if top not in (0, (1 << (64 - va_bits + 1)) - 1):
        return None
    table = (satp & SATP_PPN_MASK) * PAGE_SIZE
    for level in range(levels - 1, -1, -1):
        vpn = (gva >> (12 + 9 * level)) & 0x1FF
        pte = _read_pte(memory, table + vpn * PTE_SIZE)
        if pte is None:
            return None
        if not pte & PTE_V or (pte & PTE_W and not pte & PTE_R):
            return None
        if pte & PTE_RESERVED or (pte & PTE_PBMT) == PTE_PBMT:
            return None
        ppn = (pte >> PTE_PPN_SHIFT) & PTE_PPN_MASK
        if not pte & (PTE_R | PTE_X):                   # a pointer to the next level
            if pte & (PTE_D | PTE_A | PTE_U | PTE_N | PTE_PBMT) or level == 0:
                return None
            table = ppn * PAGE_SIZE
            continue
        # a leaf
        shift = 12 + 9 * level
        if pte & PTE_N:                                 # Svnapot: only 64 KiB at level 0
            if level != 0 or ppn & 0xF != 0x8:
                return None
            size = 1 << 16
            base = (ppn & ~0xF) << 12
            return Translation(gpa=base | (gva & (size - 1)), page_size=size, level=0,
                               pte=pte, mode=name)
        low = (1 << shift) - 1
        if (ppn << 12) & low:                           # a misaligned superpage
            return None
        return Translation(gpa=(ppn << 12) | (gva & low), page_size=1 << shift, level=level,
                           pte=pte, mode=name)
    return None                                         # not reached: level 0 returns above


def translate(memory: GuestPhysicalMemory, satp: int, gva: int) -> Optional[int]:
    """The GPA of ``gva`` under ``satp``, or None where :func:`walk` fails."""
    t = walk(memory, satp, gva)
    return None if t is None else t.gpa


def ranges(memory: GuestPhysicalMemory, satp: int, gva: int, length: int) -> List[Tuple[int, int]]:
    """The guest-physical pieces ``[(gpa, n), ...]`` of the ``length``-byte GVA range at
    ``gva``, split where a page ends, in order; they stop at the first page that does not
    translate, so their sizes add up to less than ``length`` when the range runs into an
    unmapped page (a debugger answers the part it has, as gdb's ``m`` packet allows).
    Raises ValueError for a negative ``length``."""
    if length < 0:
        raise ValueError(f"negative length {length}")
    out: List[Tuple[int, int]] = []
    done = 0
    while done < length:
        va = (gva + done) & MASK64
        t = walk(memory, satp, va)
        if t is None:
            break
        n = min(length - done, t.page_remaining)
        if out and out[-1][0] + out[-1][1] == t.gpa:
            out[-1] = (out[-1][0], out[-1][1] + n)
        else:
            out.append((t.gpa, n))
        done += n
    return out
