"""virtio-vsock, host <-> guest stream sockets (OASIS virtio 1.2, section 5.10), bridged to
Unix sockets on the host the way Firecracker does it (this host has no ``/dev/vhost-vsock``,
and the bridge needs no privileges).

Device: type 19; queues rx (0, device -> driver), tx (1, driver -> device) and event (2, never
used: no transport reset is ever reported); feature VIRTIO_VSOCK_F_STREAM (0) offered (a driver
that takes no feature bit gets stream sockets too, section 5.10.3); configuration space
``guest_cid`` le64 @0. The host is CID 2 (VMADDR_CID_HOST).

Every packet starts with the 44-byte little-endian header (section 5.10.6)::

    src_cid u64, dst_cid u64, src_port u32, dst_port u32, len u32, type u16, op u16,
    flags u32, buf_alloc u32, fwd_cnt u32

Only VIRTIO_VSOCK_TYPE_STREAM (1). Credit (section 5.10.6.3): each side tells the other its
receive buffer (``buf_alloc``) and the bytes its application has consumed (``fwd_cnt``, free
running); a sender may have at most ``peer_buf_alloc - (tx_cnt - peer_fwd_cnt)`` bytes in flight.

Host side (Firecracker's vsock design):

* the VMM listens on the Unix socket ``uds_path``. A host process connects and writes
  ``CONNECT <port>\\n``; the device picks a host port (from 2^30 up), sends OP_REQUEST to guest
  port ``port``, and when the guest answers OP_RESPONSE writes ``OK <host_port>\\n`` to the Unix
  connection, which then carries the stream both ways. The guest answering OP_RST, or not
  answering in :data:`REQUEST_TIMEOUT` seconds, closes the Unix connection;
* a guest connection to host port P (OP_REQUEST, dst_cid 2) is connected to the Unix socket
  ``<uds_path>_<P>``, which a host process listens on; no listener there: OP_RST.

Bounds, each counted (:meth:`VirtioVsock.counters`), never an error of the VMM:

* at most ``max_connections`` Unix connections (those still writing their CONNECT line
  included); past it the connection is closed at once (``host_rejected``) or the guest's
  OP_REQUEST gets OP_RST (``guest_refused``);
* a CONNECT line longer than :data:`CONNECT_LINE_MAX` bytes, not of the form above, or not
  finished in :data:`HANDSHAKE_TIMEOUT` seconds closes that connection (``host_rejected``);
* bytes from the guest wait for the Unix side in a buffer the credit bounds: the device
  advertises ``buf_alloc`` bytes per connection and a guest that sends more than it was granted
  gets OP_RST (``tx_credit_violation``); bytes from the Unix side are read only while the
  guest has credit, at most :data:`STAGE_MAX` ahead of a receive buffer (the rest waits in the
  kernel's socket buffer);
* a packet with a header too short or a ``len`` past its payload or past
  :data:`MAX_PKT_PAYLOAD` (``tx_malformed``), from another CID or not to the host
  (``tx_bad_cid``), of another type or an unknown op (``tx_unknown_op``), for no known
  connection (``tx_unknown_connection``) gets OP_RST unless it was one; a packet for a
  connection closed less than :data:`CLOSE_TIMEOUT` ago (a Linux guest's last credit update
  after both sides shut down, say) is taken in silence (``tx_after_close``, not a drop; at most
  :data:`RECENT_MAX` such connections are remembered). OP_RSTs for no
  connection wait in a list of :data:`RST_QUEUE_MAX`; past it they are dropped
  (``rst_dropped``). A receive buffer smaller than a header is returned empty
  (``rx_dropped_small_buffer``);
* chains that break the ring rules (:class:`~.queue.QueueError`) set DEVICE_NEEDS_RESET.

Threads: one host thread per device (:class:`~.hostthread.HostThreadDevice`: started at the
first DRIVER_OK, stopped by :meth:`VirtioVsock.close`) polls the listener, every Unix connection and an eventfd the driver's
notifications write, and does all queue work under the device's lock; it raises interrupts after
letting that lock go. A device reset closes every connection (from that thread). The listener's
socket file is removed by :meth:`~VirtioVsock.close`.
"""
from __future__ import annotations

import os
import select
import socket
import stat
import struct
import time

from ...errors import PykvmError
from .hostthread import HostThreadDevice
from .queue import QueueError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Dict, List, Optional, Tuple, Union

ID_VSOCK = 19
F_STREAM, F_SEQPACKET = 0, 1
RXQ, TXQ, EVQ = 0, 1, 2
HOST_CID = 2
CID_MIN, CID_MAX = 3, 0xFFFFFFFE        # 0-2 are reserved, 0xFFFFFFFF is VMADDR_CID_ANY

HDR = struct.Struct("<QQIIIHHIII")
HDR_LEN = HDR.size                      # 44
TYPE_STREAM, TYPE_SEQPACKET = 1, 2
(OP_INVALID, OP_REQUEST, OP_RESPONSE, OP_RST, OP_SHUTDOWN, OP_RW, OP_CREDIT_UPDATE,
 OP_CREDIT_REQUEST) = range(8)
