"""Random-guest cases of ``python -m pykvm.fuzz``: :func:`generate_case` and the instruction
stream it draws code from.

A case is a pure function of (seed, index, modes, max_vcpus, deadline): random bytes or a random
but valid x86 instruction stream (:class:`InstructionStream`: moves, ALU, port and string I/O,
MMIO stores, HLT, CLI/STI, UD2, INT3, RDMSR/WRMSR, CPUID, moves to control registers,
LGDT/LIDT, far jumps, mode switches ...), random general registers, flags and entry points, one
to four vCPUs, in real, protected or long mode. Its JSON form (:func:`case_to_json`) is what a
reproducer keeps.

:class:`InstructionStream` follows the mode switches it emits itself; which ports, MMIO
addresses and RAM addresses its I/O templates use comes from :meth:`InstructionStream.port`,
:meth:`InstructionStream.mmio_addr` and :meth:`InstructionStream.ram_addr`, which a subclass
overrides (the device fuzzer, :mod:`pykvm.fuzz.device_generator`, aims them at the PC machine's
devices).
"""
import math
import random
import struct
from typing import List, Optional

from ..arch.x86 import layout as L, modes as cpu_modes

MODES = ("real", "protected", "long")
CASE_FORMAT = "pykvm-fuzz-case/1"
DEFAULT_DEADLINE = 0.05         # seconds each guest may run

# ---- the guest-physical layout every case uses ------------------------------------------------
# Boot structures come from pykvm.arch.x86.layout (GDT 0x1000, PML4 0x2000, PDPT 0x3000, page
# directories 0x10000, stacks 0x30000). The fuzzer adds its own tables in free reserved space:
RAM_SIZE = 2 << 20
DESC_ADDR = 0x0F00            # pseudo-descriptors for LGDT/LIDT (see descriptors())
IDT32_ADDR = 0x4000           # 256 32-bit gates
LONG_GDT_ADDR = 0x4800        # a copy of the long-mode GDT, for protected -> long switches
IDT64_ADDR = 0x5000           # 256 64-bit gates
REAL_IMAGE = 0x8000           # real-mode code (CS = 0)
HIGH_IMAGE = 0x100000         # protected / long mode code
ROM_ADDR = 0x400000           # an optional read-only slot (guest writes to it exit as MMIO)
ROM_SIZE = 0x4000
PML4 = L.PML4_ADDR            # what the stream's mode switches load into CR3

D_GDT32 = DESC_ADDR + 0x00    # 6 bytes: the boot GDT at 0x1000
D_GDT64 = DESC_ADDR + 0x10    # 10 bytes: the long GDT copy (64-bit LGDT form)
D_LGDT32 = DESC_ADDR + 0x20   # 6 bytes: the long GDT copy (32-bit LGDT form)
D_IDT32 = DESC_ADDR + 0x30
D_IDT64 = DESC_ADDR + 0x40
D_IVT = DESC_ADDR + 0x50
D_JUNK = DESC_ADDR + 0x60
assert D_JUNK + 0x20 <= L.GDT_ADDR     # the descriptor block fits under the boot GDT

PORTS = (0x3F8, 0x3F9, 0x3FA, 0x3FB, 0x3FC, 0x3FD, 0x3FE, 0x3FF, 0xE9, 0xF4, 0x20, 0x21, 0xA0,
         0xA1, 0x40, 0x41, 0x42, 0x43, 0x60, 0x61, 0x64, 0x70, 0x71, 0x80, 0x92, 0xCF8, 0xCFC,
         0x1000, 0x510, 0x511, 0x402, 0xFFFF)
MSRS = (0x10, 0x1B, 0x3A, 0x48, 0x49, 0x10A, 0x174, 0x175, 0x176, 0x1D9, 0x277, 0x2FF, 0x6E0,
        0x802, 0x808, 0x80B, 0x830, 0xC0000080, 0xC0000081, 0xC0000082, 0xC0000084, 0xC0000100,
        0xC0000101, 0xC0000102, 0xC0000103, 0x11, 0x12, 0x4B564D00, 0x4B564D01, 0x4B564D02,
        0x4B564D03, 0x4B564D04, 0x4B564D05, 0x40000000, 0x40000001, 0xC0010015, 0xC0010117,
        0, 0xFFFFFFFF)
MMIO_ADDRS = (0xFEE00000, 0xFEE000B0, 0xFEE00300, 0xFEC00000, 0xFEC00010, 0xFED00000,
              0xE0000000, 0xFFFFF000, 0xFFFFFFF0, 0xA0000, RAM_SIZE, RAM_SIZE + 0x1000,
              ROM_ADDR, ROM_ADDR + 0x10, 0x80000000, 0xC0000000)
CR0_BITS = (1, 2, 4, 8, 0x10, 0x20, 0x10000, 0x40000, 0x20000000, 0x40000000, 0x80000000)
CR4_BITS = (1, 2, 4, 8, 0x10, 0x20, 0x40, 0x80, 0x100, 0x200, 0x400, 0x800, 0x1000, 0x2000,
            0x4000, 0x10000, 0x20000, 0x40000, 0x100000, 0x200000, 0x400000, 0x800000)
