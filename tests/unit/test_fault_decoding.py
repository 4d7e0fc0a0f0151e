"""Pure parts of issue 16's faults 1, 7 and 8: CPU modes and KVM's instruction bytes (x86), the
RISC-V page-table walk and decoder, guest symbols, the classification of host resource
failures, the SBI debug console answering a bad buffer with an SBI error, and the RISC-V
device-tree space growing with the harts."""
import errno
import struct
import subprocess

import pytest

from pykvm import errors
from pykvm.arch.riscv import insn as rv
from pykvm.platform import riscv_virt as rvp
from pykvm.arch.riscv import sbi
from pykvm.arch.riscv.extensions import SBI_ERR_INVALID_PARAM, SBI_EXT_DBCN, SBI_SUCCESS
from pykvm.arch.x86 import decode as x86
from pykvm.memory import GuestMemory
from pykvm.boot.symbols import Symbols


# -- x86 -------------------------------------------------------------------------------------
@pytest.mark.parametrize("cr0,efer,l,db,rflags,want", [
    (0x10, 0, 0, 0, 0, ("real", 16)),
    (0x11, 0, 0, 1, 0, ("protected", 32)),
    (0x11, 0, 0, 0, 0, ("protected", 16)),
    (0x11, 0, 0, 1, 1 << 17, ("virtual-8086", 16)),
    (0x80000011, 0x500, 1, 0, 0, ("long", 64)),
    (0x80000011, 0x500, 0, 1, 0, ("compat", 32)),
    (0x80000011, 0x500, 0, 0, 0, ("compat", 16)),
])
def test_cpu_mode_follows_cr0_efer_and_cs(cr0, efer, l, db, rflags, want):  # noqa: E741 — CS.L
    assert x86.cpu_mode(cr0, efer, l, db, rflags) == want


def test_kvm_instruction_bytes_from_the_emulation_failure_data():
    # as this host's KVM reported a VEX vpxor: flags=1, insn_size=15, then the bytes
    data = (0x1, 0xF4C0EFF9C50F, 0x0, 0x1000)
    code = x86.kvm_insn_bytes(1, data)
    assert code[:5] == bytes.fromhex("c5f9efc0f4") and len(code) == 15
    assert x86.kvm_insn_bytes(1, (0, 0xF4C0EFF9C50F, 0)) is None     # flag clear
    assert x86.kvm_insn_bytes(2, data) is None                        # not EMULATION
    assert x86.kvm_insn_bytes(1, (1, 0x10, 0)) is None                # size 16 > 15


def test_x86_disassembly_per_code_size():
    assert x86.disassemble(bytes.fromhex("c5f9efc0"), 0x1000, 64) == ("vpxor xmm0, xmm0, xmm0", 4)
    assert x86.disassemble(bytes.fromhex("b801000000"), 0, 32) == ("mov eax, 1", 5)
    assert x86.disassemble(bytes.fromhex("b80100"), 0, 16) == ("mov ax, 1", 3)
    text, n = x86.disassemble(b"", 0, 64)
    assert n == 0 and "no bytes" in text


# -- RISC-V ----------------------------------------------------------------------------------
BASE = 0x80000000


class Ram:
    """Guest RAM of ``size`` bytes at BASE; reads outside it fail as GuestMemory's do."""

    def __init__(self, size=1 << 20):
        self.buf = bytearray(size)

    def read(self, gpa, n):
        off = gpa - BASE
        if off < 0 or off + n > len(self.buf):
            raise errors.GuestMemoryError(f"{gpa:#x} is not RAM")
        return bytes(self.buf[off:off + n])

    def put(self, gpa, data):
        self.buf[gpa - BASE:gpa - BASE + len(data)] = data


def _pte(pa, leaf):
    return ((pa >> 12) << 10) | rv.PTE_V | ((rv.PTE_R | rv.PTE_X) if leaf else 0)


