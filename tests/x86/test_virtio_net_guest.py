"""virtio-net on the pc machine, on the real /dev/kvm, with a tiny polling driver of our own
(``virtio_net.c``) on virtio-pci and virtio-mmio. The host builds the frames (ARP, UDP, DHCP)
and writes them into the guest's transmit buffer; the guest reports what it received.

* tap: the tap pykvm creates is moved into a network namespace the test makes (pyroute2); the
  guest resolves the namespace's address by ARP, sends it a UDP datagram a socket there
  receives, and receives one back; a flood from the namespace while the guest has no free
  receive buffers fills a bounded list, then waits in the tap's queue (pykvm reads no more, drops
  nothing) and reaches the guest in order once it takes frames again; the link goes down and up;
  the tap's vnet header carries checksum requests both ways (the backend alone);
* user (passt): the guest's ARP request for the gateway and its DHCP discover get passt's
  answers;
* hostile: an oversized frame is dropped and counted, a transmit chain outside guest RAM sets
  DEVICE_NEEDS_RESET.
"""
import os
import socket
import struct
import time

import pytest

from pykvm.devices.virtio.net import RX_PENDING_FRAMES, VirtioNet
from pykvm.devices.virtio.net_backends import PasstBackend, StreamBackend, TapBackend
from pykvm.testing import wait_until

pytestmark = [pytest.mark.requires_kvm, pytest.mark.requires_arch("x86_64")]

SEND, RECV, BADTX, CONFIG, DONE = 1, 2, 3, 4, 0
ETH_ARP, ETH_IP = 0x0806, 0x0800
GUEST_MAC = bytes.fromhex("525400abcdef")
PATIENCE = 60.0                 # seconds to wait for the device, the guest or a peer (a hang guard)
NEEDS_RESET = 64


# ---- frames -----------------------------------------------------------------------------

def eth(dst: bytes, src: bytes, etype: int, payload: bytes) -> bytes:
    return dst + src + struct.pack("!H", etype) + payload


def arp_request(src_mac: bytes, src_ip: str, target_ip: str) -> bytes:
    body = struct.pack("!HHBBH", 1, ETH_IP, 6, 4, 1) + src_mac + socket.inet_aton(src_ip) + \
        bytes(6) + socket.inet_aton(target_ip)
    return eth(b"\xff" * 6, src_mac, ETH_ARP, body + bytes(18))


def parse_arp(frame: bytes):
    op, sha, spa, tha, tpa = struct.unpack("!6xH6s4s6s4s", frame[14:42])
    return op, sha, socket.inet_ntoa(spa), tha, socket.inet_ntoa(tpa)


def _csum(b: bytes) -> int:
    if len(b) % 2:
        b += b"\0"
    s = sum(struct.unpack(f"!{len(b) // 2}H", b))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def ipv4_udp(src_ip: str, dst_ip: str, sport: int, dport: int, payload: bytes) -> bytes:
    udp = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload   # no checksum
    hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0x1234, 0x4000, 64, 17, 0,
                      socket.inet_aton(src_ip), socket.inet_aton(dst_ip))
    hdr = hdr[:10] + struct.pack("!H", _csum(hdr)) + hdr[12:]
    return hdr + udp


def parse_ipv4_udp(frame: bytes):
    ip = frame[14:]
    ihl = (ip[0] & 15) * 4
    proto, src, dst = ip[9], socket.inet_ntoa(ip[12:16]), socket.inet_ntoa(ip[16:20])
    sport, dport, ulen = struct.unpack("!HHH", ip[ihl:ihl + 6])
    return proto, src, dst, sport, dport, ip[ihl + 8:ihl + ulen]


def dhcp_discover(mac: bytes, xid: int) -> bytes:
    bootp = struct.pack("!BBBBIHH4s4s4s4s16s64s128s", 1, 1, 6, 0, xid, 0, 0x8000, bytes(4),
                        bytes(4), bytes(4), bytes(4), mac.ljust(16, b"\0"), b"", b"")
    opts = b"\x63\x82\x53\x63" + b"\x35\x01\x01" + b"\x37\x03\x01\x03\x06" + b"\xff"
    return eth(b"\xff" * 6, mac, ETH_IP,
               ipv4_udp("0.0.0.0", "255.255.255.255", 68, 67, bootp + opts))


