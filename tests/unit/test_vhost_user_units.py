"""vhost-user front end (pykvm/devices/virtio/vhost_user.py) and the virtio-fs device's host side
(pykvm/devices/virtio/fs.py), without KVM.

* message encoding and the checks on replies (version, REPLY flag, request, size, limits);
* a front end whose peer is a socket this test holds and answers byte by byte: a peer that
  hangs, closes, answers another request, refuses (REPLY_ACK), and the fds of SET_MEM_TABLE
  arriving as SCM_RIGHTS;
* share specs and tags; a "virtiofsd" that exits at once or never answers gives one line, and is
  reaped;
* with a real virtiofsd (``$PYKVM_VIRTIOFSD`` or the Debian package; skipped without one): this
  test plays the guest's driver on shared-memfd RAM — FUSE_INIT, LOOKUP, OPEN, READ of a host
  file's token through the request queue, MKDIR seen on the host (and EROFS on a ``ro`` share),
  lookups that try to leave the share (``..`` from the root, a name with '/', a symlink pointing
  outside) never reach the outside file, GET_VRING_BASE on reset returns how many requests were
  served, and a killed virtiofsd sets DEVICE_NEEDS_RESET with its exit status.
"""
import array
import errno
import os
import socket
import struct
import threading
import time

import pytest

from pykvm.devices.virtio import F_VERSION_1, DeviceHandles
from pykvm.devices.virtio import fs as vfs
from pykvm.devices.virtio import vhost_user as vu
from pykvm.devices.virtio.queue import Virtqueue
from pykvm.memory import GuestMemory, MemorySlot, new_shared_mapping


# ---- encoding -------------------------------------------------------------------------------
def test_encode_and_decode_header():
    m = vu.encode(vu.SET_VRING_NUM, vu.vring_state(1, 128), need_reply=True)
    assert m[:12] == struct.pack("<III", 8, 0x1 | 0x8, 8) and m[12:] == struct.pack("<II", 1, 128)
    assert vu.decode_header(struct.pack("<III", 1, 0x5, 8)) == (1, 0x5, 8)
    with pytest.raises(vu.VhostUserError, match="12 expected"):
        vu.decode_header(b"\1\0\0\0")
    with pytest.raises(vu.VhostUserError, match="version 2"):
        vu.decode_header(struct.pack("<III", 1, 0x6, 8))
    with pytest.raises(vu.VhostUserError, match="at most 4096"):
        vu.decode_header(struct.pack("<III", 1, 0x5, 1 << 20))
    with pytest.raises(ValueError):
        vu.encode(1, bytes(vu.MAX_PAYLOAD + 1))
    assert vu.request_name(5) == "SET_MEM_TABLE" and vu.request_name(99) == "request 99"


def test_reply_checks():
    ok = vu.check_reply(vu.GET_FEATURES, vu.GET_FEATURES, 0x5, b"x" * 8, 8)
    assert ok == b"x" * 8
    with pytest.raises(vu.VhostUserError, match="without the REPLY flag"):
        vu.check_reply(vu.GET_FEATURES, vu.GET_FEATURES, 0x1, b"x" * 8, 8)
    with pytest.raises(vu.VhostUserError, match="answered GET_PROTOCOL_FEATURES to GET_FEATURES"):
        vu.check_reply(vu.GET_FEATURES, vu.GET_PROTOCOL_FEATURES, 0x5, b"x" * 8, 8)
    with pytest.raises(vu.VhostUserError, match="reply of 4 bytes"):
        vu.check_reply(vu.GET_FEATURES, vu.GET_FEATURES, 0x5, b"x" * 4, 8)


