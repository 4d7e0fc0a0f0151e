"""GDB remote serial protocol framing (GDB manual, Appendix E "GDB Remote Serial Protocol",
"Overview" and "Packets"): ``$payload#cs``, the checksum, ``}`` escapes, run-length encoding,
acknowledgements and the interrupt byte — no sockets, no machine.

:class:`PacketReader` turns a byte stream from the client into events with bounded memory: a
packet longer than :data:`MAX_PACKET` bytes is dropped (and NAKed) as it arrives, never
buffered whole."""
from __future__ import annotations

from .._record import Record

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Iterator, List, Optional

#: the largest packet payload accepted from a client, in bytes (advertised as ``PacketSize``
#: in qSupported): room for an ``M``/``X`` of :data:`MAX_MEMORY` bytes in hex plus its header
MAX_PACKET = 0x21000
#: the most guest memory one ``m``/``M``/``X`` packet may read or write, in bytes
MAX_MEMORY = 0x10000
#: the interrupt byte a client sends while the target runs (Ctrl-C; manual "Interrupts")
INTERRUPT = 0x03

_ESCAPE = 0x7D                       # '}'
_HEX = frozenset(b"0123456789abcdefABCDEF")
_SPECIAL = frozenset(b"#$}*")


class PacketError(ValueError):
    """A packet's contents cannot be parsed (bad hex, missing field, too long): the server
    answers ``E`` and an error number."""


class Event(Record, slots=True):
    """One thing read from the client: ``kind`` "packet" (``data``: the payload between
    ``$`` and ``#``, escapes left in), "bad" (a packet with a wrong or unreadable checksum, or
    too long: answer ``-``), "interrupt" (the 0x03 byte), "ack" (``+``) or "nak" (``-``)."""

    kind: str
    data: bytes = b""


def checksum(payload: bytes) -> int:
    """The modulo-256 sum of the payload's bytes (as sent: escapes included)."""
    return sum(payload) & 0xFF


def escape(data: bytes) -> bytes:
    """Escape ``#``, ``$``, ``}`` and ``*`` as ``}`` followed by the byte XOR 0x20 (binary
    data in ``X`` packets and qXfer replies)."""
    if not _SPECIAL.intersection(data):
        return bytes(data)
    out = bytearray()
    for b in data:
        if b in _SPECIAL:
            out.append(_ESCAPE)
            out.append(b ^ 0x20)
        else:
            out.append(b)
    return bytes(out)


def unescape(data: bytes) -> bytes:
    """Undo :func:`escape`. Raises :class:`PacketError` for a ``}`` at the very end."""
    if _ESCAPE not in data:
        return bytes(data)
    out = bytearray()
    i, n = 0, len(data)
    while i < n:
        b = data[i]
        if b == _ESCAPE:
            if i + 1 >= n:
                raise PacketError("escape character at the end of the data")
            out.append(data[i + 1] ^ 0x20)
            i += 2
        else:
            out.append(b)
            i += 1
    return bytes(out)


def rle_decode(data: bytes, limit: int = MAX_PACKET) -> bytes:
    """Expand run-length encoding: ``X*n`` repeats ``X`` ``ord(n) - 29`` more times (manual,
    "Overview"; counts 3..97). Raises :class:`PacketError` for a ``*`` with no byte before it
    or no count after it, a count below 3, or output longer than ``limit`` bytes."""
    if b"*" not in data:
        return bytes(data)
    out = bytearray()
    i, n = 0, len(data)
    while i < n:
        b = data[i]
        if b == 0x2A:                       # '*'
            if not out or i + 1 >= n:
                raise PacketError("run-length '*' without a byte before it or a count after")
            count = data[i + 1] - 29
            if count < 3:
                raise PacketError(f"bad run-length count {data[i + 1]!r}")
            out.extend(out[-1:] * count)
            i += 2
        else:
            out.append(b)
            i += 1
        if len(out) > limit:
            raise PacketError(f"run-length data longer than {limit} bytes")
    return bytes(out)


def frame(payload: bytes) -> bytes:
    """``$payload#cs`` (``payload`` already escaped where it carries binary data)."""
    return b"$" + payload + b"#" + b"%02x" % checksum(payload)