CPUID_LEAVES = (0, 1, 2, 4, 6, 7, 0xB, 0xD, 0x14, 0x1F, 0x40000000, 0x40000001, 0x80000000,
                0x80000001, 0x80000008, 0x8000001F)
SELECTORS = (0, 0x08, 0x10, 0x18, 0x20, 0x23, 0x2B, 0x33, 0x1000, 0xFFFF)


def blobs_to_json(blobs) -> list:
    """A case's ``blobs`` ((guest-physical address, bytes) pairs written into RAM before the
    run) as JSON-ready dicts ``{"gpa", "hex"}``."""
    return [{"gpa": gpa, "hex": bytes(data).hex()} for gpa, data in blobs]


def blobs_from_json(items) -> list:
    """The inverse of :func:`blobs_to_json`."""
    return [(b["gpa"], bytes.fromhex(b["hex"])) for b in items]


def le_bytes(value: int, n: int) -> bytes:
    """The low ``n`` bytes of ``value``, little-endian (an instruction's immediate or offset)."""
    return (value & ((1 << (8 * n)) - 1)).to_bytes(n, "little")


def edge_value(r, size: int, *, small_below: float = 0.6) -> int:
    """A ``size``-byte value a hostile guest would write, drawn with ``r`` (random.Random):
    0, all-ones, one bit set, a small number (up to ``small_below`` of the draws, cumulative) or
    random bits."""
    k = r.random()
    if k < 0.2:
        v = 0
    elif k < 0.35:
        v = -1
    elif k < 0.5:
        v = 1 << r.randrange(8 * size)
    elif k < small_below:
        v = r.randrange(0x100)
    else:
        v = r.getrandbits(8 * size)
    return v & ((1 << (8 * size)) - 1)


