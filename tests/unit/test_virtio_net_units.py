"""virtio-net without KVM: the command-line description, the configuration space, the features
offered per backend (offloads on a tap only) and the vnet header's way through them, the passt
backend's life (started, killed and reaped on close, on collection, and when passt is missing
one line naming the package), and ``pykvm run --net`` refusing bad descriptions in one line."""
import gc
import shutil
import socket
import struct
import subprocess
import sys

import pytest

from pykvm.devices.virtio.net import (F_CSUM, F_GUEST_CSUM, F_GUEST_ECN, F_GUEST_TSO4,
                                      F_GUEST_TSO6, F_HOST_ECN, F_HOST_TSO4, F_HOST_TSO6, F_MAC,
                                      F_MTU, F_STATUS, OFFLOAD_FEATURES, NetError, VirtioNet,
                                      gso_allowed, net_from_spec, parse_mac, rx_header,
                                      tun_offload)
from pykvm.devices.virtio.net_backends import (NetBackendUnavailable, PasstBackend,
                                               StreamBackend, TapBackend, TUN_F_CSUM,
                                               TUN_F_TSO4, TUN_F_TSO6, TUN_F_TSO_ECN)


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


def test_offloads_are_offered_on_a_tap_only():
    assert not PasstBackend.vnet_hdr and not StreamBackend.vnet_hdr   # no vnet header there
    try:
        be = TapBackend()
    except NetBackendUnavailable as e:
        pytest.skip(f"pykvm: host lacks a tap we may create ({e})")
    dev = VirtioNet(be)
    try:
        assert OFFLOAD_FEATURES == sum(1 << b for b in (0, 1, 7, 8, 9, 11, 12, 13))
        assert dev.device_features() == (1 << F_MAC) | (1 << F_STATUS) | (1 << F_MTU) | \
            OFFLOAD_FEATURES
        for flags in (TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN, 0):
            assert be.set_offload(flags)                    # the kernel takes every mix
    finally:
        dev.close()
    assert not be.set_offload(0)                            # closed


def test_tun_offload_follows_the_guest_features_accepted():
    csum, tso4, tso6, ecn = (1 << F_GUEST_CSUM, 1 << F_GUEST_TSO4, 1 << F_GUEST_TSO6,
                             1 << F_GUEST_ECN)
    assert tun_offload(0) == 0
    assert tun_offload(1 << F_CSUM | 1 << F_HOST_TSO4) == 0     # host-side features: no flags
    assert tun_offload(tso4 | tso6 | ecn) == 0                  # TSO needs GUEST_CSUM
    assert tun_offload(csum) == TUN_F_CSUM
    assert tun_offload(csum | ecn) == TUN_F_CSUM                # ECN needs a TSO
    assert tun_offload(csum | tso4) == TUN_F_CSUM | TUN_F_TSO4
    assert tun_offload(csum | tso4 | tso6 | ecn) == TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | \
        TUN_F_TSO_ECN


# flags NEEDS_CSUM, gso_type TCPV4, hdr_len 54, gso_size 1448, csum_start 34, csum_offset 16,
# num_buffers as the tap left it
_GSO_HDR = struct.pack("<BBHHHHH", 1, 1, 54, 1448, 34, 16, 0xBEEF)


def test_rx_header_passes_the_taps_fields_and_sets_num_buffers():
    all_guest = 1 << F_GUEST_CSUM | 1 << F_GUEST_TSO4 | 1 << F_GUEST_TSO6 | 1 << F_GUEST_ECN
    assert rx_header(_GSO_HDR, all_guest) == _GSO_HDR[:10] + b"\x01\x00"
    assert rx_header(_GSO_HDR, 1 << F_GUEST_CSUM | 1 << F_GUEST_TSO6) is None   # no TSO4
    assert rx_header(_GSO_HDR, 0) is None                   # nothing to finish it with
    csum_only = struct.pack("<BBHHHHH", 1, 0, 0, 0, 34, 6, 0)
    assert rx_header(csum_only, 1 << F_GUEST_CSUM) == csum_only[:10] + b"\x01\x00"
    assert rx_header(csum_only, 0) is None
    valid = struct.pack("<BBHHHHH", 2, 0, 0, 0, 0, 0, 7)     # DATA_VALID: zeroed without
    assert rx_header(valid, 0) == bytes(10) + b"\x01\x00"     # GUEST_CSUM
    assert rx_header(valid, 1 << F_GUEST_CSUM) == valid[:10] + b"\x01\x00"
    ecn = struct.pack("<BBHHHHH", 1, 0x81, 54, 1448, 34, 16, 0)
    assert rx_header(ecn, 1 << F_GUEST_CSUM | 1 << F_GUEST_TSO4) is None
    assert rx_header(ecn, all_guest) == ecn[:10] + b"\x01\x00"


def test_gso_types_allowed_per_direction():
    host = 1 << F_CSUM | 1 << F_HOST_TSO4
    args = (F_HOST_TSO4, F_HOST_TSO6, F_HOST_ECN)
    assert gso_allowed(0, 0, *args) and gso_allowed(0, host, *args)
    assert gso_allowed(1, host, *args) and not gso_allowed(4, host, *args)
    assert not gso_allowed(0x81, host, *args) and gso_allowed(0x81, host | 1 << F_HOST_ECN, *args)
    assert not gso_allowed(3, host | 1 << F_HOST_TSO6, *args)         # UDP: never offered
    assert not gso_allowed(0x80, host | 1 << F_HOST_ECN, *args)       # ECN alone


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
