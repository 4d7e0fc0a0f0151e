"""The GDB stub's common code: a listening socket, one client at a time, the remote serial
protocol's packets (GDB manual, Appendix E), all-stop over a hold of the machine, one
thread per vCPU (thread id = vCPU index + 1), memory by guest-virtual address, breakpoint
bookkeeping. Everything that differs between architectures goes through the
:class:`~pykvm.gdbstub.arch.GdbTarget` that :func:`~pykvm.gdbstub.targets.target_for` picks.

How a debug stop holds the machine (all-stop): the stub installs a handler (through
:meth:`pykvm.machine.Machine.on`) for each of the target's ``stop_exits``. On the vCPU's own
thread the handler asks the target whether the exit is a debug stop; if so it records it and
takes the machine's hold of owner ``"gdb"`` (:meth:`~pykvm.machine.Machine.hold`) without
waiting, then returns so the vCPU's loop takes the hold's kick: every vCPU is then held out of
KVM_RUN in its own thread, where the stub's thread may use their ioctls (registers,
KVM_TRANSLATE, KVM_SET_GUEST_DEBUG). ``c``, ``s`` and ``vCont`` set each vCPU up
(:meth:`GdbTarget.prepare_resume`) and release the hold.
Ctrl-C (the 0x03 byte) holds and reports SIGINT. The hold is the stub's own: ``pykvm resume``
(:meth:`~pykvm.machine.Machine.resume`, which ends only a ``pause``) does not let a guest go
that gdb has stopped, and a ``pause`` stays in force when gdb continues.
An exit that is not a debug stop goes on as without the stub (the handler that was there
before, else the platform, else it ends the run)."""
from __future__ import annotations

import contextlib
import errno
import os
import select
import socket
import stat
import sys
import threading
import weakref

from ..errors import Busy, Closed, GuestMemoryError, KvmError, PykvmError
from . import packets as pk
from .arch import (SIGINT, SIGTRAP, Z_ACCESS_WATCH, Z_SW_BREAK, Z_WRITE_WATCH, GuestAccess, Stop,
                   TargetError, Unsupported)
from .targets import target_for

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Callable, Dict, List, Optional, Tuple

_PAGE = 4096
GDB = "gdb"                    # the owner of the stub's hold (Machine.hold)
_EFAULT, _EINVAL, _EBUSY, _EEXIST, _ENOSPC = 14, 22, 16, 17, 28
# packets that read or change the stopped guest's registers, memory or breakpoints: served
# inside Machine.holding(), so that another thread's snapshot, checkpoint or reset (which may
# enter KVM_RUN to complete a pending exit, and reads every vCPU) is never interleaved with them
_STATE_PACKETS = frozenset(b"gGpPmMXZz")
# packets that resume the stopped guest (or detach, which resumes it; and the target
# description, which reads vCPU 0's mode the first time): they load guest-debug
# state into every vCPU (KVM_SET_GUEST_DEBUG), so they too are served inside
# Machine.holding(): a snapshot, checkpoint or reset in another thread completes pending exits
# with KVM_RUN, and a resume served meanwhile had been refused E10 (vCPU busy)
_RESUME_PACKETS = frozenset(b"cCsSD")
_STATE_WAIT = 10.0                     # seconds a packet waits for another thread's block
_SEND_TIMEOUT = 10.0          # seconds a reply may wait for a client that does not read

#: the most software breakpoints (Z0) planted at once; one more is answered E1c (ENOSPC)
MAX_BREAKPOINTS = 1024
#: the most write watchpoints the stub emulates (Z2 beyond the target's debug registers)
MAX_SOFT_WATCHES = 64
#: the most bytes those emulated watchpoints watch in total (each keeps a copy of its bytes)
MAX_WATCHED_BYTES = 0x10000

# the live server of each machine (one at a time: two clients would fight over breakpoints)
_SERVERS: "weakref.WeakKeyDictionary[Any, GdbServer]" = weakref.WeakKeyDictionary()
_SERVERS_LOCK = threading.Lock()


class GdbAddressError(ValueError, PykvmError):
    """A listening address the stub cannot parse (want ``tcp::PORT``, ``tcp:HOST:PORT`` or
    ``unix:PATH``)."""


class GdbAddressInUse(PykvmError, OSError):
    """``unix:PATH`` names the socket of a live server (it accepts a connection, or its
    backlog is full, or it cannot be probed): it is left alone, not unlinked. An
    :class:`OSError` with errno EADDRINUSE."""


class GdbServerExists(Busy):
    """The machine already has a live :class:`GdbServer` (named in the message, and in
    :attr:`server`); close it before serving the machine again."""

    def __init__(self, message: str, server: "GdbServer"):
        super().__init__(message)
        self.server = server


def parse_address(address: str) -> Tuple[str, Any]:
    """``("tcp", (host, port))`` or ``("unix", path)`` for QEMU's ``-gdb`` spellings:
    ``tcp::PORT`` (localhost), ``tcp:HOST:PORT`` (``[v6]`` brackets allowed), ``unix:PATH``;
    PORT 0 picks a free port. Raises :class:`GdbAddressError` otherwise."""
    if not isinstance(address, str):
        raise GdbAddressError(f"a gdb address is a string, not {address!r}")
    kind, sep, rest = address.partition(":")
    if sep and kind == "unix":
        if not rest or "\0" in rest:
            raise GdbAddressError(f"bad unix socket path in {address!r}")
        return "unix", rest
    if sep and kind == "tcp":
        host, sep2, port = rest.rpartition(":")
        if not sep2 or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise GdbAddressError(f"bad TCP port in {address!r} (tcp::PORT or tcp:HOST:PORT)")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        return "tcp", (host or "127.0.0.1", int(port))
    raise GdbAddressError(f"bad gdb address {address!r}: tcp::PORT, tcp:HOST:PORT or "
                          "unix:PATH")


