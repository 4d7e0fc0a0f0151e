"""virtio-net, one receive/transmit queue pair (OASIS virtio 1.2, section 5.1), on a host
backend (:mod:`.net_backends`: a tap device, or user-mode networking through passt).

Queues: receiveq1 (0, host -> guest), transmitq1 (1, guest -> host); no control queue.
Features (section 5.1.3): VIRTIO_NET_F_MTU (3), VIRTIO_NET_F_MAC (5), VIRTIO_NET_F_STATUS (16);
on a backend whose frames carry a vnet header (:attr:`~.net_backends.NetBackend.vnet_hdr`: a tap
on a little-endian host) also the offloads QEMU offers for a tap: VIRTIO_NET_F_CSUM (0),
GUEST_CSUM (1), GUEST_TSO4 (7), GUEST_TSO6 (8), GUEST_ECN (9), HOST_TSO4 (11), HOST_TSO6 (12),
HOST_ECN (13); no UFO and no VIRTIO_NET_F_MRG_RXBUF, so every frame goes whole in one buffer
chain (a driver that takes GUEST_TSO posts chains big enough for 64 KiB). Configuration space
(section 5.1.4): mac[6] @0, status u16 @6 (VIRTIO_NET_S_LINK_UP = 1), max_virtqueue_pairs u16
@8 (1), mtu u16 @10.

Every chain starts with the 12-byte ``struct virtio_net_hdr`` (section 5.1.6: flags, gso_type,
hdr_len, gso_size, csum_start, csum_offset, num_buffers), little-endian, the layout of the tap's
own header. On transmit, with VIRTIO_NET_F_CSUM negotiated, the driver's header goes to the tap
unchanged (its checksum and segmentation requests are the kernel's to carry out; a gso_type the
driver did not negotiate is ``tx_dropped_malformed``); without, it is ignored and a zero header
goes. On receive, with GUEST_CSUM negotiated, the tap's header goes to the driver unchanged but
for num_buffers, set to 1 (sections 5.1.6.3-5.1.6.4); without, the header is zeroes with
num_buffers 1. After feature negotiation the tap's ``TUNSETOFFLOAD`` gets the ``TUN_F_*`` flags of
the GUEST_* features accepted (0 for none; 0 again at reset), so the kernel hands over only what
the driver takes; a frame that still asks for more (queued before) is ``rx_dropped_offload``.

Limits, each a drop that is counted (:meth:`VirtioNet.counters`), never an error of the VMM:

* a transmitted frame (after the header) shorter than an Ethernet header (14 bytes) or with no
  header: ``tx_dropped_malformed``; longer than ``mtu`` + 18 (Ethernet header and one VLAN tag):
  ``tx_dropped_oversize`` (its bytes are not even read), except that with HOST_TSO4/6 a frame
  with a segmentation request may be up to :data:`~.net_backends.MAX_FRAME` bytes; the backend
  had no room or is gone:
  ``tx_dropped_backend``; the link is down: ``tx_dropped_link_down``. The chain is returned
  (used length 0) in every case;
* a received frame shorter than an Ethernet header (a stream backend's length may say so):
  ``rx_dropped_malformed``; longer than ``mtu`` + 18 (:data:`~.net_backends.MAX_FRAME` with
  GUEST_TSO4/6 negotiated): ``rx_dropped_oversize``; a frame that does not fit
  the next receive chain: ``rx_dropped_small_buffer`` (the chain is returned with length 0,
  which drivers count as a length error); the link is down or the driver has not started the
  device: ``rx_dropped_link_down`` / ``rx_dropped_no_buffer``;
* frames that arrive while the driver has no receive buffers wait in a bounded list
  (:data:`RX_PENDING_FRAMES` frames, :data:`RX_PENDING_BYTES` bytes). While it is full the
  thread reads no more from the backend, so frames wait where they are: a user-mode stack
  (passt) sees its socket fill and paces its TCP peers; a tap's queue in the host kernel holds
  or drops them there, as it does for QEMU (whose net layer stops polling a backend that the
  device cannot take frames from). A flood from the host side costs bounded memory, and the
  thread reads at most :data:`RX_BATCH` frames before it serves the queues again (it comes back
  at once for frames a backend has already read into its own buffer:
  :meth:`~.net_backends.NetBackend.buffered`). ``rx_dropped_no_buffer`` counts frames that
  came while the driver had not set up its receive queue, were waiting when it reset the
  device, or came after the device broke.

Chains that break the ring rules (:class:`~.queue.QueueError`: a buffer outside guest RAM, a
loop ...) set DEVICE_NEEDS_RESET, as for every device here.

Threads: one host thread per device (:class:`~.hostthread.HostThreadDevice`), started at the
first DRIVER_OK and stopped by :meth:`VirtioNet.close`, moves the frames: it polls the backend's
fd and an eventfd the driver's notifications (of either queue) write, and does all the queue work
under the device's lock. It raises interrupts after letting that lock go (the transport's lock,
which a vCPU may hold while it waits for ours, is taken by an interrupt).
"""
from __future__ import annotations

