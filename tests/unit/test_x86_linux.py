"""The x86 Linux boot protocol loader (pykvm.boot.linux_x86) against synthetic bzImages: the
zero page a boot loader must build (boot.rst), placement, and refusals."""
import struct

import pytest

from pykvm.boot import linux_x86
from pykvm.boot import LoadError


class Ram:
    def __init__(self, size):
        self.size = size
        self.buf = bytearray(size)

    def write(self, gpa, data):
        data = bytes(data)
        if gpa < 0 or gpa + len(data) > self.size:
            raise ValueError("outside RAM")
        self.buf[gpa:gpa + len(data)] = data

    def read(self, gpa, n):
        return bytes(self.buf[gpa:gpa + n])


def bzimage(*, version=0x020F, xload=1, setup_sects=4, kernel=b"\x90" * 4096, pref=0x1000000,
            init_size=0x200000, relocatable=1, cmdline_size=2047):
    setup = bytearray((setup_sects + 1) * 512)
    struct.pack_into("<B", setup, 0x1F1, setup_sects)
    struct.pack_into("<H", setup, 0x1FE, 0xAA55)
    setup[0x200:0x202] = bytes([0xEB, 0x6A])          # jmp: header ends at 0x202 + 0x6a
    struct.pack_into("<I", setup, 0x202, 0x53726448)
    struct.pack_into("<H", setup, 0x206, version)
    struct.pack_into("<B", setup, 0x211, 1)
    struct.pack_into("<I", setup, 0x22C, 0x7FFFFFFF)
    struct.pack_into("<B", setup, 0x234, relocatable)
    struct.pack_into("<H", setup, 0x236, xload)
    struct.pack_into("<I", setup, 0x238, cmdline_size)
    struct.pack_into("<Q", setup, 0x258, pref)
    struct.pack_into("<I", setup, 0x260, init_size)
    return bytes(setup) + kernel


def test_zero_page_cmdline_initrd_and_entry(tmp_path):
    rd = tmp_path / "initrd"
    rd.write_bytes(b"070701" + b"x" * 5000)
    ram = Ram(64 << 20)
    img = linux_x86.load(ram, bzimage(), cmdline="console=ttyS0 rdinit=/init", initrd=[str(rd)])
    assert img.load_addr == 0x1000000 and img.entry == 0x1000200
    assert ram.read(0x1000000, 4096) == b"\x90" * 4096
    bp = ram.read(img.boot_params, 4096)
    assert struct.unpack_from("<I", bp, 0x202)[0] == 0x53726448       # header copied
    assert bp[0x210] == 0xFF and bp[0x211] & 0x81 == 0x81               # loader, flags
    cmd = struct.unpack_from("<I", bp, 0x228)[0]
    assert ram.read(cmd, 27) == b"console=ttyS0 rdinit=/init\0"
    rd_addr, rd_size = struct.unpack_from("<II", bp, 0x218)
    assert rd_size == 5006 and rd_addr % 4096 == 0 and rd_addr + rd_size <= 64 << 20
    assert ram.read(rd_addr, 6) == b"070701"
    n = bp[0x1E8]
    e820 = [struct.unpack_from("<QQI", bp, 0x2D0 + 20 * i) for i in range(n)]
    assert (0x100000, (64 << 20) - 0x100000, 1) in e820


@pytest.mark.parametrize("kw,words", [
    ({"version": 0x020B}, "too old"),
    ({"xload": 0}, "no 64-bit entry"),
    ({"init_size": 1 << 30}, "too small"),
])
def test_refusals(kw, words):
    with pytest.raises(LoadError, match=words):
        linux_x86.load(Ram(64 << 20), bzimage(**kw))


def test_command_line_longer_than_the_kernel_takes():
    with pytest.raises(LoadError, match="at most 15"):
        linux_x86.load(Ram(64 << 20), bzimage(cmdline_size=15), cmdline="x" * 40)


def test_not_a_bzimage():
    assert not linux_x86.is_bzimage(b"\x7fELF" + bytes(1000))
    with pytest.raises(LoadError, match="not a bzImage"):
        linux_x86.parse_setup_header(bytes(4096))
