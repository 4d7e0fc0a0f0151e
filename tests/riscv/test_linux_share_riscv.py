"""virtio-fs with a RISC-V Linux guest booted by ``pykvm run`` inside the riscv lab (virt machine,
virtio-mmio): the same two shares through virtiofsd (one read-write, one read-only) and the same
checks as tests/nested/test_linux_share.py (the body is :func:`pykvm.lab.linux_guest.boot_shares`
and :func:`~pykvm.lab.linux_guest.check_shares`).
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
