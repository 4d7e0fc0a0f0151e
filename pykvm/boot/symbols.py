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

:class:`GuestGlobals` reads and writes the image's variables (``STT_OBJECT`` symbols, their size
the symbol's) in guest RAM by name: ``Machine.globals``, ``read_global``, ``write_global``.
"""
from __future__ import annotations

import bisect
import os

from .elf import (MAX_SYMBOL_NAME, SHN_ABS, SHN_UNDEF, SHT_NOBITS, STT_FUNC, STT_NOTYPE,
                  STT_OBJECT, _Elf, _Shdr, _Sym, _symbols_and_sections, _virt_to_phys)
from .image import LoadError, _read_image

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

    from .image import Segment

MAX_LINE_ROWS = 1 << 20        # DWARF line rows read at most (bounded work for a huge image)
MAX_DWARF_UNITS = 1 << 14      # compilation units looked at, at most
MAX_DWARF_BYTES = 256 << 20    # debug sections pyelftools copies into memory, at most
MAX_DWARF_STRING = MAX_SYMBOL_NAME    # longest string in .debug_str / .debug_line_str
MAX_DIES = 1 << 16             # DIEs call_site reads per look-up, at most
_MAX_RANGES = 1 << 12          # address ranges of one DIE looked at, at most
MAX_OBJECTS = 1 << 16          # variable names kept for look-up by name, at most
MAX_GLOBAL_SIZE = 1 << 24      # the largest variable GuestGlobals reads or writes (bytes)
_STB_LOCAL = 0
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
        self._dwarf = None                 # (DWARFInfo, [(unit, line program)]) once checked
        self._pending = None               # (ELF, sections) until the line table is read
        self._objects: Dict[str, List[Tuple[int, int, bool]]] = {}   # name -> [(addr, size,
                                                                     # global?)] of variables

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
        self._syms.sort()
        self._starts = [s[0] for s in self._syms]
        self._pending = (elf, sections)    # the DWARF is read on the first line look-up

    def _load_lines(self) -> None:
        """Read the line table (pyelftools is imported here, not for symbols)."""
        self._load()
        if self._pending is None:
            return
        elf, sections = self._pending
        self._pending = None
        try:
            self._read_lines(elf, sections)
        except Exception:                  # noqa: BLE001 — malformed DWARF: no lines
            self._lines = []
            self._dwarf = None
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
            if kind == STT_OBJECT and size and len(self._objects) < MAX_OBJECTS:
                self._objects.setdefault(name, []).append(
                    (start, size, (sym.info >> 4) != _STB_LOCAL))
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
        checked = []
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
            checked.append((programs[off], prog))
            self._dwarf = (dwarf, checked)     # the units checked so far: call_site's
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

    def variable(self, name: str) -> Tuple[int, int]:
        """(link address, size in bytes) of the variable ``name`` (an ``STT_OBJECT`` symbol of
        non-zero size: a C global or static). A global symbol wins over file-local ``static``
        ones of the same name; several statics and no global are ambiguous. Raises KeyError
        naming ``name`` when there is no such variable (or it is ambiguous)."""
        self._load()
        found = self._objects.get(name)
        if not found:
            raise KeyError(f"the guest image {self.path or '(none)'} has no variable {name!r}")
        glob = [f for f in found if f[2]]
        pick = glob if glob else found
        if len(pick) > 1:
            raise KeyError(f"{name!r} names {len(pick)} different variables in the guest image "
                           f"{self.path}")
        return pick[0][0], pick[0][1]

    def variables(self) -> List[str]:
        """The names :meth:`variable` may find, sorted."""
        self._load()
        return sorted(self._objects)

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
        self._load_lines()
        i = bisect.bisect_right(self._lines, (addr, "\U0010ffff", 1 << 62)) - 1
        if i < 0:
            return None
        _, name, line = self._lines[i]
        return (name, line) if name else None

    def call_site(self, addr: int) -> Optional[Tuple[str, int]]:
        """Where the code at ``addr`` was inlined in its compilation unit's own source file:
        (file, line) of the innermost inlined call (``DW_TAG_inlined_subroutine``'s
        ``DW_AT_call_file`` and ``DW_AT_call_line``, DWARF 5 section 3.3.8.2) covering ``addr``
        that was made from the unit's main file, or None when ``addr`` is not in inlined code
        (or the image has no such information). So a fault in ``wrmsr()`` of pykvm_guest.h,
        inlined into ``my_guest.c``, is placed at the line of ``my_guest.c`` that called it.
        Reads the DIEs of the units whose range holds ``addr``, at most :data:`MAX_DIES` in
        all; malformed DWARF gives None."""
        self._load_lines()
        if self._dwarf is None:
            return None
        try:
            main, chain = _inline_chain(*self._dwarf, addr)
        except Exception:                  # noqa: BLE001 — malformed DWARF: no call site
            return None
        return next((site for site in reversed(chain) if site[0] == main), None)

    def place(self, addr: int) -> Optional[Tuple[str, int]]:
        """(file, line) of ``addr`` in its compilation unit's own source file: the line table's
        row when it is in that file, else :meth:`call_site` (code inlined from a header), else
        the line table's row."""
        ln = self.line(addr)
        if ln is not None and ln[0].endswith((".c", ".S", ".s")):
            return ln
        return self.call_site(addr) or ln

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


