"""Loader and x86 boot-state tests that need no KVM: ELF/multiboot/flat parsing, validation,
zero-fill, multiboot info, page tables and register images written into a fake memory."""
import os
import shutil
import signal
import struct
import subprocess
from types import SimpleNamespace

import pytest

from pykvm import boot
from pykvm.boot import LoadError
from pykvm.arch.x86 import modes, layout

EM_386, EM_X86_64, EM_AARCH64, EM_RISCV = 3, 62, 183, 243
ET_EXEC, ET_DYN = 2, 3
PT_LOAD, PT_NOTE = 1, 4
MiB = 1 << 20
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class FakeMem:
    """Guest RAM from GPA 0 as a bytearray, filled with a pattern to catch missing zero-fill."""

    def __init__(self, size=16 * MiB, fill=0xAA):
        self.buf = bytearray([fill]) * size

    @property
    def size(self):
        return len(self.buf)

    def _check(self, gpa, n):
        if gpa < 0 or gpa + n > len(self.buf):
            raise ValueError(f"{gpa:#x}+{n:#x} outside fake RAM")

    def write(self, gpa, data):
        data = bytes(data)
        self._check(gpa, len(data))
        self.buf[gpa:gpa + len(data)] = data

    def read(self, gpa, n):
        self._check(gpa, n)
        return bytes(self.buf[gpa:gpa + n])

    def u32(self, gpa):
        return struct.unpack_from("<I", self.buf, gpa)[0]

    def u64(self, gpa):
        return struct.unpack_from("<Q", self.buf, gpa)[0]

    def cstr(self, gpa):
        end = self.buf.index(0, gpa)
        return self.buf[gpa:end].decode()


# ---- ELF construction ----------------------------------------------------------------------------

def make_elf(segments, entry, *, cls=64, machine=None, etype=ET_EXEC, endian=1, head=b""):
    """segments: dicts with vaddr, data, memsz and optional paddr/type/flags. The segment data
    follows the program headers (after ``head``, e.g. a multiboot header), page aligned."""
    if machine is None:
        machine = EM_X86_64 if cls == 64 else EM_386
    ehsize, phsize = (64, 56) if cls == 64 else (52, 32)
    phoff = ehsize
    pos = phoff + phsize * len(segments)
    body = bytearray()
    if head:
        # place ``head`` at the next 4-byte boundary
        pad = (-pos) % 4
        body += bytes(pad) + head
    offsets = []
    for s in segments:
        cur = pos + len(body)
        cur_aligned = (cur + 0xFFF) & ~0xFFF
        body += bytes(cur_aligned - cur)
        offsets.append(cur_aligned)
        body += s["data"]
    ident = b"\x7fELF" + bytes([1 if cls == 32 else 2, endian, 1]) + bytes(9)
    if cls == 64:
        eh = ident + struct.pack("<HHIQQQIHHHHHH", etype, machine, 1, entry, phoff, 0, 0,
                                 ehsize, phsize, len(segments), 64, 0, 0)
    else:
        eh = ident + struct.pack("<HHIIIIIHHHHHH", etype, machine, 1, entry, phoff, 0, 0,
                                 ehsize, phsize, len(segments), 40, 0, 0)
    ph = b""
    for s, off in zip(segments, offsets):
        paddr = s.get("paddr", s["vaddr"])
        ptype = s.get("type", PT_LOAD)
        flags = s.get("flags", 7)
        filesz = s.get("filesz", len(s["data"]))
        if cls == 64:
            ph += struct.pack("<IIQQQQQQ", ptype, flags, off, s["vaddr"], paddr, filesz,
                              s["memsz"], 0x1000)
        else:
            ph += struct.pack("<IIIIIIII", ptype, off, s["vaddr"], paddr, filesz, s["memsz"],
                              flags, 0x1000)
    return eh + ph + bytes(body)


def mb_header(flags=0x3, *, magic=0x1BADB002, checksum=None, aout=None, video=None):
    if checksum is None:
        checksum = (-(magic + flags)) & 0xFFFFFFFF
    h = struct.pack("<III", magic, flags, checksum)
    if aout is not None or video is not None:
        h += struct.pack("<5I", *(aout or (0,) * 5))
    if video is not None:
        h += struct.pack("<4I", *video)
    return h


SHT_SYMTAB, SHT_STRTAB = 2, 3