SHUTDOWN_RCV, SHUTDOWN_SEND = 1, 2
OP_NAMES = {OP_INVALID: "INVALID", OP_REQUEST: "REQUEST", OP_RESPONSE: "RESPONSE",
            OP_RST: "RST", OP_SHUTDOWN: "SHUTDOWN", OP_RW: "RW",
            OP_CREDIT_UPDATE: "CREDIT_UPDATE", OP_CREDIT_REQUEST: "CREDIT_REQUEST"}

MAX_PKT_PAYLOAD = 64 << 10              # Linux's VIRTIO_VSOCK_MAX_PKT_BUF_SIZE
BUF_ALLOC = 256 << 10                   # receive buffer advertised per connection (bytes)
BUF_ALLOC_MIN, BUF_ALLOC_MAX = 4096, 16 << 20
STAGE_MAX = 64 << 10                    # Unix bytes read ahead of a receive buffer, per conn
MAX_CONNECTIONS = 64
MAX_CONNECTIONS_LIMIT = 1024
RST_QUEUE_MAX = 256
CONNECT_LINE_MAX = 32                   # "CONNECT 4294967295\n" is 19
HANDSHAKE_TIMEOUT = 10.0                # seconds for a host process to write its CONNECT line
REQUEST_TIMEOUT = 2.0                   # seconds for the guest to answer an OP_REQUEST
CLOSE_TIMEOUT = 2.0                     # seconds for the guest's OP_RST after our SHUTDOWN
LOCAL_PORT_BASE = 1 << 30               # host ports for host-initiated connections
SUN_PATH_MAX = 107                      # sizeof(sun_path) - 1
TX_BATCH = 256                          # chains taken from the tx queue per round at most
RECENT_MAX = 256                        # closed connections whose late packets are ignored

_COUNTERS = ("connections_host", "connections_guest", "host_rejected", "guest_refused",
             "rx_packets", "rx_bytes", "tx_packets", "tx_bytes", "resets_sent",
             "resets_received", "timeouts", "tx_malformed", "tx_bad_cid", "tx_unknown_op",
             "tx_unknown_connection", "tx_credit_violation", "rst_dropped",
             "rx_dropped_small_buffer", "tx_after_close")
DROPS = ("tx_malformed", "tx_bad_cid", "tx_unknown_op", "tx_unknown_connection",
          "tx_credit_violation", "rst_dropped", "rx_dropped_small_buffer")


class VsockError(PykvmError, ValueError):
    """A vsock device cannot be set up (a bad CID, a bad or busy socket path, a bad option):
    one line naming what and why."""


class Header:
    """One packet header (module docstring), fields by their spec names."""

    __slots__ = ("src_cid", "dst_cid", "src_port", "dst_port", "len", "type", "op", "flags",
                 "buf_alloc", "fwd_cnt")

    def __init__(self, src_cid: int = 0, dst_cid: int = 0, src_port: int = 0,
                 dst_port: int = 0, len: int = 0, type: int = TYPE_STREAM,
                 op: int = OP_INVALID, flags: int = 0, buf_alloc: int = 0, fwd_cnt: int = 0):
        self.src_cid, self.dst_cid = src_cid, dst_cid
        self.src_port, self.dst_port = src_port, dst_port
        self.len, self.type, self.op, self.flags = len, type, op, flags
        self.buf_alloc, self.fwd_cnt = buf_alloc, fwd_cnt

    def pack(self) -> bytes:
        """The 44 little-endian bytes (every field masked to its width)."""
        return HDR.pack(self.src_cid & (2**64 - 1), self.dst_cid & (2**64 - 1),
                        self.src_port & 0xFFFFFFFF, self.dst_port & 0xFFFFFFFF,
                        self.len & 0xFFFFFFFF, self.type & 0xFFFF, self.op & 0xFFFF,
                        self.flags & 0xFFFFFFFF, self.buf_alloc & 0xFFFFFFFF,
                        self.fwd_cnt & 0xFFFFFFFF)

    @classmethod
    def unpack(cls, data: bytes) -> Header:
        """The header in the first 44 bytes of ``data``; ValueError when shorter."""
        if len(data) < HDR_LEN:
            raise ValueError(f"a vsock header is {HDR_LEN} bytes, got {len(data)}")
        return cls(*HDR.unpack_from(data))

    def __repr__(self) -> str:
        return (f"Header({OP_NAMES.get(self.op, self.op)} {self.src_cid}:{self.src_port} -> "
                f"{self.dst_cid}:{self.dst_port} len={self.len} type={self.type} "
                f"flags={self.flags} buf_alloc={self.buf_alloc} fwd_cnt={self.fwd_cnt})")


