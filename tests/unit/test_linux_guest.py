"""The pieces of the minimal Linux guests that need no KVM: the busybox initramfs and the lab part
(pykvm/lab/linux_guest.py, from a stand-in .deb), its /init, the device tree Linux needs
(cache-block sizes) and the Zkr seed CSR the RISC-V platform answers."""
import contextlib
import gzip
import io
import json
import shutil
import subprocess
import tarfile
from pathlib import Path
from types import SimpleNamespace

import pytest

from pykvm.arch.riscv import cpu
from pykvm.platform import fdt
from pykvm.lab import linux_guest


def _cpio(data: bytes) -> dict:
    """name -> (mode, payload) of a newc archive."""
    out, off = {}, 0
    while True:
        hdr = data[off:off + 110]
        assert hdr[:6] == b"070701"
        f = [int(hdr[6 + 8 * i:14 + 8 * i], 16) for i in range(13)]
        mode, size, namesize = f[1], f[6], f[11]
        name = data[off + 110:off + 110 + namesize - 1].decode()
        off = (off + 110 + namesize + 3) & ~3
        payload = data[off:off + size]
        off = (off + size + 3) & ~3
        if name == "TRAILER!!!":
            return out
        out[name] = (mode, payload)


def _deb(path: Path, files: dict) -> Path:
    """A .deb (ar archive, data.tar.gz) holding ``files``."""
    tar = io.BytesIO()
    with tarfile.open(fileobj=tar, mode="w:gz") as t:
        for name, data in files.items():
            ti = tarfile.TarInfo("./" + name)
            ti.size, ti.mode = len(data), 0o755
            t.addfile(ti, io.BytesIO(data))
    members = [("debian-binary", b"2.0\n"), ("control.tar.gz", b""), ("data.tar.gz", tar.getvalue())]
    out = b"!<arch>\n"
    for name, data in members:
        out += f"{name + '/':<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(data):<10}`\n".encode() + data
        if len(data) % 2:
            out += b"\n"
    path.write_bytes(out)
    return path


class _Archive:
    """What linux_guest needs of pykvm.lab.debian.Archive, from one stand-in busybox-static."""

    def __init__(self, cache: Path, deb: Path):
        self.cache, self.deb = cache, deb
        self.pkg = SimpleNamespace(name="busybox-static", version="1:1.0-1", sha256="ab" * 32)

    def index(self, suite, arch):
        return SimpleNamespace(get=lambda name: self.pkg)

    def fetch(self, pkg, purpose=""):
        return self.deb

    def lock(self, key, what=""):
        return contextlib.nullcontext()


@pytest.fixture
def archive(tmp_path):
    deb = _deb(tmp_path / "bb.deb", {"usr/bin/busybox": b"\x7fELF busybox stand-in",
                                     "usr/share/doc/busybox/README": b"x"})
    return _Archive(tmp_path / "cache", deb)


def test_initramfs_has_busybox_init_and_console(archive):
    path, info = linux_guest.build_initramfs(archive, "trixie", "amd64")
    files = _cpio(gzip.decompress(path.read_bytes()))
    assert files["init"][1].decode() == linux_guest.GUEST_INIT and files["init"][0] & 0o111
    assert files["bin/busybox"][1] == b"\x7fELF busybox stand-in"
    assert files["bin/sh"][1] == b"busybox" and files["bin/poweroff"][1] == b"busybox"
    assert files["dev/console"][0] & 0o170000 == 0o020000          # a character device
    assert not any("doc" in n for n in files)
    assert "busybox-static 1:1.0-1 (trixie/amd64)" == info["busybox"]
    again, _ = linux_guest.build_initramfs(archive, "trixie", "amd64")
    assert again == path                                            # cached by content


def test_lab_part_carries_kernel_initrd_and_info(archive, tmp_path):
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"MZ kernel" * 100)
    spec = SimpleNamespace(name="nested", arch="amd64", user_suite="bookworm")
    part, info = linux_guest.lab_part(archive, spec, kernel)
    files = _cpio(gzip.decompress(part.read_bytes()))
    assert files["lab/linux/bzImage"][1] == kernel.read_bytes()
    rd = _cpio(gzip.decompress(files["lab/linux/initrd.img"][1]))
    assert "init" in rd and "bin/busybox" in rd
    meta = json.loads(files["lab/linux/info.json"][1])
    assert meta["kernel_file"] == "/lab/linux/bzImage" and info["kernel_file"] == meta["kernel_file"]


