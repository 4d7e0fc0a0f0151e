"""Guest image loader: ELF64, ELF32 + multiboot v1 (including the a.out kludge) and flat binaries.

Loading happens in three steps, each usable on its own:

1. :func:`parse_image` turns the file into a :class:`LoadPlan` (segments, entry, boot mode);
   nothing touches guest memory yet, and every structural problem raises :class:`LoadError`.
2. :meth:`LoadPlan.validate` checks the plan against the guest's RAM (and the VMM's reserved
   window on x86).
3. :func:`write_plan` copies the segments into guest memory and zero-fills their tails.

:func:`load_image` does all three and, for multiboot images, also writes the multiboot
information structure. The memory object only needs ``size``, ``write(gpa, data)`` and
``read(gpa, n)``.
"""
from __future__ import annotations

import io
import os
import struct
from dataclasses import dataclass, field
from typing import List, Optional, Tuple, Union

from elftools.elf.elffile import ELFFile
from elftools.elf.sections import SymbolTableSection

from .arch.x86 import layout as x86_layout
from .errors import PykvmError

Image = Union[bytes, bytearray, memoryview, str, os.PathLike]

# ELF constants (from the ELF specification)
_ELF_MAGIC = b"\x7fELF"
_ELFCLASS32, _ELFCLASS64 = 1, 2
_ELFDATA2LSB = 1
_PT_LOAD = 1
_PF_X, _PF_W, _PF_R = 1, 2, 4

# multiboot v1 constants (from the multiboot specification)
MULTIBOOT_HEADER_MAGIC = 0x1BADB002
MULTIBOOT_BOOT_MAGIC = 0x2BADB002
MULTIBOOT_SEARCH_LEN = 8192
MB_HDR_PAGE_ALIGN = 1 << 0
MB_HDR_MEMORY_INFO = 1 << 1
MB_HDR_VIDEO_MODE = 1 << 2
MB_HDR_AOUT_KLUDGE = 1 << 16
_MB_HDR_UNSUPPORTED = 0xFFF8          # required-feature bits 3..15: none defined, none supported

MBI_FLAG_MEM = 1 << 0
MBI_FLAG_BOOT_DEVICE = 1 << 1
MBI_FLAG_CMDLINE = 1 << 2
MBI_FLAG_MODS = 1 << 3
MBI_FLAG_MMAP = 1 << 6
MBI_FLAG_BOOT_LOADER_NAME = 1 << 9

E820_RAM = 1
E820_RESERVED = 2

# what each supported architecture accepts: ELF class -> (e_machine name, boot mode)
_ARCHES = {
    "x86_64": {_ELFCLASS64: ("EM_X86_64", "long"), _ELFCLASS32: ("EM_386", "protected")},
    "riscv64": {_ELFCLASS64: ("EM_RISCV", "riscv")},
}
_MACHINE_NAMES = {"EM_X86_64": "x86-64", "EM_386": "i386", "EM_RISCV": "RISC-V"}


class LoadError(PykvmError, ValueError):
    """The image cannot be loaded; the message names the problem."""


@dataclass(frozen=True)
class Segment:
    """One piece of the image: ``data`` goes to guest-physical ``addr``; bytes from
    ``len(data)`` up to ``memsz`` are zero-filled."""
    addr: int
    data: bytes
    memsz: int
    flags: int = _PF_R | _PF_W | _PF_X
    vaddr: Optional[int] = None
    index: int = 0                    # program header index (for messages)

    @property
    def filesz(self) -> int:
        return len(self.data)

    @property
    def end(self) -> int:
        return self.addr + self.memsz

    def describe(self) -> str:
        return f"segment {self.index} [{self.addr:#x}, {self.end:#x})"


@dataclass(frozen=True)
class MultibootHeader:
    offset: int                       # file offset of the header
    flags: int
    checksum: int
    header_addr: int = 0
    load_addr: int = 0
    load_end_addr: int = 0
    bss_end_addr: int = 0
    entry_addr: int = 0
    mode_type: int = 0
    width: int = 0
    height: int = 0
    depth: int = 0

    @property
    def aout_kludge(self) -> bool:
        return bool(self.flags & MB_HDR_AOUT_KLUDGE)


