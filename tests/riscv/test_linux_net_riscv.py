"""virtio-net with a RISC-V Linux guest booted by ``pykvm run`` inside the RISC-V lab (virt
machine, virtio-mmio, interrupts through KVM's in-kernel AIA), over both backends.

The guest is the root-disk guest of ``pykvm/lab/rootfs.py`` (``/lab/linux``: the lab's own
kernel, a boot initramfs with its virtio_net module, ``root.img`` with busybox); words on its
command line make its init configure ``eth0``, ping and fetch a page (``pykvm.net=``,
``pykvm.ping=``, ``pykvm.wget=``), then power off.

* user-mode networking (``--net user``, passt): DHCP from passt, then busybox wget fetches a
  page this test serves on the lab's 127.0.0.1, through the gateway address passt maps to the
  host's loopback; the page's random token comes back, and the server saw 127.0.0.1 ask. L1 has
  no network card, so passt copies a dummy interface the test makes (``passt_template``);
* tap (``--net tap,ifname=...``): the tap ``pykvm run`` creates is moved into a network
  namespace made with pyroute2 (10.78.0.1/24 there); the guest (10.78.0.2/24, the test's MAC)
  pings it and gets an answer, fetches a page from a socket inside the namespace, and the
  namespace's neighbour table holds the guest's MAC.
"""
import shutil

import pytest

from pykvm.lab import linux_guest
from pykvm.testing.plugin import LACKS

pytestmark = [
    pytest.mark.requires_arch("riscv64"),
    pytest.mark.filterwarnings("ignore:record_property is incompatible:pytest.PytestWarning"),
]

TIMEOUT = 240             # seconds per boot; one takes ~15-40 s in the lab
MEM = "256M"
CMDLINE = "console=ttyS0 panic=-1 loglevel=4 root=/dev/vda rw pykvm.batch"
EXTRA = ["--vcpus", "2"]


def _host_has_aia():
    from pykvm.arch.riscv import aia
    from pykvm.kvm import Kvm
    with Kvm() as kvm, kvm.create_vm() as vm:
        return aia.available(vm.fd)


@pytest.fixture(scope="module")
def files():
    f = linux_guest.root_files_or_skip("riscv")
    if not _host_has_aia():
        pytest.skip(f"{LACKS} KVM's in-kernel RISC-V AIA (KVM_DEV_TYPE_RISCV_AIA)")
    pytest.importorskip("pyroute2")
    return f


def test_virtio_net_user_mode_fetches_a_host_page_riscv(files, tmp_path, record_property):
    if shutil.which("passt") is None:
        pytest.skip(f"{LACKS} passt (user-mode networking)")
    r, page, url = linux_guest.boot_net_user(files, tmp_path, CMDLINE, timeout=TIMEOUT, mem=MEM,
                                             extra=EXTRA)
    record_property("riscv_net_user_run_s", round(r.seconds, 1))
    linux_guest.check_net_eth0(r)
    assert r.mark("net dhcp").startswith("net dhcp: lease ip="), r.tail()
    linux_guest.check_wget(r, page, url)
    assert ("127.0.0.1", f"/{page.name}") in page.clients, page.clients
    r.check_exit()


def test_virtio_net_tap_in_a_namespace_ping_and_http_riscv(files, tmp_path, record_property):
    r, page, url, mac, neigh, tap_mac = linux_guest.boot_net_tap(files, tmp_path, CMDLINE,
                                                                 timeout=TIMEOUT, mem=MEM,
                                                                 extra=EXTRA)
    record_property("riscv_net_tap_run_s", round(r.seconds, 1))
    linux_guest.check_net_eth0(r, mac)
    assert "10.78.0.2/24" in r.mark("net eth0 address"), r.tail()
    ping = r.mark("ping 10.78.0.1")
    assert "answered" in ping and "bytes from 10.78.0.1" in ping, r.tail()
    linux_guest.check_wget(r, page, url)
    assert ("10.78.0.2", f"/{page.name}") in page.clients, page.clients
    assert neigh.get("10.78.0.2") == mac, neigh
    assert tap_mac != mac
    r.check_exit()
