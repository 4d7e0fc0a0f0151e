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
import pytest

from pykvm.lab import linux_guest

pytestmark = [
    pytest.mark.requires_arch("riscv64"),
    pytest.mark.filterwarnings("ignore:record_property is incompatible:pytest.PytestWarning"),
]

TIMEOUT = 240             # seconds per boot
MEM = "256M"


@pytest.fixture(scope="module")
def files():
    return linux_guest.root_files_or_skip("riscv")


def test_virtio_fs_share_rw_ro_and_no_escape(files, tmp_path, record_property):
    r, rw, ro, tokens, secret, written = linux_guest.boot_shares(
        files, tmp_path, linux_guest.SHARE_CMDLINE, timeout=TIMEOUT, mem=MEM)
    record_property("share_run_s", round(r.seconds, 1))
    linux_guest.check_shares(r, rw, ro, tokens, secret, written)