def dhcp_options(payload: bytes) -> dict:
    assert payload[236:240] == b"\x63\x82\x53\x63"
    out, i = {}, 240
    while i < len(payload) and payload[i] != 255:
        if payload[i] == 0:
            i += 1
            continue
        out[payload[i]] = payload[i + 2:i + 2 + payload[i + 1]]
        i += 2 + payload[i + 1]
    return out


# ---- driving the guest ------------------------------------------------------------------

class Guest:
    """The guest of ``virtio_net.c`` behind its stage-1 report."""

    def __init__(self, m):
        self.m = m
        (self.transport, self.features, mac, self.link, self.mtu, self.status,
         bufs) = m.sync(stage=1)
        self.mac = mac.to_bytes(6, "little")
        self.tx_buf, self.rx_buf = bufs & 0xFFFFFFFF, bufs >> 32
        self.stage = 1

    def _cmd(self, *params):
        self.m.set_params(*params, *([0] * (3 - len(params))))
        self.stage += 1
        return self.m.sync(stage=self.stage, timeout=120)    # past RECV's wait (virtio_net.c)

    def send(self, frame: bytes):
        self.m.memory.write(self.tx_buf, frame)
        return self._cmd(SEND, len(frame))

    def recv(self, etype: int = 0):
        """(frame or b"", frames skipped, the virtio header's 12 bytes)."""
        flen, _, skipped, status, h0, h1 = self._cmd(RECV, etype)
        assert not status & NEEDS_RESET
        hdr = h0.to_bytes(8, "little") + h1.to_bytes(4, "little")
        return (self.m.memory.read(self.rx_buf, flen) if flen else b""), skipped, hdr

    def bad_tx(self, addr: int, n: int) -> int:
        return self._cmd(BADTX, addr, n)[0]

    def config(self):
        return self._cmd(CONFIG)

    def done(self):
        self.m.set_params(DONE, 0, 0)
        self.m.done()


# ---- tap in a network namespace ---------------------------------------------------------

@pytest.fixture
def netns_tap():
    """(namespace name, VirtioNet on a tap pykvm created, moved into the namespace and given
    10.77.0.1/24 there, with the guest's MAC as a permanent neighbour 10.77.0.2)."""
    if not os.path.exists("/dev/net/tun"):
        pytest.skip("pykvm: host lacks /dev/net/tun")
    pyroute2 = pytest.importorskip("pyroute2")
    from pyroute2 import IPRoute, NetNS, netns
    name = f"pykvmnet{os.getpid()}"
    ifname = f"pkt{os.getpid() % 100000}"
    try:
        netns.create(name)
    except OSError as e:
        pytest.skip(f"pykvm: host lacks network namespaces we may create ({e})")
    dev = None
    try:
        _ipv4_only(name)
        dev = VirtioNet(TapBackend(ifname), mac=GUEST_MAC)
        with IPRoute() as ipr:
            idx = ipr.link_lookup(ifname=ifname)[0]
            ipr.link("set", index=idx, net_ns_fd=name)
        with NetNS(name) as ns:
            idx = ns.link_lookup(ifname=ifname)[0]
            ns.addr("add", index=idx, address="10.77.0.1", prefixlen=24)
            ns.link("set", index=idx, state="up")
            ns.neigh("add", dst="10.77.0.2", lladdr=GUEST_MAC.hex(":"), ifindex=idx,
                     state=0x80)                                   # NUD_PERMANENT
            tap_mac = bytes.fromhex(ns.get_links(idx)[0].get_attr("IFLA_ADDRESS")
                                    .replace(":", ""))
        yield name, dev, tap_mac, pyroute2
    finally:
        if dev is not None:
            dev.close()
        netns.remove(name)


def _ipv4_only(name: str) -> None:
    """Turn IPv6 off in namespace ``name`` before the tap moves in: otherwise its kernel sends
    DAD, MLD and router solicitations on the tap over the first seconds after link up, which
    land in the guest's receive buffers at a moment that depends on the host's speed (a slow
    host's test reached its flood with buffers those frames still held)."""
    from pyroute2 import netns
    netns.pushns(name)                     # /proc/sys/net is the calling thread's namespace
    try:
        for conf in ("all", "default"):
            path = f"/proc/sys/net/ipv6/conf/{conf}/disable_ipv6"
            if os.path.exists(path):       # absent where the kernel has no IPv6
                with open(path, "w") as f:
                    f.write("1")
    finally:
        netns.popns()


