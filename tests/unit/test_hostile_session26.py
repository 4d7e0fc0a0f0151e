"""Hostile checks of session 26's changes, without KVM: virtio-net's receive pacing driven through
real virtqueues in plain memory by a socket-pair peer (a burst far past the waiting list, frames
split across writes, a bad length prefix while the list is full, the link going down and up,
a driver reset, close() against a peer that keeps writing, runt frames) and a vsock guest
connect refused with RST when no socket can be made (the process out of file descriptors),
after which the device still works. (The host-thread guard's: test_hostthread_units.py.)"""
import os
import resource
import socket
import struct
import threading
import time

import pytest

from pykvm.devices.virtio import DeviceHandles
from pykvm.devices.virtio.net import RX_PENDING_FRAMES, VirtioNet
from pykvm.devices.virtio.net_backends import MAX_FRAME, StreamBackend
from pykvm.devices.virtio.queue import DESC_F_WRITE, Virtqueue
from pykvm.devices.virtio.vsock import (HDR_LEN, HOST_CID, OP_REQUEST, OP_RESPONSE, OP_RST,
                                        Header, VirtioVsock)
from pykvm.memory import GuestMemory
from pykvm.testing import wait_until

RAM = 4 << 20
SIZE = 256
RXD, RXA, RXU = 0x1000, 0x2000, 0x3000
TXD, TXA, TXU = 0x5000, 0x6000, 0x7000
BUF = 0x100000                           # receive buffer i at BUF + 2 KiB * i
SETTLE = 0.3                             # seconds a device that read on would need to show it


@pytest.fixture
def mem():
    m = GuestMemory.anonymous(RAM)
    yield m
    m._close()


