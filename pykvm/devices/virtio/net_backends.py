"""Where a virtio-net device's frames go on the host (:mod:`.net`): a tap device, or user-mode
networking through passt. A backend moves whole Ethernet frames (no virtio header) and has a
file descriptor the device's thread polls:

==================  =========================================================================
``fileno()``        the fd to poll (POLLIN: frames to :meth:`~NetBackend.recv`; POLLOUT while
                    :meth:`~NetBackend.wants_write`)
``recv()``          the next frame from the host side (bytes), or None when there is none now
``send(frame)``     hand a frame to the host side; False when it was dropped (no room now)
``can_send()``      whether :meth:`~NetBackend.send` has room now (the device holds the guest's
                    transmit buffers until it has)
``flush()``         write what :meth:`~NetBackend.send` queued (stream backends)
``close()``         release everything (idempotent)
``error``           None, or why the backend stopped working (one line); it then passes nothing
==================  =========================================================================

:class:`TapBackend` opens ``/dev/net/tun`` with ``IFF_TAP | IFF_NO_PI | IFF_VNET_HDR``: the
interface named is created when absent (that needs CAP_NET_ADMIN) or attached to when it exists
(a persistent tap the user may open). Every frame carries a 12-byte ``virtio_net_hdr``
(``TUNSETVNETHDRSZ``). It starts with no offload switched on (``TUNSETOFFLOAD`` 0: the kernel
hands over whole, checksummed frames); :meth:`TapBackend.set_offload` switches on what the
guest's driver accepted (``TUN_F_CSUM``, ``TUN_F_TSO4``, ``TUN_F_TSO6``, ``TUN_F_TSO_ECN``), and
then frames of up to 64 KiB with a checksum or segmentation request in their header pass both
ways. The tap's header is in the host's byte order (no ``TUNSETVNETLE``), virtio 1.x's is
little-endian: :attr:`TapBackend.vnet_hdr` (the device may pass headers through) is True only
on a little-endian host. :meth:`TapBackend.recv_vnet` and :meth:`TapBackend.send_vnet` move a
frame with its header.

:class:`StreamBackend` speaks QEMU's ``-netdev stream`` protocol over any connected stream
socket (a test holds the other end of a socket pair). :class:`PasstBackend` starts ``passt`` (https://passt.top, the Debian package ``passt``) with one
end of a Unix stream socket pair (``--fd``; no socket path exists anywhere) in its QEMU mode:
each frame is preceded by its length, a 32-bit big-endian number (QEMU's ``-netdev stream``).
passt answers ARP, DHCP, NDP and DHCPv6 itself and carries the guest's TCP, UDP and ICMP through
the host's own sockets, without privileges. It is started with ``--one-off`` (it quits when its
end of the socket closes, so it goes with this process on any exit, a SIGKILL included) and is
killed and reaped by :meth:`PasstBackend.close`, by the collection of a backend nobody closed and
at interpreter exit.
"""
from __future__ import annotations

import errno
import fcntl
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import weakref

from ...errors import PykvmError
from . import BackendUnavailable

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, List, Optional, Sequence

VNET_HDR_LEN = 12                       # struct virtio_net_hdr_v1 (num_buffers included)
MAX_FRAME = 65535 + 18                  # largest frame any backend hands over (MTU 65535)
_ZERO_HDR = bytes(VNET_HDR_LEN)

# <linux/if_tun.h>
TUNSETIFF = 0x400454CA
TUNSETOFFLOAD = 0x400454D0
TUNSETVNETHDRSZ = 0x400454D8
IFF_TAP, IFF_NO_PI, IFF_VNET_HDR = 0x0002, 0x1000, 0x4000
TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, TUN_F_TSO_ECN = 0x01, 0x02, 0x04, 0x08
IFNAMSIZ = 16

STREAM_OUT_LIMIT = 1 << 20              # bytes queued towards passt before the device waits
_STREAM_READ = 256 << 10                # bytes read from passt's socket at once
PASST_PACKAGE = "passt"


class NetError(PykvmError, ValueError):
    """A network backend cannot be set up (a bad option, no /dev/net/tun, no permission to
    create the tap, passt missing or refusing to start): one line naming what and why."""


class NetBackendUnavailable(NetError, BackendUnavailable):
    """The host cannot give the backend (no /dev/net/tun, no permission for the tap, passt
    missing, failing to start or exiting at once): a :class:`NetError` that is a host
    problem (:class:`~pykvm.devices.virtio.BackendUnavailable`), not bad input."""