class Credit:
    """The credit bookkeeping of one connection (section 5.10.6.3), both directions, in free
    running 32-bit counters. ``buf_alloc``: the receive buffer the device advertises.

    Towards the guest: :meth:`peer_free` bytes may be sent (the guest's ``buf_alloc`` minus what
    is in flight), :meth:`sent` counts them. From the guest: :meth:`may_receive` checks a
    packet against the credit last *advertised* (``buf_alloc - (rx_cnt - fwd_cnt_sent)``),
    :meth:`received` / :meth:`forwarded` count bytes in and out of the device's buffer, and
    :meth:`advertise` returns the ``(buf_alloc, fwd_cnt)`` of an outgoing header, which the
    guest then knows. :meth:`wants_update` says when the guest's view of the free space is
    under half of ``buf_alloc`` while more has been forwarded since (a CREDIT_UPDATE is due)."""

    __slots__ = ("buf_alloc", "peer_buf_alloc", "peer_fwd_cnt", "tx_cnt", "rx_cnt", "fwd_cnt",
                 "fwd_cnt_sent")

    def __init__(self, buf_alloc: int):
        self.buf_alloc = buf_alloc
        self.peer_buf_alloc = 0
        self.peer_fwd_cnt = 0
        self.tx_cnt = 0
        self.rx_cnt = 0
        self.fwd_cnt = 0
        self.fwd_cnt_sent = 0

    def update_peer(self, buf_alloc: int, fwd_cnt: int) -> None:
        """Take the guest's ``buf_alloc``/``fwd_cnt`` from a header it sent."""
        self.peer_buf_alloc = buf_alloc & 0xFFFFFFFF
        self.peer_fwd_cnt = fwd_cnt & 0xFFFFFFFF

    def peer_free(self) -> int:
        """Bytes the guest can take now (0 when it claims to have consumed more than it was
        sent, or its buffer shrank under what is in flight)."""
        in_flight = (self.tx_cnt - self.peer_fwd_cnt) & 0xFFFFFFFF
        if in_flight > self.peer_buf_alloc:
            return 0
        return self.peer_buf_alloc - in_flight

    def sent(self, n: int) -> None:
        self.tx_cnt = (self.tx_cnt + n) & 0xFFFFFFFF

    def may_receive(self, n: int) -> bool:
        """Whether ``n`` more bytes from the guest stay within the credit advertised."""
        used = (self.rx_cnt - self.fwd_cnt_sent) & 0xFFFFFFFF
        return used + n <= self.buf_alloc

    def received(self, n: int) -> None:
        self.rx_cnt = (self.rx_cnt + n) & 0xFFFFFFFF

    def forwarded(self, n: int) -> None:
        self.fwd_cnt = (self.fwd_cnt + n) & 0xFFFFFFFF

    def buffered(self) -> int:
        """Bytes received from the guest and not yet forwarded."""
        return (self.rx_cnt - self.fwd_cnt) & 0xFFFFFFFF

    def advertise(self) -> Tuple[int, int]:
        """(buf_alloc, fwd_cnt) for an outgoing header; the guest knows them from now on."""
        self.fwd_cnt_sent = self.fwd_cnt
        return self.buf_alloc, self.fwd_cnt

    def wants_update(self) -> bool:
        if self.fwd_cnt == self.fwd_cnt_sent:
            return False
        seen_free = self.buf_alloc - ((self.rx_cnt - self.fwd_cnt_sent) & 0xFFFFFFFF)
        return seen_free < self.buf_alloc // 2


def parse_connect_line(line: bytes) -> int:
    """The port of a ``CONNECT <port>\\n`` line (decimal, 0..2^32-1, no sign, spaces or
    leading zeros beyond one digit). Raises ValueError naming what is wrong."""
    if not line.endswith(b"\n") or not line.startswith(b"CONNECT "):
        raise ValueError(f"not a CONNECT line: {line[:CONNECT_LINE_MAX]!r}")
    digits = line[len(b"CONNECT "):-1]
    if not digits.isdigit() or not digits.isascii() or (len(digits) > 1 and digits[:1] == b"0"):
        raise ValueError(f"bad port in CONNECT line: {digits[:16]!r}")
    port = int(digits)
    if port > 0xFFFFFFFF:
        raise ValueError(f"port {port} does not fit 32 bits")
    return port


# connection states
CONNECTING, ESTABLISHED, CLOSING = "connecting", "established", "closing"


class _Pending:
    """A host process connected to ``uds_path`` that has not finished its CONNECT line."""

    __slots__ = ("sock", "line", "deadline")

    def __init__(self, sock: socket.socket, deadline: float):
        self.sock = sock
        self.line = b""
        self.deadline = deadline


class _Conn:
    """One stream connection: ``host_port``/``guest_port``, the Unix socket, the state, the
    credit, bytes waiting for the Unix side (``out``; ``out_uncounted`` leading bytes of it are
    our own ``OK`` line, not the guest's) and bytes read from it ahead of a receive buffer
    (``stage``), and what must still be sent to the guest."""

    __slots__ = ("host_port", "guest_port", "sock", "state", "credit", "out", "out_uncounted",
                 "stage", "host_eof", "host_hup", "guest_shut", "shut_wr_done", "need_request",
                 "need_response", "need_credit", "need_shutdown", "deadline", "readable",
                 "host_initiated")

    def __init__(self, host_port: int, guest_port: int, sock: socket.socket, state: str,
                 buf_alloc: int, host_initiated: bool):
        self.host_port, self.guest_port = host_port, guest_port
        self.sock = sock
        self.state = state
        self.credit = Credit(buf_alloc)
        self.out = bytearray()
        self.out_uncounted = 0
        self.stage = bytearray()
        self.host_eof = False            # the Unix side sent EOF (read returned 0)
        self.host_hup = False            # ... and closed both ways
        self.guest_shut = 0              # SHUTDOWN flags the guest sent
        self.shut_wr_done = False
        self.need_request = False
        self.need_response = False
        self.need_credit = False
        self.need_shutdown = 0           # flags of a SHUTDOWN still to send
        self.deadline: Optional[float] = None
        self.readable = False            # poll said POLLIN and the last read did not drain
        self.host_initiated = host_initiated

    @property
    def key(self) -> Tuple[int, int]:
        return self.host_port, self.guest_port


