"""A RISC-V hart's failure in the guest's terms (the counterpart of :mod:`pykvm.arch.x86.decode`,
named ``insn`` because ``pykvm.arch.riscv.decode`` is the ONE_REG id decoder): the pc with the
guest symbol and file:line, the privilege mode and address translation, and the instruction at
pc, decoded.

RISC-V KVM has no KVM_TRANSLATE: the instruction is fetched through the guest's own page tables
(:func:`pykvm.arch.riscv.pagewalk.translate`, the walk the gdb stub uses too). The decoder is capstone (RV64GC); where it
is missing the instruction is given as hex bytes.
"""
from __future__ import annotations

from ...abi import INTERNAL_ERROR_SUBERRORS
from . import regs as _regs
from .pagewalk import PTE_R, PTE_V, PTE_W, PTE_X, SATP_MODES, translate  # noqa: F401 (re-exported)

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Tuple

PAGE = 4096
MODES = {_regs.KVM_RISCV_MODE_S: "S-mode", _regs.KVM_RISCV_MODE_U: "U-mode"}

_SUBERRORS = {v: k for k, v in INTERNAL_ERROR_SUBERRORS.items()}
_SUBERROR_TEXT = {
    "EMULATION": "KVM could not emulate the instruction",
}


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
