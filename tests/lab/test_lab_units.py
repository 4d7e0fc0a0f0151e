"""Unit tests of the lab machinery that need neither network nor QEMU."""

from __future__ import annotations

import gzip
import io
import lzma
import stat
import tarfile
from pathlib import Path

import pytest

from pykvm.lab import debian, initramfs, qemu
from pykvm.lab.debian import Index, LabError, version_compare


@pytest.mark.parametrize(
    "a,b,sign",
    [
        ("1.0", "1.0", 0), ("1.0", "1.1", -1), ("1.10", "1.9", 1), ("1:0.1", "2.0", 1),
        ("1.0~rc1", "1.0", -1), ("1.0-1", "1.0-2", -1), ("7.2.13-1", "7.2.12-1", 1),
        ("1.0a", "1.0", 1), ("1.0+b1", "1.0", 1), ("2.41-12+deb13u4", "2.41-12+deb13u5", -1),
        ("1:10.0.13+ds-0+deb13u1", "1:10.0.2+ds-1", 1), ("1.0.0", "1.0", 1),
    ],
)
def test_version_compare(a, b, sign):
    r = version_compare(a, b)
    assert (r > 0) - (r < 0) == sign
    r = version_compare(b, a)
    assert (r > 0) - (r < 0) == -sign


INDEX = """Package: app
Version: 1.0
Architecture: amd64
Depends: liba (>= 1), libb | libc, virt-x, libz:any
Pre-Depends: libp
Filename: pool/main/a/app/app_1.0_amd64.deb
Size: 10
SHA256: {h}

Package: app
Version: 1.2
Architecture: amd64
Depends: liba (>= 1), libb | libc, virt-x
Filename: pool/main/a/app/app_1.2_amd64.deb
Size: 12
SHA256: {h}

Package: liba
Version: 1
Architecture: amd64
Depends: libb
Filename: pool/main/liba.deb
Size: 1
SHA256: {h}

Package: libb
Version: 1
Architecture: amd64
Filename: pool/main/libb.deb
Size: 1
SHA256: {h}

Package: libc
Version: 1
Architecture: amd64
Filename: pool/main/libc.deb
Size: 1
SHA256: {h}

Package: provider
Version: 3
Architecture: amd64
Provides: virt-x (= 1)
Depends: adduser
Filename: pool/main/provider.deb
Size: 1
SHA256: {h}

Package: adduser
Version: 3
Architecture: all
Filename: pool/main/adduser.deb
Size: 1
SHA256: {h}
""".format(h="0" * 64)


def test_index_newest_and_closure():
    ix = Index("suite", "amd64", INDEX)
    assert ix.get("app").version == "1.2"
    assert ix.get("virt-x").name == "provider"
    names = [p.name for p in ix.closure(["app"])]
    assert names == ["app", "liba", "libb", "provider", "adduser"]  # libc: libb already chosen
    names = [p.name for p in ix.closure(["app"], skip=lambda n: n == "provider")]
    assert "provider" not in names and "adduser" not in names
    with pytest.raises(LabError):
        ix.get("nope")


def test_mirror_from_apt_config(tmp_path, monkeypatch):
    monkeypatch.delenv("PYKVM_DEBIAN_MIRROR", raising=False)
    d = tmp_path / "etc/apt/sources.list.d"
    d.mkdir(parents=True)
    (tmp_path / "etc/apt/sources.list").write_text("# nothing\n")
    (d / "a.sources").write_text(
        "Types: deb\nURIs: http://mirror.invalid/debian-security\nSuites: bookworm-security\n\n"
        "Types: deb deb-src\nURIs: http://mirror.invalid/debian/\nSuites: bookworm\nComponents: main\n"
    )
    assert debian.debian_mirror(str(tmp_path)) == "http://mirror.invalid/debian"
    (tmp_path / "etc/apt/sources.list").write_text("deb [arch=amd64] http://other.invalid/debian bookworm main\n")
    assert debian.debian_mirror(str(tmp_path)) == "http://other.invalid/debian"
    monkeypatch.setenv("PYKVM_DEBIAN_MIRROR", "http://env.invalid/debian/")
    assert debian.debian_mirror(str(tmp_path)) == "http://env.invalid/debian"