class _Memory(GuestAccess):
    """Guest-virtual memory of one vCPU: translated page by page by the target, read and
    written in guest RAM (never outside it: :class:`~pykvm.memory.GuestMemory` checks)."""

    def __init__(self, server: "GdbServer", index: int):
        self.server, self.index = server, index

    def _pieces(self, gva: int, n: int):
        if gva < 0 or n < 0 or gva + n > 1 << 64:
            raise TargetError(f"address range {gva:#x}+{n:#x} outside the address space",
                              _EFAULT)
        s = self.server
        vcpu = s.machine.vcpus[self.index]
        while n > 0:
            page = gva & ~(_PAGE - 1)
            chunk = min(n, page + _PAGE - gva)
            try:
                gpa = s.target.translate(vcpu, page)
            except KvmError as e:
                raise TargetError(f"cannot translate {gva:#x}: {e}", _EFAULT) from None
            if gpa is None:
                raise TargetError(f"{gva:#x} is not mapped", _EFAULT)
            yield gva, gpa + (gva - page), chunk
            gva += chunk
            n -= chunk

    def read(self, gva: int, n: int) -> bytes:
        out = bytearray()
        for _v, gpa, chunk in self._pieces(gva, n):
            try:
                out += self.server.machine.memory.read(gpa, chunk)
            except GuestMemoryError:
                raise TargetError(f"GPA {gpa:#x} is not guest RAM", _EFAULT) from None
        return bytes(out)

    def read_partial(self, gva: int, n: int) -> bytes:
        """As :meth:`read`, but what could be read before the first unmapped page (gdb
        takes a short ``m`` reply); raises only when not even the first byte is readable."""
        out = bytearray()
        try:
            for _v, gpa, chunk in self._pieces(gva, n):
                out += self.server.machine.memory.read(gpa, chunk)
        except (TargetError, GuestMemoryError):
            if not out:
                raise TargetError(f"{gva:#x} is not readable", _EFAULT) from None
        return bytes(out)

    def check(self, gva: int, n: int) -> List[Tuple[int, int]]:
        """The (GPA, length) pieces of ``[gva, gva + n)``, every page translated and every
        piece inside guest RAM; raises :class:`TargetError` (EFAULT) otherwise, before
        anything is written."""
        pieces = [(gpa, k) for _v, gpa, k in self._pieces(gva, n)]
        mem = self.server.machine.memory
        for gpa, k in pieces:
            if not any(sl.contains(gpa, k) for sl in mem):
                raise TargetError(f"GPA {gpa:#x}+{k:#x} is not guest RAM", _EFAULT)
        return pieces

    def write(self, gva: int, data: bytes) -> None:
        pieces = self.check(gva, len(data))   # all mapped and in RAM before any write
        off = 0
        for gpa, chunk in pieces:
            try:
                self.server.machine.memory.write(gpa, data[off:off + chunk])
            except GuestMemoryError:
                raise TargetError(f"GPA {gpa:#x} is not guest RAM", _EFAULT) from None
            off += chunk


class _TargetMemory(_Memory):
    """The guest memory a target is given (:class:`~pykvm.gdbstub.arch.GuestAccess`): its
    writes are temporary instruction patches (RISC-V's step ``ebreak``), kept as the
    machine's RAM patches so that snapshots and baselines never hold them. A write where the
    target has no patch plants one; the next write there removes it, putting back the guest's
    own bytes as the machine recorded them (after a reset, what RAM holds then). A write over
    a gdb breakpoint (the same instruction, as a step onto it plants) is written as it is."""

    def write(self, gva: int, data: bytes) -> None:
        s = self.server
        m = s.machine
        off = 0
        for gpa, n in self.check(gva, len(data)):
            chunk = bytes(data[off:off + n])
            off += n
            if gpa in s._target_patches:
                s._target_patches.discard(gpa)
                m.unpatch_ram(gpa)
                continue
            try:
                m.patch_ram(gpa, chunk)
            except ValueError:                   # a gdb breakpoint's bytes: written as is
                m.memory.write(gpa, chunk)
                continue
            s._target_patches.add(gpa)


class _SoftWatch:
    """A write watchpoint the stub emulates: the GPA pieces of the watched GVA range (taken
    when it was set) and their bytes when the vCPUs last resumed."""
    __slots__ = ("gva", "kind", "pieces", "value")

    def __init__(self, gva: int, kind: int, pieces: List[Tuple[int, int]]):
        self.gva, self.kind, self.pieces, self.value = gva, kind, pieces, b""

    def read(self, memory: Any) -> bytes:
        return b"".join(memory.read(gpa, n) for gpa, n in self.pieces)


class _Breakpoint:
    """A planted software breakpoint: its GVA, the instruction bytes planted and the GPA
    pieces they sit in (taken when planted, so that removing it writes back where it was
    planted whichever vCPU's page tables are current then). Each piece is a host patch of
    the machine (:meth:`pykvm.machine.Machine.patch_ram`), which keeps the guest's bytes it
    replaced (:meth:`saved`): snapshots and resets see those, not the breakpoint."""
    __slots__ = ("gva", "insn", "pieces")

    def __init__(self, gva: int, insn: bytes, pieces: List[Tuple[int, int]]):
        self.gva, self.insn, self.pieces = gva, insn, pieces

    def saved(self, machine: Any) -> bytes:
        """The guest's own bytes under the breakpoint (as the machine's patches hold them)."""
        out = b""
        for gpa, n in self.pieces:
            entry = machine.ram_patches.get(gpa)
            out += entry[0] if entry is not None else self.insn[len(out):len(out) + n]
        return out