def test_payload_layouts():
    t = vu.mem_table([(0x0, 0x1000, 0x7f0000000000, 0), (0x100000000, 0x2000, 0x7f1000000000, 0)])
    assert struct.unpack_from("<II", t) == (2, 0) and len(t) == 8 + 2 * 32
    assert struct.unpack_from("<QQQQ", t, 8 + 32) == (0x100000000, 0x2000, 0x7f1000000000, 0)
    with pytest.raises(ValueError):
        vu.mem_table([])
    with pytest.raises(ValueError):
        vu.mem_table([(0, 1, 2, 3)] * 9)
    # index, flags, then descriptor table, USED ring, AVAILABLE ring, log
    assert struct.unpack("<IIQQQQ", vu.vring_addr(1, 0xA, 0xB, 0xC)) == (1, 0, 0xA, 0xB, 0xC, 0)


# ---- a front end against a peer this test plays ---------------------------------------------
def _pair(timeout=0.3):
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    b.settimeout(5)
    return vu.VhostUserFrontend(a, timeout=timeout, peer="peer"), b


def _recv_msg(sock):
    data, anc, _, _ = sock.recvmsg(12, socket.CMSG_SPACE(64), socket.MSG_WAITALL)
    fds = []
    for level, kind, raw in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            a = array.array("i")
            a.frombytes(raw[:len(raw) - len(raw) % 4])
            fds += list(a)
    req, flags, size = struct.unpack_from("<III", data)
    payload = sock.recv(size, socket.MSG_WAITALL) if size else b""
    return req, flags, payload, fds


def _answer(sock, req, payload, flags=0x5):
    sock.sendall(struct.pack("<III", req, flags, len(payload)) + payload)


def test_handshake_takes_reply_ack_and_acks_are_awaited():
    fe, peer = _pair()

    def serve():
        assert _recv_msg(peer)[0] == vu.SET_OWNER
        assert _recv_msg(peer)[0] == vu.GET_FEATURES
        _answer(peer, vu.GET_FEATURES, struct.pack("<Q", (1 << 32) | (1 << 30)))
        assert _recv_msg(peer)[0] == vu.GET_PROTOCOL_FEATURES
        _answer(peer, vu.GET_PROTOCOL_FEATURES, struct.pack("<Q", 0xFFFF))
        req, flags, payload, _ = _recv_msg(peer)
        assert req == vu.SET_PROTOCOL_FEATURES and struct.unpack("<Q", payload)[0] == 1 << 3
        req, flags, payload, _ = _recv_msg(peer)       # now every request asks for an ack
        assert req == vu.SET_FEATURES and flags & vu.FLAG_NEED_REPLY
        assert struct.unpack("<Q", payload)[0] == (1 << 32) | (1 << 30)
        _answer(peer, vu.SET_FEATURES, struct.pack("<Q", 0))
        req, flags, payload, _ = _recv_msg(peer)
        _answer(peer, req, struct.pack("<Q", 22))     # refused
    t = threading.Thread(target=serve)
    t.start()
    fe.timeout = 5
    fe.sock.settimeout(5)
    fe.handshake()
    assert fe.features == (1 << 32) | (1 << 30) and fe.protocol_features == 1 << 3
    fe.set_features(1 << 32)
    with pytest.raises(vu.VhostUserError, match="peer refused SET_VRING_NUM .status 22."):
        fe.call(vu.SET_VRING_NUM, vu.vring_state(0, 8))
    t.join()
    fe.close()
    peer.close()


def test_a_peer_that_never_answers_times_out_once():
    fe, peer = _pair(timeout=0.3)
    with pytest.raises(vu.VhostUserError, match="did not answer GET_FEATURES within 0.3 s"):
        fe.get_u64(vu.GET_FEATURES)
    with pytest.raises(vu.VhostUserError, match="did not answer"):   # dead from now on, at once
        fe.call(vu.SET_OWNER)
    fe.close()
    peer.close()


