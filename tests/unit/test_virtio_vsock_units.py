"""virtio-vsock without KVM: the 44-byte header, the credit arithmetic (32-bit counters that
wrap), the CONNECT line and ``cid=N,uds=PATH`` parsers, the listener's socket file (a stale one
replaced, anything else refused, removed on close), and the device driven through real
virtqueues in plain memory: a host flood is read only as far as the guest's credit goes;
``pykvm run --vsock`` refuses bad descriptions in one line and documents the option."""
import os
import socket
import struct
import subprocess
import sys
import time

import pytest

from pykvm.devices.virtio import DeviceHandles
from pykvm.devices.virtio.queue import Virtqueue
from pykvm.devices.virtio.vsock import (HDR_LEN, HOST_CID, OP_CREDIT_UPDATE, OP_REQUEST,
                                        OP_RESPONSE, OP_RST, OP_RW, OP_SHUTDOWN, STAGE_MAX, Credit,
                                        Header, VirtioVsock, VsockError, VsockSpec,
                                        parse_connect_line)
from pykvm.memory import GuestMemory


def test_header_layout_is_44_little_endian_bytes():
    h = Header(3, 2, 0x11223344, 0x55667788, 9, 1, 5, 3, 4096, 0xFFFFFFFF)
    raw = h.pack()
    assert len(raw) == HDR_LEN == 44
    assert struct.unpack_from("<Q", raw, 0)[0] == 3 and struct.unpack_from("<Q", raw, 8)[0] == 2
    assert raw[16:20] == bytes.fromhex("44332211") and raw[20:24] == bytes.fromhex("88776655")
    assert struct.unpack_from("<IHHIII", raw, 24) == (9, 1, 5, 3, 4096, 0xFFFFFFFF)
    back = Header.unpack(raw + b"payload")
    assert [getattr(back, f) for f in Header.__slots__] == \
        [getattr(h, f) for f in Header.__slots__]
    assert Header(src_port=1 << 32 | 7).pack()[16:20] == b"\x07\0\0\0"     # masked to 32 bits
    with pytest.raises(ValueError, match="44 bytes"):
        Header.unpack(bytes(43))


def test_credit_towards_the_guest_wraps_and_never_goes_negative():
    c = Credit(8192)
    assert c.peer_free() == 0                          # nothing known about the guest yet
    c.update_peer(4096, 0)
    assert c.peer_free() == 4096
    c.sent(4000)
    assert c.peer_free() == 96
    c.update_peer(4096, 4000)                          # the guest consumed it
    assert c.peer_free() == 4096
    c.update_peer(4096, 5000)                          # claims more than was sent
    assert c.peer_free() == 0
    # counters near 2^32 wrap like the guest's
    c = Credit(8192)
    c.tx_cnt = 0xFFFFFF00
    c.update_peer(1024, 0xFFFFFF00)
    c.sent(0x200)
    assert c.tx_cnt == 0x100 and c.peer_free() == 1024 - 0x200
    c.update_peer(1024, 0x100)
    assert c.peer_free() == 1024


def test_credit_from_the_guest_is_what_was_advertised():
    c = Credit(8192)
    assert c.advertise() == (8192, 0)
    assert c.may_receive(8192) and not c.may_receive(8193)
    c.received(6000)
    c.forwarded(6000)                                  # gone to the Unix side already ...
    assert not c.may_receive(2193)                     # ... but the guest was not told yet
    assert c.wants_update()                            # its view: 2192 free, under half
    assert c.advertise() == (8192, 6000)
    assert c.may_receive(8192) and not c.wants_update()
    c.received(100)
    c.forwarded(100)
    assert not c.wants_update()                        # its view: 8092 free, plenty
    c.rx_cnt = c.fwd_cnt = c.fwd_cnt_sent = 0xFFFFFFF0   # wrapping counters
    c.received(0x20)
    assert c.rx_cnt == 0x10 and c.buffered() == 0x20 and c.may_receive(8192 - 0x20)
    assert not c.may_receive(8192 - 0x1F)


@pytest.mark.parametrize("line, port", [(b"CONNECT 0\n", 0), (b"CONNECT 1234\n", 1234),
                                        (b"CONNECT 4294967295\n", 0xFFFFFFFF)])
