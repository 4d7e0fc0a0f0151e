"""Issue 16, fault 5 (third round), on real KVM with ``pykvm run``: images QEMU 7.2's
``-kernel`` boots and pykvm used to refuse, built here at test time, boot with QEMU's console
and status:

* ELF32 multiboot kernels with ``e_phentsize`` 56 (program headers 56 bytes apart), with a
  PT_LOAD of no file bytes whose ``p_offset`` lies past the end of the file, with a segment
  inside another one's BSS (QEMU's load_elf loads the BSS owner as p_filesz bytes), of
  ``e_type`` ET_DYN, and with a segment past the end of RAM (those bytes are lost, as on
  QEMU's pc);
* an a.out-kludge kernel whose ``bss_end_addr`` lies past the end of RAM;
* ``--initrd`` with QEMU's ``,,`` escape and ``--initrd ""`` (no modules).

Each guest prints through COM1 and exits through isa-debug-exit (port 0xf4) with 0x11: a
process status of 35, as QEMU reports (0x11 << 1) | 1. One case is compared with QEMU (TCG)
when qemu-system-x86_64 is installed."""
import shutil
import struct
import subprocess
import sys

import pytest

pytestmark = pytest.mark.requires_kvm

PYKVM = [sys.executable, "-m", "pykvm"]
STATUS = 35
MB = struct.pack("<III", 0x1BADB002, 0, (-0x1BADB002) & 0xFFFFFFFF)


def _code(message: bytes, check=None) -> bytes:
    """i386 code: print ``message`` on COM1; with ``check`` (an address), then print 'Z' if
    the byte there is zero, else 'N'; exit with status 0x11 and halt."""
    c = b"\x66\xba\xf8\x03"                         # mov $0x3f8, %dx
    for ch in message:
        c += bytes([0xB0, ch, 0xEE])                # mov $ch, %al; out %al, %dx
    if check is not None:
        c += b"\xa0" + struct.pack("<I", check)     # mov check, %al
        c += b"\x3c\x00\x75\x04\xb0Z\xeb\x02\xb0N"  # cmp $0; jne; mov 'Z'; jmp; mov 'N'
        c += b"\xee\xb0\x0a\xee"                    # out; mov '\n'; out
    c += b"\x66\xba\xf4\x00\xb0\x11\xee\xf4"        # mov $0xf4, %dx; mov $0x11, %al; out; hlt
    return c


def _elf32(segments, entry, *, phentsize=32, etype=2) -> bytes:
    """ELF32 i386: ``segments`` (paddr, data, memsz[, p_offset]); data from file offset 0x1000."""
    body, phdrs = bytearray(), b""
    for s in segments:
        paddr, data, memsz = s[:3]
        off = s[3] if len(s) > 3 else 0x1000 + len(body)
        if len(s) <= 3:
            body += data + bytes(-len(data) % 16)
        phdrs += struct.pack("<8I", 1, off, paddr, paddr, len(data), memsz, 7, 16)
        phdrs += bytes(phentsize - 32)
    img = bytearray(0x1000)
    img[:52] = b"\x7fELF\x01\x01\x01" + bytes(9) + struct.pack(
        "<HHIIIIIHHHHHH", etype, 3, 1, entry, 52, 0, 0, 52, phentsize, len(segments), 40, 0, 0)
    img[52:52 + len(phdrs)] = phdrs
    return bytes(img + body)


def _kludge(*, load_addr, bss_end, size=0x1000) -> bytes:
    """A flat multiboot image with the a.out-kludge fields: header at offset 0, code at 0x40."""
    flags = 0x10000
    img = bytearray(size)
    c = _code(b"OK\n")
    img[0x40:0x40 + len(c)] = c
    img[:32] = struct.pack("<8I", 0x1BADB002, flags, (-(0x1BADB002 + flags)) & 0xFFFFFFFF,
                           load_addr, load_addr, load_addr + size, bss_end, load_addr + 0x40)
    return bytes(img)


def _images():
    ok = MB + _code(b"OK\n")
    return {
        # (image bytes, expected console)
        "phentsize56": (_elf32([(0x100000, ok, 0x1000), (0x200000, b"\x01" * 16, 16)],
                               0x10000C, phentsize=56), "OK\n"),
        "filesz0_offset_past_eof": (_elf32([(0x100000, ok, 0x1000),
                                            (0x300000, b"", 0x1000, 0x7FFFFFFF)], 0x10000C),
                                    "OK\n"),
        # a segment of 0x02 bytes inside the first one's BSS: the byte at 0x100800 is not zero
        "segment_in_bss": (_elf32([(0x100000, MB + _code(b"OK\n", check=0x100800), 0x1000),
                                   (0x100800, b"\x02" * 16, 16)], 0x10000C), "OK\nN\n"),
        "et_dyn": (_elf32([(0x100000, ok, 0x1000)], 0x10000C, etype=3), "OK\n"),
        "data_past_ram": (_elf32([(0x100000, ok, 0x1000), (0x5000000, b"\x11" * 16, 16)],
                                 0x10000C), "OK\n"),
        "bss_past_ram": (_elf32([(0x100000, ok, 0x4000000)], 0x10000C), "OK\n"),
        "aout_bss_end_past_ram": (_kludge(load_addr=0x100000, bss_end=0x4100000), "OK\n"),
    }


