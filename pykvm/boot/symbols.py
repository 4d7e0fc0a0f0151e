"""Guest addresses in the guest's own terms: the function symbol (ELF symbol tables) and, where
the image carries DWARF line tables (``-g``), the source file and line of an address — for
messages such as an emulation failure's (``RIP 0x200006 (bad_insn+0x0, guest.S:8)``).

Only ELF images have symbols; a flat binary, a bzImage or an image given as bytes has none and
:meth:`Symbols.describe` then returns "". The image is read once, on the first look-up, through
the loader's reader (:func:`pykvm.boot.image._read_image`: regular files only, bounded in
size) and its symbols by the loader's ELF reader (:mod:`pykvm.boot.elf`: bounds checks, then
the fixed ELF records decoded with :mod:`struct`). Line tables are read with pyelftools' DWARF
reader (DWARF 5 section 6.2, "Line Number Information"; pyelftools is imported then, on the
first line look-up, not when an image boots) only after checks that keep hostile DWARF linear in the file's size:
section names bounded, no compressed sections (a decompression bomb), strings in .debug_str and
.debug_line_str shorter than :data:`MAX_DWARF_STRING`, at most :data:`MAX_DWARF_UNITS`
compilation units whose abbreviation tables and line programs do not overlap, at most
:data:`MAX_LINE_ROWS` rows. A malformed symbol table gives no symbols and malformed DWARF no
lines, never an error.
"""
from __future__ import annotations

import bisect
import os

from .elf import (MAX_SYMBOL_NAME, SHN_ABS, SHN_UNDEF, SHT_NOBITS, STT_FUNC, STT_NOTYPE,
                  STT_OBJECT, _Elf, _Shdr, _Sym, _symbols_and_sections)
from .image import LoadError, _read_image

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import List, Optional, Tuple

MAX_LINE_ROWS = 1 << 20        # DWARF line rows read at most (bounded work for a huge image)
MAX_DWARF_UNITS = 1 << 14      # compilation units looked at, at most
MAX_DWARF_BYTES = 256 << 20    # debug sections pyelftools copies into memory, at most
MAX_DWARF_STRING = MAX_SYMBOL_NAME    # longest string in .debug_str / .debug_line_str
_MAX_SECTION_NAME = 256        # longest section name looked up (bytes)
_SHF_ALLOC, _SHF_COMPRESSED = 0x2, 0x800
_SHN_XINDEX = 0xFFFF
_DEBUG_STRINGS = (".debug_str", ".debug_line_str")


class _NoDwarf(Exception):
    """The image's DWARF is absent or fails a bound: no line information."""


