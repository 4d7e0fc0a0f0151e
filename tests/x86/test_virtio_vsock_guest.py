"""virtio-vsock on the pc machine, on the real /dev/kvm, with a tiny polling driver of our own
(``virtio_vsock.c``) on virtio-pci and virtio-mmio, bridged to Unix sockets as Firecracker's:

* host -> guest: a host process connects to the device's socket, writes ``CONNECT 1234``, the
  guest's echo server accepts, the host reads ``OK <port>``, sends bytes (more than one receive
  buffer, so credit and fwd_cnt move) and reads them back; closing the host side ends the
  connection with SHUTDOWN and the guest's RST;
* guest -> host: the guest connects to host port 5000, a host process listening on
  ``<uds>_5000`` echoes; a port nobody listens on gets RST;
* hostile: bad CONNECT lines, data past the credit granted, unknown ops and types, wrong CIDs,
  packets for no connection, short headers, lengths past the payload, and a chain outside
  RAM (DEVICE_NEEDS_RESET); the VMM stays up, every case is counted and no file descriptor
  is left behind.
"""
import os
import socket
import threading
import time

import pytest

from pykvm.devices.virtio.vsock import (HDR_LEN, HOST_CID, OP_CREDIT_UPDATE, OP_REQUEST,
                                        OP_RESPONSE, OP_RST, OP_RW, OP_SHUTDOWN, TYPE_STREAM,
                                        Header, VirtioVsock)

pytestmark = [pytest.mark.requires_kvm, pytest.mark.requires_arch("x86_64")]

SEND, RECV, BADTX, SERVE, DONE = 1, 2, 3, 4, 0
NEEDS_RESET = 64
CID = 42
PATIENCE = 60.0                 # seconds to wait for the device or a host thread (a hang guard)
EXPECT = 160                    # RECV's wait for a packet that must come, 10^9 TSC cycles (~1 min)
NONE_COMES = 8                  # RECV's wait where none may come, 10^9 TSC cycles (2-4 s)


class Guest:
    """The guest of ``virtio_vsock.c`` behind its stage-1 report."""

    def __init__(self, m):
        self.m = m
        self.transport, self.features, self.cid, self.status, bufs = m.sync(stage=1)
        self.tx_buf, self.rx_buf = bufs & 0xFFFFFFFF, bufs >> 32
        self.stage = 1

    def _cmd(self, *params, timeout=120):              # past virtio_vsock.c's longest wait
        self.m.set_params(*params, *([0] * (3 - len(params))))
        self.stage += 1
        return self.m.sync(stage=self.stage, timeout=timeout)

    def send(self, hdr: Header, payload: bytes = b"", raw: bytes = None):
        """Send a packet; (used length, device status)."""
        data = raw if raw is not None else hdr.pack() + payload
        self.m.memory.write(self.tx_buf, data)
        return self._cmd(SEND, len(data))

    def recv(self, wait=EXPECT):
        """(Header, payload) of the next packet, or None when none came in ``wait`` * 10^9
        TSC cycles (EXPECT: about a minute, for a packet the device must send from its host
        thread however late a loaded host runs it; NONE_COMES: a few seconds, to see that none
        comes)."""
        used, status = self._cmd(RECV, wait)
        assert not status & NEEDS_RESET
        if not used:
            return None
        raw = self.m.memory.read(self.rx_buf, used)
        h = Header.unpack(raw)
        return h, raw[HDR_LEN:HDR_LEN + h.len]

    def recv_op(self, op):
        """The next packet of kind ``op``, skipping credit updates."""
        while True:
            got = self.recv()
            assert got is not None, f"no packet (wanted op {op})"
            if got[0].op != OP_CREDIT_UPDATE or op == OP_CREDIT_UPDATE:
                assert got[0].op == op, got[0]
                return got

    def serve(self, port, timeout=120):
        return self._cmd(SERVE, port, timeout=timeout)

    def bad_tx(self, addr, n):
        return self._cmd(BADTX, addr, n)[0]

    def done(self):
        self.m.set_params(DONE, 0, 0)
        self.m.done()


def _fds():
    return len(os.listdir("/proc/self/fd"))


def _hdr(op, src_port, dst_port, n=0, flags=0, src_cid=CID, dst_cid=HOST_CID,
         buf_alloc=65536, fwd_cnt=0, type=TYPE_STREAM):
    return Header(src_cid, dst_cid, src_port, dst_port, n, type, op, flags, buf_alloc, fwd_cnt)


def _connect(path, line: bytes):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(20)
    s.connect(path)
    try:
        if line:
            s.sendall(line)
    except (BrokenPipeError, ConnectionResetError):
        pass                              # the device closed it already: the caller sees EOF
    return s


def _readline(s) -> bytes:
    out = b""
    while not out.endswith(b"\n"):
        b = s.recv(1)
        if not b:
            break
        out += b
    return out


