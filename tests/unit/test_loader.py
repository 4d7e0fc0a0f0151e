"""Loader and x86 boot-state tests that need no KVM: ELF/multiboot/flat parsing, validation,
zero-fill, multiboot info, page tables and register images written into a fake memory."""
import os
import shutil
import struct
import subprocess
from types import SimpleNamespace

import pytest

from pykvm import loader
from pykvm.loader import LoadError
from pykvm.arch.x86 import boot, layout

EM_386, EM_X86_64, EM_AARCH64, EM_RISCV = 3, 62, 183, 243
ET_EXEC, ET_DYN = 2, 3
PT_LOAD, PT_NOTE = 1, 4
MiB = 1 << 20
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class FakeMem:
    """Guest RAM from GPA 0 as a bytearray, filled with a pattern to catch missing zero-fill."""

    def __init__(self, size=16 * MiB, fill=0xAA):
        self.buf = bytearray([fill]) * size

    @property
    def size(self):
        return len(self.buf)

    def _check(self, gpa, n):
        if gpa < 0 or gpa + n > len(self.buf):
            raise ValueError(f"{gpa:#x}+{n:#x} outside fake RAM")

    def write(self, gpa, data):
        data = bytes(data)
        self._check(gpa, len(data))
        self.buf[gpa:gpa + len(data)] = data

    def read(self, gpa, n):
        self._check(gpa, n)
        return bytes(self.buf[gpa:gpa + n])

    def u32(self, gpa):
        return struct.unpack_from("<I", self.buf, gpa)[0]

    def u64(self, gpa):
        return struct.unpack_from("<Q", self.buf, gpa)[0]

    def cstr(self, gpa):
        end = self.buf.index(0, gpa)
        return self.buf[gpa:end].decode()


# ---- ELF construction ----------------------------------------------------------------------------

def make_elf(segments, entry, *, cls=64, machine=None, etype=ET_EXEC, endian=1, head=b""):
    """segments: dicts with vaddr, data, memsz and optional paddr/type/flags. The segment data
    follows the program headers (after ``head``, e.g. a multiboot header), page aligned."""
    if machine is None:
        machine = EM_X86_64 if cls == 64 else EM_386
    ehsize, phsize = (64, 56) if cls == 64 else (52, 32)
    phoff = ehsize
    pos = phoff + phsize * len(segments)
    body = bytearray()
    if head:
        # place ``head`` at the next 4-byte boundary
        pad = (-pos) % 4
        body += bytes(pad) + head
    offsets = []
    for s in segments:
        cur = pos + len(body)
        cur_aligned = (cur + 0xFFF) & ~0xFFF
        body += bytes(cur_aligned - cur)
        offsets.append(cur_aligned)
        body += s["data"]
    ident = b"\x7fELF" + bytes([1 if cls == 32 else 2, endian, 1]) + bytes(9)
    if cls == 64:
        eh = ident + struct.pack("<HHIQQQIHHHHHH", etype, machine, 1, entry, phoff, 0, 0,
                                 ehsize, phsize, len(segments), 64, 0, 0)
    else:
        eh = ident + struct.pack("<HHIIIIIHHHHHH", etype, machine, 1, entry, phoff, 0, 0,
                                 ehsize, phsize, len(segments), 40, 0, 0)
    ph = b""
    for s, off in zip(segments, offsets):
        paddr = s.get("paddr", s["vaddr"])
        ptype = s.get("type", PT_LOAD)
        flags = s.get("flags", 7)
        filesz = s.get("filesz", len(s["data"]))
        if cls == 64:
            ph += struct.pack("<IIQQQQQQ", ptype, flags, off, s["vaddr"], paddr, filesz,
                              s["memsz"], 0x1000)
        else:
            ph += struct.pack("<IIIIIIII", ptype, off, s["vaddr"], paddr, filesz, s["memsz"],
                              flags, 0x1000)
    return eh + ph + bytes(body)


def mb_header(flags=0x3, *, magic=0x1BADB002, checksum=None, aout=None):
    if checksum is None:
        checksum = (-(magic + flags)) & 0xFFFFFFFF
    h = struct.pack("<III", magic, flags, checksum)
    if aout is not None:
        h += struct.pack("<5I", *aout)
    return h


