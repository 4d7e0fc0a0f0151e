"""Multiboot v1 (the Multiboot Specification 0.6.96): finding the header in the first 8 KiB,
the a.out kludge layout, QEMU's ``-initrd`` module list, and the multiboot information block as
QEMU's ``-kernel`` (hw/i386/multiboot.c) builds it."""
from __future__ import annotations

import struct

from .._record import Record
from ..arch.x86 import layout as x86_layout
from .image import LoadError, LoadPlan, Segment, _as_bytes, _c_string, _check_int, _load_errors_only

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import List, Optional, Tuple

# multiboot v1 constants (from the multiboot specification)
MULTIBOOT_HEADER_MAGIC = 0x1BADB002
MULTIBOOT_BOOT_MAGIC = 0x2BADB002
MULTIBOOT_SEARCH_LEN = 8192
MB_HDR_PAGE_ALIGN = 1 << 0
MB_HDR_MEMORY_INFO = 1 << 1
MB_HDR_VIDEO_MODE = 1 << 2
MB_HDR_AOUT_KLUDGE = 1 << 16
# Required-feature bits 3..15 define nothing. The spec says a boot loader that does not know a
# requested bit must refuse the image; QEMU's -kernel loader (hw/i386/multiboot.c) ignores every
# flag but bits 2 (video mode: a warning) and 16 (a.out kludge), and pykvm boots what QEMU boots.
_MB_HDR_UNDEFINED = 0xFFF8

MBI_FLAG_MEM = 1 << 0
MBI_FLAG_BOOT_DEVICE = 1 << 1
MBI_FLAG_CMDLINE = 1 << 2
MBI_FLAG_MODS = 1 << 3
MBI_FLAG_MMAP = 1 << 6
MBI_FLAG_BOOT_LOADER_NAME = 1 << 9

E820_RAM = 1
E820_RESERVED = 2


class MultibootHeader(Record, frozen=True, slots=True):
    """A multiboot v1 header as found in an image (spec section 3.1): its file ``offset``,
    ``flags``, ``checksum``, and the address and video fields (0 when the flags leave them
    out)."""
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
        """True if flags bit 16 says the header's address fields (a.out kludge) give the layout."""
        return bool(self.flags & MB_HDR_AOUT_KLUDGE)

    @property
    def size(self) -> int:
        """Bytes the header occupies: 12, 32 with the address fields, 48 with the video ones."""
        return multiboot_header_size(self.flags)



# ---- multiboot --------------------------------------------------------------------------------

def multiboot_header_size(flags: int) -> int:
    """Bytes of a multiboot v1 header with these flags (spec §3.1.1): the magic, flags and
    checksum (12); the a.out-kludge address fields at 12..28 (flag bit 16); the video mode fields
    at 32..44 (flag bit 2; they come after the address fields whether or not those are used)."""
    if flags & MB_HDR_VIDEO_MODE:
        return 48
    if flags & MB_HDR_AOUT_KLUDGE:
        return 32
    return 12


@_load_errors_only
def find_multiboot_header(data: bytes) -> Optional[MultibootHeader]:
    """The first multiboot v1 header that lies wholly in the first 8 KiB (32-bit aligned, magic
    and checksum OK), or None. A candidate that starts in the first 8 KiB but whose header (with
    the optional fields its flags ask for) runs past byte 8192 is not a header, as the spec
    says, and the search goes on. Raises :class:`LoadError` if a header with a valid checksum is
    cut off by the end of the file."""
    data = _as_bytes(data)
    window = data[:MULTIBOOT_SEARCH_LEN]
    magic = struct.pack("<I", MULTIBOOT_HEADER_MAGIC)
    off = window.find(magic)
    while off >= 0:
        # The 12 fixed bytes must be in the file and in the window, else there is no checksum
        # to trust and this is just data.
        if off % 4 == 0 and off + 12 <= len(window):
            m, flags, csum = struct.unpack_from("<III", window, off)
            if (m + flags + csum) & 0xFFFFFFFF == 0:
                size = multiboot_header_size(flags)
                if off + size <= MULTIBOOT_SEARCH_LEN:
                    if off + size > len(window):
                        raise LoadError(f"multiboot header at offset {off:#x} is truncated "
                                        f"(flags {flags:#x} need {size} bytes, the file ends "
                                        f"at {len(data):#x})")
                    extra = [0] * 9
                    n = (size - 12) // 4
                    extra[:n] = struct.unpack_from(f"<{n}I", window, off + 12)
                    return MultibootHeader(off, flags, csum, *extra)
        off = window.find(magic, off + 1)
    return None


@_load_errors_only
def parse_multiboot_aout(data: bytes, h: MultibootHeader) -> LoadPlan:
    """A plan from a multiboot header's a.out-kludge address fields (flag bit 16)."""
    data = _as_bytes(data)
    if not 0 <= h.offset <= len(data) - 12:
        raise LoadError(f"multiboot header offset {h.offset:#x} is outside the image")
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
    if h.load_addr + memsz > 1 << 32:
        raise LoadError(f"multiboot load range [{h.load_addr:#x}, {h.load_addr + memsz:#x}) "
                        f"runs past 4 GiB")
    seg = Segment(h.load_addr, memoryview(data)[start:start + size], memsz)
    if not seg.addr <= h.entry_addr < seg.end or memsz == 0:
        raise LoadError(f"entry point {h.entry_addr:#x} is outside the loaded image "
                        f"[{seg.addr:#x}, {seg.end:#x})")
    return LoadPlan("multiboot-aout", "x86_64", "protected", h.entry_addr, [seg], h)



