"""ELF images (ELF64; ELF32 with a multiboot header), loaded by physical address as QEMU's
``load_elf`` loads them, and their symbol tables.

The records read here have layouts fixed by the ELF specification (``Elf32_Ehdr`` /
``Elf64_Ehdr``, ``_Phdr``, ``_Shdr``, ``_Sym``; little-endian only), so they are decoded with the
standard :mod:`struct` module, one precompiled :class:`struct.Struct` per record and class
(:data:`_EHDR`, :data:`_PHDR`, :data:`_SHDR`, :data:`_SYM`), into plain numbers: the ELF header
as an :class:`_Ehdr`, program headers as :class:`_Phdr`, section headers as :class:`_Shdr` and
symbols as :class:`_Sym`. pyelftools (``elftools``) decoded them until issue 18: importing it
cost 7-15 ms (its bundled ``construct`` imports ``pdb`` and ``inspect``) and building its
structures for the first image several ms more, about 22 ms of every ``pykvm run`` in all, for
four fixed-size records. pyelftools is now imported only for DWARF line tables
(:mod:`pykvm.boot.symbols`, when a failure's address is described at file:line), through
:meth:`_Elf.elffile`; tests/unit/test_elf_struct_decode.py holds the two decoders to the same
fields on real images.

Images come from untrusted places, so every table is checked before a byte of it is decoded:
header counts against :data:`MAX_PROGRAM_HEADERS`, :data:`MAX_SECTION_HEADERS` and
:data:`MAX_SYMBOLS`, entry sizes against the class's records, tables and string tables inside
the file, each distinct symbol table read once and no two overlapping, and names found with one
bounded search of at most :data:`MAX_SYMBOL_NAME` bytes. A hostile file costs time linear in
its size and every failure is a one-line :class:`LoadError`.
"""
from __future__ import annotations

import bisect
import os
import struct
from collections import namedtuple

from .image import PF_X, Image, LoadError, LoadPlan, Segment, _as_bytes, _check_overlaps, _read_image, _load_errors_only
from .multiboot import find_multiboot_header, parse_multiboot_aout

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Dict, Iterator, List, Optional, Tuple

MAX_PROGRAM_HEADERS = 1024        # Linux's binfmt_elf takes at most 64 KiB of program headers
MAX_SECTION_HEADERS = 0xFF00      # SHN_LORESERVE: the most an ELF names without escapes
MAX_SYMBOLS = 1 << 20             # symbols read in all, over every symbol table
MAX_SYMBOL_NAME = 4096            # longer names are skipped (never searched for)
_FEW_NAMES = 8                    # find_symbol: string table copies of a name scanned for alone
PARAMS_SYMBOL = "pykvm_params"
PARAMS_SIZE = 16 * 8              # uint64_t pykvm_params[16] (docs/guest-abi.md)

# ELF constants (from the ELF specification)
_ELF_MAGIC = b"\x7fELF"
_ELFCLASS32, _ELFCLASS64 = 1, 2
_ELFDATA2LSB = 1
_PT_LOAD = 1
_ET_NAMES = {0: "ET_NONE", 1: "ET_REL", 2: "ET_EXEC", 3: "ET_DYN", 4: "ET_CORE"}
_ET_EXEC = 2
_EM_386, _EM_X86_64, _EM_RISCV = 3, 62, 243
_EM_NAMES = {_EM_386: "i386", _EM_X86_64: "x86-64", _EM_RISCV: "RISC-V", 40: "ARM",
             183: "AArch64", 8: "MIPS", 20: "PowerPC", 21: "PowerPC64", 22: "S/390"}
_SHF_ALLOC = 2
SHT_SYMTAB, SHT_STRTAB, SHT_NOBITS, SHT_DYNSYM = 2, 3, 8, 11       # sh_type
SHN_UNDEF, SHN_ABS = 0, 0xFFF1                                     # st_shndx
STT_NOTYPE, STT_OBJECT, STT_FUNC = 0, 1, 2                         # st_info & 0xf