def seg(vaddr, data, memsz=None, **kw):
    return dict(vaddr=vaddr, data=data, memsz=len(data) if memsz is None else memsz, **kw)


CODE = b"\xf4" * 64           # hlt


# ---- ELF64 ----------------------------------------------------------------------------------------

def test_elf64_load_and_bss_zero_fill():
    data = b"\x11" * 100
    img = make_elf([seg(0x100000, CODE), seg(0x200000, data, 0x3000, flags=6)], 0x100010)
    mem = FakeMem()
    li = loader.load_image(mem, img)
    assert li.mode == "long" and li.entry == 0x100010
    assert li.plan.format == "elf64"
    assert mem.read(0x100000, 64) == CODE
    assert mem.read(0x200000, 100) == data
    assert mem.read(0x200000 + 100, 0x3000 - 100) == bytes(0x3000 - 100)   # bss zeroed
    assert mem.read(0x203000, 1) == b"\xaa"                                 # and no further
    assert li.multiboot_info is None and li.boot_regs == {}


def test_non_load_segments_and_empty_ones_are_ignored():
    img = make_elf([seg(0x100000, CODE), seg(0x5000, b"note", type=PT_NOTE),
                    seg(0x300000, b"", 0)], 0x100000)
    plan = loader.parse_image(img)
    assert [s.addr for s in plan.segments] == [0x100000]


@pytest.mark.parametrize("cut", [5, 10, 40, 64 + 20])
def test_truncated_headers(cut):
    img = make_elf([seg(0x100000, CODE)], 0x100000)
    with pytest.raises(LoadError, match="truncated|malformed"):
        loader.parse_image(img[:cut])


def test_truncated_segment_data():
    img = make_elf([seg(0x100000, CODE * 4)], 0x100000)
    with pytest.raises(LoadError, match="truncated: segment 0"):
        loader.parse_image(img[:-10])


def test_bad_magic():
    img = bytearray(make_elf([seg(0x100000, CODE)], 0x100000))
    img[1] = ord("X")
    with pytest.raises(LoadError, match="bad magic"):
        loader.parse_image(bytes(img))


def test_bad_class_and_endianness():
    img = bytearray(make_elf([seg(0x100000, CODE)], 0x100000))
    img[4] = 3
    with pytest.raises(LoadError, match="bad ELF class 3"):
        loader.parse_image(bytes(img))
    big = make_elf([seg(0x100000, CODE)], 0x100000, endian=2)
    with pytest.raises(LoadError, match="little-endian"):
        loader.parse_image(big)


def test_wrong_machine():
    img = make_elf([seg(0x100000, CODE)], 0x100000, machine=EM_AARCH64)
    with pytest.raises(LoadError, match="wrong machine"):
        loader.parse_image(img)
    rv = make_elf([seg(0x80000000, CODE)], 0x80000000, machine=EM_RISCV)
    with pytest.raises(LoadError, match="wrong machine: RISC-V ELF, x86_64 needs x86-64"):
        loader.parse_image(rv)
    # ... but riscv64 takes it, and refuses x86
    assert loader.parse_image(rv, arch="riscv64").mode == "riscv"
    with pytest.raises(LoadError, match="wrong machine"):
        loader.parse_image(make_elf([seg(0x100000, CODE)], 0x100000), arch="riscv64")


def test_wrong_class_for_arch():
    img = make_elf([seg(0x100000, CODE)], 0x100000, cls=32, head=mb_header())
    with pytest.raises(LoadError, match="riscv64 cannot boot a 32-bit ELF"):
        loader.parse_image(img, arch="riscv64")


def test_not_executable():
    img = make_elf([seg(0x100000, CODE)], 0x100000, etype=ET_DYN)
    with pytest.raises(LoadError, match="not an executable ELF"):
        loader.parse_image(img)


def test_segment_outside_ram():
    img = make_elf([seg(0x100000, CODE), seg(0xF00000, b"x", 0x200000)], 0x100000)
    with pytest.raises(LoadError, match=r"segment 1 \[0xf00000, 0x1100000\) is outside guest RAM"):
        loader.load_image(FakeMem(), img)


