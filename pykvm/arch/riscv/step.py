"""Where a RISC-V hart goes after one instruction: the decoder behind a debugger's emulated
single step.

RISC-V KVM has no single-step (it accepts KVM_GUESTDBG_SINGLESTEP and ignores it; the
Sdtrig/Sdext debug trigger modules are not given to the VMM): with KVM_GUESTDBG_ENABLE an
``ebreak`` in the guest exits to userspace (KVM_EXIT_DEBUG) instead of trapping into the guest. A debugger steps one
instruction by planting a temporary ``ebreak`` where the instruction at pc leads and running
until it is hit. :func:`next_pc` says where that is: for a conditional branch it evaluates the
condition from the registers, so one temporary breakpoint is always enough.

Encodings from the RISC-V unprivileged ISA (RV32I/RV64I "Control Transfer Instructions",
"Base Instruction-Length Encoding", and the "C" extension's control-transfer instructions, RV64
quadrant map: on RV64 funct3 001 of quadrant 1 is C.ADDIW, not C.JAL). ``sret`` continues at
sepc (privileged ISA, "Trap-Return Instructions"). Everything else falls through to pc + its
length; a trap the instruction takes (a page fault, an ecall the SBI handles in place) is not
followed (see docs/gdb.md).
"""
from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Callable, Optional

MASK64 = (1 << 64) - 1
EBREAK = (0x00100073).to_bytes(4, "little")     # ebreak
C_EBREAK = (0x9002).to_bytes(2, "little")       # c.ebreak
SRET = 0x10200073


def insn_length(low: int) -> int:
    """The length in bytes of the instruction whose first 16-bit parcel is ``low`` (unprivileged
    ISA, "Expanded Instruction-Length Encoding"): 2 (bits 1:0 != 11), 4 (bits 4:2 != 111), 6
    (bits 5:0 = 011111), 8 (bits 6:0 = 0111111); longer encodings give 0 (reserved / unknown)."""
    if low & 0x3 != 0x3:
        return 2
    if low & 0x1C != 0x1C:
        return 4
    if low & 0x3F == 0x1F:
        return 6
    if low & 0x7F == 0x3F:
        return 8
    return 0


def breakpoint_for(first_parcel: int) -> bytes:
    """The breakpoint instruction to plant over the instruction whose first parcel is
    ``first_parcel``: ``c.ebreak`` over a compressed one (a hart that decodes it has C), else
    the 4-byte ``ebreak`` (the same length as or shorter than what it replaces)."""
    return C_EBREAK if insn_length(first_parcel) == 2 else EBREAK


def _sext(value: int, bits: int) -> int:
    sign = 1 << (bits - 1)
    return (value & (sign - 1)) - (value & sign)


def _bit(x: int, hi: int, lo: int) -> int:
    return (x >> lo) & ((1 << (hi - lo + 1)) - 1)


def _signed(v: int) -> int:
    v &= MASK64
    return v - (1 << 64) if v >> 63 else v


def branch_taken(funct3: int, a: int, b: int) -> Optional[bool]:
    """Whether a BRANCH instruction with ``funct3`` (BEQ 0, BNE 1, BLT 4, BGE 5, BLTU 6, BGEU 7)
    is taken for rs1 = ``a``, rs2 = ``b`` (64-bit values); None for the reserved funct3 2, 3."""
    a &= MASK64
    b &= MASK64
    if funct3 == 0:
        return a == b
    if funct3 == 1:
        return a != b
    if funct3 == 4:
        return _signed(a) < _signed(b)
    if funct3 == 5:
        return _signed(a) >= _signed(b)
    if funct3 == 6:
        return a < b
    if funct3 == 7:
        return a >= b
    return None


def next_pc(insn: int, pc: int, xreg: Callable[[int], int],
            sepc: Optional[Callable[[], int]] = None) -> int:
    """The address of the instruction the hart executes after ``insn`` (its bits, 16 for a
    compressed instruction, else 32; e.g. ``int.from_bytes(fetched, "little")``) at GVA
    ``pc``, for RV64GC.

    ``xreg(n)``: the value of integer register xn (1..31; x0 is never asked). ``sepc()``: the
    sepc CSR, asked only for ``sret`` (None: treat sret as falling through). Control transfers
    (JAL, JALR, BEQ..BGEU, C.J, C.JR, C.JALR, C.BEQZ, C.BNEZ) give their target; JALR and
    C.JR/C.JALR clear bit 0. Anything else, including a reserved encoding, is pc + its
    length (2/4/6/8; 4 for an unknown length). The result is taken modulo 2^64."""

    def x(n: int) -> int:
        return 0 if n == 0 else xreg(n) & MASK64

    length = insn_length(insn & 0xFFFF) or 4
    if length == 2:
        return _next_compressed(insn & 0xFFFF, pc, x)
    if length != 4:
        return (pc + length) & MASK64
    opcode = insn & 0x7F
    if opcode == 0x6F:                                  # JAL
        imm = (_bit(insn, 31, 31) << 20 | _bit(insn, 19, 12) << 12
               | _bit(insn, 20, 20) << 11 | _bit(insn, 30, 21) << 1)
        return (pc + _sext(imm, 21)) & MASK64
    if opcode == 0x67 and _bit(insn, 14, 12) == 0:      # JALR
        return (x(_bit(insn, 19, 15)) + _sext(insn >> 20, 12)) & MASK64 & ~1
    if opcode == 0x63:                                  # BRANCH
        taken = branch_taken(_bit(insn, 14, 12), x(_bit(insn, 19, 15)), x(_bit(insn, 24, 20)))
        if taken:
            imm = (_bit(insn, 31, 31) << 12 | _bit(insn, 7, 7) << 11
                   | _bit(insn, 30, 25) << 5 | _bit(insn, 11, 8) << 1)
            return (pc + _sext(imm, 13)) & MASK64
    if insn & 0xFFFFFFFF == SRET and sepc is not None:
        return sepc() & MASK64
    return (pc + 4) & MASK64


def _next_compressed(c: int, pc: int, x: Callable[[int], int]) -> int:
    quadrant, funct3 = c & 0x3, _bit(c, 15, 13)
    if quadrant == 1 and funct3 == 5:                   # C.J
        imm = (_bit(c, 12, 12) << 11 | _bit(c, 11, 11) << 4 | _bit(c, 10, 9) << 8
               | _bit(c, 8, 8) << 10 | _bit(c, 7, 7) << 6 | _bit(c, 6, 6) << 7
               | _bit(c, 5, 3) << 1 | _bit(c, 2, 2) << 5)
        return (pc + _sext(imm, 12)) & MASK64
    if quadrant == 1 and funct3 in (6, 7):              # C.BEQZ, C.BNEZ
        v = x(8 + _bit(c, 9, 7))
        if (v == 0) == (funct3 == 6):
            imm = (_bit(c, 12, 12) << 8 | _bit(c, 11, 10) << 3 | _bit(c, 6, 5) << 6
                   | _bit(c, 4, 3) << 1 | _bit(c, 2, 2) << 5)
            return (pc + _sext(imm, 9)) & MASK64
    if quadrant == 2 and funct3 == 4:
        rs1, rs2 = _bit(c, 11, 7), _bit(c, 6, 2)
        if rs2 == 0 and rs1 != 0:                       # C.JR (bit 12 = 0), C.JALR (bit 12 = 1)
            return x(rs1) & ~1 & MASK64
    return (pc + 2) & MASK64
