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
  loop printing ``tick N`` (no console output for 5 s); ``pykvm resume`` lets it go on with the
  next number; ``pykvm stat --json`` has KVM's stats and the device counters; ``pykvm debug
  --dump`` shows the registers (the same twice while paused; 64-bit mode); ``pykvm stop`` ends
  the run with status 0. No test asserts a duration.
"""
import os
import shutil
import tempfile

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
    """A directory with a short path (Unix socket paths stop at 107 bytes), removed after."""
    d = tempfile.mkdtemp(prefix="pkv")
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def vsock_vm(files, short_dir, tmp_path_factory):
    """One guest with ``--vsock cid=3,uds=PATH --name``, at its shell prompt; powered off by
    ``exit`` after the module's tests (pykvm run must exit 0)."""
    uds = os.path.join(short_dir, "vm.sock")
    ctl = os.path.join(short_dir, "ctl")
    env = dict(os.environ, PYKVM_CONTROL_DIR=ctl)
    disk = guest_shell.fresh_disk(files, tmp_path_factory.mktemp("vsock"))
    with guest_shell.GuestShell(files, disk, CMDLINE, timeout=TIMEOUT, mem=MEM, env=env,
                                extra=["--vcpus", str(VCPUS), "--vsock", f"cid=3,uds={uds}",
                                       "--name", "vsockvm"]) as shell:
        shell.start()
        shell.command("lsmod | grep vsock")
        yield shell, uds, env
        status = shell.exit_shell()
    assert status == 0, f"pykvm run exited {status}"
    assert not os.path.exists(uds), "the vsock socket file outlived the run"


DROPS = ("tx_malformed", "tx_bad_cid", "tx_unknown_op", "tx_unknown_connection",
         "tx_credit_violation", "rst_dropped", "rx_dropped_small_buffer")


def _vsock_counters(env):
    """The device's counters, those at zero left out."""
    c = guest_shell.cli_json("stat", "vsockvm", env=env)["devices"]["virtio-vsock0"]
    return {k: v for k, v in c.items() if v}


def test_linux_vsock_host_connects_to_guest_echo(vsock_vm, record_property):
    shell, uds, env = vsock_vm
    record_property("vsock_prompt_s", round(shell.prompt_s, 1))
    r = guest_shell.vsock_host_to_guest(shell, uds, port=1234)
    assert r["ok_line"].startswith("OK ") and r["ok_line"].endswith("\n"), r["ok_line"]
    host_port = int(r["ok_line"].split()[1])
    assert r["echoed"] == r["sent"], (len(r["echoed"]), len(r["sent"]))
    # the guest saw the host (CID 2) on the port the OK line named, and echoed every byte
    assert r["guest_line"] == (len(r["sent"]), 2, host_port), r["guest_line"]
    c = _vsock_counters(env)
    assert c["connections_host"] >= 1 and "dropped" not in c, f"{c}"
    assert c["tx_bytes"] >= len(r["sent"]) and c["rx_bytes"] >= len(r["sent"]), f"{c}"


def test_linux_vsock_guest_connects_to_host(vsock_vm):
    shell, uds, env = vsock_vm
    r = guest_shell.vsock_guest_to_host(shell, uds, port=5000)
    assert r["received"] == f"{r['token']}\n".encode(), r["received"]
    assert r["reply"] == f"reply: host-reply {r['token']} {r['host_token']}", r["reply"]
    c = _vsock_counters(env)
    assert c["connections_guest"] >= 1 and "guest_refused" not in c, f"{c}"
    # the device resets a connection once both sides are done sending (the host hung up after
    # the guest's SHUT_WR); Linux's guest then sends a CREDIT_UPDATE as its reader takes the
    # reply, which the device counts as tx_unknown_connection. Nothing else may be dropped.
    assert set(c) & set(DROPS) <= {"tx_unknown_connection"}, f"{c}"
    assert c.get("tx_unknown_connection", 0) <= 1, f"{c}"


def test_linux_control_list_pause_resume_stat_dump_stop(files, short_dir, tmp_path,
                                                        record_property):
    env = dict(os.environ, PYKVM_CONTROL_DIR=os.path.join(short_dir, "ctl2"))
    disk = guest_shell.fresh_disk(files, tmp_path)
    with guest_shell.GuestShell(files, disk, CMDLINE, timeout=TIMEOUT, mem=MEM, env=env,
                                extra=["--vcpus", str(VCPUS), "--name", "ctlvm"]) as shell:
        shell.start()
        record_property("control_prompt_s", round(shell.prompt_s, 1))
        r = guest_shell.control_walkthrough(shell, "ctlvm", env, VCPUS)
    assert r["first_after_resume"] == r["last_before_pause"] + 1, r
    assert r["ticks"] == list(range(1, len(r["ticks"]) + 1)), r["ticks"]   # none lost or repeated
    st = r["stat"]
    assert st["state"] == "running"
    assert isinstance(st["vm"]["remote_tlb_flush"], int), st["vm"]
    assert len(st["vcpus"]) == VCPUS and all(v["exits"] > 0 for v in st["vcpus"]), st["vcpus"]
    assert {"virtio-blk0", "virtio-rng0"} <= set(st["devices"]), st["devices"]
    assert all(isinstance(n, int) for d in st["devices"].values() for n in d.values()), st["devices"]
    for dump in (*r["paused_dumps"], r["running_dump"]):
        assert dump["arch"] == "x86_64"
        for v in dump["vcpus"]:
            regs, sregs = v["regs"], v["sregs"]
            assert regs["rip"] != 0 and regs["rsp"] != 0, regs
            assert sregs["efer"] & EFER_LMA and sregs["cs"]["l"] == 1, sregs   # 64-bit mode
    assert "rip=0x" in r["dump_text"] and "cr0=0x" in r["dump_text"], r["dump_text"]
    assert r["status"] == 0, f"pykvm run exited {r['status']}"
    assert "pykvm: stopped through the control socket (ctlvm)" in shell.log.text()