# The records, little-endian, per class (ELF spec "ELF Header", "Program Header", "Sections",
# "Symbol Table"; the 64-bit ones from the System V gABI). Fields not used are skipped ("x"):
# e_ident (checked byte by byte before), p_align, sh_info, sh_addralign, st_other.
#   Elf_Ehdr: e_type e_machine e_version e_entry e_phoff e_shoff e_flags e_ehsize e_phentsize
#             e_phnum e_shentsize e_shnum e_shstrndx
#   Elf32_Phdr: p_type p_offset p_vaddr p_paddr p_filesz p_memsz p_flags [p_align]
#   Elf64_Phdr: p_type p_flags p_offset p_vaddr p_paddr p_filesz p_memsz [p_align]
#   Elf_Shdr: sh_name sh_type sh_flags sh_addr sh_offset sh_size sh_link [sh_info sh_addralign]
#             sh_entsize
#   Elf32_Sym: st_name st_value st_size st_info [st_other] st_shndx
#   Elf64_Sym: st_name st_info [st_other] st_shndx st_value st_size
_EHDR = {_ELFCLASS32: struct.Struct("<16xHHIIIIIHHHHHH"),
         _ELFCLASS64: struct.Struct("<16xHHIQQQIHHHHHH")}
_PHDR = {_ELFCLASS32: struct.Struct("<IIIIIII4x"), _ELFCLASS64: struct.Struct("<IIQQQQQ8x")}
_SHDR = {_ELFCLASS32: struct.Struct("<IIIIIII8xI"), _ELFCLASS64: struct.Struct("<IIQQQQI12xQ")}
_SYM = {_ELFCLASS32: struct.Struct("<IIIBxH"), _ELFCLASS64: struct.Struct("<IBxHQQ")}
# their sizes: sizeof(Elf32_*) and sizeof(Elf64_*)
_EHSIZE = {c: s.size for c, s in _EHDR.items()}          # 52, 64
_PHDR_SIZE = {c: s.size for c, s in _PHDR.items()}       # 32, 56
_SHDR_SIZE = {c: s.size for c, s in _SHDR.items()}       # 40, 64
_SYM_SIZE = {c: s.size for c, s in _SYM.items()}         # 16, 24
_ADDR_LIMIT = {_ELFCLASS32: 1 << 32, _ELFCLASS64: 1 << 64}

_Ehdr = namedtuple("_Ehdr", "cls type machine version entry phoff shoff flags ehsize "
                            "phentsize phnum shentsize shnum shstrndx")
_Phdr = namedtuple("_Phdr", "type offset vaddr paddr filesz memsz flags")
# sh_addr and sh_flags are for pykvm.boot.symbols (where each allocated section ends)
_Shdr = namedtuple("_Shdr", "type offset size link entsize addr flags name",
                   defaults=(0, 0, 0))
# a symbol: st_name (offset in its string table), st_value, st_size, st_info (binding << 4 |
# type: the type is ``info & 0xf``), st_shndx (SHN_UNDEF: not defined here)
_Sym = namedtuple("_Sym", "name value size info shndx")


def _phdr32(t, off, vaddr, paddr, filesz, memsz, flags) -> _Phdr:
    return _Phdr(t, off, vaddr, paddr, filesz, memsz, flags)


def _phdr64(t, flags, off, vaddr, paddr, filesz, memsz) -> _Phdr:
    return _Phdr(t, off, vaddr, paddr, filesz, memsz, flags)


def _shdr(name, t, flags, addr, off, size, link, entsize) -> _Shdr:
    return _Shdr(t, off, size, link, entsize, addr, flags, name)


def _sym32(name, value, size, info, shndx) -> _Sym:
    return _Sym(name, value, size, info, shndx)


def _sym64(name, info, shndx, value, size) -> _Sym:
    return _Sym(name, value, size, info, shndx)


# record class -> (Struct, its fields -> namedtuple)
_PHDR_DECODE = {_ELFCLASS32: (_PHDR[_ELFCLASS32], _phdr32),
                _ELFCLASS64: (_PHDR[_ELFCLASS64], _phdr64)}
