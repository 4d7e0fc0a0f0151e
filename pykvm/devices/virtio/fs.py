"""virtio-fs (OASIS virtio 1.2, section 5.11): a host directory in the guest, served by virtiofsd
(https://gitlab.com/virtio-fs/virtiofsd, the Debian package ``virtiofsd``) over vhost-user
(:mod:`.vhost_user`). pykvm serves no file-system request itself: it presents the device, hands
the driver's queues and guest RAM to virtiofsd, and carries notifications both ways.

The device (type 26): queues ``hiprio`` (0) and one request queue (1); no feature bits of its
own (VIRTIO_FS_F_NOTIFICATION is not offered). Configuration space (5.11.4): ``tag`` (36 bytes,
UTF-8, NUL-padded: the name ``mount -t virtiofs TAG /mnt`` uses) at 0, ``num_requests_queues``
(le32, 1) at 36.

How the queues reach virtiofsd, at DRIVER_OK:

* guest RAM must be shareable: every memory slot a memfd mapped ``MAP_SHARED``
  (:func:`pykvm.memory.new_shared_mapping`; a :class:`pykvm.machine.Machine` with a share makes
  all its RAM so); SET_MEM_TABLE sends each slot's memfd, guest address, size and our mapping's
  address, and virtiofsd maps them;
* each queue's size, rings (as addresses in our mapping), a *kick* eventfd and a *call* eventfd
  go with SET_VRING_*; virtiofsd then reads requests and writes replies in guest RAM itself;
* kick (driver -> virtiofsd): the kick eventfd is registered with KVM_IOEVENTFD on the queue's
  notification address (virtio-pci: BAR 4 + 0x3000 + 4 x queue, 2-byte writes; virtio-mmio:
  QueueNotify with the queue index as datamatch), so a notification costs no exit at all.
  A notification that still reaches the transport (another width; the platform gave no VM)
  is written to the same eventfd by :meth:`VirtioFs.notify`;
* call (virtiofsd -> driver): one host thread polls the call eventfds and raises the used-buffer
  interrupt through the transport — on virtio-mmio straight through the window's C
  :class:`.fastpath.MmioLine` (InterruptStatus bit 0 and the line), on virtio-pci through
  :class:`~pykvm.devices.virtio.DeviceHandles` (the queue's MSI-X vector). KVM_IRQFD was not
  taken: virtio-mmio must set InterruptStatus as well as the line, and MSI-X through irqfd
  needs GSI routing of each vector, which pykvm does not keep; the thread serves both
  transports the same way.

A driver reset (status 0) sends GET_VRING_BASE for each started queue (virtiofsd stops serving
it), and the kick registrations are removed; the next DRIVER_OK starts afresh.

virtiofsd is started per device (:class:`Virtiofsd`) with a listening socket of ours passed as
``--fd`` (an abstract, auto-bound name: no file in the file system, nothing to wait for: our
connection is queued before virtiofsd starts), ``--shared-dir``, ``--sandbox`` (``namespace``
by default: virtiofsd pivots into the shared directory, so symlinks and ``..`` cannot leave
it), ``--cache`` and, for a read-only share, ``--readonly``. It is killed and reaped (its
process group: the namespace sandbox forks) by :meth:`VirtioFs.close`, by the collection of a
device nobody closed, and at interpreter exit; and it exits by itself when our connection
closes, so a SIGKILLed pykvm leaves none behind. If it dies while the guest runs, the device
sets DEVICE_NEEDS_RESET and :attr:`VirtioFs.error` says why (its exit status and last line).

Counters: ``kicks_forwarded`` (notifications that reached Python), ``interrupts``,
``vhost_messages``, ``ioeventfds`` (kick registrations in KVM now), ``backend_dead``.
"""
from __future__ import annotations

import os
import select
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import weakref

from . import INT_VRING, TRANSPORT_FEATURES, BackendUnavailable, DeviceHandles, VirtioDevice
from .vhost_user import REPLY_TIMEOUT, VhostUserError, VhostUserFrontend
from ...errors import PykvmError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

