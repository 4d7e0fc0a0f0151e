"""The x86 Linux boot protocol (Documentation/arch/x86/boot.rst): boot a bzImage with a command
line and an initrd through the 64-bit entry point, as kvmtool and Firecracker do.

What pykvm does, as a boot loader of protocol 2.12 or later:

* reads the setup header at file offset 0x1f1 (``boot_flag`` 0xAA55 at 0x1fe, ``"HdrS"`` at
  0x202, ``version`` at 0x206) and requires ``XLF_KERNEL_64`` (a 64-bit entry point) in
  ``xloadflags``;
* loads the protected-mode kernel (the file from ``(setup_sects + 1) * 512`` on) at
  ``pref_address`` (or 1 MiB), checks that ``init_size`` bytes from there fit in RAM;
* builds ``struct boot_params`` (the "zero page"): the setup header copied from the image, an
  E820 map of guest RAM, ``cmd_line_ptr``, ``ramdisk_image``/``ramdisk_size`` (and their
  ``ext_`` high halves), ``type_of_loader`` = 0xff (undefined loader), ``loadflags`` with
  LOADED_HIGH and CAN_USE_HEAP;
* places the initrd page-aligned at the top of RAM below ``initrd_addr_max`` and below 4 GiB;
* enters at load address + 0x200 in 64-bit mode with paging identity-mapping RAM, interrupts
  off and RSI = the zero page's guest-physical address (boot.rst, "64-bit Boot Protocol").

Addresses are guest-physical; sizes are bytes. Errors are :class:`pykvm.LoadError`.
"""
from __future__ import annotations

import contextlib
import struct

from .._record import Record
from ..arch.x86 import layout as L, modes
from ..errors import PykvmError
from .image import InputFile, LoadError, _c_string, _read_image, copy_into
from .multiboot import E820_RAM, _e820

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import List, Optional, Sequence, Tuple



SETUP_HEADER_OFFSET = 0x1F1
BOOT_FLAG = 0xAA55
HDRS = 0x53726448                 # "HdrS"
MIN_VERSION = 0x020C              # 2.12: xloadflags (XLF_KERNEL_64)
XLF_KERNEL_64 = 1 << 0
LOADED_HIGH = 1 << 0
CAN_USE_HEAP = 1 << 7
KERNEL_64_ENTRY_OFFSET = 0x200    # startup_64 of the protected-mode kernel
TYPE_OF_LOADER_UNDEFINED = 0xFF
DEFAULT_LOAD_ADDR = 0x100000
E820_MAX_ENTRIES_ZEROPAGE = 128

# struct boot_params offsets (arch/x86/include/uapi/asm/bootparam.h)
BP_EXT_RAMDISK_IMAGE = 0x0C0
BP_EXT_RAMDISK_SIZE = 0x0C4
BP_EXT_CMD_LINE_PTR = 0x0C8
BP_E820_ENTRIES = 0x1E8
BP_E820_TABLE = 0x2D0
BOOT_PARAMS_SIZE = 0x1000

# setup header fields, as offsets in the file and in boot_params
HDR_SETUP_SECTS = 0x1F1
HDR_BOOT_FLAG = 0x1FE
HDR_JUMP = 0x200
HDR_HEADER = 0x202
HDR_VERSION = 0x206
HDR_TYPE_OF_LOADER = 0x210
HDR_LOADFLAGS = 0x211
HDR_CODE32_START = 0x214
HDR_RAMDISK_IMAGE = 0x218
HDR_RAMDISK_SIZE = 0x21C
HDR_HEAP_END_PTR = 0x224
HDR_CMD_LINE_PTR = 0x228
HDR_INITRD_ADDR_MAX = 0x22C
HDR_KERNEL_ALIGNMENT = 0x230
HDR_RELOCATABLE = 0x234
HDR_XLOADFLAGS = 0x236
HDR_CMDLINE_SIZE = 0x238
HDR_PREF_ADDRESS = 0x258
HDR_INIT_SIZE = 0x260

# Where pykvm puts its own structures for a Linux guest (inside its reserved window).
ZERO_PAGE_ADDR = 0x7000
CMDLINE_ADDR = 0x9000
CMDLINE_MAX = 0x1000


class SetupHeader(Record):
    """The fields of a bzImage's setup header pykvm uses (boot.rst, "The real-mode kernel
    header")."""
    version: int
    setup_sects: int
    loadflags: int
    xloadflags: int
    relocatable: bool
    kernel_alignment: int
    pref_address: int
    init_size: int
    cmdline_size: int
    initrd_addr_max: int
    header_end: int                # file offset one past the header (0x202 + byte at 0x201)

    @property
    def kernel_offset(self) -> int:
        """File offset of the protected-mode kernel."""
        return (self.setup_sects + 1) * 512


