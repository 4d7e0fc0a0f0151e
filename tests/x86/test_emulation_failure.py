"""KVM_EXIT_INTERNAL_ERROR in the guest's terms (issue 16, fault 7): on this host's KVM a
VEX-encoded instruction in ring 0 is one KVM's emulator cannot emulate; the run's detail names
RIP, the guest symbol and file:line, the CPU mode and the instruction decoded by iced-x86."""
import sys

import pytest

from pykvm import status
from pykvm.arch.x86 import decode
from pykvm.machine import Machine

from _elfguest import elf_guest
from _loops import LOOP_IDS, LOOPS

VEX = """
    mov rax, 1
    nop
bad_insn:
    vpxor xmm0, xmm0, xmm0
    hlt
"""
VEX32 = """
    mov eax, 1
bad_insn:
    vpxor xmm0, xmm0, xmm0
1:  jmp 1b
"""


def _emulation_failure(m):
    r = m.run(timeout=10)
    if r.exit != "INTERNAL_ERROR":
        pytest.skip(f"this host's KVM runs the VEX instruction (ended with {r.exit})")
    return r


@pytest.mark.parametrize("loop_cls", LOOPS, ids=LOOP_IDS)
def test_long_mode_failure_names_rip_symbol_line_mode_and_mnemonic(tmp_path, loop_cls):
    path = elf_guest(tmp_path, VEX)
    with Machine(path, loop=loop_cls) as m:
        r = _emulation_failure(m)
        assert r.exit_code == status.UNHANDLED_EXIT
        assert "\n" not in r.detail
        assert "could not emulate" in r.detail
        assert "RIP 0x200008" in r.detail                    # 7-byte mov, 1-byte nop
        assert "bad_insn+0x0" in r.detail and "guest.S:" in r.detail
        assert "long mode (64-bit)" in r.detail
        assert "vpxor xmm0, xmm0, xmm0" in r.detail and "[c5 f9 ef c0]" in r.detail


def test_protected_mode_failure_on_the_pc_machine(tmp_path):
    path = elf_guest(tmp_path, VEX32, bits=32, text=0x100000, data=0x180000)
    with Machine(path) as m:
        assert m.platform.name == "pc"                    # a multiboot kernel: the pc
        r = _emulation_failure(m)
        assert "protected mode (32-bit)" in r.detail
        assert "vpxor xmm0, xmm0, xmm0" in r.detail and "bad_insn+0x0" in r.detail


def test_bytes_read_through_the_guest_page_tables_match_kvms(tmp_path):
    """Where KVM gives no instruction bytes, they are read at RIP through KVM_TRANSLATE."""
    path = elf_guest(tmp_path, VEX)
    with Machine(path) as m:
        _emulation_failure(m)
        v = m.vcpus[0]
        rip = v.get_regs().rip
        code = decode.read_guest_code(v, m.memory, rip, paging=True)
        assert code[:4] == bytes.fromhex("c5f9efc0")
        assert decode.disassemble(code, rip, 64) == ("vpxor xmm0, xmm0, xmm0", 4)


def test_without_the_decoder_the_bytes_are_given_in_hex(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "iced_x86", None)        # import iced_x86 fails
    path = elf_guest(tmp_path, VEX)
    with Machine(path) as m:
        r = _emulation_failure(m)
        assert "RIP 0x200008" in r.detail and "long mode" in r.detail
        assert "bytes c5 f9 ef c0" in r.detail and "\n" not in r.detail


# Real mode, CS != 0 (a flat image at 0x8000): mov ax, 0x800; mov ds, ax;
# ljmp 0x790:0x70a; mov al, 'R'; out 0xe9, al; vpxor xmm0, xmm0, [bx+si]; hlt
REAL_MODE_CS = bytes.fromhex("b800088ed8ea0a079007b052e6e9c5f9ef00f4")


def test_real_mode_failure_names_cs_ip_and_the_linear_address():
    with Machine(REAL_MODE_CS, flat_addr=0x8000, flat_mode="real") as m:
        r = m.run(timeout=10)
    assert r.console == b"R"
    assert r.exit_code == status.UNHANDLED_EXIT, r.detail
    assert "at CS:IP 0x790:0x70e (linear 0x800e)" in r.detail
    assert "in real mode (16-bit): vpxor xmm0, xmm0, [bx+si] [c5 f9 ef 00]" in r.detail


# The VEX instruction straddles a page boundary: KVM's own bytes stop at the end of the first
# page, so the rest is read from guest memory (across the boundary) and the whole is decoded.
VEX32_ACROSS_PAGES = """
    jmp bad_insn
    .balign 4096
    .skip 4094, 0x90
bad_insn:
    vpxor xmm3, xmm2, xmm1
1:  jmp 1b
"""


@pytest.mark.parametrize("bits", [32, 64])
def test_an_instruction_across_a_page_boundary_is_decoded_whole(tmp_path, bits):
    if bits == 32:
        path = elf_guest(tmp_path, VEX32_ACROSS_PAGES, bits=32, text=0x100000, data=0x180000)
    else:
        path = elf_guest(tmp_path, VEX32_ACROSS_PAGES.replace("1:  jmp 1b", "hlt"))
    with Machine(path) as m:
        r = _emulation_failure(m)
    assert "bad_insn+0x0" in r.detail
    assert "vpxor xmm3, xmm2, xmm1 [c5 e9 ef d9]" in r.detail, r.detail
