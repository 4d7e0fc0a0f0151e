"""``pykvm sandbox`` reads the files it is given as the boot loader reads guest images
(pykvm/boot/image.py): regular files only, opened without blocking, their size checked before
any read, never read whole where a part will do. Each test runs the real command line in a
subprocess on a bad input in each place the sandbox takes a path (--kernel, --busybox,
--modules, a module file in it, its modules.builtin, --root) and checks what a user sees: exit
status 2, one line on stderr, no traceback. The subprocess runs under a 2 GiB address-space
limit, so a reader that streams /dev/zero fails instead of eating the host, and with a timeout,
so a reader that blocks on a FIFO fails instead of hanging the suite."""
import gzip
import lzma
import os
import resource
import struct
import subprocess
import sys

import pytest

from pykvm import sandbox as sb
from pykvm.boot import MAX_IMAGE_SIZE, STREAM_CHUNK, LoadError

AS_LIMIT = 2 << 30                       # bytes of address space the CLI may map
RELEASE = "6.1.0-pykvm-test"
SPARSE_SIZE = 1500 << 20                 # bytes: more than any cap the sandbox applies
KINDS = ("zero", "fifo", "sparse", "dir", "missing")
SAYS = {"zero": "is a character device", "fifo": "is a FIFO", "sparse": "is too large",
        "dir": "is a directory", "missing": "No such file or directory"}


def _limit_memory():
    resource.setrlimit(resource.RLIMIT_AS, (AS_LIMIT, AS_LIMIT))


def _sandbox(*args, cwd):
    """The CLI's result; TimeoutExpired (a failure) if it blocks."""
    return subprocess.run([sys.executable, "-m", "pykvm", "sandbox", *args, "--timeout", "5",
                           "--", "true"], capture_output=True, text=True, timeout=60,
                          cwd=cwd, preexec_fn=_limit_memory)


def _assert_one_line(r, says):
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stderr, r.stderr[-2000:]
    assert r.stderr.endswith("\n") and r.stderr.count("\n") == 1, r.stderr[-2000:]
    assert r.stderr.startswith("pykvm: sandbox: ") and says in r.stderr, r.stderr
    assert r.stdout == ""