def _closed(s) -> bool:
    """Whether the other end closed ``s`` (EOF, or a reset when it left bytes unread)."""
    try:
        return s.recv(16) == b""
    except ConnectionResetError:
        return True


def _wait(cond, seconds=PATIENCE):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return cond()


@pytest.fixture
def uds(tmp_path):
    # a short directory: Unix socket paths are at most 107 bytes
    d = f"/tmp/pykvm-vsock-{os.getpid()}-{time.monotonic_ns() % 10**6}"
    os.mkdir(d, 0o700)
    yield os.path.join(d, "v.sock")
    for f in os.listdir(d):
        os.unlink(os.path.join(d, f))
    os.rmdir(d)


@pytest.mark.parametrize("transport", ["pci", "mmio"])
def test_host_connects_to_a_guest_echo_server(guest_vm, uds, transport):
    fds0 = _fds()
    dev = VirtioVsock(CID, uds)
    assert os.path.exists(uds)
    # pci: through Machine(vsock=), which puts it on the pc machine's PCI bus and counts it
    opts = {"vsock": dev} if transport == "pci" else {"virtio_mmio": [dev]}
    m = guest_vm("virtio_vsock.c", machine="pc", **opts)
    g = Guest(m)
    assert g.transport == (1 if transport == "pci" else 2)
    assert g.features >> 32 & 1 and g.features & 1            # VERSION_1, VSOCK_F_STREAM
    assert g.cid == CID and g.status & 4 and not g.status & NEEDS_RESET

    payload = os.urandom(3 * 4096 + 123)          # several receive buffers of 4 KiB
    result = {}

    def host():
        s = _connect(uds, b"CONNECT 1234\n")
        try:
            result["ok"] = _readline(s)
            s.sendall(payload)
            got = b""
            while len(got) < len(payload):
                b = s.recv(65536)
                if not b:
                    break
                got += b
            result["echo"] = got
        finally:
            s.close()

    t = threading.Thread(target=host)
    t.start()
    seen, echoed, accepted, last, host_port, status = g.serve(1234)
    t.join(PATIENCE)
    assert not t.is_alive()
    assert result["ok"] == f"OK {host_port}\n".encode() and host_port >= 1 << 30
    assert result["echo"] == payload
    assert (echoed, accepted, last) == (len(payload), 1, OP_SHUTDOWN)
    assert not status & NEEDS_RESET
    c = dev.counters()
    assert c["connections_host"] == 1 and c["rx_bytes"] == c["tx_bytes"] == len(payload)
    assert _wait(lambda: dev.counters()["connections_active"] == 0)
    assert dev.counters()["resets_received"] == 1 and dev.counters()["dropped"] == 0
    if transport == "pci":
        assert m.device_counters()["virtio-vsock0"]["tx_bytes"] == len(payload)
    g.done()
    m.close()
    dev.close()
    assert not os.path.exists(uds)                 # the socket file goes with the device
    assert _fds() == fds0


def _echo_listener(path, box):
    """A host process listening on ``path``: echoes one connection until EOF."""
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(4)
    srv.settimeout(30)

    def run():
        try:
            c, _ = srv.accept()
        except OSError:
            return
        with c:
            c.settimeout(30)
            while True:
                b = c.recv(65536)
                if not b:
                    box["eof"] = True
                    break
                box.setdefault("data", b"")
                box["data"] += b
                c.sendall(b)
    t = threading.Thread(target=run)
    t.start()
    return srv, t


@pytest.mark.parametrize("transport", ["pci", "mmio"])
def test_guest_connects_to_a_host_listener(guest_vm, uds, transport):
    fds0 = _fds()
    dev = VirtioVsock(CID, uds)
    box = {}
    srv, t = _echo_listener(f"{uds}_5000", box)
    try:
        opts = {"virtio_pci": [dev]} if transport == "pci" else {"virtio_mmio": [dev]}
        m = guest_vm("virtio_vsock.c", machine="pc", **opts)
        g = Guest(m)
        g.send(_hdr(OP_REQUEST, 7777, 5000))
        h, _ = g.recv_op(OP_RESPONSE)
        assert (h.src_cid, h.dst_cid, h.src_port, h.dst_port) == (HOST_CID, CID, 5000, 7777)
        assert h.buf_alloc == dev.buf_alloc and h.fwd_cnt == 0 and h.type == TYPE_STREAM
        msg = b"hello from the guest over vsock"
        g.send(_hdr(OP_RW, 7777, 5000, len(msg)), msg)
        h, data = g.recv_op(OP_RW)
        assert data == msg and (h.src_port, h.dst_port) == (5000, 7777)
        assert h.fwd_cnt == len(msg)                  # the host side took them
        # no listener on 5001: RST
        g.send(_hdr(OP_REQUEST, 7778, 5001))
        h, _ = g.recv_op(OP_RST)
        assert (h.src_port, h.dst_port) == (5001, 7778)
        # the guest shuts down both ways: the device resets the connection, the host sees EOF
        g.send(_hdr(OP_SHUTDOWN, 7777, 5000, flags=3, fwd_cnt=len(msg)))
        h, _ = g.recv_op(OP_RST)
        assert (h.src_port, h.dst_port) == (5000, 7777)
        t.join(PATIENCE)                              # the listener sees EOF, then ends
        assert box == {"data": msg, "eof": True}
        c = dev.counters()
        assert c["connections_guest"] == 1 and c["guest_refused"] == 1
        assert c["connections_active"] == 0 and c["dropped"] == 0
        g.done()
        m.close()
    finally:
        srv.close()
        t.join(10)
        dev.close()
    os.unlink(f"{uds}_5000")
    assert _fds() == fds0


