"""``pykvm sandbox``'s host side without a guest (pykvm/sandbox.py): reading a kernel's release,
resolving modules and their dependencies, refusing a dynamic busybox, quoting the command into
/init (checked by a real ``sh``), the initramfs it writes, the console filter's markers, and the
command line's one-line refusals. The guest side runs in the labs
(tests/nested/test_linux_sandbox.py, tests/riscv/test_linux_sandbox_riscv.py)."""
import gzip
import struct
import subprocess
import sys

import pytest

from pykvm import sandbox as sb
from pykvm.lab.initramfs import read_newc


def _bzimage(version: bytes) -> bytes:
    img = bytearray(0x1000)
    img[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", img, 0x20E, 0x400 - 0x200)
    img[0x400:0x400 + len(version) + 1] = version + b"\0"
    return bytes(img)


def test_kernel_release_from_the_bzimage_header_the_banner_and_a_gzip_payload():
    assert sb.kernel_release(_bzimage(b"6.1.0-28-amd64 (debian-kernel@lists.debian.org) #1")) \
        == "6.1.0-28-amd64"
    banner = b"junk\0Linux version 6.12.9-riscv64 (gcc version 14) #1 SMP\0"
    assert sb.kernel_release(b"\0" * 100 + banner) == "6.12.9-riscv64"
    assert sb.kernel_release(b"MZ" + b"\0" * 64 + gzip.compress(banner)) == "6.12.9-riscv64"
    assert sb.kernel_release(b"\0" * 4096) is None
    assert sb.kernel_release(b"\x1f\x8b\x08 broken gzip") is None


def _ko(depends: str) -> bytes:
    return b"\x7fELF" + b"\0" * 60 + b"license=GPL\0depends=" + depends.encode() + b"\0name=x\0"


def test_modules_come_with_their_dependencies_first_and_builtins_are_skipped(tmp_path):
    tree = tmp_path / "6.1.0" / "kernel" / "fs"
    (tree / "fuse").mkdir(parents=True)
    (tree / "overlayfs").mkdir()
    (tree / "fuse" / "virtiofs.ko").write_bytes(_ko("fuse"))
    (tree / "fuse" / "fuse.ko").write_bytes(_ko(""))
    import lzma
    (tree / "overlayfs" / "overlay.ko.xz").write_bytes(lzma.compress(_ko("")))
    (tmp_path / "6.1.0" / "modules.builtin").write_text("kernel/drivers/virtio/virtio_pci.ko\n")
    got = sb.find_modules(tmp_path / "6.1.0", ["virtio_pci", "virtiofs", "overlay"])
    assert [n for n, _ in got] == ["fuse", "virtiofs", "overlay"]
    assert got[2][1] == _ko("")                               # decompressed
    (tree / "fuse" / "fuse.ko").unlink()
    with pytest.raises(sb.SandboxError, match=r"no fuse module \(needed by virtiofs\)"):
        sb.find_modules(tmp_path / "6.1.0", ["virtiofs"])
    with pytest.raises(sb.SandboxError, match="no missing_fs module"):
        sb.find_modules(tmp_path / "6.1.0", ["missing_fs"])


def test_a_flat_module_directory_without_modules_builtin_leaves_unknown_names_to_the_kernel(tmp_path):
    (tmp_path / "virtiofs.ko").write_bytes(_ko("fuse"))
    (tmp_path / "fuse.ko").write_bytes(_ko(""))
    got = sb.find_modules(tmp_path, ["virtio_pci", "virtiofs"])
    assert [n for n, _ in got] == ["fuse", "virtiofs"]


def _elf(interp: bool) -> bytes:
    hdr = bytearray(64)
    hdr[:5] = b"\x7fELF\x02"
    struct.pack_into("<Q", hdr, 0x20, 64)
    struct.pack_into("<HH", hdr, 0x36, 56, 1)
    ph = bytearray(56)
    struct.pack_into("<I", ph, 0, 3 if interp else 1)
    return bytes(hdr + ph)


def test_only_a_static_busybox_is_taken(tmp_path):
    static, dynamic = tmp_path / "bb-static", tmp_path / "bb-dynamic"
    static.write_bytes(_elf(False))
    dynamic.write_bytes(_elf(True))
    assert sb.static_busybox(str(static)) == _elf(False)
    with pytest.raises(sb.SandboxError, match="dynamically linked.*busybox-static"):
        sb.static_busybox(str(dynamic))
    with pytest.raises(sb.SandboxError, match="No such file"):
        sb.static_busybox(str(tmp_path / "none"))
    (tmp_path / "text").write_text("#!/bin/sh\n")
    with pytest.raises(sb.SandboxError, match="not a 64-bit ELF"):
        sb.static_busybox(str(tmp_path / "text"))


@pytest.mark.parametrize("argv", [["uname", "-r"], ["sh", "-c", "echo 'a b' \"$HOME\" `x` $(y)"],
                                  ["printf", "%s\\n", "", "tab\there", "new\nline", "--", "-n"]])
def test_the_command_reaches_sh_argument_for_argument(argv):
    init = sb.init_script(argv, nonce="n0", cwd="/home/o'brien")
    start = init.index("\nset -- ") + 1
    end = init.index("\n", init.index("\ndir=", start) + 1)
    out = subprocess.run(["sh", "-c", init[start:end] + '\nprintf "%s\\0" "$dir" "$@"'],
                         capture_output=True, check=True).stdout
    assert out.split(b"\0")[:-1] == [b"/home/o'brien"] + [a.encode() for a in argv]
    assert "@@PYKVM-SANDBOX:n0" in init and "mnt -t virtiofs -o ro pykvmroot" in init


def test_init_refuses_no_command_and_a_bad_tag():
    with pytest.raises(sb.SandboxError, match="no command"):
        sb.init_script([], nonce="n")
    with pytest.raises(sb.SandboxError, match="bad virtio-fs tag"):
        sb.init_script(["true"], nonce="n", tag="a b")
    rw = sb.init_script(["true"], nonce="n", writable=True)
    assert "mnt -t virtiofs -o rw pykvmroot" in rw and "[ rw = ro ]" in rw


def _cpio_names(path) -> dict:
    return {k: v for k, (_mode, v) in read_newc(gzip.decompress(path.read_bytes())).items()}


def test_the_initramfs_carries_busybox_the_modules_in_order_and_init(tmp_path):
    out = tmp_path / "i.cpio.gz"
    sb.build_initramfs(out, busybox=b"BB", modules=[("fuse", b"F"), ("virtiofs", b"V")],
                       init="#!/bin/busybox sh\n")
    names = _cpio_names(out)
    assert names["bin/busybox"] == b"BB" and names["init"] == b"#!/bin/busybox sh\n"
    assert names["lib/modules/modules.list"] == b"fuse.ko\nvirtiofs.ko\n"
    assert names["lib/modules/virtiofs.ko"] == b"V" and "dev/console" in names


def test_the_console_filter_passes_only_the_commands_output():
    got = []
    f = sb.ConsoleFilter("abc", got.append)
    data = (b"[ 0.1] Linux boots\r\n@@PYKVM-SANDBOX:abc:START@@\nhello\n"
            b"@@PYKVM-SANDBOX:other:EXIT=9@@\n@@PYKVM-SANDBOX:abc:EXIT=3@@\r\nafter")
    for k in range(0, len(data), 5):                     # markers split across reads
        f.feed(data[k:k + 5])
    f.close()
    assert b"".join(got) == b"hello\n@@PYKVM-SANDBOX:other:EXIT=9@@\n"   # a forged one is output
    assert f.status == 3 and f.error is None and b"Linux boots" in f.early
    f = sb.ConsoleFilter("n", got.append)
    f.feed(b"@@PYKVM-SANDBOX:n:NOTE=/boot stays read-only: why@@\n"
           b"@@PYKVM-SANDBOX:n:ERROR=insmod virtiofs.ko@@\n")
    assert f.error == "insmod virtiofs.ko" and f.status is None
    assert f.notes == ["/boot stays read-only: why"]


def _pykvm(*args):
    return subprocess.run([sys.executable, "-m", "pykvm", *args], capture_output=True,
                          text=True, timeout=60)


def test_the_command_line_refuses_in_one_line(tmp_path):
    r = _pykvm("sandbox")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "no command given" in r.stderr
    r = _pykvm("sandbox", "--kernel", str(tmp_path / "none"), "--", "uname", "-r")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "give --kernel" in r.stderr
    (tmp_path / "k").write_bytes(b"\0" * 4096)
    r = _pykvm("sandbox", "--kernel", str(tmp_path / "k"), "--", "true")
    assert r.returncode == 2 and "release cannot be read; give --modules" in r.stderr
    r = _pykvm("sandbox", "--root", str(tmp_path / "none"), "--kernel", str(tmp_path / "k"),
               "--", "true")
    assert r.returncode == 2 and "not a directory" in r.stderr
    r = _pykvm("sandbox", "--help")
    assert r.returncode == 0 and "busybox-static" in r.stdout and "--rw" in r.stdout