class Symbols:
    """The function/object symbols and line table of one ELF image, by address.

    ``path``: the image (None: no symbols). Addresses are the image's link addresses (x86-64
    and RISC-V guests run at them: virtual = physical for pykvm's loaders)."""

    def __init__(self, path: Optional[str] = None):
        self.path = path
        self._loaded = False
        self._starts: List[int] = []
        self._syms: List[Tuple[int, int, str]] = []         # (start, size, name), by start;
        # size < 0: a label, reaching -size bytes at most (to its section's end)
        self._lines: List[Tuple[int, str, int]] = []        # (address, file, line), by address

    @classmethod
    def from_image(cls, image) -> "Symbols":
        """Symbols of ``image`` (a path; anything else has none)."""
        return cls(image if isinstance(image, str) else None)

    def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        if not self.path:
            return
        try:
            data = _read_image(self.path, what="symbol image")
            syms, sections, elf = _symbols_and_sections(data)
        except (LoadError, OSError, ValueError):
            return                         # not readable, or a malformed image: no symbols
        if elf is None:
            return
        self._read_symbols(syms, sections)
        try:
            self._read_lines(elf, sections)
        except Exception:                  # noqa: BLE001 — malformed DWARF: no lines
            self._lines = []
        self._syms.sort()
        self._starts = [s[0] for s in self._syms]
        self._lines.sort()

    def _read_symbols(self, syms: List[Tuple[bytes, _Sym]], sections: List[_Shdr]) -> None:
        # where each allocated section ends: a label (a symbol of size 0) reaches no further
        ends = sorted((sec.addr, sec.addr + sec.size) for sec in sections
                      if sec.flags & _SHF_ALLOC and sec.size)
        for raw, sym in syms:
            kind = sym.info & 0xF                 # ELF32_ST_TYPE / ELF64_ST_TYPE
            if kind not in (STT_FUNC, STT_NOTYPE, STT_OBJECT):
                continue
            if sym.shndx in (SHN_UNDEF, SHN_ABS):
                continue
            name = raw.decode("utf-8", "replace")
            if kind == STT_NOTYPE and name.startswith((".L", "$")):
                continue                   # assembler-local labels and mapping symbols
            start, size = sym.value, sym.size
            if not size:
                size = next((hi - start for lo, hi in ends if lo <= start < hi), 0)
                if not size:
                    continue                   # a label past every section (_end, _edata)
                size = -size                   # a label: up to the next symbol, at most this
            self._syms.append((start, size, name))

    def _read_lines(self, elf: _Elf, sections: List[_Shdr]) -> None:
        try:
            debug = _dwarf_sections(elf, sections)
        except _NoDwarf:
            return
        data = elf.data
        dwarf = elf.elffile().get_dwarf_info(relocate_dwarf_sections=False)
        units = []
        for n, cu in enumerate(dwarf.iter_CUs()):      # CU headers only, one after another
            if n >= MAX_DWARF_UNITS:
                break
            units.append(cu)
        # abbreviation tables in offset order, each ending before the next begins (else one
        # table's bytes would be parsed again for every unit pointing into it)
        abbrev_stream = dwarf.debug_abbrev_sec.stream
        end = 0
        for off in sorted({cu["debug_abbrev_offset"] for cu in units}):
            if off < end:
                return
            dwarf.get_abbrev_table(off)
            end = abbrev_stream.tell()
        # each unit's first DIE, read within its unit; its DW_AT_stmt_list names its program
        info_stream = dwarf.debug_info_sec.stream
        programs = {}
        for cu in units:
            top = cu.get_top_DIE()
            unit_end = cu.cu_offset + cu["unit_length"] + cu.structs.initial_length_field_size()
            if info_stream.tell() > unit_end:
                return
            attr = top.attributes.get("DW_AT_stmt_list")
            if attr is not None and isinstance(attr.value, int):
                programs.setdefault(attr.value, cu)
        # line programs in offset order, inside .debug_line and not overlapping (their length
        # is read here first: pyelftools decodes a whole program at once)
        line_lo, line_size = debug[".debug_line"]
        line_stream = dwarf.debug_line_sec.stream
        end, rows = 0, 0
        for off in sorted(programs):
            prog_end = _unit_end(data, line_lo, line_size, off)
            if off < end or prog_end is None:
                return
            end = prog_end
            prog = dwarf.line_program_for_CU(programs[off])
            if prog is None:
                continue
            entries = prog.get_entries()
            if line_stream.tell() > prog_end:
                return
            files = prog["file_entry"]
            version = prog["version"]
            for entry in entries:
                st = entry.state
                if st is None:
                    continue
                rows += 1
                if st.end_sequence:            # the addresses from here are not this file's
                    self._lines.append((st.address, "", 0))
                    continue
                if rows > MAX_LINE_ROWS:
                    return
                idx = st.file if version >= 5 else st.file - 1
                name = files[idx].name if 0 <= idx < len(files) else b"?"
                if isinstance(name, bytes):
                    name = name.decode("utf-8", "replace")
                self._lines.append((st.address, os.path.basename(name), st.line))

    def symbol(self, addr: int) -> Optional[Tuple[str, int]]:
        """(name, offset) of the symbol whose range holds ``addr`` (a symbol of size 0 — an
        assembler label — holds the addresses up to the next symbol), or None."""
        self._load()
        i = bisect.bisect_right(self._starts, addr) - 1
        # the nearest symbol at or below addr that covers it: a sized one by its size, a label
        # (negative size: its section's rest) up to the next symbol
        for j in range(i, max(i - 64, -1), -1):
            start, size, name = self._syms[j]
            if size > 0 and addr < start + size:
                return name, addr - start
            if size < 0 and j == i and addr < start - size:
                return name, addr - start
        return None

    def line(self, addr: int) -> Optional[Tuple[str, int]]:
        """(file, line) of the DWARF line row that covers ``addr``, or None."""
        self._load()
        i = bisect.bisect_right(self._lines, (addr, "\U0010ffff", 1 << 62)) - 1
        if i < 0:
            return None
        _, name, line = self._lines[i]
        return (name, line) if name else None

    def describe(self, addr: int) -> str:
        """``"name+0x6, file.c:12"``, the parts that are known, or ""."""
        parts = []
        sym = self.symbol(addr)
        if sym is not None:
            parts.append(f"{sym[0]}+{sym[1]:#x}")
        ln = self.line(addr)
        if ln is not None:
            parts.append(f"{ln[0]}:{ln[1]}")
        return ", ".join(parts)