ID_FS = 26
HIPRIO, REQUEST = 0, 1
NUM_QUEUES = 2
TAG_SIZE = 36
CONFIG_SIZE = TAG_SIZE + 4
DEFAULT_TAG = "hostshare"
CACHE_MODES = ("auto", "always", "never", "metadata")
SANDBOXES = ("namespace", "chroot", "none")
PACKAGE = "virtiofsd"
ENV = "PYKVM_VIRTIOFSD"          # the program to run, before PATH and Debian's /usr/libexec
# where Debian's package puts the program (not on PATH)
_LIBEXEC = ("/usr/libexec/virtiofsd",)   # (/usr/lib/qemu/virtiofsd may be QEMU 7.2's old C one)
START_TIMEOUT = REPLY_TIMEOUT
_PCI = object()                  # fastpath_update's ``line`` when a virtio-pci transport calls


class FsError(PykvmError, ValueError):
    """A share cannot be set up (a bad spec, no such directory, virtiofsd missing, refusing to
    start or not speaking vhost-user): one line naming what and why."""


class FsBackendUnavailable(FsError, BackendUnavailable):
    """virtiofsd is missing, will not start, exits or does not speak vhost-user as needed: a
    :class:`FsError` that is a host problem (:class:`~pykvm.devices.virtio.BackendUnavailable`),
    not bad input."""


def check_tag(tag: str) -> bytes:
    """The tag's UTF-8 bytes when it is a valid virtio-fs tag (1..36 bytes, printable, no NUL,
    comma or white space, so that it survives ``mount`` and a command line). Raises
    :class:`FsError`."""
    if not isinstance(tag, str) or not tag:
        raise FsError(f"a share's tag must be a non-empty string, not {tag!r}")
    raw = tag.encode("utf-8", "replace")
    if len(raw) > TAG_SIZE or not tag.isprintable() or any(c in tag for c in ", \t\n\0"):
        raise FsError(f"share tag {tag!r} must be 1-{TAG_SIZE} printable UTF-8 bytes without "
                      "commas or white space")
    return raw


def find_virtiofsd(exe: Optional[str] = None) -> str:
    """The virtiofsd program: ``exe`` if given, else ``$PYKVM_VIRTIOFSD``, else ``virtiofsd``
    on PATH, else Debian's ``/usr/libexec/virtiofsd``. Raises :class:`FsError` naming the
    Debian package when there is none."""
    for cand in (exe, os.environ.get(ENV)):
        if cand:
            got = shutil.which(cand)
            if got is None:
                raise FsBackendUnavailable(f"virtiofsd {cand!r} is not an executable program")
            return got
    got = shutil.which("virtiofsd") or next((p for p in _LIBEXEC if os.access(p, os.X_OK)), None)
    if got is None:
        raise FsBackendUnavailable(f"a shared directory needs virtiofsd, which is not installed (install the "
                      f"Debian package '{PACKAGE}', Debian 13 trixie or later, or set {ENV})")
    return got


def _stop_daemon(proc: Any, errf: Any) -> None:
    """Kill virtiofsd's process group (the namespace sandbox forks a child) and reap it; close
    its stderr file. Idempotent."""
    if proc.poll() is None:
        for kill in (lambda: os.killpg(proc.pid, signal.SIGKILL), proc.kill):
            try:
                kill()
                break
            except OSError:
                continue
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass
    try:
        errf.close()
    except OSError:
        pass


