"""Issue 18 item 2: the ELF loader decodes the ELF header, program headers, section headers and
symbols with :mod:`struct` (pyelftools cost ~20 ms of every ``pykvm run``). These tests hold the
struct decoding to pyelftools' on real images, field by field: the built-in guests (x86 ELF64
and ELF32, RISC-V), their object files, the bench's tiny images and, with binutils, freshly
linked images with DWARF; that hostile images still end in one-line LoadErrors; and that
booting an image imports no ``elftools`` module (only DWARF line tables do)."""
import io
import json
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from elftools.elf import enums
from elftools.elf.elffile import ELFFile
from elftools.elf.sections import SymbolTableSection

from pykvm import bench, boot
from pykvm.boot import LoadError
from pykvm.boot import elf as elfmod
from pykvm.boot.symbols import Symbols

from test_loader import CODE, make_elf, mb_header, seg, with_symbols

ROOT = Path(__file__).resolve().parents[2]
GUESTS = sorted((ROOT / "build" / "guests").glob("*/*.elf")) + sorted(
    (ROOT / "build" / "guests").glob("*/obj/**/*.o"))[:40]
needs_as = pytest.mark.skipif(not (shutil.which("as") and shutil.which("ld")),
                              reason="needs binutils (as, ld)")


def _images():
    out = [pytest.param(bench.tiny_elf64(), id="bench-tiny_elf64"),
           pytest.param(bench.tiny_multiboot(), id="bench-tiny_multiboot")]
    for cls in (32, 64):
        img = make_elf([seg(0x100000, CODE, 0x1000)], 0x100000, cls=cls,
                       head=mb_header() if cls == 32 else b"")
        out.append(pytest.param(with_symbols(img, {"pykvm_params": 0x100100, "b": 7}, cls=cls),
                                id=f"made-elf{cls}-symbols"))
    out += [pytest.param(p, id=str(p.relative_to(ROOT / "build" / "guests"))) for p in GUESTS]
    return out


def _num(value, prefix: str) -> int:
    """The number behind a field pyelftools decoded to an enumerator's name: looked up in every
    ``elftools.elf.enums`` table whose name starts with ``prefix`` (they must agree)."""
    if isinstance(value, int):
        return value
    found = {table[value] for name, table in vars(enums).items()
             if name.startswith(prefix) and isinstance(table, dict) and value in table}
    assert len(found) == 1, (value, prefix, found)
    return found.pop()


def _compare(data: bytes):
    """Assert that every record pykvm decodes equals pyelftools' decoding of it."""
    f = ELFFile(io.BytesIO(data))
    elf = elfmod._Elf(data)
    h, ph = elf.hdr, f.header
    assert h.cls == (1 if f.elfclass == 32 else 2)
    assert (h.type, h.machine, h.version) == (
        _num(ph["e_type"], "ENUM_E_TYPE"), _num(ph["e_machine"], "ENUM_E_MACHINE"),
        _num(ph["e_version"], "ENUM_E_VERSION"))
    assert h[4:] == tuple(ph[k] for k in (
        "e_entry", "e_phoff", "e_shoff", "e_flags", "e_ehsize", "e_phentsize", "e_phnum",
        "e_shentsize", "e_shnum", "e_shstrndx"))

    phdrs = elfmod._program_headers(elf) if h.phnum else []
    segs = [s.header for s in f.iter_segments()]
    assert len(phdrs) == len(segs) == h.phnum
    for mine, theirs in zip(phdrs, segs):
        assert mine == elfmod._Phdr(_num(theirs["p_type"], "ENUM_P_TYPE"), theirs["p_offset"],
                                    theirs["p_vaddr"], theirs["p_paddr"], theirs["p_filesz"],
                                    theirs["p_memsz"], theirs["p_flags"])

    shdrs = elfmod._section_headers(elf)
    secs = list(f.iter_sections())
    assert len(shdrs) == len(secs)
    for mine, sec in zip(shdrs, secs):
        t = sec.header
        assert mine == elfmod._Shdr(_num(t["sh_type"], "ENUM_SH_TYPE"), t["sh_offset"],
                                    t["sh_size"], t["sh_link"], t["sh_entsize"], t["sh_addr"],
                                    t["sh_flags"], t["sh_name"])

    # every entry of every symbol table, and the loader's view of them
    want, n_syms = {}, 0
    for i, sec in enumerate(secs):
        if not isinstance(sec, SymbolTableSection) or sec["sh_size"] == 0:
            continue
        sh = shdrs[i]
        count = sh.size // sh.entsize
        mine = elf.entries("symbol", sh.offset, count, sh.entsize,
                           elfmod._SYM_DECODE[h.cls], elfmod.MAX_SYMBOLS)
        theirs = list(sec.iter_symbols())
        assert len(mine) == len(theirs) == count
        for m, s in zip(mine, theirs):
            e = s.entry
            info = (_num(e["st_info"]["bind"], "ENUM_ST_INFO_BIND") << 4 |
                    _num(e["st_info"]["type"], "ENUM_ST_INFO_TYPE"))
            assert m == elfmod._Sym(e["st_name"], e["st_value"], e["st_size"], info,
                                    _num(e["st_shndx"], "ENUM_ST_SHNDX"))
            if s.name and m.shndx != elfmod.SHN_UNDEF:
                want.setdefault(s.name, e["st_value"])
            n_syms += 1
    assert boot.elf_symbols(data) == want
    for name, value in list(want.items())[:5]:
        assert boot.find_symbol(data, name) == value
    return n_syms