def test_segment_in_reserved_region():
    img = make_elf([seg(0x8000, CODE)], 0x8000)
    with pytest.raises(LoadError, match="VMM-reserved region"):
        loader.load_image(FakeMem(), img)
    # an explicit reserved=None lifts the check
    loader.load_image(FakeMem(), img, reserved=None)


def test_overlapping_segments():
    img = make_elf([seg(0x100000, CODE, 0x2000), seg(0x101000, CODE)], 0x100000)
    with pytest.raises(LoadError, match="overlapping segments: segment 0 .* and segment 1"):
        loader.parse_image(img)


def test_filesz_larger_than_memsz():
    img = make_elf([seg(0x100000, CODE, 16)], 0x100000)
    with pytest.raises(LoadError, match="p_filesz 0x40 is larger than p_memsz 0x10"):
        loader.parse_image(img)


def test_entry_outside_segments():
    img = make_elf([seg(0x100000, CODE)], 0x100040)
    with pytest.raises(LoadError, match="entry point 0x100040 is outside every loadable segment"):
        loader.parse_image(img)


def test_elf64_needs_identity_link():
    img = make_elf([seg(0xFFFFFFFF80100000, CODE, paddr=0x100000)], 0xFFFFFFFF80100000)
    with pytest.raises(LoadError, match="p_paddr 0x100000 != p_vaddr"):
        loader.parse_image(img)


def test_no_load_segments():
    img = make_elf([seg(0x100000, b"n", type=PT_NOTE)], 0x100000)
    with pytest.raises(LoadError, match="no loadable"):
        loader.parse_image(img)


def test_missing_file():
    with pytest.raises(LoadError, match="cannot read guest image"):
        loader.parse_image("/nonexistent/guest.elf")


# ---- multiboot ------------------------------------------------------------------------------------

def test_find_multiboot_header_rules():
    good = mb_header()
    assert loader.find_multiboot_header(bytes(8) + good).offset == 8
    assert loader.find_multiboot_header(bytes(6) + good) is None           # not 4-aligned
    assert loader.find_multiboot_header(bytes(8192) + good) is None        # beyond 8 KiB
    assert loader.find_multiboot_header(bytes(8188) + good).offset == 8188
    assert loader.find_multiboot_header(mb_header(checksum=1)) is None     # bad checksum
    # a bad candidate before a good one is skipped
    h = loader.find_multiboot_header(mb_header(checksum=5) + good)
    assert h.offset == 12 and h.flags == 3 and not h.aout_kludge


def test_elf32_multiboot_uses_paddr_and_translates_entry():
    img = make_elf([seg(0xC0100000, CODE, 0x1000, paddr=0x100000)], 0xC0100004, cls=32,
                   head=mb_header())
    mem = FakeMem()
    li = loader.load_image(mem, img, cmdline="console=ttyS0 quiet")
    assert li.plan.format == "elf32-multiboot" and li.mode == "protected"
    assert li.entry == 0x100004
    assert mem.read(0x100000, 64) == CODE
    assert mem.read(0x100040, 0x1000 - 64) == bytes(0x1000 - 64)
    assert li.multiboot_info == layout.MULTIBOOT_INFO_ADDR
    assert li.boot_regs == {"eax": 0x2BADB002, "ebx": 0x9000}


def test_elf32_without_multiboot_header():
    img = make_elf([seg(0x100000, CODE)], 0x100000, cls=32)
    with pytest.raises(LoadError, match="without a multiboot v1 header"):
        loader.parse_image(img)


def test_multiboot_unsupported_flags():
    img = make_elf([seg(0x100000, CODE)], 0x100000, cls=32, head=mb_header(flags=0x3 | 0x10))
    with pytest.raises(LoadError, match="unsupported features"):
        loader.parse_image(img)