def _tap_stats(name: str) -> dict:
    """The namespace's view of its one tap: the kernel's packet and drop counters for it."""
    from pyroute2 import NetNS
    with NetNS(name) as ns:
        for link in ns.get_links():
            if link.get_attr("IFLA_IFNAME", "").startswith("pkt"):
                st = link.get_attr("IFLA_STATS64")
                return {k: st[k] for k in ("tx_packets", "tx_dropped", "rx_packets",
                                           "rx_dropped")} if st else {}
    return {}


def _ns_udp(name: str, port: int):
    from pyroute2 import netns
    s = netns.create_socket(name, socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("10.77.0.1", port))
    s.settimeout(10)
    return s


@pytest.mark.parametrize("transport", ["pci", "mmio"])
def test_tap_in_a_namespace_arp_udp_both_ways_flood_and_link(guest_vm, netns_tap, transport):
    name, dev, tap_mac, _ = netns_tap
    opts = {"virtio_pci": [dev]} if transport == "pci" else {"virtio_mmio": [dev]}
    g = Guest(guest_vm("virtio_net.c", machine="pc", **opts))
    assert g.transport == (1 if transport == "pci" else 2)
    mac_status_mtu = 1 << 5 | 1 << 16 | 1 << 3
    assert g.features >> 32 & 1 and g.features & mac_status_mtu == mac_status_mtu
    assert g.mac == GUEST_MAC and g.link == 1 and g.mtu == 1500
    assert g.status & 4 and not g.status & NEEDS_RESET

    # ARP: the namespace's kernel answers with the tap's MAC
    used, status = g.send(arp_request(GUEST_MAC, "10.77.0.2", "10.77.0.1"))
    frame, _, hdr = g.recv(ETH_ARP)
    op, sha, spa, tha, tpa = parse_arp(frame)
    assert (op, sha, spa, tha, tpa) == (2, tap_mac, "10.77.0.1", GUEST_MAC, "10.77.0.2")
    assert frame[:6] == GUEST_MAC and hdr == bytes(10) + b"\x01\x00"    # num_buffers 1

    # UDP guest -> a socket in the namespace
    sock = _ns_udp(name, 5555)
    try:
        payload = b"hello from the guest over virtio-net"
        g.send(eth(tap_mac, GUEST_MAC, ETH_IP, ipv4_udp("10.77.0.2", "10.77.0.1", 4444, 5555,
                                                        payload)))
        data, addr = sock.recvfrom(2048)
        assert (data, addr) == (payload, ("10.77.0.2", 4444))

        # UDP namespace -> guest
        sock.sendto(b"and back to the guest", ("10.77.0.2", 4444))
        frame, _, _ = g.recv(ETH_IP)
        proto, src, dst, sport, dport, body = parse_ipv4_udp(frame)
        assert (proto, src, dst, sport, dport, body) == (17, "10.77.0.1", "10.77.0.2", 5555,
                                                         4444, b"and back to the guest")
        assert frame[:6] == GUEST_MAC and frame[6:12] == tap_mac

        # a flood while the guest is stopped: 8 buffers fill, the bounded list fills, then the
        # device reads no more and the rest waits in the tap's own queue (in the host kernel,
        # which drops past its length, as for QEMU); nothing is dropped by pykvm, and the guest
        # then gets the frames in order, past the list's length (reading resumed)
        before = dev.counters()
        sent, full = 3000, 8 + RX_PENDING_FRAMES
        for i in range(sent):
            sock.sendto(i.to_bytes(4, "big") * 64, ("10.77.0.2", 4444))

        def arrived():
            c = dev.counters()
            return c["rx_packets"] + c["rx_pending"] - before["rx_packets"]
        # until the list is observed full (giving up after 0.5 s without progress failed a
        # device thread that a loaded host had merely not scheduled)
        try:
            wait_until(lambda: arrived() >= full, f"{full} frames taken by the device",
                       timeout=PATIENCE)
        except AssertionError as e:          # say where the frames stopped, for the next reader
            raise AssertionError(f"{e}: {arrived()} taken; device {dev.counters()}, its thread "
                                 f"{dev.thread_error or 'serving'}, backend "
                                 f"{dev.backend.error or 'ok'}; the tap in the namespace "
                                 f"{_tap_stats(name)}") from None
        time.sleep(0.2)                                  # a device that read on would show it here
        c = dev.counters()
        assert c["rx_packets"] + c["rx_pending"] - before["rx_packets"] == full, c
        assert c["rx_pending"] == RX_PENDING_FRAMES, c
        assert c["rx_dropped"] == before["rx_dropped"], c
        seqs = []
        for _ in range(full + 40):
            frame, skipped, _ = g.recv(ETH_IP)
            body = parse_ipv4_udp(frame)[5]
            assert skipped == 0 and body == body[:4] * 64, (skipped, body[:16])
            seqs.append(int.from_bytes(body[:4], "big"))
        assert seqs == list(range(full + 40)), seqs
        assert dev.counters()["rx_dropped"] == before["rx_dropped"]

        # link down: the driver reads it, frames both ways are dropped and counted
        dev.set_link(False)
        link, status, mtu = g.config()
        assert link == 0 and mtu == 1500
        c0 = dev.counters()
        g.send(arp_request(GUEST_MAC, "10.77.0.2", "10.77.0.1"))
        sock.sendto(b"x", ("10.77.0.2", 4444))
        # the device thread reads the tap and drops the datagram some time later: wait for it
        # (a fixed 0.3 s sleep was a guess at a loaded host's speed)
        wait_until(lambda: dev.counters()["rx_dropped_link_down"] > c0["rx_dropped_link_down"],
                   "the datagram dropped while the link is down", timeout=PATIENCE)
        c1 = dev.counters()
        assert c1["tx_dropped_link_down"] == c0["tx_dropped_link_down"] + 1
        assert c1["rx_dropped_link_down"] >= c0["rx_dropped_link_down"] + 1
        dev.set_link(True)
        assert g.config()[0] == 1
    finally:
        sock.close()
    g.done()