def _pc_ranges(dwarf, cu, die) -> List[Tuple[int, int]]:
    """[(low, high)) address ranges of ``die`` (``DW_AT_low_pc``/``DW_AT_high_pc`` or
    ``DW_AT_ranges``; DWARF 5 section 2.17), at most :data:`_MAX_RANGES` of them."""
    at = die.attributes
    if "DW_AT_low_pc" in at and "DW_AT_high_pc" in at:
        lo, hi = at["DW_AT_low_pc"].value, at["DW_AT_high_pc"]
        end = hi.value if hi.form == "DW_FORM_addr" else lo + hi.value
        return [(lo, end)]
    if "DW_AT_ranges" not in at:
        return []
    base = cu.get_top_DIE().attributes.get("DW_AT_low_pc")
    base_addr = base.value if base is not None else 0
    out = []
    for e in dwarf.range_lists().get_range_list_at_offset(at["DW_AT_ranges"].value, cu=cu):
        if len(out) >= _MAX_RANGES:
            break
        if hasattr(e, "base_address"):
            base_addr = e.base_address
            continue
        off = 0 if getattr(e, "is_absolute", False) else base_addr
        out.append((e.begin_offset + off, e.end_offset + off))
    return out


def _file_name(prog, idx: int) -> str:
    files = prog["file_entry"]
    idx = idx if prog["version"] >= 5 else idx - 1
    name = files[idx].name if 0 <= idx < len(files) else b"?"
    if isinstance(name, bytes):
        name = name.decode("utf-8", "replace")
    return os.path.basename(name)


def _inline_chain(dwarf, units, addr: int) -> Tuple[str, List[Tuple[str, int]]]:
    """(the main file of the unit holding ``addr``, [(call file, call line)] of the inlined
    calls covering ``addr``, outermost first)."""
    budget = MAX_DIES
    for cu, prog in units:
        top = cu.get_top_DIE()
        spans = _pc_ranges(dwarf, cu, top)
        if spans and not any(lo <= addr < hi for lo, hi in spans):
            continue
        name = top.attributes.get("DW_AT_name")
        main = name.value if name is not None else b""
        if isinstance(main, bytes):
            main = main.decode("utf-8", "replace")
        main = os.path.basename(main)
        chain: List[Tuple[str, int]] = []
        stack = [iter(top.iter_children())]
        while stack:                       # depth first, into the DIEs that cover addr
            die = next(stack[-1], None)
            if die is None:
                stack.pop()
                continue
            budget -= 1
            if budget < 0:
                return main, chain
            if die.tag not in ("DW_TAG_subprogram", "DW_TAG_lexical_block",
                               "DW_TAG_inlined_subroutine"):
                continue
            if not any(lo <= addr < hi for lo, hi in _pc_ranges(dwarf, cu, die)):
                continue
            at = die.attributes
            if die.tag == "DW_TAG_inlined_subroutine" and "DW_AT_call_file" in at and \
                    "DW_AT_call_line" in at:
                chain.append((_file_name(prog, at["DW_AT_call_file"].value),
                              at["DW_AT_call_line"].value))
            if not die.has_children:
                break
            stack = [iter(die.iter_children())]   # the covering DIE's children only
        if chain:
            return main, chain
    return "", []


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


