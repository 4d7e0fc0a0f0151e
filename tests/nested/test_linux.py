"""An x86 Linux guest booted by ``pykvm run`` from its bzImage, inside the nested lab.

This machine's own KVM cannot run stock Linux (ring-0 code is emulated there and the kernel
stops on an emulation failure, QEMU alike), so the x86 Linux boot is proven one level down: the
nested lab's L1 kernel serves KVM (nested SVM under QEMU TCG), and pykvm boots the lab's own
Debian kernel (a bzImage) with a busybox initramfs (``pykvm/lab/linux_guest.py``) on the PC
platform: COM1 as ttyS0, the in-kernel irqchip, ACPI power-off. The guest reaches ``/init`` and
``poweroff -f`` ends the run with status 0.
"""
import re

import pytest

from pykvm.lab import linux_guest
from pykvm.testing.plugin import LACKS, kvm_usable

pytestmark = [
    pytest.mark.requires_arch("x86_64"),
    pytest.mark.filterwarnings("ignore:record_property is incompatible:pytest.PytestWarning"),
]

TIMEOUT = 300             # seconds; the boot takes ~15 s in the lab


@pytest.fixture(scope="module")
def files():
    if not kvm_usable():
        pytest.skip(f"{LACKS} a usable /dev/kvm")
    f = linux_guest.lab_files()
    if f is None:
        pytest.skip(f"{LACKS} a Linux guest kernel and initramfs ({linux_guest.LAB_DIR}: the labs carry them)")
    return f


def test_linux_bzimage_boots_to_init_and_powers_off(files, record_property):
    kernel, initrd = files
    r = linux_guest.run_guest(kernel, initrd, cmdline="console=ttyS0 panic=-1 loglevel=4",
                              extra=["--mem", "256M"], timeout=TIMEOUT,
                              echo=linux_guest.console_echo("guest"))
    print(f"\n$ {' '.join(r.argv[2:])}\n{r.console}\n(exit {r.status}, {r.seconds:.1f} s){r.stderr}")
    init = r.first("/init reached")
    assert init, f"the guest did not reach /init (exit {r.status}, {r.seconds:.0f} s):\n{r.tail()}\n{r.stderr}"
    record_property("linux_boot_to_init_s", round(init[0], 1))
    up = re.search(r"uptime ([\d.]+)s", init[1])
    if up:
        record_property("linux_guest_uptime_at_init_s", float(up.group(1)))
    assert "x86_64" in init[1], init[1]
    assert r.first("powering off"), r.tail()
    assert r.status == 0, f"pykvm run exited {r.status} (poweroff should end it with 0): {r.stderr}\n{r.tail()}"
    record_property("linux_run_s", round(r.seconds, 1))