def test_multiboot_info_contents():
    ram = 64 * MiB
    mem = FakeMem(ram)
    img = make_elf([seg(0x100000, CODE)], 0x100000, cls=32, head=mb_header())
    li = loader.load_image(mem, img, cmdline="hello exit=3")
    a = li.multiboot_info
    assert 0x9000 <= a < 0xA000
    flags = mem.u32(a)
    for bit in (0, 1, 2, 3, 6, 9):          # MEM BOOT_DEVICE CMDLINE MODS MMAP BOOT_LOADER_NAME
        assert flags & (1 << bit)
    assert mem.u32(a + 4) == 640
    assert mem.u32(a + 8) == (ram - MiB) // 1024
    assert mem.u32(a + 12) == 0x8000FFFF
    assert mem.cstr(mem.u32(a + 16)) == "hello exit=3"
    assert mem.u32(a + 20) == 0                                   # no modules
    assert mem.cstr(mem.u32(a + 64)) == "pykvm"
    length, addr = mem.u32(a + 44), mem.u32(a + 48)
    entries = []
    p = addr
    while p < addr + length:
        size, base, n, kind = struct.unpack_from("<IQQI", mem.buf, p)
        entries.append((base, n, kind))
        p += size + 4
    assert p == addr + length
    assert entries[0] == (0, 0x9FC00, 1)
    assert entries[-1] == (0x100000, ram - 0x100000, 1)
    assert all(k in (1, 2) for _, _, k in entries)
    # everything inside the info page
    assert mem.u32(a + 16) + len("hello exit=3") + 1 <= 0xA000


def test_multiboot_info_limits():
    info = loader.build_multiboot_info(8 << 30)
    assert struct.unpack_from("<I", info, 8)[0] == (4 << 30) // 1024 - 1024   # 32-bit field
    with pytest.raises(LoadError, match="command line too long"):
        loader.build_multiboot_info(64 * MiB, "x" * 5000)


def test_multiboot_aout_kludge():
    # flat file: header at offset 0x10; it says it lives at 0x200010, load from 0x200000,
    # 0x40 bytes of file, bss up to 0x201000, entry 0x200020
    aout = (0x200010, 0x200000, 0x200040, 0x201000, 0x200020)
    hdr = mb_header(0x10003, aout=aout)
    blob = b"\x90" * 0x10 + hdr
    blob += b"\xcc" * (0x60 - len(blob))       # more file than load_end_addr asks for
    mem = FakeMem()
    li = loader.load_image(mem, blob, cmdline="x")
    assert li.plan.format == "multiboot-aout" and li.entry == 0x200020
    (s,) = li.plan.segments
    assert (s.addr, s.filesz, s.memsz) == (0x200000, 0x40, 0x1000)
    assert mem.read(0x200000, 0x40) == blob[:0x40]
    assert mem.read(0x200040, 0x1000 - 0x40) == bytes(0x1000 - 0x40)
    assert li.multiboot_info is not None


def test_multiboot_aout_kludge_in_elf32_takes_precedence():
    aout = (0x300000, 0x300000, 0, 0, 0x300000)
    img = make_elf([seg(0x100000, CODE)], 0x100000, cls=32, head=mb_header(0x10003, aout=aout))
    plan = loader.parse_image(img)
    hdr_off = plan.multiboot.offset
    assert plan.entry == 0x300000 and plan.segments[0].addr == 0x300000
    assert plan.segments[0].data == img[hdr_off:]


@pytest.mark.parametrize("aout,msg", [
    ((0x200000, 0x200010, 0, 0, 0x200010), "load_addr .* is above header_addr"),
    ((0x200100, 0x200000, 0, 0, 0x200000), "larger than the header's file offset"),
    ((0x200000, 0x200000, 0x300000, 0, 0x200000), "image truncated"),
    ((0x200000, 0x200000, 0x200020, 0x200010, 0x200000), "bss_end_addr"),
    ((0x200000, 0x200000, 0, 0, 0x500000), "entry point 0x500000 is outside"),
])
def test_multiboot_aout_kludge_errors(aout, msg):
    blob = mb_header(0x10003, aout=aout) + bytes(0x40)
    with pytest.raises(LoadError, match=msg):
        loader.parse_image(blob)


def test_truncated_multiboot_header():
    with pytest.raises(LoadError, match="truncated"):
        loader.find_multiboot_header(mb_header(0x10003))


# ---- flat binaries --------------------------------------------------------------------------------