class InstructionStream:
    """A random x86 instruction stream for one code image. ``bits`` (16/32/64) follows the
    mode switches the stream itself performs."""

    def __init__(self, rng: random.Random, bits: int, base: int, *, page_tables: bool):
        self.r = rng
        self.bits = bits
        self.base = base                 # linear address of code[0]
        self.code = bytearray()
        self.bounds: List[int] = []      # offsets where an instruction starts
        self.page_tables = page_tables

    # -- building blocks ------------------------------------------------------------------
    def emit(self, *parts) -> None:
        self.bounds.append(len(self.code))
        for p in parts:
            self.code += bytes(p) if not isinstance(p, int) else bytes([p & 0xFF])

    def here(self, extra: int = 0) -> int:
        return self.base + len(self.code) + extra

    def value(self, width: int) -> int:
        r = self.r
        k = r.random()
        if k < 0.15:
            v = 0
        elif k < 0.30:
            v = r.randrange(0x100)
        elif k < 0.50:
            v = r.choice((self.ram_addr(), self.base + r.randrange(0x800),
                          self.mmio_addr(), r.choice((0x1000, 0x2000, 0x7000, 0x31000))))
        elif k < 0.58:
            v = r.choice(PORTS)
        elif k < 0.66:
            v = r.choice(MSRS)
        elif k < 0.76:
            v = (1 << r.randrange(width)) + r.choice((-1, 0, 1))
        elif k < 0.82:
            v = -1
        else:
            v = r.getrandbits(width)
        return v & ((1 << width) - 1)

    def reg(self) -> int:
        return self.r.randrange(16 if self.bits == 64 else 8)

    def rex(self, w=0, r=0, x=0, b=0) -> bytes:
        if self.bits != 64:
            return b""
        v = 0x40 | (w << 3) | ((r >> 3 & 1) << 2) | ((x >> 3 & 1) << 1) | (b >> 3 & 1)
        return bytes([v]) if v != 0x40 or self.r.random() < 0.1 else b""

    def opsize(self):
        """(prefix, operand bytes, REX.W) for a random operand size."""
        r = self.r.random()
        if self.bits == 64:
            if r < 0.45:
                return b"", 8, 1
            if r < 0.85:
                return b"", 4, 0
            return b"\x66", 2, 0
        normal = 2 if self.bits == 16 else 4
        if r < 0.8:
            return b"", normal, 0
        return b"\x66", 6 - normal, 0

    def modrm(self, reg: int, *, memory: Optional[bool] = None):
        """(rex.x source, rex.b source, bytes) of a ModRM (+SIB, displacement) operand.
        ``reg`` fills the reg field; the r/m side is a register or a memory operand."""
        r = self.r
        if memory is None:
            memory = r.random() < 0.5
        if not memory:
            rm = self.reg()
            return 0, rm, bytes([0xC0 | (reg & 7) << 3 | (rm & 7)])
        mod = r.choice((0, 0, 1, 2))
        rm = r.randrange(8)
        out = bytearray([mod << 6 | (reg & 7) << 3 | rm])
        xb, bb = 0, 0
        if self.bits == 16:
            if (mod == 0 and rm == 6) or mod == 2:
                out += le_bytes(self.value(16), 2)
            elif mod == 1:
                out += le_bytes(r.getrandbits(8), 1)
            return 0, 0, bytes(out)
        disp32 = (mod == 0 and rm == 5) or mod == 2
        if rm == 4:
            base, index = r.randrange(8), r.randrange(8)
            out.append(r.randrange(4) << 6 | index << 3 | base)
            if self.bits == 64:
                xb, bb = r.choice((0, 8)) | index, r.choice((0, 8)) | base
            if base == 5 and mod == 0:
                disp32 = True
        elif self.bits == 64:
            bb = r.choice((0, 8)) | rm
        if disp32:
            out += le_bytes(self.value(32), 4)
        elif mod == 1:
            out += le_bytes(r.getrandbits(8), 1)
        return xb, bb, bytes(out)

    def absolute(self, reg: int, addr: int) -> bytes:
        """A ModRM memory operand for the absolute address ``addr``."""
        if self.bits == 16:
            return bytes([0x06 | (reg & 7) << 3]) + le_bytes(addr, 2)
        if self.bits == 32:
            return bytes([0x05 | (reg & 7) << 3]) + le_bytes(addr, 4)
        return bytes([0x04 | (reg & 7) << 3, 0x25]) + le_bytes(addr, 4)     # SIB: no base, no index

    def load(self, reg: int, value: int) -> None:
        """mov r32, imm32 (a 66 prefix in 16-bit code; zero-extends in 64-bit code)."""
        pre = b"\x66" if self.bits == 16 else b""
        self.emit(pre, self.rex(b=reg), 0xB8 + (reg & 7), le_bytes(value, 4))

    # -- templates --------------------------------------------------------------------------
    def t_mov_imm(self):
        pre, size, w = self.opsize()
        reg = self.reg()
        self.emit(pre, self.rex(w=w, b=reg), 0xB8 + (reg & 7), le_bytes(self.value(8 * size), size))

    def t_alu(self):
        op = self.r.choice((0x00, 0x01, 0x02, 0x03, 0x08, 0x09, 0x0B, 0x11, 0x19, 0x21, 0x23,
                            0x29, 0x2B, 0x30, 0x31, 0x33, 0x38, 0x39, 0x3B, 0x84, 0x85, 0x86,
                            0x87, 0x88, 0x89, 0x8A, 0x8B, 0x8D))
        pre, _, w = self.opsize()
        reg = self.reg()
        xb, bb, m = self.modrm(reg)
        self.emit(pre, self.rex(w=w, r=reg, x=xb, b=bb), op, m)

    def t_alu_imm(self):
        pre, size, w = self.opsize()
        op, ext = self.r.choice(((0x81, None), (0x83, None), (0xC7, 0), (0xF7, 0), (0xF7, 2),
                                 (0xF7, 3), (0xF7, 4), (0xF7, 6), (0xF7, 7), (0xC1, None),
                                 (0xD1, None), (0xFF, 0), (0xFF, 1)))
        if ext is None:
            ext = self.r.randrange(8)
        xb, bb, m = self.modrm(ext)
        if op in (0x83, 0xC1):
            imm = le_bytes(self.r.getrandbits(8), 1)
        elif op in (0x81, 0xC7) or (op == 0xF7 and ext == 0):
            imm = le_bytes(self.value(32), min(size, 4))
        else:
            imm = b""
        self.emit(pre, self.rex(w=w, x=xb, b=bb), op, m, imm)

    def t_moffs(self):
        op = self.r.choice((0xA0, 0xA1, 0xA2, 0xA3))
        pre, _, w = self.opsize()
        n = {16: 2, 32: 4, 64: 8}[self.bits]
        addr = self.r.choice((self.value(32), self.r.choice(MMIO_ADDRS), self.r.randrange(RAM_SIZE)))
        self.emit(pre, self.rex(w=w), op, le_bytes(addr, n))

    def port(self) -> int:
        """An I/O port for the I/O templates (a subclass aims them elsewhere)."""
        return self.r.choice(PORTS) if self.r.random() < 0.7 else self.r.getrandbits(16)

    def mmio_addr(self) -> int:
        """A guest-physical address outside RAM for the MMIO templates."""
        return self.r.choice(MMIO_ADDRS)

    def ram_addr(self) -> int:
        """A guest-physical address in RAM (buffers of string instructions)."""
        return self.r.randrange(RAM_SIZE)

    def t_io(self):
        r = self.r
        k = r.random()
        size_pre = b"\x66" if r.random() < 0.3 else b""
        if k < 0.35:
            p = self.port() & 0xFF
            self.emit(size_pre, r.choice((0xE4, 0xE5, 0xE6, 0xE7)), p)
            return
        dx = (b"\x66" if self.bits != 16 else b"") + b"\xBA" + le_bytes(self.port(), 2)
        self.emit(dx)
        if k < 0.75:
            self.emit(size_pre, r.choice((0xEC, 0xED, 0xEE, 0xEF)))
            return
        # string I/O: rep ins/outs with a random count and buffer
        self.load(1, r.choice((0, 1, 2, 7, 16, 255, 4096, r.getrandbits(32))))
        self.load(r.choice((6, 7)), r.choice((self.base, self.ram_addr(), self.mmio_addr())))
        rep = b"\xF3" if r.random() < 0.8 else b""
        self.emit(rep, size_pre, r.choice((0x6C, 0x6D, 0x6E, 0x6F)))

    def t_mmio(self):
        r = self.r
        reg = r.choice((3, 6, 7))                            # [ebx], [esi], [edi]: no SIB/disp
        self.load(reg, self.mmio_addr() + r.randrange(0, 0x40, 4))
        a32 = b"\x67" if self.bits == 16 else b""
        pre, size, w = self.opsize()
        op = r.choice((0x89, 0x8B, 0x88, 0x8A, 0x01, 0x31, 0x85, 0xC7))
        if op == 0xC7:                                       # mov [reg], imm
            m, imm = bytes([reg]), le_bytes(r.getrandbits(32), min(size, 4))
        else:
            m, imm = bytes([r.randrange(8) << 3 | reg]), b""
        self.emit(a32, pre, self.rex(w=w), op, m, imm)

    def t_string(self):
        r = self.r
        self.load(1, r.choice((1, 3, 64, 1024, r.getrandbits(16))))
        self.load(7, r.choice((self.ram_addr(), self.mmio_addr(), self.base)))
        self.load(6, r.choice((self.ram_addr(), self.mmio_addr())))
        rep = r.choice((b"\xF3", b"\xF2", b""))
        self.emit(rep, r.choice((0xA4, 0xA5, 0xAA, 0xAB, 0xAC, 0xA6)))

    SIMPLE = ((0xF4,), (0xFA,), (0xFB,), (0x0F, 0x0B), (0xCC,), (0x90,), (0xF3, 0x90),
              (0x0F, 0x31), (0x0F, 0x01, 0xF9), (0x0F, 0x33), (0x0F, 0x01, 0xD0), (0x0F, 0x01, 0xD1),
              (0x0F, 0x01, 0xC1), (0x0F, 0x01, 0xD9), (0x0F, 0x09), (0x0F, 0x08), (0x0F, 0x06),
              (0x9C,), (0x9D,), (0xCF,), (0xCB,), (0xC3,), (0xF5,), (0xF8,), (0xFC,), (0xFD,),
              (0x0F, 0x34), (0x0F, 0x35), (0x0F, 0x05), (0x0F, 0x07), (0x0F, 0x01, 0xF8),
              (0x0F, 0x01, 0xC8), (0x0F, 0x01, 0xC9), (0x0F, 0xAE, 0xF0), (0xD7,),
              (0x0F, 0x01, 0xCA), (0x0F, 0x01, 0xCB), (0x0F, 0xAA), (0xF1,), (0xCE,), (0x0F, 0xA2),
              (0x0F, 0xC7, 0xF0), (0x0F, 0x01, 0xEE), (0x0F, 0x01, 0xEF), (0x0F, 0x0D, 0x08),
              (0x0F, 0x01, 0xDA), (0x0F, 0x01, 0xDF), (0x0F, 0x78, 0xC0), (0x0F, 0x01, 0xC4))

    def t_simple(self):
        self.emit(bytes(self.r.choice(self.SIMPLE)))

    def t_int(self):
        self.emit(0xCD, self.r.choice((0, 1, 3, 6, 8, 13, 14, 0x10, 0x13, 0x15, 0x20, 0x80,
                                       self.r.randrange(256))))

    def t_cpuid(self):
        self.load(0, self.r.choice(CPUID_LEAVES) if self.r.random() < 0.85 else self.r.getrandbits(32))
        self.load(1, self.r.choice((0, 1, 2)))
        self.emit(0x0F, 0xA2)

    def t_msr(self):
        r = self.r
        self.load(1, r.choice(MSRS) if r.random() < 0.85 else r.getrandbits(32))
        if r.random() < 0.5:
            self.emit(0x0F, 0x32)
        else:
            self.load(0, self.value(32))
            self.load(2, r.choice((0, 0, 0xFFFFFFFF, r.getrandbits(32))))
            self.emit(0x0F, 0x30)

    def t_cr(self):
        r = self.r
        cr = r.choice((0, 0, 3, 4, 4, 2, 8)) if r.random() < 0.95 else r.randrange(8)
        reg = r.randrange(8)
        if cr == 0:
            v = 0x11 | sum(b for b in CR0_BITS if r.random() < 0.3)
        elif cr == 4:
            v = sum(b for b in CR4_BITS if r.random() < 0.25)
        elif cr == 3:
            v = r.choice((0x2000, 0, r.randrange(RAM_SIZE) & ~0xFFF, self.value(32)))
        else:
            v = self.value(32)
        if r.random() < 0.4 and cr in (0, 4):      # read-modify-write, like real code does
            self.emit(0x0F, 0x20, 0xC0 | cr << 3 | reg)                         # mov reg, crN
            self.emit(b"\x66" if self.bits == 16 else b"", 0x81, 0xC8 | reg, le_bytes(v, 4))  # or
        else:
            self.load(reg, v)
        rexr = b"\x44" if cr == 8 and self.bits == 64 else b""
        to = r.random() < 0.8
        self.emit(rexr, 0x0F, 0x22 if to else 0x20, 0xC0 | (cr & 7) << 3 | reg)

    def t_dr(self):
        r = self.r
        self.emit(0x0F, r.choice((0x21, 0x23)), 0xC0 | r.randrange(8) << 3 | r.randrange(8))

    def t_descriptor_table(self):
        r = self.r
        ext = r.choice((2, 3, 2, 3, 0, 1, 7, 4, 6))   # lgdt, lidt, sgdt, sidt, invlpg, smsw, lmsw
        if ext in (4, 6) and r.random() < 0.5:
            self.emit(0x0F, 0x01, 0xC0 | ext << 3 | r.randrange(8))
            return
        if self.bits == 64:
            addr = r.choice((D_GDT64, D_IDT64, D_JUNK, D_IDT32, r.randrange(RAM_SIZE)))
        else:
            addr = r.choice((D_GDT32, D_IDT32, D_IVT, D_LGDT32, D_JUNK, r.randrange(0x10000)))
        pre = b"\x66" if self.bits == 16 and r.random() < 0.5 else b""
        self.emit(pre, 0x0F, 0x01, self.absolute(ext, addr))

    def t_segment(self):
        r = self.r
        reg = r.randrange(8)
        k = r.random()
        self.emit(b"\x66" if self.bits != 16 else b"", 0xB8 + reg, le_bytes(r.choice(SELECTORS), 2))
        if k < 0.6:
            self.emit(0x8E, 0xC0 | r.choice((0, 2, 3, 4, 5, 1)) << 3 | reg)    # mov sreg, r16
        else:
            self.emit(0x0F, 0x00, 0xC0 | r.choice((2, 3, 4, 5)) << 3 | reg)     # lldt/ltr/verr/verw

    def t_far(self):
        """A far jump (or push selector, push offset, far return) a little way ahead."""
        r = self.r
        sel = r.choice(SELECTORS[:5])
        skip = r.choice((0, 0, 0, 2, 16))
        n = 2 if self.bits == 16 else 4
        if self.bits == 64 or r.random() < 0.3:
            self.emit(0x6A, sel) if sel < 0x80 else self.emit(0x68, le_bytes(sel, n))
            ret = b"\x48\xCB" if self.bits == 64 else b"\xCB"
            self.emit(0x68, le_bytes(self.here(1 + n + len(ret)) + skip, n))
            self.emit(ret)
        else:
            self.emit(0xEA, le_bytes(self.here(1 + n + 2) + skip, n), le_bytes(sel, 2))

    def t_jump(self):
        r = self.r
        k = r.random()
        if k < 0.05:
            self.emit(0xEB, 0xFE)                                 # jmp $: spins until deadline
        elif k < 0.45:
            self.emit(r.choice((0xEB, 0x70 + r.randrange(16), 0xE2, 0xE3)), r.randrange(0, 12))
        elif k < 0.65 and self.bounds:
            back = r.choice(self.bounds[-8:])                     # a short backward loop
            rel = back - (len(self.code) + 2)
            if -128 <= rel:
                self.emit(0x70 + r.randrange(16), rel & 0xFF)
            else:
                self.emit(0x90)
        elif k < 0.85:
            n = 2 if self.bits == 16 else 4
            self.emit(r.choice((0xE8, 0xE9)), le_bytes(r.randrange(0, 16), n))
        else:
            xb, bb, m = self.modrm(r.choice((2, 4)))            # call/jmp r/m
            self.emit(self.rex(x=xb, b=bb), 0xFF, m)

    def t_stack(self):
        r = self.r
        reg = self.reg()
        k = r.random()
        if k < 0.4:
            self.emit(self.rex(b=reg), 0x50 + (reg & 7))
        elif k < 0.8:
            self.emit(self.rex(b=reg), 0x58 + (reg & 7))
        elif k < 0.9:
            self.emit(0xC8, le_bytes(r.getrandbits(16), 2), r.randrange(4))    # enter
        else:
            self.emit(0xC9)                                                # leave

    def t_misc_mem(self):
        r = self.r
        opc, ext = r.choice((((0x0F, 0xAE), 0), ((0x0F, 0xAE), 1), ((0x0F, 0xAE), 4),
                             ((0x0F, 0xAE), 5), ((0x0F, 0xAE), 7), ((0x0F, 0xC7), 1),
                             ((0x0F, 0x10), None), ((0x0F, 0x11), None), ((0x0F, 0x28), None),
                             ((0x0F, 0x57), None), ((0x0F, 0x18), 1), ((0x0F, 0xB1), None),
                             ((0x0F, 0xC0), None), ((0x0F, 0xB6), None), ((0x0F, 0xBF), None),
                             ((0x0F, 0xA3), None), ((0x0F, 0xAB), None), ((0x0F, 0xC8), None)))
        if opc == (0x0F, 0xC8):
            self.emit(0x0F, 0xC8 + r.randrange(8))                         # bswap
            return
        xb, bb, m = self.modrm(ext if ext is not None else r.randrange(8),
                               memory=ext is not None or None)
        lock = b"\xF0" if r.random() < 0.1 else b""
        self.emit(lock, self.rex(x=xb, b=bb), bytes(opc), m)

    def t_raw(self):
        n = self.r.randrange(1, 17)
        self.code += self.r.randbytes(n)            # not an instruction boundary

    def t_prefixes(self):
        n = self.r.randrange(1, 4)
        self.code += bytes(self.r.choice((0x66, 0x67, 0xF2, 0xF3, 0x2E, 0x3E, 0x26, 0x64, 0x65,
                                          0x36, 0xF0)) for _ in range(n))
        self.one(avoid_prefixes=True)

    def t_to_protected(self):
        """Real mode -> 32-bit protected mode through the boot GDT (stream continues in
        32-bit code)."""
        if self.bits != 16:
            return self.t_cr()
        self.emit(0xFA)
        self.emit(0x0F, 0x01, self.absolute(2, D_GDT32))           # lgdt [D_GDT32]
        self.emit(0x0F, 0x20, 0xC0)                                 # mov eax, cr0
        self.emit(0x0C, 0x01)                                       # or al, 1
        self.emit(0x0F, 0x22, 0xC0)                                 # mov cr0, eax
        self.emit(0x66, 0xEA, le_bytes(self.here(8), 4), le_bytes(0x08, 2))   # jmp dword 0x08:next
        self.bits = 32

    def t_to_long(self):
        """32-bit protected mode -> long mode (PAE, CR3 = the boot PML4, EFER.LME, paging, then
        a far jump through the long GDT copy)."""
        if self.bits != 32 or not self.page_tables:
            return self.t_cr()
        self.emit(0x0F, 0x20, 0xE0)                                 # mov eax, cr4
        self.emit(0x83, 0xC8, 0x20)                                 # or eax, PAE
        self.emit(0x0F, 0x22, 0xE0)                                 # mov cr4, eax
        self.emit(0xB8, le_bytes(PML4, 4))                               # mov eax, PML4
        self.emit(0x0F, 0x22, 0xD8)                                 # mov cr3, eax
        self.emit(0xB9, le_bytes(0xC0000080, 4))                         # mov ecx, EFER
        self.emit(0x0F, 0x32)                                       # rdmsr
        self.emit(0x0D, le_bytes(0x100, 4))                              # or eax, LME
        self.emit(0x0F, 0x30)                                       # wrmsr
        self.emit(0x0F, 0x01, self.absolute(2, D_LGDT32))           # lgdt [long GDT copy]
        self.emit(0x0F, 0x20, 0xC0)                                 # mov eax, cr0
        self.emit(0x0D, le_bytes(0x80000000, 4))                         # or eax, PG
        self.emit(0x0F, 0x22, 0xC0)                                 # mov cr0, eax
        self.emit(0xEA, le_bytes(self.here(7), 4), le_bytes(0x08, 2))         # jmp 0x08:next (64-bit)
        self.bits = 64

    def t_to_compat(self):
        """Long mode -> 32-bit compatibility mode (CS = the long GDT's 32-bit code segment)."""
        if self.bits != 64:
            return self.t_to_long()
        self.emit(0x6A, 0x18)                                       # push 0x18
        self.emit(0x68, le_bytes(self.here(5 + 2), 4))                   # push next
        self.emit(0x48, 0xCB)                                       # retfq
        self.bits = 32

    def t_debug_exit(self):
        self.emit(0xB0, self.r.randrange(256))                      # mov al, imm8
        self.emit(0xE6, 0xF4)                                       # out 0xf4, al

    def t_console(self):
        self.emit(0xB0, self.r.randrange(0x20, 0x7F))
        self.emit(0xE6, 0xE9) if self.r.random() < 0.5 else \
            self.emit(b"\x66" if self.bits != 16 else b"", 0xBA, le_bytes(0x3F8, 2), 0xEE)

    TEMPLATES = (
        (10, "t_mov_imm"), (10, "t_alu"), (6, "t_alu_imm"), (3, "t_moffs"), (9, "t_io"),
        (6, "t_mmio"), (3, "t_string"), (10, "t_simple"), (2, "t_int"), (3, "t_cpuid"),
        (4, "t_msr"), (5, "t_cr"), (1, "t_dr"), (4, "t_descriptor_table"), (3, "t_segment"),
        (2, "t_far"), (6, "t_jump"), (4, "t_stack"), (3, "t_misc_mem"), (5, "t_raw"),
        (2, "t_prefixes"), (1, "t_to_protected"), (1, "t_to_long"), (1, "t_to_compat"),
        (1, "t_debug_exit"), (1, "t_console"),
    )
    _NAMES = [n for _, n in TEMPLATES]
    _WEIGHTS = [w for w, _ in TEMPLATES]

    def one(self, avoid_prefixes: bool = False) -> None:
        name = self.r.choices(self._NAMES, self._WEIGHTS)[0]
        if avoid_prefixes and name == "t_prefixes":
            name = "t_alu"
        getattr(self, name)()

    def terminate(self) -> None:
        k = self.r.random()
        if k < 0.45:
            self.emit(0xF4)
        elif k < 0.6:
            self.t_debug_exit()
        elif k < 0.75:
            self.emit(0x0F, 0x0B)
        elif k < 0.8:
            self.emit(0xEB, 0xFE)
        # else: fall through into whatever follows the image


