"""Issue 17 item 5: pyelftools (``elftools``) reads guest ELF images and their symbols and DWARF
line tables, and every hostile image still ends in one line (or, for symbols of an error
message, in no answer) in time linear in its size: the bounds pykvm checks before pyelftools
reads a table are what keep it so (pyelftools itself reads a name up to the next NUL anywhere in
the file and walks every section for each PT_DYNAMIC segment)."""
import shutil
import struct
import subprocess

import pytest
from elftools.elf.elffile import ELFFile
from elftools.elf.structs import ELFStructs

from pykvm import boot
from pykvm.boot import elf as elfmod
from pykvm.boot.symbols import Symbols

from test_loader import CODE, make_elf, seg, with_symbols
from workcount import line_events


def test_elf_images_are_read_by_pyelftools():
    # issue 18: headers and symbols are decoded with struct (test_elf_struct_decode.py holds
    # them to pyelftools' fields); pyelftools' ELFFile remains the DWARF reader
    img = with_symbols(make_elf([seg(0x100000, CODE, 0x1000)], 0x100000), {"pykvm_params": 0x100100})
    elf = elfmod._Elf(img)
    structs = ELFStructs(little_endian=True, elfclass=64)
    structs.create_basic_structs()
    assert structs.Elf_Ehdr.parse(img)["e_machine"] == "EM_X86_64" and elf.hdr.machine == 62
    assert isinstance(elf.elffile(), ELFFile)                    # DWARF: the whole ELFFile
    assert boot.parse_image(img).entry == 0x100000
    assert boot.find_symbol(img, "pykvm_params") == 0x100100


def _name_bomb(n, run):
    """n symbols, every name pointing at the start of one ``run``-byte string, its NUL the
    string table's last byte."""
    img = bytearray(make_elf([seg(0x100000, CODE, 0x1000)], 0x100000))
    img += bytes((-len(img)) % 8)
    strtab = b"\0" + b"A" * run + b"\0"              # one name, far too long
    syms = bytes(24) + struct.pack("<IBBHQQ", 1, 0x11, 0, 1, 0x100000, 8) * n
    sym_off = len(img)
    img += syms
    str_off = len(img)
    img += strtab + bytes((-len(strtab)) % 8)
    sh_off = len(img)
    sh = struct.Struct("<IIQQQQIIQQ")
    img += sh.pack(0, 0, 0, 0, 0, 0, 0, 0, 0, 0)
    img += sh.pack(0, 3, 0, 0, str_off, len(strtab), 0, 0, 1, 0)
    img += sh.pack(0, 2, 0, 0, sym_off, len(syms), 1, 1, 8, 24)
    struct.pack_into("<Q", img, 0x28, sh_off)                     # e_shoff
    struct.pack_into("<HH", img, 0x3A, 64, 3)                     # e_shentsize, e_shnum
    struct.pack_into("<H", img, 0x3E, 0)                          # e_shstrndx
    return bytes(img)


def test_symbol_name_bomb_is_linear():
    # pyelftools' get_string would read the whole run for every symbol: n * run bytes
    small, big = _name_bomb(2000, 200_000), _name_bomb(8000, 800_000)
    assert boot.elf_symbols(small) == {}                # every name too long: skipped
    assert boot.find_symbol(big, "pykvm_params") is None
    # the bytes searched for names' ends, counted: at most MAX_SYMBOL_NAME + 1 per symbol (the
    # search is bytes.find, C code, so its extent is what is measured, not Python steps)
    for img, n in ((small, 2000), (big, 8000)):
        elf = elfmod._Elf(img)
        data = _CountingBytes(img)
        for _, sh, st in elfmod._symbol_tables(elf):
            assert list(elfmod._read_symbols(elf, data, sh, st)) == []
        assert 0 < data.searched <= n * (elfmod.MAX_SYMBOL_NAME + 1), (n, data.searched)


class _CountingBytes(bytes):
    """bytes that add up the extent of every ``find`` made on them."""
    searched = 0

    def find(self, sub, start=0, end=None):
        self.searched += (len(self) if end is None else end) - start
        return super().find(sub, start, end)