@dataclass
class LoadPlan:
    """Where every byte of an image goes, the entry point and the boot mode."""
    format: str                       # "elf64", "elf32-multiboot", "multiboot-aout", "flat"
    arch: str                         # "x86_64" or "riscv64"
    mode: str                         # "long", "protected", "real" or "riscv"
    entry: int                        # guest-physical entry address
    segments: List[Segment] = field(default_factory=list)
    multiboot: Optional[MultibootHeader] = None

    @property
    def low(self) -> int:
        return min((s.addr for s in self.segments), default=0)

    @property
    def high(self) -> int:
        return max((s.end for s in self.segments), default=0)

    def validate(self, ram_size: int, *, ram_base: int = 0,
                 reserved: Optional[Tuple[int, int]] = "default") -> None:
        """Check every segment against RAM ``[ram_base, ram_base + ram_size)`` and against the
        ``reserved`` window (default: the x86 VMM window, except for real-mode images;
        ``None``: no reserved window). Raises :class:`LoadError`."""
        validate_plan(self, ram_size, ram_base=ram_base, reserved=reserved)


@dataclass
class LoadedImage:
    """What :func:`load_image` did."""
    plan: LoadPlan
    entry: int
    mode: str
    multiboot_info: Optional[int] = None    # address of the multiboot info (EBX), if any
    params_addr: Optional[int] = None       # address of ``pykvm_params``, if the ELF has it

    @property
    def boot_regs(self) -> dict:
        """Register values the boot protocol asks for (multiboot: EAX and EBX)."""
        if self.multiboot_info is not None:
            return {"eax": MULTIBOOT_BOOT_MAGIC, "ebx": self.multiboot_info}
        return {}


# ---- input ----------------------------------------------------------------------------------

def _read_image(image: Image) -> bytes:
    if isinstance(image, (bytes, bytearray, memoryview)):
        return bytes(image)
    try:
        with open(image, "rb") as f:
            return f.read()
    except OSError as e:
        raise LoadError(f"cannot read guest image {os.fspath(image)!r}: {e.strerror}") from e


def is_elf(data: bytes) -> bool:
    return data[:4] == _ELF_MAGIC


# ---- multiboot --------------------------------------------------------------------------------

def find_multiboot_header(data: bytes) -> Optional[MultibootHeader]:
    """The first valid multiboot v1 header in the first 8 KiB (4-byte aligned, checksum OK),
    or None. Raises :class:`LoadError` if the header is cut off by the end of the file."""
    limit = min(len(data), MULTIBOOT_SEARCH_LEN)
    magic = struct.pack("<I", MULTIBOOT_HEADER_MAGIC)
    off = data.find(magic, 0, limit)
    while off >= 0:
        if off % 4 == 0:
            if off + 12 > len(data):
                raise LoadError(f"multiboot header at offset {off:#x} is truncated")
            m, flags, csum = struct.unpack_from("<III", data, off)
            if (m + flags + csum) & 0xFFFFFFFF == 0:
                extra = [0] * 9
                if flags & (MB_HDR_AOUT_KLUDGE | MB_HDR_VIDEO_MODE):
                    n = 9 if flags & MB_HDR_VIDEO_MODE else 5
                    if off + 12 + 4 * n > len(data):
                        raise LoadError(f"multiboot header at offset {off:#x} is truncated "
                                        f"(flags {flags:#x} need {12 + 4 * n} bytes)")
                    extra[:n] = struct.unpack_from(f"<{n}I", data, off + 12)
                return MultibootHeader(off, flags, csum, *extra)
        off = data.find(magic, off + 1, limit)
    return None


def _check_multiboot_flags(h: MultibootHeader) -> None:
    bad = h.flags & _MB_HDR_UNSUPPORTED
    if bad:
        raise LoadError(f"multiboot header asks for unsupported features (flags {bad:#x})")