_GPRS = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
         "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")


# ================================================================================================
# Case generation
# ================================================================================================

def descriptors(rng: random.Random) -> bytes:
    """The pseudo-descriptor block at DESC_ADDR (see the D_* offsets)."""
    d = bytearray(0x80)
    struct.pack_into("<HI", d, 0x00, L.GDT_LIMIT, L.GDT_ADDR)
    struct.pack_into("<HQ", d, 0x10, L.GDT_LIMIT, LONG_GDT_ADDR)
    struct.pack_into("<HI", d, 0x20, L.GDT_LIMIT, LONG_GDT_ADDR)
    struct.pack_into("<HI", d, 0x30, 256 * 8 - 1, IDT32_ADDR)
    struct.pack_into("<HQ", d, 0x40, 256 * 16 - 1, IDT64_ADDR)
    struct.pack_into("<HI", d, 0x50, 0x3FF, 0)
    d[0x60:0x70] = rng.randbytes(16)
    return bytes(d)


def _gates(rng: random.Random, targets: List[int], wide: bool) -> bytes:
    """256 interrupt/trap gates (CS 0x08) whose handlers are ``targets`` (a few are junk)."""
    out = bytearray()
    for _ in range(256):
        if rng.random() < 0.05:
            out += rng.randbytes(16 if wide else 8)
            continue
        off = rng.choice(targets)
        typ = rng.choice((0x8E, 0x8E, 0x8F))
        lo = (off & 0xFFFF) | 0x08 << 16 | typ << 40 | ((off >> 16) & 0xFFFF) << 48
        out += struct.pack("<Q", lo)
        if wide:
            out += struct.pack("<Q", off >> 32)
    return bytes(out)