class GdbServer:
    """A GDB remote-protocol server for ``machine`` (:class:`pykvm.machine.Machine`) on
    ``address`` (see :func:`parse_address`; ``tcp::0`` picks a free port, read
    :attr:`address`). ``wait``: hold every vCPU before its first instruction until a debugger
    attaches and continues (QEMU's ``-S``, pykvm's ``--gdb-wait``).

    Serves one client at a time, on a thread of its own, from now until :meth:`close` or
    the machine's close (then the client is hung up on and the listening socket closed;
    :meth:`close` still gives back the rest). Start it before the run. Run the machine with
    :meth:`run` (or :meth:`pykvm.machine.Machine.run`: then a run that ends between the
    stub's checks, every 50 ms, is still reported when gdb next asks).

    Raises :class:`GdbAddressError` for a bad address, :class:`OSError` when it cannot
    listen there (port taken, unix path that exists and is not a socket), and
    :class:`~pykvm.errors.PykvmError` for an architecture the stub does not serve."""

    def __init__(self, machine: Any, address: str = "tcp::1234", *, wait: bool = False,
                 log: Optional[Callable[[str], None]] = None):
        if machine.closed:
            raise Closed("Machine is closed")
        kind, where = parse_address(address)
        with _SERVERS_LOCK:
            other = _SERVERS.get(machine)
            if other is not None and other._live():
                raise GdbServerExists(f"the machine already has a gdb server on "
                                      f"{other.address}; close it first", other)
            self._closing = True                 # not live until the socket listens
            self._released = True
            _SERVERS[machine] = self
        self.machine = machine
        self.target = target_for(machine)
        self._log = log
        self._lock = threading.RLock()           # debug state: breakpoints, stops, target
        self._sw: Dict[int, _Breakpoint] = {}    # planted software breakpoints by GVA
        self._hw: List[Tuple[int, int, int]] = []  # (ztype, gva, kind) given to the target
        self._soft: List[_SoftWatch] = []         # write watchpoints emulated by stepping
        self._target_patches: set = set()         # GPAs the target patched (_TargetMemory)
        self._gdb_step: Optional[int] = None     # the vCPU gdb asked to step, if any
        self._stops: List[Tuple[int, Stop]] = []  # debug stops recorded by vCPU threads
        self._attached = False
        self._unix_path: Optional[str] = None
        self._sock = self._listen(kind, where)
        self._wake_r, self._wake_w = os.pipe()
        self._fds = weakref.finalize(self, _close_fds, self._wake_r, self._wake_w)
        self._closing = False
        self._released = False
        self._prev: Dict[str, Optional[Callable]] = {}
        self._docs: Optional[Dict[str, str]] = None
        self._exit_status: Optional[int] = None  # the run's status once it ended
        self._seen_running = False
        self._thread: Optional[threading.Thread] = None
        try:
            for name in self.target.stop_exits:
                self._prev[name] = machine.handlers.get(name)
                machine.on(name, self._on_exit)
            if wait:
                machine.hold(GDB, timeout=None)  # held as the run starts, until gdb resumes
            self._thread = threading.Thread(target=self._serve, name="gdbstub", daemon=True)
            self._thread.start()
        except BaseException:
            self.close()
            raise

    def _live(self) -> bool:
        """Listening and not closed (what a second server for the machine is refused by)."""
        return not self._closing and not self._released and not self.machine.closed

    # -- the socket ------------------------------------------------------------------------
    def _listen(self, kind: str, where: Any) -> socket.socket:
        if kind == "unix":
            path = where
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                st = None
            if st is not None:
                if not stat.S_ISSOCK(st.st_mode):
                    raise FileExistsError(17, f"{path} exists and is not a socket", path)
                if _unix_listener_alive(path):
                    raise GdbAddressInUse(errno.EADDRINUSE, f"{path} is the socket of a live "
                                          "server (it accepts connections); left alone", path)
                os.unlink(path)                  # a stale socket of an earlier run
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.bind(path)
                s.listen(1)
            except BaseException:
                s.close()
                raise
            self._unix_path = path
            return s
        host, port = where
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        s = socket.socket(family, socket.SOCK_STREAM)
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, port))
            s.listen(1)
        except BaseException:
            s.close()
            raise
        return s

    @property
    def address(self) -> str:
        """Where the server listens, as an address this module parses (``tcp:HOST:PORT`` with
        the port actually bound, or ``unix:PATH``)."""
        if self._unix_path is not None:
            return f"unix:{self._unix_path}"
        host, port = self._sock.getsockname()[:2]
        return f"tcp:{host}:{port}" if ":" not in host else f"tcp:[{host}]:{port}"

    @property
    def port(self) -> Optional[int]:
        """The TCP port bound (None for a unix socket)."""
        return None if self._unix_path is not None else self._sock.getsockname()[1]

    @property
    def attached(self) -> bool:
        """True while a client is connected."""
        return self._attached

    def _say(self, line: str) -> None:
        if self._log is not None:
            try:
                self._log(line)
            except Exception:  # noqa: BLE001 — a log line is never worth the server
                pass

    # -- running the machine ---------------------------------------------------------------
    def run(self, timeout: Optional[float] = None):
        """:meth:`pykvm.machine.Machine.run` (``timeout`` seconds, None: none), telling the
        client how it ended (``W`` and the run's status) as it ends. Returns the
        :class:`~pykvm.machine.RunResult`; raises what the machine's run raises."""
        self._seen_running = True
        status = 255
        try:
            result = self.machine.run(timeout)
            status = result.exit_code & 0xFF
            return result
        finally:
            self._exit_status = status
            self._wake()

    def _run_over(self) -> bool:
        if self._exit_status is not None:
            return True
        m = self.machine
        if m.closed:
            return True
        if m.running:
            self._seen_running = True
            return False
        return self._seen_running

    # -- the vCPU side: exits that may be debug stops --------------------------------------
    def _on_exit(self, machine: Any, index: int, ex: Any) -> Optional[object]:
        """The handler of the target's stop exits, on vCPU ``index``'s thread."""
        with self._lock:
            planted = tuple(self._sw)
            armed = self._attached or bool(planted) or bool(self._hw) or bool(self._soft)
            stop = None
            vcpu = machine.vcpus[index]
            if armed and not self._closing:
                stop = self.target.classify_stop(vcpu, ex, planted)
                if stop is None and self.target.give_to_guest(vcpu, ex):
                    return None                  # the guest's own trap, delivered to it
            if stop is not None and not stop.reason and self._soft:   # a step: watched?
                hit = self._soft_hit()
                if hit is not None:
                    stop = Stop(reason="watch", addr=hit.gva)
                elif self._gdb_step != index:      # nothing changed: step on, no stop
                    mem = self._target_memory(index)
                    self.target.stopped(vcpu, mem)
                    self.target.prepare_resume(vcpu, step=True, sw_breakpoints=bool(planted),
                                               mem=mem)
                    return None
            if stop is not None:
                if not self._stops:
                    self._stops.append((index, stop))
        if stop is None:
            prev = self._prev.get(ex.name)
            if prev is not None:
                return prev(machine, index, ex)
            return None if machine.platform.handle_exit(index, ex) else True
        machine.hold(GDB, timeout=None)          # every vCPU, this one included, is held
        self._wake()
        return None

    def _soft_hit(self) -> Optional[_SoftWatch]:
        """The first emulated watchpoint whose bytes changed (its value updated), or None."""
        for w in self._soft:
            try:
                now = w.read(self.machine.memory)
            except GuestMemoryError:
                continue
            if now != w.value:
                w.value = now
                return w
        return None

    # -- lifecycle -------------------------------------------------------------------------
    def _wake(self) -> None:
        if not self._fds.alive:
            return
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass                                 # full (a wake-up is pending) or closed

    def close(self) -> None:
        """Stop serving (idempotent, any thread but the server's own): the client is detached
        (breakpoints removed, guest debugging off, the machine resumed when the stub held
        it), the socket closed (a unix socket's path removed), the thread joined, the exit
        handlers given back."""
        with self._lock:
            if self._closing:
                return
            self._closing = True
        with _SERVERS_LOCK:
            if _SERVERS.get(self.machine) is self:
                del _SERVERS[self.machine]
        self._wake()
        t = self._thread
        if t is not None and t is not threading.current_thread():
            t.join(30)
        self._release()
        if t is None or not t.is_alive():
            self._fds()                          # the wake-up pipe, once nobody selects on it
        m = self.machine
        if not m.closed:
            for name, prev in self._prev.items():
                try:
                    if m.handlers.get(name) == self._on_exit:
                        m.on(name, prev)
                except (Closed, ValueError):
                    pass

    def __enter__(self) -> "GdbServer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _release(self) -> None:
        """Close the listening socket and remove a unix socket's path (idempotent)."""
        with self._lock:
            if self._released:
                return
            self._released = True
        try:
            self._sock.close()
        except OSError:
            pass
        if self._unix_path is not None:
            try:
                os.unlink(self._unix_path)
            except OSError:
                pass

    def _serve(self) -> None:
        try:
            self._accept_loop()
        finally:
            try:
                self._detach()
            except Exception:  # noqa: BLE001
                pass
            self._release()                      # also when the machine closed under us

    def _accept_loop(self) -> None:
        while not self._closing and not self.machine.closed:
            try:
                watched: List[Any] = [self._sock, self._wake_r]
                r, _, _ = select.select(watched, [], [], 0.5)
            except (OSError, ValueError):
                return
            if self._wake_r in r:
                self._drain_wake()
            if self._sock in r and not self._closing:
                try:
                    conn, peer = self._sock.accept()
                except OSError:
                    continue
                session: Optional[_Session] = None
                try:
                    self._say("gdb client connected from " + (
                        f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) and len(peer) >= 2
                        else "a unix socket"))
                    session = _Session(self, conn)
                    session.serve()
                except Exception as e:  # noqa: BLE001 — a session's bug never ends the server
                    self._say(f"gdb session ended: {type(e).__name__}: {e}")
                finally:
                    try:
                        conn.close()
                    except OSError:
                        pass
                    try:                         # a peer that never sent a byte (a probe)
                        if session is None or session.attached:   # changed nothing
                            self._detach()
                    except Exception as e:  # noqa: BLE001
                        self._say(f"gdb detach failed: {type(e).__name__}: {e}")

    def _drain_wake(self) -> None:
        try:
            os.read(self._wake_r, 4096)
        except OSError:
            pass

    # -- debug state ----------------------------------------------------------------------
    def _memory(self, index: int) -> _Memory:
        return _Memory(self, index)

    def _target_memory(self, index: int) -> _TargetMemory:
        return _TargetMemory(self, index)

    def _hold_all(self, timeout: float = 5.0) -> bool:
        """Pause the machine (every vCPU out of KVM_RUN); True when all are held."""
        m = self.machine
        if m.closed:
            return False
        return m.hold(GDB, timeout=timeout)

    def _detach(self) -> None:
        """Forget the client: remove every breakpoint and hardware point, guest debugging
        off, resume the machine (the guest runs on as without a debugger)."""
        with self._lock:
            was = self._attached
            self._attached = False
            if not (was or self._sw or self._hw or self.machine.held_for(GDB)):
                return
        m = self.machine
        if not m.closed:
            self._hold_all()                      # not under the lock: vCPU handlers take it
        with self._lock:
            if m.closed:
                self._sw.clear()
                self._hw.clear()
                self._target_patches.clear()
                return
            for bp in list(self._sw.values()):
                self._unplant(bp)
            self._sw.clear()
            for ztype, gva, kind in self._hw:
                try:
                    self.target.remove_hw(ztype, gva, kind)
                except (TargetError, Unsupported):
                    pass
            self._hw.clear()
            self._soft.clear()
            self._gdb_step = None
            for i, vcpu in enumerate(m.vcpus):
                try:
                    self.target.prepare_resume(vcpu, step=False, sw_breakpoints=False,
                                               mem=self._target_memory(i))
                except (PykvmError, TargetError):
                    pass
            for gpa in list(self._target_patches):   # none left normally: stopped() undid them
                try:
                    m.unpatch_ram(gpa)
                except PykvmError:
                    pass
            self._target_patches.clear()
            self._stops.clear()
            try:
                m.release(GDB)
            except Closed:
                pass

    def _unplant(self, bp: _Breakpoint) -> None:
        for gpa, _n in bp.pieces:
            try:
                self.machine.unpatch_ram(gpa)     # the guest's own bytes back
            except PykvmError:
                pass                              # the RAM went away: nothing to restore