def test_sv39_walk_4k_page_and_superpage():
    ram = Ram()
    root, mid, leaf = BASE + 0x1000, BASE + 0x2000, BASE + 0x3000
    va = 0xFFFFFFC000201000                     # a sign-extended Sv39 address
    vpn = [(va >> (12 + 9 * i)) & 0x1FF for i in range(3)]
    ram.put(root + 8 * vpn[2], struct.pack("<Q", _pte(mid, False)))
    ram.put(mid + 8 * vpn[1], struct.pack("<Q", _pte(leaf, False)))
    ram.put(leaf + 8 * vpn[0], struct.pack("<Q", _pte(BASE + 0x5000, True)))
    satp = (8 << 60) | (root >> 12)
    assert rv.translate(ram, satp, va + 0x123) == BASE + 0x5123
    # a 2 MiB superpage one level up
    va2 = 0x40000000 + 0x1234
    ram.put(root + 8 * ((va2 >> 30) & 0x1FF), struct.pack("<Q", _pte(mid, False)))
    ram.put(mid + 8 * ((va2 >> 21) & 0x1FF), struct.pack("<Q", _pte(BASE + 0x200000, True)))
    assert rv.translate(ram, satp, va2) == BASE + 0x201234
    # invalid: no PTE, non-canonical, a table outside RAM, a misaligned superpage
    assert rv.translate(ram, satp, 0x7F000000) is None
    assert rv.translate(ram, satp, 0x0000008000000000) is None
    assert rv.translate(ram, (8 << 60) | 0x10, va) is None
    ram.put(mid + 8 * ((va2 >> 21) & 0x1FF), struct.pack("<Q", _pte(BASE + 0x201000, True)))
    assert rv.translate(ram, satp, va2) is None
    assert rv.translate(ram, 0, 0x1234) == 0x1234                     # Bare
    assert rv.translate(ram, 3 << 60, 0x1234) is None                  # reserved mode


def test_riscv_fetch_and_decode_full_and_compressed():
    ram = Ram()
    ram.put(BASE, bytes.fromhex("13050000") + bytes.fromhex("0145"))  # addi a0,zero,0; c.li
    assert rv.fetch_instruction(ram, 0, BASE) == bytes.fromhex("13050000")
    assert rv.fetch_instruction(ram, 0, BASE + 4) == bytes.fromhex("0145")
    assert rv.fetch_instruction(ram, 0, 0x1000) == b""
    text, n = rv.disassemble(bytes.fromhex("13050000"), BASE)
    assert n == 4 and text.startswith(("li a0", "addi a0", "mv a0"))
    assert rv.disassemble(bytes.fromhex("0145"), BASE)[1] == 2


# -- symbols ---------------------------------------------------------------------------------
def test_symbols_and_lines_of_an_elf(tmp_path):
    src = tmp_path / "g.S"
    src.write_text(".globl _start\n_start:\n  nop\n  nop\nsecond:\n  ret\n")
    obj, elf = tmp_path / "g.o", tmp_path / "g.elf"
    subprocess.run(["as", "--64", "-g", "-o", str(obj), str(src)], check=True)
    subprocess.run(["ld", "-nostdlib", "-static", "-Ttext=0x200000", "-e", "_start", "-o",
                    str(elf), str(obj)], check=True)
    s = Symbols.from_image(str(elf))
    assert s.describe(0x200000) == "_start+0x0, g.S:3"
    assert s.describe(0x200001) == "_start+0x1, g.S:4"
    assert s.describe(0x200002) == "second+0x0, g.S:6"
    assert s.describe(0x300000) == ""                    # past every section
    assert Symbols.from_image(b"bytes").describe(0x200000) == ""
    assert Symbols.from_image(str(src)).describe(0) == ""    # not an ELF


