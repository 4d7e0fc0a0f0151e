"""An x86 Linux guest with its root on virtio-blk, booted by ``pykvm run`` inside the nested lab.

The lab carries the root-disk guest of ``pykvm/lab/rootfs.py`` in ``/lab/linux``: the lab's own
Debian kernel (bzImage), a boot initramfs with the kernel's virtio_blk / virtio_rng modules that
mounts ``root=/dev/vda`` and switch_roots, and ``root.img`` (ext4 from Debian's busybox-static,
built with ``mke2fs -d``). Each test boots a fresh copy of that image on the pc machine's
virtio-pci (MSI-X through the in-kernel irqchip), with ``--rng`` for virtio-rng:

* the root is mounted read-write from /dev/vda; a token the test chose is written and synced by
  the first boot, found in the image file by the host, and read back by a second boot;
* ``/dev/hwrng`` is served by virtio_rng and gives bytes;
* a disk given ``,ro`` is mounted read-only, refuses a write, and its image file is unchanged;
* interactive sessions: pexpect runs ``pykvm run`` under a pty, waits for the shell prompt on
  the serial console (ttyS0) or on the virtio console (hvc0), types commands, reads the answers
  and leaves the shell, which powers the guest off (exit status 0).

Each boot's times (to the root mounted, to the root's init, the whole run) are printed and
recorded as JUnit properties (``build/lab/nested.xml``).
"""
import hashlib
import os
import re
import secrets
import sys
import time

import pytest

from pykvm.lab import linux_guest
from pykvm.testing.plugin import LACKS

pytestmark = [
    pytest.mark.requires_arch("x86_64"),
    pytest.mark.filterwarnings("ignore:record_property is incompatible:pytest.PytestWarning"),
]

TIMEOUT = 240             # seconds per boot; one takes ~15-25 s in the lab
MEM = "256M"
# Linux finds the virtio-pci functions through the DSDT's PCI root bridge (\_SB.PCI0)
CMDLINE = "panic=-1 loglevel=4 root=/dev/vda rw"
# one console only: busybox's cttyhack puts the shell on the last one /sys/class/tty/console/active
# names, and pykvm feeds only the console --console names
CONSOLE = {"serial": "console=ttyS0", "virtio": "console=hvc0"}
PROMPT = r"pykvm:/[^\r\n#]*# "


@pytest.fixture(scope="module")
def files():
    return linux_guest.root_files_or_skip("nested")


def _boot(files, disk_arg, extra_cmdline, *, console="serial"):
    return linux_guest.boot_root(files, disk_arg, f"{CONSOLE[console]} {CMDLINE} {extra_cmdline}",
                                 timeout=TIMEOUT, mem=MEM, extra=["--console", console])


def _timings(r, what, record_property):
    mounted, init = r.first("root /dev/vda mounted"), r.first("root init")
    t = {"mounted_s": mounted and round(mounted[0], 1), "root_init_s": init and round(init[0], 1),
         "run_s": round(r.seconds, 1)}
    for k, v in t.items():
        record_property(f"{what}_{k}", v)
    print(f"timing {what}: root mounted {t['mounted_s']} s, root init {t['root_init_s']} s, "
          f"whole run {t['run_s']} s")
    return t


@pytest.fixture(scope="module")
def two_boots(files, tmp_path_factory):
    """Two batch boots of one fresh root image: the first writes a token, the second reads it."""
    disk = linux_guest.copy_root(files[2], tmp_path_factory.mktemp("blk"))
    return linux_guest.token_boots(lambda d, extra: _boot(files, d, extra), disk)


def test_virtio_blk_root_mounted_from_vda(two_boots, record_property):
    _, first, _, _ = two_boots
    _timings(first, "blk_boot1", record_property)
    linux_guest.check_root_on_vda(first)
    assert first.first("powering off"), first.tail()


def test_virtio_blk_data_survives_reboot(two_boots, record_property):
    token, first, second, image_has_token = two_boots
    _timings(second, "blk_boot2", record_property)
    linux_guest.check_token_survived(token, first, second, image_has_token)


def test_virtio_rng_hwrng_readable(two_boots):
    _, first, second, _ = two_boots
    linux_guest.check_hwrng(first, second)


