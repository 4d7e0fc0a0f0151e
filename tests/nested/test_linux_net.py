"""virtio-net with an x86 Linux guest booted by ``pykvm run`` inside the nested lab (pc machine,
virtio-pci with MSI-X), over both backends.

The guest is the root-disk guest of ``pykvm/lab/rootfs.py`` (``/lab/linux``: the lab's own
kernel, a boot initramfs with its virtio_net module, ``root.img`` with busybox); words on its
command line make its init configure ``eth0``, ping and fetch a page (``pykvm.net=``,
``pykvm.ping=``, ``pykvm.wget=``), then power off.

* user-mode networking (``--net user``, passt): the guest takes its address by DHCP from passt
  and fetches, with busybox wget, a page a Python HTTP server of this test serves on the lab's
  127.0.0.1: passt maps the gateway it gives the guest to the host's loopback. The page carries a
  random token; the server saw the request come from 127.0.0.1. L1 has no network card, so the
  test gives passt a dummy interface with a default route to copy (``passt_template``);
* tap (``--net tap,ifname=...``): the tap ``pykvm run`` creates is moved into a network
  namespace the test makes with pyroute2 and given 10.78.0.1/24 there; the guest (10.78.0.2/24,
  the MAC the test chose) pings that address and gets an answer, and fetches a page from a
  server socket inside the namespace; the namespace's neighbour table holds the guest's MAC.
"""
import shutil

import pytest

from pykvm.lab import linux_guest
from pykvm.testing.plugin import LACKS

pytestmark = [
    pytest.mark.requires_arch("x86_64"),
    pytest.mark.filterwarnings("ignore:record_property is incompatible:pytest.PytestWarning"),
]

TIMEOUT = 240             # seconds per boot; one takes ~15-30 s in the lab
MEM = "256M"
CMDLINE = "console=ttyS0 panic=-1 loglevel=4 root=/dev/vda rw pykvm.batch"


@pytest.fixture(scope="module")
def files():
    f = linux_guest.root_files_or_skip("nested")
    pytest.importorskip("pyroute2")
    return f


def test_virtio_net_user_mode_fetches_a_host_page(files, tmp_path, record_property):
    if shutil.which("passt") is None:
        pytest.skip(f"{LACKS} passt (user-mode networking)")
    r, page, url = linux_guest.boot_net_user(files, tmp_path, CMDLINE, timeout=TIMEOUT, mem=MEM)
    record_property("net_user_run_s", round(r.seconds, 1))
    linux_guest.check_net_eth0(r)
    lease = r.mark("net dhcp")
    assert lease.startswith("net dhcp: lease ip="), r.tail()
    linux_guest.check_wget(r, page, url)
    assert ("127.0.0.1", f"/{page.name}") in page.clients, page.clients
    r.check_exit()


def test_virtio_net_tap_in_a_namespace_ping_and_http(files, tmp_path, record_property):
    r, page, url, mac, neigh, tap_mac = linux_guest.boot_net_tap(files, tmp_path, CMDLINE,
                                                                 timeout=TIMEOUT, mem=MEM)
    record_property("net_tap_run_s", round(r.seconds, 1))
    linux_guest.check_net_eth0(r, mac)
    assert "10.78.0.2/24" in r.mark("net eth0 address"), r.tail()
    ping = r.mark("ping 10.78.0.1")
    assert "answered" in ping and "bytes from 10.78.0.1" in ping, r.tail()
    linux_guest.check_wget(r, page, url)
    assert ("10.78.0.2", f"/{page.name}") in page.clients, page.clients
    assert neigh.get("10.78.0.2") == mac, neigh           # the namespace learnt the guest's MAC
    assert tap_mac != mac
    r.check_exit()