def _bzimage(version: bytes, size: int = 0x1000) -> bytes:
    img = bytearray(size)
    img[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", img, 0x20E, 0x400 - 0x200)
    img[0x400:0x400 + len(version) + 1] = version + b"\0"
    return bytes(img)


def _bad(tmp_path, kind: str, name: str = "bad") -> str:
    """A path of the ``kind`` (see KINDS) under tmp_path."""
    path = tmp_path / name
    if kind == "zero":
        os.symlink("/dev/zero", path)
    elif kind == "fifo":
        os.mkfifo(path)                  # no writer: a blocking open would wait forever
    elif kind == "sparse":
        with open(path, "wb") as f:
            f.truncate(SPARSE_SIZE)
    elif kind == "dir":
        path.mkdir()
    elif kind == "missing":
        os.symlink(tmp_path / "nothing-here", path)
    return str(path)


@pytest.fixture
def kit(tmp_path):
    """A kernel whose release the sandbox can read, and an empty modules directory (no
    modules.builtin: the modules are taken as built in)."""
    (tmp_path / "bzImage").write_bytes(_bzimage(f"{RELEASE} (test) #1".encode()))
    (tmp_path / "mods").mkdir()
    return tmp_path


@pytest.mark.parametrize("kind", KINDS)
def test_a_kernel_that_is_no_regular_file_or_too_large_is_one_line(tmp_path, kind):
    r = _sandbox("--kernel", _bad(tmp_path, kind), cwd=tmp_path)
    _assert_one_line(r, SAYS[kind])
    assert "give --kernel" in r.stderr


def test_a_kernel_too_large_for_the_loader_is_refused_whatever_the_guest_ram(tmp_path):
    r = _sandbox("--kernel", _bad(tmp_path, "sparse"), "--mem", "4G", cwd=tmp_path)
    _assert_one_line(r, "MAX_IMAGE_SIZE")


@pytest.mark.parametrize("kind", KINDS)
def test_a_busybox_that_is_no_regular_file_or_too_large_is_one_line(kit, kind):
    r = _sandbox("--kernel", "bzImage", "--modules", "mods", "--busybox", _bad(kit, kind),
                 cwd=kit)
    _assert_one_line(r, SAYS[kind])
    assert "busybox" in r.stderr


@pytest.mark.parametrize("kind", ("zero", "fifo", "sparse", "missing", "bomb"))
def test_a_module_file_that_is_no_regular_file_too_large_or_a_bomb_is_one_line(kit, kind):
    if kind == "bomb":                   # 96 MiB of zeros in a few KiB of xz
        (kit / "mods" / "overlay.ko.xz").write_bytes(lzma.compress(bytes(96 << 20)))
        says = "decompresses to more than MAX_MODULE_SIZE"
    else:
        _bad(kit / "mods", kind, "overlay.ko")
        says = SAYS[kind]
    r = _sandbox("--kernel", "bzImage", "--modules", "mods", cwd=kit)
    _assert_one_line(r, says)
    assert "overlay.ko" in r.stderr


@pytest.mark.parametrize("kind", KINDS)
def test_a_modules_builtin_that_is_no_regular_file_or_too_large_is_one_line(kit, kind):
    _bad(kit / "mods", kind, "modules.builtin")
    r = _sandbox("--kernel", "bzImage", "--modules", "mods", cwd=kit)
    _assert_one_line(r, SAYS[kind])
    assert "modules.builtin" in r.stderr


@pytest.mark.parametrize("kind", ("zero", "fifo", "sparse", "missing"))
def test_a_modules_directory_or_root_that_is_no_directory_is_one_line(kit, kind):
    bad = _bad(kit, kind)
    r = _sandbox("--kernel", "bzImage", "--modules", bad, cwd=kit)
    _assert_one_line(r, "does not exist" if kind == "missing" else "is not a directory")
    r = _sandbox("--kernel", "bzImage", "--modules", "mods", "--root", bad, cwd=kit)
    _assert_one_line(r, "not a directory")


def test_a_kernel_release_that_names_another_directory_is_not_taken(tmp_path):
    (tmp_path / "k").write_bytes(_bzimage(b"../../../etc #1"))
    r = _sandbox("--kernel", "k", cwd=tmp_path)
    _assert_one_line(r, "release cannot be read; give --modules")


# -- the release, read from a file without holding it ------------------------------------------
def test_the_release_comes_from_a_bzimage_header_however_large_the_file(tmp_path):
    path = tmp_path / "k"
    path.write_bytes(_bzimage(f"{RELEASE} (gcc) #1".encode()))
    with open(path, "r+b") as f:
        f.truncate(900 << 20)                # a sparse tail the header read never reaches
    assert sb.read_kernel_release(str(path), 1 << 30) == RELEASE
    with pytest.raises(LoadError, match=r"too large: .* more than guest RAM \(--mem\)"):
        sb.read_kernel_release(str(path), 512 << 20)
    os.truncate(path, MAX_IMAGE_SIZE + 1)
    with pytest.raises(LoadError, match="MAX_IMAGE_SIZE"):
        sb.read_kernel_release(str(path), MAX_IMAGE_SIZE * 4)


def test_the_banner_is_found_past_holes_across_chunk_ends_and_in_a_gzip_member(tmp_path):
    banner = f"Linux version {RELEASE} (gcc version 14) #1 SMP\0".encode()
    path = tmp_path / "Image"
    with open(path, "wb") as f:              # after a 64 MiB hole, cut by a chunk's end
        f.seek((64 << 20) + STREAM_CHUNK - 7)
        f.write(banner)
    assert sb.read_kernel_release(str(path), 1 << 30) == RELEASE
    path.write_bytes(b"MZ" + bytes(STREAM_CHUNK) + gzip.compress(bytes(3 << 20) + banner))
    assert sb.read_kernel_release(str(path), 1 << 30) == RELEASE
    path.write_bytes(b"MZ" + bytes(4096) + b"\x1f\x8b\x08 not gzip" * 1000)
    assert sb.read_kernel_release(str(path), 1 << 30) is None