@pytest.mark.skipif(not shutil.which("sh"), reason="no sh")
def test_guest_init_is_valid_shell():
    r = subprocess.run(["sh", "-n"], input=linux_guest.GUEST_INIT, text=True, capture_output=True)
    assert r.returncode == 0, r.stderr
    for step in ("/init reached", "suspending to RAM", "resumed", "powering off"):
        assert step in linux_guest.GUEST_INIT
    assert "echo mem > /sys/power/state" in linux_guest.GUEST_INIT
    assert "poweroff -f" in linux_guest.GUEST_INIT


def test_marks_are_parsed_from_the_console():
    r = linux_guest.GuestRun([], 0, "", [(1.5, "/init reached: uptime 0.9s"), (2.0, "powering off")])
    assert r.first("/init") == (1.5, "/init reached: uptime 0.9s") and r.first("resumed") is None


def _dt_props(blob: bytes, node: str) -> dict:
    """Properties of the first node named ``node`` in a DTB (name -> raw value)."""
    import struct
    off_struct, off_strings = struct.unpack_from(">II", blob, 8)
    p, depth, inside, out = off_struct, 0, None, {}
    while True:
        tok, = struct.unpack_from(">I", blob, p)
        p += 4
        if tok == fdt.FDT_BEGIN_NODE:
            end = blob.index(b"\0", p)
            name = blob[p:end].decode()
            p = (end + 4) & ~3
            depth += 1
            if name == node and inside is None:
                inside = depth
        elif tok == fdt.FDT_END_NODE:
            if inside == depth:
                return out
            depth -= 1
        elif tok == fdt.FDT_PROP:
            ln, nameoff = struct.unpack_from(">II", blob, p)
            p += 8
            pname = blob[off_strings + nameoff:blob.index(b"\0", off_strings + nameoff)].decode()
            if inside is not None and depth == inside:
                out[pname] = blob[p:p + ln]
            p = (p + ln + 3) & ~3
        elif tok == fdt.FDT_END:
            return out


def test_cache_block_sizes_in_the_device_tree():
    hart = {"hartid": 0, "isa": "rv64imafdc_zicbom_zicboz", "mmu_type": 9,
            "cbom_block_size": 64, "cboz_block_size": 64, "cbop_block_size": 64}
    props = _dt_props(fdt.build_dtb([hart], 0x80000000, 1 << 28, 10_000_000), "cpu@0")
    assert props["riscv,cbom-block-size"] == (64).to_bytes(4, "big")
    assert props["riscv,cboz-block-size"] == (64).to_bytes(4, "big")
    assert "riscv,cbop-block-size" not in props          # no Zicbop in this ISA
    plain = _dt_props(fdt.build_dtb([dict(hart, isa="rv64imafdc")], 0x80000000, 1 << 28, 1), "cpu@0")
    assert not any("block-size" in k for k in plain)


def test_hart_description_reads_the_block_sizes():
    from pykvm.arch.riscv import regs
    values = {regs.reg_id("config.satp_mode"): 9, regs.reg_id("config.zicbom_block_size"): 64,
              regs.reg_id("config.zicboz_block_size"): 128}

    class Vcpu:
        def get_one_reg(self, rid):
            if rid not in values:
                raise OSError(2, "no such register")
            return values[rid]

    d = cpu.hart_description(Vcpu(), 0, isa="rv64imafdc_zicbom_zicboz")
    assert (d["cbom_block_size"], d["cboz_block_size"]) == (64, 128) and "cbop_block_size" not in d


def test_riscv_platform_answers_the_zkr_seed_csr():
    from pykvm.platform import riscv_virt as platform
    from test_riscv_platform import virt
    p = virt(None, 4 << 20)
    got = []
    ex = SimpleNamespace(name="RISCV_CSR", csr_num=platform.CSR_SEED, set_return=got.append)
    assert p.handle_exit(0, ex) is True
    assert got[0] >> 30 == 0b10 and got[0] < 1 << 32 and not got[0] & 0x3FFF0000   # ES16
    other = SimpleNamespace(name="RISCV_CSR", csr_num=0x140, set_return=got.append)
    assert p.handle_exit(0, other) is False