def test_virtio_blk_read_only_disk_unchanged(files, tmp_path, record_property):
    disk = linux_guest.copy_root(files[2], tmp_path)
    before = hashlib.sha256(disk.read_bytes()).hexdigest(), disk.stat().st_mtime_ns
    r = _boot(files, f"{disk},ro", "pykvm.batch pykvm.write-probe pykvm.token=never")
    _timings(r, "blk_ro", record_property)
    assert "mounted ro (ext4)" in r.mark("root /dev/vda mounted"), r.tail()
    assert re.search(r"disk vda: \d+ sectors, ro=1", r.mark("disk vda")), r.tail()
    assert r.mark("token write") == "token write failed", r.tail()
    probe = r.mark("write probe")
    assert probe.startswith("write probe: refused") and "Read-only" in probe, probe
    assert r.status == 0, f"pykvm run exited {r.status}: {r.stderr}\n{r.tail()}"
    after = hashlib.sha256(disk.read_bytes()).hexdigest(), disk.stat().st_mtime_ns
    assert after == before, "a read-only disk's image changed"


# --------------------------------------------------------------------------------------------------
# interactive sessions


def _interactive(files, tmp_path, console, record_property):
    pexpect = pytest.importorskip("pexpect")
    why = linux_guest.ensure_devpts()
    if why:
        pytest.skip(f"{LACKS} {why}")
    kernel, initrd, _ = files
    disk = linux_guest.copy_root(files[2], tmp_path)
    nonce = secrets.token_hex(6)
    cmdline = f"{CONSOLE[console]} {CMDLINE} pykvm.nonce={nonce}"
    argv = ["-m", "pykvm", "run", str(kernel), "--initrd", str(initrd), "--disk", str(disk), "--rng",
            "--mem", MEM, "--console", console, "--timeout", str(TIMEOUT), "--cmdline", cmdline]
    t0 = time.monotonic()
    child = pexpect.spawn(sys.executable, argv, timeout=TIMEOUT, echo=False, encoding="utf-8",
                          codec_errors="replace", env=dict(os.environ, TERM="dumb"))
    log = []
    child.logfile_read = type("L", (), {"write": lambda self, s: log.append(s), "flush": lambda self: None})()
    try:
        try:
            child.expect(PROMPT)
            t_prompt = time.monotonic() - t0
            child.sendline("cat /proc/cmdline")
            child.expect(rf"pykvm\.nonce={nonce}")
            child.expect(PROMPT)
            child.sendline("echo $((6*7))")
            child.expect(r"[\r\n]42[\r\n]")          # the answer on a line of its own
            child.expect(PROMPT)
            child.sendline("cat /sys/class/tty/console/active; exit")
            child.expect("powering off")
            child.expect(pexpect.EOF)
        except (pexpect.TIMEOUT, pexpect.EOF) as e:
            pytest.fail(f"interactive session on {console} stopped ({type(e).__name__}) after "
                        f"{time.monotonic() - t0:.0f} s; console:\n{''.join(log)[-4000:]}")
    finally:
        child.close(force=True)
    total = time.monotonic() - t0
    text = "".join(log)
    print(f"\n$ {sys.executable} {' '.join(argv)}\n{text}\n(exit {child.exitstatus}, {total:.1f} s)")
    record_property(f"console_{console}_prompt_s", round(t_prompt, 1))
    record_property(f"console_{console}_run_s", round(total, 1))
    print(f"timing console {console}: shell prompt {t_prompt:.1f} s, whole session {total:.1f} s")
    active = re.search(r"[\r\n]((?:ttyS0|hvc0)[^\r\n]*)[\r\n]", text)
    assert active and active.group(1) == CONSOLE[console].split("=")[1], text[-2000:]
    assert child.exitstatus == 0, f"pykvm run exited {child.exitstatus} / signal {child.signalstatus}"


def test_serial_console_interactive_shell(files, tmp_path, record_property):
    _interactive(files, tmp_path, "serial", record_property)


def test_virtio_console_interactive_shell(files, tmp_path, record_property):
    _interactive(files, tmp_path, "virtio", record_property)
