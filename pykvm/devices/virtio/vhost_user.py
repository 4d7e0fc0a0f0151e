"""The front-end side of the vhost-user protocol (QEMU ``docs/interop/vhost-user.rst``): a device
whose queues are served by another process (the *back-end*, e.g. virtiofsd) that maps guest RAM
itself and talks to the driver's rings directly.

Messages go over a connected Unix stream socket. Each is a 12-byte header — ``request`` u32,
``flags`` u32 (bits 0-1 the version, 1; bit 2 REPLY; bit 3 NEED_REPLY), ``size`` u32 (payload
bytes) — then the payload; file descriptors ride with the header as ``SCM_RIGHTS``. All
little-endian (the host's order on x86_64 and riscv64). What this front end sends:

==========================  ==========================================  ======================
request                     payload                                     reply
==========================  ==========================================  ======================
GET_FEATURES (1)            none                                        u64 virtio features
SET_FEATURES (2)            u64                                         (ack)
SET_OWNER (3)               none                                        (ack)
SET_MEM_TABLE (5)           u32 count, u32 pad, per region: guest        (ack)
                            address, size, front-end address, mmap
                            offset (u64 each); one fd per region
SET_VRING_NUM (8)           vring state: u32 index, u32 num             (ack)
SET_VRING_ADDR (9)          u32 index, u32 flags, u64 desc, used,        (ack)
                            avail, log (front-end virtual addresses)
SET_VRING_BASE (10)         vring state (num: the next avail index)     (ack)
GET_VRING_BASE (11)         vring state                                 vring state
SET_VRING_KICK/CALL (12/13) u64: index, bit 8 = no fd; the eventfd       (ack)
GET_PROTOCOL_FEATURES (15)  none                                        u64
SET_PROTOCOL_FEATURES (16)  u64                                         (ack)
SET_VRING_ENABLE (18)       vring state (num 1 or 0)                    (ack)
==========================  ==========================================  ======================

"(ack)": with the REPLY_ACK protocol feature negotiated every such message sets NEED_REPLY and
the back-end answers a u64, 0 for success; without it nothing comes back. Every reply is awaited
with a timeout (:data:`REPLY_TIMEOUT` seconds by default) and checked — the version, the REPLY
bit, the request it answers, the payload size it must have, and a payload no larger than
:data:`MAX_PAYLOAD` — so a back-end that hangs, dies or answers nonsense gives one
:class:`VhostUserError` naming the request, never a hang or a traceback.

Nothing here knows virtio-fs: :mod:`.fs` drives this for its queues.
"""
from __future__ import annotations

import array
import os
import socket
import struct
import threading

from ...errors import PykvmError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import List, Optional, Sequence, Tuple

# requests (front-end -> back-end)
GET_FEATURES = 1
SET_FEATURES = 2
SET_OWNER = 3
RESET_OWNER = 4
SET_MEM_TABLE = 5
SET_VRING_NUM = 8
SET_VRING_ADDR = 9
SET_VRING_BASE = 10
GET_VRING_BASE = 11
SET_VRING_KICK = 12
SET_VRING_CALL = 13
SET_VRING_ERR = 14
GET_PROTOCOL_FEATURES = 15
SET_PROTOCOL_FEATURES = 16
GET_QUEUE_NUM = 17
SET_VRING_ENABLE = 18

NAMES = {GET_FEATURES: "GET_FEATURES", SET_FEATURES: "SET_FEATURES", SET_OWNER: "SET_OWNER",
         RESET_OWNER: "RESET_OWNER", SET_MEM_TABLE: "SET_MEM_TABLE",
         SET_VRING_NUM: "SET_VRING_NUM", SET_VRING_ADDR: "SET_VRING_ADDR",
         SET_VRING_BASE: "SET_VRING_BASE", GET_VRING_BASE: "GET_VRING_BASE",
         SET_VRING_KICK: "SET_VRING_KICK", SET_VRING_CALL: "SET_VRING_CALL",
         SET_VRING_ERR: "SET_VRING_ERR", GET_PROTOCOL_FEATURES: "GET_PROTOCOL_FEATURES",
         SET_PROTOCOL_FEATURES: "SET_PROTOCOL_FEATURES", GET_QUEUE_NUM: "GET_QUEUE_NUM",
         SET_VRING_ENABLE: "SET_VRING_ENABLE"}

