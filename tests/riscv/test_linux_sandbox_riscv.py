"""``pykvm sandbox`` inside the riscv lab: a command runs in a RISC-V Linux guest (virt machine,
virtio-mmio with the AIA irqchip) whose root is the lab's own root file system, shared through
virtiofsd; the same checks as tests/nested/test_linux_sandbox.py (output, exit status, the
guest's kernel and command line, the working directory, the overlay that keeps writes from the
host), in one boot.
"""
import pytest

from pykvm.lab import linux_guest

pytestmark = [
    pytest.mark.requires_arch("riscv64"),
    pytest.mark.filterwarnings("ignore:record_property is incompatible:pytest.PytestWarning"),
]


def test_sandbox_runs_the_command_in_the_riscv_guest_over_an_overlay(tmp_path):
    args = linux_guest.sandbox_args(tmp_path / "modules")
    linux_guest.check_sandbox_overlay(args, tmp_path)
