"""virtio-vsock and the control socket with an x86 Linux guest booted by ``pykvm run`` inside the
nested lab (pc machine, virtio-pci with MSI-X).

The guest is the root-disk guest of ``pykvm/lab/rootfs.py`` (``/lab/linux``: the lab's own
kernel; a boot initramfs that loads virtio_blk ... and the vsock modules ``vsock``,
``vmw_vsock_virtio_transport_common``, ``vmw_vsock_virtio_transport``; ``root.img`` with busybox
and ``/usr/bin/vsockecho``, a small static program of ours, ``pykvm/lab/vsockecho.c``). The tests
drive its shell under a pty (pexpect, ``pykvm/lab/guest_shell.py``):

* vsock, one boot with ``--vsock cid=3,uds=PATH``: host to guest — the guest listens on port
  1234, the test connects to PATH, writes ``CONNECT 1234``, reads ``OK <port>``, sends a token
  line and 64 KiB of random bytes and reads all of it back; the guest reports the peer as CID 2
  and the port of the ``OK`` line. Guest to host — the test listens on ``PATH_5000``, the guest
  connects to CID 2 port 5000 and sends a token; the test reads it and answers with a token of
  its own, which the guest prints. ``pykvm stat`` shows the device's connection counters, no
  drops;
* control, one boot with ``--name``: ``pykvm list`` shows the VM; ``pykvm pause`` stops a guest
  loop printing ``tick N`` (no console output for 5 s; paused 25 s in all, past the guest's
  soft-lockup threshold); ``pykvm resume`` lets it go on with the next number and the guest
  reports no lockup (pause tells it of the hold through KVM_KVMCLOCK_CTRL); ``pykvm stat --json`` has KVM's stats and the device counters; ``pykvm debug
  --dump`` shows the registers (the same twice while paused; 64-bit mode); ``pykvm stop`` ends
  the run with status 0. No test asserts a duration.
"""

import pytest

from pykvm.lab import guest_shell, linux_guest
from pykvm.testing.plugin import LACKS, kvm_usable

pytestmark = [
    pytest.mark.requires_arch("x86_64"),
    pytest.mark.filterwarnings("ignore:record_property is incompatible:pytest.PytestWarning"),
]

TIMEOUT = 300             # seconds: the run's deadline and the longest wait for one answer
MEM = "256M"
VCPUS = 1
CMDLINE = "console=ttyS0 panic=-1 loglevel=4 root=/dev/vda rw"
EFER_LMA = 1 << 10
# seconds the control test keeps the guest paused: past Linux's 20 s soft-lockup threshold, so
# a guest not told of the pause (KVM_KVMCLOCK_CTRL) reports a lockup when it runs on
HOLD = 25.0


@pytest.fixture(scope="module")
def files():
    if not kvm_usable():
        pytest.skip(f"{LACKS} a usable /dev/kvm")
    f = linux_guest.root_files()
    if f is None:
        pytest.skip(f"{LACKS} the root-disk Linux guest ({linux_guest.LAB_DIR}/root.img: "
                    "the nested lab carries it)")
    pytest.importorskip("pexpect")
    why = linux_guest.ensure_devpts()
    if why:
        pytest.skip(f"{LACKS} {why}")
    return f


@pytest.fixture(scope="module")
def short_dir():
    with guest_shell.short_dir() as d:
        yield d


@pytest.fixture(scope="module")
def vsock_vm(files, short_dir, tmp_path_factory):
    with guest_shell.vsock_vm(files, short_dir, tmp_path_factory.mktemp("vsock"), CMDLINE,
                              timeout=TIMEOUT, mem=MEM, vcpus=VCPUS) as vm:
        yield vm


def test_linux_vsock_host_connects_to_guest_echo(vsock_vm, record_property):
    shell, uds, env = vsock_vm
    record_property("vsock_prompt_s", round(shell.prompt_s, 1))
    guest_shell.check_vsock_host_to_guest(shell, uds, env)


def test_linux_vsock_guest_connects_to_host(vsock_vm):
    guest_shell.check_vsock_guest_to_host(*vsock_vm)


def test_linux_control_list_pause_resume_stat_dump_stop(files, short_dir, tmp_path,
                                                        record_property):
    r = guest_shell.control_run(files, short_dir, tmp_path, CMDLINE, timeout=TIMEOUT, mem=MEM,
                                vcpus=VCPUS, hold=HOLD,
                                record=lambda k, v: record_property("" + k, v))
    for dump in (*r["paused_dumps"], r["running_dump"]):
        assert dump["arch"] == "x86_64"
        for v in dump["vcpus"]:
            regs, sregs = v["regs"], v["sregs"]
            assert regs["rip"] != 0 and regs["rsp"] != 0, regs
            assert sregs["efer"] & EFER_LMA and sregs["cs"]["l"] == 1, sregs   # 64-bit mode
    assert "rip=0x" in r["dump_text"] and "cr0=0x" in r["dump_text"], r["dump_text"]