def _reg_value(rng: random.Random, wide: bool) -> int:
    k = rng.random()
    if k < 0.2:
        return 0
    if k < 0.4:
        return rng.randrange(0x10000)
    if k < 0.6:
        return rng.randrange(RAM_SIZE)
    if k < 0.75:
        return rng.choice(PORTS + MSRS + MMIO_ADDRS)
    if k < 0.9 or not wide:
        return rng.getrandbits(32)
    return rng.getrandbits(64)


def _rflags(rng: random.Random, mode: str) -> int:
    k = rng.random()
    if k < 0.01:
        return rng.getrandbits(64)                  # reserved bits and all
    f = 0x2
    for bit in (0, 2, 4, 6, 7, 10, 11):             # CF PF AF ZF SF DF OF
        if rng.random() < 0.3:
            f |= 1 << bit
    if rng.random() < 0.2:
        f |= 1 << 9                                 # IF
    if rng.random() < 0.03:
        f |= 1 << 8                                 # TF
    if rng.random() < 0.1:
        f |= rng.randrange(4) << 12                 # IOPL
    for bit in (14, 16, 18, 21):                    # NT RF AC ID
        if rng.random() < 0.05:
            f |= 1 << bit
    if mode != "long" and rng.random() < 0.02:
        f |= 1 << 17                                # VM: virtual-8086 mode
    return f