def _ar(members: list[tuple[str, bytes]]) -> bytes:
    out = b"!<arch>\n"
    for name, data in members:
        out += f"{name:<16}{0:<12}{0:<6}{0:<6}{'100644':<8}{len(data):<10}".encode() + b"`\n" + data
        if len(data) & 1:
            out += b"\n"
    return out


def _deb(tmp_path: Path) -> Path:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        def add(name, data=b"", kind=tarfile.REGTYPE, link="", mode=0o644):
            ti = tarfile.TarInfo(name)
            ti.type, ti.linkname, ti.mode, ti.size = kind, link, mode, len(data)
            tf.addfile(ti, io.BytesIO(data) if kind == tarfile.REGTYPE else None)
        add("./lib", kind=tarfile.DIRTYPE, mode=0o755)
        add("./lib/x86_64-linux-gnu/libq.so.1", b"ELF", mode=0o755)
        add("./usr/share/q/fw.bin", kind=tarfile.SYMTYPE, link="/lib/x86_64-linux-gnu/libq.so.1")
        add("./usr/share/doc/q/README", b"doc")
    deb = tmp_path / "q.deb"
    deb.write_bytes(_ar([("debian-binary", b"2.0\n"), ("control.tar.xz", lzma.compress(b"")),
                         ("data.tar.xz", lzma.compress(buf.getvalue()))]))
    return deb


def test_ar_and_extract(tmp_path):
    deb = _deb(tmp_path)
    assert [m[0] for m in debian.ar_members(deb)] == ["debian-binary", "control.tar.xz", "data.tar.xz"]
    root = tmp_path / "root"
    got = debian.extract_deb(deb, root, lambda r: not r.startswith("usr/share/doc/"))
    assert "usr/lib/x86_64-linux-gnu/libq.so.1" in got  # merged /usr
    assert not (root / "usr/share/doc").exists()
    link = root / "usr/share/q/fw.bin"
    assert link.is_symlink() and not str(link.readlink()).startswith("/")  # kept inside root
    assert link.read_bytes() == b"ELF"
    assert stat.S_IMODE((root / "usr/lib/x86_64-linux-gnu/libq.so.1").stat().st_mode) == 0o755


def _read_newc(data: bytes) -> dict[str, tuple[int, bytes, int]]:
    out, off = {}, 0
    while True:
        assert data[off : off + 6] == b"070701"
        f = [int(data[off + 6 + 8 * i : off + 14 + 8 * i], 16) for i in range(13)]
        namesize, size = f[11], f[6]
        name = data[off + 110 : off + 110 + namesize - 1].decode()
        off = (off + 110 + namesize + 3) & ~3
        body = data[off : off + size]
        off = (off + size + 3) & ~3
        if name == "TRAILER!!!":
            return out
        out[name] = (f[1], body, (f[9] << 8) | f[10])


def test_cpio_writer(tmp_path):
    root = tmp_path / "r"
    (root / "usr/bin").mkdir(parents=True)
    (root / "usr/bin/busybox").write_bytes(b"BB")
    (root / "usr/bin/busybox").chmod(0o755)
    (root / "bin").symlink_to("usr/bin")
    img = tmp_path / "i.cpio.gz"
    initramfs.write_initramfs(img, root, {"init": (b"#!/bin/sh\n", 0o755)})
    entries = _read_newc(gzip.decompress(img.read_bytes()))
    assert entries["usr/bin/busybox"][:2] == (stat.S_IFREG | 0o755, b"BB")
    assert entries["bin"][:2] == (stat.S_IFLNK | 0o777, b"usr/bin")
    assert stat.S_ISDIR(entries["usr"][0])
    assert entries["dev/console"][0] == stat.S_IFCHR | 0o600 and entries["dev/console"][2] == (5 << 8) | 1
    assert entries["init"][:2] == (stat.S_IFREG | 0o755, b"#!/bin/sh\n")