class VsockSpec:
    """What a vsock device is asked for: ``cid`` (the guest's CID, 3..2^32-2) and ``uds`` (the
    path of the Unix socket the VMM listens on; guest connections to host port P go to
    ``<uds>_<P>``). Raises :class:`VsockError` for a bad value."""

    __slots__ = ("cid", "uds")

    def __init__(self, cid: int, uds: Union[str, os.PathLike]):
        if not isinstance(cid, int) or isinstance(cid, bool) or not CID_MIN <= cid <= CID_MAX:
            raise VsockError(f"guest CID {cid!r} must be an integer in {CID_MIN}..{CID_MAX}")
        if not isinstance(uds, (str, os.PathLike)):
            raise VsockError(f"the vsock socket path must be a path, not {uds!r}")
        path = os.fspath(uds)
        if not isinstance(path, str) or not path or "\0" in path:
            raise VsockError(f"bad vsock socket path {uds!r}")
        if len(os.fsencode(path)) + 11 > SUN_PATH_MAX:      # room for "_4294967295"
            raise VsockError(f"{path}: a vsock socket path must be at most "
                             f"{SUN_PATH_MAX - 11} bytes (Unix socket paths are short)")
        self.cid = cid
        self.uds = path

    def __repr__(self) -> str:
        return f"VsockSpec(cid={self.cid}, uds={self.uds!r})"

    @classmethod
    def parse(cls, spec: str) -> VsockSpec:
        """From the command-line form ``cid=N,uds=PATH`` (Firecracker's ``guest_cid`` and
        ``uds_path``, also accepted under those names; a comma in PATH is written ``,,``).
        Raises :class:`VsockError`."""
        usage = "a vsock is cid=N,uds=PATH"
        if not isinstance(spec, str) or not spec:
            raise VsockError(f"{usage}, not {spec!r}")
        seen: Dict[str, str] = {}
        for part in (p.replace("\0", ",") for p in spec.replace(",,", "\0").split(",")):
            key, eq, val = part.partition("=")
            key = {"guest_cid": "cid", "guest-cid": "cid", "uds_path": "uds"}.get(key, key)
            if not eq or key not in ("cid", "uds"):
                raise VsockError(f"unknown vsock option {part!r} ({usage}; a comma in PATH is "
                                 "written ,,)")
            if key in seen:
                raise VsockError(f"vsock: {key}= given twice")
            seen[key] = val
        for key in ("cid", "uds"):
            if key not in seen:
                raise VsockError(f"vsock: {key}= is missing ({usage})")
        if not seen["cid"].isdigit() or not seen["cid"].isascii():
            raise VsockError(f"vsock: cid={seen['cid']} must be an integer in "
                             f"{CID_MIN}..{CID_MAX}")
        return cls(int(seen["cid"]), seen["uds"])


