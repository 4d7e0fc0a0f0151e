"""virtio-blk throughput inside the riscv lab's Linux guest: pykvm against QEMU ``-accel kvm``.

Both VMMs boot the same RISC-V guest in the same lab boot (the lab's kernel, the root-disk guest's
boot initramfs, a copy of ``root.img`` as /dev/vda) with a second, fully written 64 MiB disk
(serial ``pykvm-bench``) on virtio-mmio with the in-kernel AIA, one vCPU and 256 MiB; the guest runs
``blkbench`` on it: 1 MiB sequential and 4 KiB random writes and reads with O_DIRECT at queue
depth 1 (:mod:`pykvm.lab.blkbench`). The ratios (pykvm / QEMU throughput) are printed, recorded as
JUnit properties and shown in the lab's summary; they are measured, not asserted. The QEMU is the
lab userspace's own (trixie ``qemu-system-riscv``), carried in ``/lab/qemu``.
"""
import pytest

from pykvm.lab import blkbench, linux_guest
from pykvm.testing.plugin import LACKS, kvm_usable

pytestmark = [
    pytest.mark.requires_arch("riscv64"),
    pytest.mark.filterwarnings("ignore:record_property is incompatible:pytest.PytestWarning"),
]

def _host_has_aia():
    from pykvm.arch.riscv import aia
    from pykvm.kvm import Kvm
    with Kvm() as kvm, kvm.create_vm() as vm:
        return aia.available(vm.fd)


CMDLINE = "console=ttyS0 panic=-1 loglevel=4 root=/dev/vda rw"


def test_virtio_blk_throughput_against_qemu(tmp_path, record_property):
    if not kvm_usable():
        pytest.skip(f"{LACKS} a usable /dev/kvm")
    files = linux_guest.root_files()
    if files is None:
        pytest.skip(f"{LACKS} the root-disk Linux guest ({linux_guest.LAB_DIR}/root.img: the riscv lab carries it)")
    if not _host_has_aia():
        pytest.skip(f"{LACKS} KVM's in-kernel RISC-V AIA (KVM_DEV_TYPE_RISCV_AIA)")
    if blkbench.inner_qemu() is None:
        pytest.skip(f"{LACKS} QEMU in this lab boot ({blkbench.QEMU_DIR}: the riscv lab's first (rv64) boot carries it)")
    kernel, initrd, root = files
    cmp = blkbench.compare(kernel, initrd, root, tmp_path, arch="riscv64", cmdline=CMDLINE,
                           echo=linux_guest.console_echo("guest"))
    blkbench.report(cmp, record_property)