def split_initrd_option(text: str) -> List[str]:
    """QEMU's ``-initrd`` list for multiboot, item by item (hw/i386/multiboot.c with
    ``get_opt_value``, as QEMU 7.2 runs it): items are separated by ``,``; ``,,`` stands for
    one comma inside an item ("mod1.bin a,,b,mod2.bin" -> ["mod1.bin a,b", "mod2.bin"]); a
    single ``,`` at the very end starts no item; "" is no item at all. Items are kept verbatim
    (no stripping: each is the module's string, :func:`initrd_module_path` its file), so an
    empty or blank first item is a file name QEMU cannot open either ("Failed to open file
    ''"). Raises :class:`LoadError` if ``text`` is not a string. Work is linear in its
    length."""
    if not isinstance(text, str):
        raise LoadError(f"initrd list must be a string, not {type(text).__name__}")
    items, cur, i, n = [], [], 0, len(text)
    if n == 0:
        return items
    while i < n:
        ch = text[i]
        if ch == ",":
            if i + 1 < n and text[i + 1] == ",":
                cur.append(",")
                i += 2
                continue
            items.append("".join(cur))
            cur = []
            i += 1
            if i == n:               # a trailing separator ends the list
                return items
            continue
        cur.append(ch)
        i += 1
    items.append("".join(cur))
    return items


def initrd_module_path(item: str) -> str:
    """The file name of one ``-initrd`` item: everything before its first space (QEMU's
    multiboot loader cuts at ``strchr(item, ' ')``; the rest are the module's arguments, and the
    whole item is its string). An item that starts with a space names the file ""."""
    return item.split(" ", 1)[0]




@_load_errors_only
def build_multiboot_info(ram_size: int, cmdline: str = "", *,
                         addr: int = x86_layout.MULTIBOOT_INFO_ADDR,
                         size: int = x86_layout.MULTIBOOT_INFO_SIZE,
                         loader_name: str = "pykvm",
                         memory_map: Optional[List[Tuple[int, int, int]]] = None,
                         modules: List[Tuple[int, int, str]] = ()) -> bytes:
    """The multiboot information block, as QEMU's ``-kernel`` builds it, to be written at
    ``addr``: flags MEM | BOOT_DEVICE | CMDLINE | MODS | MMAP | BOOT_LOADER_NAME,
    mem_lower = the RAM entry at 0 in KiB (639), mem_upper = (RAM below 4 GiB - 1 MiB) / 1 KiB,
    an e820 memory map, the module list, the command line and the boot loader name. Everything
    fits in ``size`` bytes.

    ``memory_map``: (base, length, type) entries (default: RAM contiguous from 0, the classic
    legacy holes reserved); mem_upper is then the length of the RAM entry at 1 MiB.
    ``modules``: (start, end, string) of modules already in guest memory (multiboot spec
    3.3: mods_addr points at 16-byte entries mod_start, mod_end, string, reserved)."""
    info_len = 0x80                           # the fixed part (0x78 bytes) rounded up
    _check_int("RAM size", ram_size)
    _check_int("multiboot information address", addr)
    if not 0 <= ram_size < 1 << 64:
        raise LoadError(f"bad RAM size {ram_size:#x}")
    if not 0 <= addr or addr + size > 1 << 32:
        raise LoadError(f"multiboot information [{addr:#x}, {addr + size:#x}) must lie below "
                        f"4 GiB")
    ranges = list(memory_map) if memory_map is not None else _e820(ram_size)
    mmap = b"".join(struct.pack("<IQQI", 20, base, length, kind) for base, length, kind in ranges)
    name = _c_string("boot loader name", loader_name)
    cmd = _c_string("command line", "" if cmdline is None else cmdline)
    mod_strings = [_c_string("module string", m[2]) for m in modules]
    mmap_addr = addr + info_len
    mods_addr = mmap_addr + len(mmap)
    name_addr = mods_addr + 16 * len(modules)
    cmd_addr = name_addr + len(name)
    strings_addr = cmd_addr + len(cmd)
    total = strings_addr + sum(len(m) for m in mod_strings) - addr
    if total > size:
        what = "command line and module strings" if modules else "command line"
        raise LoadError(f"{what} too long for the multiboot information area ({total} bytes, "
                        f"room for {size})")
    # mem_lower: the RAM entry at 0 (639 KiB: the EBDA's 1 KiB below 640 KiB is reserved, as
    # QEMU's multiboot ROM reports it after SeaBIOS)
    low = min(640 * 1024, next((n for a, n, t in ranges if a == 0 and t == E820_RAM), 0))
    if memory_map is None:
        upper = max(0, min(ram_size, 4 << 30) - (1 << 20)) // 1024
    else:
        upper = next((n for a, n, t in ranges if a == 0x100000 and t == E820_RAM), 0) // 1024
    mods = bytearray()
    pos = strings_addr
    for (start, end, _), text in zip(modules, mod_strings):
        mods += struct.pack("<IIII", start, end, pos, 0)
        pos += len(text)
    info = bytearray(info_len)
    struct.pack_into("<IIIII", info, 0,
                     MBI_FLAG_MEM | MBI_FLAG_BOOT_DEVICE | MBI_FLAG_CMDLINE | MBI_FLAG_MODS |
                     MBI_FLAG_MMAP | MBI_FLAG_BOOT_LOADER_NAME,
                     low // 1024, min(upper, 0xFFFFFFFF), 0x8000FFFF, cmd_addr)
    struct.pack_into("<II", info, 20, len(modules), mods_addr if modules else mmap_addr)
    struct.pack_into("<II", info, 44, len(mmap), mmap_addr)
    struct.pack_into("<I", info, 64, name_addr)
    return bytes(info) + mmap + bytes(mods) + name + cmd + b"".join(mod_strings)


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