def test_flat_real_mode_may_use_low_memory():
    mem = FakeMem()
    li = loader.load_image(mem, b"\xfa\xf4", flat_addr=0x8000)
    assert li.mode == "real" and li.entry == 0x8000
    assert mem.read(0x8000, 2) == b"\xfa\xf4"
    assert boot.real_mode_entry(0x8000) == (0, 0x8000)
    assert boot.real_mode_entry(0x12345) == (0x1234, 5)


def test_flat_long_mode_respects_reserved_region():
    with pytest.raises(LoadError, match="VMM-reserved"):
        loader.load_image(FakeMem(), b"\xf4", flat_addr=0x8000, flat_mode="long")
    li = loader.load_image(FakeMem(), b"\xf4", flat_addr=0x100000, flat_mode="long")
    assert li.mode == "long"


def test_flat_needs_address():
    with pytest.raises(LoadError, match="no load address"):
        loader.parse_image(b"\xf4\xf4\xf4\xf4")
    with pytest.raises(LoadError, match="entry point"):
        loader.parse_image(b"\xf4", flat_addr=0x8000, flat_entry=0x9000)
    with pytest.raises(LoadError, match="below 1 MiB"):
        loader.parse_image(b"\xf4" * 0x100, flat_addr=0xFFFF0)


# ---- symbols (with the real guests, when the toolchain is here) -----------------------------------

@pytest.fixture(scope="module")
def built_guests(tmp_path_factory):
    if not all(shutil.which(t) for t in ("gcc", "ld", "objcopy", "make")):
        pytest.skip("host toolchain not available")
    out = tmp_path_factory.mktemp("guests")
    subprocess.run(["make", "-s", "-C", os.path.join(REPO, "guests"), f"OUT={out}", "x86"],
                   check=True, capture_output=True)
    return out / "x86"


def test_find_symbol_in_built_guest(built_guests):
    path = built_guests / "hello.elf"
    addr = loader.find_symbol(path, "pykvm_params")
    assert addr is not None and addr >= 0x100000 and addr % 8 == 0
    assert loader.find_symbol(path.read_bytes(), "_start") == loader.parse_image(path).entry
    assert loader.find_symbol(path, "no_such_symbol") is None
    assert loader.find_symbol(b"\xf4" * 8, "pykvm_params") is None
    mem = FakeMem()
    li = loader.load_image(mem, path)
    assert li.params_addr == addr and mem.read(addr, 128) == bytes(128)


def test_built_guests_load(built_guests):
    for name in ("hello", "cpuid", "timer", "vcpu_id"):
        li = loader.load_image(FakeMem(), built_guests / f"{name}.elf")
        assert li.mode == "long" and li.entry == 0x100000
    li = loader.load_image(FakeMem(), built_guests / "hello32.elf", cmdline="exit=1")
    assert li.mode == "protected" and li.multiboot_info == 0x9000
    li = loader.load_image(FakeMem(), built_guests / "hello16.bin", flat_addr=0x8000)
    assert li.mode == "real"
    # the params symbol of a flat binary comes from the ELF built next to it
    assert li.params_addr == loader.find_symbol(built_guests / "hello16.elf", "pykvm_params")
    assert li.params_addr is not None


# ---- boot state -----------------------------------------------------------------------------------

def _seg():
    return SimpleNamespace(base=1, limit=1, selector=1, type=1, present=0, dpl=3, db=1, s=0,
                           l=1, g=0, avl=1, unusable=1, padding=7)


class FakeVcpu:
    def __init__(self):
        names = ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")
        self.sregs = SimpleNamespace(**{n: _seg() for n in names},
                                     gdt=SimpleNamespace(base=0, limit=0),
                                     idt=SimpleNamespace(base=9, limit=9),
                                     cr0=0, cr2=0, cr3=0, cr4=0, cr8=0, efer=0, apic_base=0xFEE00900)
        self.regs = SimpleNamespace(**{n: 0x55 for n in boot._GPRS}, rip=0, rflags=0)

    def get_sregs(self):
        return self.sregs

    def set_sregs(self, s):
        self.sregs = s

    def get_regs(self):
        return self.regs

    def set_regs(self, r):
        self.regs = r