import os
import re
import select
import struct

from . import ID_NET, INT_CONFIG
from .hostthread import HostThreadDevice
from .net_backends import (MAX_FRAME, NetBackend, NetError, TUN_F_CSUM, TUN_F_TSO4,
                           TUN_F_TSO6, TUN_F_TSO_ECN, VNET_HDR_LEN, check_ifname, make_backend)
from .queue import QueueError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Dict, List, Optional, Tuple, Union

# feature bits (section 5.1.3)
F_CSUM, F_GUEST_CSUM, F_MTU, F_MAC, F_MRG_RXBUF, F_STATUS, F_CTRL_VQ = 0, 1, 3, 5, 15, 16, 17
F_GUEST_TSO4, F_GUEST_TSO6, F_GUEST_ECN, F_HOST_TSO4, F_HOST_TSO6, F_HOST_ECN = 7, 8, 9, 11, 12, 13
OFFLOAD_FEATURES = sum(1 << b for b in (F_CSUM, F_GUEST_CSUM, F_GUEST_TSO4, F_GUEST_TSO6,
                                        F_GUEST_ECN, F_HOST_TSO4, F_HOST_TSO6, F_HOST_ECN))
# struct virtio_net_hdr (section 5.1.6): flags, gso_type
HDR_F_NEEDS_CSUM, HDR_F_DATA_VALID = 1, 2
GSO_NONE, GSO_TCPV4, GSO_TCPV6, GSO_ECN = 0, 1, 4, 0x80
S_LINK_UP = 1
RXQ, TXQ = 0, 1
ETH_HLEN = 14
FRAME_OVERHEAD = ETH_HLEN + 4           # a frame may carry mtu bytes, its header and a VLAN tag
MTU_MIN, MTU_MAX = 68, MAX_FRAME - FRAME_OVERHEAD
RX_PENDING_FRAMES = 256
RX_PENDING_BYTES = 4 << 20
RX_BATCH = 64
CONFIG_SIZE = 12
_RX_HDR = struct.pack("<BBHHHHH", 0, 0, 0, 0, 0, 0, 1)      # num_buffers = 1
_MAC_RE = re.compile(r"^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$")

_COUNTERS = ("rx_packets", "rx_bytes", "rx_dropped_no_buffer", "rx_dropped_oversize",
             "rx_dropped_malformed",
             "rx_dropped_small_buffer", "rx_dropped_link_down", "rx_dropped_offload",
             "tx_packets", "tx_bytes",
             "tx_dropped_malformed", "tx_dropped_oversize", "tx_dropped_backend",
             "tx_dropped_link_down")


def parse_mac(mac: Union[str, bytes]) -> bytes:
    """Six bytes from ``"52:54:00:12:34:56"`` (or six bytes as given); a multicast address (the
    low bit of the first byte) and 00:00:00:00:00:00 are refused. Raises :class:`NetError`."""
    if isinstance(mac, (bytes, bytearray)) and len(mac) == 6:
        raw = bytes(mac)
    elif isinstance(mac, str) and _MAC_RE.match(mac):
        raw = bytes.fromhex(mac.replace(":", ""))
    else:
        raise NetError(f"MAC address {mac!r} must be six hex bytes like 52:54:00:12:34:56")
    if raw[0] & 1:
        raise NetError(f"MAC address {mac!r} is a multicast address")
    if raw == bytes(6):
        raise NetError(f"MAC address {mac!r} is all zeros, which no interface may have")
    return raw