def test_hostile_host_and_guest(guest_vm, uds):
    fds0 = _fds()
    dev = VirtioVsock(CID, uds, buf_alloc=8192, max_connections=4)
    box = {}
    srv, t = _echo_listener(f"{uds}_5000", box)
    try:
        m = guest_vm("virtio_vsock.c", machine="pc", virtio_pci=[dev])
        g = Guest(m)

        # the host side: garbage lines close the connection, the VMM stays
        bad = [b"HELLO\n", b"CONNECT\n", b"CONNECT -1\n", b"CONNECT 99999999999\n",
               b"CONNECT 0x10\n", b"CONNECT " + b"1" * 40, b"\n"]
        for line in bad:
            s = _connect(uds, line)
            assert _closed(s), line                         # closed without an answer
            s.close()
        s = _connect(uds, b"CONN")                          # half a line, then gone
        s.close()
        assert _wait(lambda: dev.counters()["host_rejected"] == len(bad) + 1), dev.counters()
        # more connections than max_connections: the fifth is closed at once
        held = [_connect(uds, b"") for _ in range(4)]
        extra = _connect(uds, b"")
        assert _closed(extra)
        extra.close()
        for s in held:
            s.close()
        assert _wait(lambda: dev.counters()["connections_active"] == 0)

        # a CONNECT the guest refuses with RST: the host's connection is closed
        s = _connect(uds, b"CONNECT 99\n")
        h, _ = g.recv_op(OP_REQUEST)
        assert (h.dst_port, h.buf_alloc) == (99, 8192)
        g.send(_hdr(OP_RST, 99, h.src_port))
        assert _closed(s)
        s.close()

        # guest: an established connection, then data past the credit granted -> RST
        g.send(_hdr(OP_REQUEST, 7000, 5000))
        g.recv_op(OP_RESPONSE)
        g.send(_hdr(OP_RW, 7000, 5000, 8193), bytes(8193))
        h, _ = g.recv_op(OP_RST)
        assert (h.src_port, h.dst_port) == (5000, 7000)
        c = dev.counters()
        assert c["tx_credit_violation"] == 1 and c["tx_bytes"] == 0

        # packets that get an RST: unknown op, other type, wrong source / destination CID,
        # no such connection, len past the payload, len past 64 KiB
        for hdr, payload, counter in [
                (_hdr(9, 1, 2), b"", "tx_unknown_op"),
                (_hdr(OP_REQUEST, 1, 5000, type=2), b"", "tx_unknown_op"),
                (_hdr(OP_REQUEST, 1, 5000, src_cid=CID + 1), b"", "tx_bad_cid"),
                (_hdr(OP_REQUEST, 1, 5000, dst_cid=7), b"", "tx_bad_cid"),
                (_hdr(OP_RW, 1, 5000, 4), b"abcd", "tx_unknown_connection"),
                (_hdr(OP_RW, 1, 5000, 100), b"abcd", "tx_malformed"),
                (_hdr(OP_RW, 1, 5000, 65537), bytes(65537), "tx_malformed")]:
            before = dev.counters()[counter]
            used, status = g.send(hdr, payload)
            assert used == 0 and not status & NEEDS_RESET
            h, _ = g.recv_op(OP_RST)
            assert (h.src_port, h.dst_port, h.dst_cid) == (hdr.dst_port, hdr.src_port, CID)
            assert dev.counters()[counter] == before + 1, (hdr, dev.counters())
        # an RST for no connection, and a header shorter than 44 bytes: no answer at all
        g.send(_hdr(OP_RST, 1, 5000))
        before = dev.counters()["tx_malformed"]
        g.send(None, raw=bytes(20))
        assert dev.counters()["tx_malformed"] == before + 1
        assert g.recv(wait=NONE_COMES) is None

        # descriptor abuse: a chain outside RAM sets DEVICE_NEEDS_RESET
        assert g.bad_tx(1 << 40, 64) & NEEDS_RESET
        g.done()
        m.close()
        c = dev.counters()
        assert c["connections_active"] == 0 and c["dropped"] >= 9
    finally:
        srv.close()
        t.join(10)
        dev.close()
    os.unlink(f"{uds}_5000")
    assert _fds() == fds0
