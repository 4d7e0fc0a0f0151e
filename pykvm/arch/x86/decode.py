"""An x86 vCPU's failure in the guest's terms: where it was (RIP, the guest symbol and
file:line), in which CPU mode, and the instruction there, decoded.

Used for ``KVM_EXIT_INTERNAL_ERROR`` (Linux's Documentation/virt/kvm/api.rst,
"KVM_EXIT_INTERNAL_ERROR"): for the EMULATION sub-error (KVM's instruction emulator met an
instruction it cannot emulate) KVM may hand over the instruction bytes itself (``flags`` bit 0,
``KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES``: ``data[0]`` = flags, then ``insn_size``
(1 byte) and 15 bytes of instruction); otherwise the bytes are read from guest memory at
CS.base + RIP, translated through the guest's page tables by KVM (KVM_TRANSLATE) when paging
is on.

The decoder is iced-x86 (a dependency of pykvm on x86_64 hosts); where it is missing the
instruction is given as hex bytes.
"""
from __future__ import annotations

from ...abi import INTERNAL_ERROR_SUBERRORS

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Optional, Tuple

MAX_INSN = 15                        # bytes: the longest x86 instruction (SDM vol. 2, 2.3.11)
PAGE = 4096
FLAG_INSTRUCTION_BYTES = 1 << 0      # KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES
CR0_PE, CR0_PG = 1 << 0, 1 << 31
EFER_LMA = 1 << 10
RFLAGS_VM = 1 << 17

_SUBERROR_TEXT = {
    "EMULATION": "KVM could not emulate the instruction",
    "SIMUL_EX": "KVM met an exception while delivering another (simultaneous exceptions)",
    "DELIVERY_EV": "KVM could not deliver an event (an exception or interrupt) to the guest",
    "UNEXPECTED_EXIT_REASON": "the hardware exited for a reason KVM does not expect",
}
_SUBERRORS = {v: k for k, v in INTERNAL_ERROR_SUBERRORS.items()}


def cpu_mode(cr0: int, efer: int, cs_l: int, cs_db: int, rflags: int = 0) -> Tuple[str, int]:
    """(mode name, code size in bits) from the vCPU's control state (SDM vol. 3, 2.2 "Modes of
    operation"): "real" (CR0.PE = 0), "virtual-8086" (EFLAGS.VM), "long" (EFER.LMA and CS.L),
    "compat" (EFER.LMA, CS.L = 0; 32- or 16-bit by CS.D) or "protected" (32- or 16-bit by
    CS.D)."""
    if not cr0 & CR0_PE:
        return "real", 16
    if rflags & RFLAGS_VM:
        return "virtual-8086", 16
    if efer & EFER_LMA:
        if cs_l:
            return "long", 64
        return "compat", 32 if cs_db else 16
    return "protected", 32 if cs_db else 16


def kvm_insn_bytes(suberror: int, data) -> Optional[bytes]:
    """The instruction bytes KVM put in an EMULATION internal error's data (``data[0]`` =
    flags with bit 0 set, then ``insn_size`` and up to 15 bytes), or None."""
    if _SUBERRORS.get(suberror) != "EMULATION" or len(data) < 3:
        return None
    if not data[0] & FLAG_INSTRUCTION_BYTES:
        return None
    raw = int(data[1]).to_bytes(8, "little") + int(data[2]).to_bytes(8, "little")
    n = raw[0]
    if not 1 <= n <= MAX_INSN:
        return None
    return raw[1:1 + n]


def read_guest_code(vcpu, memory, linear: int, paging: bool, n: int = MAX_INSN) -> bytes:
    """Up to ``n`` bytes at guest-linear ``linear``: through KVM_TRANSLATE page by page when
    ``paging``, else linear = physical; stops at the first page that is not mapped or not RAM
    (so it may return fewer bytes, or none)."""
    out = b""
    addr = linear & ((1 << 64) - 1)
    while len(out) < n:
        take = min(n - len(out), PAGE - (addr & (PAGE - 1)))
        gpa = vcpu.translate(addr) if paging else addr
        if gpa is None:
            break
        try:
            out += memory.read(gpa, take)
        except Exception:                  # noqa: BLE001 — not RAM (MMIO, nothing)
            break
        addr = (addr + take) & ((1 << 64) - 1)
    return out