class _Session:
    """One client's connection (on the server's thread)."""

    def __init__(self, server: GdbServer, conn: socket.socket):
        self.s = server
        self.m = server.machine
        self.conn = conn
        conn.settimeout(_SEND_TIMEOUT)
        if conn.family in (socket.AF_INET, socket.AF_INET6):
            # small request/reply packets: no Nagle delay waiting for the client's ACK
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.ack_owed = False                    # a '+' to send before the next reply
        self.reader = pk.PacketReader()
        self.ack = True
        self.last_reply = b""
        self.running = False                     # resumed; a stop reply is owed
        self.gthread = 0                         # vCPU index for g/G/p/P/m/M
        self.cthread = 0                         # vCPU index for s
        self.last_stop: Optional[bytes] = None
        self.done = False
        self.attached = False                    # the client's first bytes came
        self.watch_mode_said = ""                # the watchpoint mode last logged (_watch_mode)

    # -- I/O --------------------------------------------------------------------------------
    def send(self, payload: bytes) -> None:
        data = pk.frame(payload)
        self.last_reply = data
        if self.ack_owed:
            self.ack_owed = False
            data = b"+" + data
        self.conn.sendall(data)

    def _attach(self) -> None:
        """The client's first bytes: it is attached, and finds the target stopped. (Not at
        connect: a peer that connects and hangs up without a byte, as a second pykvm probing
        whether this unix socket is live, leaves the guest untouched.)"""
        s = self.s
        with s._lock:
            s._attached = True
        s._hold_all(10.0)
        self.last_stop = self._take_stop(default_signal=SIGTRAP)
        self.attached = True

    def serve(self) -> None:
        s = self.s
        while not self.done and not s._closing:
            try:
                watched: List[Any] = [self.conn, s._wake_r]
                r, _, _ = select.select(watched, [], [], 0.05 if self.running else 0.5)
            except (OSError, ValueError):
                return
            if s._wake_r in r:
                s._drain_wake()
            if self.conn in r:
                try:
                    data = self.conn.recv(65536)
                except OSError:
                    return
                if not data:
                    s._say("gdb client disconnected")
                    return
                if not self.attached:
                    self._attach()
                for ev in self.reader.feed(data):
                    self._event(ev)
                    if self.done:
                        return
            if self.running:
                self._poll_stop()
            if self.m.closed:
                return                           # the machine is gone: so is the session

    def _event(self, ev: pk.Event) -> None:
        if ev.kind == "interrupt":
            if self.running:
                self.s._hold_all()
                self._report_stop(SIGINT)
            return
        if ev.kind == "nak":
            if self.ack and self.last_reply:
                self.conn.sendall(self.last_reply)
            return
        if ev.kind == "ack":
            return
        if ev.kind == "bad":
            if self.ack:
                self.conn.sendall(b"-")
            return
        self.ack_owed = self.ack                 # sent with the reply: one segment, not two
        reply = self._dispatch_safely(ev.data)
        if reply is not None:
            self.send(reply)
        if self.ack_owed:                        # no reply now (a resume): the ack alone
            self.ack_owed = False
            self.conn.sendall(b"+")
        if ev.data == b"QStartNoAckMode" and reply == b"OK":
            self.ack = False

    def _dispatch_safely(self, data: bytes) -> Optional[bytes]:
        try:
            first = data[:1]
            if first == b"D":                    # a detach happens, held or (closed) not
                with contextlib.ExitStack() as block:
                    try:
                        block.enter_context(self.m.holding("gdb detach", _STATE_WAIT))
                    except (Busy, Closed):
                        pass
                    return self.dispatch(data)
            if not self.running and first and (
                    data[0] in _STATE_PACKETS or data[0] in _RESUME_PACKETS or
                    data.startswith((b"vCont;", b"qXfer:features:read:"))):
                with self.m.holding("gdb", _STATE_WAIT):
                    return self.dispatch(data)
            return self.dispatch(data)
        except pk.PacketError:
            return b"E%02x" % _EINVAL
        except TargetError as e:
            return b"E%02x" % (e.errno & 0xFF)
        except Unsupported:
            return b""
        except GuestMemoryError:
            return b"E%02x" % _EFAULT
        except Busy:
            return b"E%02x" % _EBUSY
        except Closed:
            return b"E%02x" % _EBUSY
        except Exception as e:  # noqa: BLE001 — a bug answers E01, the server goes on
            self.s._say(f"gdb packet {data[:40]!r} failed: {type(e).__name__}: {e}")
            return b"E01"

    # -- stops ------------------------------------------------------------------------------
    def _take_stop(self, default_signal: int) -> bytes:
        """The stop reply for the stop that holds the machine now (a recorded debug stop,
        else ``default_signal`` on the current thread); the target undoes its step plumbing
        first."""
        s = self.s
        if s._exit_status is not None or (s._run_over() and not self.m.held_for(GDB)):
            return self._exit_reply()
        with s._lock:
            index, stop = s._stops[0] if s._stops else (self.cthread, Stop(signal=default_signal))
            s._stops.clear()
            for i, vcpu in enumerate(self.m.vcpus):
                try:
                    s.target.stopped(vcpu, s._target_memory(i))
                except (PykvmError, TargetError):
                    pass
        self.gthread = self.cthread = index
        reply = b"T%02xthread:%x;" % (stop.signal, index + 1)
        if stop.reason in ("watch", "rwatch", "awatch") and stop.addr is not None:
            reply += b"%s:%x;" % (stop.reason.encode(), stop.addr)
        elif stop.reason:
            reply += stop.reason.encode() + b":;"
        return reply

    def _exit_reply(self) -> bytes:
        st = self.s._exit_status
        return b"W%02x" % (0 if st is None else st & 0xFF)

    def _report_stop(self, default_signal: int) -> None:
        self.running = False
        self.last_stop = self._take_stop(default_signal)
        self.send(self.last_stop)

    def _poll_stop(self) -> None:
        s = self.s
        with s._lock:
            pending = bool(s._stops)
        if pending and self.m.held_for(GDB):
            self._report_stop(SIGTRAP)
        elif s._run_over():
            self.running = False
            self.last_stop = self._exit_reply()
            self.send(self.last_stop)

    def _resume(self, step_index: Optional[int]) -> Optional[bytes]:
        s = self.s
        if s._run_over() and not self.m.held_for(GDB):
            self.last_stop = self._exit_reply()
            return self.last_stop
        with s._lock:
            if s._stops:                         # a stop came while gdb was busy: report it
                self.last_stop = self._take_stop(SIGTRAP)
                return self.last_stop
            if step_index is not None and step_index in self.m.finished_vcpus:
                # a vCPU whose guest reported done is never resumed (Machine.finished_vcpus):
                # its step could never end, and the others ran on to the guest's end (a
                # stop at once instead makes gdb's next/step spin for ever on an unchanged
                # pc). The step is refused (gdb: "Remote failure reply: E16", the thread
                # stopped where it is) and nothing runs.
                s._say(f"vCPU {step_index} reported done: gdb's step of it is refused")
                return b"E%02x" % _EINVAL
            for w in s._soft:                    # gdb may have written them meanwhile
                w.value = w.read(self.m.memory)
            s._gdb_step = step_index
            for i, vcpu in enumerate(self.m.vcpus):
                s.target.prepare_resume(vcpu, step=(i == step_index) or bool(s._soft),
                                        sw_breakpoints=bool(s._sw),
                                        mem=s._target_memory(i))
            self.running = True
            s._seen_running = s._seen_running or self.m.running
            self.m.release(GDB)
        return None

    # -- packets ----------------------------------------------------------------------------
    def _thread_index(self, tid: int, *, allow_all: bool = True) -> int:
        """The vCPU index of thread ``tid`` (1-based); -1 for ``0`` (any) and ``-1`` (all)
        where ``allow_all``, else those are refused. Raises :class:`TargetError` (EINVAL) for
        a thread that does not exist."""
        n = len(self.m.vcpus)
        if tid in (0, -1):
            if allow_all:
                return -1
            raise TargetError(f"thread id {tid} names no one thread", _EINVAL)
        if not 1 <= tid <= n:
            raise TargetError(f"no thread {tid}", _EINVAL)
        return tid - 1

    def _vcpu(self, index: int):
        return self.m.vcpus[max(index, 0)]

    def _need_stopped(self) -> None:
        if self.running:
            raise Busy("the target is running")

    def dispatch(self, data: bytes) -> Optional[bytes]:
        """The reply to one packet (None: no reply now — a resume, whose stop reply comes
        later, or a kill)."""
        if not data:
            return b""
        c, rest = data[:1], data[1:]
        if c == b"?":
            if self.running:
                return None
            return self.last_stop or self._take_stop(SIGTRAP)
        if c == b"q":
            return self._query(data)
        if c == b"Q":
            return b"OK" if data == b"QStartNoAckMode" else b""
        if c == b"H":
            if rest[:1] not in (b"g", b"c"):
                return b"E%02x" % _EINVAL
            idx = self._thread_index(pk.parse_signed_hex(rest[1:]))
            if rest[:1] == b"g":
                self.gthread = max(idx, 0)
            else:
                self.cthread = max(idx, 0)
            return b"OK"
        if c == b"T":
            self._thread_index(pk.parse_signed_hex(rest), allow_all=False)
            return b"OK"
        if c == b"g":
            self._need_stopped()
            return pk.hex_encode(self.s.target.read_registers(self._vcpu(self.gthread)))
        if c == b"G":
            self._need_stopped()
            self.s.target.write_registers(self._vcpu(self.gthread), pk.hex_decode(rest))
            return b"OK"
        if c == b"p":
            self._need_stopped()
            return pk.hex_encode(self.s.target.read_register(self._vcpu(self.gthread),
                                                             pk.parse_hex(rest)))
        if c == b"P":
            self._need_stopped()
            num, sep, v = rest.partition(b"=")
            if not sep:
                raise pk.PacketError("P needs n=value")
            self.s.target.write_register(self._vcpu(self.gthread), pk.parse_hex(num),
                                         pk.hex_decode(v))
            return b"OK"
        if c == b"m":
            self._need_stopped()
            addr, n = pk.parse_addr_len(rest)
            return pk.hex_encode(self._read(addr, n))
        if c in (b"M", b"X"):
            self._need_stopped()
            head, sep, payload = rest.partition(b":")
            if not sep:
                raise pk.PacketError(f"{c.decode()} needs addr,length:data")
            addr, n = pk.parse_addr_len(head)
            blob = pk.hex_decode(payload) if c == b"M" else pk.unescape(payload)
            if len(blob) != n:
                raise pk.PacketError(f"{len(blob)} bytes of data for a length of {n}")
            self._write(addr, blob)
            return b"OK"
        if c in (b"c", b"C", b"s", b"S"):
            self._need_stopped()
            if c in (b"C", b"S"):                # C sig[;addr]: the signal is not delivered
                sig, _, rest = rest.partition(b";")
                pk.parse_hex(sig, max_digits=2)
            if rest:                             # all parsed before resuming: a bad one is E
                pk.parse_hex(rest)
                raise pk.PacketError("resuming at another address is not supported")
            return self._resume(None if c in (b"c", b"C") else self.cthread)
        if c == b"v":
            return self._v(data)
        if c in (b"Z", b"z"):
            self._need_stopped()
            return self._z(c == b"Z", rest)
        if c == b"D":
            self.send(b"OK")
            self.s._detach()
            self.done = True
            return None
        if c == b"k":
            self._kill()
            return None
        return b""

    def _kill(self) -> None:
        try:
            self.m.stop("killed by gdb")
        except Closed:
            pass
        self.done = True

    def _query(self, data: bytes) -> bytes:
        if data.startswith(b"qSupported"):
            return (b"PacketSize=%x;qXfer:features:read+;swbreak+;hwbreak+;"
                    b"QStartNoAckMode+;vContSupported+" % pk.MAX_PACKET)
        if data.startswith(b"qXfer:features:read:"):
            annex, sep, span = data[len(b"qXfer:features:read:"):].partition(b":")
            if not sep:
                raise pk.PacketError("qXfer needs annex:offset,length")
            off, n = pk.parse_addr_len(span, max_len=pk.MAX_PACKET // 2)
            docs = self._documents()
            doc = docs.get(annex.decode("ascii", "replace"))
            if doc is None:
                return b"E00"
            raw = doc.encode()
            chunk = raw[off:off + n]
            return (b"m" if off + n < len(raw) else b"l") + pk.escape(chunk)
        if data == b"qAttached" or data.startswith(b"qAttached:"):
            return b"1"
        if data == b"qC":
            return b"QC%x" % (self.gthread + 1)
        if data == b"qfThreadInfo":
            return b"m" + b",".join(b"%x" % (i + 1) for i in range(len(self.m.vcpus)))
        if data == b"qsThreadInfo":
            return b"l"
        if data.startswith(b"qThreadExtraInfo,"):
            idx = self._thread_index(pk.parse_hex(data[len(b"qThreadExtraInfo,"):]),
                                     allow_all=False)
            done = " (done)" if idx in self.m.finished_vcpus else ""
            return pk.hex_encode(f"vCPU {idx}{done}".encode())
        if data.startswith(b"qSymbol"):
            return b"OK"
        return b""

    def _documents(self) -> Dict[str, str]:
        s = self.s
        if s._docs is None:
            self._need_stopped()
            s._docs = s.target.documents(self.m.vcpus[0])
        return s._docs

    def _v(self, data: bytes) -> Optional[bytes]:
        if data == b"vCont?":
            return b"vCont;c;C;s;S"
        if data.startswith(b"vCont;"):
            self._need_stopped()
            step: Optional[int] = None
            for action in data[len(b"vCont;"):].split(b";"):   # all parsed before resuming
                verb, sep, tid = action.partition(b":")
                if verb[:1] not in (b"c", b"C", b"s", b"S") or \
                        (len(verb) > 1 and verb[:1] in (b"c", b"s")):
                    raise pk.PacketError(f"bad vCont action {action[:20]!r}")
                if len(verb) > 1:
                    pk.parse_hex(verb[1:], max_digits=2)          # C/S's signal number
                idx = self._thread_index(pk.parse_signed_hex(tid)) if sep else -1
                if verb[:1] in (b"s", b"S") and step is None:
                    step = idx if idx >= 0 else self.cthread
            return self._resume(step)
        if data.startswith(b"vKill"):
            self.send(b"OK")
            self._kill()
            return None
        return b""

    def _z(self, insert: bool, rest: bytes) -> bytes:
        parts = rest.split(b";", 1)[0].split(b",")
        if len(parts) != 3:
            raise pk.PacketError("Z/z needs type,addr,kind")
        ztype, gva, kind = (pk.parse_hex(p) for p in parts)
        if ztype > Z_ACCESS_WATCH:               # RSP: types 0-4; another is not supported
            raise Unsupported(f"breakpoint type {ztype}")
        s = self.s
        with s._lock:
            soft = [w for w in s._soft if (w.gva, w.kind) == (gva, kind)]
            if ztype == Z_WRITE_WATCH and (soft or not insert and
                                           (ztype, gva, kind) not in s._hw):
                if not insert:
                    for w in soft:
                        s._soft.remove(w)
                return b"OK"
            if ztype == Z_SW_BREAK:
                if insert:
                    self._plant(gva, kind)
                else:
                    bp = s._sw.pop(gva, None)
                    if bp is not None:
                        s._unplant(bp)
                return b"OK"
            if insert:
                if (ztype, gva, kind) not in s._hw:
                    try:
                        s.target.insert_hw(ztype, gva, kind)
                    except Unsupported:
                        if ztype != Z_WRITE_WATCH:
                            raise
                        self._soft_watch(gva, kind)
                        self._watch_mode("emulated by single-stepping every vCPU (data "
                                         "breakpoints do not fire on this host)")
                        return b"OK"
                    s._hw.append((ztype, gva, kind))
                    if ztype in (Z_WRITE_WATCH, Z_ACCESS_WATCH):
                        self._watch_mode("in the target's debug registers (hardware)")
            else:
                if (ztype, gva, kind) in s._hw:
                    s.target.remove_hw(ztype, gva, kind)
                    s._hw.remove((ztype, gva, kind))
            return b"OK"

    def _watch_mode(self, how: str) -> None:
        """Log (the server's ``log``; ``pykvm run``: stderr) how this session's watchpoints
        are served, once per session and again only when that changes, as "pykvm: gdb
        watchpoints: HOW": gdb says "Hardware watchpoint" either way."""
        if how != self.watch_mode_said:
            self.watch_mode_said = how
            self.s._say(f"gdb watchpoints: {how}")

    def _soft_watch(self, gva: int, kind: int) -> None:
        if not 1 <= kind <= pk.MAX_MEMORY:
            raise TargetError(f"cannot watch {kind} bytes", _EINVAL)
        s = self.s
        watched = sum(w.kind for w in s._soft)
        if len(s._soft) >= MAX_SOFT_WATCHES or watched + kind > MAX_WATCHED_BYTES:
            raise TargetError(f"at most {MAX_SOFT_WATCHES} emulated watchpoints of "
                              f"{MAX_WATCHED_BYTES} bytes in total ({watched} watched)",
                              _ENOSPC)
        pieces = s._memory(self.gthread).check(gva, kind)
        w = _SoftWatch(gva, kind, pieces)
        try:
            w.value = w.read(self.m.memory)
        except GuestMemoryError:
            raise TargetError(f"{gva:#x} is not guest RAM", _EFAULT) from None
        s._soft.append(w)

    def _plant(self, gva: int, kind: int) -> None:
        s = self.s
        if gva in s._sw:
            return
        if len(s._sw) >= MAX_BREAKPOINTS:
            raise TargetError(f"at most {MAX_BREAKPOINTS} breakpoints", _ENOSPC)
        insn = s.target.breakpoint_bytes(kind)
        pieces = s._memory(self.gthread).check(gva, len(insn))   # all of it, before a write
        self._patch(insn, pieces)
        s._sw[gva] = _Breakpoint(gva, insn, pieces)

    def _patch(self, insn: bytes, pieces: List[Tuple[int, int]]) -> None:
        """Plant ``insn`` over ``pieces`` as the machine's RAM patches, all or none."""
        done: List[int] = []
        off = 0
        try:
            for gpa, n in pieces:
                try:
                    self.m.patch_ram(gpa, insn[off:off + n])
                except ValueError:               # another breakpoint's bytes (an alias)
                    raise TargetError(f"GPA {gpa:#x} already holds a breakpoint",
                                      _EEXIST) from None
                done.append(gpa)
                off += n
        except BaseException:
            for gpa in done:
                self.m.unpatch_ram(gpa)
            raise

    def _shadowed(self, addr: int, n: int):
        """The planted breakpoints overlapping [addr, addr+n)."""
        for bp in self.s._sw.values():
            if bp.gva < addr + n and addr < bp.gva + len(bp.insn):
                yield bp

    def _read(self, addr: int, n: int) -> bytes:
        with self.s._lock:
            data = bytearray(self.s._memory(self.gthread).read_partial(addr, n)) if n else \
                bytearray()
            for bp in self._shadowed(addr, len(data)):     # show the original bytes
                for k, b in enumerate(bp.saved(self.m)):
                    if 0 <= bp.gva + k - addr < len(data):
                        data[bp.gva + k - addr] = b
            return bytes(data)

    def _write(self, addr: int, blob: bytes) -> None:
        if not blob:
            return
        with self.s._lock:
            mem = self.s._memory(self.gthread)
            mem.check(addr, len(blob))                   # the whole range, before any write
            shadowed = list(self._shadowed(addr, len(blob)))
            for bp in shadowed:                          # written under the breakpoint: the
                for gpa, _n in bp.pieces:                # new bytes become its original ones
                    self.m.unpatch_ram(gpa)
            try:
                mem.write(addr, blob)
            finally:
                for bp in shadowed:
                    self._patch(bp.insn, bp.pieces)      # planted again


def serve(machine: Any, address: str = "tcp::1234", *, wait: bool = False,
          log: Optional[Callable[[str], None]] = None) -> GdbServer:
    """Start a :class:`GdbServer` for ``machine`` on ``address`` (``wait``: hold the guest
    before its first instruction until gdb continues). ``log``: called with one line (str)
    per connection event. See :class:`GdbServer` for what it raises."""
    return GdbServer(machine, address, wait=wait, log=log)


def _unix_listener_alive(path: str) -> bool:
    """True when something accepts connections on the unix socket ``path`` (a connect that
    succeeds, or finds the backlog full), or when that cannot be told (no permission):
    then the socket is not removed. False for a stale socket (ECONNREFUSED)."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.setblocking(False)
        err = probe.connect_ex(path)
    except OSError as e:
        err = e.errno or errno.EIO
    finally:
        probe.close()
    return err not in (errno.ECONNREFUSED, errno.ENOENT)


def _close_fds(*fds: int) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def stderr_log(line: str) -> None:
    """Write ``pykvm: <line>`` to standard error (the CLI's log of connection events)."""
    print(f"pykvm: {line}", file=sys.stderr, flush=True)
