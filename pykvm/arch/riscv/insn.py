"""A RISC-V hart's failure in the guest's terms (the counterpart of :mod:`pykvm.arch.x86.decode`,
named ``insn`` because ``pykvm.arch.riscv.decode`` is the ONE_REG id decoder): the pc with the
guest symbol and file:line, the privilege mode and address translation, and the instruction at
pc, decoded.

RISC-V KVM has no KVM_TRANSLATE: the instruction is fetched through the guest's own page tables,
walked here as the privileged spec's "Virtual Address Translation Process" (RISC-V privileged
ISA, 12.3.2, for Sv39/Sv48/Sv57; satp.MODE 8/9/10, 0 = Bare), each table read from guest RAM
(the guest-physical addresses KVM's G-stage maps). The decoder is capstone (RV64GC); where it
is missing the instruction is given as hex bytes.
"""
from __future__ import annotations

from ...abi import INTERNAL_ERROR_SUBERRORS
from . import regs as _regs

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Optional, Tuple

PAGE = 4096
SATP_MODES = {0: ("bare", 0), 8: ("Sv39", 3), 9: ("Sv48", 4), 10: ("Sv57", 5)}
PTE_V, PTE_R, PTE_W, PTE_X = 1 << 0, 1 << 1, 1 << 2, 1 << 3
MODES = {_regs.KVM_RISCV_MODE_S: "S-mode", _regs.KVM_RISCV_MODE_U: "U-mode"}

_SUBERRORS = {v: k for k, v in INTERNAL_ERROR_SUBERRORS.items()}
_SUBERROR_TEXT = {
    "EMULATION": "KVM could not emulate the instruction",
}


def translate(memory, satp: int, va: int) -> Optional[int]:
    """The guest-physical address for virtual ``va`` under ``satp`` (RV64: MODE in bits
    63:60, root page number in 43:0), or None when the walk faults: an invalid or reserved
    PTE (V = 0, or W without R), a table outside RAM, a misaligned superpage, or a
    non-canonical address. Pure: ``memory.read(gpa, n)`` is all it uses; at most 5 reads."""
    mode = (satp >> 60) & 0xF
    if mode not in SATP_MODES:
        return None
    name, levels = SATP_MODES[mode]
    if levels == 0:
        return va
    va_bits = 12 + 9 * levels
    top = va >> (va_bits - 1)
    if top not in (0, (1 << (64 - va_bits + 1)) - 1):        # bits above must copy the top
        return None
    table = (satp & ((1 << 44) - 1)) * PAGE
    for level in range(levels - 1, -1, -1):
        vpn = (va >> (12 + 9 * level)) & 0x1FF
        try:
            pte = int.from_bytes(memory.read(table + vpn * 8, 8), "little")
        except Exception:                  # noqa: BLE001 — a table outside guest RAM
            return None
        if not pte & PTE_V or (pte & PTE_W and not pte & PTE_R):
            return None
        ppn = (pte >> 10) & ((1 << 44) - 1)
        if pte & (PTE_R | PTE_X):          # a leaf
            low = (1 << (12 + 9 * level)) - 1
            if (ppn << 12) & low:
                return None                # a misaligned superpage
            return (ppn << 12) | (va & low)
        table = ppn * PAGE
    return None


def fetch_instruction(memory, satp: int, pc: int) -> bytes:
    """The instruction at virtual ``pc``: 2 bytes for a compressed one (low bits != 0b11),
    else 4; fewer (or none) where a page of it cannot be fetched."""
    out = b""
    for part in (0, 2):
        gpa = translate(memory, satp, (pc + part) & ((1 << 64) - 1))
        if gpa is None:
            break
        try:
            out += memory.read(gpa, 2)
        except Exception:                  # noqa: BLE001 — not RAM
            break
        if part == 0 and out[0] & 3 != 3:
            break                          # a 16-bit (C extension) instruction
    return out


def disassemble(code: bytes, address: int) -> Tuple[str, int]:
    """(text, length) of the instruction in ``code`` at ``address`` (RV64GC, capstone), or
    its bytes in hex and length 0 without capstone or for bytes it cannot decode."""
    hexed = code.hex(" ") if code else "(no bytes)"
    try:
        import capstone
    except ImportError:
        return f"bytes {hexed}", 0
    try:
        md = capstone.Cs(capstone.CS_ARCH_RISCV,
                         capstone.CS_MODE_RISCV64 | capstone.CS_MODE_RISCVC)
        for insn in md.disasm(code, address):
            return f"{insn.mnemonic} {insn.op_str}".strip(), insn.size
    except capstone.CsError:
        pass
    return f"undecodable bytes {hexed}", 0


def describe_internal_error(vcpu, memory, ex, symbols=None) -> str:
    """One line for a KVM_EXIT_INTERNAL_ERROR ``ex`` of the (stopped) hart ``vcpu``: what
    KVM says went wrong, at pc (symbol and file:line from ``symbols``), in which privilege
    mode and translation mode, and the instruction there decoded with its bytes. Raises
    :class:`~pykvm.errors.KvmError` when the registers cannot be read."""
    pc = vcpu.get_one_reg(_regs.reg_id("core.regs.pc"))
    priv = MODES.get(vcpu.get_one_reg(_regs.reg_id("core.mode")), "unknown mode")
    satp = vcpu.get_one_reg(_regs.reg_id("csr.satp"))
    paging = SATP_MODES.get((satp >> 60) & 0xF, (f"satp mode {(satp >> 60) & 0xF}", 0))[0]
    code = fetch_instruction(memory, satp, pc)
    insn, n = disassemble(code, pc)
    where = symbols.describe(pc) if symbols is not None else ""
    sub = int(ex.suberror)
    name = _SUBERRORS.get(sub, f"SUBERROR_{sub}")
    what = _SUBERROR_TEXT.get(name, f"KVM internal error {name}")
    line = (f"{what} at pc {pc:#x}" + (f" ({where})" if where else "")
            + f" in {priv} ({paging}): {insn}")
    if n:
        line += f" [{code[:n].hex(' ')}]"
    if name != "EMULATION" and ex.data:
        line += f"; KVM data {[hex(x) for x in ex.data]}"
    return line