def is_bzimage(data: bytes) -> bool:
    """True if ``data`` starts like a bzImage (boot flag and "HdrS" magic)."""
    return (len(data) >= 0x210 and
            struct.unpack_from("<H", data, HDR_BOOT_FLAG)[0] == BOOT_FLAG and
            struct.unpack_from("<I", data, HDR_HEADER)[0] == HDRS)


def parse_setup_header(data: bytes) -> SetupHeader:
    """Read and check the setup header of bzImage ``data``; raises LoadError."""
    if not is_bzimage(data):
        raise LoadError("not a bzImage (no 0xAA55 boot flag and HdrS magic in the setup header)")
    if len(data) < 0x268:
        raise LoadError(f"bzImage truncated in its setup header ({len(data)} bytes)")
    version = struct.unpack_from("<H", data, HDR_VERSION)[0]
    if version < MIN_VERSION:
        raise LoadError(f"bzImage boot protocol {version >> 8}.{version & 0xFF} is too old: "
                        "pykvm needs 2.12 or later (a 64-bit entry point)")
    setup_sects = data[HDR_SETUP_SECTS] or 4
    hdr = SetupHeader(
        version=version, setup_sects=setup_sects, loadflags=data[HDR_LOADFLAGS],
        xloadflags=struct.unpack_from("<H", data, HDR_XLOADFLAGS)[0],
        relocatable=bool(data[HDR_RELOCATABLE]),
        kernel_alignment=struct.unpack_from("<I", data, HDR_KERNEL_ALIGNMENT)[0],
        pref_address=struct.unpack_from("<Q", data, HDR_PREF_ADDRESS)[0],
        init_size=struct.unpack_from("<I", data, HDR_INIT_SIZE)[0],
        cmdline_size=struct.unpack_from("<I", data, HDR_CMDLINE_SIZE)[0],
        initrd_addr_max=struct.unpack_from("<I", data, HDR_INITRD_ADDR_MAX)[0],
        header_end=0x202 + data[0x201])
    if not hdr.xloadflags & XLF_KERNEL_64:
        raise LoadError("bzImage has no 64-bit entry point (XLF_KERNEL_64 not set)")
    if hdr.kernel_offset >= len(data):
        raise LoadError(f"bzImage setup ({hdr.kernel_offset} bytes) covers the whole file")
    if not 0x202 < hdr.header_end <= 0x280:
        raise LoadError(f"bzImage setup header ends at a bad offset {hdr.header_end:#x}")
    return hdr


def e820_entries(e820: Sequence[Tuple[int, int, int]]) -> bytes:
    """The zero page's e820_table: 20-byte (addr u64, size u64, type u32) entries."""
    return b"".join(struct.pack("<QQI", a, n, t) for a, n, t in e820)


def build_boot_params(data: bytes, hdr: SetupHeader, *, e820, cmdline_addr: int,
                      initrd: Optional[Tuple[int, int]]) -> bytes:
    """The 4 KiB zero page for bzImage ``data``: its setup header, filled in as a boot loader
    must (boot.rst, "Details of header fields"), and the E820 map."""
    if len(e820) > E820_MAX_ENTRIES_ZEROPAGE:
        raise LoadError(f"{len(e820)} E820 entries do not fit the zero page")
    bp = bytearray(BOOT_PARAMS_SIZE)
    bp[SETUP_HEADER_OFFSET:hdr.header_end] = data[SETUP_HEADER_OFFSET:hdr.header_end]
    bp[HDR_TYPE_OF_LOADER] = TYPE_OF_LOADER_UNDEFINED
    bp[HDR_LOADFLAGS] = (hdr.loadflags | LOADED_HIGH | CAN_USE_HEAP) & 0xFF
    struct.pack_into("<H", bp, HDR_HEAP_END_PTR, 0xFE00)
    struct.pack_into("<I", bp, HDR_CMD_LINE_PTR, cmdline_addr & 0xFFFFFFFF)
    struct.pack_into("<I", bp, BP_EXT_CMD_LINE_PTR, cmdline_addr >> 32)
    if initrd is not None:
        addr, size = initrd
        struct.pack_into("<I", bp, HDR_RAMDISK_IMAGE, addr & 0xFFFFFFFF)
        struct.pack_into("<I", bp, HDR_RAMDISK_SIZE, size & 0xFFFFFFFF)
        struct.pack_into("<I", bp, BP_EXT_RAMDISK_IMAGE, addr >> 32)
        struct.pack_into("<I", bp, BP_EXT_RAMDISK_SIZE, size >> 32)
    bp[BP_E820_ENTRIES] = len(e820)
    table = e820_entries(e820)
    bp[BP_E820_TABLE:BP_E820_TABLE + len(table)] = table
    return bytes(bp)


class LinuxImage(Record):
    """What :func:`load` put into guest RAM (guest-physical addresses, byte sizes)."""
    entry: int                     # 64-bit entry: load address + 0x200
    load_addr: int
    boot_params: int               # the zero page; RSI at entry
    cmdline: int
    initrd: Optional[Tuple[int, int]]
    header: SetupHeader
    written: List[Tuple[int, int]]
    mode: str = "linux64"
    params_addr: Optional[int] = None
    multiboot_info: Optional[int] = None


