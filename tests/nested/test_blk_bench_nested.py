"""virtio-blk throughput inside the nested lab's Linux guest, pykvm against the lab's QEMU
``-accel kvm`` (bookworm ``qemu-system-x86``): virtio-pci with MSI-X in both. What is compared and
how: :mod:`pykvm.lab.blkbench`; the figures: docs/virtio.md. Ratios are reported, not asserted."""
import pytest

from pykvm.lab import blkbench
from pykvm.testing.plugin import LACKS, kvm_usable

pytestmark = [
    pytest.mark.requires_arch("x86_64"),
    pytest.mark.filterwarnings("ignore:record_property is incompatible:pytest.PytestWarning"),
]


def test_virtio_blk_throughput_against_qemu(tmp_path, record_property):
    why = None if kvm_usable() else "a usable /dev/kvm"
    why = why or blkbench.missing("x86_64")
    if why:
        pytest.skip(f"{LACKS} {why}")
    blkbench.run_and_report("x86_64", "console=ttyS0 panic=-1 loglevel=4 root=/dev/vda rw", tmp_path,
                            record_property)
