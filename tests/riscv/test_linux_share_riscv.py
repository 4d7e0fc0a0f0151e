"""virtio-fs with a RISC-V Linux guest booted by ``pykvm run`` inside the riscv lab (virt machine,
virtio-mmio): two host directories shared through virtiofsd (trixie's, from the lab image's
/lab/virtiofsd), one read-write (``--share DIR,tag=hostshare``), one read-only
(``--share DIR,tag=roshare,ro``).

The guest is the root-disk guest of ``pykvm/lab/rootfs.py``; ``pykvm.share=TAG`` on its command
line makes its init mount the tag with ``mount -t virtiofs``, print ``token.txt``, write
``from-guest.txt`` (the ``pykvm.share-write=`` word), read two symlinks in the share that point
outside it (``../outside-secret.txt`` and its absolute path) and a path up past the mount, then
list the share. The host checks: the token read, the write seen on the host (rw) and refused
with EROFS (ro), and the secret beside the share never on the console.
"""
import os
import secrets
import shutil

import pytest

from pykvm.lab import linux_guest
from pykvm.testing.plugin import LACKS, kvm_usable

pytestmark = [
    pytest.mark.requires_arch("riscv64"),
    pytest.mark.filterwarnings("ignore:record_property is incompatible:pytest.PytestWarning"),
]

TIMEOUT = 240             # seconds per boot
MEM = "256M"
CMDLINE = "console=ttyS0 panic=-1 loglevel=4 root=/dev/vda rw pykvm.batch"


def make_share(base, name):
    """``base/name`` with token.txt and two symlinks to ``base/outside-secret.txt``; returns
    (directory, token)."""
    d = base / name
    d.mkdir()
    token = secrets.token_hex(8)
    (d / "token.txt").write_text(token)
    (d / "escape").symlink_to("../outside-secret.txt")
    (d / "escape-abs").symlink_to(base / "outside-secret.txt")
    return d, token


def boot_shares(files, tmp_path, cmdline, *, timeout, mem):
    """One boot with a rw and a ro share; returns (run, rw dir, ro dir, tokens, secret,
    written)."""
    if shutil.which("virtiofsd") is None:
        pytest.skip(f"{LACKS} virtiofsd (the lab image carries it)")
    secret = secrets.token_hex(8)
    (tmp_path / "outside-secret.txt").write_text(secret)
    rw, rw_token = make_share(tmp_path, "rw")
    ro, ro_token = make_share(tmp_path, "ro")
    os.chmod(tmp_path, 0o755)
    written = secrets.token_hex(8)
    disk = linux_guest.copy_root(files[2], tmp_path)
    r = linux_guest.boot_root(
        files, disk, f"{cmdline} pykvm.share=hostshare pykvm.share=roshare "
        f"pykvm.share-write={written}", timeout=timeout, mem=mem,
        extra=["--share", f"{rw},tag=hostshare", "--share", f"{ro},tag=roshare,ro"])
    return r, rw, ro, (rw_token, ro_token), secret, written


def check_shares(r, rw, ro, tokens, secret, written):
    assert "virtiofs" in r.mark("share hostshare mounted"), r.tail()
    assert r.mark("share hostshare token") == f"share hostshare token: {tokens[0]}", r.tail()
    assert r.mark("share roshare token") == f"share roshare token: {tokens[1]}", r.tail()
    assert r.mark("share hostshare write") == "share hostshare write: written", r.tail()
    assert (rw / "from-guest.txt").read_text().strip() == written
    refused = r.mark("share roshare write")
    assert "refused" in refused and "Read-only file system" in refused, refused
    assert not (ro / "from-guest.txt").exists()
    for tag in ("hostshare", "roshare"):
        for what in ("escape", "escape-abs", "up"):
            line = r.mark(f"share {tag} {what}")
            assert "No such file" in line, line        # resolved in the guest, never the host
        assert "token.txt" in r.mark(f"share {tag} listing")
    assert secret not in r.console and secret not in r.stderr
    r.check_exit()


@pytest.fixture(scope="module")
def files():
    if not kvm_usable():
        pytest.skip(f"{LACKS} a usable /dev/kvm")
    f = linux_guest.root_files()
    if f is None:
        pytest.skip(f"{LACKS} the root-disk Linux guest ({linux_guest.LAB_DIR}/root.img: "
                    "the riscv lab carries it)")
    return f


def test_virtio_fs_share_rw_ro_and_no_escape(files, tmp_path, record_property):
    r, rw, ro, tokens, secret, written = boot_shares(files, tmp_path, CMDLINE, timeout=TIMEOUT,
                                                     mem=MEM)
    record_property("share_run_s", round(r.seconds, 1))
    check_shares(r, rw, ro, tokens, secret, written)
