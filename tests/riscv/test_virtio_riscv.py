"""virtio on the RISC-V ``virt`` machine, inside the RISC-V lab: a Linux guest booted by
``pykvm run --disk ... --rng`` finds its devices on virtio-mmio (device-tree ``virtio,mmio``
nodes at QEMU virt's addresses), their interrupts coming through KVM's in-kernel AIA (APLIC
sources 1, 2 delivering MSIs to the harts' IMSIC files).

The lab carries the root-disk guest of ``pykvm/lab/rootfs.py`` in ``/lab/linux`` (the lab's own
kernel, a boot initramfs with its virtio modules that mounts ``root=/dev/vda``, and ``root.img``,
ext4). The tests:

* the guest's root is mounted from /dev/vda (virtio-blk), a token written and synced by a first
  boot is in the image file and is read back by a second boot;
* /dev/hwrng is virtio_rng and gives random bytes;
* the guest's interrupts are the AIA's: /proc/interrupts names the APLIC-MSI and IMSIC domains;
* an interactive shell on the serial console (``pykvm run``'s stdin a pipe: the lab's image has
  no pexpect) answers commands.

Where L1's KVM has no AIA device, ``pykvm run --disk`` fails with one line, checked too.
"""
import os
import re
import secrets
import subprocess
import sys
import time

import pytest

from pykvm.lab import linux_guest
from pykvm.testing.plugin import LACKS

pytestmark = [
    pytest.mark.requires_arch("riscv64"),
    pytest.mark.filterwarnings("ignore:record_property is incompatible:pytest.PytestWarning"),
]

TIMEOUT = 240             # seconds per boot; one takes ~15-40 s in the lab
MEM = "256M"
CMDLINE = "console=ttyS0 panic=-1 loglevel=4 root=/dev/vda rw"
PROMPT = r"pykvm:/[^\r\n#]*# "


def _host_has_aia():
    from pykvm.arch.riscv import aia
    from pykvm.kvm import Kvm
    with Kvm() as kvm, kvm.create_vm() as vm:
        return aia.available(vm.fd)


@pytest.fixture(scope="module")
def files():
    f = linux_guest.root_files()
    if f is None:
        pytest.skip(f"{LACKS} the root-disk Linux guest ({linux_guest.LAB_DIR}/root.img: the riscv lab carries it)")
    if not _host_has_aia():
        pytest.skip(f"{LACKS} KVM's in-kernel RISC-V AIA (KVM_DEV_TYPE_RISCV_AIA)")
    return f


def _boot(files, disk, extra_cmdline):
    return linux_guest.boot_root(files, disk, f"{CMDLINE} {extra_cmdline}", timeout=TIMEOUT,
                                 mem=MEM, extra=["--vcpus", "2"])


@pytest.fixture(scope="module")
def two_boots(files, tmp_path_factory):
    """Two batch boots of one fresh root image: the first writes a token, the second reads it."""
    disk = linux_guest.copy_root(files[2], tmp_path_factory.mktemp("blk"))
    return linux_guest.token_boots(lambda d, extra: _boot(files, d, extra), disk)


def test_virtio_blk_root_mounted_from_vda(two_boots, record_property):
    _, first, _, _ = two_boots
    record_property("riscv_virtio_boot1_s", round(first.seconds, 1))
    linux_guest.check_root_on_vda(first)


def test_virtio_blk_data_survives_reboot(two_boots, record_property):
    token, first, second, image_has_token = two_boots
    record_property("riscv_virtio_boot2_s", round(second.seconds, 1))
    linux_guest.check_token_survived(token, first, second, image_has_token)


def test_virtio_rng_hwrng_readable(two_boots):
    _, first, second, _ = two_boots
    linux_guest.check_hwrng(first, second)


def test_virtio_without_aia_is_one_line():
    # where the host has the AIA the devices work (above), and forcing it off is refused in one
    # line; where it has none, `pykvm run --disk` says what is missing in one line
    from pykvm.machine import Machine
    f = linux_guest.root_files()
    if f is None:
        pytest.skip(f"{LACKS} the root-disk Linux guest")
    if _host_has_aia():
        with pytest.raises(ValueError, match="need the AIA irqchip"):
            Machine(f[0], machine="virt", rng=True, aia=False)
        return
    r = subprocess.run([sys.executable, "-m", "pykvm", "run", str(f[0]), "--rng", "--timeout", "5"],
                       capture_output=True, text=True, timeout=60)
    lines = r.stderr.strip().splitlines()
    assert r.returncode != 0 and len(lines) == 1, r.stderr
    assert "AIA" in lines[0] and "virtio" in lines[0], lines