def _ram_ranges(e820) -> List[Tuple[int, int]]:
    return [(a, a + n) for a, n, t in e820 if t == E820_RAM]


def _in_ram(e820, addr: int, size: int) -> bool:
    return any(lo <= addr and addr + size <= hi for lo, hi in _ram_ranges(e820))


def load(mem, image, *, cmdline: str = "", initrd: Sequence[str] = (),
         e820: Optional[Sequence[Tuple[int, int, int]]] = None) -> LinuxImage:
    """Load bzImage ``image`` (a path or bytes) with ``cmdline`` and the initrd files (QEMU's
    ``-initrd``: several files are concatenated, as the kernel accepts concatenated cpio
    archives) into guest memory ``mem``. ``e820`` defaults to pykvm's x86 map of ``mem.size``
    bytes. Every check runs before the first write; raises LoadError."""
    ram_size = mem.size
    e820 = list(e820) if e820 is not None else _e820(ram_size)
    data = _read_image(image, ram_size, "guest RAM")
    hdr = parse_setup_header(data)
    kernel = memoryview(data)[hdr.kernel_offset:]
    load_addr = DEFAULT_LOAD_ADDR
    if hdr.relocatable and hdr.pref_address and hdr.pref_address >= DEFAULT_LOAD_ADDR:
        load_addr = hdr.pref_address
    need = max(hdr.init_size, len(kernel))
    if not _in_ram(e820, load_addr, need):
        raise LoadError(f"guest RAM ({ram_size:#x} bytes) is too small for this kernel: it "
                        f"needs {need:#x} bytes from {load_addr:#x} (init_size)")
    text = _c_string("kernel command line", cmdline)
    limit = min(CMDLINE_MAX, (hdr.cmdline_size or 255) + 1)
    if len(text) > limit:
        raise LoadError(f"kernel command line is {len(text) - 1} bytes; this kernel takes at "
                        f"most {limit - 1}")
    with contextlib.ExitStack() as files:
        rds = []
        for item in initrd:
            path = item.split()[0] if isinstance(item, str) else item
            rds.append(files.enter_context(InputFile(path, ram_size, "guest RAM")))
        return _place(mem, data, hdr, kernel, load_addr, need, text, rds, e820, ram_size)


def _place(mem, data, hdr, kernel, load_addr, need, text, rds, e820, ram_size) -> LinuxImage:
    """The rest of :func:`load`: place the initrd files (concatenated, streamed into guest
    RAM by :class:`pykvm.InputFile`), build the zero page, then write everything."""
    rd_len = sum(f.size for f in rds)
    rd_place = None
    if rd_len:
        top = min(hdr.initrd_addr_max or 0x37FFFFFF, 0xFFFFFFFF) + 1
        best = None
        for lo, hi in _ram_ranges(e820):
            hi = min(hi, top)
            start = (hi - rd_len) & ~(L.PAGE_SIZE - 1)
            if start >= max(lo, load_addr + need) and (best is None or start > best):
                best = start
        if best is None:
            raise LoadError(f"no room for the {rd_len}-byte initrd above the kernel and below "
                            f"{top:#x} in {ram_size:#x} bytes of RAM")
        rd_place = (best, rd_len)
    bp = build_boot_params(data, hdr, e820=e820, cmdline_addr=CMDLINE_ADDR, initrd=rd_place)
    written = []
    try:
        copy_into(mem, load_addr, kernel)
        written.append((load_addr, len(kernel)))
        mem.write(ZERO_PAGE_ADDR, bp)
        written.append((ZERO_PAGE_ADDR, len(bp)))
        mem.write(CMDLINE_ADDR, text)
        written.append((CMDLINE_ADDR, len(text)))
        if rd_place:
            pos = rd_place[0]
            for f in rds:
                f.copy_to(mem, pos)
                pos += f.size
            written.append(rd_place)
    except LoadError:
        raise
    except (ValueError, PykvmError) as e:
        raise LoadError(f"cannot write the kernel into guest RAM: {e}") from e
    return LinuxImage(load_addr + KERNEL_64_ENTRY_OFFSET, load_addr, ZERO_PAGE_ADDR,
                      CMDLINE_ADDR, rd_place, hdr, written)


def setup_boot_cpu(vcpu, mem, image: LinuxImage) -> None:
    """Enter the kernel's 64-bit entry on the boot CPU: long mode with RAM identity-mapped,
    interrupts off, RSI = the zero page (boot.rst, "64-bit Boot Protocol"). Other CPUs are
    started by the kernel itself (INIT/SIPI through the in-kernel local APIC)."""
    modes.setup_long_mode(vcpu, mem, image.entry, L.stack_top(0), vcpu_index=0)
    r = vcpu.get_regs()
    r.rsi = image.boot_params
    r.rflags = 2
    vcpu.set_regs(r)