# -- host resource failures ------------------------------------------------------------------
def test_host_resource_classification():
    e = errors.host_resource_error(RuntimeError("can't start new thread"))
    assert isinstance(e, errors.HostResourceError) and e.resource == "threads"
    e = errors.host_resource_error(OSError(errno.EMFILE, "Too many open files", "/dev/kvm"))
    assert e.resource == "file descriptors" and "/dev/kvm" in str(e) and "ulimit -n" in str(e)
    assert errors.host_resource_error(OSError(errno.ENOMEM, "no")).resource == "memory"
    assert errors.host_resource_error(MemoryError()).resource == "memory"
    assert errors.host_resource_error(ValueError("x")) is None
    assert errors.host_resource_error(RuntimeError("other")) is None
    wrapped = ValueError("cannot read image")
    wrapped.__cause__ = OSError(errno.ENFILE, "Too many open files in system")
    assert errors.host_resource_error(wrapped).resource == "file descriptors"


@pytest.mark.parametrize("err,cls,resource", [
    (errno.EMFILE, errors.KvmFdLimit, "file descriptors"),
    (errno.ENFILE, errors.KvmFdLimit, "file descriptors"),
    (errno.ENOMEM, errors.KvmNoMemory, "memory"),
])
def test_kvm_errors_of_host_limits_are_host_resource_errors(err, cls, resource):
    e = errors.kvm_error("KVM_CREATE_VCPU", err, "id=3")
    assert type(e) is cls and isinstance(e, errors.HostResourceError)
    assert isinstance(e, errors.KvmError) and e.resource == resource


def test_kvm_run_efault_names_the_gpa():
    e = errors.GuestRamUnbacked("KVM_RUN", errno.EFAULT, "vcpu 0", gpa=0x7000)
    assert isinstance(e, errors.HostMemoryError) and isinstance(e, errors.KvmFault)
    assert "host could not back guest RAM at GPA 0x7000 (memory limit?)" in str(e)


# -- SBI debug console -----------------------------------------------------------------------
class _SbiExit:
    def __init__(self, fid, args):
        self.extension_id, self.function_id, self.args = SBI_EXT_DBCN, fid, args
        self.ret = None

    def set_return(self, error, value=0):
        self.ret = (error, value)


@pytest.mark.parametrize("addr,num", [(0xFFFFFFFFFFFFF000, 16), (0x1000, 1),
                                      (0xFFFFFFFFFFFFFFFF, 2)])
def test_dbcn_write_of_a_buffer_outside_ram_returns_an_sbi_error(addr, num):
    out = bytearray()
    s = sbi.SbiServices(GuestMemory(), console=out)        # a VM's memory with no RAM yet
    ex = _SbiExit(sbi.DBCN_WRITE, (num, addr, 0, 0, 0, 0))
    assert s.handle(ex) == "dbcn"
    assert ex.ret == (SBI_ERR_INVALID_PARAM, 0) and out == b""
    ok = _SbiExit(sbi.DBCN_WRITE_BYTE, (0x41, 0, 0, 0, 0, 0))
    s.handle(ok)                                           # and the console goes on
    assert ok.ret == (SBI_SUCCESS, 0) and out == b"A"


def test_riscv_dtb_space_grows_with_the_harts():
    assert rvp.dtb_space(1) == rvp.DTB_SPACE == rvp.dtb_space(16)
    assert rvp.dtb_space(64) >= (32 << 10) + 64 * rvp.DTB_SPACE_PER_HART
    assert rvp.dtb_space(1024) % rvp.DTB_SPACE == 0


def test_symbol_of_a_kernel_run_at_another_virtual_address_than_linked():
    """A kernel linked low and run mapped high: no symbol at the linear RIP, so the physical
    address the guest's page tables give it is looked up."""
    from pykvm.arch.x86.decode import _where

    class Syms:
        def describe(self, addr):
            return "hi+0x0" if addr == 0x101FFD else ""

    class Cpu:
        def translate(self, linear):
            return linear - 0xFFFFFFFF80000000

    assert _where(Syms(), Cpu(), 0xFFFFFFFF80101FFD, paging=True) == "hi+0x0"
    assert _where(Syms(), Cpu(), 0xFFFFFFFF80101FFD, paging=False) == ""
    assert _where(Syms(), Cpu(), 0x101FFD, paging=True) == "hi+0x0"
    assert _where(None, Cpu(), 0x101FFD, paging=True) == ""