def _listen(path: str) -> Tuple[socket.socket, Tuple[int, int]]:
    """A listening Unix socket bound at ``path`` and its file's (st_dev, st_ino). A socket file
    there that nobody listens on (left by a VMM that died) is replaced; anything else there is
    refused. Raises :class:`VsockError`."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    except OSError as e:
        raise VsockError(f"{path}: {e.strerror}") from None
    if st is not None:
        if not stat.S_ISSOCK(st.st_mode):
            raise VsockError(f"{path} exists and is not a socket (remove it or choose another "
                             "vsock path)")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            probe.settimeout(1)
            probe.connect(path)
        except (ConnectionRefusedError, FileNotFoundError):
            try:
                os.unlink(path)                 # stale: nobody listens
            except FileNotFoundError:
                pass
        except OSError:
            pass
        else:
            raise VsockError(f"{path}: another process listens on this vsock socket")
        finally:
            probe.close()
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC
                      | socket.SOCK_NONBLOCK)
    try:
        s.bind(path)
        st = os.lstat(path)
        s.listen(16)
    except OSError as e:
        s.close()
        raise VsockError(f"{path}: cannot listen there: {e.strerror or e}") from None
    return s, (st.st_dev, st.st_ino)


class VirtioVsock(HostThreadDevice):
    """A virtio-vsock device bridged to Unix sockets (module docstring). ``cid``: the guest's
    CID (3..2^32-2); ``uds``: the socket path the device listens on (created here; a stale
    socket file is replaced, anything else refused); ``max_connections``: Unix connections at
    once (1..1024); ``buf_alloc``: bytes of receive buffer advertised per connection
    (4 KiB..16 MiB). Raises :class:`VsockError` (a ValueError). Attributes ``cid``, ``uds``."""

    device_id = ID_VSOCK
    num_queues = 3
    thread_name = "virtio-vsock"
    wake_queues = (RXQ, TXQ)                # the event queue is never used

    def __init__(self, cid: int, uds: Union[str, os.PathLike], *,
                 max_connections: int = MAX_CONNECTIONS, buf_alloc: int = BUF_ALLOC):
        spec = VsockSpec(cid, uds)
        for name, v, lo, hi in (("max_connections", max_connections, 1, MAX_CONNECTIONS_LIMIT),
                                ("buf_alloc", buf_alloc, BUF_ALLOC_MIN, BUF_ALLOC_MAX)):
            if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
                raise VsockError(f"vsock {name} {v!r} must be an integer in {lo}..{hi}")
        self.cid = spec.cid
        self.uds = spec.uds
        self.max_connections = max_connections
        self.buf_alloc = buf_alloc
        super().__init__()
        self._drop_all = False                  # a reset asked the thread to close everything
        self._rx_starved = False                # the rx queue had no buffer: wait for a notify
        self._pending: List[_Pending] = []
        self._conns: Dict[Tuple[int, int], _Conn] = {}
        self._recent: Dict[Tuple[int, int], float] = {}   # closed key -> when to forget it
        self._rsts: List[bytes] = []            # RST headers for no connection
        self._next_port = LOCAL_PORT_BASE
        self._accept_hold = 0.0                 # accept() failed (no fds): not before this
        self._count: Dict[str, int] = dict.fromkeys(_COUNTERS, 0)
        try:
            self._listener, self._uds_id = _listen(self.uds)
        except BaseException:
            os.close(self._evfd)
            raise

    def __repr__(self) -> str:
        return f"VirtioVsock(cid={self.cid}, uds={self.uds!r})"

    # ---- features and configuration ----------------------------------------------------

    def device_features(self) -> int:
        """VIRTIO_VSOCK_F_STREAM."""
        return 1 << F_STREAM

    def config_read(self, offset: int, size: int) -> int:
        """Bytes of ``guest_cid`` (le64 @0); past it 0."""
        if offset < 0 or size <= 0:
            return 0
        return int.from_bytes(struct.pack("<Q", self.cid)[offset:offset + size], "little")

    # ---- lifecycle -------------------------------------------------------------------

    # activate() takes the queues and starts the thread (once); reset() drops the queues and
    # every connection is closed (by the thread, or by close()); close() stops the thread,
    # closes every connection and the listener, removes the listener's socket file (if it is
    # still ours) and closes the eventfd (HostThreadDevice).

    def _activated(self, features: int) -> None:
        self._rx_starved = False

    def _reset_locked(self) -> None:
        self._drop_all = True

    def _release(self) -> None:
        with self._lock:
            self._close_all()
        try:
            st = os.lstat(self.uds)
            if (st.st_dev, st.st_ino) == self._uds_id:
                os.unlink(self.uds)
        except OSError:
            pass
        self._listener.close()

    def counters(self) -> Dict[str, int]:
        """Connections, packets and payload bytes each way (rx: to the guest, tx: from it),
        resets, timeouts and drops by reason (module docstring), plus ``connections_active``
        (open now, CONNECT lines being written included) and ``dropped`` (the drops summed)."""
        with self._lock:
            c = dict(self._count)
            c["connections_active"] = len(self._conns) + len(self._pending)
        c["dropped"] = sum(c[k] for k in DROPS)
        return c

    # ---- the thread ------------------------------------------------------------------

    def _poll_set(self) -> Tuple[Dict[int, int], Optional[int]]:
        """{fd: events} to wait for and the poll timeout (ms; None: none) from the nearest
        deadline."""
        fds: Dict[int, int] = {}
        deadlines: List[float] = []
        if self._drop_all:
            return fds, 0
        if time.monotonic() >= self._accept_hold:
            fds[self._listener.fileno()] = select.POLLIN
        else:
            deadlines.append(self._accept_hold)
        for p in self._pending:
            fds[p.sock.fileno()] = select.POLLIN
            deadlines.append(p.deadline)
        for c in self._conns.values():
            mask = 0
            if c.state == ESTABLISHED and not c.readable and not c.host_eof \
                    and not c.guest_shut & SHUTDOWN_RCV and not self._rx_starved \
                    and len(c.stage) < STAGE_MAX and c.credit.peer_free() > len(c.stage):
                mask |= select.POLLIN
            if c.out:
                mask |= select.POLLOUT
            if not c.host_hup:                   # POLLHUP cannot be masked: once is enough
                fds[c.sock.fileno()] = mask
            if c.deadline is not None:
                deadlines.append(c.deadline)
        if not deadlines:
            return fds, None
        return fds, max(0, int((min(deadlines) - time.monotonic()) * 1000) + 1)

    def _pump(self, ready: Dict[int, int], woken: bool = True) -> None:
        """One round: accept, read CONNECT lines, move bytes to the Unix side, take the guest's
        packets, fill receive buffers, expire deadlines; then the interrupts (outside the
        lock)."""
        irq: List[int] = []
        failed = False
        with self._lock:
            if self._drop_all:
                self._drop_all = False
                self._close_all()
            if woken:
                self._rx_starved = False          # a notification: maybe new receive buffers
            h = self._handles
            now = time.monotonic()
            try:
                if self._listener.fileno() in ready:
                    self._accept(now)
                for p in list(self._pending):
                    if p.sock.fileno() in ready:
                        self._handshake(p)
                    elif p.deadline <= now:
                        self._reject(p, timeout=True)
                for c in list(self._conns.values()):
                    got = ready.get(c.sock.fileno(), 0)
                    if got & select.POLLIN:
                        c.readable = True
                    if got & (select.POLLHUP | select.POLLERR):
                        c.host_hup = True
                        c.readable = True
                        if c.state != ESTABLISHED:    # nothing more to say to the guest
                            self._kill(c, rst=not c.need_request)
                            continue
                    if c.out:
                        self._flush(c)
                    if self._conns.get(c.key) is c and c.deadline is not None \
                            and c.deadline <= now:
                        self._count["timeouts"] += 1
                        self._kill(c, rst=True)
                if self._transmit():
                    irq.append(TXQ)
                if self._deliver():
                    irq.append(RXQ)
            except QueueError:
                self._broken = failed = True
        self._signal(h, failed, irq)

    # ---- the Unix side ---------------------------------------------------------------

    def _close_all(self) -> None:
        for p in self._pending:
            p.sock.close()
        self._pending.clear()
        for c in self._conns.values():
            c.sock.close()
        self._conns.clear()
        self._rsts.clear()

    def _room(self) -> bool:
        return len(self._conns) + len(self._pending) < self.max_connections

    def _accept(self, now: float) -> None:
        for _ in range(self.max_connections + 1):
            try:
                s, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:                       # EMFILE and the like: try again later
                self._accept_hold = now + 0.1
                return
            if not self._room() or self._queues[RXQ] is None:
                self._count["host_rejected"] += 1
                s.close()
                continue
            s.setblocking(False)
            self._pending.append(_Pending(s, now + HANDSHAKE_TIMEOUT))

    def _reject(self, p: _Pending, timeout: bool = False) -> None:
        self._pending.remove(p)
        p.sock.close()
        self._count["timeouts" if timeout else "host_rejected"] += 1

    def _handshake(self, p: _Pending) -> None:
        """Read what there is of the CONNECT line (never past its newline)."""
        try:
            peek = p.sock.recv(CONNECT_LINE_MAX - len(p.line), socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            return self._reject(p)
        if not peek:
            return self._reject(p)                # closed before a whole line
        nl = peek.find(b"\n")
        take = nl + 1 if nl >= 0 else len(peek)
        try:
            p.line += p.sock.recv(take)
        except OSError:
            return self._reject(p)
        if nl < 0:
            if len(p.line) >= CONNECT_LINE_MAX:
                self._reject(p)                   # too long
            return
        try:
            port = parse_connect_line(p.line)
        except ValueError:
            return self._reject(p)
        if self._queues[RXQ] is None or self._broken:
            return self._reject(p)                # no driver to ask
        self._pending.remove(p)
        hp = self._alloc_port(port)
        c = _Conn(hp, port, p.sock, CONNECTING, self.buf_alloc, True)
        c.need_request = True
        c.deadline = time.monotonic() + REQUEST_TIMEOUT
        self._conns[c.key] = c
        self._count["connections_host"] += 1

    def _alloc_port(self, guest_port: int) -> int:
        while True:
            hp = self._next_port
            self._next_port = hp + 1 if hp < 0xFFFFFFFE else LOCAL_PORT_BASE
            if (hp, guest_port) not in self._conns:
                return hp

    def _flush(self, c: _Conn) -> None:
        """Write what waits for the Unix side; the guest's bytes that leave count as
        forwarded. A dead Unix side resets the connection."""
        while c.out:
            try:
                n = c.sock.send(c.out, socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                self._kill(c, rst=True)
                return
            del c.out[:n]
            ours = min(n, c.out_uncounted)
            c.out_uncounted -= ours
            c.credit.forwarded(n - ours)
        if c.credit.wants_update():
            c.need_credit = True
        self._maybe_shut_wr(c)

    def _maybe_shut_wr(self, c: _Conn) -> None:
        """The guest will send no more and all it sent is out: half-close the Unix side; if
        the guest also receives no more, the connection is done (RST, as Linux does)."""
        if c.out or not c.guest_shut & SHUTDOWN_SEND or self._conns.get(c.key) is not c:
            return
        if c.guest_shut & SHUTDOWN_RCV or c.host_hup or (c.state == CLOSING and not c.stage):
            self._kill(c, rst=True)
            return
        if not c.shut_wr_done:
            c.shut_wr_done = True
            try:
                c.sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass

    def _forget(self, c: _Conn) -> None:
        """Drop the connection, remembering its key for :data:`CLOSE_TIMEOUT` seconds."""
        self._conns.pop(c.key, None)
        c.sock.close()
        now = time.monotonic()
        if len(self._recent) >= RECENT_MAX:
            self._recent = {k: t for k, t in self._recent.items() if t > now}
            while len(self._recent) >= RECENT_MAX:
                self._recent.pop(next(iter(self._recent)))
        self._recent[c.key] = now + CLOSE_TIMEOUT

    def _kill(self, c: _Conn, rst: bool) -> None:
        """Close the connection; with ``rst`` tell the guest with OP_RST."""
        self._forget(c)
        if rst:
            self._queue_rst(HOST_CID, self.cid, c.host_port, c.guest_port)

    def _queue_rst(self, src_cid: int, dst_cid: int, src_port: int, dst_port: int) -> None:
        if len(self._rsts) >= RST_QUEUE_MAX:
            self._count["rst_dropped"] += 1
            return
        self._rsts.append(Header(src_cid, dst_cid, src_port, dst_port, 0, TYPE_STREAM, OP_RST,
                                 0, 0, 0).pack())

    # ---- guest -> host ---------------------------------------------------------------

    def _transmit(self) -> bool:
        """Take the guest's packets (at most :data:`TX_BATCH` per round); whether the driver
        wants an interrupt."""
        q = self._queues[TXQ]
        if q is None or self._broken:
            return False
        pushed = False
        for _ in range(TX_BATCH):
            chain = q.pop()
            if chain is None:
                break
            try:
                self._packet(chain)
            finally:
                q.push(chain, 0)
            pushed = True
        else:
            self._kick()                           # come back for the rest
        return pushed and q.needs_interrupt()

    def _reply_rst(self, h: Header) -> None:
        """OP_RST for a packet (never for an OP_RST): to the guest, ports swapped."""
        if h.op != OP_RST:
            self._queue_rst(HOST_CID, self.cid, h.dst_port, h.src_port)

    def _packet(self, chain) -> None:
        cnt = self._count
        if chain.readable_len < HDR_LEN:
            cnt["tx_malformed"] += 1
            return
        h = Header.unpack(chain.read(0, HDR_LEN))
        payload_room = chain.readable_len - HDR_LEN
        if h.len > payload_room or h.len > MAX_PKT_PAYLOAD:
            cnt["tx_malformed"] += 1
            return self._reply_rst(h)
        if h.src_cid != self.cid or h.dst_cid != HOST_CID:
            cnt["tx_bad_cid"] += 1
            return self._reply_rst(h)
        if h.type != TYPE_STREAM or not OP_REQUEST <= h.op <= OP_CREDIT_REQUEST:
            cnt["tx_unknown_op"] += 1
            return self._reply_rst(h)
        cnt["tx_packets"] += 1
        key = (h.dst_port, h.src_port)
        c = self._conns.get(key)
        if h.op == OP_REQUEST:
            return self._guest_connect(h, c)
        if c is None:
            gone = self._recent.get(key)
            if gone is not None and gone > time.monotonic():
                cnt["tx_after_close"] += 1                # late, not hostile: no RST either
                return
            if h.op != OP_RST:
                cnt["tx_unknown_connection"] += 1
                self._reply_rst(h)
            return
        c.credit.update_peer(h.buf_alloc, h.fwd_cnt)
        if h.op == OP_RST:
            cnt["resets_received"] += 1
            self._kill(c, rst=False)
        elif h.op == OP_RESPONSE:
            if c.state != CONNECTING or c.need_request:
                cnt["tx_unknown_op"] += 1
                return self._kill(c, rst=True)
            c.state = ESTABLISHED
            c.deadline = None
            line = f"OK {c.host_port}\n".encode()
            c.out += line
            c.out_uncounted += len(line)
            self._flush(c)
        elif c.state == CONNECTING:
            cnt["tx_unknown_op"] += 1                     # anything but RESPONSE/RST now
            self._kill(c, rst=True)
        elif h.op == OP_RW:
            if c.guest_shut & SHUTDOWN_SEND:
                cnt["tx_unknown_op"] += 1                 # data after its own SHUTDOWN
                return self._kill(c, rst=True)
            if not c.credit.may_receive(h.len):
                cnt["tx_credit_violation"] += 1
                return self._kill(c, rst=True)
            data = chain.read(HDR_LEN, h.len)
            c.credit.received(len(data))
            cnt["tx_bytes"] += len(data)
            if c.state == CLOSING and c.host_hup:
                c.credit.forwarded(len(data))             # nobody to give them to
            else:
                c.out += data
                self._flush(c)
        elif h.op == OP_SHUTDOWN:
            c.guest_shut |= h.flags & (SHUTDOWN_RCV | SHUTDOWN_SEND)
            self._maybe_shut_wr(c)
        elif h.op == OP_CREDIT_UPDATE:
            pass                                          # update_peer above did it
        elif h.op == OP_CREDIT_REQUEST:
            c.need_credit = True

    def _guest_connect(self, h: Header, c: Optional[_Conn]) -> None:
        """OP_REQUEST from the guest to host port ``dst_port``: connect ``<uds>_<port>``."""
        cnt = self._count
        if c is not None:                                 # the pair is in use
            cnt["guest_refused"] += 1
            self._kill(c, rst=True)
            return
        if not self._room():
            cnt["guest_refused"] += 1
            return self._reply_rst(h)
        path = f"{self.uds}_{h.dst_port}"
        try:                                              # EMFILE too: refused, not a dead thread
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC
                              | socket.SOCK_NONBLOCK)
        except OSError:
            cnt["guest_refused"] += 1
            return self._reply_rst(h)
        try:
            s.connect(path)
        except OSError:
            s.close()
            cnt["guest_refused"] += 1
            return self._reply_rst(h)
        c = _Conn(h.dst_port, h.src_port, s, ESTABLISHED, self.buf_alloc, False)
        c.credit.update_peer(h.buf_alloc, h.fwd_cnt)
        c.need_response = True
        self._conns[c.key] = c
        cnt["connections_guest"] += 1

    # ---- host -> guest ---------------------------------------------------------------

    def _read_unix(self, c: _Conn) -> None:
        """Read from the Unix side into the stage while the guest has credit for it."""
        want = min(STAGE_MAX - len(c.stage), c.credit.peer_free() - len(c.stage))
        if want <= 0 or not c.readable or c.host_eof or c.guest_shut & SHUTDOWN_RCV:
            return
        try:
            data = c.sock.recv(want, socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            c.readable = False
            return
        except OSError:
            self._kill(c, rst=True)
            return
        if not data:
            c.readable = False
            c.host_eof = True
            return
        c.stage += data

    def _ready(self, c: _Conn) -> bool:
        """Whether connection ``c`` has a packet for the guest now (reads the Unix side into
        the stage first, within the guest's credit)."""
        if c.need_request or c.need_response:
            return True
        if c.state == CONNECTING:
            return False
        self._read_unix(c)
        if c.key not in self._conns:
            return False
        if c.stage and c.credit.peer_free() > 0:
            return True
        return c.need_credit or (c.host_eof and not c.stage and c.state == ESTABLISHED)

    def _build(self, c: _Conn, room: int) -> Tuple[Header, bytes]:
        """The packet :meth:`_ready` promised, its payload at most ``room`` bytes."""
        base = dict(src_cid=HOST_CID, dst_cid=self.cid, src_port=c.host_port,
                    dst_port=c.guest_port, type=TYPE_STREAM)
        if c.need_request:
            c.need_request = False
            return Header(op=OP_REQUEST, **base), b""
        if c.need_response:
            c.need_response = False
            return Header(op=OP_RESPONSE, **base), b""
        n = min(room, len(c.stage), c.credit.peer_free())
        if n > 0:
            data = bytes(c.stage[:n])
            del c.stage[:n]
            c.credit.sent(n)
            c.need_credit = False                         # the header carries it
            return Header(op=OP_RW, len=n, **base), data
        if c.need_credit or c.stage:
            c.need_credit = False
            return Header(op=OP_CREDIT_UPDATE, **base), b""
        # the Unix side sent EOF: we send no more. Closed both ways: the guest should answer
        # with OP_RST soon; half-closed: it may still send (an answer to a request)
        if c.guest_shut & SHUTDOWN_SEND and not c.out:   # both sides are done: the end
            self._forget(c)
            return Header(op=OP_RST, **base), b""
        c.state = CLOSING
        flags = SHUTDOWN_SEND
        if c.host_hup:
            flags |= SHUTDOWN_RCV
            c.deadline = time.monotonic() + CLOSE_TIMEOUT
        return Header(op=OP_SHUTDOWN, flags=flags, **base), b""

    def _take_chain(self, q) -> Optional[Any]:
        """The next receive chain big enough for a header (smaller ones are returned empty and
        counted), or None (the queue is starved until the driver notifies)."""
        while True:
            chain = q.pop()
            if chain is None:
                self._rx_starved = True
                return None
            if chain.writable_len >= HDR_LEN:
                return chain
            self._count["rx_dropped_small_buffer"] += 1
            q.push(chain, 0)

    def _deliver(self) -> bool:
        """Fill receive buffers: waiting RSTs first, then each connection's next packet in
        turn, until no packet or no buffer is left; whether the driver wants an interrupt."""
        q = self._queues[RXQ]
        if q is None or self._broken:
            return False
        cnt = self._count
        start = q.used_idx
        progress = True
        while progress and not self._rx_starved:
            progress = False
            while self._rsts:
                chain = self._take_chain(q)
                if chain is None:
                    break
                chain.write(self._rsts.pop(0))
                q.push(chain, HDR_LEN)
                cnt["rx_packets"] += 1
                cnt["resets_sent"] += 1
            for c in list(self._conns.values()):
                if self._rx_starved:
                    break
                if c.key not in self._conns or not self._ready(c):
                    progress = progress or bool(self._rsts)    # it died: its RST goes next
                    continue
                chain = self._take_chain(q)
                if chain is None:
                    break
                h, data = self._build(c, min(chain.writable_len - HDR_LEN, MAX_PKT_PAYLOAD))
                h.buf_alloc, h.fwd_cnt = c.credit.advertise()
                chain.write(h.pack())
                if data:
                    chain.write(data, HDR_LEN)
                q.push(chain, HDR_LEN + len(data))
                cnt["rx_packets"] += 1
                cnt["rx_bytes"] += len(data)
                cnt["resets_sent"] += h.op == OP_RST
                progress = True
        return q.used_idx != start and q.needs_interrupt()