class NetBackend:
    """The backend interface (module docstring). Subclasses set :attr:`name` ("tap", "user")."""

    name = "?"
    error: Optional[str] = None
    vnet_hdr = False            # frames carry a virtio_net_hdr (recv_vnet/send_vnet/set_offload)

    def fileno(self) -> int:
        raise NotImplementedError

    def recv(self) -> Optional[bytes]:
        raise NotImplementedError

    def send(self, frame: bytes) -> bool:
        raise NotImplementedError

    def can_send(self) -> bool:
        return True

    def wants_write(self) -> bool:
        return False

    def flush(self) -> None:
        """Write what :meth:`send` queued (nothing for datagram-like backends)."""

    def buffered(self) -> bool:
        """Whether :meth:`recv` has a whole frame to return from what this backend already read
        (its fd may then not be readable); False for a backend that reads a frame at a time."""
        return False

    def recv_vnet(self) -> Optional[bytes]:
        """The next frame with its vnet header in front (backends with :attr:`vnet_hdr`)."""
        raise NotImplementedError

    def send_vnet(self, data: bytes) -> bool:
        """Send a frame with its vnet header in front (backends with :attr:`vnet_hdr`)."""
        raise NotImplementedError

    def set_offload(self, flags: int) -> bool:
        """Set the ``TUN_F_*`` offloads the guest takes; False: not done (no vnet header)."""
        return False

    def close(self) -> None:
        raise NotImplementedError


def check_ifname(ifname: str) -> str:
    """``ifname`` when it is a valid Linux interface name (1-15 bytes, no '/', ':' or white
    space, not "." or ".."); raises :class:`NetError`."""
    if (not isinstance(ifname, str) or not ifname or len(ifname.encode()) >= IFNAMSIZ
            or any(c in ifname for c in "/: \t\n\0") or ifname in (".", "..")
            or not ifname.isprintable()):
        raise NetError(f"tap interface name {ifname!r} must be 1-15 bytes without '/', ':' "
                       "or white space")
    return ifname


class TapBackend(NetBackend):
    """A tap device (module docstring). ``ifname``: the interface to create or attach to (None:
    the kernel picks ``tapN``; :attr:`ifname` says which). Raises :class:`NetError`: no
    /dev/net/tun, no permission (EPERM: creating needs CAP_NET_ADMIN), the name in use by
    another kind of interface or by a tap without IFF_VNET_HDR (EINVAL), a busy single-queue
    tap (EBUSY)."""

    name = "tap"
    vnet_hdr = sys.byteorder == "little"    # the tap's header order is the host's

    def __init__(self, ifname: Optional[str] = None):
        if ifname is not None:
            check_ifname(ifname)
        try:
            fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError as e:
            raise NetBackendUnavailable(f"tap: cannot open /dev/net/tun: {e.strerror}") from None
        try:
            ifr = struct.pack("16sH22x", (ifname or "").encode(),
                              IFF_TAP | IFF_NO_PI | IFF_VNET_HDR)
            try:
                got = fcntl.ioctl(fd, TUNSETIFF, ifr)
            except OSError as e:
                hint = {errno.EPERM: " (creating a tap needs CAP_NET_ADMIN; make a persistent "
                                     "one the user owns with `ip tuntap add mode tap user ...`)",
                        errno.EINVAL: " (is it another kind of interface, or a tap without "
                                      "vnet_hdr?)",
                        errno.EBUSY: " (a single-queue tap another process has open)"}
                who = f"tap {ifname}" if ifname else "tap"
                raise NetBackendUnavailable(f"{who}: cannot create or attach: {e.strerror}"
                               f"{hint.get(e.errno or 0, '')}") from None
            self.ifname = got[:IFNAMSIZ].split(b"\0", 1)[0].decode()
            try:
                fcntl.ioctl(fd, TUNSETVNETHDRSZ, struct.pack("i", VNET_HDR_LEN))
                fcntl.ioctl(fd, TUNSETOFFLOAD, 0)
            except OSError as e:
                raise NetError(f"tap {self.ifname}: cannot set the vnet header: "
                               f"{e.strerror}") from None
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        self.error = None

    def __repr__(self) -> str:
        return f"TapBackend({self.ifname!r}{', closed' if self._fd < 0 else ''})"

    def fileno(self) -> int:
        return self._fd

    def recv_vnet(self) -> Optional[bytes]:
        """The next frame with its 12-byte vnet header in front (bytes 10-11, num_buffers, are
        not written by the kernel: whatever they hold is meaningless); None when none is
        waiting. A read error other than EAGAIN sets :attr:`error` and returns None."""
        while self._fd >= 0:
            try:
                data = os.read(self._fd, VNET_HDR_LEN + MAX_FRAME)
            except BlockingIOError:
                return None
            except OSError as e:
                self.error = f"tap {self.ifname}: read failed: {e.strerror}"
                return None
            if len(data) > VNET_HDR_LEN:
                return data
        return None

    def recv(self) -> Optional[bytes]:
        """The next frame, without its vnet header; None when none is waiting (as
        :meth:`recv_vnet`)."""
        data = self.recv_vnet()
        return None if data is None else data[VNET_HDR_LEN:]

    def send_vnet(self, data: bytes) -> bool:
        """Write one frame with its 12-byte vnet header in front (``data``); False when the
        kernel did not take it (EAGAIN; the interface down: EIO; a header the kernel refuses,
        e.g. a checksum offset past the frame: EINVAL)."""
        if self._fd < 0:
            return False
        try:
            os.write(self._fd, data)
        except OSError:
            return False
        return True

    def send(self, frame: bytes) -> bool:
        """Write one frame (with a zero vnet header); False when the kernel did not take it
        (EAGAIN, the interface down: EIO)."""
        if self._fd < 0:
            return False
        try:
            os.writev(self._fd, (_ZERO_HDR, frame))
        except OSError:
            return False
        return True

    def set_offload(self, flags: int) -> bool:
        """``TUNSETOFFLOAD`` with ``flags`` (``TUN_F_*``: what the guest takes from the tap:
        checksum requests, TCP segments of up to 64 KiB over IPv4/IPv6, with ECN); False when
        the tap is closed or the kernel refused (the offloads it had stay)."""
        if self._fd < 0:
            return False
        try:
            fcntl.ioctl(self._fd, TUNSETOFFLOAD, flags)
        except OSError:
            return False
        return True

    def close(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)