# one-byte opcodes of IN/OUT (SDM vol. 2A/2B "IN", "OUT"), by (is_out, byte access, port in DX)
_PIO_OPCODES = {
    (False, True, False): 0xE4, (False, False, False): 0xE5,   # IN AL/eAX, imm8
    (True, True, False): 0xE6, (True, False, False): 0xE7,     # OUT imm8, AL/eAX
    (False, True, True): 0xEC, (False, False, True): 0xED,     # IN AL/eAX, DX
    (True, True, True): 0xEE, (True, False, True): 0xEF,       # OUT DX, AL/eAX
}
OPSIZE_PREFIX = 0x66


def port_io_length(code_before: bytes, *, port: int, size: int, is_out: bool, bits: int) -> int:
    """How many bytes before a return address the non-string IN/OUT instruction that made an
    I/O exit starts, given the bytes that end there (``code_before``, at least 3 of them where
    the guest has them). ``port``/``size`` (1, 2 or 4 bytes)/``is_out``: the exit's;
    ``bits``: the code segment's size (16, 32, 64; :func:`cpu_mode`).

    The instruction is ``[66] opcode [imm8]``: the DX form (one byte, EC-EF) or, for ports
    below 256, the imm8 form (two bytes, E4-E7, then the port). The two can only be confused
    for ports 0xEC-0xEF (``E4 EC`` is ``in al, 0xec`` and also a byte 0xE4 then ``in al,
    dx``); there both readings are refused with :class:`ValueError`. The operand-size prefix (0x66) is counted when the access size needs it
    (16-bit accesses in 32/64-bit code, 32-bit ones in 16-bit code); any other prefix
    (segment, REX) changes nothing a non-string IN/OUT does and is left out, so executing
    from the returned start repeats the same access. Raises :class:`ValueError` when the
    bytes do not end in such an instruction (string I/O, code changed under the exit)."""
    if size not in (1, 2, 4) or bits not in (16, 32, 64):
        raise ValueError(f"no IN/OUT of {size} bytes in {bits}-bit code")
    byte = size == 1
    need_prefix = not byte and (size == 2) != (bits == 16)
    dx_op = _PIO_OPCODES[(is_out, byte, True)]
    imm_op = _PIO_OPCODES[(is_out, byte, False)]
    n = len(code_before)
    imm_form = port < 0x100 and n >= 2 and code_before[-2] == imm_op and code_before[-1] == port
    dx_form = n >= 1 and code_before[-1] == dx_op
    if imm_form and dx_form:
        raise ValueError(f"the bytes {code_before[-2:].hex(' ')} read as either form of the "
                         f"instruction for port {port:#x}")
    if imm_form:
        length = 2
    elif dx_form:
        length = 1
    else:
        raise ValueError(f"the bytes before the return address ({code_before.hex(' ')}) end "
                         f"in no {'OUT' if is_out else 'IN'} of {size} bytes at port {port:#x}")
    if need_prefix:
        if n < length + 1 or code_before[-length - 1] != OPSIZE_PREFIX:
            raise ValueError(f"an {size}-byte port access in {bits}-bit code needs the "
                             f"operand-size prefix, and it is not there ({code_before.hex(' ')})")
        length += 1
    return length


def disassemble(code: bytes, address: int, bits: int) -> Tuple[str, int]:
    """(text, length) of the first instruction in ``code`` at ``address`` for a ``bits``-bit
    code segment (16, 32 or 64), decoded by iced-x86 (Intel syntax): e.g.
    ("vpxor xmm0, xmm0, xmm0", 4). Without iced-x86, or for bytes that do not form a whole
    valid instruction, the text is the bytes in hex and the length 0.

    iced-x86 is an ordinary CPython extension; capstone's binding is not used on x86 because it
    loads its library with RTLD_DEEPBIND, which the ASan runtime of pykvm's sanitized runs
    refuses (the process dies)."""
    hexed = code.hex(" ") if code else "(no bytes)"
    try:
        import iced_x86
    except ImportError:
        return f"bytes {hexed}", 0
    if not code:
        return f"bytes {hexed}", 0
    insn = iced_x86.Decoder(bits, code, ip=address & ((1 << 64) - 1)).decode()
    if insn.code == iced_x86.Code.INVALID:
        return f"undecodable bytes {hexed}", 0
    fmt = iced_x86.Formatter(iced_x86.FormatterSyntax.INTEL)
    fmt.space_after_operand_separator = True
    return fmt.format(insn), insn.len