def parse_multiboot_aout(data: bytes, h: MultibootHeader) -> LoadPlan:
    """A plan from a multiboot header's a.out-kludge address fields (flag bit 16)."""
    if h.load_addr > h.header_addr:
        raise LoadError(f"multiboot header: load_addr {h.load_addr:#x} is above header_addr "
                        f"{h.header_addr:#x}")
    start = h.offset - (h.header_addr - h.load_addr)
    if start < 0:
        raise LoadError(f"multiboot header: header_addr - load_addr "
                        f"({h.header_addr - h.load_addr:#x}) is larger than the header's file "
                        f"offset ({h.offset:#x})")
    if h.load_end_addr:
        if h.load_end_addr < h.load_addr:
            raise LoadError(f"multiboot header: load_end_addr {h.load_end_addr:#x} is below "
                            f"load_addr {h.load_addr:#x}")
        size = h.load_end_addr - h.load_addr
        if start + size > len(data):
            raise LoadError(f"image truncated: multiboot load range needs {start + size:#x} "
                            f"bytes of file, it has {len(data):#x}")
    else:
        size = len(data) - start
    memsz = size
    if h.bss_end_addr:
        if h.bss_end_addr < h.load_addr + size:
            raise LoadError(f"multiboot header: bss_end_addr {h.bss_end_addr:#x} is below the "
                            f"end of the loaded data {h.load_addr + size:#x}")
        memsz = h.bss_end_addr - h.load_addr
    seg = Segment(h.load_addr, data[start:start + size], memsz)
    if not seg.addr <= h.entry_addr < seg.end or memsz == 0:
        raise LoadError(f"entry point {h.entry_addr:#x} is outside the loaded image "
                        f"[{seg.addr:#x}, {seg.end:#x})")
    return LoadPlan("multiboot-aout", "x86_64", "protected", h.entry_addr, [seg], h)