class Driver:
    """The driver's side of a virtio-net device: a receive and a transmit queue of 256 entries,
    receive buffers of 2 KiB offered on demand, the used ring read back."""

    def __init__(self, mem, dev):
        self.mem, self.dev = mem, dev
        mem.zero(0, 0x10000)
        self.rxq = Virtqueue(mem, 0, SIZE, RXD, RXA, RXU, event_idx=False, indirect=False)
        self.txq = Virtqueue(mem, 1, SIZE, TXD, TXA, TXU, event_idx=False, indirect=False)
        self.avail = self.seen = 0
        self.resets = threading.Event()
        self.handles = DeviceHandles(lambda *a: None, self.resets.set)
        dev.activate(0, [self.rxq, self.txq], self.handles)

    def offer(self, n):
        for _ in range(n):
            i = self.avail % SIZE
            self.mem.write(RXD + 16 * i, struct.pack("<QIHH", BUF + 2048 * i, 2048, DESC_F_WRITE, 0))
            self.mem.write(RXA + 4 + 2 * i, struct.pack("<H", i))
            self.avail = (self.avail + 1) & 0xFFFF
        self.mem.write(RXA + 2, struct.pack("<H", self.avail))
        self.dev.notify(0)

    def used_idx(self):
        return struct.unpack("<H", self.mem.read(RXU + 2, 2))[0]

    def take(self):
        out = []
        u = self.used_idx()
        while self.seen != u:
            head, n = struct.unpack("<II", self.mem.read(RXU + 4 + 8 * (self.seen % SIZE), 8))
            out.append(self.mem.read(BUF + 2048 * head + 12, n - 12))
            self.seen = (self.seen + 1) & 0xFFFF
        return out

    def receive(self, n):
        """``n`` frames, offering buffers a half ring at a time."""
        got = []
        while len(got) < n:
            self.offer(SIZE // 2)
            wait_until(lambda: self.used_idx() != self.seen, f"frames after {len(got)}")
            got += self.take()
        return got


def frame(i, size=60):
    return b"\x02" + bytes(5) + b"\x02\0\0\0\0\x01\x88\xb5" + (i.to_bytes(4, "big") * size)[:size - 14]


def wire(frames):
    return b"".join(len(f).to_bytes(4, "big") + f for f in frames)


@pytest.fixture
def net(mem):
    ours, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    dev = VirtioNet(StreamBackend(ours))
    drv = Driver(mem, dev)
    yield dev, drv, peer
    dev.close()
    peer.close()


def _full(dev):
    wait_until(lambda: dev.counters()["rx_pending"] >= RX_PENDING_FRAMES, "the waiting list to fill")


def test_a_burst_past_the_list_waits_unread_and_every_frame_arrives_in_order(net):
    dev, drv, peer = net
    frames = [frame(i) for i in range(3000)]
    sender = threading.Thread(target=peer.sendall, args=(wire(frames),), daemon=True)
    sender.start()
    _full(dev)
    time.sleep(SETTLE)
    c = dev.counters()
    assert c["rx_pending"] == RX_PENDING_FRAMES and c["rx_dropped"] == 0 and c["rx_packets"] == 0, c
    assert drv.receive(len(frames)) == frames
    c = dev.counters()
    assert c["rx_packets"] == 3000 and c["rx_dropped"] == 0 and c["rx_pending"] == 0, c
    sender.join(10)


def test_frames_split_across_many_writes_arrive_whole(net):
    dev, drv, peer = net
    frames = [frame(i, 1514) for i in range(300)]
    data = wire(frames)

    def dribble():
        for k in range(0, len(data), 777):
            peer.sendall(data[k:k + 777])
    threading.Thread(target=dribble, daemon=True).start()
    _full(dev)
    assert drv.receive(300) == frames and dev.counters()["rx_dropped"] == 0


def test_a_bad_length_behind_a_full_list_fails_the_stream_only_when_reached(net):
    dev, drv, peer = net
    frames = [frame(i) for i in range(RX_PENDING_FRAMES + 100)]
    peer.sendall(wire(frames) + (MAX_FRAME + 1).to_bytes(4, "big") + b"junk")
    _full(dev)
    time.sleep(SETTLE)
    assert dev.backend_error is None                      # not read yet: the list is full
    assert drv.receive(len(frames)) == frames             # everything before it, in order
    wait_until(lambda: dev.backend_error is not None, "the stream's error")
    assert dev.backend_error == f"stream: a frame of {MAX_FRAME + 1} bytes (more than {MAX_FRAME})"


def test_link_down_reads_and_drops_link_up_paces_again(net):
    dev, drv, peer = net
    peer.sendall(wire([frame(i) for i in range(RX_PENDING_FRAMES + 100)]))
    _full(dev)
    dev.set_link(False)                                    # what waited goes, the rest is read
    down = RX_PENDING_FRAMES + 100
    wait_until(lambda: dev.counters()["rx_dropped_link_down"] == down, "the rest read and dropped")
    peer.sendall(wire([frame(i) for i in range(1000, 1500)]))
    wait_until(lambda: dev.counters()["rx_dropped_link_down"] == down + 500, "link-down frames dropped")
    assert dev.counters()["rx_pending"] == 0
    dev.set_link(True)
    peer.sendall(wire([frame(i) for i in range(2000, 2400)]))
    _full(dev)                             # observed full again (a fixed sleep raced a slow host)
    time.sleep(SETTLE)                     # a device that dropped past the list would show it
    c = dev.counters()
    assert c["rx_dropped_link_down"] == down + 500 and c["rx_dropped_no_buffer"] == 0, c
    assert c["rx_pending"] == RX_PENDING_FRAMES           # full again: paced, not dropped


def test_a_reset_while_paced_drops_what_waits_and_a_new_activation_receives(net, mem):
    dev, drv, peer = net
    peer.sendall(wire([frame(i) for i in range(RX_PENDING_FRAMES + 100)]))
    _full(dev)
    dev.reset()
    wait_until(lambda: dev.counters()["rx_dropped_no_buffer"] == RX_PENDING_FRAMES + 100,
               "the waiting frames and the socket's rest dropped")
    assert dev.counters()["rx_pending"] == 0
    drv2 = Driver(mem, dev)
    fresh = [frame(i) for i in range(5000, 5010)]
    peer.sendall(wire(fresh))
    drv2.offer(16)
    wait_until(lambda: drv2.used_idx() == 10, "the new activation's frames")
    assert drv2.take() == fresh


def test_close_while_full_against_a_peer_that_keeps_writing(mem):
    ours, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    dev = VirtioNet(StreamBackend(ours))
    Driver(mem, dev)
    stop = threading.Event()

    def endless():
        i = 0
        while not stop.is_set():
            try:
                peer.sendall(wire([frame(j) for j in range(i, i + 100)]))
            except OSError:
                return                                   # the device closed its end
            i += 100
    writer = threading.Thread(target=endless, daemon=True)
    writer.start()
    try:
        _full(dev)
        thread = dev._thread
        assert thread is not None
        dev.close()
        assert not thread.is_alive() and dev.closed
        writer.join(10)
        assert not writer.is_alive()                     # its writes failed: the socket is gone
    finally:
        stop.set()
        peer.close()


# ---- vsock: a guest connect with no file descriptor left --------------------------------------

def test_a_guest_connect_without_a_free_fd_is_refused_and_the_device_still_serves(mem, sockdir):
    path = os.path.join(sockdir, "v.sock")
    dev = VirtioVsock(9, path)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(f"{path}_5000")
    listener.listen(4)
    base = 0x10000
    qs = []
    for i in range(3):                                   # rx, tx, event: 16 entries each
        d, a, u = base + 0x1000 * i, base + 0x1000 * i + 0x400, base + 0x1000 * i + 0x800
        qs.append(Virtqueue(mem, i, 16, d, a, u, event_idx=False, indirect=False))
    rx_next = [0]
    tx_next = [0]

    def add(q, qbase, counter, gpa, n, write):
        i = counter[0] % 16
        mem.write(qbase + 16 * i, struct.pack("<QIHH", gpa, n, 2 if write else 0, 0))
        mem.write(qbase + 0x400 + 4 + 2 * i, struct.pack("<H", i))
        counter[0] += 1
        mem.write(qbase + 0x400 + 2, struct.pack("<H", counter[0] & 0xFFFF))

    def rx_used():
        return struct.unpack("<H", mem.read(base + 0x800 + 2, 2))[0]

    def packet(k):
        head, n = struct.unpack("<II", mem.read(base + 0x800 + 4 + 8 * k, 8))
        return Header.unpack(mem.read(0x40000 + 0x1000 * head, n))

    def request(src_port):
        h = Header(9, HOST_CID, src_port, 5000, 0, 1, OP_REQUEST, 0, 4096, 0)
        mem.write(0x30000 + 0x100 * (tx_next[0] % 16), h.pack())
        add(qs[1], base + 0x1000, tx_next, 0x30000 + 0x100 * (tx_next[0] % 16), HDR_LEN, False)
        dev.notify(1)

    resets = []
    dev.activate(1 << 32, qs, DeviceHandles(lambda *a: None, lambda: resets.append(1)))
    held = []
    try:
        for _ in range(4):
            add(qs[0], base, rx_next, 0x40000 + 0x1000 * (rx_next[0] % 16), 4096, True)
        dev.notify(0)
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        highest = max(int(fd) for fd in os.listdir("/proc/self/fd"))
        resource.setrlimit(resource.RLIMIT_NOFILE, (highest + 8, hard))
        try:
            while True:                                  # every descriptor the limit allows
                held.append(os.open("/dev/null", os.O_RDONLY))
        except OSError:
            pass
        try:
            request(1024)
            wait_until(lambda: rx_used() >= 1, "the device's answer to the request")
        finally:
            for fd in held:
                os.close(fd)
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        rst = packet(0)
        assert (rst.op, rst.src_port, rst.dst_port) == (OP_RST, 5000, 1024)
        assert dev.counters()["guest_refused"] == 1
        assert dev.thread_error is None and not resets
        request(1025)                                    # descriptors again: it connects
        wait_until(lambda: rx_used() >= 2, "the answer to the second request")
        assert packet(1).op == OP_RESPONSE and dev.counters()["connections_guest"] == 1
    finally:
        dev.close()
        listener.close()


def test_runt_frames_from_the_stream_are_dropped_as_malformed(net):
    dev, drv, peer = net
    good = [frame(i) for i in range(3)]
    peer.sendall(wire([good[0], b"", good[1], b"\x02\x00\x00", good[2]]))
    assert drv.receive(3) == good                          # in order, the runts left out
    c = dev.counters()
    assert c["rx_dropped_malformed"] == 2 and c["rx_packets"] == 3, c
