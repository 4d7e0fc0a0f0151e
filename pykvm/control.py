"""Control of a running VM through a Unix socket: kvmtool's ``list``, ``pause``, ``resume``,
``stop``, ``stat`` and ``debug --dump``, for ``pykvm run --name NAME`` and for any
:class:`~pykvm.machine.Machine`.

The protocol (docs/control.md): JSON over a Unix stream socket, one request per line (a JSON
object with a ``"cmd"`` string and, optionally, an ``"id"`` echoed back), one response line per
request, in order::

    {"cmd": "pause"}                   ->  {"ok": true, "cmd": "pause", "state": "paused"}
    {"cmd": "fly"}                     ->  {"ok": false, "code": "unknown_cmd", "error": "..."}

Only the VM's owner may connect: the socket is ``<dir>/<name>.sock``, mode 0600, in a directory
of mode 0700 owned by the user (``$PYKVM_CONTROL_DIR``, else ``$XDG_RUNTIME_DIR/pykvm``, else
``/tmp/pykvm-<uid>``), and the server checks each client's uid (``SO_PEERCRED``) and closes
the connection of any other user after one error line.

Serving::

    with Machine(image) as m, ControlServer(m, "web") as srv:   # srv.path: the socket
        m.run()

Asking::

    with Client("web") as c:
        c.pause(); print(c.dump()["vcpus"][0]["regs"]["rip"]); c.resume()

One server thread serves every connection (a selector, no thread per client): a request line
longer than :data:`MAX_LINE` bytes, more than ``max_clients`` connections, a client silent for
``idle_timeout`` seconds or one that does not read its responses each get an error line (where
it can still be sent) and are closed; nothing a client sends reaches the VM but a valid command.
"""
from __future__ import annotations

import errno
import json
import os
import re
import selectors
import socket
import stat as _stat
import struct
import threading
import time

from ._host import HOST_ARCH
from ._ioctl import ioctl
from .abi import ioctls
from .errors import Busy, Closed, PykvmError
from .machine import Machine
from .stats import read_stats

if HOST_ARCH == "riscv64":
    from .arch.riscv import regs as _rv_regs

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Dict, List, Optional

MAX_LINE = 64 << 10            # bytes in one request line, newline excluded
MAX_RESPONSE = 16 << 20        # bytes the client accepts in one response line
MAX_PENDING = 4 << 20          # response bytes a server keeps for a client that does not read
MAX_CLIENTS = 32               # connections one server serves at once
IDLE_TIMEOUT = 30.0            # seconds a connection may stay silent
PAUSE_WAIT = 5.0               # seconds a pause waits for every vCPU to be held
SUFFIX = ".sock"
MAX_PATH = 107                 # bytes in a Unix socket's path (sun_path, NUL excluded)
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z")
COMMANDS = ("status", "pause", "resume", "stop", "stat", "dump", "help")
_CRED = struct.Struct("3i")    # struct ucred: pid, uid, gid
_NOSIGNAL = getattr(socket, "MSG_NOSIGNAL", 0)   # a client gone: EPIPE, never SIGPIPE


class ControlError(PykvmError):
    """A control-socket failure, in one line: a bad VM name, a directory or socket that is not
    safe to use, a duplicate live name, no such VM, a VM that does not answer, or an error
    response (``code``: the response's error code, "" for a local failure)."""

    def __init__(self, message: str, code: str = ""):
        super().__init__(message)
        self.code = code


class NoSuchVm(ControlError):
    """No VM of that name: no socket, or one nobody listens on any more (a stale socket)."""


# -- names and the directory -----------------------------------------------------------------
def check_name(name: str) -> str:
    """``name`` when it is a valid VM name (1-64 of ``A-Z a-z 0-9 _ . -``, starting with a
    letter or digit); ControlError otherwise."""
    if not isinstance(name, str) or not NAME_RE.match(name):
        shown = repr(name) if len(repr(name)) <= 70 else repr(name)[:67] + "..."
        raise ControlError(f"bad VM name {shown}: use 1-64 letters, digits, '_', '.' or '-', "
                           "starting with a letter or digit")
    return name


def default_name() -> str:
    """The name of a VM started without one: ``guest-<pid>`` (kvmtool's convention)."""
    return f"guest-{os.getpid()}"


def default_directory() -> str:
    """Where sockets live: ``$PYKVM_CONTROL_DIR``, else ``$XDG_RUNTIME_DIR/pykvm`` (when that
    directory exists), else ``/tmp/pykvm-<uid>``."""
    d = os.environ.get("PYKVM_CONTROL_DIR")
    if d:
        return d
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg and os.path.isabs(xdg) and os.path.isdir(xdg):
        return os.path.join(xdg, "pykvm")
    return f"/tmp/pykvm-{os.geteuid()}"