_SHDR_DECODE = {c: (s, _shdr) for c, s in _SHDR.items()}
_SYM_DECODE = {_ELFCLASS32: (_SYM[_ELFCLASS32], _sym32), _ELFCLASS64: (_SYM[_ELFCLASS64], _sym64)}


# what each supported architecture accepts: ELF class -> (e_machine, boot mode)
_ARCHES = {
    "x86_64": {_ELFCLASS64: (_EM_X86_64, "long"), _ELFCLASS32: (_EM_386, "protected")},
    "riscv64": {_ELFCLASS64: (_EM_RISCV, "riscv")},
}


def load_reader() -> None:
    """Import now the one part of ELF reading that is imported on first use: pyelftools' DWARF
    reader (``elftools.elf.elffile`` and the DWARF modules it imports: about 40 ms on the
    development machine), which :mod:`pykvm.boot.symbols` needs to name
    a failure's address by file:line. Booting needs nothing imported (headers and symbols are
    decoded with :mod:`struct`); a long-running process (a fuzz worker: ``platform.preload``)
    calls this so that describing its first failure does not pay the import inside a deadline."""
    from elftools.elf.elffile import ELFFile  # noqa: F401 — imported for its side effect


def is_elf(data: bytes) -> bool:
    """True if ``data`` starts with the ELF magic (0x7f, ``ELF``)."""
    return bytes(data[:4]) == _ELF_MAGIC


