"""Issue 16, fault 5 (third round): the ELF and ``-initrd`` rules of QEMU 7.2's ``-kernel``,
as pure-model checks of :mod:`pykvm.boot` (no KVM).

What QEMU does, and where (hw/i386/multiboot.c, include/hw/elf_ops.h ``load_elf``,
hw/core/loader.c), checked against qemu-system-x86_64 7.2 with hand-made images:

* a PT_LOAD with ``p_filesz`` 0 needs no file bytes, wherever ``p_offset`` points;
* a segment whose zero-filled tail overlaps another PT_LOAD is loaded as ``p_filesz`` bytes
  (the image is taken to zero it itself); file bytes over file bytes are refused;
* ``e_type`` is not looked at (ET_DYN, ET_REL, ET_CORE multiboot kernels boot by p_paddr);
* ``-initrd`` items are split at ``,``, ``,,`` is a comma, a trailing ``,`` ends the list, ""
  is no module, and an item's file name ends at its first space.

pykvm reads program and section headers ``e_phentsize``/``e_shentsize`` apart, as the ELF
specification says (QEMU steps by sizeof(Elf_Phdr); the two agree for every header table
whose entries are the structure's size and for one-entry tables)."""
import random
import struct

import pytest

from pykvm import boot
from pykvm.boot import LoadError

from test_loader import EM_386, FakeMem, make_elf, mb_header, seg, with_symbols
from test_loader import hang_guard  # noqa: F401  (a fixture)
from workcount import growth

CODE = b"\xf4" * 64


def elf32(segments, entry, *, phentsize=32, etype=2, head=None):
    """An ELF32 i386 multiboot image: ``segments`` are (paddr, data, memsz[, p_offset]);
    the data follow the headers from file offset 0x1000; program headers ``phentsize`` apart."""
    head = mb_header() if head is None else head
    phoff, n = 52, len(segments)
    body, pos, phdrs = bytearray(), 0x1000, b""
    for s in segments:
        paddr, data, memsz = s[:3]
        off = s[3] if len(s) > 3 else pos + len(body)
        if len(s) <= 3:
            body += data + bytes(-len(data) % 16)
        phdrs += struct.pack("<IIIIIIII", 1, off, paddr, paddr, len(data), memsz, 7, 16)
        phdrs += bytes(max(0, phentsize - 32))
    ehdr = b"\x7fELF\x01\x01\x01" + bytes(9) + struct.pack(
        "<HHIIIIIHHHHHH", etype, EM_386, 1, entry, phoff, 0, 0, 52, phentsize, n, 40, 0, 0)
    img = bytearray(0x1000)
    img[:52] = ehdr
    img[phoff:phoff + len(phdrs)] = phdrs
    hdr_at = (phoff + len(phdrs) + 3) // 4 * 4
    img[hdr_at:hdr_at + len(head)] = head
    return bytes(img + body)


# ---- header strides -----------------------------------------------------------------------

@pytest.mark.parametrize("phentsize", [32, 40, 56, 64])
def test_program_headers_are_e_phentsize_apart(phentsize):
    img = elf32([(0x100000, CODE, 0x1000), (0x200000, b"\x11" * 32, 0x40)], 0x100000,
                phentsize=phentsize)
    plan = boot.parse_image(img)
    assert [(s.addr, s.memsz, bytes(s.data[:1])) for s in plan.segments] == \
        [(0x100000, 0x1000, b"\xf4"), (0x200000, 0x40, b"\x11")]


def test_program_header_stride_below_the_structure_is_refused():
    img = elf32([(0x100000, CODE, 0x1000)], 0x100000, phentsize=24)
    with pytest.raises(LoadError, match="e_phentsize must be at least 32"):
        boot.parse_image(img)


def test_elf64_program_headers_are_e_phentsize_apart():
    img = bytearray(make_elf([seg(0x100000, CODE), seg(0x200000, b"\x22" * 8, 0x100)],
                             0x100000))
    # rewrite the two 56-byte headers 64 bytes apart (the data start at a page boundary)
    ph = [bytes(img[64 + 56 * i:64 + 56 * (i + 1)]) for i in range(2)]
    img[64:64 + 128] = ph[0] + bytes(8) + ph[1] + bytes(8)
    struct.pack_into("<H", img, 54, 64)                         # e_phentsize
    plan = boot.parse_image(bytes(img))
    assert [(s.addr, s.memsz) for s in plan.segments] == [(0x100000, 64), (0x200000, 0x100)]


