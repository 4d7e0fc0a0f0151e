"""``pykvm sandbox`` inside the nested lab: a command runs in an x86 Linux guest (pc machine,
virtio-pci) whose root is the lab's own root file system, shared through virtiofsd.

The kernel is the lab's root-disk guest kernel (``pykvm/lab/rootfs.py``); its virtiofs, fuse,
overlay and virtio modules come from the same guest's boot initramfs
(:func:`pykvm.lab.linux_guest.boot_modules`); the static busybox is the lab's own. Checked: the
command's output and exit status come back, it ran in the guest (its kernel's release and the
sandbox's kernel command line), in the working directory asked for, over a read-only root with a
writable overlay (its write is visible to it and never reaches the host), and with ``--rw`` its
write reaches the host directory.
"""
import pytest

from pykvm.lab import linux_guest

pytestmark = [
    pytest.mark.requires_arch("x86_64"),
    pytest.mark.filterwarnings("ignore:record_property is incompatible:pytest.PytestWarning"),
]


@pytest.fixture(scope="module")
def sandbox_args(tmp_path_factory):
    return linux_guest.sandbox_args(tmp_path_factory.mktemp("sandbox-modules"))


def test_sandbox_runs_the_command_in_the_guest_over_an_overlay(sandbox_args, tmp_path):
    linux_guest.check_sandbox_overlay(sandbox_args, tmp_path)


def test_sandbox_rw_writes_reach_the_host(sandbox_args, tmp_path):
    linux_guest.check_sandbox_rw(sandbox_args, tmp_path)