# --------------------------------------------------------------------------------------------------
# the serial console, interactively


class _Session:
    """``pykvm run`` with its stdin a pipe (the lab's image has no pexpect): what is written
    reaches the guest's serial console; :meth:`expect` reads the console until a pattern."""

    def __init__(self, argv):
        self.p = subprocess.Popen([sys.executable, *argv], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.text = ""
        self.pos = 0

    def expect(self, pattern, timeout=TIMEOUT):
        import select
        end = time.monotonic() + timeout
        rx = re.compile(pattern)
        while True:
            m = rx.search(self.text, self.pos)
            if m:
                self.pos = m.end()
                return m
            left = end - time.monotonic()
            if left <= 0:
                raise TimeoutError(pattern)
            r, _, _ = select.select([self.p.stdout], [], [], left)
            if r:
                chunk = os.read(self.p.stdout.fileno(), 65536)
                if not chunk:
                    raise EOFError(pattern)
                self.text += chunk.decode("utf-8", "replace").replace("\r", "")

    def send(self, line):
        self.p.stdin.write(line.encode() + b"\n")
        self.p.stdin.flush()

    def close(self):
        if self.p.poll() is None:
            self.p.kill()
        self.p.wait()
        err = self.p.stderr.read().decode("utf-8", "replace")
        for f in (self.p.stdin, self.p.stdout, self.p.stderr):
            f.close()
        return err


def test_virtio_console_serial_interactive(files, tmp_path, record_property):
    kernel, initrd, _ = files
    disk = linux_guest.copy_root(files[2], tmp_path)
    nonce = secrets.token_hex(6)
    argv = ["-m", "pykvm", "run", str(kernel), "--initrd", str(initrd), "--disk", str(disk), "--rng",
            "--mem", MEM, "--timeout", str(TIMEOUT), "--cmdline", f"{CMDLINE} pykvm.nonce={nonce}"]
    t0 = time.monotonic()
    s = _Session(argv)
    try:
        try:
            s.expect(PROMPT)
            t_prompt = time.monotonic() - t0
            s.send("cat /proc/cmdline")
            s.expect(rf"pykvm\.nonce={nonce}")
            s.expect(PROMPT)
            s.send("echo $((6*7)); cat /sys/block/vda/size")
            m = s.expect(r"\n42\n(\d+)\n")
            sectors = int(m.group(1))
            s.expect(PROMPT)
            # the virtio-mmio interrupts are the AIA's: lines of the APLIC (MSI mode), each fired
            s.send("grep -i virtio /proc/interrupts; echo END-$((40+2))-IRQ")
            start = s.pos
            m = s.expect(r"END-42-IRQ")
            irq_text = s.text[start:m.start()]
            s.expect(PROMPT)
            s.send("exit")
            s.expect("powering off")
            status = s.p.wait(timeout=60)
        except (TimeoutError, EOFError, subprocess.TimeoutExpired) as e:
            pytest.fail(f"interactive session stopped ({type(e).__name__}: {e}) after "
                        f"{time.monotonic() - t0:.0f} s; console:\n{s.text[-4000:]}")
    finally:
        err = s.close()
    total = time.monotonic() - t0
    print(f"\n$ {sys.executable} {' '.join(argv)}\n{s.text}\n(exit {status}, {total:.1f} s){err}")
    record_property("riscv_console_prompt_s", round(t_prompt, 1))
    record_property("riscv_console_run_s", round(total, 1))
    assert sectors * 512 == disk.stat().st_size
    lines = [ln.strip() for ln in irq_text.splitlines() if "virtio" in ln.lower() and ":" in ln]
    assert len(lines) >= 2, irq_text                     # virtio0 (blk) and virtio1 (rng)
    for ln in lines:
        assert re.search(r"APLIC|MSI", ln, re.I), ln
        assert sum(int(c) for c in re.findall(r"\b(\d+)\b", ln.split(":", 1)[1])[:2]) > 0, ln
    assert status == 0, (status, err)
