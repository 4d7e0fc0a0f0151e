"""virtio-vsock and the control socket with a RISC-V Linux guest booted by ``pykvm run`` inside
the RISC-V lab (virt machine, virtio-mmio, interrupts through KVM's in-kernel AIA, 2 vCPUs).

The guest is the root-disk guest of ``pykvm/lab/rootfs.py`` (``/lab/linux``: the lab's own
kernel; a boot initramfs that loads virtio_blk ... and the vsock modules ``vsock``,
``vmw_vsock_virtio_transport_common``, ``vmw_vsock_virtio_transport``; ``root.img`` with busybox
and ``/usr/bin/vsockecho``, ``pykvm/lab/vsockecho.c`` cross-compiled). The tests drive its shell
under a pty (pexpect, ``pykvm/lab/guest_shell.py``):

* vsock, one boot with ``--vsock cid=3,uds=PATH``: host to guest (``CONNECT 1234``, ``OK
  <port>``, a token line and 64 KiB of random bytes echoed back; the guest saw CID 2 on that
  port) and guest to host (the guest connects to CID 2 port 5000, which the test serves on
  ``PATH_5000``; tokens both ways); ``pykvm stat`` shows the device's connections, no drops;
* control, one boot with ``--name``: ``pykvm list``, ``pause`` (a guest loop printing ``tick
  N`` falls silent for 5 s; paused 25 s in all, past the guest's soft-lockup threshold),
  ``resume`` (the next number follows; the guest reports no lockup, its time having stood still
  while held), ``stat --json`` (KVM stats,
  device counters), ``debug --dump`` (``pc``, ``sp``, ... of both harts, the same twice while
  paused), ``stop`` (status 0). No test asserts a duration.
"""

import pytest

from pykvm.lab import guest_shell, linux_guest
from pykvm.testing.plugin import LACKS

pytestmark = [
    pytest.mark.requires_arch("riscv64"),
    pytest.mark.filterwarnings("ignore:record_property is incompatible:pytest.PytestWarning"),
]

TIMEOUT = 300             # seconds: the run's deadline and the longest wait for one answer
MEM = "256M"
VCPUS = 2
CMDLINE = "console=ttyS0 panic=-1 loglevel=4 root=/dev/vda rw"
# seconds the control test keeps the guest paused: past Linux's 20 s soft-lockup threshold, so
# a guest whose time ran on while it was held reports a lockup when it runs on
HOLD = 25.0
RV_REGS = ("pc", "ra", "sp", "gp", "tp", "t0", "t1", "t2", "s0", "s1", "a0", "a1", "a2", "a3",
           "a4", "a5", "a6", "a7", "s2", "s3", "s4", "s5", "s6", "s7", "s8", "s9", "s10", "s11",
           "t3", "t4", "t5", "t6")


def _host_has_aia():
    from pykvm.arch.riscv import aia
    from pykvm.kvm import Kvm
    with Kvm() as kvm, kvm.create_vm() as vm:
        return aia.available(vm.fd)


@pytest.fixture(scope="module")
def files():
    f = linux_guest.root_files()
    if f is None:
        pytest.skip(f"{LACKS} the root-disk Linux guest ({linux_guest.LAB_DIR}/root.img: "
                    "the riscv lab carries it)")
    if not _host_has_aia():
        pytest.skip(f"{LACKS} KVM's in-kernel RISC-V AIA (KVM_DEV_TYPE_RISCV_AIA)")
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


def test_linux_vsock_host_connects_to_guest_echo_riscv(vsock_vm, record_property):
    shell, uds, env = vsock_vm
    record_property("riscv_vsock_prompt_s", round(shell.prompt_s, 1))
    guest_shell.check_vsock_host_to_guest(shell, uds, env)


def test_linux_vsock_guest_connects_to_host_riscv(vsock_vm):
    guest_shell.check_vsock_guest_to_host(*vsock_vm)


def test_linux_control_list_pause_resume_stat_dump_stop_riscv(files, short_dir, tmp_path,
                                                              record_property):
    r = guest_shell.control_run(files, short_dir, tmp_path, CMDLINE, timeout=TIMEOUT, mem=MEM,
                                vcpus=VCPUS, hold=HOLD,
                                record=lambda k, v: record_property("riscv_" + k, v))
    for dump in (*r["paused_dumps"], r["running_dump"]):
        assert dump["arch"] == "riscv64"
        for v in dump["vcpus"]:
            assert tuple(v["regs"]) == RV_REGS, v["regs"]
            assert v["regs"]["pc"] != 0 and v["regs"]["sp"] != 0, v["regs"]
            assert v["mode"] in (0, 1), v
    assert "pc=0x" in r["dump_text"] and "sp=0x" in r["dump_text"], r["dump_text"]
