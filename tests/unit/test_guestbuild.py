"""Issue 9: building guests of one's own (pykvm.guestbuild, ``pykvm guest build``) and finding the
built-in ones (pykvm.guests). No KVM needed."""
import ast
import os
import shutil
import subprocess
import sys

import pytest

from pykvm import guestbuild, guests
from pykvm.guestbuild import GuestBuildError, build

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HAVE_RISCV_CC = bool(shutil.which("riscv64-linux-gnu-gcc"))


@pytest.fixture
def cache(tmp_path, monkeypatch):
    d = tmp_path / "cache"
    monkeypatch.setenv("PYKVM_CACHE", str(d))
    return d


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """The built-in guests as guests/Makefile builds them."""
    out = tmp_path_factory.mktemp("make")
    subprocess.run(["make", "-s", "-C", os.path.join(ROOT, "guests"), f"OUT={out}",
                    f"-j{os.cpu_count() or 1}"], check=True, capture_output=True)
    return out


@pytest.mark.parametrize("src,arch,image", [
    ("x86/hello.c", "x86_64", "x86/hello.elf"),
    ("x86/msr.c", "x86_64", "x86/msr.elf"),
    ("x86/svm_asid.c", "x86_64", "x86/svm_asid.elf"),
    ("x86/hello32.c", "x86_64", "x86/hello32.elf"),
    ("x86/hello16.c", "x86_64", "x86/hello16.bin"),
    ("riscv/hello.c", "riscv64", "riscv/hello.elf"),
])
def test_same_bytes_as_the_makefile(made, cache, src, arch, image):
    """guestbuild's options are guests/Makefile's: the built-in guests come out identical."""
    if arch == "riscv64" and not HAVE_RISCV_CC:
        pytest.skip("riscv64-linux-gnu-gcc not installed")
    guests_dir = os.path.join(ROOT, "guests")
    p = build(os.path.join(guests_dir, src), arch=arch, source_root=guests_dir)
    with open(p, "rb") as a, open(made / image, "rb") as b:
        assert a.read() == b.read(), f"{src}: differs from make's {image}"
    if image.endswith(".bin"):
        with open(p[:-4] + ".elf", "rb") as a, open(made / (image[:-4] + ".elf"), "rb") as b:
            assert a.read() == b.read()


GUEST = '#include "pykvm_guest.h"\n#include "steps.h"\nvoid guest_main(void) { GUEST_SYNC(1, STEPS); }\n'


def test_cache_by_content_including_headers(tmp_path, cache):
    src = tmp_path / "g.c"
    src.write_text(GUEST)
    (tmp_path / "steps.h").write_text("#define STEPS 3\n")
    p1 = build(src)
    st = os.stat(p1)
    assert build(src) == p1 and os.stat(p1).st_mtime_ns == st.st_mtime_ns    # a cache hit
    (tmp_path / "steps.h").write_text("#define STEPS 4\n")                   # only the header
    p2 = build(src)
    assert p2 != p1 and os.path.dirname(p2).startswith(str(cache / "guests"))
    (tmp_path / "steps.h").write_text("#define STEPS 3\n")
    assert build(src) == p1                                                   # back again
    assert build(src, cflags=["-DEXTRA=1"]) not in (p1, p2)
    assert not [e for e in os.listdir(cache / "guests") if e.startswith(".")]  # no leftovers


def test_moving_the_source_keeps_the_key(tmp_path, cache):
    for d in ("a", "b"):
        (tmp_path / d).mkdir()
        (tmp_path / d / "g.c").write_text('#include "pykvm_guest.h"\n'
                                          'void guest_main(void) { GUEST_ASSERT(0); }\n')
    assert build(tmp_path / "a" / "g.c") == build(tmp_path / "b" / "g.c")


def test_compile_error_carries_the_compilers_message(tmp_path, cache):
    src = tmp_path / "bad.c"
    src.write_text('#include "pykvm_guest.h"\nvoid guest_main(void) { int x = ; }\n')
    with pytest.raises(GuestBuildError) as e:
        build(src)
    msg = str(e.value)
    first = msg.splitlines()[0]
    assert first.startswith("building bad.c (x86_64, long mode) failed: ") and "bad.c:2:" in first
    assert "expected expression before" in msg and "int x = ;" in msg      # gcc's own text


def test_link_error_and_missing_header(tmp_path, cache):
    src = tmp_path / "nolink.c"
    src.write_text('#include "pykvm_guest.h"\nvoid nothing(void) {}\n')  # no guest_main
    with pytest.raises(GuestBuildError, match=r"link failed.*guest_main"):
        build(src)
    src = tmp_path / "nohdr.c"
    src.write_text('#include "missing.h"\n')
    with pytest.raises(GuestBuildError, match=r"missing\.h: No such file"):
        build(src)


@pytest.mark.parametrize("body,mode", [
    ("void guest_main(void) {}", "long"),
    ("void guest_main32(uint32_t m, void *i) { (void)m; (void)i; }", "protected"),
    ("void guest_main16(void) {}", "real"),
])
def test_mode_follows_the_entry_point(tmp_path, cache, body, mode):
    src = tmp_path / "m.c"
    src.write_text('#include "pykvm_guest.h"\n' + body + "\n")
    p = build(src)
    assert f"-x86_64-{mode}-" in p and p.endswith(".bin" if mode == "real" else ".elf")


def test_bad_arguments(tmp_path, cache):
    src = tmp_path / "g.c"
    src.write_text("void guest_main(void) {}\n")
    with pytest.raises(GuestBuildError, match="not 'real'"):
        build(src, arch="riscv64", mode="real")
    with pytest.raises(GuestBuildError, match="not 'aarch64'"):
        build(src, arch="aarch64")
    with pytest.raises(GuestBuildError, match="no such guest source"):
        build(tmp_path / "none.c")
    with pytest.raises(GuestBuildError, match=r"\.c or \.S"):
        build(tmp_path / "g.txt")