def control_directory(directory: Optional[str] = None, *, create: bool = True) -> str:
    """The socket directory (``directory`` or :func:`default_directory`), made with mode 0700
    when missing and ``create``. Raises ControlError (one line) when it is not a directory
    (a symlink counts as not), belongs to another user, or grants the group or others any
    access; :class:`NoSuchVm` when it is missing and not ``create``."""
    d = directory or default_directory()
    if create:
        try:
            os.mkdir(d, 0o700)
        except FileExistsError:
            pass
        except OSError as e:
            raise ControlError(f"cannot make the control directory {d}: "
                               f"{e.strerror or e}") from None
    try:
        st = os.lstat(d)
    except FileNotFoundError:
        raise NoSuchVm(f"the control directory {d} does not exist") from None
    except OSError as e:
        raise ControlError(f"control directory {d}: {e.strerror or e}") from None
    if not _stat.S_ISDIR(st.st_mode):
        raise ControlError(f"control directory {d} is not a directory (a symlink or a file); "
                           "refusing it")
    if st.st_uid != os.geteuid():
        raise ControlError(f"control directory {d} belongs to uid {st.st_uid}, not to you "
                           f"(uid {os.geteuid()}); refusing it: {_private_advice(directory)}")
    if st.st_mode & 0o077:
        raise ControlError(f"control directory {d} has mode {st.st_mode & 0o777:o}: others "
                           f"may use it; refusing it: {_private_advice(directory)}")
    return d


def _private_advice(directory: Optional[str]) -> str:
    """What to do about a control directory refused as not private: choose another one, never
    change a directory that may be shared (chmod of /tmp would break every other user)."""
    if directory:
        return "choose a directory of your own that only you can use (mode 700)"
    if os.environ.get("PYKVM_CONTROL_DIR"):
        return ("unset PYKVM_CONTROL_DIR (for the default directory) or point it at a "
                "directory of your own that only you can use (mode 700)")
    return ("set PYKVM_CONTROL_DIR to a directory of your own that only you can use "
            "(mode 700)")


def socket_path(name: str, directory: Optional[str] = None, *, create: bool = False) -> str:
    """``<directory>/<name>.sock`` for a valid ``name`` (see :func:`check_name`), the directory
    checked by :func:`control_directory`."""
    path = os.path.join(control_directory(directory, create=create), check_name(name) + SUFFIX)
    if len(os.fsencode(path)) > MAX_PATH:
        raise ControlError(f"socket path {path} is longer than the {MAX_PATH} bytes a Unix "
                           "socket takes; use a shorter name or $PYKVM_CONTROL_DIR")
    return path


