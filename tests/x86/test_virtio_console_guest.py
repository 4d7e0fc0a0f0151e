"""The virtio console on the real /dev/kvm: a tiny guest (``virtio_console.c``) writes on the
transmitq, which reaches the machine's console, and echoes host input fed into the receiveq;
``pykvm run --console virtio`` feeds it from standard input."""
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.requires_kvm, pytest.mark.requires_arch("x86_64")]


def test_output_and_input_through_the_virtio_console(guest_vm):
    m = guest_vm("virtio_console.c", console="virtio")
    m.virtio_console.feed(b"ping over virtio\n")      # held until the driver posts buffers
    st, got, rx_msis, tx_msis = m.sync(stage=1)
    assert st & 8 and got == len(b"ping over virtio\n")
    assert rx_msis >= 1 and tx_msis >= 2
    assert b"hello from virtio-console\nPING OVER VIRTIO\n" in m.console
    m.done()


def test_pykvm_run_feeds_stdin_to_the_virtio_console(guest_image):
    path = guest_image("virtio_console.c")
    r = subprocess.run([sys.executable, "-m", "pykvm", "run", str(path), "--console", "virtio"],
                       input=b"typed line\n", capture_output=True, timeout=60)
    assert b"hello from virtio-console" in r.stdout and b"TYPED LINE" in r.stdout, r