def _udp_pseudo_sum(frame: bytes) -> int:
    """The folded sum of an IPv4/UDP frame's pseudo-header: what a checksum-offload request
    leaves in the UDP checksum field for the device to finish."""
    ip = frame[14:]
    return ~_csum(ip[12:20] + struct.pack("!BBH", 0, 17, len(ip) - 20)) & 0xFFFF


def _tap_frame_to(be, dport: int, timeout: float = PATIENCE):
    """The next frame read from tap backend ``be`` (header included) that is IPv4/UDP to
    ``dport``; None when none comes in ``timeout`` seconds."""
    import select
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        select.select([be.fileno()], [], [], 0.1)
        data = be.recv_vnet()
        if data is not None and data[12 + 12:12 + 14] == b"\x08\x00" and data[12 + 23] == 17 \
                and parse_ipv4_udp(data[12:])[4] == dport:
            return data
    return None


def test_tap_vnet_header_carries_checksum_requests_both_ways(netns_tap):
    """Through the tap alone (the device not started): a frame whose UDP checksum is left to
    the device reaches the namespace's socket only with the NEEDS_CSUM header passed on, and
    with TUN_F_CSUM switched on the namespace's datagrams come with that request in their
    header, without it fully checksummed with a zero header."""
    name, dev, tap_mac, _ = netns_tap
    be = dev.backend
    assert be.vnet_hdr                                      # x86: both headers little-endian
    sock = _ns_udp(name, 5556)
    sock.settimeout(1)
    try:
        frame = bytearray(eth(tap_mac, GUEST_MAC, ETH_IP, ipv4_udp(
            "10.77.0.2", "10.77.0.1", 4445, 5556, b"finish my checksum")))
        frame[40:42] = struct.pack("!H", _udp_pseudo_sum(bytes(frame)))
        assert be.send(bytes(frame))                        # zero header: a bad checksum
        with pytest.raises(socket.timeout):
            sock.recvfrom(2048)
        needs_csum = struct.pack("<BBHHHHH", 1, 0, 0, 0, 34, 6, 0)
        assert be.send_vnet(needs_csum + bytes(frame))
        sock.settimeout(PATIENCE)                           # this one must come: no 1 s guess
        assert sock.recvfrom(2048) == (b"finish my checksum", ("10.77.0.2", 4445))

        from pykvm.devices.virtio.net_backends import TUN_F_CSUM
        assert be.set_offload(TUN_F_CSUM)
        sock.sendto(b"offloaded", ("10.77.0.2", 4446))
        data = _tap_frame_to(be, 4446)
        assert data is not None
        flags, _, _, _, start, off = struct.unpack("<BBHHHH", data[:10])
        assert (flags & 1, start, off) == (1, 34, 6)        # the guest would finish it
        assert be.set_offload(0)
        sock.sendto(b"whole", ("10.77.0.2", 4447))
        data = _tap_frame_to(be, 4447)
        assert data is not None and data[:10] == bytes(10)
        udp = data[12 + 34:]
        assert parse_ipv4_udp(data[12:])[5] == b"whole" and udp[6:8] != b"\0\0"
        assert _csum(data[12 + 26:12 + 34] + struct.pack("!BBH", 0, 17, len(udp)) + udp) == 0
    finally:
        sock.close()