def _stop_passt(proc: Any, sock: Any, errf: Any) -> None:
    """Kill and reap passt, close our end of its socket and its stderr file (idempotent)."""
    try:
        sock.close()
    except OSError:
        pass
    if proc.poll() is None:
        try:
            proc.kill()
        except OSError:
            pass
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass
    errf.close()


class StreamBackend(NetBackend):
    """Frames over a connected stream socket ``sock`` (AF_UNIX or TCP), each preceded by its
    length as a 32-bit big-endian number: QEMU's ``-netdev stream`` / ``-netdev socket``
    protocol, which passt speaks (:class:`PasstBackend`) and a test can speak from the other end
    of a socket pair. The backend owns ``sock`` and closes it. At most
    :data:`STREAM_OUT_LIMIT` bytes wait to be written; the device holds the guest's transmit
    buffers while they do."""

    name = "stream"

    def __init__(self, sock: socket.socket):
        sock.setblocking(False)
        self._sock = sock
        self._in = bytearray()
        self._out = bytearray()
        self.error = None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({'closed' if self.closed else 'open'})"

    @property
    def closed(self) -> bool:
        return self._sock.fileno() < 0

    def _eof(self) -> str:
        return "the peer closed the socket"

    def _lost(self, e: OSError) -> str:
        """:attr:`error` for a socket that failed (ECONNRESET, EPIPE: the peer went away)."""
        return f"{self.name}: {e.strerror}"

    def fileno(self) -> int:
        return self._sock.fileno()

    def recv(self) -> Optional[bytes]:
        """The next whole frame, or None when none has fully arrived. EOF or a length past
        :data:`MAX_FRAME` (the stream is then out of step) sets :attr:`error`."""
        while self.error is None and not self.closed:
            if len(self._in) >= 4:
                n = int.from_bytes(self._in[:4], "big")
                if n > MAX_FRAME:
                    self.error = f"{self.name}: a frame of {n} bytes (more than {MAX_FRAME})"
                    return None
                if len(self._in) >= 4 + n:
                    frame = bytes(self._in[4:4 + n])
                    del self._in[:4 + n]
                    return frame
            try:
                data = self._sock.recv(_STREAM_READ)
            except (BlockingIOError, InterruptedError):
                return None
            except OSError as e:
                self.error = self._lost(e)
                return None
            if not data:
                self.error = self._eof()
                return None
            self._in += data
        return None

    def buffered(self) -> bool:
        """Whether a whole frame, or a length past :data:`MAX_FRAME` (:meth:`recv` then sets
        :attr:`error`), waits in what was read from the socket: one read takes up to
        ``_STREAM_READ`` bytes, many frames."""
        if self.error is not None or len(self._in) < 4:
            return False
        n = int.from_bytes(self._in[:4], "big")
        return n > MAX_FRAME or len(self._in) >= 4 + n

    def can_send(self) -> bool:
        return len(self._out) < STREAM_OUT_LIMIT

    def wants_write(self) -> bool:
        return bool(self._out) and self.error is None

    def send(self, frame: bytes) -> bool:
        """Queue one frame (length-prefixed) and write what the socket takes; False (dropped)
        when :data:`STREAM_OUT_LIMIT` bytes already wait or the peer is gone."""
        if self.error is not None or self.closed or not self.can_send():
            return False
        self._out += len(frame).to_bytes(4, "big")
        self._out += frame
        self.flush()
        return True

    def flush(self) -> None:
        while self._out and self.error is None and not self.closed:
            try:
                n = self._sock.send(self._out)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                self.error = self._lost(e)
                self._out.clear()
                return
            del self._out[:n]

    def close(self) -> None:
        self._sock.close()