def tun_offload(features: int) -> int:
    """The ``TUN_F_*`` flags for ``TUNSETOFFLOAD`` from negotiated virtio-net ``features``:
    what the driver takes from the host (GUEST_CSUM: checksum requests; GUEST_TSO4/6 with it:
    TCP segments; GUEST_ECN with one of those: their ECN bit). 0 when it takes none."""
    if not features >> F_GUEST_CSUM & 1:
        return 0
    flags = TUN_F_CSUM
    if features >> F_GUEST_TSO4 & 1:
        flags |= TUN_F_TSO4
    if features >> F_GUEST_TSO6 & 1:
        flags |= TUN_F_TSO6
    if flags & (TUN_F_TSO4 | TUN_F_TSO6) and features >> F_GUEST_ECN & 1:
        flags |= TUN_F_TSO_ECN
    return flags


def gso_allowed(gso_type: int, features: int, tso4: int, tso6: int, ecn: int) -> bool:
    """Whether a header's ``gso_type`` is one ``features`` allow, given the bit numbers of the
    direction's TSO4, TSO6 and ECN features (GUEST_* on receive, HOST_* on transmit)."""
    if gso_type & GSO_ECN and not features >> ecn & 1:
        return False
    kind = gso_type & ~GSO_ECN
    return (kind == GSO_NONE and not gso_type & GSO_ECN
            or kind == GSO_TCPV4 and bool(features >> tso4 & 1)
            or kind == GSO_TCPV6 and bool(features >> tso6 & 1))


def rx_header(hdr: bytes, features: int) -> Optional[bytes]:
    """The 12-byte header the driver gets for a frame the tap gave with vnet header ``hdr``
    (its first 10 bytes count) under negotiated ``features``: the tap's fields and num_buffers
    1 when GUEST_CSUM was negotiated, zeroes and num_buffers 1 when not; None (drop it) when
    the frame asks for what the driver did not take (a checksum to complete without
    GUEST_CSUM, a segment size without the GUEST_TSO feature of its kind)."""
    flags, gso_type = hdr[0], hdr[1]
    if not features >> F_GUEST_CSUM & 1:
        if flags & HDR_F_NEEDS_CSUM or gso_type != GSO_NONE:
            return None
        return _RX_HDR
    if not gso_allowed(gso_type, features, F_GUEST_TSO4, F_GUEST_TSO6, F_GUEST_ECN):
        return None
    return bytes(hdr[:10]) + b"\x01\x00"


def random_mac() -> bytes:
    """A MAC address in QEMU's 52:54:00 range with three random bytes."""
    return b"\x52\x54\x00" + os.urandom(3)