_SEGMENTS = ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")
_SEG_BITS = {"type": 4, "present": 1, "dpl": 2, "db": 1, "s": 1, "l": 1, "g": 1, "avl": 1,
             "unusable": 1, "selector": 16, "limit": 32, "base": 64}


def _sregs_noise(rng: random.Random) -> dict:
    """A few special-register fields set to odd values (KVM may refuse them: KvmInvalid)."""
    out = {}
    for _ in range(rng.randint(1, 3)):
        k = rng.random()
        if k < 0.4:
            name = rng.choice(("cr0", "cr4", "efer", "cr3", "cr8", "apic_base", "cr2"))
            bits = {"cr0": CR0_BITS, "cr4": CR4_BITS}.get(name)
            if bits and rng.random() < 0.7:
                value = sum(b for b in bits if rng.random() < 0.3)
            elif name == "efer":
                value = rng.choice((0x100, 0x400, 0x500, 0xD01, 0x800, rng.getrandbits(16)))
            else:
                value = rng.getrandbits(rng.choice((8, 32, 64)))
        else:
            field = rng.choice(tuple(_SEG_BITS))
            name = f"{rng.choice(_SEGMENTS)}.{field}"
            w = _SEG_BITS[field]
            value = rng.getrandbits(w) if rng.random() < 0.7 else rng.getrandbits(min(w, 8)) & \
                ((1 << w) - 1)
        out[name] = value
    return out