def test_pt_dynamic_segments_do_not_walk_every_section():
    # 1000 PT_DYNAMIC headers and 0xFF00 section headers: pyelftools' get_segment would
    # walk all sections (and look their names up) for each dynamic segment
    n = 1000
    segs = [seg(0x100000, CODE, 0x1000)] + [dict(vaddr=0, data=b"", memsz=0, type=2)] * n
    img = bytearray(make_elf(segs, 0x100000))
    sh_off = len(img)
    img += bytes(64 * elfmod.MAX_SECTION_HEADERS)
    struct.pack_into("<Q", img, 0x28, sh_off)
    struct.pack_into("<HHH", img, 0x3A, 64, elfmod.MAX_SECTION_HEADERS, 0)
    # the work, counted in Python steps: linear in the headers (walking the sections once per
    # dynamic segment would take n * MAX_SECTION_HEADERS steps)
    _, steps = line_events(boot.parse_image, bytes(img))
    assert steps < 20 * n + 10 * elfmod.MAX_SECTION_HEADERS, steps
    assert boot.elf_symbols(bytes(img)) == {}


@pytest.mark.parametrize("cut", [70, 200, 1000])
def test_truncated_and_garbled_headers_are_one_line_load_errors(cut):
    img = bytearray(with_symbols(make_elf([seg(0x100000, CODE, 0x1000)], 0x100000), {"a": 1}))
    for bad in (bytes(img[:cut]), bytes(img[:64]) + b"\xff" * (len(img) - 64)):
        for fn in (boot.parse_image, boot.elf_symbols):
            try:
                fn(bad)
            except boot.LoadError as e:
                assert "\n" not in str(e)


# ---- DWARF line tables ----------------------------------------------------------------------

needs_as = pytest.mark.skipif(not (shutil.which("as") and shutil.which("ld")),
                              reason="needs binutils (as, ld)")


def _guest_with_lines(tmp_path):
    src = tmp_path / "g.S"
    src.write_text(".globl _start\n_start:\n  nop\n  nop\nsecond:\n  ret\n")
    obj, elf = tmp_path / "g.o", tmp_path / "g.elf"
    subprocess.run(["as", "--64", "-g", "-o", str(obj), str(src)], check=True)
    subprocess.run(["ld", "-nostdlib", "-static", "-Ttext=0x200000", "-e", "_start", "-o",
                    str(elf), str(obj)], check=True)
    return elf


def _section(data, name):
    f = ELFFile(__import__("io").BytesIO(data))
    s = f.get_section_by_name(name)
    return s["sh_offset"], s["sh_size"]


@needs_as
def test_dwarf_lines_through_pyelftools(tmp_path):
    s = Symbols.from_image(str(_guest_with_lines(tmp_path)))
    assert s.line(0x200001) == ("g.S", 4)


@needs_as
def test_hostile_dwarf_gives_no_lines_and_never_raises(tmp_path):
    elf = _guest_with_lines(tmp_path)
    good = elf.read_bytes()
    off, size = _section(good, ".debug_line")
    ioff, isize = _section(good, ".debug_info")
    variants = []
    for i in range(0, size, max(1, size // 40)):          # each byte of .debug_line garbled
        b = bytearray(good)
        b[off + i] ^= 0xFF
        variants.append(b)
    b = bytearray(good)
    struct.pack_into("<I", b, off, 0xFFFFFF00)           # a unit length past the section
    variants.append(b)
    b = bytearray(good)
    b[ioff:ioff + isize] = b"\xff" * isize                # garbage .debug_info
    variants.append(b)
    # the work of a lookup, counted in Python steps: garbage never costs more than twice what
    # the intact image's lookup does (a bad length read as a loop bound would)
    _, intact = line_events(Symbols.from_image(str(elf)).describe, 0x200001)
    for i, v in enumerate(variants):
        p = tmp_path / f"v{i}.elf"
        p.write_bytes(bytes(v))
        s = Symbols.from_image(str(p))
        d, steps = line_events(s.describe, 0x200001)
        assert steps <= 2 * intact, (i, steps, intact)
        assert d.startswith("_start+0x1")                 # symbols survive bad DWARF


@needs_as
def test_compressed_debug_sections_are_not_inflated(tmp_path):
    elf = _guest_with_lines(tmp_path)
    data = bytearray(elf.read_bytes())
    f = ELFFile(__import__("io").BytesIO(bytes(data)))
    for i, sec in enumerate(f.iter_sections()):
        if sec.name == ".debug_line":
            hdr = f["e_shoff"] + i * f["e_shentsize"]
            struct.pack_into("<Q", data, hdr + 8, sec["sh_flags"] | 0x800)   # SHF_COMPRESSED
    p = tmp_path / "z.elf"
    p.write_bytes(bytes(data))
    s = Symbols.from_image(str(p))
    assert s.line(0x200001) is None and s.symbol(0x200001) == ("_start", 1)