def _console(nonce: str, rc: int, xml: bytes | None) -> list[str]:
    import base64


    def m(s):
        return s.format(nonce=nonce)
    lines = ["[    0.1] booting", m(initramfs.MARK_OUT_BEGIN), "..  [100%]", "2 passed in 0.1s", m(initramfs.MARK_OUT_END)]
    if xml is not None:
        lines += [m(initramfs.MARK_XML_BEGIN)] + base64.encodebytes(xml).decode().splitlines() + [m(initramfs.MARK_XML_END)]
    return lines + [f"{m(initramfs.MARK_RC)}{rc}@@", "reboot: Power down"]


XML = b'<?xml version="1.0"?><testsuites><testsuite name="pytest" tests="2" failures="0" errors="0" skipped="0">' \
      b'<testcase classname="t" name="a"/><testcase classname="t" name="b"/></testsuite></testsuites>'


def test_parse_console_and_merge(tmp_path):
    r = qemu.parse_console(_console("abc", 0, XML), "abc", "riscv-max")
    assert (r.status, r.reason, r.junit) == (0, "", XML)
    assert r.summary[-1] == "2 passed in 0.1s"
    # markers of another run (another nonce) are not ours
    assert qemu.parse_console(_console("zzz", 0, XML), "abc", "x").status == 3
    bad = qemu.parse_console(["Kernel panic - not syncing"], "abc", "riscv-rv64")
    assert bad.status == 3 and "Kernel panic" in bad.reason
    root = qemu.merge_junit([r, bad], tmp_path / "riscv.xml", "riscv")
    assert (root.get("tests"), root.get("errors")) == ("3", "1")
    names = [tc.get("name") for tc in root.iter("testcase")]
    assert names == ["a[riscv-max]", "b[riscv-max]", "boot[riscv-rv64]"]


def test_init_error_marker():
    lines = ["@@PYKVM-LAB:n1:INIT-ERROR=insmod kvm.ko  failed@@"]
    r = qemu.parse_console(lines, "n1", "nested")
    assert r.status == 3 and "insmod kvm.ko" in r.reason


def test_a_silent_boot_is_stopped_as_stalled(tmp_path):
    """boot(silence=S): a machine that prints and then says nothing for S seconds is stopped
    with status 4 and a reason naming the stall (what the nested lab boots once more)."""
    from pykvm.lab import qemu as q
    fake = q.Qemu(argv_prefix=["sh", "-c", 'echo "booting"; printf "partial"; exec sleep 60', "fake"])
    res = q.boot(fake, [], tmp_path / "serial.log", "n0nce", "fake", timeout=50, silence=1.5)
    assert res.status == 4 and "stalled: no console output for 2 s" in res.reason, res.reason


def test_watched_boots_stop_a_hung_test_before_the_silence():
    """The nested lab's boots watched for silence run their tests with a per-test limit a
    margin under it (a hung test fails with its stacks; only a dead L1 is booted again); the
    benchmark boot and the riscv lab keep pyproject's limit."""
    from pykvm.lab import build
    common = ["-q"]
    args = build.pytest_args(build.NESTED, build.boot_split(build.NESTED, list(build.NESTED.default_tests)),
                             common)
    limit = f"--timeout={build.NESTED_SILENCE - build.SILENCE_MARGIN:g}"
    assert 0 < build.NESTED_SILENCE - build.SILENCE_MARGIN < build.NESTED_SILENCE
    assert args["pytest-args.json"][-2:] == common + [limit]
    assert args["pytest-args-smp2.json"][-2:] == common + [limit]
    assert args["pytest-args-qemu.json"][-1:] == common and limit not in args["pytest-args-qemu.json"]
    assert all(t in args["pytest-args-qemu.json"] for t in build.NESTED.qemu_tests)
    riscv = build.pytest_args(build.RISCV, build.boot_split(build.RISCV, list(build.RISCV.default_tests)),
                              common)
    assert not any(a.startswith("--timeout") for v in riscv.values() for a in v)