def test_connect_line(line, port):
    assert parse_connect_line(line) == port


@pytest.mark.parametrize("line", [b"CONNECT 1234", b"connect 1\n", b"CONNECT  1\n",
                                  b"CONNECT +1\n", b"CONNECT -1\n", b"CONNECT 01\n",
                                  b"CONNECT 4294967296\n", b"CONNECT 1 \n", b"CONNECT \n",
                                  b"CONNECT \xd9\xa1\n", b"\n", b"OK 1\n"])
def test_bad_connect_lines(line):
    with pytest.raises(ValueError):
        parse_connect_line(line)


def test_spec_forms():
    s = VsockSpec.parse("cid=3,uds=/tmp/a,,b")
    assert (s.cid, s.uds) == (3, "/tmp/a,b")
    s = VsockSpec.parse("uds_path=/run/v.sock,guest_cid=4294967294")
    assert (s.cid, s.uds) == (0xFFFFFFFE, "/run/v.sock")


@pytest.mark.parametrize("spec, match", [
    ("", "a vsock is"), ("cid=3", "uds= is missing"), ("uds=/x", "cid= is missing"),
    ("cid=2,uds=/x", r"3\.\.4294967294"), ("cid=4294967295,uds=/x", r"3\.\.4294967294"),
    ("cid=-3,uds=/x", "must be an integer"), ("cid=3,uds=", "bad vsock socket path"),
    ("cid=3,uds=/" + "a" * 100, "at most 96 bytes"), ("cid=3,cid=4,uds=/x", "given twice"),
    ("cid=3,uds=/x,port=1", "unknown vsock option"), ("cid,uds=/x", "unknown vsock option"),
])
def test_bad_specs_are_one_line(spec, match):
    with pytest.raises(VsockError, match=match) as ei:
        VsockSpec.parse(spec)
    assert "\n" not in str(ei.value) and isinstance(ei.value, ValueError)


def test_listener_file_stale_live_and_removal(sockdir):
    path = os.path.join(sockdir, "v.sock")
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(path)
    stale.close()                                      # a socket file nobody listens on
    dev = VirtioVsock(5, path)
    assert dev.config_read(0, 8) == 5 and dev.config_read(0, 4) == 5
    assert dev.config_read(4, 4) == 0 and dev.config_read(8, 4) == 0
    assert dev.device_features() == 1 and dev.num_queues == 3 and dev.device_id == 19
    with pytest.raises(VsockError, match="another process listens"):
        VirtioVsock(6, path)
    dev.close()
    assert not os.path.exists(path)
    dev.close()                                        # idempotent
    with open(path, "w"):
        pass
    with pytest.raises(VsockError, match="not a socket"):
        VirtioVsock(5, path)
    os.unlink(path)
    # a socket file someone else put there after us is not ours to remove
    dev = VirtioVsock(5, path)
    os.unlink(path)
    other = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    other.bind(path)
    dev.close()
    assert os.path.exists(path)
    other.close()
    with pytest.raises(VsockError, match="max_connections"):
        VirtioVsock(5, os.path.join(sockdir, "w.sock"), max_connections=0)
    with pytest.raises(VsockError, match="buf_alloc"):
        VirtioVsock(5, os.path.join(sockdir, "w.sock"), buf_alloc=100)


# ---- the device on real virtqueues in plain memory ------------------------------------

class Ring:
    """The driver's side of one split virtqueue at ``base`` (16 entries, no event index)."""

    def __init__(self, mem, index, base):
        self.mem, self.base, self.size = mem, base, 16
        self.desc, self.avail, self.used = base, base + 0x400, base + 0x800
        self.q = Virtqueue(mem, index, 16, self.desc, self.avail, self.used,
                           event_idx=False, indirect=False)
        self.next, self.avail_idx, self.last_used = 0, 0, 0

    def add(self, gpa, n, write):
        i = self.next % self.size
        self.mem.write(self.desc + 16 * i, struct.pack("<QIHH", gpa, n, 2 if write else 0, 0))
        self.mem.write(self.avail + 4 + 2 * (self.avail_idx % self.size), struct.pack("<H", i))
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.mem.write(self.avail + 2, struct.pack("<H", self.avail_idx))
        self.next += 1
        return i

    def used_elems(self):
        idx = struct.unpack("<H", self.mem.read(self.used + 2, 2))[0]
        out = []
        while self.last_used != idx:
            slot = self.used + 4 + 8 * (self.last_used % self.size)
            out.append(struct.unpack("<II", self.mem.read(slot, 8)))
            self.last_used = (self.last_used + 1) & 0xFFFF
        return out


