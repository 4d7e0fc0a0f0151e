"""Guest addresses in the guest's own terms: the function symbol (ELF ``.symtab``) and, where the
image carries DWARF line tables (``-g``), the source file and line of an address — for messages
such as an emulation failure's (``RIP 0x200006 (bad_insn+0x0, guest.S:8)``).

Only ELF images have symbols; a flat binary, a bzImage or an image given as bytes has none and
:meth:`Symbols.describe` then returns "". Reading is bounded: the file is opened once, on the
first look-up (pyelftools parses lazily), and a malformed symbol table or DWARF section gives
no answer rather than an error.
"""
import bisect
import os
import stat
from typing import List, Optional, Tuple

MAX_LINE_ROWS = 1 << 20        # DWARF line rows read at most (bounded work for a huge image)


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
            if not stat.S_ISREG(os.stat(self.path).st_mode):
                return
            from elftools.elf.elffile import ELFFile
            with open(self.path, "rb") as f:
                if f.read(4) != b"\x7fELF":
                    return
                f.seek(0)
                elf = ELFFile(f)
                self._read_symbols(elf)
                self._read_lines(elf)
        except Exception:                  # noqa: BLE001 — a malformed image: no symbols
            self._syms, self._lines = [], []
        self._syms.sort()
        self._starts = [s[0] for s in self._syms]
        self._lines.sort()

    def _read_symbols(self, elf) -> None:
        tab = elf.get_section_by_name(".symtab")
        if tab is None:
            return
        # where each allocated section ends: a label (a symbol of size 0) reaches no further
        ends = sorted((sec["sh_addr"], sec["sh_addr"] + sec["sh_size"]) for sec in
                      elf.iter_sections() if sec["sh_flags"] & 2 and sec["sh_size"])   # SHF_ALLOC
        for sym in tab.iter_symbols():
            kind = sym["st_info"]["type"]
            if kind not in ("STT_FUNC", "STT_NOTYPE", "STT_OBJECT") or not sym.name:
                continue
            if sym["st_shndx"] in ("SHN_UNDEF", "SHN_ABS"):
                continue
            if kind == "STT_NOTYPE" and sym.name.startswith((".L", "$")):
                continue                   # assembler-local labels and mapping symbols
            start, size = sym["st_value"], sym["st_size"]
            if not size:
                size = next((hi - start for lo, hi in ends if lo <= start < hi), 0)
                if not size:
                    continue                   # a label past every section (_end, _edata)
                size = -size                   # a label: up to the next symbol, at most this
            self._syms.append((start, size, sym.name))

    def _read_lines(self, elf) -> None:
        if not elf.has_dwarf_info():
            return
        dwarf = elf.get_dwarf_info()
        rows = 0
        for cu in dwarf.iter_CUs():
            prog = dwarf.line_program_for_CU(cu)
            if prog is None:
                continue
            files = prog["file_entry"]
            version = prog["version"]
            for entry in prog.get_entries():
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
