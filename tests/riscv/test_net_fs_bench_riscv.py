"""virtio-net and virtio-fs throughput inside the riscv lab's Linux guest, pykvm against the lab's
QEMU ``-accel kvm`` (trixie ``qemu-system-riscv``, 10.0) with the same backends: passt (QEMU's
``-netdev stream`` on a socket passt holds as ``--fd``), a tap in a network namespace, and
virtiofsd (``vhost-user-fs-device``); virtio-mmio with KVM's in-kernel AIA in both. What is
compared and how: :mod:`pykvm.lab.netbench`; the figures: docs/virtio.md. Ratios are reported,
not asserted."""
import pytest

from pykvm.lab import netbench
from pykvm.testing.plugin import LACKS, kvm_usable

pytestmark = [
    pytest.mark.requires_arch("riscv64"),
    pytest.mark.filterwarnings("ignore:record_property is incompatible:pytest.PytestWarning"),
]


def test_virtio_net_and_fs_throughput_against_qemu_on_riscv(tmp_path, record_property):
    why = None if kvm_usable() else "a usable /dev/kvm"
    why = why or netbench.missing("riscv64")
    if why:
        pytest.skip(f"{LACKS} {why}")
    netbench.run_and_report("riscv64", "console=ttyS0 panic=-1 loglevel=4 root=/dev/vda rw", tmp_path,
                            record_property)