@pytest.fixture
def plain():
    mem = GuestMemory.anonymous(1 << 20)
    yield mem
    mem._close()


def _packets(dev, rx, bufs, mem, want, seconds=60.0, until=None):
    """Packets (Header, payload) the device put into receive buffers, waiting for ``want`` (or
    one of op ``until``) at most ``seconds``: a bound on a failure where the packets must come
    from the device's thread (60 s: a loaded host may run it late), the window itself where
    a caller checks that no more come."""
    got = []
    deadline = time.monotonic() + seconds
    while len(got) < want and time.monotonic() < deadline:
        if until is not None and got and got[-1][0].op == until:
            break
        for head, n in rx.used_elems():
            gpa = bufs.pop(head)
            raw = mem.read(gpa, n)
            got.append((Header.unpack(raw), raw[HDR_LEN:]))
            bufs[rx.add(gpa, 4096, True)] = gpa        # give the buffer back
            dev.notify(0)
        time.sleep(0.01)
    return got


def _connected(mem, sockdir, irqs):
    """A VirtioVsock (guest CID 9) on three rings in ``mem`` with 8 receive buffers posted, and a
    host socket that asked for ``CONNECT 77``: (device, rx, tx, buffers by head, host socket,
    the OP_REQUEST the guest got, the Unix socket's path). Interrupts and resets go to
    ``irqs``."""
    path = os.path.join(sockdir, "v.sock")
    dev = VirtioVsock(9, path)
    rx, tx, ev = Ring(mem, 0, 0x10000), Ring(mem, 1, 0x11000), Ring(mem, 2, 0x12000)
    dev.activate(1 << 32, [rx.q, tx.q, ev.q], DeviceHandles(lambda c, q=-1: irqs.append(q),
                                                              lambda: irqs.append("reset")))
    bufs = {}
    for k in range(8):
        gpa = 0x20000 + 0x1000 * k
        bufs[rx.add(gpa, 4096, True)] = gpa
    dev.notify(0)
    host = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    host.settimeout(10)
    try:
        host.connect(path)
        host.sendall(b"CONNECT 77\n")
        (req, _), = _packets(dev, rx, bufs, mem, 1)
    except BaseException:
        host.close()
        dev.close()
        raise
    return dev, rx, tx, bufs, host, req, path