class Virtiofsd:
    """One virtiofsd process serving ``shared_dir`` (module docstring) and :attr:`sock`, our
    connected end of its vhost-user socket. ``readonly``: ``--readonly``; ``cache``: one of
    :data:`CACHE_MODES`; ``sandbox``: one of :data:`SANDBOXES`; ``exe``: the program
    (:func:`find_virtiofsd`); ``args``: more options. Raises :class:`FsError`."""

    def __init__(self, shared_dir: str, *, readonly: bool = False, cache: str = "auto",
                 sandbox: str = "namespace", exe: Optional[str] = None,
                 args: Sequence[str] = ()):
        if cache not in CACHE_MODES:
            raise FsError(f"cache={cache} must be one of {', '.join(CACHE_MODES)}")
        if sandbox not in SANDBOXES:
            raise FsError(f"sandbox={sandbox} must be one of {', '.join(SANDBOXES)}")
        prog = find_virtiofsd(exe)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        ours = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        errf = tempfile.TemporaryFile()
        try:
            listener.bind("")                     # Linux auto-binds an abstract name
            listener.listen(1)
            ours.connect(listener.getsockname())  # queued until virtiofsd accepts it
            argv = [prog, f"--fd={listener.fileno()}", f"--shared-dir={shared_dir}",
                    f"--sandbox={sandbox}", f"--cache={cache}", "--log-level=warn",
                    *(["--readonly"] if readonly else []), *[str(a) for a in args]]
            try:
                proc = subprocess.Popen(argv, pass_fds=(listener.fileno(),),
                                        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                        stderr=errf, start_new_session=True)
            except OSError as e:
                raise FsBackendUnavailable(f"virtiofsd ({prog}): cannot start: {e.strerror}") from None
        except BaseException:
            ours.close()
            errf.close()
            raise
        finally:
            listener.close()                      # virtiofsd holds it now (or nobody does)
        self.exe, self.argv, self.proc, self.sock = prog, argv, proc, ours
        self._errf = errf
        self._finalizer = weakref.finalize(self, _stop_daemon, proc, errf)

    def __repr__(self) -> str:
        return f"Virtiofsd(pid={self.proc.pid}{', stopped' if not self.running else ''})"

    @property
    def running(self) -> bool:
        return self._finalizer.alive and self.proc.poll() is None

    def why_exited(self, wait: float = 0.5) -> str:
        """One line: virtiofsd's exit status (waiting up to ``wait`` s for it) and the last
        line it wrote, or that it is still running."""
        try:
            self.proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            pass
        last = ""
        try:
            self._errf.seek(0)
            for ln in self._errf.read(1 << 16).decode(errors="replace").splitlines():
                if ln.strip():
                    last = ln.strip()
        except (OSError, ValueError):
            pass
        rc = self.proc.returncode
        state = "is still running" if rc is None else f"exited (status {rc})"
        return f"virtiofsd {state}{': ' + last if last else ''}"

    def stop(self) -> None:
        """Kill and reap virtiofsd (the connection is the caller's to close). Idempotent."""
        self._finalizer()