def _where(symbols, vcpu, linear: int, paging: bool) -> str:
    """The symbol (and file:line) at guest-linear ``linear``: the image's link addresses are
    linear ones, unless the guest runs its code at another virtual address than it was linked
    for (a kernel mapped high, linked low), where the physical address KVM_TRANSLATE gives is
    looked up too; "" when neither names a symbol."""
    if symbols is None:
        return ""
    where = symbols.describe(linear)
    if not where and paging:
        try:
            gpa = vcpu.translate(linear)
        except Exception:                  # noqa: BLE001 — best effort: no symbol then
            gpa = None
        if gpa is not None and gpa != linear:
            where = symbols.describe(gpa)
    return where


def describe_internal_error(vcpu, memory, ex, symbols=None) -> str:
    """One line for a KVM_EXIT_INTERNAL_ERROR ``ex`` of ``vcpu`` (stopped, not running): what
    KVM says went wrong, at RIP (CS:IP and the linear address in real and virtual-8086 mode,
    the linear address too where CS has a base; the symbol and file:line from ``symbols``, a
    :class:`pykvm.symbols.Symbols`, looked up by linear address), in which CPU mode, and the instruction there decoded with
    its bytes, e.g. ``KVM could not emulate the instruction at RIP 0x200008 (bad_insn+0x0,
    g.S:8) in long mode (64-bit): vpxor xmm0, xmm0, xmm0 [c5 f9 ef c0]``. Raises
    :class:`~pykvm.errors.KvmError` when the vCPU's registers cannot be read."""
    regs = vcpu.get_regs()
    sregs = vcpu.get_sregs()
    rip = int(regs.rip)
    mode, bits = cpu_mode(int(sregs.cr0), int(sregs.efer), int(sregs.cs.l), int(sregs.cs.db),
                          int(regs.rflags))
    if bits < 64:
        rip &= 0xFFFFFFFF if bits == 32 else 0xFFFF
    sub = int(ex.suberror)
    data = ex.data
    code = kvm_insn_bytes(sub, data)
    base = 0 if bits == 64 else int(sregs.cs.base)
    linear = (base + rip) & ((1 << 64) - 1)
    paging = bool(sregs.cr0 & CR0_PG)
    insn, n = disassemble(code, rip, bits) if code else ("", 0)
    if not n:
        # KVM's own bytes stop where its fetch stopped (at the end of a page, say): read the
        # instruction from guest memory, across the page boundary, and decode that instead
        mem_code = read_guest_code(vcpu, memory, linear, paging)
        mem_insn, mem_n = disassemble(mem_code, rip, bits)
        if mem_n or not code:
            code, insn, n = mem_code, mem_insn, mem_n
    shown = code[:n] if n else code
    where = _where(symbols, vcpu, linear, paging)
    name = _SUBERRORS.get(sub, f"SUBERROR_{sub}")
    what = _SUBERROR_TEXT.get(name, f"KVM internal error {name}")
    if mode in ("real", "virtual-8086"):
        at = f"CS:IP {int(sregs.cs.selector):#x}:{rip:#x} (linear {linear:#x})"
    elif base:
        at = f"RIP {rip:#x} (CS base {base:#x}, linear {linear:#x})"
    else:
        at = f"RIP {rip:#x}"
    line = (f"{what} at {at}" + (f" ({where})" if where else "")
            + f" in {mode} mode ({bits}-bit): {insn}")
    if n:
        line += f" [{shown.hex(' ')}]"
    if name != "EMULATION" and data:
        line += f"; KVM data {[hex(x) for x in data]}"
    return line