def test_a_host_flood_goes_only_as_far_as_the_guest_credit(plain, sockdir):
    mem = plain
    irqs = []
    dev, rx, tx, bufs, host, req, path = _connected(mem, sockdir, irqs)
    try:
        assert (req.op, req.src_cid, req.dst_cid, req.dst_port) == (OP_REQUEST, HOST_CID, 9, 77)

        def send(op, n=0, payload=b"", fwd_cnt=0, flags=0, buf_alloc=5000):
            h = Header(9, HOST_CID, 77, req.src_port, n, 1, op, flags, buf_alloc, fwd_cnt)
            mem.write(0x40000, h.pack() + payload)
            tx.add(0x40000, HDR_LEN + len(payload), False)
            dev.notify(1)

        send(OP_RESPONSE)                              # the guest grants 5000 bytes
        assert host.recv(64) == f"OK {req.src_port}\n".encode()
        host.setblocking(False)
        sent = 0
        try:
            while sent < 300_000:
                sent += host.send(bytes(65536))
        except BlockingIOError:
            pass
        assert sent > 100_000                          # the kernel took a good deal of it
        got = _packets(dev, rx, bufs, mem, 2)
        time.sleep(0.3)
        got += _packets(dev, rx, bufs, mem, 1, seconds=0.3)
        assert all(h.op == OP_RW for h, _ in got)
        assert sum(len(p) for _, p in got) == 5000     # not a byte past the credit
        assert dev.counters()["rx_bytes"] == 5000
        send(OP_CREDIT_UPDATE, fwd_cnt=5000)           # the guest consumed it all
        more = _packets(dev, rx, bufs, mem, 2)
        assert sum(len(p) for _, p in more) == 5000
        # the guest sends data; it reaches the host socket and counts as forwarded
        host.setblocking(True)
        send(OP_RW, 5, b"hello", fwd_cnt=10000)
        assert host.recv(16) == b"hello" and dev.counters()["tx_bytes"] == 5
        # the host closes; the guest grants plenty: the rest of the bytes, then SHUTDOWN both
        # ways, and no packet was ever bigger than the device reads ahead
        host.close()
        send(OP_CREDIT_UPDATE, fwd_cnt=10000, buf_alloc=1 << 24)
        end = _packets(dev, rx, bufs, mem, 10**6, until=OP_SHUTDOWN)
        assert end and end[-1][0].op == OP_SHUTDOWN and end[-1][0].flags == 3
        assert sum(len(p) for _, p in end) == sent - 10000
        assert max(len(p) for _, p in got + more + end) <= min(4096 - HDR_LEN, STAGE_MAX)
        assert "reset" not in irqs
    finally:
        host.close()
        dev.close()
    assert dev.counters()["connections_active"] == 0 and not os.path.exists(path)


def test_a_late_packet_for_a_connection_just_closed_is_taken_in_silence(plain, sockdir):
    """The guest shut its sending side, then the host hung up: the device ends the connection
    with OP_RST and forgets it; a credit update the guest sends after that (Linux does) is not
    an unknown connection (no RST back, not a drop), while a packet for a port never connected
    still is."""
    mem = plain
    dev, rx, tx, bufs, host, req, _ = _connected(mem, sockdir, [])
    try:
        at = iter(range(0x40000, 0x50000, 0x100))     # each packet in a buffer of its own

        def send(op, port=req.src_port, flags=0):
            h = Header(9, HOST_CID, 77, port, 0, 1, op, flags, 5000, 0)
            gpa = next(at)
            mem.write(gpa, h.pack())
            tx.add(gpa, HDR_LEN, False)
            dev.notify(1)

        send(OP_RESPONSE)
        assert host.recv(64) == f"OK {req.src_port}\n".encode()
        send(OP_SHUTDOWN, flags=2)                     # the guest will send no more
        host.close()                                   # and the host hangs up
        end = _packets(dev, rx, bufs, mem, 5, until=OP_RST)
        assert end and end[-1][0].op == OP_RST
        send(OP_CREDIT_UPDATE)                         # late, for the closed connection
        send(OP_CREDIT_UPDATE, port=req.src_port + 1000)   # for a port never connected
        late = _packets(dev, rx, bufs, mem, 1)               # the unknown port's RST
        assert [(h.op, h.dst_port) for h, _ in late] == [(OP_RST, 77)]
        assert late[0][0].src_port == req.src_port + 1000      # only the unknown one is reset
        c = dev.counters()
        assert (c["tx_after_close"], c["tx_unknown_connection"]) == (1, 1)
    finally:
        host.close()
        dev.close()


@pytest.mark.requires_kvm                   # the machine (and /dev/kvm) is opened first
@pytest.mark.parametrize("spec", ["cid=2,uds=/tmp/x", "cid=3", "uds=/tmp/x,cid=3,x=1",
                                  "cid=3,uds=/nonexistent-dir/v.sock"])
def test_run_refuses_a_bad_vsock_in_one_line_with_status_2(spec):
    r = subprocess.run([sys.executable, "-m", "pykvm", "run", "hello", "--no-input", "--vsock",
                        spec], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and r.stderr.startswith("pykvm: ")


def test_run_help_documents_vsock():
    r = subprocess.run([sys.executable, "-m", "pykvm", "run", "--help"], capture_output=True,
                       text=True, timeout=60)
    assert "--vsock" in r.stdout and "CONNECT" in r.stdout and "PATH_P" in r.stdout