def test_section_headers_are_e_shentsize_apart():
    img = bytearray(with_symbols(make_elf([seg(0x100000, CODE)], 0x100000),
                                 {"pykvm_params": 0x100000}))
    shoff = struct.unpack_from("<Q", img, 0x28)[0]
    shentsize, shnum = 64, struct.unpack_from("<H", img, 0x3C)[0]
    table = [bytes(img[shoff + 64 * i:shoff + 64 * (i + 1)]) for i in range(shnum)]
    wide = b"".join(t + bytes(16) for t in table)
    new_off = len(img)
    img += wide
    struct.pack_into("<Q", img, 0x28, new_off)
    struct.pack_into("<H", img, 0x3A, shentsize + 16)
    assert boot.find_symbol(bytes(img), "pykvm_params") == 0x100000


# ---- file bytes ---------------------------------------------------------------------------

@pytest.mark.parametrize("offset", [0x7FFFFFFF, 0x1031, 0xFFFFFFFF])
def test_empty_file_part_needs_no_file_bytes(offset):
    img = elf32([(0x100000, CODE, 0x1000), (0x300000, b"", 0x1000, offset)], 0x100000)
    plan = boot.parse_image(img)
    assert [(s.addr, s.filesz, s.memsz) for s in plan.segments] == \
        [(0x100000, 64, 0x1000), (0x300000, 0, 0x1000)]
    mem = FakeMem()
    boot.load_image(mem, img)
    assert mem.read(0x300000, 0x1000) == bytes(0x1000)


def test_file_bytes_past_the_end_are_still_refused():
    # QEMU: "Error while loading elf kernel"
    img = elf32([(0x100000, CODE, 0x1000), (0x300000, b"x", 0x10, 0x7FFFFFFF)], 0x100000)
    with pytest.raises(LoadError, match="image truncated: segment 1 needs file bytes"):
        boot.parse_image(img)


# ---- overlapping segments: QEMU's load_elf rule ----------------------------------------------

def test_segment_inside_another_segments_bss_keeps_both_file_parts():
    # img/e13.elf of the report: 16 bytes at 0x100800, inside the first segment's BSS
    img = elf32([(0x100000, CODE, 0x1000), (0x100800, b"\x02" * 16, 0x10)], 0x100000)
    plan = boot.parse_image(img)
    assert [(s.addr, s.memsz) for s in plan.segments] == [(0x100000, 64), (0x100800, 16)]
    mem = FakeMem()
    boot.load_image(mem, img)
    assert mem.read(0x100000, 64) == CODE and mem.read(0x100800, 16) == b"\x02" * 16


def test_two_bss_tails_over_each_other_both_shrink():
    img = elf32([(0x100000, CODE, 0x1000), (0x100800, b"\x11" * 16, 0x1000)], 0x100000)
    plan = boot.parse_image(img)
    assert [(s.addr, s.memsz) for s in plan.segments] == [(0x100000, 64), (0x100800, 16)]


def test_an_empty_segment_strictly_inside_a_bss_shrinks_it():
    img = elf32([(0x100000, CODE, 0x1000), (0x100800, b"", 0)], 0x100000)
    assert [(s.addr, s.memsz) for s in boot.parse_image(img).segments] == [(0x100000, 64)]
    # at the BSS's first byte it is not inside (QEMU compares with >=)
    img = elf32([(0x100000, CODE, 0x1000), (0x100040, b"", 0)], 0x100000)
    assert [(s.addr, s.memsz) for s in boot.parse_image(img).segments] == [(0x100000, 0x1000)]


@pytest.mark.parametrize("second", [(0x100011, b"X", 1), (0x0FF000, b"\x22" * 0x1012, 0x1012)])
def test_file_bytes_over_file_bytes_are_refused_as_qemu_refuses_them(second):
    img = elf32([(0x100000, CODE, 0x1000), second], 0x100000)
    with pytest.raises(LoadError, match="overlapping segments: .*Some ROM regions are "
                                        "overlapping"):
        boot.parse_image(img)


def _brute_force_sizes(phdrs):
    """QEMU's loop as written: every tail against every other PT_LOAD."""
    out = {}
    for i, ph in enumerate(phdrs):
        if ph.type != 1:
            continue
        size = ph.memsz
        if ph.memsz > ph.filesz:
            lo, hi = ph.paddr + ph.filesz, ph.paddr + ph.memsz
            for j, other in enumerate(phdrs):
                if i != j and other.type == 1 and not (
                        other.paddr >= hi or lo >= other.paddr + other.memsz):
                    size = ph.filesz
                    break
        out[i] = size
    return out