def with_symbols(img, symbols, *, cls=64, nsymtab=1, shift=0, strtab_type=SHT_STRTAB):
    """``img`` (from make_elf, no sections yet) plus a string table, one symbol table holding
    ``symbols`` ({name: value}, all defined in section 1) and section headers: null, the string
    table, then ``nsymtab`` SHT_SYMTAB headers for the same table, each ``shift`` entries further
    in (shift=0: all the very same table)."""
    img = bytearray(img)
    img += bytes((-len(img)) % 8)
    strtab = bytearray(b"\0")
    entsize = 24 if cls == 64 else 16
    syms = bytearray(entsize)                                    # the null symbol
    for name, value in symbols.items():
        off = len(strtab)
        strtab += name.encode() + b"\0"
        if cls == 64:
            syms += struct.pack("<IBBHQQ", off, 0x11, 0, 1, value, 8)
        else:
            syms += struct.pack("<IIIBBH", off, value, 8, 0x11, 0, 1)
    sym_off = len(img)
    img += syms
    str_off = len(img)
    img += strtab
    img += bytes((-len(img)) % 8)
    sh_off = len(img)
    if cls == 64:
        sh = struct.Struct("<IIQQQQIIQQ")

        def shdr(t, o, s, link, es):
            return sh.pack(0, t, 0, 0, o, s, link, 1, 8, es)
    else:
        sh = struct.Struct("<IIIIIIIIII")

        def shdr(t, o, s, link, es):
            return sh.pack(0, t, 0, 0, o, s, link, 1, 4, es)
    img += bytes(sh.size)
    img += shdr(strtab_type, str_off, len(strtab), 0, 0)
    for i in range(nsymtab):
        skip = min(shift * i, len(syms) // entsize - 1) * entsize
        img += shdr(SHT_SYMTAB, sym_off + skip, len(syms) - skip, 1, entsize)
    shnum = 2 + nsymtab
    if cls == 64:
        struct.pack_into("<Q", img, 0x28, sh_off)
        struct.pack_into("<HHH", img, 0x3A, sh.size, shnum if shnum < 0xFF00 else 0, 0)
    else:
        struct.pack_into("<I", img, 0x20, sh_off)
        struct.pack_into("<HHH", img, 0x2E, sh.size, shnum if shnum < 0xFF00 else 0, 0)
    return bytes(img)


@pytest.fixture
def hang_guard():
    """Fail (rather than hang) a test that takes longer than 20 s: a regression to reading a
    FIFO, a device or to quadratic parsing shows up as this."""
    def expired(signum, frame):
        raise TimeoutError("the loader took more than 20 s (hang or superlinear work)")
    old = signal.signal(signal.SIGALRM, expired)
    signal.alarm(20)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


def seg(vaddr, data, memsz=None, **kw):
    return dict(vaddr=vaddr, data=data, memsz=len(data) if memsz is None else memsz, **kw)


CODE = b"\xf4" * 64           # hlt


# ---- ELF64 ----------------------------------------------------------------------------------------

def test_elf64_load_and_bss_zero_fill():
    data = b"\x11" * 100
    img = make_elf([seg(0x100000, CODE), seg(0x200000, data, 0x3000, flags=6)], 0x100010)
    mem = FakeMem()
    li = boot.load_image(mem, img)
    assert li.mode == "long" and li.entry == 0x100010
    assert li.plan.format == "elf64"
    assert mem.read(0x100000, 64) == CODE
    assert mem.read(0x200000, 100) == data
    assert mem.read(0x200000 + 100, 0x3000 - 100) == bytes(0x3000 - 100)   # bss zeroed
    assert mem.read(0x203000, 1) == b"\xaa"                                 # and no further
    assert li.multiboot_info is None and li.boot_regs == {}


def test_non_load_segments_and_empty_ones_are_ignored():
    img = make_elf([seg(0x100000, CODE), seg(0x5000, b"note", type=PT_NOTE),
                    seg(0x300000, b"", 0)], 0x100000)
    plan = boot.parse_image(img)
    assert [s.addr for s in plan.segments] == [0x100000]


@pytest.mark.parametrize("cut", [5, 10, 40, 64 + 20])
def test_truncated_headers(cut):
    img = make_elf([seg(0x100000, CODE)], 0x100000)
    with pytest.raises(LoadError, match="truncated|malformed"):
        boot.parse_image(img[:cut])


def test_truncated_segment_data():
    img = make_elf([seg(0x100000, CODE * 4)], 0x100000)
    with pytest.raises(LoadError, match="truncated: segment 0"):
        boot.parse_image(img[:-10])


def test_bad_magic():
    img = bytearray(make_elf([seg(0x100000, CODE)], 0x100000))
    img[1] = ord("X")
    with pytest.raises(LoadError, match="bad magic"):
        boot.parse_image(bytes(img))


def test_bad_class_and_endianness():
    img = bytearray(make_elf([seg(0x100000, CODE)], 0x100000))
    img[4] = 3
    with pytest.raises(LoadError, match="bad ELF class 3"):
        boot.parse_image(bytes(img))
    big = make_elf([seg(0x100000, CODE)], 0x100000, endian=2)
    with pytest.raises(LoadError, match="little-endian"):
        boot.parse_image(big)


def test_wrong_machine():
    img = make_elf([seg(0x100000, CODE)], 0x100000, machine=EM_AARCH64)
    with pytest.raises(LoadError, match="wrong machine"):
        boot.parse_image(img)
    rv = make_elf([seg(0x80000000, CODE)], 0x80000000, machine=EM_RISCV)
    with pytest.raises(LoadError, match="wrong machine: RISC-V ELF, x86_64 needs x86-64"):
        boot.parse_image(rv)
    # ... but riscv64 takes it, and refuses x86
    assert boot.parse_image(rv, arch="riscv64").mode == "riscv"
    with pytest.raises(LoadError, match="wrong machine"):
        boot.parse_image(make_elf([seg(0x100000, CODE)], 0x100000), arch="riscv64")


def test_wrong_class_for_arch():
    img = make_elf([seg(0x100000, CODE)], 0x100000, cls=32, head=mb_header())
    with pytest.raises(LoadError, match="riscv64 cannot boot a 32-bit ELF"):
        boot.parse_image(img, arch="riscv64")


def test_not_executable():
    img = make_elf([seg(0x100000, CODE)], 0x100000, etype=ET_DYN)
    with pytest.raises(LoadError, match="not an executable ELF"):
        boot.parse_image(img)


def test_segment_outside_ram():
    img = make_elf([seg(0x100000, CODE), seg(0xF00000, b"x", 0x200000)], 0x100000)
    with pytest.raises(LoadError, match=r"segment 1 \[0xf00000, 0x1100000\) is outside guest RAM"):
        boot.load_image(FakeMem(), img)


def test_segment_in_reserved_region():
    img = make_elf([seg(0x8000, CODE)], 0x8000)
    with pytest.raises(LoadError, match="VMM-reserved region"):
        boot.load_image(FakeMem(), img)
    # an explicit reserved=None lifts the check
    boot.load_image(FakeMem(), img, reserved=None)


def test_overlapping_segments():
    # file bytes over file bytes: QEMU's -kernel refuses such an image, and so does pykvm
    img = make_elf([seg(0x100000, CODE, 0x2000), seg(0x100020, CODE)], 0x100000)
    with pytest.raises(LoadError, match="overlapping segments: segment 0 .* and segment 1"):
        boot.parse_image(img)


def test_bss_over_another_segment_is_not_loaded_as_in_qemu():
    # QEMU's load_elf: a zero-filled tail that overlaps another segment is left to the image
    # (the segment is loaded as p_filesz bytes), test_loader_qemu_elf_rules.py has the cases
    img = make_elf([seg(0x100000, CODE, 0x2000), seg(0x101000, CODE)], 0x100000)
    plan = boot.parse_image(img)
    assert [(s.addr, s.memsz) for s in plan.segments] == [(0x100000, 64), (0x101000, 64)]


def test_filesz_larger_than_memsz():
    img = make_elf([seg(0x100000, CODE, 16)], 0x100000)
    with pytest.raises(LoadError, match="p_filesz 0x40 is larger than p_memsz 0x10"):
        boot.parse_image(img)


def test_entry_outside_segments():
    img = make_elf([seg(0x100000, CODE)], 0x100040)
    with pytest.raises(LoadError, match="entry point 0x100040 is outside every loadable segment"):
        boot.parse_image(img)


def test_elf64_needs_identity_link():
    img = make_elf([seg(0xFFFFFFFF80100000, CODE, paddr=0x100000)], 0xFFFFFFFF80100000)
    with pytest.raises(LoadError, match="p_paddr 0x100000 != p_vaddr"):
        boot.parse_image(img)


def test_no_load_segments():
    img = make_elf([seg(0x100000, b"n", type=PT_NOTE)], 0x100000)
    with pytest.raises(LoadError, match="no loadable"):
        boot.parse_image(img)


def test_missing_file():
    with pytest.raises(LoadError, match="cannot read guest image '/nonexistent/guest.elf': No "
                                        "such file"):
        boot.parse_image("/nonexistent/guest.elf")


# ---- what the loader reads --------------------------------------------------------------------------

@pytest.mark.parametrize("dev", ["/dev/zero", "/dev/urandom", "/dev/null"])
def test_devices_are_refused_without_reading(dev, hang_guard):
    if not os.path.exists(dev):
        pytest.skip(f"{dev} is not here")
    for call in (lambda: boot.parse_image(dev), lambda: boot.load_image(FakeMem(), dev),
                 lambda: boot.elf_symbols(dev)):
        with pytest.raises(LoadError, match=f"guest image '{dev}' is a character device, not an "
                                            f"image file"):
            call()


def test_fifo_without_writer_is_refused_not_waited_on(tmp_path, hang_guard):
    fifo = tmp_path / "guest.elf"
    os.mkfifo(fifo)
    with pytest.raises(LoadError, match="is a FIFO"):
        boot.load_image(FakeMem(), fifo)
    with pytest.raises(LoadError, match="is a FIFO"):
        boot.find_symbol(str(fifo), "pykvm_params")


def test_directory_socket_and_odd_arguments(tmp_path):
    with pytest.raises(LoadError, match="is a directory, not an image file"):
        boot.parse_image(tmp_path)
    import socket
    path = str(tmp_path / "s")
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(path)
        with pytest.raises(LoadError, match="is a socket"):
            boot.parse_image(path)
    with pytest.raises(LoadError, match="must be bytes or a path, not int"):
        boot.parse_image(0)                 # not file descriptor 0
    with pytest.raises(LoadError, match="cannot read guest image .*null"):
        boot.parse_image("a\0b")


def _as_nobody(fn):
    """``fn()``'s result (a string) from a forked child that dropped root first."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:                                   # the child: never returns to pytest
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            os.write(w, fn().encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r) as f:
        out = f.read()
    os.waitpid(pid, 0)
    return out


def test_unreadable_file(tmp_path):
    p = tmp_path / "guest.elf"
    p.write_bytes(b"\x7fELF")
    p.chmod(0)

    def attempt():
        try:
            boot.parse_image(p)
            return "loaded"
        except LoadError as e:
            return f"LoadError: {e}"
        except BaseException as e:  # noqa: BLE001 — any other failure is reported by name
            return f"{type(e).__name__}: {e}"
    out = _as_nobody(attempt) if os.geteuid() == 0 else attempt()
    assert out.startswith("LoadError: cannot read guest image") and "Permission denied" in out


def test_size_is_checked_before_reading(tmp_path, hang_guard):
    big = tmp_path / "big.elf"
    with open(big, "wb") as f:
        for size in (1 << 40, boot.MAX_IMAGE_SIZE + 1):     # sparse: no disk used
            try:
                f.truncate(size)
                break
            except OSError:
                continue
    # the module cap, whatever the RAM: never read
    with pytest.raises(LoadError, match="too large: .* more than the loader's limit"):
        boot.parse_image(big)
    with pytest.raises(LoadError, match="too large: .* more than the loader's limit"):
        boot.load_image(FakeMem(1 * MiB), big, flat_addr=0)
    # a file larger than RAM is read (an ELF's debug information need not fit), but what it
    # loads must fit RAM; images given as bytes alike
    small = tmp_path / "small.bin"
    small.write_bytes(b"\xf4" * (2 * MiB))
    for image in (small, b"\xf4" * (2 * MiB)):
        with pytest.raises(LoadError, match=r"segment 0 \[0x0, 0x200000\) is outside guest RAM "
                                            r"\[0x0, 0x100000\)"):
            boot.load_image(FakeMem(1 * MiB), image, flat_addr=0, flat_mode="protected")
    with pytest.raises(LoadError, match="more than max_size"):
        boot.parse_image(memoryview(b"\xf4" * 100), flat_addr=0x8000, max_size=99)
    assert boot.parse_image(bytearray(b"\xf4" * 99), flat_addr=0x8000, max_size=99).high == \
        0x8000 + 99


def test_files_whose_size_lies_are_read_to_the_limit_only():
    # /proc files say st_size 0: the read goes on to EOF, but never past the limit
    with pytest.raises(LoadError, match="too large"):
        boot.parse_image("/proc/self/status", flat_addr=0x8000, max_size=16)
    assert boot.parse_image("/proc/self/status", flat_addr=0x8000).format == "flat"


def test_messages_are_one_line(tmp_path):
    assert str(LoadError("a\nb\r\n  c")) == "a b c"
    with pytest.raises(LoadError) as e:
        boot.parse_image(str(tmp_path / "new\nline.elf"))
    assert "\n" not in str(e.value) and "new\\nline" in str(e.value)


# ---- multiboot ------------------------------------------------------------------------------------

def test_find_multiboot_header_rules():
    good = mb_header()
    assert boot.find_multiboot_header(bytes(8) + good).offset == 8
    assert boot.find_multiboot_header(bytes(6) + good) is None           # not 4-aligned
    assert boot.find_multiboot_header(bytes(8192) + good) is None        # beyond 8 KiB
    assert boot.find_multiboot_header(mb_header(checksum=1)) is None     # bad checksum
    # a bad candidate before a good one is skipped
    h = boot.find_multiboot_header(mb_header(checksum=5) + good)
    assert h.offset == 12 and h.flags == 3 and not h.aout_kludge


AOUT = (0x100000, 0x100000, 0, 0, 0x100000)
VIDEO = (0, 1024, 768, 32)


@pytest.mark.parametrize("off,flags,extra,found", [
    # the whole header (12, 32 with the a.out fields, 48 with the video fields) must end by 8192
    (8188, 0x3, {}, False),                       # 12 bytes: ends at 8200
    (8184, 0x3, {}, False),                       # ends at 8196
    (8180, 0x3, {}, True),                        # ends at exactly 8192
    (8180, 0x10003, dict(aout=AOUT), False),      # 32 bytes: ends at 8212
    (8176, 0x3, {}, True),
    (8176, 0x10003, dict(aout=AOUT), False),      # ends at 8208
    (8176, 0x10007, dict(aout=AOUT, video=VIDEO), False),
    (8176, 0x7, dict(video=VIDEO), False),        # video fields sit at 32..48 either way
    (8160, 0x10003, dict(aout=AOUT), True),       # ends at exactly 8192
    (8160, 0x7, dict(video=VIDEO), False),        # 48 bytes: ends at 8208
    (8144, 0x10007, dict(aout=AOUT, video=VIDEO), True),
    (8144, 0x7, dict(video=VIDEO), True),
])
def test_multiboot_header_must_end_within_8k(off, flags, extra, found):
    hdr = mb_header(flags, **extra)
    blob = bytes(off) + hdr + b"\xf4" * 64           # file goes on: not a truncation
    h = boot.find_multiboot_header(blob)
    if found:
        assert h.offset == off and h.flags == flags and h.size == len(hdr)
        if "video" in extra:
            assert (h.mode_type, h.width, h.height, h.depth) == VIDEO
        if "aout" in extra:
            assert h.entry_addr == AOUT[4]
    else:
        assert h is None
    # the same in an ELF32: a header that runs past 8 KiB does not make it a multiboot image
    pre = 52 + 32                                    # ELF header + one program header
    img = make_elf([seg(0x100000, CODE)], 0x100000, cls=32, head=bytes(off - pre) + hdr)
    assert boot.find_multiboot_header(img) == h
    if found:
        assert boot.parse_image(img).multiboot.offset == off
    else:
        with pytest.raises(LoadError, match="without a multiboot v1 header wholly inside"):
            boot.parse_image(img)


def test_header_past_8k_is_skipped_for_a_later_one_that_fits():
    blob = bytes(8160) + mb_header(0x7, video=VIDEO)[:20] + mb_header(0x3) + bytes(64)
    assert len(bytes(8160) + mb_header(0x7, video=VIDEO)[:20]) == 8180
    assert boot.find_multiboot_header(blob).offset == 8180


def test_magic_at_the_end_of_a_flat_binary_is_just_data():
    # too short to hold a checksum: not a header, and not a "truncated header" error
    blob = b"\xf4" * 12 + struct.pack("<II", 0x1BADB002, 0x10000)
    assert boot.find_multiboot_header(blob) is None
    assert boot.parse_image(blob, flat_addr=0x8000).format == "flat"


def test_elf32_multiboot_uses_paddr_and_translates_entry():
    img = make_elf([seg(0xC0100000, CODE, 0x1000, paddr=0x100000)], 0xC0100004, cls=32,
                   head=mb_header())
    mem = FakeMem()
    li = boot.load_image(mem, img, cmdline="console=ttyS0 quiet")
    assert li.plan.format == "elf32-multiboot" and li.mode == "protected"
    assert li.entry == 0x100004
    assert mem.read(0x100000, 64) == CODE
    assert mem.read(0x100040, 0x1000 - 64) == bytes(0x1000 - 64)
    assert li.multiboot_info == layout.MULTIBOOT_INFO_ADDR
    assert li.boot_regs == {"eax": 0x2BADB002, "ebx": 0x9000}


def test_elf32_without_multiboot_header():
    img = make_elf([seg(0x100000, CODE)], 0x100000, cls=32)
    with pytest.raises(LoadError, match="without a multiboot v1 header"):
        boot.parse_image(img)


def test_multiboot_undefined_flag_bits_ignored_as_qemu_does():
    # QEMU's hw/i386/multiboot.c looks only at bits 2 and 16; an image asking for the
    # undefined bits 3..15 boots there, so it boots here.
    img = make_elf([seg(0x100000, CODE)], 0x100000, cls=32, head=mb_header(flags=0x3 | 0x10))
    plan = boot.parse_image(img)
    assert plan.format == "elf32-multiboot" and plan.entry == 0x100000


def test_multiboot_info_contents():
    ram = 64 * MiB
    mem = FakeMem(ram)
    img = make_elf([seg(0x100000, CODE)], 0x100000, cls=32, head=mb_header())
    li = boot.load_image(mem, img, cmdline="hello exit=3")
    a = li.multiboot_info
    assert 0x9000 <= a < 0xA000
    flags = mem.u32(a)
    for bit in (0, 1, 2, 3, 6, 9):          # MEM BOOT_DEVICE CMDLINE MODS MMAP BOOT_LOADER_NAME
        assert flags & (1 << bit)
    assert mem.u32(a + 4) == 639                                  # 0x9FC00 / 1 KiB, as QEMU
    assert mem.u32(a + 8) == (ram - MiB) // 1024
    assert mem.u32(a + 12) == 0x8000FFFF
    assert mem.cstr(mem.u32(a + 16)) == "hello exit=3"
    assert mem.u32(a + 20) == 0                                   # no modules
    assert mem.cstr(mem.u32(a + 64)) == "pykvm"
    length, addr = mem.u32(a + 44), mem.u32(a + 48)
    entries = []
    p = addr
    while p < addr + length:
        size, base, n, kind = struct.unpack_from("<IQQI", mem.buf, p)
        entries.append((base, n, kind))
        p += size + 4
    assert p == addr + length
    assert entries[0] == (0, 0x9FC00, 1)
    assert entries[-1] == (0x100000, ram - 0x100000, 1)
    assert all(k in (1, 2) for _, _, k in entries)
    # everything inside the info page
    assert mem.u32(a + 16) + len("hello exit=3") + 1 <= 0xA000


def test_multiboot_info_limits():
    info = boot.build_multiboot_info(8 << 30)
    assert struct.unpack_from("<I", info, 8)[0] == (4 << 30) // 1024 - 1024   # 32-bit field
    with pytest.raises(LoadError, match="command line too long"):
        boot.build_multiboot_info(64 * MiB, "x" * 5000)


def test_multiboot_aout_kludge():
    # flat file: header at offset 0x10; it says it lives at 0x200010, load from 0x200000,
    # 0x40 bytes of file, bss up to 0x201000, entry 0x200020
    aout = (0x200010, 0x200000, 0x200040, 0x201000, 0x200020)
    hdr = mb_header(0x10003, aout=aout)
    blob = b"\x90" * 0x10 + hdr
    blob += b"\xcc" * (0x60 - len(blob))       # more file than load_end_addr asks for
    mem = FakeMem()
    li = boot.load_image(mem, blob, cmdline="x")
    assert li.plan.format == "multiboot-aout" and li.entry == 0x200020
    (s,) = li.plan.segments
    assert (s.addr, s.filesz, s.memsz) == (0x200000, 0x40, 0x1000)
    assert mem.read(0x200000, 0x40) == blob[:0x40]
    assert mem.read(0x200040, 0x1000 - 0x40) == bytes(0x1000 - 0x40)
    assert li.multiboot_info is not None


def test_multiboot_aout_kludge_in_elf32_takes_precedence():
    aout = (0x300000, 0x300000, 0, 0, 0x300000)
    img = make_elf([seg(0x100000, CODE)], 0x100000, cls=32, head=mb_header(0x10003, aout=aout))
    plan = boot.parse_image(img)
    hdr_off = plan.multiboot.offset
    assert plan.entry == 0x300000 and plan.segments[0].addr == 0x300000
    assert plan.segments[0].data == img[hdr_off:]


@pytest.mark.parametrize("aout,msg", [
    ((0x200000, 0x200010, 0, 0, 0x200010), "load_addr .* is above header_addr"),
    ((0x200100, 0x200000, 0, 0, 0x200000), "larger than the header's file offset"),
    ((0x200000, 0x200000, 0x300000, 0, 0x200000), "image truncated"),
    ((0x200000, 0x200000, 0x200020, 0x200010, 0x200000), "bss_end_addr"),
    ((0x200000, 0x200000, 0, 0, 0x500000), "entry point 0x500000 is outside"),
])
def test_multiboot_aout_kludge_errors(aout, msg):
    blob = mb_header(0x10003, aout=aout) + bytes(0x40)
    with pytest.raises(LoadError, match=msg):
        boot.parse_image(blob)


def test_truncated_multiboot_header():
    with pytest.raises(LoadError, match="truncated"):
        boot.find_multiboot_header(mb_header(0x10003))


def test_multiboot_aout_past_4g_and_bad_command_lines():
    aout = (0xFFFFF000, 0xFFFFF000, 0, 0, 0xFFFFF000)       # the whole file: 0x2020 bytes
    with pytest.raises(LoadError, match="past 4 GiB"):
        boot.parse_image(mb_header(0x10003, aout=aout) + bytes(0x2000))
    img = make_elf([seg(0x100000, CODE)], 0x100000, cls=32, head=mb_header())
    for bad, msg in (("a\0b", "NUL byte"), ("\ud800", "cannot be encoded"), (5, "must be a string")):
        mem = FakeMem()
        with pytest.raises(LoadError, match=msg):
            boot.load_image(mem, img, cmdline=bad)
        assert mem.buf.count(0xAA) == len(mem.buf)          # nothing written
    # an argv string that was not valid UTF-8 goes to the guest as the bytes it was
    mem = FakeMem()
    li = boot.load_image(mem, img, cmdline=os.fsdecode(b"x=\xff"))
    assert mem.read(mem.u32(li.multiboot_info + 16), 4) == b"x=\xff\0"


# ---- flat binaries --------------------------------------------------------------------------------

def test_flat_real_mode_may_use_low_memory():
    mem = FakeMem()
    li = boot.load_image(mem, b"\xfa\xf4", flat_addr=0x8000)
    assert li.mode == "real" and li.entry == 0x8000
    assert mem.read(0x8000, 2) == b"\xfa\xf4"
    assert modes.real_mode_entry(0x8000) == (0, 0x8000)
    assert modes.real_mode_entry(0x12345) == (0x1234, 5)


def test_flat_long_mode_respects_reserved_region():
    with pytest.raises(LoadError, match="VMM-reserved"):
        boot.load_image(FakeMem(), b"\xf4", flat_addr=0x8000, flat_mode="long")
    li = boot.load_image(FakeMem(), b"\xf4", flat_addr=0x100000, flat_mode="long")
    assert li.mode == "long"


def test_flat_needs_address():
    with pytest.raises(LoadError, match="no load address"):
        boot.parse_image(b"\xf4\xf4\xf4\xf4")
    with pytest.raises(LoadError, match="entry point"):
        boot.parse_image(b"\xf4", flat_addr=0x8000, flat_entry=0x9000)
    with pytest.raises(LoadError, match="below 1 MiB"):
        boot.parse_image(b"\xf4" * 0x100, flat_addr=0xFFFF0)


# ---- symbols and bounded work -----------------------------------------------------------------------

def test_symbols_from_synthetic_elf():
    img = with_symbols(make_elf([seg(0x100000, CODE, 0x1000)], 0x100000),
                       {"_start": 0x100000, "pykvm_params": 0x100100, "x": 1})
    assert boot.elf_symbols(img) == {"_start": 0x100000, "pykvm_params": 0x100100, "x": 1}
    assert boot.find_symbol(img, "pykvm_params") == 0x100100
    assert boot.find_symbol(img, "pykvm") is None
    li = boot.load_image(FakeMem(), img)
    assert li.params_addr == 0x100100
    assert li.written == [(0x100000, 0x1000)]
    img32 = with_symbols(make_elf([seg(0x100000, CODE, 0x1000)], 0x100000, cls=32,
                                  head=mb_header()), {"pykvm_params": 0x100200}, cls=32)
    assert boot.find_symbol(img32, "pykvm_params") == 0x100200


def test_params_symbol_is_translated_and_must_lie_in_a_segment_to_count():
    # a higher-half ELF32: the symbol is a virtual address, the host writes the physical one
    img = with_symbols(make_elf([seg(0xC0100000, CODE, 0x1000, paddr=0x100000)], 0xC0100000,
                                cls=32, head=mb_header()), {"pykvm_params": 0xC0100040}, cls=32)
    assert boot.load_image(FakeMem(), img).params_addr == 0x100040
    for value in (0x2000, 0x100000 + 0x1000 - 64):      # outside / running off the end
        img = with_symbols(make_elf([seg(0x100000, CODE, 0x1000)], 0x100000),
                           {"pykvm_params": value})
        # QEMU boots such an image (symbols never decide a boot): it has no parameters
        assert boot.load_image(FakeMem(), img).params_addr is None


def test_symbol_table_errors_are_load_errors():
    base = make_elf([seg(0x100000, CODE)], 0x100000)
    img = with_symbols(base, {"a": 1}, strtab_type=1)
    with pytest.raises(LoadError, match="string table .* is not one"):
        boot.elf_symbols(img)
    img = bytearray(with_symbols(base, {"a": 1}))
    struct.pack_into("<H", img, 0x3A, 12)                           # e_shentsize
    with pytest.raises(LoadError, match="bad ELF section header size 12"):
        boot.elf_symbols(bytes(img))
    img = with_symbols(base, {"a": 1})
    with pytest.raises(LoadError, match="truncated"):
        boot.elf_symbols(img[:-40])
    with pytest.raises(LoadError, match="bad symbol name"):
        boot.find_symbol(img, "")


def test_many_headers_for_one_symbol_table_read_it_once(monkeypatch, hang_guard):
    """The 1000-SYMTAB-headers image of issue 8 (each header the same table of ~4000 symbols)
    took minutes; each distinct table is now read once."""
    syms = {f"sym{i}": 0x100000 + i for i in range(4000)}
    syms["pykvm_params"] = 0x100100
    img = with_symbols(make_elf([seg(0x100000, CODE, 0x1000)], 0x100000), syms, nsymtab=1000)
    assert 100_000 < len(img) < 200_000
    calls = []
    real = boot.elf._read_symbols
    monkeypatch.setattr(boot.elf, "_read_symbols",
                        lambda *a, **k: calls.append(a[2].offset) or real(*a, **k))
    assert boot.find_symbol(img, "pykvm_params") == 0x100100
    assert len(boot.elf_symbols(img)) == 4001
    assert boot.load_image(FakeMem(), img).params_addr == 0x100100
    assert len(calls) == 3 and len(set(calls)) == 1          # one table read, once per call


def test_overlapping_symbol_tables_are_refused(hang_guard):
    # 1000 headers, each one symbol further into the same table: all distinct, all overlapping
    syms = {f"sym{i}": 0x100000 + i for i in range(4000)}
    img = with_symbols(make_elf([seg(0x100000, CODE, 0x1000)], 0x100000), syms, nsymtab=1000,
                       shift=1)
    with pytest.raises(LoadError, match="symbol tables of sections 2 and 3 overlap"):
        boot.elf_symbols(img)
    # the image still boots (QEMU ignores symbol tables it cannot read), without parameters
    assert boot.load_image(FakeMem(), img).params_addr is None


def test_absurd_header_counts_are_refused(hang_guard):
    img = bytearray(make_elf([seg(0x100000, CODE)], 0x100000))
    struct.pack_into("<H", img, 0x38, 0xFFFF)                      # e_phnum (PN_XNUM)
    with pytest.raises(LoadError, match="too many ELF program headers: 65535"):
        boot.parse_image(bytes(img))
    # extended section numbering: e_shnum 0, the count in section 0's sh_size
    img = bytearray(with_symbols(make_elf([seg(0x100000, CODE)], 0x100000), {"a": 1}))
    shoff = struct.unpack_from("<Q", img, 0x28)[0]
    struct.pack_into("<H", img, 0x3C, 0)
    struct.pack_into("<Q", img, shoff + 32, 3)                     # the real count: fine
    assert boot.elf_symbols(bytes(img)) == {"a": 1}
    struct.pack_into("<Q", img, shoff + 32, 1 << 40)
    with pytest.raises(LoadError, match="too many ELF section headers"):
        boot.elf_symbols(bytes(img))


def test_segments_sharing_file_bytes_are_not_copied(hang_guard):
    # 1000 PT_LOAD headers over the same 100 KB of file, at distinct addresses: the plan holds
    # views of the one image, not 100 MB of copies
    data = b"\x90" * 100_000
    n = 1000
    off = 64 + 56 * n
    ident = b"\x7fELF" + bytes([2, 1, 1]) + bytes(9)
    img = ident + struct.pack("<HHIQQQIHHHHHH", ET_EXEC, EM_X86_64, 1, 0x100000, 64, 0, 0, 64,
                              56, n, 64, 0, 0)
    for i in range(n):
        addr = 0x100000 + i * 0x20000
        img += struct.pack("<IIQQQQQQ", PT_LOAD, 7, off, addr, addr, len(data), len(data), 8)
    img += data
    plan = boot.parse_image(bytes(img))
    assert len(plan.segments) == n
    assert all(s.data.obj is plan.segments[0].data.obj for s in plan.segments)
    assert bytes(plan.segments[-1].data) == data


# ---- symbols (with the real guests, when the toolchain is here) -----------------------------------

@pytest.fixture(scope="module")
def built_guests(tmp_path_factory):
    if not all(shutil.which(t) for t in ("gcc", "ld", "objcopy", "make")):
        pytest.skip("host toolchain not available")
    out = tmp_path_factory.mktemp("guests")
    subprocess.run(["make", "-s", "-C", os.path.join(REPO, "guests"), f"OUT={out}", "x86"],
                   check=True, capture_output=True)
    return out / "x86"


def test_find_symbol_in_built_guest(built_guests):
    path = built_guests / "hello.elf"
    addr = boot.find_symbol(path, "pykvm_params")
    assert addr is not None and addr >= 0x100000 and addr % 8 == 0
    assert boot.find_symbol(path.read_bytes(), "_start") == boot.parse_image(path).entry
    assert boot.find_symbol(path, "no_such_symbol") is None
    assert boot.find_symbol(b"\xf4" * 8, "pykvm_params") is None
    mem = FakeMem()
    li = boot.load_image(mem, path)
    assert li.params_addr == addr and mem.read(addr, 128) == bytes(128)


def test_built_guests_load(built_guests):
    for name in ("hello", "cpuid", "msr", "assert_fail"):
        li = boot.load_image(FakeMem(), built_guests / f"{name}.elf")
        assert li.mode == "long" and li.entry == 0x100000
    li = boot.load_image(FakeMem(), built_guests / "hello32.elf", cmdline="exit=1")
    assert li.mode == "protected" and li.multiboot_info == 0x9000
    li = boot.load_image(FakeMem(), built_guests / "hello16.bin", flat_addr=0x8000)
    assert li.mode == "real"
    # the params symbol of a flat binary comes from the ELF built next to it
    assert li.params_addr == boot.find_symbol(built_guests / "hello16.elf", "pykvm_params")
    assert li.params_addr is not None


# ---- boot state -----------------------------------------------------------------------------------

def _seg():
    return SimpleNamespace(base=1, limit=1, selector=1, type=1, present=0, dpl=3, db=1, s=0,
                           l=1, g=0, avl=1, unusable=1, padding=7)


class FakeVcpu:
    def __init__(self):
        names = ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")
        self.sregs = SimpleNamespace(**{n: _seg() for n in names},
                                     gdt=SimpleNamespace(base=0, limit=0),
                                     idt=SimpleNamespace(base=9, limit=9),
                                     cr0=0, cr2=0, cr3=0, cr4=0, cr8=0, efer=0, apic_base=0xFEE00900)
        self.regs = SimpleNamespace(**{n: 0x55 for n in modes._GPRS}, rip=0, rflags=0)

    def get_sregs(self):
        return self.sregs

    def set_sregs(self, s):
        self.sregs = s

    def get_regs(self):
        return self.regs

    def set_regs(self, r):
        self.regs = r


def test_gdt_descriptors():
    assert modes.descriptor(0, 0xFFFFF, 0x9B, 0xA) == 0x00AF9B000000FFFF
    assert modes.descriptor(0, 0xFFFFF, 0x93, 0xC) == 0x00CF93000000FFFF
    g = struct.unpack("<6Q", modes.gdt_bytes("long"))
    assert g[1] == 0x00AF9B000000FFFF and g[2] == 0x00CF93000000FFFF
    assert struct.unpack("<6Q", modes.gdt_bytes("protected"))[1] == 0x00CF9B000000FFFF


def test_setup_long_mode():
    mem = FakeMem(8 * MiB)
    v = FakeVcpu()
    modes.setup_long_mode(v, mem, 0x100000, None, vcpu_index=2)
    s, r = v.sregs, v.regs
    assert s.cr0 & modes.CR0_PG and s.cr0 & modes.CR0_PE and s.cr4 & modes.CR4_PAE
    assert s.efer & (modes.EFER_LME | modes.EFER_LMA) == modes.EFER_LME | modes.EFER_LMA
    assert s.cr3 == layout.PML4_ADDR
    assert (s.cs.selector, s.cs.l, s.cs.db, s.cs.type, s.cs.present) == (8, 1, 0, 0xB, 1)
    assert all(getattr(s, n).selector == 0x10 for n in ("ds", "es", "ss"))
    assert s.tr.selector == 0x20 and s.tr.type == 0xB and s.tr.s == 0
    assert (s.gdt.base, s.gdt.limit) == (layout.GDT_ADDR, layout.GDT_LIMIT)
    assert s.apic_base == 0xFEE00900                       # untouched
    assert r.rip == 0x100000 and r.rflags == 2 and r.rax == 0
    assert r.rsp == layout.stack_top(2) == layout.STACKS_ADDR + 3 * 0x1000
    # page tables: 4 GiB identity map with 2 MiB pages
    assert mem.u64(layout.PML4_ADDR) == layout.PDPT_ADDR | 3
    for i in range(4):
        assert mem.u64(layout.PDPT_ADDR + 8 * i) == (layout.PD_ADDR + i * 0x1000) | 3
    assert mem.u64(layout.PDPT_ADDR + 32) == 0
    assert mem.u64(layout.PD_ADDR) == 0x83
    assert mem.u64(layout.PD_ADDR + 8 * 2047) == (2047 << 21) | 0x83
    assert mem.read(layout.GDT_ADDR, 48) == modes.gdt_bytes("long")


def test_setup_protected_mode():
    mem = FakeMem()
    v = FakeVcpu()
    modes.setup_protected_mode(v, mem, 0x100000, 0x2BADB002, 0x9000)
    s, r = v.sregs, v.regs
    assert s.cr0 & modes.CR0_PE and not s.cr0 & modes.CR0_PG and s.efer == 0
    assert (s.cs.db, s.cs.l, s.cs.g, s.cs.limit, s.cs.base) == (1, 0, 1, 0xFFFFFFFF, 0)
    assert (r.rax, r.rbx, r.rip, r.rflags) == (0x2BADB002, 0x9000, 0x100000, 2)


def test_setup_real_mode():
    v = FakeVcpu()
    modes.setup_real_mode(v, 0x800, 0x10)
    s, r = v.sregs, v.regs
    assert not s.cr0 & modes.CR0_PE
    assert (s.cs.selector, s.cs.base, s.cs.limit, s.cs.db) == (0x800, 0x8000, 0xFFFF, 0)
    assert (s.ds.base, s.ds.selector) == (0, 0)
    assert (s.idt.base, s.idt.limit) == (0, 0x3FF)
    assert (r.rip, r.rsp) == (0x10, layout.REAL_MODE_STACK_TOP)
    with pytest.raises(ValueError):
        modes.setup_real_mode(v, 0x10000, 0)


def test_big_ram_identity_map_and_limits():
    class Sized:
        size = 6 << 30
        writes = {}

        def write(self, gpa, data):
            self.writes[gpa] = len(data)

    m = Sized()
    modes.write_identity_map(m)
    assert m.writes[layout.PD_ADDR] == 6 * 4096
    m.size = 40 << 30
    with pytest.raises(ValueError, match="above the 32 GiB the boot page tables map"):
        modes.write_identity_map(m)
    with pytest.raises(ValueError):
        layout.stack_top(layout.MAX_VCPUS)