def generate_case(seed: int, index: int, *, modes=MODES, max_vcpus: int = 4,
                  deadline: float = DEFAULT_DEADLINE) -> dict:
    """The case ``index`` of run ``seed``: a pure function of its arguments (the supervisor
    regenerates a finding's case from them to write the reproducer).

    Returns the case as a dict (:data:`CASE_FORMAT`): ``mode``, ``style`` ("valid", "raw" or
    "tiny"), ``slots`` and ``blobs`` (guest-physical addresses, bytes), ``vcpus`` (registers,
    entry points, odd special-register values), ``deadline`` (seconds), ``max_stops``, and the
    machine's switches (``irqchip``, ``pit``, ``cpuid``, ``native``: the C run loop, else the
    Python reference loop)."""
    rng = random.Random(f"pykvm-fuzz:{seed}:{index}")
    mode = rng.choice(list(modes))
    nvcpus = 1 if max_vcpus == 1 or rng.random() < 0.5 else rng.randint(2, max_vcpus)
    base = REAL_IMAGE if mode == "real" else HIGH_IMAGE
    bits = {"real": 16, "protected": 32, "long": 64}[mode]
    page_tables = mode != "long" and rng.random() < 0.3

    style = rng.choices(("valid", "raw", "tiny"), (70, 20, 10))[0]
    size = int(math.exp(rng.uniform(math.log(16), math.log(2048))))
    bounds = [0]
    if style == "raw":
        image = rng.randbytes(size)
    elif style == "tiny":
        image = rng.choice((b"", b"\xF4", b"\xEB\xFE", b"\x0F\x0B", b"\xCC", b"\xB0\x01\xE6\xF4",
                            b"\xFA\xF4", b"\xFB\xF4", b"\xE4\x60", b"\x0F\x01\xC1",
                            b"\xF3\x6C", b"\x0F\x30", b"\x0F\x32", b"\x0F\xA2\xF4",
                            rng.randbytes(rng.randrange(1, 8))))
    else:
        s = InstructionStream(rng, bits, base, page_tables=page_tables)
        while len(s.code) < size:
            s.one()
        if rng.random() < 0.8:
            s.terminate()
        image, bounds = bytes(s.code), s.bounds or [0]
    if not image:
        bounds = [0]

    blobs = [(base, image), (DESC_ADDR, descriptors(rng))]
    handlers = [base + b for b in bounds]
    blobs.append((IDT32_ADDR, _gates(rng, handlers, wide=False)))
    blobs.append((LONG_GDT_ADDR, cpu_modes.gdt_bytes("long")))
    blobs.append((IDT64_ADDR, _gates(rng, handlers, wide=True)))
    if mode == "real":
        blobs.append((L.GDT_ADDR, cpu_modes.gdt_bytes("protected")))     # for real -> protected
        if rng.random() < 0.5:                                     # an IVT into the image
            ivt = b"".join(struct.pack("<HH", (base + rng.choice(bounds)) & 0xFFFF, 0)
                           for _ in range(256))
            blobs.append((0, ivt))
    if rng.random() < 0.1:                                         # junk somewhere in RAM
        blobs.append((rng.randrange(0x100000, RAM_SIZE - 0x1000), rng.randbytes(rng.randrange(1, 512))))

    slots = [{"gpa": 0, "size": RAM_SIZE, "readonly": False}]
    if rng.random() < 0.2:
        slots.append({"gpa": ROM_ADDR, "size": ROM_SIZE, "readonly": True})
        blobs.append((ROM_ADDR, rng.randbytes(ROM_SIZE)))

    vcpus = []
    for i in range(nvcpus):
        k = rng.random()
        if k < 0.8:
            entry = base + rng.choice(bounds)
        elif k < 0.9:
            entry = base + rng.randrange(max(len(image), 1))
        elif k < 0.96:
            entry = rng.randrange(RAM_SIZE)
        else:
            entry = rng.choice(MMIO_ADDRS) if mode != "real" else rng.randrange(0x100000)
        v = {"regs": {name: _reg_value(rng, mode == "long") for name in _GPRS}}
        if mode == "real":
            if rng.random() < 0.05:
                cs, ip = rng.getrandbits(16), rng.getrandbits(16)
            else:
                cs, ip = cpu_modes.real_mode_entry(entry % 0x100000)
            v["cs"] = cs
            v["regs"]["rip"] = ip
            v["regs"]["rsp"] = L.REAL_MODE_STACK_TOP if rng.random() < 0.8 else rng.getrandbits(16)
        else:
            v["regs"]["rip"] = entry
            v["regs"]["rsp"] = L.stack_top(i) if rng.random() < 0.8 else _reg_value(rng, mode == "long")
        v["regs"]["rflags"] = _rflags(rng, mode)
        if rng.random() < 0.05:
            v["sregs"] = _sregs_noise(rng)
        if mode == "protected" and rng.random() < 0.4:
            v["idt"] = [IDT32_ADDR, 256 * 8 - 1]
        elif mode == "long" and rng.random() < 0.4:
            v["idt"] = [IDT64_ADDR, 256 * 16 - 1]
        vcpus.append(v)

    irqchip = rng.random() < 0.1
    return {
        "format": CASE_FORMAT, "seed": seed, "index": index, "mode": mode, "style": style,
        "deadline": deadline, "max_stops": rng.choice((1, 1, 2, 3, 4, 8)),
        "irqchip": irqchip, "pit": irqchip and rng.random() < 0.5,
        "cpuid": rng.random() < 0.95, "native": rng.random() < 0.9,
        "page_tables": page_tables, "slots": slots, "blobs": blobs, "vcpus": vcpus,
        "io_seed": rng.getrandbits(32),
    }


def case_to_json(case: dict) -> dict:
    """``case`` with its blobs in JSON form (a reproducer's "case")."""
    return dict(case, blobs=blobs_to_json(case["blobs"]))


def case_from_json(d: dict) -> dict:
    """The inverse of :func:`case_to_json`; ValueError for a document of another format."""
    if d.get("format") != CASE_FORMAT:
        raise ValueError(f"not a pykvm fuzz case (format {d.get('format')!r})")
    return dict(d, blobs=blobs_from_json(d["blobs"]))