# header flags
VERSION = 0x1
FLAG_VERSION_MASK = 0x3
FLAG_REPLY = 1 << 2
FLAG_NEED_REPLY = 1 << 3

# the virtio feature bit a back-end offers when it has protocol features (bit 30, unused by
# virtio itself)
F_PROTOCOL_FEATURES = 30
# protocol feature bits (GET/SET_PROTOCOL_FEATURES) this front end may use
PROTOCOL_F_MQ = 0
PROTOCOL_F_REPLY_ACK = 3
PROTOCOL_F_CONFIG = 9
WANTED_PROTOCOL_FEATURES = 1 << PROTOCOL_F_REPLY_ACK

VRING_NOFD = 1 << 8                 # SET_VRING_KICK/CALL: no fd comes with the message
MAX_REGIONS = 8                     # VHOST_MEMORY_BASELINE_NREGIONS
MAX_PAYLOAD = 4096                  # larger than any reply this front end expects
REPLY_TIMEOUT = 10.0                # seconds a reply may take

HEADER = struct.Struct("<III")
U64 = struct.Struct("<Q")
VRING_STATE = struct.Struct("<II")
VRING_ADDR = struct.Struct("<IIQQQQ")
REGION = struct.Struct("<QQQQ")
MEM_HEADER = struct.Struct("<II")

# the reply payload sizes of the requests that always answer
_REPLY_SIZE = {GET_FEATURES: U64.size, GET_PROTOCOL_FEATURES: U64.size,
               GET_QUEUE_NUM: U64.size, GET_VRING_BASE: VRING_STATE.size}


class VhostUserError(PykvmError):
    """The back-end did not answer in time, closed the connection, answered what the protocol
    does not allow, or refused a request (a non-zero REPLY_ACK): one line naming the request."""


def request_name(request: int) -> str:
    """``"SET_MEM_TABLE"`` for 5, ``"request 99"`` for a number this module does not know."""
    return NAMES.get(request, f"request {request}")


def encode(request: int, payload: bytes = b"", *, need_reply: bool = False) -> bytes:
    """One front-end message: the header (version 1, NEED_REPLY if asked) and ``payload``.
    Raises ValueError for a payload past :data:`MAX_PAYLOAD` or a request outside u32."""
    if not 0 <= request < 1 << 32:
        raise ValueError(f"vhost-user request {request!r} is not a u32")
    if len(payload) > MAX_PAYLOAD:
        raise ValueError(f"vhost-user payload of {len(payload)} bytes (at most {MAX_PAYLOAD})")
    flags = VERSION | (FLAG_NEED_REPLY if need_reply else 0)
    return HEADER.pack(request, flags, len(payload)) + payload


def decode_header(data: bytes) -> Tuple[int, int, int]:
    """(request, flags, size) of a 12-byte header; raises :class:`VhostUserError` for a short
    header, another version or a size past :data:`MAX_PAYLOAD`."""
    if len(data) != HEADER.size:
        raise VhostUserError(f"vhost-user header of {len(data)} bytes (12 expected)")
    request, flags, size = HEADER.unpack(data)
    if flags & FLAG_VERSION_MASK != VERSION:
        raise VhostUserError(f"vhost-user message of version {flags & FLAG_VERSION_MASK} "
                             f"(flags {flags:#x}; only version 1 is spoken)")
    if size > MAX_PAYLOAD:
        raise VhostUserError(f"vhost-user {request_name(request)} reply announces {size} "
                             f"payload bytes (at most {MAX_PAYLOAD})")
    return request, flags, size


def check_reply(sent: int, request: int, flags: int, payload: bytes,
                size: Optional[int]) -> bytes:
    """``payload`` if it is a valid reply to request ``sent``: the REPLY bit set, the same
    request number, and exactly ``size`` bytes (None: any). Raises :class:`VhostUserError`."""
    name = request_name(sent)
    if not flags & FLAG_REPLY:
        raise VhostUserError(f"vhost-user back-end sent {request_name(request)} without the "
                             f"REPLY flag while {name} awaited its reply")
    if request != sent:
        raise VhostUserError(f"vhost-user back-end answered {request_name(request)} to {name}")
    if size is not None and len(payload) != size:
        raise VhostUserError(f"vhost-user {name} reply of {len(payload)} bytes ({size} expected)")
    return payload