class GuestGlobals:
    """A guest image's variables by name, read and written in guest RAM (``m.globals``):
    ``g["counter"]`` reads a 1-, 2-, 4- or 8-byte variable as an unsigned little-endian int,
    ``g["counter"] = 5`` writes one; :meth:`read_bytes`/:meth:`write` work for any size (arrays,
    structs). The size is the ELF symbol's.

    ``symbols``: :class:`Symbols`; ``memory``: guest memory (``read(gpa, n)``,
    ``write(gpa, data)``, bounds-checked: a variable outside guest RAM raises
    :class:`pykvm.errors.GuestMemoryError`); ``segments``: the loaded image's
    :class:`pykvm.Segment` list, which turns a link address into a guest-physical one (a
    variable outside every segment raises KeyError); None: link address = guest-physical."""

    def __init__(self, symbols: Symbols, memory, segments: Optional[Sequence[Segment]] = None):
        self.symbols, self.memory = symbols, memory
        self._segments = None if segments is None else list(segments)

    def _to_gpa(self, addr: int, size: int) -> Optional[int]:
        if self._segments is None:
            return addr
        return _virt_to_phys(self._segments, addr, size)

    def where(self, name: str) -> Tuple[int, int]:
        """(guest-physical address, size in bytes) of variable ``name``. Raises KeyError naming
        it when the image has no such variable or does not load it, ValueError for one larger
        than :data:`MAX_GLOBAL_SIZE`."""
        addr, size = self.symbols.variable(name)
        if size > MAX_GLOBAL_SIZE:
            raise ValueError(f"guest variable {name!r} is {size} bytes, more than the "
                             f"{MAX_GLOBAL_SIZE} read at once")
        gpa = self._to_gpa(addr, size)
        if gpa is None:
            raise KeyError(f"guest variable {name!r} at {addr:#x} ({size} bytes) is not in a "
                           f"loaded segment of the image")
        return gpa, size

    def read_bytes(self, name: str) -> bytes:
        """The bytes of variable ``name`` (its whole ELF size)."""
        gpa, size = self.where(name)
        return self.memory.read(gpa, size)

    def write(self, name: str, value: Union[int, bytes]) -> None:
        """Store ``value`` in variable ``name``: an int (unsigned or negative, encoded
        little-endian in the variable's size; ValueError if it does not fit) or exactly as many
        bytes as the variable has (ValueError otherwise)."""
        gpa, size = self.where(name)
        if isinstance(value, bool) or not isinstance(value, (int, bytes, bytearray)):
            raise TypeError(f"a guest variable takes an int or bytes, not {type(value).__name__}")
        if isinstance(value, int):
            if not -(1 << (8 * size - 1)) <= value < (1 << (8 * size)):
                raise ValueError(f"{value} does not fit guest variable {name!r} ({size} bytes)")
            data = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")
        else:
            data = bytes(value)
            if len(data) != size:
                raise ValueError(f"guest variable {name!r} is {size} bytes, not {len(data)}")
        self.memory.write(gpa, data)

    def __getitem__(self, name: str) -> int:
        """Variable ``name`` as an unsigned int (ValueError for a size other than 1, 2, 4 or 8:
        use :meth:`read_bytes`)."""
        gpa, size = self.where(name)
        if size not in (1, 2, 4, 8):
            raise ValueError(f"guest variable {name!r} is {size} bytes, not an integer: read "
                             f"it with read_bytes()")
        return int.from_bytes(self.memory.read(gpa, size), "little")

    def __setitem__(self, name: str, value: Union[int, bytes]) -> None:
        self.write(name, value)

    def __contains__(self, name: object) -> bool:
        if not isinstance(name, str):
            return False
        try:
            self.where(name)
        except (KeyError, ValueError):
            return False
        return True

    def __iter__(self) -> Iterator[str]:
        return iter(self.symbols.variables())
