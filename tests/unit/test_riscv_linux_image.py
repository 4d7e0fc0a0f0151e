"""Linux Image headers (RISC-V and arm64 shapes) and the loader's dispatch to them."""
import os
import struct

import pytest

from pykvm.boot import linux_image as L
from pykvm import boot

RAM_BASE = 0x80000000


def riscv_image(text_offset=0x200000, image_size=0x3000, body=b"\x13\x00\x00\x00" * 64,
                version=(0, 2), magic=True, magic2=True, flags=0):
    hdr = struct.pack("<IIQQQIIQ8s4sI", 0x0040006F, 0, text_offset, image_size, flags,
                      (version[0] << 16) | version[1], 0, 0,
                      b"RISCV\0\0\0" if magic else bytes(8), b"RSC\x05" if magic2 else bytes(4),
                      0)
    return hdr + body


def arm64_image(text_offset=0, image_size=0x10000, flags=0b1010):
    hdr = struct.pack("<IIQQQQQQ4sI", 0x91005A4D, 0x14000000, text_offset, image_size, flags,
                      0, 0, 0, b"ARM\x64", 0x40)
    return hdr + bytes(64)


class Mem:
    def __init__(self, size):
        self.size = size
        self.buf = bytearray(size)

    def write(self, gpa, data):
        off = gpa - RAM_BASE
        assert 0 <= off and off + len(data) <= self.size, hex(gpa)
        self.buf[off:off + len(data)] = data

    def read(self, gpa, n):
        return bytes(self.buf[gpa - RAM_BASE:gpa - RAM_BASE + n])


def test_riscv_header_fields():
    data = riscv_image(image_size=0x2b000)
    assert L.detect(data) == "riscv64"
    h = L.parse_header(data)
    assert (h.arch, h.text_offset, h.image_size, h.flags, h.version) == \
        ("riscv64", 0x200000, 0x2b000, 0, (0, 2))
    assert h.code0 == 0x0040006F and not h.big_endian
    assert "riscv64 Linux Image v0.2" in h.describe()


def test_either_riscv_magic_is_enough():
    # magic2 is the one to check since header 0.2; version 0.1 images carry only "RISCV"
    assert L.detect(riscv_image(magic=False)) == "riscv64"
    assert L.detect(riscv_image(magic2=False, version=(0, 1))) == "riscv64"
    assert L.detect(riscv_image(magic=False, magic2=False)) is None
    assert L.parse_header(b"\x7fELF" + bytes(100)) is None
    assert L.detect(riscv_image()[:63]) is None              # shorter than a header


def test_arm64_shape():
    data = arm64_image(text_offset=0x80000, image_size=0)
    h = L.parse_header(data)
    assert (h.arch, h.text_offset, h.image_size, h.version) == ("arm64", 0x80000, 0, None)
    assert h.span(len(data)) == len(data)                    # old images: the file size
    with pytest.raises(ValueError, match="big-endian"):
        L.parse_header(arm64_image(flags=1))
    plan = L.load_plan(arm64_image(image_size=0x20000), arch="arm64")
    assert plan.entry == 0x40000000 and plan.segments[0].memsz == 0x20000


def test_bad_headers():
    with pytest.raises(ValueError, match="text_offset 0x123 is not page-aligned"):
        L.parse_header(riscv_image(text_offset=0x123))
    with pytest.raises(ValueError, match="implausibly large"):
        L.parse_header(riscv_image(image_size=1 << 62))
    with pytest.raises(boot.LoadError, match="2 MiB aligned"):
        L.load_plan(riscv_image(), arch="riscv64", ram_base=0x80001000)


def test_loader_dispatch_places_image_at_ram_base_plus_text_offset():
    data = riscv_image(image_size=0x3000)
    plan = boot.parse_image(data, arch="riscv64", ram_base=RAM_BASE)
    assert (plan.format, plan.arch, plan.mode, plan.entry) == \
        ("linux-image", "riscv64", "riscv", RAM_BASE + 0x200000)
    (seg,) = plan.segments
    assert (seg.addr, seg.filesz, seg.memsz) == (RAM_BASE + 0x200000, len(data), 0x3000)
    # no ram_base: QEMU virt's
    assert boot.parse_image(data, arch="riscv64").entry == 0x80200000


def test_load_zero_fills_up_to_image_size():
    mem = Mem(4 << 20)
    mem.buf[0x200000 + 0x2000] = 0xAA                       # stale bytes inside image_size
    data = riscv_image(image_size=0x3000)
    li = boot.load_image(mem, data, arch="riscv64", ram_base=RAM_BASE, reserved=None)
    assert li.entry == RAM_BASE + 0x200000 and li.mode == "riscv"
    assert mem.read(RAM_BASE + 0x200000, len(data)) == data
    assert mem.read(RAM_BASE + 0x202000, 1) == b"\0"
    assert li.written == [(RAM_BASE + 0x200000, 0x3000)]


def test_image_size_not_file_size_must_fit_in_ram():
    data = riscv_image(image_size=0x300000)                 # a small file, a large kernel
    mem = Mem(4 << 20)
    with pytest.raises(boot.LoadError, match=r"outside guest RAM"):
        boot.load_image(mem, data, arch="riscv64", ram_base=RAM_BASE, reserved=None)
    assert not any(mem.buf)                                  # nothing written
    boot.load_image(Mem(6 << 20), data, arch="riscv64", ram_base=RAM_BASE, reserved=None)


def test_other_architectures_kernel_is_refused():
    with pytest.raises(boot.LoadError, match="riscv64 Linux Image .* cannot boot on x86_64"):
        boot.parse_image(riscv_image(), arch="x86_64")
    with pytest.raises(boot.LoadError, match="arm64 Linux Image .* cannot boot on riscv64"):
        boot.parse_image(arm64_image(), arch="riscv64")


GUESTS = os.path.join(os.path.dirname(__file__), "..", "..", "build", "guests", "riscv")


@pytest.mark.skipif(not os.path.exists(os.path.join(GUESTS, "image.bin")),
                    reason="pykvm: host lacks the RISC-V guests (riscv64-linux-gnu-gcc)")
def test_built_in_image_guest_is_an_image_of_its_elf():
    bin_, elf = (os.path.join(GUESTS, "image" + e) for e in (".bin", ".elf"))
    h = L.parse_header(open(bin_, "rb").read())
    assert h.arch == "riscv64" and h.text_offset == 0x200000 and h.version == (0, 2)
    img = boot.parse_image(bin_, arch="riscv64", ram_base=RAM_BASE)
    assert img.entry == boot.parse_image(elf, arch="riscv64").entry == 0x80200000
    syms = boot.elf_symbols(elf)
    assert h.image_size == syms["_end"] - syms["_start"]
    # set_params works on the Image: pykvm_params comes from the ELF beside it
    li = boot.load_image(Mem(4 << 20), bin_, arch="riscv64", ram_base=RAM_BASE, reserved=None)
    assert li.params_addr == syms["pykvm_params"]