@pytest.fixture(scope="module")
def imgs(tmp_path_factory):
    d = tmp_path_factory.mktemp("qemu-rules")
    out = {}
    for name, (data, expected) in _images().items():
        path = d / (name + ".img")
        path.write_bytes(data)
        out[name] = (str(path), expected)
    return out


def _run(args, cwd=None):
    return subprocess.run(PYKVM + ["run", "--mem", "64M", "--timeout", "20", *args],
                          capture_output=True, text=True, timeout=90, cwd=cwd)


@pytest.mark.parametrize("name", sorted(_images()))
def test_pykvm_run_boots_it_with_qemus_console_and_status(imgs, name):
    path, expected = imgs[name]
    r = _run([path])
    assert (r.stdout, r.returncode) == (expected, STATUS), r.stderr


def test_a_file_larger_than_ram_boots_when_what_it_loads_fits(tmp_path):
    # an ELF whose file is mostly bytes no segment loads (debug information, say): 96 MiB of
    # file for 64 MiB of RAM, as QEMU boots it
    path = tmp_path / "big-debug.img"
    with open(path, "wb") as f:
        f.write(_elf32([(0x100000, MB + _code(b"OK\n"), 0x1000)], 0x10000C))
        f.truncate(96 << 20)
    r = _run([str(path)])
    assert (r.stdout, r.returncode) == ("OK\n", STATUS), r.stderr


def test_overlapping_file_bytes_are_one_line_and_bad_input(tmp_path):
    # QEMU 7.2 refuses this one too ("Error while fetching elf kernel from rom")
    path = tmp_path / "overlap.img"
    path.write_bytes(_elf32([(0x100000, MB + _code(b"OK\n"), 0x1000),
                             (0x100011, b"X", 1)], 0x10000C))
    r = _run([str(path)])
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and "overlapping segments" in r.stderr, r.stderr


# Prints each module's string followed by '|', then a newline, and exits with 0x11.
MODULE_STRINGS = r"""
    .set MB_FLAGS, 0x3
    .text
    .code32
    .align 4
    .long 0x1BADB002, MB_FLAGS, -(0x1BADB002 + MB_FLAGS)
    .globl _start
_start:
    mov 20(%ebx), %ecx
    mov 24(%ebx), %edi
    mov $0x3f8, %dx
1:  test %ecx, %ecx
    jz 3f
    mov 8(%edi), %esi
2:  lodsb
    test %al, %al
    jz 4f
    out %al, %dx
    jmp 2b
4:  mov $'|', %al
    out %al, %dx
    add $16, %edi
    dec %ecx
    jmp 1b
3:  mov $'\n', %al
    out %al, %dx
    mov $0xf4, %dx
    mov $0x11, %al
    out %al, %dx
    hlt
"""


@pytest.fixture(scope="module")
def modguest(tmp_path_factory):
    if not (shutil.which("as") and shutil.which("ld")):
        pytest.skip("GNU binutils (as, ld) not installed")
    d = tmp_path_factory.mktemp("initrd-rules")
    (d / "g.S").write_text(MODULE_STRINGS)
    for cmd in (["as", "--32", "-o", "g.o", "g.S"],
                ["ld", "-m", "elf_i386", "-Ttext=0x100000", "-o", "g.elf", "g.o"]):
        r = subprocess.run(cmd, cwd=d, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
    (d / "m1.bin").write_bytes(b"one")
    (d / "m2.bin").write_bytes(b"two" * 1000)
    return str(d)


@pytest.mark.parametrize("initrd,console", [
    ("m1.bin a,,b,m2.bin", "m1.bin a,b|m2.bin|\n"),
    ("", "\n"),
    ("m1.bin,", "m1.bin|\n"),
    ("m1.bin  x y ,m2.bin", "m1.bin  x y |m2.bin|\n"),
])
def test_initrd_list_follows_qemu(modguest, initrd, console):
    r = _run(["g.elf", "--initrd", initrd], cwd=modguest)
    assert (r.stdout, r.returncode) == (console, STATUS), r.stderr


def test_initrd_item_that_names_no_file_is_refused(modguest):
    # QEMU: "Failed to open file ''" (a blank first item) / 'm1.bin,' (",," is a comma)
    for initrd, name in ((" m1.bin", "''"), ("m1.bin,,", "'m1.bin,'")):
        r = _run(["g.elf", "--initrd", initrd], cwd=modguest)
        assert r.returncode == 2 and name in r.stderr, r.stderr


@pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="QEMU not installed")
def test_qemu_boots_them_the_same(imgs):
    for name in ("segment_in_bss", "aout_bss_end_past_ram"):
        path, expected = imgs[name]
        q = subprocess.run(["qemu-system-x86_64", "-accel", "tcg", "-M", "pc", "-m", "64M",
                            "-kernel", path, "-display", "none", "-nodefaults",
                            "-serial", "stdio", "-monitor", "none", "-no-reboot",
                            "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04"],
                           capture_output=True, text=True, timeout=30)
        p = _run([path])
        assert (p.stdout, p.returncode) == (q.stdout, q.returncode) == (expected, STATUS), \
            (name, q.stderr, p.stderr)