class VirtioFs(VirtioDevice):
    """A virtio-fs device sharing the host directory ``shared_dir`` under ``tag`` (module
    docstring); ``readonly`` shares it read-only (virtiofsd ``--readonly``: the guest's writes
    fail with EROFS); ``cache`` and ``sandbox`` are virtiofsd's ``--cache`` / ``--sandbox``;
    ``virtiofsd``: the program; ``timeout``: seconds each vhost-user reply may take.

    virtiofsd is started and the vhost-user handshake done here. Raises :class:`FsError` for a
    bad option, a directory that does not exist, virtiofsd missing (naming the package),
    exiting at once (with its last line) or not offering what the transport needs."""

    device_id = ID_FS
    num_queues = NUM_QUEUES

    def __init__(self, shared_dir: str, *, tag: str = DEFAULT_TAG, readonly: bool = False,
                 cache: str = "auto", sandbox: str = "namespace", virtiofsd: Optional[str] = None,
                 timeout: float = REPLY_TIMEOUT):
        self.tag_bytes = check_tag(tag)
        self.tag = tag
        if not isinstance(shared_dir, (str, os.PathLike)):
            raise FsError(f"a shared directory is a path, not {shared_dir!r}")
        path = os.path.abspath(os.fspath(shared_dir))
        if not os.path.isdir(path):
            raise FsError(f"{path}: not a directory (a share must be an existing directory)")
        self.path = path
        self.readonly = bool(readonly)
        self._closed = False
        self._lock = threading.Lock()
        self._handles: Optional[DeviceHandles] = None
        self._started: List[int] = []                   # queues virtiofsd serves now
        self._line: Any = None                          # virtio-mmio: the window's MmioLine
        self._ioev: List[Tuple[int, int, Optional[int], int]] = []   # (addr, len, match, fd)
        self._ioev_vm: Any = None
        self._thread: Optional[threading.Thread] = None
        self.error: Optional[str] = None
        self._count: Dict[str, int] = {"kicks_forwarded": 0, "interrupts": 0,
                                       "backend_dead": 0}
        self._kick: List[int] = []
        self._call: List[int] = []
        self._stopfd = -1
        self.daemon = Virtiofsd(path, readonly=self.readonly, cache=cache, sandbox=sandbox,
                                exe=virtiofsd)
        self.vu = VhostUserFrontend(self.daemon.sock, timeout=timeout, peer="virtiofsd")
        try:
            try:
                self.vu.handshake()
            except VhostUserError as e:
                why = self.daemon.why_exited(wait=1.0)
                raise FsBackendUnavailable(f"share {path}: {why if 'running' not in why else e}") from None
            missing = TRANSPORT_FEATURES & ~self.vu.features
            if missing:
                raise FsBackendUnavailable(f"share {path}: virtiofsd does not offer virtio feature bits "
                              f"{missing:#x} (features {self.vu.features:#x})")
            for _ in range(NUM_QUEUES):
                self._kick.append(os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK))
                self._call.append(os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK))
            self._stopfd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        except BaseException:
            self.close()
            raise

    def __repr__(self) -> str:
        return (f"VirtioFs({self.path!r}, tag={self.tag!r}"
                f"{', ro' if self.readonly else ''}{', closed' if self._closed else ''})")

    @property
    def closed(self) -> bool:
        return self._closed

    # ---- features and configuration ----------------------------------------------------
    def device_features(self) -> int:
        """None of virtio-fs's own (VIRTIO_FS_F_NOTIFICATION is not offered)."""
        return 0

    def config_read(self, offset: int, size: int) -> int:
        """Bytes of ``struct virtio_fs_config``: tag[36], num_request_queues (1)."""
        if offset < 0 or size <= 0:
            return 0
        cfg = self.tag_bytes.ljust(TAG_SIZE, b"\0") + (NUM_QUEUES - 1).to_bytes(4, "little")
        return int.from_bytes(cfg[offset:offset + size], "little")

    # ---- lifecycle -------------------------------------------------------------------
    def activate(self, features: int, queues: Sequence[Optional[Any]],
                 handles: DeviceHandles) -> None:
        """Hand guest RAM and the enabled queues to virtiofsd; a refusal (or a dead virtiofsd)
        sets DEVICE_NEEDS_RESET and :attr:`error`."""
        with self._lock:
            if self._closed:
                return
            self._handles = handles
            try:
                self._start(features, queues)
            except (VhostUserError, _Unshareable) as e:
                self._note_error(str(e))
                broken = True
            else:
                broken = False
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="virtio-fs",
                                                daemon=True)
                self._thread.start()
        if broken:
            handles.needs_reset()
            return
        for i in self._started:                  # buffers made available before DRIVER_OK
            _poke(self._kick[i])

    def _start(self, features: int, queues: Sequence[Optional[Any]]) -> None:
        live = [(i, q) for i, q in enumerate(queues[:NUM_QUEUES]) if q is not None]
        if not live:
            return
        memory = live[0][1]._memory
        regions = []
        for s in memory:
            if not getattr(s, "shared", False):
                raise _Unshareable(f"guest RAM at {s.gpa:#x} is not shared memory: virtio-fs "
                                   "needs the VM's RAM made with shared=True")
            regions.append((s.gpa, s.size, s.host_addr, 0, s.fd))
        self.vu.set_features(features)
        self.vu.set_mem_table(regions)
        for i, q in live:
            hva = [_host_address(memory, gpa, n) for gpa, n in
                   ((q.desc, 16 * q.size), (q.used, 6 + 8 * q.size), (q.avail, 6 + 2 * q.size))]
            _drain(self._call[i])
            self.vu.start_vring(i, q.size, q.last_avail, hva[0], hva[1], hva[2],
                                self._kick[i], self._call[i])
            self._started.append(i)

    def reset(self) -> None:
        """Stop virtiofsd's service of every queue (GET_VRING_BASE) and remove the kick
        registrations; back to the state before :meth:`activate`."""
        with self._lock:
            self._handles = None
            self._line = None
            self._unregister()
            started, self._started = self._started, []
            for i in started:
                try:
                    self.vu.stop_vring(i)
                except VhostUserError as e:
                    self._note_error(str(e))
                    break

    def close(self) -> None:
        """Stop the interrupt thread, stop virtiofsd (killed and reaped), close the socket and
        the eventfds. Idempotent."""
        if self._closed:
            return
        self._closed = True
        with self._lock:
            self._handles = None
            self._unregister()
            self._started = []
        if self._stopfd >= 0:
            _poke(self._stopfd)
        t = self._thread
        if t is not None and t is not threading.current_thread():
            t.join(timeout=10)
        vu = getattr(self, "vu", None)
        if vu is not None:
            vu.close()
        daemon = getattr(self, "daemon", None)
        if daemon is not None:
            daemon.sock.close()
            daemon.stop()
        for fd in self._kick + self._call + [self._stopfd]:
            if fd >= 0:
                os.close(fd)
        self._kick, self._call, self._stopfd = [], [], -1

    def counters(self) -> Dict[str, int]:
        """Module docstring's counters."""
        with self._lock:
            c = dict(self._count)
            c["ioeventfds"] = len(self._ioev)
        c["vhost_messages"] = self.vu.messages if getattr(self, "vu", None) else 0
        return c

    def _note_error(self, why: str) -> None:
        if self.error is None:
            self.error = why

    # ---- notifications ---------------------------------------------------------------
    def notify(self, index: int) -> None:
        """A notification that reached the transport: pass it to virtiofsd's kick eventfd."""
        if 0 <= index < len(self._kick) and index in self._started:
            self._count["kicks_forwarded"] += 1
            _poke(self._kick[index])

    def fastpath_update(self, vm: Any, notify_gpa: Optional[int], msi: Any,
                        line: Any = _PCI) -> None:
        """Called by the transport, under its lock, when where notifications land may have
        changed: register each started queue's kick eventfd with KVM_IOEVENTFD at
        ``notify_gpa`` (virtio-pci, called with three arguments: + 4 x queue, 2 bytes;
        virtio-mmio, which passes ``line``: QueueNotify, 4 bytes, datamatch on the queue),
        or remove them (``vm`` or ``notify_gpa`` None). ``line`` (virtio-mmio): the window's
        :class:`.fastpath.MmioLine` (None: interrupts go through the transport). ``msi`` is
        not used. A refused registration leaves that queue on :meth:`notify`."""
        with self._lock:
            pci = line is _PCI
            self._line = None if pci else line
            want: List[Tuple[int, int, Optional[int], int]] = []
            if vm is not None and notify_gpa is not None and not self._closed:
                for i in self._started:
                    want.append((notify_gpa + 4 * i, 2, None, self._kick[i]) if pci
                                else (notify_gpa, 4, i, self._kick[i]))
            if want == self._ioev and vm is self._ioev_vm:
                return
            self._unregister()
            for addr, n, match, fd in want:
                try:
                    vm.ioeventfd(addr, n, datamatch=match, fd=fd)
                except (PykvmError, OSError):
                    continue
                self._ioev.append((addr, n, match, fd))
            self._ioev_vm = vm if self._ioev else None

    def _unregister(self) -> None:
        vm, regs = self._ioev_vm, self._ioev
        self._ioev, self._ioev_vm = [], None
        for addr, n, match, fd in regs:
            try:
                vm.remove_ioeventfd(addr, n, fd, datamatch=match)
            except (PykvmError, OSError):
                pass

    # ---- the interrupt thread --------------------------------------------------------
    def _run(self) -> None:
        poller = select.poll()
        for fd in self._call + [self._stopfd]:
            poller.register(fd, select.POLLIN)
        sock = self.vu.sock.fileno()
        poller.register(sock, select.POLLRDHUP)      # replies are read by the caller, not here
        index = {fd: i for i, fd in enumerate(self._call)}
        while not self._closed:
            try:
                events = poller.poll()
            except InterruptedError:
                continue
            for fd, _ev in events:
                if fd == self._stopfd or self._closed:
                    return
                if fd == sock:
                    poller.unregister(sock)
                    self._backend_gone()
                    continue
                i = index.get(fd)
                if i is not None and _drain(fd):
                    self._interrupt(i)

    def _interrupt(self, i: int) -> None:
        with self._lock:
            h, line = self._handles, self._line
            if h is None:
                return
            self._count["interrupts"] += 1
        try:
            if line is not None:
                line.signal(INT_VRING)
            elif self._handles is h:
                h.interrupt(INT_VRING, i)
        except (PykvmError, OSError):
            pass                                    # the VM is going away under us

    def _backend_gone(self) -> None:
        if self._closed:
            return
        why = self.daemon.why_exited(wait=0.5)
        self._note_error(why if "running" not in why else "virtiofsd closed the connection")
        with self._lock:
            h = self._handles
            self._count["backend_dead"] += 1
        if h is not None:
            try:
                h.needs_reset()
            except (PykvmError, OSError):
                pass