def parse_hex(text: bytes, *, max_digits: int = 16) -> int:
    """An unsigned hex number (1..``max_digits`` digits, either case). Raises
    :class:`PacketError` otherwise."""
    if not text or len(text) > max_digits or not _HEX.issuperset(text):
        raise PacketError(f"bad hex number {bytes(text[:20])!r}")
    return int(text, 16)


def parse_signed_hex(text: bytes) -> int:
    """A thread id as in ``H``/``T``/``vCont``: hex, or ``-1`` (all threads)."""
    if text == b"-1":
        return -1
    return parse_hex(text)


def hex_decode(text: bytes) -> bytes:
    """Bytes from pairs of hex digits. Raises :class:`PacketError` for an odd length or a
    character that is not a hex digit."""
    if len(text) % 2:
        raise PacketError("odd number of hex digits")
    if not _HEX.issuperset(text):
        raise PacketError("bad hex data")
    return bytes.fromhex(text.decode("ascii"))


def hex_encode(data: bytes) -> bytes:
    """Two lowercase hex digits per byte."""
    return bytes(data).hex().encode("ascii")


def parse_addr_len(text: bytes, max_len: int = MAX_MEMORY) -> "tuple[int, int]":
    """``addr,length`` (both hex) as in ``m``; the length is 0..``max_len``. Raises
    :class:`PacketError` otherwise."""
    a, sep, n = text.partition(b",")
    if not sep:
        raise PacketError("expected addr,length")
    addr, length = parse_hex(a), parse_hex(n)
    if length > max_len:
        raise PacketError(f"length {length:#x} over the limit {max_len:#x}")
    return addr, length


class PacketReader:
    """Incremental parser of the client's byte stream. :meth:`feed` takes what the socket
    gave and yields :class:`Event` values; partial packets wait for more bytes, at most
    :data:`MAX_PACKET` of them (``max_packet``)."""

    def __init__(self, max_packet: int = MAX_PACKET):
        self.max_packet = max_packet
        self._buf = bytearray()
        self._state = 0              # 0 between packets, 1 in a payload, 2/3 checksum digits
        self._overflow = False
        self._cs = bytearray()
        self.garbage = 0             # bytes outside any packet that meant nothing

    def feed(self, data: bytes) -> Iterator[Event]:
        """Parse ``data``; yields the events it completes, in order."""
        for b in data:
            ev = self._byte(b)
            if ev is not None:
                yield ev

    def feed_all(self, data: bytes) -> List[Event]:
        """:meth:`feed` as a list."""
        return list(self.feed(data))

    def _byte(self, b: int) -> Optional[Event]:
        st = self._state
        if st == 0:
            if b == 0x24:                        # '$'
                self._start()
            elif b == INTERRUPT:
                return Event("interrupt")
            elif b == 0x2B:                      # '+'
                return Event("ack")
            elif b == 0x2D:                      # '-'
                return Event("nak")
            else:
                self.garbage += 1
            return None
        if st == 1:
            if b == 0x23:                        # '#'
                self._state = 2
                self._cs.clear()
            elif b == 0x24:                      # '$' inside a packet: a new one begins
                self.garbage += len(self._buf) + 1
                self._start()
            elif not self._overflow:
                if len(self._buf) >= self.max_packet:
                    self._overflow = True        # drop it as it comes; NAK at its end
                    self._buf = bytearray()
                else:
                    self._buf.append(b)
            return None
        self._cs.append(b)
        if len(self._cs) < 2:
            return None
        self._state = 0
        payload = bytes(self._buf)
        self._buf = bytearray()
        if self._overflow:
            self._overflow = False
            return Event("bad", b"too long")
        if not _HEX.issuperset(self._cs):
            return Event("bad", b"unreadable checksum")
        want = int(bytes(self._cs), 16)
        if want != checksum(payload):
            return Event("bad", b"checksum mismatch")
        return Event("packet", payload)

    def _start(self) -> None:
        self._state = 1
        self._buf = bytearray()
        self._overflow = False