class _ImageStream:
    """A read-only, seekable binary stream over an image's bytes (``bytes`` or the ``mmap``
    :func:`pykvm.boot.image._read_image` gives) that copies only what is read, for
    pyelftools' ``ELFFile`` (``io.BytesIO`` would copy a mapped 1 GiB image whole)."""

    def __init__(self, data):
        self._view = memoryview(data)
        self._size = len(self._view)
        self._pos = 0

    def seek(self, offset: int, whence: int = 0) -> int:
        base = (0, self._pos, self._size)[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def tell(self) -> int:
        return self._pos

    def read(self, n: int = -1) -> bytes:
        start = min(self._pos, self._size)
        end = self._size if n is None or n < 0 else min(self._size, start + n)
        self._pos = max(self._pos, end)
        return bytes(self._view[start:end])


class _Elf:
    """One ELF file with its header checked and decoded: ``hdr`` (an :class:`_Ehdr`, numbers
    only) and ``data`` (the image: ``bytes`` or an ``mmap``). Raises :class:`LoadError` for a
    file too short for its ELF header, bad magic, an unknown class or a big-endian file."""

    def __init__(self, data):
        if len(data) < 16:
            raise LoadError(f"image truncated: {len(data)} bytes is too short for an ELF header")
        if not is_elf(data):
            raise LoadError("not an ELF file (bad magic)")
        cls, enc = data[4], data[5]
        if cls not in (_ELFCLASS32, _ELFCLASS64):
            raise LoadError(f"bad ELF class {cls}")
        if enc != _ELFDATA2LSB:
            raise LoadError("ELF file is not little-endian")
        if len(data) < _EHSIZE[cls]:
            raise LoadError(f"image truncated: {len(data)} bytes is too short for the ELF header "
                            f"({_EHSIZE[cls]} bytes)")
        self.data = data
        self.hdr = _Ehdr(cls, *_EHDR[cls].unpack_from(data, 0))

    def elffile(self):
        """pyelftools' ``ELFFile`` over this image (for its DWARF reader: built only when line
        tables are asked for, after the checks of :mod:`.symbols`; pyelftools is imported
        here, on first use)."""
        from elftools.elf.elffile import ELFFile
        return ELFFile(_ImageStream(self.data))

    def entries(self, what: str, off: int, count: int, entsize: int, decode: tuple,
                cap: int) -> list:
        """The ``count`` table entries at ``off``, ``entsize`` bytes apart, each decoded by
        ``decode`` (a (``struct.Struct``, function of its fields) pair from :data:`_PHDR_DECODE`,
        :data:`_SHDR_DECODE` or :data:`_SYM_DECODE`) from its first ``Struct.size`` bytes (ELF
        spec: the header's e_phentsize or e_shentsize is the stride, and may be larger than the
        record the class defines). Count and extent are checked before anything is decoded:
        raises :class:`LoadError` for more than ``cap`` entries or a table past the file's end."""
        if count > cap:
            raise LoadError(f"too many ELF {what}s: {count} (at most {cap})")
        if count == 0:
            return []
        rec, make = decode
        # the last entry needs only its record's bytes in the file, not a whole stride
        end = off + (count - 1) * entsize + rec.size
        if end > len(self.data):
            raise LoadError(f"image truncated: {what}s end at {end:#x}, the file has "
                            f"{len(self.data):#x} bytes")
        unpack, data = rec.unpack_from, self.data
        return [make(*unpack(data, off + i * entsize)) for i in range(count)]


def _program_headers(elf: _Elf) -> List[_Phdr]:
    """The program headers, ``e_phentsize`` bytes apart (the ELF spec's stride: at least
    sizeof(Elf32_Phdr) = 32 or sizeof(Elf64_Phdr) = 56; larger strides are legal and their
    extra bytes are skipped). Raises :class:`LoadError` for none, too many, a stride below the
    record size or a table past the file's end."""
    h = elf.hdr
    if h.phnum == 0:
        raise LoadError("ELF has no program headers")
    if h.phnum > MAX_PROGRAM_HEADERS:
        raise LoadError(f"too many ELF program headers: {h.phnum} (at most "
                        f"{MAX_PROGRAM_HEADERS})")
    size = _PHDR_SIZE[h.cls]
    if h.phentsize < size:
        raise LoadError(f"bad ELF program header size {h.phentsize} (e_phentsize must be at "
                        f"least {size} for this ELF class)")
    return elf.entries("program header", h.phoff, h.phnum, h.phentsize, _PHDR_DECODE[h.cls],
                       MAX_PROGRAM_HEADERS)


def _section_headers(elf: _Elf) -> List[_Shdr]:
    """The section headers ([] when there are none); extended numbering (e_shnum 0 and the count
    in section 0's sh_size) is understood, and the count is capped. Names are left as offsets
    (``_Shdr.name``) into the section name table, looked up only by :mod:`.symbols`, bounded.
    Raises :class:`LoadError`."""
    h = elf.hdr
    if h.shoff == 0:
        return []
    size = _SHDR_SIZE[h.cls]
    if h.shentsize < size:
        if h.shnum == 0:
            return []
        raise LoadError(f"bad ELF section header size {h.shentsize} (e_shentsize must be at "
                        f"least {size} for this ELF class)")
    decode = _SHDR_DECODE[h.cls]
    shnum = h.shnum
    if shnum == 0:
        first = elf.entries("section header", h.shoff, 1, h.shentsize, decode, 1)
        shnum = first[0].size                            # sh_size of section 0
        if shnum == 0:
            return []
    return elf.entries("section header", h.shoff, shnum, h.shentsize, decode,
                       MAX_SECTION_HEADERS)


@_load_errors_only
def parse_elf(data: bytes, *, arch: str = "x86_64") -> LoadPlan:
    """A plan from an ELF executable. x86_64: ELF64 (long mode, needs p_paddr == p_vaddr) or
    ELF32 i386 with a multiboot header (protected mode, loaded by p_paddr); any ELF whose
    multiboot header sets flag bit 16 is loaded by the a.out kludge fields instead, in
    protected mode, as QEMU does. riscv64: ELF64 loaded by p_paddr.
    Segment sizes follow QEMU's ``load_elf`` (:func:`_qemu_load_sizes`); ``e_type`` must be
    ET_EXEC only for the x86-64 long-mode boot (QEMU loads any type by p_paddr).
    The work done is O(n log n) in the number of program headers, which is capped."""
    if arch not in _ARCHES:
        raise LoadError(f"unknown architecture {arch!r} (known: {', '.join(_ARCHES)})")
    data = _as_bytes(data)
    elf = _Elf(data)
    hdr = elf.hdr
    cls = hdr.cls
    if arch == "x86_64":
        # A multiboot header asking for the a.out kludge (flag bit 16) decides the layout of
        # any ELF, 32- or 64-bit: QEMU's -kernel (hw/i386/multiboot.c) looks at the flag before
        # the ELF headers and then loads by the header's address fields alone, entering in
        # protected mode. 64-bit kernels with a 32-bit entry stub boot under QEMU this way
        # (without the flag QEMU refuses an x86-64 ELF; pykvm boots it in long mode).
        kludge = find_multiboot_header(data)
        if kludge is not None and kludge.aout_kludge:
            plan = parse_multiboot_aout(data, kludge)
            plan.format = "elf32-multiboot" if cls == _ELFCLASS32 else "elf64-multiboot-aout"
            return plan
    allowed = _ARCHES[arch]
    if cls not in allowed:
        raise LoadError(f"{arch} cannot boot a {32 if cls == _ELFCLASS32 else 64}-bit ELF")
    want_machine, mode = allowed[cls]
    if hdr.machine != want_machine:
        got = _EM_NAMES.get(hdr.machine, f"e_machine {hdr.machine}")
        raise LoadError(f"wrong machine: {got} ELF, {arch} needs {_EM_NAMES[want_machine]}")
    # QEMU's load_elf (multiboot ELF32, RISC-V -kernel) loads any e_type by p_paddr; pykvm's
    # own identity-mapped x86-64 ELF boot (which QEMU has no counterpart of) wants ET_EXEC.
    if hdr.type != _ET_EXEC and mode == "long":
        raise LoadError(f"not an executable ELF (e_type {_ET_NAMES.get(hdr.type, hdr.type)}); "
                        f"link with a fixed address (-no-pie, -static)")
    phdrs = _program_headers(elf)

    mb = None
    if arch == "x86_64" and cls == _ELFCLASS32:
        mb = find_multiboot_header(data)
        if mb is None:
            raise LoadError("32-bit ELF without a multiboot v1 header wholly inside its first "
                            "8 KiB (or its checksum is wrong)")

    view = memoryview(data)
    addr_limit = _ADDR_LIMIT[cls]
    segments = []
    memsz = _qemu_load_sizes(phdrs)
    for i, ph in enumerate(phdrs):
        if ph.type != _PT_LOAD:
            continue
        if ph.filesz > ph.memsz:
            raise LoadError(f"segment {i}: p_filesz {ph.filesz:#x} is larger than p_memsz "
                            f"{ph.memsz:#x}")
        if ph.filesz and ph.offset + ph.filesz > len(data):    # no file bytes: no p_offset
            raise LoadError(f"image truncated: segment {i} needs file bytes up to "
                            f"{ph.offset + ph.filesz:#x}, the file has {len(data):#x}")
        if memsz[i] == 0:
            continue
        if ph.paddr + memsz[i] > addr_limit:      # loaded by p_paddr; p_vaddr is not used
            raise LoadError(f"segment {i}: [{ph.paddr:#x} + {memsz[i]:#x}) wraps around the "
                            f"{'32' if cls == _ELFCLASS32 else '64'}-bit address space")
        if mode == "long" and ph.paddr != ph.vaddr:
            raise LoadError(f"segment {i}: p_paddr {ph.paddr:#x} != p_vaddr {ph.vaddr:#x}; "
                            f"64-bit x86 images run identity-mapped and must be linked that way")
        data_view = view[ph.offset:ph.offset + ph.filesz] if ph.filesz else b""
        segments.append(Segment(ph.paddr, data_view, memsz[i], ph.flags, ph.vaddr, i))
    if not segments:
        raise LoadError("ELF has no loadable (PT_LOAD) segments")
    _check_overlaps(segments)

    entry = _entry_address(phdrs, hdr.entry, addr_limit)
    if not any(s.addr <= entry < s.end for s in segments):
        shown = f"{hdr.entry:#x}" if entry == hdr.entry else \
            f"{hdr.entry:#x} (physical {entry:#x})"
        raise LoadError(f"entry point {shown} is outside every loadable segment")
    fmt = "elf32-multiboot" if mb else "elf64"
    return LoadPlan(fmt, arch, mode, entry, segments, mb)


def _entry_address(phdrs: List[_Phdr], e_entry: int, addr_limit: int) -> int:
    """The guest-physical entry of an ELF whose segments load by ``p_paddr``, by QEMU's rule
    (``load_elf`` in include/hw/elf_ops.h, used by -kernel on x86 multiboot and RISC-V):
    ``e_entry`` is translated by a ``PT_LOAD`` segment that is executable (``PF_X``), has
    ``p_vaddr != p_paddr`` and whose file bytes ``[p_vaddr, p_vaddr + p_filesz)`` hold it (the
    last such segment wins); otherwise ``e_entry`` is already physical (a higher-half kernel
    linked with ``ENTRY(_start - KERNEL_VMA)``). Arithmetic wraps at the class's address size."""
    entry = e_entry
    for ph in phdrs:
        if (ph.type == _PT_LOAD and ph.flags & PF_X and ph.vaddr != ph.paddr and
                ph.vaddr <= e_entry < ph.vaddr + ph.filesz):
            entry = (e_entry - ph.vaddr + ph.paddr) % addr_limit
    return entry


def _virt_to_phys(segments: List[Segment], vaddr: int, n: int = 1) -> Optional[int]:
    """The guest-physical address of ``[vaddr, vaddr + n)`` if one segment holds all of it
    (segments without a virtual address are identity-mapped)."""
    for s in segments:
        base = s.addr if s.vaddr is None else s.vaddr
        if base <= vaddr and vaddr + n <= base + s.memsz:
            return s.addr + (vaddr - base)
    return None


def _qemu_load_sizes(phdrs: List[_Phdr]) -> Dict[int, int]:
    """{program header index: bytes loaded} for each PT_LOAD, by QEMU's ``load_elf``
    (include/hw/elf_ops.h), which ``-kernel`` uses for multiboot ELF kernels and RISC-V
    images: a segment whose zero-filled tail ``[p_paddr + p_filesz, p_paddr + p_memsz)``
    overlaps another PT_LOAD's ``[p_paddr, p_paddr + p_memsz)`` (as given in its header; an
    empty one counts where it lies strictly inside the tail) is taken to be zeroed at run time
    by the image itself and is loaded as ``p_filesz`` bytes; every other segment as
    ``p_memsz`` bytes. GNU ld never emits such layouts, but hand-made and embedded-style images
    (BSS given as memsz but packed behind the next segment) do, and QEMU boots them.

    Work is O(n log n) in the number of program headers: the intervals are sorted by start,
    and for each tail the largest end among the intervals starting below the tail's end is
    looked up (the two largest are kept, so the segment itself can be left out)."""
    loads = [(ph.paddr, ph.paddr + ph.memsz, i) for i, ph in enumerate(phdrs)
             if ph.type == _PT_LOAD]
    sizes = {i: phdrs[i].memsz for _, _, i in loads}
    tails = [i for i in sizes if phdrs[i].memsz > phdrs[i].filesz]
    if not tails or len(loads) < 2:
        return sizes
    loads.sort()
    starts = [a for a, _, _ in loads]
    # best[k]: ((largest end, its index), second largest end) over loads[:k + 1]
    best, top, second = [], (-1, -1), -1
    for _, end, i in loads:
        if end > top[0]:
            top, second = (end, i), top[0]
        elif end > second:
            second = end
        best.append((top, second))
    for i in tails:
        ph = phdrs[i]
        lo, hi = ph.paddr + ph.filesz, ph.paddr + ph.memsz
        k = bisect.bisect_left(starts, hi) - 1       # loads[:k + 1] start below the tail's end
        if k < 0:
            continue
        (end, who), runner_up = best[k]
        other_end = runner_up if who == i else end
        if other_end > lo:
            sizes[i] = ph.filesz
    return sizes



def _params_symbol(image: Image, data: bytes, plan: LoadPlan) -> Optional[int]:
    """Guest-physical address of ``pykvm_params`` of an ELF image; for a flat binary given by
    path, of the ELF next to it (``guest.bin`` -> ``guest.elf``, as the guest build leaves
    them); None if there is none. The whole array must lie inside one loaded segment.

    Section headers and symbol tables do not decide whether an image boots: QEMU's
    ``load_elf`` reads symbols only for its debugger and boots an image whose tables are bad,
    so a malformed table, or a ``pykvm_params`` outside every loaded segment, means "no
    parameters" (:meth:`pykvm.machine.Machine.set_params` then says the image has none)."""
    if is_elf(data):
        try:
            value = find_symbol(data, PARAMS_SYMBOL)
        except LoadError:
            return None
        if value is None:
            return None
        return _virt_to_phys(plan.segments, value, PARAMS_SIZE)
    if isinstance(image, (str, os.PathLike)):
        try:
            elf = os.path.splitext(os.fspath(image))[0] + ".elf"
            if not os.path.isfile(elf):
                return None
            value = find_symbol(elf, PARAMS_SYMBOL)
        except (LoadError, OSError, ValueError):
            return None
        if value is None:
            return None
        return _virt_to_phys(plan.segments, value, PARAMS_SIZE)
    return None


# ---- symbols ------------------------------------------------------------------------------------

def _symbol_tables(elf: _Elf, shdrs: Optional[List[_Shdr]] = None
                   ) -> List[Tuple[int, _Shdr, _Shdr]]:
    """(section index, symbol table, its string table) for each distinct symbol table (by file
    offset and size), checked: in the file, right entry size, a string table that is one, and
    no two tables overlapping, so that the symbols read in all never exceed the file size.
    ``shdrs``: the section headers if already read."""
    data, cls = elf.data, elf.hdr.cls
    if shdrs is None:
        shdrs = _section_headers(elf)
    entsize = _SYM_SIZE[cls]
    out, seen = [], set()
    for i, sh in enumerate(shdrs):
        if sh.type not in (SHT_SYMTAB, SHT_DYNSYM) or sh.size == 0:
            continue
        key = (sh.offset, sh.size)
        if key in seen:
            continue                          # another header for a table already listed
        seen.add(key)
        if sh.entsize != entsize:
            raise LoadError(f"section {i}: bad symbol entry size {sh.entsize} (want {entsize})")
        if sh.size % entsize:
            raise LoadError(f"section {i}: symbol table size {sh.size:#x} is not a multiple of "
                            f"{entsize}")
        if sh.offset + sh.size > len(data):
            raise LoadError(f"image truncated: symbol table of section {i} ends at "
                            f"{sh.offset + sh.size:#x}, the file has {len(data):#x} bytes")
        if not 0 < sh.link < len(shdrs):
            raise LoadError(f"section {i}: string table index {sh.link} is not a section")
        st = shdrs[sh.link]
        if st.type != SHT_STRTAB:
            raise LoadError(f"section {i}: its string table (section {sh.link}) is not one")
        if st.offset + st.size > len(data):
            raise LoadError(f"image truncated: string table of section {sh.link} ends at "
                            f"{st.offset + st.size:#x}, the file has {len(data):#x} bytes")
        out.append((i, sh, st))
    ordered = sorted(out, key=lambda t: t[1].offset)
    for (i, a, _), (j, b, _) in zip(ordered, ordered[1:]):
        if a.offset + a.size > b.offset:
            raise LoadError(f"symbol tables of sections {i} and {j} overlap")
    total = sum(sh.size // entsize for _, sh, _ in out)
    if total > MAX_SYMBOLS:
        raise LoadError(f"too many ELF symbols: {total} (at most {MAX_SYMBOLS})")
    return out


def _read_symbols(elf: _Elf, data: bytes, sh: _Shdr, st: _Shdr,
                  want: Optional[bytes] = None) -> Iterator[Tuple[bytes, _Sym]]:
    """(name, :class:`_Sym`) of the named, defined symbols of one table (only those called
    ``want`` if given), the table checked by :func:`_symbol_tables` first (inside the file, its
    entry size the class's ``Elf_Sym``). A name is found with one bounded search in the string
    table (at most :data:`MAX_SYMBOL_NAME` bytes; longer or unterminated names are skipped), so
    the cost per symbol does not grow with the string table (reading each name up to the next
    NUL anywhere in the file, as pyelftools' ``iter_symbols`` does, is quadratic on a table
    whose names all point at one long unterminated run).

    Looking for ``want``: the string table is searched for ``want`` + NUL first (a C-speed
    scan), and a table that does not hold the name is not decoded at all."""
    str_lo, str_hi = st.offset, st.offset + st.size
    entsize = sh.entsize
    count = sh.size // entsize
    rec, make = _SYM_DECODE[elf.hdr.cls]
    if want is not None:
        key = want + b"\0"
        wanted, pos = set(), data.find(key, str_lo, str_hi)
        while pos >= 0:                  # names hold no NUL: matches never overlap
            wanted.add(pos - str_lo)
            pos = data.find(key, pos + len(key), str_hi)
        wanted.discard(0)
        if not wanted:
            return
        if len(wanted) <= _FEW_NAMES:
            # st_name is the first 4 bytes of an entry in either class (little-endian): find
            # the entries that name ``want`` with a C-speed scan per offset, decode only those
            first = sh.offset + sh.size
            hits = []
            for off in wanted:
                pat = off.to_bytes(4, "little")
                pos = data.find(pat, sh.offset, first)
                while pos >= 0:
                    if (pos - sh.offset) % entsize == 0:
                        hits.append(pos)
                    pos = data.find(pat, pos + 1, first)
            offsets = sorted(hits)
        else:                            # many copies of the name: decode every entry once
            offsets = range(sh.offset, sh.offset + count * entsize, entsize)
        for pos in offsets:
            sym = make(*rec.unpack_from(data, pos))
            if sym.name in wanted and sym.shndx != SHN_UNDEF:
                yield want, sym
        return
    table = memoryview(data)[sh.offset:sh.offset + count * entsize]   # entsize == rec.size
    for fields in rec.iter_unpack(table):
        sym = make(*fields)
        name_off = sym.name
        if name_off == 0 or sym.shndx == SHN_UNDEF or name_off >= st.size:
            continue
        start = str_lo + name_off
        end = data.find(b"\0", start, min(str_hi, start + MAX_SYMBOL_NAME + 1))
        if end > start:
            yield bytes(data[start:end]), sym


def _symbol_entries(image: Image, want: Optional[bytes] = None) -> Iterator[Tuple[bytes, _Sym]]:
    """(name, :class:`_Sym`) of every named, defined symbol of the ELF ``image``, table
    by table (nothing if it is not an ELF)."""
    data = _read_image(image)
    if not is_elf(data):
        return
    elf = _Elf(data)
    for _, sh, st in _symbol_tables(elf):
        yield from _read_symbols(elf, data, sh, st, want)


@_load_errors_only
def elf_symbols(image: Image) -> Dict[str, int]:
    """{name: value} of every named, defined symbol in the ELF's symbol tables, the first
    definition winning ({} if not an ELF). Each distinct table is read once; the symbols read
    are bounded by the file size and :data:`MAX_SYMBOLS`."""
    out: Dict[str, int] = {}
    for name, sym in _symbol_entries(image):
        out.setdefault(name.decode("utf-8", "replace"), sym.value)
    return out


@_load_errors_only
def find_symbol(image: Image, name: str) -> Optional[int]:
    """The value (address) of symbol ``name`` in an ELF image, or None."""
    if not isinstance(name, str) or not name or "\0" in name:
        raise LoadError(f"bad symbol name {name!r}")
    for _, sym in _symbol_entries(image, name.encode("utf-8", "surrogateescape")):
        return sym.value
    return None


@_load_errors_only
def _symbols_and_sections(data) -> Tuple[List[Tuple[bytes, _Sym]], List[_Shdr], Optional[_Elf]]:
    """([(name, :class:`_Sym`)...], section headers, the :class:`_Elf`) of ELF image
    bytes ``data``, every table checked as :func:`elf_symbols` checks it; ([], [], None) if
    ``data`` is not an ELF. For :class:`pykvm.boot.symbols.Symbols`. Raises LoadError."""
    if not is_elf(data):
        return [], [], None
    elf = _Elf(data)
    sections = _section_headers(elf)
    syms = [entry for _, sh, st in _symbol_tables(elf, sections)
            for entry in _read_symbols(elf, data, sh, st)]
    return syms, sections, elf