class VirtioNet(HostThreadDevice):
    """A virtio network device on ``backend`` (a :class:`~.net_backends.NetBackend`; the device
    owns it and closes it). ``mac``: the address the driver reads (str or 6 bytes; default a
    random 52:54:00:xx:xx:xx); ``mtu``: the largest payload in bytes (68..65535, default 1500);
    ``link``: whether the link starts up. Raises :class:`NetError` (a ValueError) for a bad
    option. Attributes ``mac`` (bytes), ``mtu``, ``link_up``, ``backend``."""

    device_id = ID_NET
    num_queues = 2
    thread_name = "virtio-net"
    wake_queues = (RXQ, TXQ)                # new receive buffers, frames to send

    def __init__(self, backend: NetBackend, *, mac: Union[str, bytes, None] = None,
                 mtu: int = 1500, link: bool = True):
        if not isinstance(backend, NetBackend):
            raise NetError(f"a virtio-net backend is a NetBackend, not {backend!r}")
        if not isinstance(mtu, int) or isinstance(mtu, bool) or not MTU_MIN <= mtu <= MTU_MAX:
            raise NetError(f"MTU {mtu!r} must be an integer in {MTU_MIN}..{MTU_MAX}")
        self.mac = random_mac() if mac is None else parse_mac(mac)
        self.mtu = mtu
        self.max_frame = mtu + FRAME_OVERHEAD
        self.link_up = bool(link)
        self.backend = backend
        super().__init__()                      # the lock guards pending frames and counters too
        self._features = 0
        self._tx_max = self._rx_max = self.max_frame
        self._pending: List[Tuple[bytes, Union[bytes, memoryview]]] = []   # (header, frame)
        self._pending_bytes = 0
        self._count: Dict[str, int] = dict.fromkeys(_COUNTERS, 0)

    def __repr__(self) -> str:
        return (f"VirtioNet({self.backend!r}, mac={self.mac_str}, mtu={self.mtu}, "
                f"link={'up' if self.link_up else 'down'})")

    @property
    def mac_str(self) -> str:
        return ":".join(f"{b:02x}" for b in self.mac)

    # ---- features and configuration ----------------------------------------------------

    def device_features(self) -> int:
        """VIRTIO_NET_F_MTU, VIRTIO_NET_F_MAC and VIRTIO_NET_F_STATUS; with a backend whose
        frames carry a vnet header (a tap) also :data:`OFFLOAD_FEATURES`."""
        base = (1 << F_MTU) | (1 << F_MAC) | (1 << F_STATUS)
        return base | (OFFLOAD_FEATURES if self.backend.vnet_hdr else 0)

    def config_read(self, offset: int, size: int) -> int:
        """Bytes of ``struct virtio_net_config`` (module docstring); past its end 0."""
        if offset < 0 or size <= 0:
            return 0
        cfg = self.mac + struct.pack("<HHH", S_LINK_UP if self.link_up else 0, 1, self.mtu)
        return int.from_bytes(cfg[offset:offset + size], "little")

    def set_link(self, up: bool) -> None:
        """Set the link up or down; the driver is told with a configuration-change interrupt
        when the device is running. While down, frames both ways are dropped and counted,
        those already waiting for receive buffers with them."""
        up = bool(up)
        if up == self.link_up:
            return
        self.link_up = up
        with self._lock:
            h = self._handles
            if not up:                          # what waits goes too (QEMU purges its queue)
                self._drop_pending("rx_dropped_link_down")
        self._kick()                            # the thread reads (and drops) or paces anew
        if h is not None:
            h.interrupt(INT_CONFIG, -1)

    # ---- lifecycle -------------------------------------------------------------------

    # activate() takes the queues and starts the frame thread (once); close() stops it, closes
    # the backend (a tap goes, passt is killed) and the eventfd (HostThreadDevice).

    def _activated(self, features: int) -> None:
        """Keep the negotiated features, size the frame limits by them and give the tap the
        offloads the driver takes (:func:`tun_offload`)."""
        self._features = features
        tso = (features >> F_HOST_TSO4 | features >> F_HOST_TSO6) & features >> F_CSUM & 1
        self._tx_max = MAX_FRAME if tso else self.max_frame
        self._rx_max = MAX_FRAME if tun_offload(features) & (TUN_F_TSO4 | TUN_F_TSO6) \
            else self.max_frame
        if self.backend.vnet_hdr:
            self.backend.set_offload(tun_offload(features))

    def _reset_locked(self) -> None:
        """A reset also drops the frames waiting for receive buffers (counted) and switches
        the tap's offloads off."""
        self._features = 0
        self._tx_max = self._rx_max = self.max_frame
        self._drop_pending()
        if self.backend.vnet_hdr:
            self.backend.set_offload(0)

    def _release(self) -> None:
        self.backend.close()

    def counters(self) -> Dict[str, int]:
        """Frames and bytes each way and the drops by reason (module docstring), plus
        ``rx_dropped`` / ``tx_dropped`` (their sums) and ``rx_pending`` (frames waiting for
        receive buffers now)."""
        with self._lock:
            c = dict(self._count)
            c["rx_pending"] = len(self._pending)
        c["rx_dropped"] = sum(v for k, v in c.items() if k.startswith("rx_dropped_"))
        c["tx_dropped"] = sum(v for k, v in c.items() if k.startswith("tx_dropped_"))
        return c

    @property
    def backend_error(self) -> Optional[str]:
        """Why the backend stopped working (one line), or None."""
        return self.backend.error

    # ---- the frame thread ------------------------------------------------------------

    def _rx_full(self) -> bool:
        """Whether the list of frames waiting for receive buffers has no room for one more
        frame of the largest size the driver takes (then the backend is not read); never
        while the link is down (frames are then read and dropped)."""
        return self.link_up and (len(self._pending) >= RX_PENDING_FRAMES
                                 or self._pending_bytes + self._rx_max > RX_PENDING_BYTES)

    def _poll_set(self) -> Tuple[Dict[int, int], Optional[int]]:
        """The backend's fd until it fails: readable unless the waiting list is full, writable
        while it holds unsent bytes; no timeout, or 0 when the backend holds a whole frame in
        its own buffer (its fd would not say so) and there is room for it."""
        be = self.backend
        fd = be.fileno() if be.error is None else -1
        if fd < 0:
            return {}, None
        room = not self._rx_full()
        events = (select.POLLIN if room else 0) | (select.POLLOUT if be.wants_write() else 0)
        timeout = 0 if room and be.buffered() else None
        return ({fd: events} if events else {}), timeout

    def _pump(self, ready: Optional[Dict[int, int]] = None, woken: bool = True) -> None:
        """One round (whatever woke the thread): send what the driver queued, read up to
        :data:`RX_BATCH` frames, fill receive buffers; then the interrupts (outside the
        lock)."""
        be = self.backend
        irq: List[int] = []
        failed = False
        with self._lock:
            h = self._handles
            try:
                be.flush()
                if self._transmit():
                    irq.append(TXQ)
                for _ in range(RX_BATCH):
                    if be.error is not None or self._rx_full():
                        break
                    if be.vnet_hdr:
                        data = be.recv_vnet()
                        if data is None:
                            break
                        self._arrived(memoryview(data)[VNET_HDR_LEN:], data[:VNET_HDR_LEN])
                        continue
                    frame = be.recv()
                    if frame is None:
                        break
                    self._arrived(frame)
                if self._deliver():
                    irq.append(RXQ)
            except QueueError:
                self._broken = failed = True
                self._drop_pending()
        self._signal(h, failed, irq)

    def _drop_pending(self, counter: str = "rx_dropped_no_buffer") -> None:
        """Drop the frames waiting for receive buffers, counted under ``counter``."""
        self._count[counter] += len(self._pending)
        self._pending.clear()
        self._pending_bytes = 0

    def _arrived(self, frame: Union[bytes, memoryview], vhdr: Optional[bytes] = None) -> None:
        """A frame from the backend (``vhdr``: the vnet header it came with, None for a
        backend without one): counted and dropped, or kept for the receive queue."""
        c = self._count
        hdr = _RX_HDR if vhdr is None else rx_header(vhdr, self._features)
        if len(frame) > self._rx_max:
            c["rx_dropped_oversize"] += 1
        elif len(frame) < ETH_HLEN:
            c["rx_dropped_malformed"] += 1
        elif hdr is None:
            c["rx_dropped_offload"] += 1
        elif not self.link_up:
            c["rx_dropped_link_down"] += 1
        elif (self._queues[RXQ] is None or self._broken
              or len(self._pending) >= RX_PENDING_FRAMES
              or self._pending_bytes + len(frame) > RX_PENDING_BYTES):
            c["rx_dropped_no_buffer"] += 1
        else:
            self._pending.append((hdr, frame))
            self._pending_bytes += len(frame)

    def _deliver(self) -> bool:
        """Move waiting frames into receive chains; whether the driver wants an interrupt."""
        q = self._queues[RXQ]
        if q is None or self._broken or not self._pending:
            return False
        c = self._count
        pushed = False
        while self._pending:
            chain = q.pop()
            if chain is None:
                break
            hdr, frame = self._pending.pop(0)
            self._pending_bytes -= len(frame)
            if chain.writable_len < VNET_HDR_LEN + len(frame):
                c["rx_dropped_small_buffer"] += 1
                q.push(chain, 0)
            else:
                chain.write(hdr)
                chain.write(frame, VNET_HDR_LEN)
                q.push(chain, VNET_HDR_LEN + len(frame))
                c["rx_packets"] += 1
                c["rx_bytes"] += len(frame)
            pushed = True
        return pushed and q.needs_interrupt()

    def _transmit(self) -> bool:
        """Send the chains the driver made available while the backend has room; whether the
        driver wants an interrupt. Work is bounded by the queue size per round."""
        q = self._queues[TXQ]
        if q is None or self._broken:
            return False
        be, c = self.backend, self._count
        feats = self._features
        passthrough = be.vnet_hdr and bool(feats >> F_CSUM & 1)
        pushed = False
        for _ in range(q.size):
            if be.error is None and not be.can_send():
                break                           # POLLOUT brings us back
            chain = q.pop()
            if chain is None:
                break
            n = chain.readable_len - VNET_HDR_LEN
            gso = chain.read(1, 1)[0] if passthrough and n > 0 else GSO_NONE
            if n < ETH_HLEN:
                c["tx_dropped_malformed"] += 1
            elif n > (self._tx_max if gso != GSO_NONE else self.max_frame):
                c["tx_dropped_oversize"] += 1
            elif not gso_allowed(gso, feats, F_HOST_TSO4, F_HOST_TSO6, F_HOST_ECN):
                c["tx_dropped_malformed"] += 1
            elif not self.link_up:
                c["tx_dropped_link_down"] += 1
            else:
                if passthrough:                 # the driver's header goes with the frame
                    sent = be.send_vnet(chain.read(0, VNET_HDR_LEN + n))
                else:
                    sent = be.send(chain.read(VNET_HDR_LEN, n))
                if sent:
                    c["tx_packets"] += 1
                    c["tx_bytes"] += n
                else:
                    c["tx_dropped_backend"] += 1
            q.push(chain, 0)
            pushed = True
        else:
            self._kick()                        # a full round: come back for the rest
        return pushed and q.needs_interrupt()