def _probe(path: str) -> str:
    """"live" when something listens on the socket ``path``, "stale" when nothing does
    (ECONNREFUSED), "missing", or "other" (not a socket, no permission...)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        s.settimeout(2.0)
        s.connect(path)
        return "live"
    except FileNotFoundError:
        return "missing"
    except ConnectionRefusedError:
        return "stale"
    except OSError as e:
        return "live" if e.errno in (errno.EAGAIN, errno.ETIMEDOUT) else "other"
    finally:
        s.close()


def _remove_stale(path: str) -> bool:
    """Remove ``path`` when it is a socket nobody listens on (its inode unchanged between the
    check and the removal, so that a socket a new VM just put there stays). True if removed."""
    try:
        before = os.lstat(path)
    except OSError:
        return False
    if not _stat.S_ISSOCK(before.st_mode) or _probe(path) != "stale":
        return False
    try:
        after = os.lstat(path)
        if (after.st_ino, after.st_dev) == (before.st_ino, before.st_dev):
            os.unlink(path)
            return True
    except OSError:
        pass
    return False


# -- what the commands report ----------------------------------------------------------------
_X86_REGS = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp", "r8", "r9", "r10", "r11",
             "r12", "r13", "r14", "r15", "rip", "rflags")
_X86_SEGS = ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")
_X86_SEG_FIELDS = ("base", "limit", "selector", "type", "present", "dpl", "db", "s", "l", "g",
                   "avl", "unusable")
_X86_CRS = ("cr0", "cr2", "cr3", "cr4", "cr8", "efer", "apic_base")


def vcpu_registers(vcpu) -> dict:
    """The registers of one vCPU that is not in KVM_RUN, as JSON-ready ints: on x86
    ``{"regs": {rax..r15, rip, rflags}, "sregs": {cs..ldt: {base, limit, selector, type,
    present, dpl, db, s, l, g, avl, unusable}, gdt/idt: {base, limit}, cr0, cr2, cr3, cr4,
    cr8, efer, apic_base}}``; on RISC-V ``{"regs": {pc, ra, sp, ... t6}, "mode": 0|1}``
    (KVM_GET_ONE_REG of the core registers). Raises :class:`~pykvm.errors.KvmError`."""
    if HOST_ARCH == "riscv64":
        regs, mode = {}, 0
        for name in _rv_regs.CORE_REGS:
            value = vcpu.get_one_reg(_rv_regs.reg_id("core." + name))
            if name.startswith("regs."):
                regs[name[len("regs."):]] = value
            else:
                mode = value
        return {"regs": regs, "mode": mode}
    r = vcpu.get_regs()
    s = vcpu.get_sregs()
    sregs: Dict[str, object] = {}
    for seg in _X86_SEGS:
        v = getattr(s, seg)
        sregs[seg] = {f: int(getattr(v, f)) for f in _X86_SEG_FIELDS}
    for table in ("gdt", "idt"):
        v = getattr(s, table)
        sregs[table] = {"base": int(v.base), "limit": int(v.limit)}
    for cr in _X86_CRS:
        sregs[cr] = int(getattr(s, cr))
    return {"regs": {n: int(getattr(r, n)) for n in _X86_REGS}, "sregs": sregs}


def machine_state(m: Machine) -> str:
    """"closed", "paused" (every vCPU held by ``pause``), "pausing" (a pause waits for a
    vCPU), "held" (not paused, but every vCPU held by another hold: a debugger's stop, a
    snapshot being written; :meth:`pykvm.machine.Machine.hold`), "running" (a run in
    progress) or "idle" (no run in progress)."""
    if m.closed:
        return "closed"
    if m.paused:
        return "paused"
    holders = m.holders
    if "pause" in holders:
        return "pausing"
    if holders and m.running and any(m.held_for(h) for h in holders):
        return "held"
    return "running" if m.running else "idle"


# -- the protocol ----------------------------------------------------------------------------
class RequestError(ControlError):
    """A request the protocol refuses; ``code`` names why: "bad_json" (not UTF-8 JSON, or
    nested too deeply), "not_object", "bad_request" (no ``"cmd"`` string, or arguments the
    command does not take), "unknown_cmd", "too_long"."""


def validate_request(req: object) -> dict:
    """``req`` (a parsed JSON value) when it is a request the server serves: an object whose
    ``"cmd"`` is one of :data:`COMMANDS`, with no key but ``"cmd"`` and ``"id"``. Raises
    :class:`RequestError` otherwise (messages stay short whatever the input)."""
    if not isinstance(req, dict):
        raise RequestError(f"a request is a JSON object, not {type(req).__name__}",
                           "not_object")
    cmd = req.get("cmd")
    if not isinstance(cmd, str):
        raise RequestError('a request needs "cmd": a string', "bad_request")
    if cmd not in COMMANDS:
        shown = cmd if len(cmd) <= 40 else cmd[:37] + "..."
        raise RequestError(f"unknown command {shown!r}; commands: {', '.join(COMMANDS)}",
                           "unknown_cmd")
    unknown = sorted(k for k in req if k not in ("cmd", "id"))
    if unknown:
        shown = ", ".join(repr(k[:40]) for k in unknown[:5])
        raise RequestError(f"{cmd} takes no arguments (got {shown})", "bad_request")
    return req


def _unique_keys(pairs: list) -> dict:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        dup = next(k for k in keys if keys.count(k) > 1)
        raise ValueError(f"key {dup!r} given twice")
    return dict(pairs)


def _finite(text: str) -> float:
    v = float(text)
    if v != v or v in (float("inf"), float("-inf")):
        raise ValueError(f"number {text[:20]} is out of range")
    return v


def _no_constant(name: str) -> float:
    raise ValueError(f"{name} is not JSON (RFC 8259)")


def loads_strict(line: bytes) -> object:
    """``line`` (UTF-8) as RFC 8259 JSON, stricter than :func:`json.loads`: an object that
    repeats a key, NaN, Infinity and numbers beyond a double's range are refused (a reply could
    not carry them as JSON, and a repeated key would make the request ambiguous). Raises
    ValueError (UnicodeDecodeError included) or RecursionError."""
    return json.loads(line.decode("utf-8"), object_pairs_hook=_unique_keys,
                      parse_float=_finite, parse_constant=_no_constant)


def parse_request(line: bytes) -> dict:
    """One request line (bytes, without its newline) → the request (see
    :func:`validate_request`). Raises :class:`RequestError` ("bad_json" for anything that is
    not UTF-8 JSON as :func:`loads_strict` reads it, including nesting deeper than Python's
    parser takes)."""
    try:
        req = loads_strict(line)
    except (ValueError, RecursionError) as e:
        raise RequestError(f"not a JSON request: {_brief(e)}", "bad_json") from None
    return validate_request(req)


class LineFramer:
    """Cuts a byte stream into lines of at most ``max_line`` bytes (newline excluded)."""

    def __init__(self, max_line: int = MAX_LINE):
        self.max_line = max_line
        self.buf = bytearray()

    def feed(self, data: bytes) -> "tuple[List[bytes], bool]":
        """Add ``data``; return (the complete lines it finished, in order, without their
        newlines; True when a line longer than ``max_line`` came after them, complete or
        not: the stream cannot be followed any more and the buffer is emptied)."""
        self.buf += data
        lines: List[bytes] = []
        while True:
            nl = self.buf.find(b"\n")
            if nl < 0:
                if len(self.buf) > self.max_line:
                    self.buf.clear()
                    return lines, True
                return lines, False
            if nl > self.max_line:
                self.buf.clear()
                return lines, True
            lines.append(bytes(self.buf[:nl]))
            del self.buf[:nl + 1]


# -- the server ------------------------------------------------------------------------------
class _Conn:
    __slots__ = ("sock", "framer", "outbuf", "last", "closing", "events")

    def __init__(self, sock, max_line: int):
        self.sock = sock
        self.framer = LineFramer(max_line)
        self.outbuf = bytearray()
        self.last = time.monotonic()
        self.closing = False          # an error ended it: close once the output is sent
        self.events = selectors.EVENT_READ


def _response(ok: bool, **fields) -> dict:
    d = {"ok": ok}
    d.update(fields)
    return d


def _error(code: str, message: str, **fields) -> dict:
    return _response(False, code=code, error=message, **fields)


class ControlServer:
    """Serve the control protocol for ``machine`` on ``<directory>/<name>.sock`` (or at
    ``path``) from one thread of its own, until :meth:`close`.

    ``name``: the VM's name (:func:`check_name`; default :func:`default_name`).
    ``directory``: the socket directory (default :func:`default_directory`; made 0700,
    refused when unsafe). ``path``: a socket path of the caller's choosing instead (its
    directory is the caller's business). ``idle_timeout``: seconds a connection may stay
    silent; ``max_clients``: connections served at once; ``max_line``: bytes in one request
    line; ``stop_reason``: the ``detail`` of a run ended by the ``stop`` command.

    The socket appears only once it is listening (it is bound under a temporary name, then
    linked into place), so a name that exists belongs to a live server or a dead one: a live
    one makes the constructor raise :class:`ControlError` ("already running"), a stale one is
    removed. Raises ControlError for a bad name or directory, OSError when the host refuses a
    socket or a thread."""

    def __init__(self, machine: Machine, name: Optional[str] = None, *,
                 directory: Optional[str] = None, path: Optional[str] = None,
                 idle_timeout: float = IDLE_TIMEOUT, max_clients: int = MAX_CLIENTS,
                 max_line: int = MAX_LINE, stop_reason: Optional[str] = None):
        self.machine = machine
        self.name = check_name(name if name is not None else default_name())
        self.idle_timeout = float(idle_timeout)
        self.max_clients = int(max_clients)
        self.max_line = int(max_line)
        self.refused = 0              # connections closed for another uid or too many clients
        self.stop_reason = stop_reason or f"stopped through the control socket ({self.name})"
        self._conns: Dict[int, _Conn] = {}
        self._closed = False
        self._close_lock = threading.Lock()
        self._sel = selectors.DefaultSelector()
        self._wake_r = self._wake_w = -1
        self._thread: Optional[threading.Thread] = None
        self._ino: Optional[tuple] = None
        self._listener: Optional[socket.socket] = None
        self._stats_fds: Optional[List[int]] = None   # each vCPU's KVM stats fd, once opened
        try:
            if not machine.running:
                try:
                    self._vcpu_stats_fds()     # now, while no vCPU holds its mutex in KVM_RUN
                except Exception:              # noqa: BLE001 — `stat` says it, if asked
                    pass
            self.path = path if path is not None else socket_path(self.name, directory,
                                                                  create=True)
            self._listener = self._bind()
            self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
            self._sel.register(self._listener, selectors.EVENT_READ, "listen")
            self._sel.register(self._wake_r, selectors.EVENT_READ, "wake")
            self._thread = threading.Thread(target=self._serve, name=f"control-{self.name}",
                                            daemon=True)
            self._thread.start()
        except BaseException:
            self.close()
            raise

    def _bind(self) -> socket.socket:
        """Listen on a temporary name beside :attr:`path`, then link it to :attr:`path`
        (refused if a live server holds that name; a stale socket there is removed)."""
        d, base = os.path.split(self.path)
        tmp = os.path.join(d or ".", f".{base}.{os.getpid()}.{threading.get_ident()}.tmp")
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            s.bind(tmp)
            os.chmod(tmp, 0o600)
            s.listen(64)
            s.setblocking(False)
            for _ in range(2):
                try:
                    os.link(tmp, self.path)
                    break
                except FileExistsError:
                    self._check_taken()
                except OSError:                # a file system without hard links to sockets
                    if os.path.lexists(self.path):
                        self._check_taken()
                        continue
                    os.rename(tmp, self.path)
                    break
            else:
                raise ControlError(f"cannot take the name {self.name!r}: {self.path} keeps "
                                   "coming back")
            st = os.lstat(self.path)
            self._ino = (st.st_ino, st.st_dev)
        except BaseException:
            s.close()
            raise
        finally:
            try:
                os.unlink(tmp)
            except OSError:
                pass
        return s

    def _check_taken(self) -> None:
        """:attr:`path` exists: remove it when it is a stale socket, else raise ControlError
        (a live VM of this name, or a file that is not a socket)."""
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return
        if not _stat.S_ISSOCK(st.st_mode):
            raise ControlError(f"{self.path} exists and is not a socket; refusing to replace "
                               "it")
        if not _remove_stale(self.path) and os.path.lexists(self.path):
            raise ControlError(f"a VM named {self.name!r} is already running (its socket is "
                               f"{self.path})")

    # -- the serving thread ----------------------------------------------------------------
    def _serve(self) -> None:
        sel = self._sel
        while not self._closed:
            try:
                events = sel.select(timeout=min(1.0, self.idle_timeout))
            except (OSError, ValueError):      # the selector was closed under us
                return
            for key, mask in events:
                if key.data == "wake":
                    try:
                        os.read(self._wake_r, 64)
                    except OSError:
                        pass
                elif key.data == "listen":
                    self._accept()
                else:
                    conn = self._conns.get(key.fd)
                    if conn is None:
                        continue
                    try:
                        if mask & selectors.EVENT_READ:
                            self._read(conn)
                        if mask & selectors.EVENT_WRITE and key.fd in self._conns:
                            self._write(conn)
                    except Exception:          # noqa: BLE001 — one client, never the server
                        self._drop(conn)
            now = time.monotonic()
            for conn in [c for c in self._conns.values()
                         if now - c.last > self.idle_timeout]:
                self._fail(conn, _error("idle", f"no complete request in "
                                        f"{self.idle_timeout:g} s; closing"))

    def _accept(self) -> None:
        assert self._listener is not None
        while True:
            try:
                sock, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:                    # out of fds (EMFILE...), a client gone
                return
            sock.setblocking(False)
            try:
                pid, uid, gid = _CRED.unpack(sock.getsockopt(socket.SOL_SOCKET,
                                                             socket.SO_PEERCRED, _CRED.size))
            except OSError:
                uid = -1
            if uid != os.geteuid():
                self.refused += 1
                self._send_and_close(sock, _error("denied", "permission denied: this VM "
                                                  "belongs to another user"))
                continue
            if len(self._conns) >= self.max_clients:
                self.refused += 1
                self._send_and_close(sock, _error("busy", f"too many connections (at most "
                                                  f"{self.max_clients}); try again"))
                continue
            conn = _Conn(sock, self.max_line)
            self._conns[sock.fileno()] = conn
            self._sel.register(sock, selectors.EVENT_READ, "conn")

    @staticmethod
    def _send_and_close(sock, resp: dict) -> None:
        try:
            sock.send((json.dumps(resp) + "\n").encode(), _NOSIGNAL)
        except OSError:
            pass
        _close_quietly(sock)

    def _read(self, conn: _Conn) -> None:
        if conn.closing:
            return
        try:
            data = conn.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(conn)
            return
        if not data:                           # the client went away (mid-request or not)
            self._drop(conn)
            return
        conn.last = time.monotonic()
        lines, too_long = conn.framer.feed(data)
        for line in lines:
            if not line.strip():
                continue                       # blank lines are nothing
            self._queue(conn, self.handle_line(line))
            if conn.sock.fileno() < 0:         # dropped while answering
                return
        if too_long:
            self._fail(conn, _error("too_long", f"request longer than {self.max_line} bytes; "
                                    "closing"))

    def _queue(self, conn: _Conn, resp: dict) -> None:
        try:
            text = json.dumps(resp)
        except (TypeError, ValueError) as e:   # a value JSON cannot hold: say so instead
            text = json.dumps(_error("failed", f"response not serializable: {e}"))
        conn.outbuf += text.encode() + b"\n"
        if len(conn.outbuf) > MAX_PENDING:     # a client that sends but never reads
            self._drop(conn)
            return
        self._write(conn)

    def _write(self, conn: _Conn) -> None:
        while conn.outbuf:
            try:
                n = conn.sock.send(conn.outbuf, _NOSIGNAL)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                self._drop(conn)
                return
            del conn.outbuf[:n]
        if not conn.outbuf and conn.closing:
            self._drop(conn)
            return
        want = selectors.EVENT_READ | (selectors.EVENT_WRITE if conn.outbuf else 0)
        if want != conn.events:
            conn.events = want
            self._sel.modify(conn.sock, want, "conn")

    def _fail(self, conn: _Conn, resp: dict) -> None:
        """Send ``resp`` (an error) and close the connection once it is out."""
        self._queue(conn, resp)
        if conn.sock.fileno() in self._conns:
            conn.closing = True
            if not conn.outbuf:
                self._drop(conn)

    def _drop(self, conn: _Conn) -> None:
        fd = conn.sock.fileno()
        if self._conns.pop(fd, None) is None:
            return
        try:
            self._sel.unregister(conn.sock)
        except (KeyError, ValueError, OSError):
            pass
        _close_quietly(conn.sock)

    # -- the protocol ----------------------------------------------------------------------
    def handle_line(self, line: bytes) -> dict:
        """The response (a dict) to one request line (bytes, no newline): the parsed request
        goes to :meth:`handle`; a line that is not UTF-8 JSON, not an object or without a
        ``"cmd"`` string gets an error response (``code`` "bad_json", "not_object",
        "bad_request"). Never raises."""
        try:
            req = loads_strict(line)
        except (ValueError, RecursionError) as e:
            return _error("bad_json", f"not a JSON request: {_brief(e)}")
        return self.handle(req)

    def handle(self, req: object) -> dict:
        """The response (a dict) to one parsed request. Never raises: an unknown command,
        arguments a command does not take, a closed machine or a failure while serving give
        ``{"ok": false, "code": ..., "error": ...}``."""
        extra = {"id": req["id"]} if isinstance(req, dict) and "id" in req else {}
        try:
            validate_request(req)
        except RequestError as e:
            return _error(e.code, str(e), **extra)
        assert isinstance(req, dict)
        cmd = req["cmd"]
        try:
            fields = getattr(self, "_cmd_" + cmd)()
        except Closed:
            return _error("closed", "the VM is closed", cmd=cmd, **extra)
        except Exception as e:                 # noqa: BLE001 — a response, never a crash
            return _error("failed", f"{cmd} failed: {_brief(e)}", cmd=cmd, **extra)
        if "error" in fields:
            return _response(False, cmd=cmd, **fields, **extra)
        return _response(True, cmd=cmd, **fields, **extra)

    def _cmd_help(self) -> dict:
        return {"commands": list(COMMANDS)}

    def _cmd_status(self) -> dict:
        m = self.machine
        platform = getattr(m, "platform", None)
        return {"name": self.name, "pid": os.getpid(), "state": machine_state(m),
                "vcpus": m.vcpu_count, "guest": m.image_name,
                "machine": getattr(platform, "name", None), "arch": HOST_ARCH}

    def _cmd_pause(self) -> dict:
        if self.machine.pause(timeout=PAUSE_WAIT):
            return {"state": "paused"}
        return {"code": "timeout", "state": machine_state(self.machine),
                "error": f"not every vCPU was held within {PAUSE_WAIT:g} s; the pause stays "
                         "requested"}

    def _cmd_resume(self) -> dict:
        self.machine.resume()
        return {"state": machine_state(self.machine)}

    def _cmd_stop(self) -> dict:
        self.machine.stop(self.stop_reason)
        return {"state": "stopping"}

    def _vcpu_stats_fds(self) -> List[int]:
        """Each vCPU's KVM binary-stats fd (KVM_GET_STATS_FD), opened on first need and kept
        until :meth:`close`: reading one needs no vCPU ioctl, but opening one does, and a vCPU
        ioctl waits while the vCPU is in KVM_RUN, so a running machine is paused briefly for
        the opening. Raises ControlError when it cannot be held in time."""
        if self._stats_fds is not None:
            return self._stats_fds
        m = self.machine
        fds: List[int] = []
        try:
            with m.holding("opening the vCPUs' stats", PAUSE_WAIT):
                for v in m.vcpus:
                    fds.append(ioctl(v.fd, ioctls.KVM_GET_STATS_FD))
        except Busy:
            raise ControlError(f"could not hold every vCPU within {PAUSE_WAIT:g} s to open "
                               "its stats") from None
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        if self._closed:                       # closed meanwhile: keep nothing open
            for fd in fds:
                os.close(fd)
            raise Closed("the control server is closed")
        self._stats_fds = fds
        return fds

    def _cmd_stat(self) -> dict:
        m = self.machine
        m._check_open()
        exits: Dict[str, int] = {}
        for lp in m.loops:
            for k, v in (getattr(lp, "counts", None) or {}).items():
                exits[k] = exits.get(k, 0) + v
        return {"state": machine_state(m), "vm": m.vm.stats(),
                "vcpus": [read_stats(fd) for fd in self._vcpu_stats_fds()], "exits": exits,
                "devices": m.device_counters()}

    def _cmd_dump(self) -> dict:
        """Registers of every vCPU: read while the machine is paused, pausing it for the
        reading when it was not (then resuming it)."""
        m = self.machine
        was_paused = m.paused
        try:
            with m.holding("reading the registers", PAUSE_WAIT):
                vcpus = [dict(index=i, **vcpu_registers(v)) for i, v in enumerate(m.vcpus)]
        except Busy:
            return {"code": "timeout", "error": f"could not hold every vCPU within "
                    f"{PAUSE_WAIT:g} s to read its registers"}
        return {"arch": HOST_ARCH, "paused_for_dump": not was_paused, "vcpus": vcpus}

    # -- lifecycle -------------------------------------------------------------------------
    @property
    def connections(self) -> int:
        """Connections being served now."""
        return len(self._conns)

    @property
    def closed(self) -> bool:
        """True once :meth:`close` has begun."""
        return self._closed

    def close(self) -> None:
        """Stop serving: end the thread, close every connection and the socket, and remove
        the socket file (only if it is still this server's). Idempotent; any thread but the
        server's own."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        if self._wake_w >= 0:
            try:
                os.write(self._wake_w, b"x")
            except OSError:
                pass
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        for conn in list(self._conns.values()):
            self._drop(conn)
        if self._ino is not None:
            try:
                st = os.lstat(self.path)
                if (st.st_ino, st.st_dev) == self._ino:
                    os.unlink(self.path)
            except OSError:
                pass
        self._sel.close()
        if self._listener is not None:
            self._listener.close()
        for fd in (self._wake_r, self._wake_w, *(self._stats_fds or ())):
            if fd >= 0:
                os.close(fd)
        self._wake_r = self._wake_w = -1
        self._stats_fds = None

    def __enter__(self) -> "ControlServer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def serve(machine: Machine, name: Optional[str] = None, **options) -> ControlServer:
    """Start a :class:`ControlServer` for ``machine`` (the options as its constructor's)."""
    return ControlServer(machine, name, **options)


def _close_quietly(sock: socket.socket) -> None:
    """Close a client's connection so that it still reads what was sent to it: end our side
    (EOF after the last response), then discard what the client sent that was not read (a
    Unix socket closed with unread data makes the peer's next read fail with ECONNRESET,
    losing the error line). Never blocks, never raises."""
    try:
        sock.shutdown(socket.SHUT_WR)
        for _ in range(16):
            if not sock.recv(65536, socket.MSG_DONTWAIT):
                break
    except OSError:                            # nothing waiting (EAGAIN), or the peer gone
        pass
    sock.close()


def _brief(e: BaseException) -> str:
    text = str(e).strip()
    text = text.splitlines()[0] if text else type(e).__name__
    return text if len(text) <= 200 else text[:197] + "..."


# -- the client ------------------------------------------------------------------------------
class Client:
    """A connection to the control socket of VM ``name`` (in ``directory``, default
    :func:`default_directory`) or to the socket at ``path``.

    :meth:`request` sends one request and returns the response dict; the verbs
    (:meth:`status`, :meth:`pause`, :meth:`resume`, :meth:`stop`, :meth:`stat`, :meth:`dump`)
    return it too, raising :class:`ControlError` (its ``code`` the response's) when the
    response says ``"ok": false``. ``timeout``: seconds to wait for each response.

    Raises :class:`NoSuchVm` when there is no such VM (no socket, or a stale one nobody
    listens on), ControlError for a bad name, an unsafe directory, a connection the server
    refused or closed, or a response that is not one JSON line."""

    def __init__(self, name: Optional[str] = None, *, directory: Optional[str] = None,
                 path: Optional[str] = None, timeout: float = 10.0):
        if path is None:
            if name is None:
                raise ControlError("Client needs a VM name or a socket path")
            try:
                path = socket_path(name, directory)
            except NoSuchVm as e:
                raise NoSuchVm(f"no VM named {name!r} ({e})") from None
        self.path = path
        self.name = name
        self._buf = bytearray()
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self._sock.settimeout(timeout)
        label = repr(name) if name is not None else path
        try:
            end = time.monotonic() + timeout
            while True:
                try:
                    self._sock.connect(path)
                    break
                except BlockingIOError:        # the server's backlog is full: it is busy
                    if time.monotonic() >= end:
                        raise
                    time.sleep(0.01)
        except FileNotFoundError:
            self._sock.close()
            raise NoSuchVm(f"no VM named {label} (no socket {path})") from None
        except ConnectionRefusedError:
            self._sock.close()
            raise NoSuchVm(f"no VM named {label} is running (its socket {path} is stale)") \
                from None
        except OSError as e:
            self._sock.close()
            raise ControlError(f"cannot connect to {path}: {e.strerror or e}") from None

    def request(self, cmd: str, **args) -> dict:
        """Send ``{"cmd": cmd, **args}`` and return the response (a dict; ``"ok"`` says
        whether it succeeded). Raises ControlError when the connection fails or the response
        is not one JSON object within :data:`MAX_RESPONSE` bytes."""
        req = dict(args, cmd=cmd)
        try:
            self._sock.sendall((json.dumps(req) + "\n").encode())
        except OSError as e:
            # a server that refused the connection (busy) wrote why before closing: say that
            try:
                resp = json.loads(self._read_line())
            except (ControlError, ValueError):
                resp = None
            if isinstance(resp, dict) and resp.get("ok") is False:
                return resp
            raise ControlError(f"{self.path}: cannot send: {e.strerror or e}") from None
        line = self._read_line()
        try:
            resp = json.loads(line)
        except ValueError:
            raise ControlError(f"{self.path}: the response is not JSON") from None
        if not isinstance(resp, dict):
            raise ControlError(f"{self.path}: the response is not a JSON object")
        return resp

    def _read_line(self) -> bytes:
        while True:
            nl = self._buf.find(b"\n")
            if nl >= 0:
                line = bytes(self._buf[:nl])
                del self._buf[:nl + 1]
                return line
            if len(self._buf) > MAX_RESPONSE:
                raise ControlError(f"{self.path}: response longer than {MAX_RESPONSE} bytes")
            try:
                data = self._sock.recv(65536)
            except socket.timeout:
                raise ControlError(f"{self.path}: no response in time") from None
            except OSError as e:
                raise ControlError(f"{self.path}: {e.strerror or e}") from None
            if not data:
                raise ControlError(f"{self.path}: the VM closed the connection")
            self._buf += data

    def call(self, cmd: str, **args) -> dict:
        """:meth:`request`, raising :class:`ControlError` (with the response's ``code``) when
        the response is an error."""
        resp = self.request(cmd, **args)
        if not resp.get("ok"):
            raise ControlError(str(resp.get("error") or "request failed"),
                               str(resp.get("code") or ""))
        return resp

    def status(self) -> dict:
        """``{"name", "pid", "state", "vcpus", "guest", "machine", "arch"}`` of the VM."""
        return self.call("status")

    def pause(self) -> dict:
        """Pause the VM (every vCPU held out of KVM_RUN); ``{"state": "paused"}``."""
        return self.call("pause")

    def resume(self) -> dict:
        """Let a paused VM run on."""
        return self.call("resume")

    def stop(self) -> dict:
        """End the VM's run (``pykvm run`` exits 0, saying it was stopped)."""
        return self.call("stop")

    def stat(self) -> dict:
        """KVM's binary stats of the VM (``"vm"``) and of each vCPU (``"vcpus"``), exit
        counts (``"exits"``) and virtio device counters (``"devices"``)."""
        return self.call("stat")

    def dump(self) -> dict:
        """The registers of every vCPU (``"vcpus"``: ``[{"index", "regs", "sregs"}]`` on
        x86; see :func:`vcpu_registers`)."""
        return self.call("dump")

    def close(self) -> None:
        """Close the connection (idempotent)."""
        self._sock.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def list_vms(directory: Optional[str] = None) -> List[dict]:
    """The VMs whose sockets are in ``directory`` (default :func:`default_directory`), sorted
    by name: each one's ``status`` response (``"ok"`` false and ``"error"`` for one that
    does not answer properly). Stale sockets (nobody listening) are removed and not listed.
    [] when the directory does not exist; ControlError when it is not safe to use."""
    try:
        d = control_directory(directory, create=False)
    except NoSuchVm:
        return []
    out = []
    for entry in sorted(os.listdir(d)):
        if entry.startswith(".") or not entry.endswith(SUFFIX):
            continue
        name = entry[:-len(SUFFIX)]
        path = os.path.join(d, entry)
        if not NAME_RE.match(name):
            continue
        if _remove_stale(path):
            continue
        try:
            with Client(name, path=path, timeout=5.0) as c:
                resp = c.request("status")
        except NoSuchVm:
            continue
        except ControlError as e:
            resp = _error("unreachable", str(e))
        resp.setdefault("name", name)
        out.append(resp)
    return out