class PasstBackend(StreamBackend):
    """User-mode networking through a passt process of our own (module docstring), over
    :class:`StreamBackend`'s protocol. ``args``: more passt options (e.g. ``["-a",
    "10.0.2.15", "-g", "10.0.2.2"]``; none by default: passt copies the host's addresses and
    routes, as it documents). ``passt``: the program (default: ``passt`` on PATH).

    Raises :class:`NetError` when passt is missing (naming the Debian package) or exits at once
    (with its own last message, e.g. "External interface not usable" on a host without a
    default route)."""

    name = "user"
    START_CHECK = 0.05                 # seconds passt is watched for an immediate exit

    def __init__(self, args: Sequence[str] = (), *, passt: Optional[str] = None):
        exe = shutil.which(passt or "passt")
        if exe is None:
            raise NetBackendUnavailable(f"user-mode networking needs passt, which is not installed (install "
                           f"the Debian/Ubuntu package '{PASST_PACKAGE}')")
        args = [str(a) for a in args]
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        errf = tempfile.TemporaryFile()
        try:
            proc = subprocess.Popen(
                [exe, "--foreground", "--quiet", "--one-off", "--fd", str(theirs.fileno()),
                 *args],
                pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, stderr=errf, start_new_session=True)
        except OSError as e:
            ours.close()
            errf.close()
            raise NetBackendUnavailable(f"passt ({exe}): cannot start: {e.strerror}") from None
        finally:
            theirs.close()
        super().__init__(ours)
        self.proc = proc
        self._errf = errf
        self._finalizer = weakref.finalize(self, _stop_passt, proc, ours, errf)
        try:
            proc.wait(timeout=self.START_CHECK)
        except subprocess.TimeoutExpired:
            pass
        else:
            why = self._why_exited()
            self.close()
            raise NetBackendUnavailable(why)

    def __repr__(self) -> str:
        return f"PasstBackend(pid={self.proc.pid}{', closed' if self.closed else ''})"

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive

    def _why_exited(self) -> str:
        """One line: passt's exit status and the last line it wrote that is not syslog noise."""
        last = ""
        try:
            self._errf.seek(0)
            for ln in self._errf.read(1 << 16).decode(errors="replace").splitlines():
                ln = ln.strip()
                if ln and not ln.startswith(("Failed to send", "Don't run as root")):
                    last = ln
        except (OSError, ValueError):
            pass
        rc = self.proc.poll()
        return f"passt exited (status {rc}){': ' + last if last else ''}"

    EXIT_WAIT = 1.0                    # seconds a lost socket waits for passt's exit status

    def _exited(self) -> bool:
        try:                           # the socket goes a moment before the process is reaped
            self.proc.wait(timeout=self.EXIT_WAIT)
        except subprocess.TimeoutExpired:
            return False
        return True

    def _eof(self) -> str:
        return self._why_exited() if self._exited() else "passt closed its socket"

    def _lost(self, e: OSError) -> str:
        # passt gone with frames of ours unread reads as ECONNRESET: say why it went
        return self._why_exited() if self._exited() else super()._lost(e)

    def close(self) -> None:
        """Kill passt, wait for it and close the socket. Idempotent."""
        self._finalizer()


def make_backend(kind: str, *, ifname: Optional[str] = None,
                 passt_args: Sequence[str] = ()) -> NetBackend:
    """A backend by its command-line name: "tap" (:class:`TapBackend`) or "user"
    (:class:`PasstBackend`). Raises :class:`NetError`."""
    if kind == "tap":
        return TapBackend(ifname)
    if kind == "user":
        if ifname is not None:
            raise NetError("ifname= applies to tap networking, not user")
        return PasstBackend(passt_args)
    raise NetError(f"unknown network backend {kind!r} (known: user, tap)")


__all__: List[str] = ["NetBackend", "TapBackend", "StreamBackend", "PasstBackend", "NetError", "make_backend",
                      "check_ifname", "VNET_HDR_LEN", "MAX_FRAME", "TUN_F_CSUM",
                      "TUN_F_TSO4", "TUN_F_TSO6", "TUN_F_TSO_ECN"]