_BOOL = {"up": True, "on": True, "down": False, "off": False}


def net_from_spec(spec: str) -> VirtioNet:
    """A :class:`VirtioNet` from a command-line description in QEMU's ``-nic`` words:
    ``user[,mac=MAC][,mtu=N][,link=up|down]`` (passt) or
    ``tap[,ifname=NAME][,mac=MAC][,mtu=N][,link=up|down]``. Raises :class:`NetError` for an
    unknown backend or option, a bad value, or a backend that cannot be set up."""
    if not isinstance(spec, str) or not spec:
        raise NetError(f"a network is user|tap[,ifname=NAME][,mac=MAC][,mtu=N][,link=up|down], "
                       f"not {spec!r}")
    kind, *opts = spec.split(",")
    if kind not in ("user", "tap"):
        raise NetError(f"unknown network backend {kind!r} (known: user, tap)")
    seen: Dict[str, str] = {}
    for o in opts:
        key, eq, val = o.partition("=")
        if not eq or key not in ("ifname", "mac", "mtu", "link"):
            raise NetError(f"{kind}: unknown network option {o!r} (known: "
                           f"{'ifname=NAME, ' if kind == 'tap' else ''}mac=MAC, mtu=N, "
                           "link=up|down)")
        if key in seen:
            raise NetError(f"{kind}: {key}= given twice")
        seen[key] = val
    ifname = seen.get("ifname")
    if ifname is not None:
        if kind != "tap":
            raise NetError("ifname= applies to tap networking, not user")
        check_ifname(ifname)
    mac = parse_mac(seen["mac"]) if "mac" in seen else None
    mtu = 1500
    if "mtu" in seen:
        if not seen["mtu"].isdigit() or not MTU_MIN <= int(seen["mtu"]) <= MTU_MAX:
            raise NetError(f"{kind}: mtu={seen['mtu']} must be an integer in "
                           f"{MTU_MIN}..{MTU_MAX}")
        mtu = int(seen["mtu"])
    link = True
    if "link" in seen:
        if seen["link"] not in _BOOL:
            raise NetError(f"{kind}: link={seen['link']} must be up or down")
        link = _BOOL[seen["link"]]
    backend = make_backend(kind, ifname=ifname)
    try:
        return VirtioNet(backend, mac=mac, mtu=mtu, link=link)
    except BaseException:
        backend.close()
        raise


__all__ = ["VirtioNet", "net_from_spec", "parse_mac", "random_mac", "NetError", "tun_offload",
           "rx_header", "gso_allowed", "OFFLOAD_FEATURES",
           "RX_PENDING_FRAMES", "RX_PENDING_BYTES"]