def test_missing_tool_is_named(tmp_path, cache, monkeypatch):
    src = tmp_path / "g.c"
    src.write_text("void guest_main(void) {}\n")
    monkeypatch.setenv("PYKVM_X86_CC", "no-such-gcc")
    with pytest.raises(GuestBuildError, match=r"'no-such-gcc' is not on PATH.*PYKVM_X86_CC"):
        build(src)


@pytest.mark.skipif(not HAVE_RISCV_CC, reason="riscv64-linux-gnu-gcc not installed")
def test_riscv_guest(tmp_path, cache):
    src = tmp_path / "rv.c"
    src.write_text('#include "pykvm_guest.h"\n#include "riscv.h"\n'
                   'void guest_main(unsigned long hartid, void *dtb) '
                   '{ (void)dtb; GUEST_SYNC(1, hartid); }\n')
    p = build(src, arch="riscv64")
    with open(p, "rb") as f:
        head = f.read(20)
    assert head[:4] == b"\x7fELF" and int.from_bytes(head[18:20], "little") == 243   # EM_RISCV


def test_runtime_parts_match_setup_py():
    tree = ast.parse(open(os.path.join(ROOT, "setup.py")).read())
    parts = next(ast.literal_eval(n.value) for n in ast.walk(tree) if isinstance(n, ast.Assign)
                 and any(getattr(t, "id", None) == "RUNTIME_PARTS" for t in n.targets))
    assert tuple(parts) == guestbuild.RUNTIME_PARTS
    for p in parts:
        assert os.path.isdir(os.path.join(ROOT, "guests", p)), p


def _cli(*args, **kw):
    return subprocess.run([sys.executable, "-m", "pykvm", "guest", "build", *args],
                          capture_output=True, text=True, timeout=120, **kw)


def test_cli_guest_build(tmp_path, cache):
    src = tmp_path / "boot.c"
    src.write_text('#include "pykvm_guest.h"\nvoid guest_main16(void) {}\n')
    r = _cli(str(src))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().startswith(str(cache)) and r.stdout.strip().endswith("boot.bin")
    out = tmp_path / "out" / "b.bin"
    out.parent.mkdir()                    # -o does not create directories (as gcc's)
    r = _cli(str(src), "-o", str(out), "--mode", "real")
    assert (r.returncode, r.stdout.strip()) == (0, str(out)), r.stderr
    assert out.stat().st_size > 0 and (tmp_path / "out" / "b.elf").exists()
    src.write_text('#include "pykvm_guest.h"\nvoid guest_main(void) { oops }\n')
    r = _cli(str(src))
    assert r.returncode == 2 and "boot.c:2:" in r.stderr and "oops" in r.stderr   # bad input
    assert "Traceback" not in r.stderr
    for bad in ([str(tmp_path / "none.c")], [str(tmp_path / "x.txt")],
                [str(src), "--mode", "sideways"], [str(src), "--arch", "riscv64", "--mode", "long"]):
        r = _cli(*bad)
        assert r.returncode == 2 and "Traceback" not in r.stderr and r.stderr.count("\n") == 1, \
            (bad, r.stderr)


def test_guest_dirs_package_first_then_checkout(monkeypatch):
    monkeypatch.delenv("PYKVM_GUESTS_DIR", raising=False)
    dirs = guests.guest_dirs("x86_64")
    assert dirs[0] == os.path.join(guests.PACKAGE_DIR, "x86")
    assert dirs[-1] == os.path.join(ROOT, "build", "guests", "x86")     # this is a checkout
    monkeypatch.setenv("PYKVM_GUESTS_DIR", "/somewhere")
    assert guests.guest_dirs("riscv64")[0] == "/somewhere/riscv"


def test_installed_layout_finds_packaged_guests(tmp_path, monkeypatch):
    """As in site-packages: no guests/ or build/guests next to the package."""
    monkeypatch.delenv("PYKVM_GUESTS_DIR", raising=False)
    pkg = tmp_path / "site" / "pykvm" / "guests_bin"
    monkeypatch.setattr(guests, "PACKAGE_DIR", str(pkg))
    monkeypatch.setattr(guests, "SOURCE_DIR", str(tmp_path / "site" / "guests"))
    monkeypatch.setattr(guests, "BUILD_DIR", str(tmp_path / "site" / "build" / "guests"))
    with pytest.raises(guests.GuestNotFound) as e:
        guests.path("hello", "x86_64")
    msg = str(e.value)
    assert f"(looked in {pkg}/x86 (absent));" in msg and "build/guests" not in msg
    assert "no built-in guests" in msg
    (pkg / "x86").mkdir(parents=True)
    (pkg / "x86" / "hello.elf").write_bytes(b"\x7fELF")
    (pkg / "x86" / "hello16.elf").write_bytes(b"\x7fELF")
    (pkg / "x86" / "hello16.bin").write_bytes(b"\xf4")
    assert guests.path("hello", "x86_64") == str(pkg / "x86" / "hello.elf")
    assert guests.path("hello16", "x86_64") == str(pkg / "x86" / "hello16.bin")
    assert guests.available("x86_64") == ["hello", "hello16"]
    with pytest.raises(guests.GuestNotFound, match="`pykvm guests` lists"):
        guests.path("nope", "x86_64")
    with pytest.raises(guests.GuestNotFound, match="prebuilt in"):
        guests.build(force=True)