class _Unshareable(Exception):
    pass


def _host_address(memory: Any, gpa: int, n: int) -> int:
    """Our address of guest-physical ``[gpa, gpa + n)``, which must lie in one slot."""
    s = memory.slot_at(gpa)
    if s is None or not s.contains(gpa, n):
        raise _Unshareable(f"a ring at {gpa:#x} (+{n:#x}) is not inside one memory slot")
    return s.host_addr + (gpa - s.gpa)


def _poke(fd: int) -> None:
    try:
        os.eventfd_write(fd, 1)
    except OSError:
        pass


def _drain(fd: int) -> bool:
    """Read an eventfd (non-blocking); whether it had been signalled."""
    try:
        return os.eventfd_read(fd) > 0
    except (BlockingIOError, OSError):
        return False


_BOOL_WORDS = {"ro": True, "readonly": True, "rw": False}


class ShareSpec:
    """A parsed share description ``DIR[,tag=TAG][,ro|rw][,cache=MODE][,sandbox=MODE]``
    (:meth:`parse`); :meth:`device` makes the :class:`VirtioFs`."""

    __slots__ = ("path", "tag", "readonly", "cache", "sandbox")

    def __init__(self, path: str, tag: str = DEFAULT_TAG, readonly: bool = False,
                 cache: str = "auto", sandbox: str = "namespace"):
        self.path, self.tag, self.readonly = path, tag, readonly
        self.cache, self.sandbox = cache, sandbox

    def __repr__(self) -> str:
        return (f"ShareSpec({self.path!r}, tag={self.tag!r}, readonly={self.readonly}, "
                f"cache={self.cache!r}, sandbox={self.sandbox!r})")

    @classmethod
    def parse(cls, spec: str) -> "ShareSpec":
        """Parse ``DIR[,tag=TAG][,ro][,cache=auto|always|never|metadata]
        [,sandbox=namespace|chroot|none]`` (a comma in DIR written ``,,``; the tag defaults
        to :data:`DEFAULT_TAG`). Checks the words, not the directory. Raises
        :class:`FsError`."""
        if not isinstance(spec, str) or not spec:
            raise FsError(f"a share is DIR[,tag=TAG][,ro], not {spec!r}")
        parts = spec.replace(",,", "\0").split(",")
        path = parts[0].replace("\0", ",")
        if not path:
            raise FsError(f"share {spec!r}: no directory before the options")
        out = cls(path)
        seen = set()
        for word in (p.replace("\0", ",") for p in parts[1:]):
            key, eq, val = word.partition("=")
            if key in seen:
                raise FsError(f"share {path}: {key} given twice")
            seen.add(key)
            if not eq and key in _BOOL_WORDS:
                out.readonly = _BOOL_WORDS[key]
            elif eq and key == "tag":
                check_tag(val)
                out.tag = val
            elif eq and key == "cache" and val in CACHE_MODES:
                out.cache = val
            elif eq and key == "sandbox" and val in SANDBOXES:
                out.sandbox = val
            else:
                raise FsError(f"share {path}: unknown or bad option {word!r} (known: tag=TAG, "
                              f"ro, rw, cache={'|'.join(CACHE_MODES)}, "
                              f"sandbox={'|'.join(SANDBOXES)})")
        return out

    def device(self) -> VirtioFs:
        return VirtioFs(self.path, tag=self.tag, readonly=self.readonly, cache=self.cache,
                        sandbox=self.sandbox)


def share_from_spec(spec: Union[str, ShareSpec]) -> VirtioFs:
    """A :class:`VirtioFs` from ``DIR[,tag=TAG][,ro]...`` (:meth:`ShareSpec.parse`) or a
    :class:`ShareSpec`. Raises :class:`FsError`."""
    return (ShareSpec.parse(spec) if isinstance(spec, str) else spec).device()


__all__ = ["VirtioFs", "Virtiofsd", "ShareSpec", "FsError", "share_from_spec", "find_virtiofsd",
           "check_tag", "ID_FS"]