def test_a_peer_that_closes_or_answers_nonsense():
    fe, peer = _pair()
    peer.close()
    with pytest.raises(vu.VhostUserError, match="closed the connection|sending GET_FEATURES"):
        fe.get_u64(vu.GET_FEATURES)
    fe.close()
    for bad, why in ((struct.pack("<III", vu.GET_PROTOCOL_FEATURES, 0x5, 8) + bytes(8),
                      "answered GET_PROTOCOL_FEATURES to GET_FEATURES"),
                     (struct.pack("<III", vu.GET_FEATURES, 0x5, 4) + bytes(4), "reply of 4 bytes"),
                     (struct.pack("<III", vu.GET_FEATURES, 0x1, 8) + bytes(8), "REPLY flag"),
                     (struct.pack("<III", vu.GET_FEATURES, 0x5, 1 << 30), "payload bytes")):
        fe, peer = _pair()
        peer.sendall(bad)
        with pytest.raises(vu.VhostUserError, match=why):
            fe.get_u64(vu.GET_FEATURES)
        fe.close()
        peer.close()


def test_mem_table_fds_arrive_as_scm_rights():
    m, pin, fd = new_shared_mapping(1 << 16)
    m[0x100:0x105] = b"hello"
    fe, peer = _pair()
    fe.set_mem_table([(0, 1 << 16, 0x7f0000000000, 0, fd)])
    req, flags, payload, fds = _recv_msg(peer)
    assert req == vu.SET_MEM_TABLE and len(fds) == 1 and fds[0] != fd
    assert struct.unpack_from("<IIQQQQ", payload) == (1, 0, 0, 1 << 16, 0x7f0000000000, 0)
    assert os.pread(fds[0], 5, 0x100) == b"hello"            # the same pages, through the copy
    os.close(fds[0])
    os.close(fd)
    fe.close()
    peer.close()


# ---- shares and the virtiofsd process -------------------------------------------------------
def test_share_specs_and_tags():
    s = vfs.ShareSpec.parse("/srv/a,,b,tag=docs,ro,cache=never,sandbox=chroot")
    assert (s.path, s.tag, s.readonly, s.cache, s.sandbox) == ("/srv/a,b", "docs", True, "never",
                                                              "chroot")
    s = vfs.ShareSpec.parse("/srv")
    assert (s.tag, s.readonly, s.cache, s.sandbox) == ("hostshare", False, "auto", "namespace")
    for bad, why in ((",ro", "no directory"), ("/d,rx", "unknown or bad option 'rx'"),
                     ("/d,ro,ro", "ro given twice"), ("/d,tag=" + "x" * 37, "1-36"),
                     ("/d,tag=a b", "white space"), ("/d,cache=lots", "cache=lots"), ("", "DIR")):
        with pytest.raises(vfs.FsError, match=why):
            vfs.ShareSpec.parse(bad)
    assert vfs.check_tag("é" * 18) == "é".encode() * 18
    with pytest.raises(vfs.FsError):
        vfs.check_tag("é" * 19)                               # 38 bytes