# ---- user-mode networking through passt ----------------------------------------------

def _host_route():
    """(gateway, this host's address) of the default IPv4 route, or None."""
    from pyroute2 import IPRoute
    with IPRoute() as ipr:
        for r in ipr.route("get", dst="198.51.100.1"):
            return r.get_attr("RTA_GATEWAY"), r.get_attr("RTA_PREFSRC")
    return None


@pytest.mark.parametrize("transport", ["pci", "mmio"])
def test_user_networking_through_passt_answers_arp_and_dhcp(guest_vm, transport):
    pytest.importorskip("pyroute2")
    try:
        route = _host_route()
    except OSError:
        route = None
    if not route or not route[0]:
        pytest.skip("pykvm: host lacks a default IPv4 route (passt copies it for the guest)")
    gateway, host_ip = route
    dev = VirtioNet(PasstBackend(), mac=GUEST_MAC)       # passt missing: NetError, a failure
    opts = {"virtio_pci": [dev]} if transport == "pci" else {"virtio_mmio": [dev]}
    try:
        g = Guest(guest_vm("virtio_net.c", machine="pc", **opts))
        g.send(arp_request(GUEST_MAC, host_ip, gateway))
        frame, _, _ = g.recv(ETH_ARP)
        op, sha, spa, tha, tpa = parse_arp(frame)
        assert (op, spa, tha, tpa) == (2, gateway, GUEST_MAC, host_ip)
        assert frame[:6] == GUEST_MAC and sha == frame[6:12]

        xid = 0x5079_6B76
        g.send(dhcp_discover(GUEST_MAC, xid))
        frame, _, _ = g.recv(ETH_IP)
        proto, src, dst, sport, dport, body = parse_ipv4_udp(frame)
        assert (proto, sport, dport) == (17, 67, 68)
        assert struct.unpack("!I", body[4:8])[0] == xid and body[0] == 2      # BOOTREPLY
        yiaddr = socket.inet_ntoa(body[16:20])
        opts_ = dhcp_options(body)
        assert opts_[53] == b"\x02"                                            # OFFER
        assert yiaddr == host_ip and socket.inet_ntoa(opts_[3][:4]) == gateway
        g.done()
    finally:
        dev.close()
    assert dev.backend.proc.returncode is not None                # passt went with the device
    c = dev.counters()
    assert c["tx_packets"] == 2 and c["rx_packets"] >= 2