def test_the_fast_rule_equals_qemus_loop_on_random_layouts():
    rng = random.Random(1605)
    for _ in range(3000):
        phdrs = []
        for _ in range(rng.randrange(1, 9)):
            memsz = rng.choice([0, 1, 0x10, 0x100, 0x800])
            filesz = rng.randrange(0, memsz + 1)
            phdrs.append(boot.elf._Phdr(rng.choice([1, 1, 1, 6]), 0,
                                      0, rng.randrange(0, 0x1000, 8), filesz, memsz, 7))
        assert boot.elf._qemu_load_sizes(phdrs) == _brute_force_sizes(phdrs), phdrs


def _adjacent_tails(n):
    return [boot.elf._Phdr(1, 0, 0, 0x100000 + 0x10 * i, 0, 0x10, 7) for i in range(n)]


def test_the_rule_costs_n_log_n_for_the_most_headers(hang_guard):  # noqa: F811 — the fixture
    sizes = boot.elf._qemu_load_sizes(_adjacent_tails(boot.MAX_PROGRAM_HEADERS))
    assert set(sizes.values()) == {0x10}                       # adjacent, none overlaps
    # the work, counted: twice the headers, about twice the Python steps (4x were it quadratic)
    n = boot.MAX_PROGRAM_HEADERS // 2
    assert growth(_adjacent_tails, boot.elf._qemu_load_sizes, n) < 2.5


# ---- e_type -----------------------------------------------------------------------------------

@pytest.mark.parametrize("etype", [1, 3, 4])
def test_multiboot_elf32_of_any_e_type_loads_by_p_paddr(etype):
    img = elf32([(0x100000, CODE, 0x1000)], 0x100000, etype=etype)
    assert boot.parse_image(img).format == "elf32-multiboot"


def test_pykvm_own_x86_64_elf_still_wants_et_exec():
    img = make_elf([seg(0x100000, CODE)], 0x100000, etype=3)
    with pytest.raises(LoadError, match="not an executable ELF"):
        boot.parse_image(img)


# ---- symbols never decide a boot -----------------------------------------------------------

def test_a_bad_symbol_table_does_not_refuse_the_image():
    img = bytearray(with_symbols(make_elf([seg(0x100000, CODE)], 0x100000),
                                 {"pykvm_params": 0x100000}))
    struct.pack_into("<H", img, 0x3A, 12)                       # e_shentsize below 64
    with pytest.raises(LoadError, match="bad ELF section header size 12"):
        boot.elf_symbols(bytes(img))
    assert boot.load_image(FakeMem(), bytes(img)).params_addr is None


# ---- -initrd ------------------------------------------------------------------------------------

@pytest.mark.parametrize("text,items", [
    ("mod1.bin a,,b,mod2.bin", ["mod1.bin a,b", "mod2.bin"]),
    ("", []),
    ("mod1.bin,", ["mod1.bin"]),
    ("mod1.bin,mod2.bin,", ["mod1.bin", "mod2.bin"]),
    ("mod1.bin,,,mod2.bin", ["mod1.bin,", "mod2.bin"]),
    ("mod1.bin,,", ["mod1.bin,"]),
    ("mod1.bin,,,,", ["mod1.bin,,"]),
    ("mod1.bin,mod2.bin,,", ["mod1.bin", "mod2.bin,"]),
    (",", [""]),
    (",,", [","]),
    (" mod1.bin", [" mod1.bin"]),
    ("mod1.bin  x y ,mod2.bin", ["mod1.bin  x y ", "mod2.bin"]),
])
def test_initrd_list_splits_as_qemu_does(text, items):
    assert boot.split_initrd_option(text) == items


@pytest.mark.parametrize("item,path", [("mod1.bin a,b", "mod1.bin"), (" mod1.bin", ""),
                                       ("m\tx y", "m\tx"), ("a", "a")])
def test_module_file_name_ends_at_the_first_space(item, path):
    assert boot.initrd_module_path(item) == path


def _escaped_commas(n):
    return ",," * n + "," + "x" * (2 * n)


def test_initrd_split_is_linear(hang_guard):  # noqa: F811 — the imported fixture
    assert boot.split_initrd_option(_escaped_commas(500000)) == ["," * 500000, "x" * 1000000]
    # the work, counted: twice the text, about twice the Python steps (4x were it quadratic)
    assert growth(_escaped_commas, boot.split_initrd_option, 5000) < 2.5