def test_missing_virtiofsd_names_the_package(monkeypatch, tmp_path):
    monkeypatch.delenv(vfs.ENV, raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(vfs, "_LIBEXEC", (str(tmp_path / "nothing"),))
    with pytest.raises(vfs.FsError, match="install the Debian package 'virtiofsd'"):
        vfs.VirtioFs(str(tmp_path))


def _script(tmp_path, body):
    p = tmp_path / "fake-virtiofsd"
    p.write_text("#!/bin/sh\n" + body + "\n")
    p.chmod(0o755)
    return str(p)


def test_a_daemon_that_exits_at_once_gives_its_last_line(tmp_path):
    prog = _script(tmp_path, "echo 'Error: shared directory is gone' >&2; exit 3")
    with pytest.raises(vfs.FsError, match=r"virtiofsd exited \(status 3\): Error: shared "
                                          "directory is gone"):
        vfs.VirtioFs(str(tmp_path), virtiofsd=prog)


def test_a_daemon_that_hangs_times_out_and_is_reaped(tmp_path):
    pidfile = tmp_path / "pid"
    prog = _script(tmp_path, f"echo $$ > {pidfile}; exec sleep 60")
    with pytest.raises(vfs.FsError, match="virtiofsd did not answer GET_FEATURES within 0.5 s"):
        vfs.VirtioFs(str(tmp_path), virtiofsd=prog, timeout=0.5)
    pid = int(pidfile.read_text())
    with pytest.raises(ProcessLookupError):                  # killed and reaped
        os.kill(pid, 0)


# ---- against a real virtiofsd: this test is the guest's driver ------------------------------
QSIZE = 16
RAM = 1 << 20
RINGS = {0: 0x10000, 1: 0x20000}                  # desc; avail +0x1000; used +0x2000
BUF = 0x40000
FUSE_LOOKUP, FUSE_READLINK, FUSE_MKDIR, FUSE_OPEN, FUSE_READ, FUSE_INIT = 1, 5, 9, 14, 15, 26
S_IFLNK = 0o120000


def _virtiofsd_or_skip():
    try:
        return vfs.find_virtiofsd()
    except vfs.FsError as e:
        pytest.skip(f"pykvm: host lacks virtiofsd ({e})")


class Driver:
    """The guest's side of the two queues, written straight into shared guest RAM."""

    def __init__(self, dev, memory):
        self.dev, self.mem = dev, memory
        self.irq = threading.Event()
        self.reset_asked = threading.Event()
        self.unique = 0
        self.avail = {0: 0, 1: 0}
        self.used_seen = {0: 0, 1: 0}
        self.handles = DeviceHandles(lambda cause, queue=-1: self.irq.set(),
                                     self.reset_asked.set)
        qs = [Virtqueue(memory, i, QSIZE, d, d + 0x1000, d + 0x2000, event_idx=False, indirect=False)
              for i, d in RINGS.items()]
        dev.activate(1 << F_VERSION_1, qs, self.handles)

    def request(self, opcode, nodeid, body=b"", out_len=4096, queue=1):
        self.unique += 1
        hdr = struct.pack("<IIQQIIIHH", 40 + len(body), opcode, self.unique, nodeid, 0, 0, 1, 0, 0)
        req = hdr + body
        m = self.mem
        m.write(BUF, req)
        m.write(BUF + 0x8000, bytes(out_len))
        d = RINGS[queue]
        m.write(d, struct.pack("<QIHH", BUF, len(req), 1, 1))                # NEXT
        m.write(d + 16, struct.pack("<QIHH", BUF + 0x8000, out_len, 2, 0))   # WRITE
        a = d + 0x1000
        m.write(a + 4 + 2 * (self.avail[queue] % QSIZE), struct.pack("<H", 0))
        self.avail[queue] += 1
        self.irq.clear()
        m.write(a + 2, struct.pack("<H", self.avail[queue] & 0xFFFF))
        self.dev.notify(queue)
        used = d + 0x2000
        deadline = time.monotonic() + 60              # virtiofsd, however loaded the host
        while struct.unpack("<H", m.read(used + 2, 2))[0] == self.used_seen[queue]:
            assert time.monotonic() < deadline, "virtiofsd did not answer"
            self.irq.wait(0.1)
        self.used_seen[queue] += 1
        out = m.read(BUF + 0x8000, out_len)
        n, err, uniq = struct.unpack_from("<IiQ", out)
        assert uniq == self.unique
        return err, out[16:n]

    def lookup(self, parent, name):
        err, body = self.request(FUSE_LOOKUP, parent, name.encode() + b"\0")
        if err:
            return err, None, None
        nodeid = struct.unpack_from("<Q", body)[0]
        mode = struct.unpack_from("<I", body, 40 + 60)[0]
        return 0, nodeid, mode

    def read_file(self, nodeid, n=4096):
        err, body = self.request(FUSE_OPEN, nodeid, struct.pack("<II", os.O_RDONLY, 0))
        if err:
            return err, None
        fh = struct.unpack_from("<Q", body)[0]
        err, data = self.request(FUSE_READ, nodeid, struct.pack("<QQIIQII", fh, 0, n, 0, 0, 0, 0))
        return err, data


def _shared_memory():
    mem = GuestMemory()
    m, pin, fd = new_shared_mapping(RAM)
    mem._add(MemorySlot(0, 0, RAM, 0, m, pin, fd))
    return mem


@pytest.fixture
def tree(tmp_path):
    share = tmp_path / "share"
    share.mkdir()
    token = os.urandom(8).hex()
    secret = os.urandom(8).hex()
    (share / "token.txt").write_text(token)
    (tmp_path / "outside-secret.txt").write_text(secret)
    (share / "escape").symlink_to("../outside-secret.txt")
    (share / "escape-abs").symlink_to(tmp_path / "outside-secret.txt")
    return share, token, secret


def test_virtiofsd_serves_the_share_and_refuses_escapes(tree):
    _virtiofsd_or_skip()
    share, token, secret = tree
    mem = _shared_memory()
    dev = vfs.VirtioFs(str(share), tag="hostshare")
    try:
        assert dev.config_read(0, 9) == int.from_bytes(b"hostshare", "little")
        assert dev.config_read(36, 4) == 1
        drv = Driver(dev, mem)
        assert dev.error is None, dev.error
        err, body = drv.request(FUSE_INIT, 0, struct.pack("<IIII", 7, 31, 0, 0))
        assert err == 0 and struct.unpack_from("<II", body) [0] == 7
        err, ino, mode = drv.lookup(1, "token.txt")
        assert err == 0
        assert drv.read_file(ino) == (0, token.encode())
        # a directory made through the share appears on the host
        err, body = drv.request(FUSE_MKDIR, 1, struct.pack("<II", 0o755, 0) + b"from-guest\0")
        assert err == 0 and (share / "from-guest").is_dir()
        # escapes: the outside file is never reached
        err, up, _ = drv.lookup(1, "..")
        if err == 0:
            assert drv.lookup(up, "outside-secret.txt")[0] == -errno.ENOENT
        assert drv.lookup(1, "../outside-secret.txt")[0] < 0
        for link in ("escape", "escape-abs"):
            err, ino, mode = drv.lookup(1, link)
            assert err == 0 and mode & 0o170000 == S_IFLNK
            err, data = drv.read_file(ino)              # not followed on the host
            assert err < 0 and (data is None or secret.encode() not in data)
            err, target = drv.request(FUSE_READLINK, ino)
            assert err == 0 and target.endswith(b"outside-secret.txt")   # only the text
        served = drv.avail[1]
        dev.reset()                                      # GET_VRING_BASE: the next avail index
        assert dev.counters()["kicks_forwarded"] == served
        assert dev.counters()["interrupts"] >= served
        # started again, then virtiofsd dies: DEVICE_NEEDS_RESET and one line saying why
        drv2 = Driver(dev, mem)
        os.killpg(dev.daemon.proc.pid, 9)
        assert drv2.reset_asked.wait(10)
        assert dev.error is not None and "virtiofsd exited (status -9)" in dev.error
    finally:
        dev.close()
    assert dev.daemon.proc.returncode is not None


def test_virtiofsd_readonly_share_refuses_writes(tree):
    _virtiofsd_or_skip()
    share, token, _ = tree
    mem = _shared_memory()
    dev = vfs.VirtioFs(str(share), readonly=True)
    try:
        drv = Driver(dev, mem)
        assert drv.request(FUSE_INIT, 0, struct.pack("<IIII", 7, 31, 0, 0))[0] == 0
        err, _ = drv.request(FUSE_MKDIR, 1, struct.pack("<II", 0o755, 0) + b"nope\0")
        assert err == -errno.EROFS and not (share / "nope").exists()
        err, ino, _ = drv.lookup(1, "token.txt")
        assert drv.read_file(ino) == (0, token.encode())
    finally:
        dev.close()


def test_private_ram_is_refused_with_one_line(tree):
    _virtiofsd_or_skip()
    share, _, _ = tree
    mem = GuestMemory.anonymous(RAM)
    dev = vfs.VirtioFs(str(share))
    try:
        drv = Driver(dev, mem)
        assert drv.reset_asked.is_set()
        assert "is not shared memory" in dev.error
    finally:
        dev.close()