def _dwarf_sections(elf: _Elf, sections: List[_Shdr]) -> dict:
    """{name: (file offset, size)} of the ``.debug_*`` sections, after the checks that let
    pyelftools' ``get_dwarf_info`` run in time linear in the file: it looks every section's
    name up (so each must end within :data:`_MAX_SECTION_NAME` bytes of the section name
    table), copies each debug section (so they must lie in the file and total at most
    :data:`MAX_DWARF_BYTES`), would inflate compressed ones (refused: a zlib bomb) and reads
    strings up to the next NUL (so no run in .debug_str or .debug_line_str may exceed
    :data:`MAX_DWARF_STRING`). Raises :class:`_NoDwarf`."""
    data, h = elf.data, elf.hdr
    if not sections:
        raise _NoDwarf
    index = sections[0].link if h.shstrndx == _SHN_XINDEX else h.shstrndx
    if not 0 < index < len(sections):
        raise _NoDwarf
    names = sections[index]
    if names.offset + names.size > len(data):
        raise _NoDwarf
    debug, total = {}, 0
    for sec in sections:
        if sec.name >= names.size:
            raise _NoDwarf
        start = names.offset + sec.name
        stop = data.find(b"\0", start, min(names.offset + names.size,
                                            start + _MAX_SECTION_NAME + 1))
        if stop < 0:
            raise _NoDwarf
        name = bytes(data[start:stop])
        if sec.flags & _SHF_COMPRESSED or name.startswith(b".zdebug"):
            raise _NoDwarf
        if name.startswith(b".debug_") or name == b".eh_frame":
            if sec.type != SHT_NOBITS:
                if sec.offset + sec.size > len(data):
                    raise _NoDwarf
                total += sec.size
            debug[name.decode("ascii", "replace")] = (sec.offset, sec.size)
    if ".debug_info" not in debug or ".debug_line" not in debug or total > MAX_DWARF_BYTES:
        raise _NoDwarf
    for name in _DEBUG_STRINGS:
        if name in debug:
            lo, size = debug[name]
            pos, hi = lo, lo + size
            while pos < hi:                    # every string ends within the bound
                nul = data.find(b"\0", pos, min(hi, pos + MAX_DWARF_STRING + 1))
                if nul < 0:
                    if hi - pos > MAX_DWARF_STRING:
                        raise _NoDwarf
                    break
                pos = nul + 1
    return debug


def _unit_end(data, lo: int, size: int, off: int) -> Optional[int]:
    """Offset (within its section) one past the DWARF unit at ``off`` of the section at file
    offset ``lo`` of ``size`` bytes, from its initial length (DWARF 5 section 7.4: 32-bit, or
    0xffffffff and a 64-bit length); None if it does not lie wholly inside the section."""
    if off + 4 > size:
        return None
    length = int.from_bytes(data[lo + off:lo + off + 4], "little")
    head = 4
    if length == 0xFFFFFFFF:
        if off + 12 > size:
            return None
        length, head = int.from_bytes(data[lo + off + 4:lo + off + 12], "little"), 12
    elif length >= 0xFFFFFFF0:
        return None
    end = off + head + length
    return end if end <= size else None
