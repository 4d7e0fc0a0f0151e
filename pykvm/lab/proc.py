"""Child processes of a lab, how a lab ends on a signal, and the cache's file locks.

Every child a lab starts (QEMU, ``make``, the cross compiler, the .pyc precompiler, ``zstd``) goes
through :func:`popen` / :func:`run`:

* it gets its own session and process group, so stopping it is one ``killpg`` that takes its own
  children along (``make``'s compilers, ``compileall``'s workers);
* it is registered until it has been waited for, so :func:`stop_all` can end whatever is left;
* it gets ``PR_SET_PDEATHSIG(SIGKILL)``: should the lab itself be killed outright (SIGKILL, no chance
  to clean up), the kernel kills the child too, so no QEMU is ever orphaned.

The command line (``python -m pykvm.lab``) calls :func:`install_signal_handlers`: the first SIGINT,
SIGTERM or SIGHUP makes every later one ignored (cleanup must not be interrupted) and raises
:class:`Interrupted` in the main thread.  ``finally`` blocks on the way out stop QEMU and remove
temporary files; the command line then stops any remaining child and prints one line.

:func:`cache_lock` is an ``fcntl.flock`` on ``<cache>/locks/<key>.lock``: two labs sharing one
cache take it around each download, unpack and base-image build, so the second waits for the first
and then reuses its result instead of writing into the same files.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import fcntl
import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Iterator

from . import progress

PR_SET_PDEATHSIG = 1
SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

_children: dict[int, tuple[subprocess.Popen, bool]] = {}  # pid -> (process, own process group)
_lock = threading.Lock()
_prctl = None


class Interrupted(KeyboardInterrupt):
    """The lab received SIGINT, SIGTERM or SIGHUP; ``status`` is the conventional 128 + signal."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum
        self.name = signal.Signals(signum).name
        self.status = 128 + signum


def _handler(signum, frame) -> None:
    for s in SIGNALS:
        signal.signal(s, signal.SIG_IGN)
    progress.silence(clear=False)  # the bars are cleared on the way out (pykvm.lab.__main__)
    raise Interrupted(signum)


def install_signal_handlers() -> None:
    """Turn the first SIGINT/SIGTERM/SIGHUP into :class:`Interrupted`; ignore later ones."""
    for s in SIGNALS:
        signal.signal(s, _handler)


def _get_prctl():
    global _prctl
    if _prctl is None:
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
            fn = libc.prctl
            fn.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
            fn.restype = ctypes.c_int
            _prctl = fn
        except (OSError, AttributeError):
            _prctl = False
    return _prctl


def _child_setup(prctl, parent: int):
    """preexec_fn: die with the parent; take the signals :func:`popen` blocks around the fork."""

    kill = int(signal.SIGKILL)

    def setup() -> None:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)
        if prctl:
            prctl(PR_SET_PDEATHSIG, kill, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before the prctl: follow it now
            os.kill(os.getpid(), kill)

    return setup


def popen(argv: list[str], *, new_session: bool = True, **kw) -> subprocess.Popen:
    """``subprocess.Popen`` in its own session (unless ``new_session=False``, e.g. for a program that
    needs the terminal), killed by the kernel if the lab dies, and registered for :func:`stop_all`."""
    setup = _child_setup(_get_prctl(), os.getpid())
    # no interrupt between the fork and the registration (it would orphan the child): the signals
    # wait, blocked, and arrive right after (the child unblocks them for itself in `setup`)
    old = signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
    try:
        p = subprocess.Popen(argv, start_new_session=new_session, preexec_fn=setup, **kw)
        with _lock:
            _children[p.pid] = (p, new_session)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
    return p


def forget(p: subprocess.Popen) -> None:
    with _lock:
        _children.pop(p.pid, None)


def _exited(pid: int) -> bool:
    """Has child ``pid`` exited?  Without reaping it: while it is unreaped its pid, and so its process
    group id, cannot be reused, which keeps a later ``killpg`` aimed at its own group."""
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


def stop(p: subprocess.Popen, grace: float = 3.0) -> None:
    """End ``p`` (its whole process group when it has its own) and wait for it.

    SIGTERM first, so that ``make`` deletes the half-written target it was building; then SIGKILL for
    whatever of the group is left when the leader has gone or ``grace`` seconds have passed."""
    with _lock:
        own_group = _children.get(p.pid, (p, True))[1]

    def send(sig: int) -> None:
        try:
            if own_group:
                os.killpg(p.pid, sig)
            else:
                p.send_signal(sig)
        except (ProcessLookupError, PermissionError):
            pass

    if p.returncode is None:  # not reaped by us yet, so p.pid is still its own
        send(signal.SIGTERM)
        deadline = time.monotonic() + grace
        while not _exited(p.pid) and time.monotonic() < deadline:
            time.sleep(0.02)
        send(signal.SIGKILL)
    try:
        p.wait()
    except ChildProcessError:
        pass
    forget(p)


def stop_all() -> None:
    """Stop every registered child (and its process group)."""
    with _lock:
        procs = [p for p, _ in _children.values()]
    for p in procs:
        stop(p)


def alive() -> list[int]:
    with _lock:
        return [pid for pid, (p, _) in _children.items() if p.poll() is None]


def run(argv: list[str], *, check: bool = False, capture_output: bool = False, text: bool = False,
        timeout: float | None = None, input=None, **kw) -> subprocess.CompletedProcess:
    """``subprocess.run`` through :func:`popen`: on any exception (an interrupt included) the child's
    process group is killed before the exception goes on."""
    if capture_output:
        kw.setdefault("stdout", subprocess.PIPE)
        kw.setdefault("stderr", subprocess.PIPE)
    if input is not None:
        kw.setdefault("stdin", subprocess.PIPE)
    p = None
    try:
        p = popen(argv, text=text, **kw)
        out, err = p.communicate(input, timeout=timeout)
    except BaseException:
        if p is not None:
            stop(p)
        # else: an interrupt right after the child was registered, before `p` was set: stop_all()
        raise
    forget(p)
    res = subprocess.CompletedProcess(argv, p.returncode, out, err)
    if check:
        res.check_returncode()
    return res


# --------------------------------------------------------------------------------------------------
# cache locks


_announced: set[str] = set()


def _lock_path(directory: Path, key: str) -> Path:
    d = Path(directory) / "locks"
    d.mkdir(parents=True, exist_ok=True)
    return d / (re.sub(r"[^A-Za-z0-9._-]+", "_", key)[:200] + ".lock")


@contextlib.contextmanager
def cache_lock(directory: Path, key: str, what: str = "", message: str | None = None) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``<directory>/locks/<key>.lock`` for the ``with`` block.

    When another process holds it, say so once (``message``, else "waiting for another lab using the
    cache (<what>)"; an empty ``message`` says nothing) and wait.  Lock files stay (removing one while
    another process waits on it would let two holders in)."""
    fd = os.open(_lock_path(directory, key), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise
            if key not in _announced and message != "":  # once per item and process
                _announced.add(key)
                progress.log(message or f"waiting for another lab using the cache ({what or key})")
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock
