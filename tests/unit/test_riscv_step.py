"""The RISC-V single-step decoder (pykvm.arch.riscv.step.next_pc) on instructions the GNU
RISC-V assembler encodes: each case assembles a snippet with labels, reads the bytes back and
checks the decoder's next pc against where the label says the hart goes."""
import re
import shutil
import subprocess

import pytest

from pykvm.arch.riscv import step

AS = shutil.which("riscv64-linux-gnu-as")
NM = shutil.which("riscv64-linux-gnu-nm")
OBJCOPY = shutil.which("riscv64-linux-gnu-objcopy")
needs_as = pytest.mark.skipif(not (AS and NM and OBJCOPY),
                              reason="no riscv64-linux-gnu binutils on this host")


def assemble(tmp_path, source: str, rvc: bool):
    """Bytes of the .text of ``source`` (at address 0) and its labels' offsets."""
    src = tmp_path / "t.S"
    src.write_text((".option rvc\n" if rvc else ".option norvc\n") + ".text\n" + source + "\n")
    obj, raw = tmp_path / "t.o", tmp_path / "t.bin"
    march = "rv64gc" if rvc else "rv64g"
    subprocess.run([AS, f"-march={march}", "-o", str(obj), str(src)], check=True)
    subprocess.run([OBJCOPY, "-O", "binary", "-j", ".text", str(obj), str(raw)], check=True)
    out = subprocess.run([NM, str(obj)], check=True, capture_output=True, text=True).stdout
    labels = {m.group(2): int(m.group(1), 16)
              for m in re.finditer(r"^([0-9a-f]+) [tT] (\w+)$", out, re.M)}
    return raw.read_bytes(), labels


def decode_at(code: bytes, off: int, base: int, regs: dict, sepc=None) -> int:
    length = step.insn_length(int.from_bytes(code[off:off + 2], "little"))
    insn = int.from_bytes(code[off:off + length], "little")
    return step.next_pc(insn, base + off, lambda n: regs.get(n, 0),
                        (lambda: sepc) if sepc is not None else None)


BASE = 0x8020_0000


@needs_as
def test_jumps_and_branches(tmp_path):
    code, lab = assemble(tmp_path, """
    at_jal: jal ra, far
    at_beq: beq a0, a1, far
    at_bne: bne a0, a1, back
    at_blt: blt a0, a1, far
    at_bgeu: bgeu a0, a1, far
    at_jalr: jalr ra, 12(t0)
    at_plain: addi a0, a0, 1
    back: nop
    .skip 1000
    far: nop
    """, rvc=False)
    # a0 == a1: beq taken, bne not, blt not (equal), bgeu taken
    r = {10: 5, 11: 5, 5: BASE + 0x101}
    assert decode_at(code, lab["at_jal"], BASE, r) == BASE + lab["far"]
    assert decode_at(code, lab["at_beq"], BASE, r) == BASE + lab["far"]
    assert decode_at(code, lab["at_bne"], BASE, r) == BASE + lab["at_bne"] + 4
    assert decode_at(code, lab["at_blt"], BASE, r) == BASE + lab["at_blt"] + 4
    assert decode_at(code, lab["at_bgeu"], BASE, r) == BASE + lab["far"]
    # jalr clears bit 0 of rs1 + imm
    assert decode_at(code, lab["at_jalr"], BASE, r) == (BASE + 0x101 + 12) & ~1
    assert decode_at(code, lab["at_plain"], BASE, r) == BASE + lab["at_plain"] + 4
    # a0 = -1, a1 = 1: signed less, unsigned greater; a backward bne
    r = {10: (1 << 64) - 1, 11: 1}
    assert decode_at(code, lab["at_blt"], BASE, r) == BASE + lab["far"]
    assert decode_at(code, lab["at_bgeu"], BASE, r) == BASE + lab["far"]
    code2, lab2 = assemble(tmp_path, "x: nop\nat: bne a0, a1, x\n", rvc=False)
    assert decode_at(code2, lab2["at"], BASE, r) == BASE + lab2["x"]


@needs_as
def test_compressed_control_transfers(tmp_path):
    code, lab = assemble(tmp_path, """
    top: c.nop
    at_cj: c.j fwd
    at_cbeqz: c.beqz s0, fwd
    at_cbnez: c.bnez a5, top
    at_cjr: c.jr a2
    at_cjalr: c.jalr t1
    at_cadd: c.add a0, a1
    at_cmv: c.mv a0, a1
    at_caddiw: c.addiw a0, 1
    at_ebreak: c.ebreak
    .skip 200
    fwd: c.nop
    """, rvc=True)
    for name in ("at_cj", "at_cbeqz", "at_cbnez", "at_cjr", "at_cjalr", "at_cadd", "at_cmv",
                 "at_caddiw", "at_ebreak"):
        assert step.insn_length(code[lab[name]]) == 2, name
    r = {8: 0, 15: 3, 12: 0x9000_0003, 6: 0x8000_1000}
    assert decode_at(code, lab["at_cj"], BASE, r) == BASE + lab["fwd"]
    assert decode_at(code, lab["at_cbeqz"], BASE, r) == BASE + lab["fwd"]        # s0 == 0
    assert decode_at(code, lab["at_cbnez"], BASE, r) == BASE + lab["top"]        # a5 != 0
    assert decode_at(code, lab["at_cjr"], BASE, r) == 0x9000_0002
    assert decode_at(code, lab["at_cjalr"], BASE, r) == 0x8000_1000
    for name in ("at_cadd", "at_cmv", "at_caddiw", "at_ebreak"):
        assert decode_at(code, lab[name], BASE, r) == BASE + lab[name] + 2, name
    r = {8: 7, 15: 0}
    assert decode_at(code, lab["at_cbeqz"], BASE, r) == BASE + lab["at_cbeqz"] + 2
    assert decode_at(code, lab["at_cbnez"], BASE, r) == BASE + lab["at_cbnez"] + 2


@needs_as
def test_sret_breakpoints_and_wraparound(tmp_path):
    code, lab = assemble(tmp_path, "a: sret\n.option push\n.option norvc\nb: ebreak\n.option pop\n"
                         "c: c.ebreak\nd: j a\n", rvc=True)
    assert decode_at(code, lab["a"], BASE, {}, sepc=0x8020_1234) == 0x8020_1234
    assert decode_at(code, lab["a"], BASE, {}) == BASE + 4         # no sepc given: falls through
    assert code[lab["b"]:lab["b"] + 4] == step.EBREAK
    assert code[lab["c"]:lab["c"] + 2] == step.C_EBREAK
    assert step.breakpoint_for(code[lab["b"]]) == step.EBREAK
    assert step.breakpoint_for(code[lab["c"]]) == step.C_EBREAK
    # a jump backwards from near address 0 wraps modulo 2^64
    base = (2 - lab["d"]) % (1 << 64)
    assert decode_at(code, lab["d"], base, {}) == (base + lab["a"]) % (1 << 64) > 1 << 63


def test_length_encoding_and_branch_conditions():
    assert [step.insn_length(x) for x in (0x0001, 0x0013, 0x001F, 0x003F, 0x007F)] == [2, 4, 6, 8, 0]
    assert step.next_pc(0x0000_001F, 0x1000, lambda n: 0) == 0x1006         # a 48-bit encoding
    assert step.branch_taken(2, 0, 0) is None and step.branch_taken(3, 1, 1) is None
    m = (1 << 64) - 1
    assert step.branch_taken(4, m, 0) is True and step.branch_taken(6, m, 0) is False
    assert step.branch_taken(5, 0, m) is True and step.branch_taken(7, 0, m) is False
