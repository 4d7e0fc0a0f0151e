"""virtio-net without KVM: the command-line description, the configuration space, the passt
backend's life (started, killed and reaped on close, on collection, and when passt is missing
one line naming the package), and ``pykvm run --net`` refusing bad descriptions in one line."""
import gc
import shutil
import socket
import subprocess
import sys

import pytest

from pykvm.devices.virtio.net import (F_MAC, F_MTU, F_STATUS, NetError, VirtioNet,
                                      net_from_spec, parse_mac)
from pykvm.devices.virtio.net_backends import PasstBackend, StreamBackend


def _dev(**kw):
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    return VirtioNet(StreamBackend(a), **kw), b


def test_configuration_space_and_features():
    dev, peer = _dev(mac="52:54:00:01:02:03", mtu=9000, link=False)
    try:
        assert dev.device_features() == (1 << F_MAC) | (1 << F_STATUS) | (1 << F_MTU)
        assert dev.config_read(0, 4) == 0x00_54_52 | 0x01 << 24
        assert dev.config_read(4, 2) == 0x0302
        assert dev.config_read(6, 2) == 0                   # link down
        assert dev.config_read(8, 2) == 1                   # max_virtqueue_pairs
        assert dev.config_read(10, 2) == 9000
        assert dev.config_read(12, 4) == 0                  # past the end
        dev.set_link(True)                                  # not started: no interrupt to send
        assert dev.config_read(6, 2) == 1
        assert dev.counters()["rx_dropped"] == 0 and dev.counters()["tx_dropped"] == 0
    finally:
        dev.close()
        peer.close()
    dev.close()                                             # idempotent


@pytest.mark.parametrize("spec, match", [
    ("", "a network is"), ("slirp", "unknown network backend 'slirp'"),
    ("user,ifname=x", "ifname= applies to tap"), ("tap,ifname=", "1-15 bytes"),
    ("tap,ifname=abcdefghijklmnop", "1-15 bytes"), ("tap,ifname=a b", "1-15 bytes"),
    ("user,mtu=67", "68..65535"), ("user,mtu=1e3", "68..65535"), ("user,mtu=65536", "68..65535"),
    ("user,mac=52:54:00:01:02", "six hex bytes"), ("user,mac=03:00:00:00:00:01", "multicast"),
    ("user,mac=00:00:00:00:00:00", "all zeros"),
    ("user,link=maybe", "up or down"), ("user,speed=10", "unknown network option"),
    ("user,mtu=1500,mtu=1400", "given twice"), ("user,mtu", "unknown network option"),
])
def test_bad_descriptions_are_one_line(spec, match):
    with pytest.raises(NetError, match=match) as ei:
        net_from_spec(spec)
    assert "\n" not in str(ei.value) and isinstance(ei.value, ValueError)


def test_parse_mac_forms():
    assert parse_mac("52:54:00:AB:cd:ef") == bytes.fromhex("525400abcdef")
    assert parse_mac(bytes.fromhex("020000000001")) == bytes.fromhex("020000000001")
    with pytest.raises(NetError, match="all zeros"):
        parse_mac(bytes(6))
    with pytest.raises(NetError):
        parse_mac("52-54-00-ab-cd-ef")


def test_passt_is_killed_and_reaped_on_close_and_when_collected():
    if shutil.which("passt") is None:
        pytest.fail("passt is not installed (.ci/setup installs the Debian package 'passt')")
    try:
        dev = net_from_spec("user,mac=52:54:00:00:00:09,mtu=1400,link=down")
    except NetError as e:
        if "External interface not usable" in str(e) or "routable" in str(e):
            pytest.skip(f"pykvm: host lacks a routable interface passt can copy ({e})")
        raise
    proc = dev.backend.proc
    assert proc.poll() is None and (dev.mtu, dev.link_up) == (1400, False)
    dev.close()
    assert proc.returncode is not None                      # killed and reaped
    b = PasstBackend()
    proc = b.proc
    del b
    gc.collect()
    assert proc.returncode is not None                      # the finalizer reaped it


def test_missing_passt_is_one_line_naming_the_package(tmp_path):
    with pytest.raises(NetError, match="install the Debian/Ubuntu package 'passt'") as ei:
        PasstBackend(passt=str(tmp_path / "no-passt-here"))
    assert "\n" not in str(ei.value)


def test_passt_that_exits_at_once_says_why(tmp_path):
    fake = tmp_path / "passt"
    fake.write_text("#!/bin/sh\necho 'No external routable interface for IPv4' >&2\nexit 1\n")
    fake.chmod(0o755)
    with pytest.raises(NetError, match=r"passt exited \(status 1\): No external routable"):
        PasstBackend(passt=str(fake))


def test_stream_backend_frames_and_eof():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    be = StreamBackend(a)
    try:
        assert be.recv() is None
        b.sendall((3).to_bytes(4, "big") + b"abc" + (2).to_bytes(4, "big") + b"d")
        assert be.recv() == b"abc" and be.recv() is None    # the second one is not whole yet
        b.sendall(b"e")
        assert be.recv() == b"de"
        assert be.send(b"xyz") and b.recv(16) == (3).to_bytes(4, "big") + b"xyz"
        b.close()
        assert be.recv() is None and be.error == "the peer closed the socket"
        assert not be.send(b"late")
    finally:
        be.close()


@pytest.mark.requires_kvm                   # the machine (and /dev/kvm) is opened first
@pytest.mark.parametrize("spec", ["bogus", "user,mtu=9", "tap,ifname=a/b"])
def test_run_refuses_a_bad_net_in_one_line_with_status_2(spec):
    r = subprocess.run([sys.executable, "-m", "pykvm", "run", "hello", "--no-input", "--net",
                        spec], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and r.stderr.startswith("pykvm: ")


def test_run_help_documents_net():
    r = subprocess.run([sys.executable, "-m", "pykvm", "run", "--help"], capture_output=True,
                       text=True, timeout=60)
    assert "--net" in r.stdout and "passt" in r.stdout and "ifname=NAME" in r.stdout
