"""Driving the real gdb against ``pykvm run --gdb`` in tests (tests/hw/test_gdb.py on this host,
tests/nested/test_gdb_nested.py in the nested lab).

* :class:`PykvmGdb`: ``pykvm run --gdb tcp:127.0.0.1:0 --no-input [--gdb-wait] IMAGE ...`` as a
  subprocess, its port read from the "gdb server listening on" line it prints on stderr;
* :func:`run_gdb`: gdb in batch mode (``-batch -nx``) attached to that port, running commands;
* :func:`gdb_args`: the same command line, for a test that runs gdb itself (to signal it);
* :func:`guest_elf`: a built-in guest's ELF (gdb's symbol file);
* :func:`source_line`: the line number of a line of a guest's source, for matching gdb's
  "at x86/gdb_target.c:N".

Every process runs under a timeout (:data:`TIMEOUT` seconds): a hang raises
:class:`subprocess.TimeoutExpired` (or :class:`AssertionError` for a server that never starts)
instead of blocking the test. gdb is found on ``PATH`` (:data:`GDB`, None where it is not
installed: Debian's ``apt install gdb``). The remote protocol is the GDB manual's appendix "GDB
Remote Serial Protocol"; what pykvm serves is docs/gdb.md."""
from __future__ import annotations

import os
import selectors
import shutil
import socket
import subprocess
import sys
import time

from .. import guests

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import List, Optional, Sequence, Tuple

#: gdb's path, or None where it is not installed
GDB: Optional[str] = shutil.which("gdb")
#: seconds any one gdb or pykvm process may take (a subprocess timeout, never a measurement)
TIMEOUT = 120
#: seconds :class:`PykvmGdb` waits for the server's "listening on" line
START_TIMEOUT = 60


def ensure_loopback() -> None:
    """Make 127.0.0.1 reachable, where gdb and the stub meet: a lab's initramfs (python -m
    pykvm.lab) may leave ``lo`` down, and this brings it up with busybox's ``ip``, as the labs'
    Linux guests' scripts do for theirs. Nothing where a connection to port 9 is refused (the
    address is up). Raises subprocess.CalledProcessError when ``ip`` fails."""
    try:
        socket.create_connection(("127.0.0.1", 9), timeout=5).close()
    except ConnectionRefusedError:
        return
    except OSError:
        subprocess.run(["busybox", "ip", "link", "set", "lo", "up"], check=True, timeout=60)


def source_line(text: str, source: str = "gdb_target.c", arch_dir: str = "x86") -> int:
    """The 1-based line number of the first line of ``guests/<arch_dir>/<source>`` (in this
    checkout's :data:`pykvm.guests.SOURCE_DIR`) that contains ``text``. Raises
    :class:`OSError` where the source is not there and :class:`StopIteration` where no line
    has ``text``."""
    with open(os.path.join(guests.SOURCE_DIR, arch_dir, source)) as f:
        return next(i for i, ln in enumerate(f, 1) if text in ln)


def guest_elf(name: str) -> str:
    """The path of built-in guest ``name``'s ELF (with symbols and line tables, for gdb): the
    image :func:`pykvm.guests.path` finds, or the ``.elf`` beside it where that is a flat
    binary. Raises :class:`pykvm.errors.GuestNotFound` as :func:`pykvm.guests.path` does."""
    path = guests.path(name)
    return path if path.endswith(".elf") else os.path.splitext(path)[0] + ".elf"


class PykvmGdb:
    """``pykvm run --gdb tcp:127.0.0.1:0 --no-input [--gdb-wait] IMAGE *extra`` as a
    subprocess (stdout and stderr piped); :attr:`port` is the TCP port it listens on, read
    from its "listening on" line (within :data:`START_TIMEOUT` seconds, else
    :class:`AssertionError` and the process is killed). :attr:`err_head` holds the stderr
    bytes read so far. :meth:`finish` waits ``timeout`` seconds (default :data:`TIMEOUT`). A
    ``with`` block kills the process on the way out."""

    def __init__(self, image: str, *extra: str, wait: bool = True, timeout: float = TIMEOUT):
        self.timeout = timeout
        args = [sys.executable, "-m", "pykvm", "run", "--gdb", "tcp:127.0.0.1:0", "--no-input",
                *(["--gdb-wait"] if wait else []), image, *extra]
        self.p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  stdin=subprocess.DEVNULL)
        self.err_head = b""
        assert self.p.stderr is not None
        sel = selectors.DefaultSelector()
        sel.register(self.p.stderr, selectors.EVENT_READ)
        end = time.monotonic() + START_TIMEOUT
        while b"listening on" not in self.err_head:
            if time.monotonic() > end or self.p.poll() is not None:
                sel.close()
                self.kill()
                raise AssertionError(f"pykvm did not start its gdb server: {self.err_head!r}")
            if sel.select(1):
                chunk = os.read(self.p.stderr.fileno(), 4096)
                if not chunk:
                    break
                self.err_head += chunk
        sel.close()
        lines = [ln for ln in self.err_head.decode().splitlines() if "listening on" in ln]
        if not lines:
            self.kill()
            raise AssertionError(f"pykvm did not start its gdb server: {self.err_head!r}")
        self.port = int(lines[0].rsplit(":", 1)[1])

    def read_stderr(self, timeout: float) -> None:
        """Append to :attr:`err_head` what stderr has within ``timeout`` seconds (one read at
        most; nothing if none comes)."""
        assert self.p.stderr is not None
        sel = selectors.DefaultSelector()
        sel.register(self.p.stderr, selectors.EVENT_READ)
        try:
            if sel.select(timeout):
                self.err_head += os.read(self.p.stderr.fileno(), 4096)
        finally:
            sel.close()

    def finish(self) -> Tuple[int, str, str]:
        """(exit status, stdout, all of stderr) once pykvm ends; raises
        :class:`subprocess.TimeoutExpired` after :attr:`timeout` seconds."""
        out, err = self.p.communicate(timeout=self.timeout)
        return self.p.returncode, out.decode(), (self.err_head + err).decode()

    def kill(self) -> None:
        """Kill the process if it still runs, and reap it."""
        if self.p.poll() is None:
            self.p.kill()
        self.p.communicate()

    def __enter__(self) -> "PykvmGdb":
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()


def gdb_args(port: int, elf: str, cmds: Sequence[str]) -> List[str]:
    """gdb's command line: batch mode, no init files, no pager, ``target remote
    127.0.0.1:PORT`` (an address: where there is no /etc/hosts, as in the labs, gdb cannot
    resolve the name ``:PORT`` stands for), then each of ``cmds`` as an ``-ex``, with ``elf``
    as the symbol file. Raises :class:`RuntimeError` where gdb is not installed."""
    if GDB is None:
        raise RuntimeError("gdb is not installed (Debian: apt install gdb)")
    args = [GDB, "-batch", "-nx", "-ex", "set pagination off",
            "-ex", f"target remote 127.0.0.1:{port}"]
    for c in cmds:
        args += ["-ex", c]
    return args + [elf]


def run_gdb(port: int, elf: str, *cmds: str, timeout: float = TIMEOUT) -> str:
    """Run gdb (:func:`gdb_args`) to its end and return its stdout followed by its stderr;
    raises :class:`subprocess.TimeoutExpired` after ``timeout`` seconds (default
    :data:`TIMEOUT`)."""
    r = subprocess.run(gdb_args(port, elf, cmds), capture_output=True, text=True,
                       timeout=timeout, stdin=subprocess.DEVNULL)
    return r.stdout + r.stderr