def test_gdt_descriptors():
    assert boot.descriptor(0, 0xFFFFF, 0x9B, 0xA) == 0x00AF9B000000FFFF
    assert boot.descriptor(0, 0xFFFFF, 0x93, 0xC) == 0x00CF93000000FFFF
    g = struct.unpack("<6Q", boot.gdt_bytes("long"))
    assert g[1] == 0x00AF9B000000FFFF and g[2] == 0x00CF93000000FFFF
    assert struct.unpack("<6Q", boot.gdt_bytes("protected"))[1] == 0x00CF9B000000FFFF


def test_setup_long_mode():
    mem = FakeMem(8 * MiB)
    v = FakeVcpu()
    boot.setup_long_mode(v, mem, 0x100000, None, vcpu_index=2)
    s, r = v.sregs, v.regs
    assert s.cr0 & boot.CR0_PG and s.cr0 & boot.CR0_PE and s.cr4 & boot.CR4_PAE
    assert s.efer & (boot.EFER_LME | boot.EFER_LMA) == boot.EFER_LME | boot.EFER_LMA
    assert s.cr3 == layout.PML4_ADDR
    assert (s.cs.selector, s.cs.l, s.cs.db, s.cs.type, s.cs.present) == (8, 1, 0, 0xB, 1)
    assert all(getattr(s, n).selector == 0x10 for n in ("ds", "es", "ss"))
    assert s.tr.selector == 0x20 and s.tr.type == 0xB and s.tr.s == 0
    assert (s.gdt.base, s.gdt.limit) == (layout.GDT_ADDR, layout.GDT_LIMIT)
    assert s.apic_base == 0xFEE00900                       # untouched
    assert r.rip == 0x100000 and r.rflags == 2 and r.rax == 0
    assert r.rsp == layout.stack_top(2) == layout.STACKS_ADDR + 3 * 0x1000
    # page tables: 4 GiB identity map with 2 MiB pages
    assert mem.u64(layout.PML4_ADDR) == layout.PDPT_ADDR | 3
    for i in range(4):
        assert mem.u64(layout.PDPT_ADDR + 8 * i) == (layout.PD_ADDR + i * 0x1000) | 3
    assert mem.u64(layout.PDPT_ADDR + 32) == 0
    assert mem.u64(layout.PD_ADDR) == 0x83
    assert mem.u64(layout.PD_ADDR + 8 * 2047) == (2047 << 21) | 0x83
    assert mem.read(layout.GDT_ADDR, 48) == boot.gdt_bytes("long")


def test_setup_protected_mode():
    mem = FakeMem()
    v = FakeVcpu()
    boot.setup_protected_mode(v, mem, 0x100000, 0x2BADB002, 0x9000)
    s, r = v.sregs, v.regs
    assert s.cr0 & boot.CR0_PE and not s.cr0 & boot.CR0_PG and s.efer == 0
    assert (s.cs.db, s.cs.l, s.cs.g, s.cs.limit, s.cs.base) == (1, 0, 1, 0xFFFFFFFF, 0)
    assert (r.rax, r.rbx, r.rip, r.rflags) == (0x2BADB002, 0x9000, 0x100000, 2)


def test_setup_real_mode():
    v = FakeVcpu()
    boot.setup_real_mode(v, 0x800, 0x10)
    s, r = v.sregs, v.regs
    assert not s.cr0 & boot.CR0_PE
    assert (s.cs.selector, s.cs.base, s.cs.limit, s.cs.db) == (0x800, 0x8000, 0xFFFF, 0)
    assert (s.ds.base, s.ds.selector) == (0, 0)
    assert (s.idt.base, s.idt.limit) == (0, 0x3FF)
    assert (r.rip, r.rsp) == (0x10, layout.REAL_MODE_STACK_TOP)
    with pytest.raises(ValueError):
        boot.setup_real_mode(v, 0x10000, 0)


def test_big_ram_identity_map_and_limits():
    class Sized:
        size = 6 << 30
        writes = {}

        def write(self, gpa, data):
            self.writes[gpa] = len(data)

    m = Sized()
    boot.write_identity_map(m)
    assert m.writes[layout.PD_ADDR] == 6 * 4096
    m.size = 40 << 30
    with pytest.raises(ValueError, match="larger than the boot page tables"):
        boot.write_identity_map(m)
    with pytest.raises(ValueError):
        layout.stack_top(layout.MAX_VCPUS)
