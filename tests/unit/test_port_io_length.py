"""Finding the IN/OUT instruction that ends at a return address (what the pc machine needs to
make a vCPU repeat its first PIT access on backends that move RIP past it before exiting)."""
import pytest
from hypothesis import given, strategies as st

from pykvm.arch.x86.decode import port_io_length


@pytest.mark.parametrize("code, kw, want", [
    (b"\x90\xe6\x43", dict(port=0x43, size=1, is_out=True, bits=64), 2),       # out 0x43, al
    (b"\x90\x90\xee", dict(port=0x43, size=1, is_out=True, bits=64), 1),       # out dx, al
    (b"\x90\xe4\x61", dict(port=0x61, size=1, is_out=False, bits=32), 2),      # in al, 0x61
    (b"\x66\xe5\x61", dict(port=0x61, size=2, is_out=False, bits=64), 3),      # in ax, 0x61
    (b"\x90\x66\xed", dict(port=0x61, size=2, is_out=False, bits=32), 2),      # in ax, dx
    (b"\x90\xe5\x61", dict(port=0x61, size=2, is_out=False, bits=16), 2),      # 16-bit: no prefix
    (b"\x66\xe7\x40", dict(port=0x40, size=4, is_out=True, bits=16), 3),       # 16-bit: out 0x40, eax
    (b"\x66\xe6\x43", dict(port=0x43, size=1, is_out=True, bits=64), 2),       # 66 is no part of a byte OUT
    (b"\x48\xef", dict(port=0x1234, size=4, is_out=True, bits=64), 1),         # REX left out
])
def test_finds_the_instruction(code, kw, want):
    assert port_io_length(code, **kw) == want


@pytest.mark.parametrize("code, kw", [
    (b"\x90\x90\x6e", dict(port=0x43, size=1, is_out=True, bits=64)),          # outsb: string I/O
    (b"\x90\xe6\x42", dict(port=0x43, size=1, is_out=True, bits=64)),          # another port
    (b"\x90\xe4\x43", dict(port=0x43, size=1, is_out=True, bits=64)),          # an IN, not an OUT
    (b"\x90\xe5\x61", dict(port=0x61, size=2, is_out=False, bits=64)),         # prefix missing
    (b"\xe4\xec", dict(port=0xEC, size=1, is_out=False, bits=64)),             # reads both ways
    (b"", dict(port=0x43, size=1, is_out=True, bits=64)),
    (b"\xee", dict(port=0x43, size=8, is_out=True, bits=64)),                   # no 8-byte IN/OUT
    (b"\xee", dict(port=0x43, size=1, is_out=True, bits=8)),
])
def test_refuses_what_is_not_one(code, kw):
    with pytest.raises(ValueError):
        port_io_length(code, **kw)


@given(before=st.binary(max_size=4), port=st.integers(0, 0xFFFF), size=st.sampled_from([1, 2, 4]),
       is_out=st.booleans(), bits=st.sampled_from([16, 32, 64]), dx=st.booleans())
def test_any_encoding_is_found_whatever_comes_before(before, port, size, is_out, bits, dx):
    dx = dx or port > 0xFF
    op = (0xEC if dx else 0xE4) + (2 if is_out else 0) + (0 if size == 1 else 1)
    insn = bytes([op]) if dx else bytes([op, port])
    if size != 1 and (size == 2) != (bits == 16):
        insn = b"\x66" + insn
    code = before + insn
    dx_op = 0xEC + (2 if is_out else 0) + (0 if size == 1 else 1)
    imm_op = dx_op - 8
    # the one documented ambiguity: the last two bytes read both as "in/out imm8" and as a
    # byte then "in/out dx" (only for ports 0xEC-0xEF)
    ambiguous = len(code) >= 2 and code[-1] == dx_op == port and code[-2] == imm_op
    try:
        got = port_io_length(code, port=port, size=size, is_out=is_out, bits=bits)
    except ValueError:
        assert ambiguous
        return
    assert not ambiguous and got == len(insn)