def test_a_passt_that_dies_mid_run_is_named_by_device_errors(guest_vm, tmp_path, monkeypatch):
    """A backend that stops after it started (here a stand-in passt that exits once the start
    check is over) is not silent: Machine.device_errors() names the device and says why, in
    passt's own words (``pykvm run`` prints it, and --json carries it). The stand-in exits
    when the test tells it to, once the machine is made (it slept 0.5 s: a loaded host that
    kept pykvm from its start check for that long saw it exit at start)."""
    fake = tmp_path / "passt"
    go = tmp_path / "exit-now"
    fake.write_text(f"#!/bin/sh\nwhile [ ! -e '{go}' ]; do sleep 0.02; done\n"
                    "echo 'passt: gave up for the test' >&2\nexit 3\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ.get('PATH', '')}")
    m = guest_vm("virtio_net.c", machine="pc", nets=[f"user,mac={GUEST_MAC.hex(':')}"])
    g = Guest(m)
    assert m.device_errors() == {}
    go.touch()
    deadline = time.monotonic() + PATIENCE
    while not m.device_errors() and time.monotonic() < deadline:
        g.send(arp_request(GUEST_MAC, "10.0.2.15", "10.0.2.2"))   # into the dead socket
        time.sleep(0.1)
    assert m.device_errors() == {"virtio-net0": "passt exited (status 3): passt: gave up for "
                                                "the test"}
    g.done()


# ---- hostile drivers --------------------------------------------------------------------

def test_a_burst_on_the_stream_is_paced_not_dropped_and_arrives_in_order(guest_vm):
    """Frames the passt stream brings in one read, more than the thread takes per round
    (RX_BATCH) and more than the waiting list holds: those read into the backend's buffer are
    picked up with no further event, the rest wait in the socket while the list is full (no
    drop), and the guest gets every one in order."""
    ours, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    dev = VirtioNet(StreamBackend(ours), mac=GUEST_MAC)
    g = Guest(guest_vm("virtio_net.c", machine="pc", virtio_pci=[dev], mem_size=64 << 20))
    n, full = 400, 8 + RX_PENDING_FRAMES
    frames = [eth(GUEST_MAC, b"\x02" + bytes(5), 0x88B5, i.to_bytes(4, "big") * 12) for i in range(n)]
    peer.sendall(b"".join(len(f).to_bytes(4, "big") + f for f in frames))

    def taken():
        c = dev.counters()
        return c["rx_packets"] + c["rx_pending"]
    wait_until(lambda: taken() >= full, f"the device to take {full} frames")
    time.sleep(0.2)                                  # a device that read on would show it here
    c = dev.counters()
    assert taken() == full and c["rx_pending"] == RX_PENDING_FRAMES and c["rx_dropped"] == 0, c
    for i in range(n):
        frame, skipped, _ = g.recv(0x88B5)
        assert skipped == 0 and frame == frames[i], (i, frame[:20])
    c = dev.counters()
    assert c["rx_packets"] == n and c["rx_pending"] == 0 and c["rx_dropped"] == 0, c
    g.done()
    peer.close()


def test_an_oversized_frame_is_dropped_and_a_chain_outside_ram_needs_reset(guest_vm):
    ours, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    dev = VirtioNet(StreamBackend(ours), mac=GUEST_MAC, mtu=576)
    g = Guest(guest_vm("virtio_net.c", machine="pc", virtio_pci=[dev], mem_size=64 << 20))
    assert g.mtu == 576
    used, status = g.send(eth(b"\xff" * 6, GUEST_MAC, 0x88B5, bytes(576 + 18 + 1)))
    assert used == 0 and not status & NEEDS_RESET
    assert dev.counters()["tx_dropped_oversize"] == 1 and dev.counters()["tx_packets"] == 0
    fits = eth(b"\xff" * 6, GUEST_MAC, 0x88B5, bytes(range(256)) * 2 + bytes(576 + 4 - 512))
    g.send(fits)                                              # mtu + header + VLAN tag: sent
    peer.settimeout(10)
    got = b""
    while len(got) < 4 + len(fits):
        got += peer.recv(65536)
    assert got == len(fits).to_bytes(4, "big") + fits          # QEMU's stream framing
    assert dev.counters()["tx_packets"] == 1
    # a length past any frame from the peer: the stream is out of step, the backend stops
    peer.sendall((1 << 20).to_bytes(4, "big"))
    wait_until(lambda: dev.backend_error is not None, "the stream's error", timeout=PATIENCE)
    assert "more than" in dev.backend_error
    used, status = g.send(bytes(8))                                         # no Ethernet header
    assert dev.counters()["tx_dropped_malformed"] == 1
    assert g.bad_tx(1 << 40, 64) & NEEDS_RESET
    g.done()
    peer.close()