@pytest.mark.parametrize("image", _images())
def test_struct_decoding_equals_pyelftools(image):
    data = image.read_bytes() if isinstance(image, Path) else image
    n = _compare(data)
    if isinstance(image, Path) and image.suffix == ".elf":
        assert n > 0                              # the built guests carry symbol tables
        assert boot.find_symbol(data, "pykvm_params") is not None


def test_the_guests_cover_both_classes_and_both_architectures():
    # what the comparison above ran on, when the guests are built (tests/x86 and
    # tests/riscv build them): ELF32 and ELF64, x86 and RISC-V
    if not GUESTS:
        pytest.skip("no built guests in build/guests")
    kinds = {(elfmod._Elf(p.read_bytes()).hdr.cls, elfmod._Elf(p.read_bytes()).hdr.machine)
             for p in GUESTS}
    assert {(1, elfmod._EM_386), (2, elfmod._EM_X86_64)} <= kinds
    if list((ROOT / "build" / "guests").glob("riscv/*.elf")):
        assert (2, elfmod._EM_RISCV) in kinds


def _dwarf_guest(tmp_path, bits):
    src = tmp_path / f"g{bits}.S"
    src.write_text(".globl _start\n_start:\n  nop\n  nop\nsecond:\n  ret\n"
                   ".data\n.globl pykvm_params\npykvm_params:\n  .fill 16, 8, 0\n")
    obj, elf = tmp_path / f"g{bits}.o", tmp_path / f"g{bits}.elf"
    subprocess.run(["as", f"--{bits}", "-g", "-o", str(obj), str(src)], check=True)
    emu = ["-m", "elf_i386"] if bits == 32 else []
    subprocess.run(["ld", *emu, "-nostdlib", "-static", "-Ttext=0x200000", "-e", "_start",
                    "-o", str(elf), str(obj)], check=True)
    return obj, elf


@needs_as
@pytest.mark.parametrize("bits", [32, 64])
def test_linked_images_with_dwarf_decode_as_pyelftools_does(tmp_path, bits):
    obj, elf = _dwarf_guest(tmp_path, bits)
    for p in (obj, elf):                          # ET_REL with relocations, ET_EXEC with DWARF
        assert _compare(p.read_bytes()) > 0
    s = Symbols.from_image(str(elf))
    assert s.describe(0x200001) == "_start+0x1, " + f"g{bits}.S:4"


# ---- hostile images: still one-line LoadErrors -------------------------------------------------

def _made(cls):
    img = make_elf([seg(0x100000, CODE, 0x1000)], 0x100000, cls=cls,
                   head=mb_header() if cls == 32 else b"")
    return bytearray(with_symbols(img, {"pykvm_params": 0x100100}, cls=cls))


def _ehdr_field(cls, name):
    """(offset, struct code) of ELF header field ``name`` in class ``cls`` (32 or 64)."""
    addr = "I" if cls == 32 else "Q"
    layout = [("e_type", "H"), ("e_machine", "H"), ("e_version", "I"), ("e_entry", addr),
              ("e_phoff", addr), ("e_shoff", addr), ("e_flags", "I"), ("e_ehsize", "H"),
              ("e_phentsize", "H"), ("e_phnum", "H"), ("e_shentsize", "H"), ("e_shnum", "H"),
              ("e_shstrndx", "H")]
    off = 16
    for field, code in layout:
        if field == name:
            return off, "<" + code
        off += struct.calcsize(code)
    raise KeyError(name)


def _set(img, cls, name, value):
    off, code = _ehdr_field(cls, name)
    struct.pack_into(code, img, off, value)
    return bytes(img)


def _one_line(fn, data, match):
    with pytest.raises(LoadError, match=match) as e:
        fn(data)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("cls", [32, 64])