def build_multiboot_info(ram_size: int, cmdline: str = "", *,
                         addr: int = x86_layout.MULTIBOOT_INFO_ADDR,
                         size: int = x86_layout.MULTIBOOT_INFO_SIZE,
                         loader_name: str = "pykvm") -> bytes:
    """The multiboot information block, as QEMU's ``-kernel`` builds it, to be written at
    ``addr``: flags MEM | BOOT_DEVICE | CMDLINE | MODS (none) | MMAP | BOOT_LOADER_NAME,
    mem_lower = 640, mem_upper = (RAM below 4 GiB - 1 MiB) / 1 KiB, an e820 memory map, the
    command line and the boot loader name. Everything fits in ``size`` bytes."""
    info_len = 0x80                           # the fixed part (0x78 bytes) rounded up
    ranges = _e820(ram_size)
    mmap = b"".join(struct.pack("<IQQI", 20, base, length, kind) for base, length, kind in ranges)
    name = loader_name.encode() + b"\0"
    cmd = cmdline.encode() + b"\0"
    mmap_addr = addr + info_len
    name_addr = mmap_addr + len(mmap)
    cmd_addr = name_addr + len(name)
    total = cmd_addr + len(cmd) - addr
    if total > size:
        raise LoadError(f"command line too long for the multiboot information area "
                        f"({len(cmd)} bytes, room for {size - (cmd_addr - addr)})")
    low = min(ram_size, 640 * 1024)
    upper = max(0, min(ram_size, 4 << 30) - (1 << 20)) // 1024
    info = bytearray(info_len)
    struct.pack_into("<IIIII", info, 0,
                     MBI_FLAG_MEM | MBI_FLAG_BOOT_DEVICE | MBI_FLAG_CMDLINE | MBI_FLAG_MODS |
                     MBI_FLAG_MMAP | MBI_FLAG_BOOT_LOADER_NAME,
                     low // 1024, min(upper, 0xFFFFFFFF), 0x8000FFFF, cmd_addr)
    struct.pack_into("<II", info, 20, 0, mmap_addr)        # mods_count, mods_addr (empty list)
    struct.pack_into("<II", info, 44, len(mmap), mmap_addr)
    struct.pack_into("<I", info, 64, name_addr)
    return bytes(info) + mmap + name + cmd


def _e820(ram_size: int) -> List[Tuple[int, int, int]]:
    """The e820 map of a pykvm x86 guest: RAM is contiguous from 0; the classic legacy holes
    (EBDA tail, BIOS area) are reported reserved."""
    out = []
    low_end = min(ram_size, 0x9FC00)
    if low_end:
        out.append((0, low_end, E820_RAM))
    if ram_size > 0x9FC00:
        out.append((0x9FC00, 0x400, E820_RESERVED))
    if ram_size > 0xF0000:
        out.append((0xF0000, 0x10000, E820_RESERVED))
    if ram_size > 0x100000:
        out.append((0x100000, ram_size - 0x100000, E820_RAM))
    return out


# ---- ELF ----------------------------------------------------------------------------------------

def parse_elf(data: bytes, *, arch: str = "x86_64") -> LoadPlan:
    """A plan from an ELF executable. x86_64: ELF64 (long mode, needs p_paddr == p_vaddr) or
    ELF32 i386 with a multiboot header (protected mode, loaded by p_paddr, or by the a.out
    kludge fields when header flag bit 16 is set). riscv64: ELF64 loaded by p_paddr."""
    if arch not in _ARCHES:
        raise LoadError(f"unknown architecture {arch!r} (known: {', '.join(_ARCHES)})")
    if len(data) < 16:
        raise LoadError(f"image truncated: {len(data)} bytes is too short for an ELF header")
    if not is_elf(data):
        raise LoadError("not an ELF file (bad magic)")
    cls, enc = data[4], data[5]
    if cls not in (_ELFCLASS32, _ELFCLASS64):
        raise LoadError(f"bad ELF class {cls}")
    if enc != _ELFDATA2LSB:
        raise LoadError("ELF file is not little-endian")
    allowed = _ARCHES[arch]
    if cls not in allowed:
        raise LoadError(f"{arch} cannot boot a {32 if cls == _ELFCLASS32 else 64}-bit ELF")
    want_machine, mode = allowed[cls]
    ehsize = 52 if cls == _ELFCLASS32 else 64
    if len(data) < ehsize:
        raise LoadError(f"image truncated: {len(data)} bytes is too short for the ELF header "
                        f"({ehsize} bytes)")
    try:
        elf = ELFFile(io.BytesIO(data))
        hdr = elf.header
    except Exception as e:        # pyelftools raises ELFError and assorted others on garbage
        raise LoadError(f"malformed ELF header: {e}") from e

    machine = hdr["e_machine"]
    if machine != want_machine:
        got = _MACHINE_NAMES.get(machine, str(machine))
        raise LoadError(f"wrong machine: {got} ELF, {arch} needs "
                        f"{_MACHINE_NAMES[want_machine]}")
    if hdr["e_type"] != "ET_EXEC":
        raise LoadError(f"not an executable ELF (e_type {hdr['e_type']}); link with a fixed "
                        f"address (-no-pie, -static)")
    phnum, phentsize, phoff = hdr["e_phnum"], hdr["e_phentsize"], hdr["e_phoff"]
    if phnum == 0:
        raise LoadError("ELF has no program headers")
    if phentsize != (32 if cls == _ELFCLASS32 else 56):
        raise LoadError(f"bad ELF program header size {phentsize}")
    if phoff + phnum * phentsize > len(data):
        raise LoadError(f"image truncated: program headers end at {phoff + phnum * phentsize:#x}"
                        f", the file has {len(data):#x} bytes")

    mb = None
    if arch == "x86_64" and cls == _ELFCLASS32:
        mb = find_multiboot_header(data)
        if mb is None:
            raise LoadError("32-bit ELF without a multiboot v1 header in its first 8 KiB "
                            "(or its checksum is wrong)")
        _check_multiboot_flags(mb)
        if mb.aout_kludge:
            plan = parse_multiboot_aout(data, mb)
            plan.format = "elf32-multiboot"
            return plan

    segments = []
    for i in range(phnum):
        try:
            ph = elf.get_segment(i).header
        except Exception as e:
            raise LoadError(f"malformed program header {i}: {e}") from e
        if ph["p_type"] not in ("PT_LOAD", _PT_LOAD):
            continue
        off, filesz, memsz = ph["p_offset"], ph["p_filesz"], ph["p_memsz"]
        paddr, vaddr = ph["p_paddr"], ph["p_vaddr"]
        if filesz > memsz:
            raise LoadError(f"segment {i}: p_filesz {filesz:#x} is larger than p_memsz "
                            f"{memsz:#x}")
        if off + filesz > len(data):
            raise LoadError(f"image truncated: segment {i} needs file bytes up to "
                            f"{off + filesz:#x}, the file has {len(data):#x}")
        if memsz == 0:
            continue
        if mode == "long" and paddr != vaddr:
            raise LoadError(f"segment {i}: p_paddr {paddr:#x} != p_vaddr {vaddr:#x}; 64-bit "
                            f"x86 images run identity-mapped and must be linked that way")
        segments.append(Segment(paddr, data[off:off + filesz], memsz, ph["p_flags"], vaddr, i))
    if not segments:
        raise LoadError("ELF has no loadable (PT_LOAD) segments")
    _check_overlaps(segments)

    # The entry is a virtual address; translate it through the segment containing it.
    e_entry = hdr["e_entry"]
    for s in segments:
        if s.vaddr <= e_entry < s.vaddr + s.memsz:
            entry = s.addr + (e_entry - s.vaddr)
            break
    else:
        raise LoadError(f"entry point {e_entry:#x} is outside every loadable segment")
    fmt = "elf32-multiboot" if mb else "elf64"
    return LoadPlan(fmt, arch, mode, entry, segments, mb)


def _check_overlaps(segments: List[Segment]) -> None:
    ordered = sorted(segments, key=lambda s: s.addr)
    for a, b in zip(ordered, ordered[1:]):
        if a.end > b.addr:
            raise LoadError(f"overlapping segments: {a.describe()} and {b.describe()}")


# ---- flat binaries and dispatch -------------------------------------------------------------------

def parse_flat(data: bytes, addr: int, *, mode: str = "real", entry: Optional[int] = None,
               arch: str = "x86_64") -> LoadPlan:
    """A plan for a flat binary loaded at ``addr`` (entry defaults to ``addr``)."""
    if mode not in ("real", "protected", "long", "riscv"):
        raise LoadError(f"unknown boot mode {mode!r} for a flat binary")
    if not data:
        raise LoadError("flat binary is empty")
    if addr < 0:
        raise LoadError(f"bad load address {addr:#x}")
    entry = addr if entry is None else entry
    seg = Segment(addr, bytes(data), len(data))
    if not seg.addr <= entry < seg.end:
        raise LoadError(f"entry point {entry:#x} is outside the image [{seg.addr:#x}, "
                        f"{seg.end:#x})")
    if mode == "real" and seg.end > 0x100000:
        raise LoadError(f"real-mode image [{seg.addr:#x}, {seg.end:#x}) does not fit below 1 MiB")
    return LoadPlan("flat", arch, mode, entry, [seg])


def parse_image(image: Image, *, arch: str = "x86_64", flat_addr: Optional[int] = None,
                flat_mode: str = "real", flat_entry: Optional[int] = None) -> LoadPlan:
    """Parse any supported image: ELF (see :func:`parse_elf`), a non-ELF file with a multiboot
    header using the a.out kludge, or a flat binary (needs ``flat_addr``)."""
    data = _read_image(image)
    if is_elf(data):
        return parse_elf(data, arch=arch)
    if arch == "x86_64":
        mb = find_multiboot_header(data)
        if mb is not None and mb.aout_kludge:
            _check_multiboot_flags(mb)
            return parse_multiboot_aout(data, mb)
    if flat_addr is None:
        raise LoadError("not an ELF file (bad magic) and no load address given for a flat "
                        "binary")
    return parse_flat(data, flat_addr, mode=flat_mode, entry=flat_entry, arch=arch)


def _default_reserved(plan: LoadPlan) -> Optional[Tuple[int, int]]:
    if plan.arch != "x86_64" or plan.mode == "real":
        return None
    return (x86_layout.RESERVED_START, x86_layout.RESERVED_END)


def validate_plan(plan: LoadPlan, ram_size: int, *, ram_base: int = 0,
                  reserved: Optional[Tuple[int, int]] = "default") -> None:
    """Raise :class:`LoadError` unless every segment lies in RAM, outside ``reserved``, and no two
    segments overlap."""
    if reserved == "default":
        reserved = _default_reserved(plan)
    ram_end = ram_base + ram_size
    for s in plan.segments:
        if s.addr < ram_base or s.end > ram_end:
            raise LoadError(f"{s.describe()} is outside guest RAM [{ram_base:#x}, {ram_end:#x})")
        if reserved and s.addr < reserved[1] and reserved[0] < s.end:
            raise LoadError(f"{s.describe()} overlaps the VMM-reserved region "
                            f"[{reserved[0]:#x}, {reserved[1]:#x}); link the image at "
                            f"{x86_layout.IMAGE_BASE:#x} or above")
    _check_overlaps(plan.segments)


def write_plan(plan: LoadPlan, mem, *, chunk: int = 1 << 20) -> None:
    """Copy every segment into guest memory and zero-fill ``memsz - filesz``."""
    for s in plan.segments:
        if s.data:
            mem.write(s.addr, s.data)
        pos, end = s.addr + s.filesz, s.end
        while pos < end:
            n = min(chunk, end - pos)
            mem.write(pos, bytes(n))
            pos += n


def load_image(mem, image: Image, *, arch: str = "x86_64", cmdline: str = "",
               flat_addr: Optional[int] = None, flat_mode: str = "real",
               flat_entry: Optional[int] = None, ram_base: int = 0,
               reserved: Optional[Tuple[int, int]] = "default",
               multiboot_info_addr: int = x86_layout.MULTIBOOT_INFO_ADDR) -> LoadedImage:
    """Parse, validate and write ``image`` into ``mem``; for multiboot images also write the
    multiboot information (with ``cmdline``) at ``multiboot_info_addr``."""
    data = _read_image(image)
    plan = parse_image(data, arch=arch, flat_addr=flat_addr, flat_mode=flat_mode,
                       flat_entry=flat_entry)
    plan.validate(mem.size, ram_base=ram_base, reserved=reserved)
    mbi_addr = None
    mbi = None
    if plan.multiboot is not None:
        mbi = build_multiboot_info(mem.size, cmdline, addr=multiboot_info_addr)
        if multiboot_info_addr + len(mbi) > ram_base + mem.size:
            raise LoadError(f"guest RAM ({mem.size:#x} bytes) too small for the multiboot "
                            f"information at {multiboot_info_addr:#x}")
        for s in plan.segments:
            if s.addr < multiboot_info_addr + len(mbi) and multiboot_info_addr < s.end:
                raise LoadError(f"{s.describe()} overlaps the multiboot information at "
                                f"{multiboot_info_addr:#x}")
        mbi_addr = multiboot_info_addr
    write_plan(plan, mem)
    if mbi is not None:
        mem.write(mbi_addr, mbi)
    params = _params_symbol(image, data)
    return LoadedImage(plan, plan.entry, plan.mode, mbi_addr, params)


def _params_symbol(image: Image, data: bytes) -> Optional[int]:
    """``pykvm_params`` of an ELF image; for a flat binary given by path, of the ELF next to it
    (``guest.bin`` -> ``guest.elf``, as the guest build leaves them)."""
    if is_elf(data):
        return find_symbol(data, "pykvm_params")
    if isinstance(image, (str, os.PathLike)):
        elf = os.path.splitext(os.fspath(image))[0] + ".elf"
        if os.path.isfile(elf):
            try:
                return find_symbol(elf, "pykvm_params")
            except LoadError:
                return None
    return None


# ---- symbols ------------------------------------------------------------------------------------

def elf_symbols(image: Image) -> dict:
    """{name: value} of every named symbol in the ELF's symbol tables ({} if not an ELF)."""
    data = _read_image(image)
    if not is_elf(data):
        return {}
    try:
        elf = ELFFile(io.BytesIO(data))
        out = {}
        for sec in elf.iter_sections():
            if isinstance(sec, SymbolTableSection):
                for sym in sec.iter_symbols():
                    if sym.name and sym["st_shndx"] != "SHN_UNDEF":
                        out.setdefault(sym.name, sym["st_value"])
        return out
    except Exception as e:
        raise LoadError(f"malformed ELF symbol table: {e}") from e


def find_symbol(image: Image, name: str) -> Optional[int]:
    """The value (address) of symbol ``name`` in an ELF image, or None."""
    return elf_symbols(image).get(name)


__all__ = [
    "LoadError", "Segment", "MultibootHeader", "LoadPlan", "LoadedImage",
    "MULTIBOOT_HEADER_MAGIC", "MULTIBOOT_BOOT_MAGIC",
    "parse_image", "parse_elf", "parse_flat", "parse_multiboot_aout", "find_multiboot_header",
    "build_multiboot_info", "validate_plan", "write_plan", "load_image",
    "elf_symbols", "find_symbol", "is_elf",
]