def mem_table(regions: Sequence[Tuple[int, int, int, int]]) -> bytes:
    """SET_MEM_TABLE's payload for ``regions`` (guest address, size, front-end address, mmap
    offset), at most :data:`MAX_REGIONS`. Raises ValueError."""
    if not 0 < len(regions) <= MAX_REGIONS:
        raise ValueError(f"vhost-user memory table of {len(regions)} regions (1..{MAX_REGIONS})")
    return MEM_HEADER.pack(len(regions), 0) + b"".join(REGION.pack(*r) for r in regions)


def vring_state(index: int, num: int) -> bytes:
    return VRING_STATE.pack(index, num)


def vring_addr(index: int, desc: int, used: int, avail: int, flags: int = 0,
               log: int = 0) -> bytes:
    """SET_VRING_ADDR's payload: note the order, descriptor table, used ring, available ring
    (front-end virtual addresses)."""
    return VRING_ADDR.pack(index, flags, desc, used, avail, log)


class VhostUserFrontend:
    """One connection to a vhost-user back-end: ``sock``, a connected ``AF_UNIX`` stream socket
    (the front end owns it); ``timeout``: seconds each reply may take; ``peer``: a name for
    messages (e.g. ``"virtiofsd"``). :meth:`handshake` first. Calls are serialised by a lock;
    every failure raises :class:`VhostUserError` and marks the connection dead
    (:attr:`error`), after which every call raises it again at once."""

    def __init__(self, sock: socket.socket, *, timeout: float = REPLY_TIMEOUT,
                 peer: str = "vhost-user back-end"):
        self.sock = sock
        self.timeout = timeout
        self.peer = peer
        self.features = 0                # what the back-end offers (GET_FEATURES)
        self.protocol_features = 0       # what both sides use
        self.error: Optional[str] = None
        self.messages = 0
        self._lock = threading.Lock()
        sock.settimeout(timeout)

    # -- the wire -------------------------------------------------------------------------
    def _fail(self, why: str) -> VhostUserError:
        if self.error is None:
            self.error = why
        return VhostUserError(why)

    def _send(self, request: int, payload: bytes, fds: Sequence[int], need_reply: bool) -> None:
        data = encode(request, payload, need_reply=need_reply)
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] \
            if fds else []
        try:
            n = self.sock.sendmsg([data], anc)
        except socket.timeout:
            raise self._fail(f"{self.peer} did not take {request_name(request)} within "
                             f"{self.timeout:g} s") from None
        except OSError as e:
            raise self._fail(f"{self.peer}: sending {request_name(request)} failed: "
                             f"{e.strerror or e} (did it exit?)") from None
        if n != len(data):
            raise self._fail(f"{self.peer}: {request_name(request)} sent short ({n} of "
                             f"{len(data)} bytes)")
        self.messages += 1

    def _recv_exact(self, n: int, sent: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            try:
                chunk, anc, _flags, _addr = self.sock.recvmsg(
                    n - len(buf), socket.CMSG_SPACE(4 * MAX_REGIONS))
            except socket.timeout:
                raise self._fail(f"{self.peer} did not answer {request_name(sent)} within "
                                 f"{self.timeout:g} s") from None
            except OSError as e:
                raise self._fail(f"{self.peer}: reading the reply to {request_name(sent)} "
                                 f"failed: {e.strerror or e}") from None
            _close_fds(anc)          # this front end takes no fds from the back-end
            if not chunk:
                raise self._fail(f"{self.peer} closed the connection while {request_name(sent)} "
                                 "awaited its reply (did it exit?)")
            buf += chunk
        return bytes(buf)

    def _reply(self, sent: int, size: Optional[int]) -> bytes:
        head = self._recv_exact(HEADER.size, sent)
        try:
            request, flags, length = decode_header(head)
        except VhostUserError as e:
            raise self._fail(f"{self.peer}: {e}") from None
        payload = self._recv_exact(length, sent) if length else b""
        try:
            return check_reply(sent, request, flags, payload, size)
        except VhostUserError as e:
            raise self._fail(f"{self.peer}: {e}") from None

    def call(self, request: int, payload: bytes = b"", fds: Sequence[int] = (),
             reply_size: Optional[int] = None) -> Optional[bytes]:
        """Send ``request`` with ``payload`` and ``fds``; for a request that answers (GET_*)
        return its checked payload, otherwise wait for the REPLY_ACK when negotiated (a
        non-zero ack raises) and return None."""
        with self._lock:
            if self.error is not None:
                raise VhostUserError(self.error)
            answers = request in _REPLY_SIZE
            ack = not answers and bool(self.protocol_features >> PROTOCOL_F_REPLY_ACK & 1)
            self._send(request, payload, fds, ack)
            if answers:
                return self._reply(request, reply_size if reply_size is not None
                                   else _REPLY_SIZE[request])
            if ack:
                code = U64.unpack(self._reply(request, U64.size))[0]
                if code:
                    raise self._fail(f"{self.peer} refused {request_name(request)} "
                                     f"(status {code})")
            return None

    # -- the requests ----------------------------------------------------------------------
    def handshake(self) -> None:
        """SET_OWNER, GET_FEATURES and, when offered, the protocol features: this front end
        takes REPLY_ACK (:data:`WANTED_PROTOCOL_FEATURES`) where the back-end has it."""
        self.call(SET_OWNER)
        self.features = self.get_u64(GET_FEATURES)
        if self.features >> F_PROTOCOL_FEATURES & 1:
            offered = self.get_u64(GET_PROTOCOL_FEATURES)
            use = offered & WANTED_PROTOCOL_FEATURES
            self.call(SET_PROTOCOL_FEATURES, U64.pack(use))
            self.protocol_features = use

    def get_u64(self, request: int) -> int:
        data = self.call(request)
        assert data is not None
        return U64.unpack(data)[0]

    def set_features(self, features: int) -> None:
        """SET_FEATURES: the driver's accepted bits, plus F_PROTOCOL_FEATURES when the back-end
        offered it (its rings then start disabled until :meth:`enable_vring`)."""
        if self.features >> F_PROTOCOL_FEATURES & 1:
            features |= 1 << F_PROTOCOL_FEATURES
        self.call(SET_FEATURES, U64.pack(features))

    def set_mem_table(self, regions: Sequence[Tuple[int, int, int, int, int]]) -> None:
        """SET_MEM_TABLE from ``regions``: (guest address, size, front-end address, mmap offset,
        memfd) each."""
        self.call(SET_MEM_TABLE, mem_table([r[:4] for r in regions]), [r[4] for r in regions])

    def start_vring(self, index: int, num: int, base: int, desc: int, used: int, avail: int,
                    kick_fd: int, call_fd: int) -> None:
        """Hand queue ``index`` to the back-end: its size, the avail index to start at, the
        rings' front-end addresses, its eventfds, then enable it."""
        self.call(SET_VRING_NUM, vring_state(index, num))
        self.call(SET_VRING_BASE, vring_state(index, base))
        self.call(SET_VRING_ADDR, vring_addr(index, desc, used, avail))
        self.call(SET_VRING_CALL, U64.pack(index), [call_fd])
        self.call(SET_VRING_KICK, U64.pack(index), [kick_fd])
        if self.features >> F_PROTOCOL_FEATURES & 1:
            self.call(SET_VRING_ENABLE, vring_state(index, 1))

    def stop_vring(self, index: int) -> int:
        """Disable queue ``index`` and stop the back-end's service of it (GET_VRING_BASE);
        returns the avail index it would go on from."""
        if self.features >> F_PROTOCOL_FEATURES & 1:
            self.call(SET_VRING_ENABLE, vring_state(index, 0))
        data = self.call(GET_VRING_BASE, vring_state(index, 0))
        assert data is not None
        got_index, num = VRING_STATE.unpack(data)
        if got_index != index:
            raise self._fail(f"{self.peer}: GET_VRING_BASE for queue {index} answered queue "
                             f"{got_index}")
        return num

    def close(self) -> None:
        """Close the socket (the back-end sees the connection end). Idempotent."""
        try:
            self.sock.close()
        except OSError:
            pass


def _close_fds(anc: List[Tuple[int, int, bytes]]) -> None:
    for level, kind, data in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds = array.array("i")
            fds.frombytes(data[:len(data) - len(data) % fds.itemsize])
            for fd in fds:
                try:
                    os.close(fd)
                except OSError:
                    pass


__all__ = ["VhostUserFrontend", "VhostUserError", "encode", "decode_header", "check_reply",
           "mem_table", "vring_state", "vring_addr", "request_name"]