def test_hostile_headers_give_the_same_one_line_errors(cls):
    size = 52 if cls == 32 else 64
    ph, sh, sym = (32, 40, 16) if cls == 32 else (56, 64, 24)
    good = _made(cls)
    assert boot.find_symbol(bytes(good), "pykvm_params") == 0x100100
    _one_line(boot.parse_image, bytes(good[:size - 1]),
              rf"image truncated: {size - 1} bytes is too short for the ELF header \({size}")
    _one_line(boot.parse_image, _set(_made(cls), cls, "e_phentsize", ph - 1),
              f"bad ELF program header size {ph - 1} .*at least {ph}")
    _one_line(boot.parse_image, _set(_made(cls), cls, "e_phnum", 0), "no program headers")
    _one_line(boot.parse_image, _set(_made(cls), cls, "e_phnum", 0xFFFF),
              "too many ELF program headers: 65535")
    _one_line(boot.parse_image, _set(_made(cls), cls, "e_phoff", len(good) - ph + 1),
              "image truncated: program headers end at")
    _one_line(boot.elf_symbols, _set(_made(cls), cls, "e_shentsize", sh - 1),
              f"bad ELF section header size {sh - 1} .*at least {sh}")
    _one_line(boot.elf_symbols, _set(_made(cls), cls, "e_shoff", len(good) - sh + 1),
              "image truncated: section headers end at")
    # extended numbering: e_shnum 0, the count in section 0's sh_size
    img = _made(cls)
    shoff = elfmod._Elf(bytes(img)).hdr.shoff
    struct.pack_into("<I" if cls == 32 else "<Q", img, shoff + (20 if cls == 32 else 32),
                     0x10000)
    _one_line(boot.elf_symbols, _set(img, cls, "e_shnum", 0),
              "too many ELF section headers: 65536")
    # the symbol table (section 2): its entry size, its size, its string table
    symtab = shoff + 2 * sh
    ent_off, size_off, link_off = (symtab + 36, symtab + 20, symtab + 24) if cls == 32 else \
        (symtab + 56, symtab + 32, symtab + 40)
    code = "<I" if cls == 32 else "<Q"
    for off, value, match in [(ent_off, sym + 8, f"bad symbol entry size {sym + 8}"),
                              (size_off, sym + 1, "is not a multiple of"),
                              (link_off, 2, "its string table .* is not one"),
                              (link_off, 9, "string table index 9 is not a section")]:
        img = _made(cls)
        struct.pack_into("<I" if off == link_off else code, img, off, value)
        _one_line(boot.elf_symbols, bytes(img), match)
        _one_line(lambda d: boot.find_symbol(d, "pykvm_params"), bytes(img), match)
        # a bad symbol table does not stop the image from booting (QEMU ignores it)
        assert boot.parse_image(bytes(img)).entry == 0x100000


def _every_header_byte_garbled(data: bytes):
    """``data`` with each byte of its ELF header, program headers and section headers set to
    0xff, then to 0x00 and to 0x80, one at a time."""
    h = elfmod._Elf(data).hdr
    spans = [(0, h.ehsize), (h.phoff, h.phoff + h.phnum * h.phentsize),
             (h.shoff, h.shoff + h.shnum * h.shentsize)]
    for lo, hi in spans:
        for i in range(lo, min(hi, len(data))):
            for b in (0xFF, 0x00, 0x80):
                if data[i] != b:
                    yield data[:i] + bytes([b]) + data[i + 1:]


@pytest.mark.parametrize("image", [p for p in GUESTS if p.suffix == ".elf"][::4] or [None])
def test_garbled_headers_of_real_images_are_results_or_one_line_errors(image, tmp_path):
    data = image.read_bytes() if image is not None else bytes(_made(64))
    errors = 0
    for n, bad in enumerate(_every_header_byte_garbled(data)):
        for fn in (boot.parse_image, boot.elf_symbols,
                   lambda d: boot.find_symbol(d, "pykvm_params")):
            try:
                fn(bad)
            except LoadError as e:
                assert "\n" not in str(e) and str(e)
                errors += 1
        if n % 97 == 0:                      # symbols of an error message: never raise
            p = tmp_path / "bad.elf"
            p.write_bytes(bad)
            Symbols.from_image(str(p)).describe(0x100000)
    assert errors > 0


# ---- booting imports no elftools ---------------------------------------------------------------

def _modules_after(code: str) -> set:
    probe = code + "\nimport sys, json; print(json.dumps(sorted(sys.modules)))"
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    return set(json.loads(r.stdout.splitlines()[-1]))


def test_loading_images_and_symbols_imports_no_elftools(tmp_path):
    images = []
    for which in ("tiny_elf64", "tiny_multiboot"):
        (tmp_path / which).write_bytes(getattr(bench, which)())
        images.append((str(tmp_path / which), "x86_64"))
    for arch in ("x86", "riscv"):
        guest = next((p for p in GUESTS if p.suffix == ".elf" and p.parent.name == arch), None)
        if guest is not None:
            images.append((str(guest), "x86_64" if arch == "x86" else "riscv64"))
    code = ("from pykvm import boot\nfrom pykvm.boot.symbols import Symbols\n"
            f"for p, arch in {images!r}:\n"
            "    boot.parse_image(p, arch=arch); boot.elf_symbols(p)\n"
            "    boot.find_symbol(p, 'pykvm_params'); Symbols.from_image(p).symbol(0x100000)\n")
    mods = _modules_after(code)
    assert not [m for m in mods if m.startswith("elftools")]
    # load_reader() imports what DWARF line tables need, for processes that preload
    mods = _modules_after("from pykvm.boot import elf; elf.load_reader()")
    assert "elftools.elf.elffile" in mods and "elftools.dwarf.dwarfinfo" in mods
