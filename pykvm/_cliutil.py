"""What every pykvm program (``pykvm``, ``python -m pykvm.fuzz``, ``python -m pykvm.lab``) does
at its edges with the standard streams, so that output is never lost with a success status.

* :func:`fill_closed_std_fds` puts /dev/null on a closed fd 0, 1 or 2, so no file opened later
  (/dev/kvm, a vCPU, a report) lands on a standard stream;
* :func:`start_program` refuses to run with stdout closed (``>&-``): nothing it printed could
  be read, so "success" would be a lie;
* :func:`watch_stdout` gives ``sys.stdout`` a raw layer that remembers the first failed write
  (``output["error"]``), so a full disk or a vanished reader is told apart from every other
  OSError a command meets;
* :func:`finish_program` flushes what is left and turns a failure into one line on stderr and
  a status: 141 for a reader that went away (EPIPE, as SIGPIPE would give), else the program's
  host-failure status (8 for every pykvm program).

Imports nothing from pykvm: every tool layer may use it.
"""
import errno
import io
import os
import sys

STATUS_BROKEN_PIPE = 141                    # 128 + SIGPIPE, what a shell reports for a reader
                                            # that went away

output = {"error": None,     # the first OSError writing to stdout
          "reported": False, # output_failure() has said so
          "wrapped": False}  # sys.stdout is a _StdoutRaw (so output["error"] is exact)


QUOTE_LIMIT = 60                            # characters of a user's value an error line quotes
BARE_LIMIT = 256                            # ... and of one it shows bare (a path, as typed)


def quote(value, limit: int = QUOTE_LIMIT) -> str:
    """A user's value (an argument, a file name) as an error line quotes it: ``repr()``-escaped
    (control characters, quotes and undecodable bytes visible) and, when it is longer than
    ``limit`` characters, its first ``limit`` followed by ``...`` -- a 5000-character argument
    is not echoed whole."""
    text = value if isinstance(value, str) else str(value)
    if len(text) <= limit:
        return repr(text)
    return repr(text[:limit]) + "..."


def shorten_values(line: str, values, limit: int = QUOTE_LIMIT,
                   bare_limit: int = BARE_LIMIT) -> str:
    """``line`` with every one of ``values`` (the command line's arguments) that it quotes
    (``repr``) and that is longer than ``limit`` characters shortened as :func:`quote` does;
    a path (a value with a ``/``), and any value the line shows bare ("cannot write the image
    to PATH: ..."), is shortened so only beyond ``bare_limit`` characters, so that an ordinary
    path stays whole. A message made by
    a lower layer or by argparse, which quote the whole value, so still names it in a readable
    line. For ``--opt=value`` arguments and comma-separated lists the parts count as values
    too."""
    parts = set()
    for v in values or ():
        if not isinstance(v, str):
            continue
        parts.add(v)
        if v.startswith("-") and "=" in v:
            v = v.split("=", 1)[1]
            parts.add(v)
        parts.update(v.split(","))
    for v in sorted((p for p in parts if len(p) > limit), key=len, reverse=True):
        if v not in line and repr(v) not in line:
            continue
        most = bare_limit if "/" in v else limit        # a path is named whole up to bare_limit
        if len(v) > most:
            line = line.replace(repr(v), quote(v, most))
        if len(v) > bare_limit:
            line = line.replace(v, quote(v, bare_limit if "/" in v else limit))
    return line


def err(line: str) -> bool:
    """``line`` on stderr; where stderr is closed or cannot be written, nothing (the exit
    status still tells the failure). Returns whether the line was written."""
    stream = sys.stderr
    if stream is None:
        return False
    try:
        stream.write(line + "\n")
        stream.flush()
    except (OSError, ValueError):
        return False
    return True


def fill_closed_std_fds() -> "list[int]":
    """Put /dev/null on any of fds 0, 1, 2 that is closed, so that no file opened later lands on
    a standard stream and gets our output (or a C helper's messages) written into it. Returns
    the fds that were closed."""
    closed = []
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            closed.append(fd)
            try:
                new = os.open(os.devnull, os.O_RDWR)
            except OSError:
                continue
            if new != fd:
                os.dup2(new, fd)
                os.close(new)
    return closed


class _StdoutRaw(io.RawIOBase):
    """fd 1 under a program's sys.stdout: every write that fails is remembered in
    ``output["error"]`` (then raised as usual)."""

    def __init__(self, fd: int):
        super().__init__()
        self._fd = fd

    def writable(self) -> bool:
        return True

    def fileno(self) -> int:
        return self._fd

    def isatty(self) -> bool:
        return os.isatty(self._fd)

    def write(self, b) -> int:
        try:
            return os.write(self._fd, b)
        except OSError as e:
            if output["error"] is None:
                output["error"] = e
            raise


def watch_stdout() -> None:
    """Give the program a sys.stdout whose failures are recorded (see :class:`_StdoutRaw`), with
    the encoding and buffering the interpreter chose."""
    old = sys.stdout
    raw = _StdoutRaw(old.fileno())
    sys.stdout = io.TextIOWrapper(io.BufferedWriter(raw), encoding=old.encoding,
                                  errors=old.errors, line_buffering=old.line_buffering)
    output["wrapped"] = True


def reset() -> None:
    """Forget an earlier invocation's stdout failure (a program's main() called twice in one
    process)."""
    output["error"] = None
    output["reported"] = False
    output["wrapped"] = isinstance(getattr(getattr(sys.stdout, "buffer", None), "raw", None),
                                   _StdoutRaw)


def stdout_failed(e: OSError) -> bool:
    """Whether ``e`` (an OSError that ended a command) was a failed write to stdout."""
    if output["wrapped"]:
        return output["error"] is not None
    if e.errno in (errno.EPIPE, errno.ENOSPC, errno.EIO, errno.EBADF, errno.EDQUOT):
        output["error"] = e
        return True
    return False


def output_failure(prog: str, status: int) -> int:
    """The status for a failed stdout: 141 for a closed pipe, else one line on stderr
    (``<prog>: cannot write to stdout: <why>``) and ``status``. Further writes (and what is
    still buffered) go to /dev/null, so nothing fails again at exit."""
    e = output["error"]
    code = STATUS_BROKEN_PIPE if isinstance(e, BrokenPipeError) else status
    if output["reported"]:
        return code
    output["reported"] = True
    try:
        fd = os.open(os.devnull, os.O_WRONLY)
        os.dup2(fd, sys.stdout.fileno())
        os.close(fd)
    except (OSError, ValueError, AttributeError, io.UnsupportedOperation):
        pass
    try:
        sys.stdout.flush()                 # drop what is buffered into /dev/null
    except (OSError, ValueError, AttributeError):
        pass
    if code == STATUS_BROKEN_PIPE:
        return code
    why = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
    err(f"{prog}: cannot write to stdout: {why}")
    return code


def start_program(prog: str, status: int) -> "int | None":
    """First thing a program's main() does: fill closed standard fds, and refuse to run with
    stdout closed (one line, ``status``); with stderr closed, messages are dropped (statuses
    still tell). Then watch stdout. Returns the status to exit with, or None to go on."""
    reset()
    closed = fill_closed_std_fds()
    if 1 in closed or sys.stdout is None:             # started with stdout closed (>&-)
        if sys.stderr is None and 2 not in closed:
            sys.stderr = open(2, "w", closefd=False)
        output["error"] = OSError(errno.EBADF, "it is closed")
        output["reported"] = True
        err(f"{prog}: cannot write to stdout: it is closed")
        sys.stdout = open(os.devnull, "w")
        return status
    if 2 in closed or sys.stderr is None:
        sys.stderr = None                             # err() says nothing
    watch_stdout()
    return None


class _TolerantStderr(io.TextIOBase):
    """sys.stderr for a program whose stderr carries only messages (progress, notices): a write
    that fails (stderr closed, a full disk) is dropped, never raised into the work."""

    def __init__(self, stream):
        super().__init__()
        self._stream = stream

    def writable(self) -> bool:
        return True

    def write(self, text) -> int:
        if self._stream is not None:
            try:
                self._stream.write(text)
            except (OSError, ValueError):
                pass
        return len(text)

    def flush(self) -> None:
        if self._stream is not None:
            try:
                self._stream.flush()
            except (OSError, ValueError):
                pass

    def isatty(self) -> bool:
        try:
            return self._stream is not None and self._stream.isatty()
        except (OSError, ValueError):
            return False

    def fileno(self) -> int:
        if self._stream is None:
            raise io.UnsupportedOperation("stderr is closed")
        return self._stream.fileno()

    @property
    def encoding(self):
        return getattr(self._stream, "encoding", "utf-8")


def tolerant_stderr() -> None:
    """Make sys.stderr drop failed writes (see :class:`_TolerantStderr`); a closed stderr
    becomes one that takes everything and shows nothing."""
    if not isinstance(sys.stderr, _TolerantStderr):
        sys.stderr = _TolerantStderr(sys.stderr)


def finish_program(code: int, prog: str, status: int) -> int:
    """Flush stdout; when that (or an earlier write) failed, the status is :func:`output_failure`'s
    instead of ``code`` (output lost is never success). Returns the status to exit with."""
    try:
        sys.stdout.flush()
    except (OSError, ValueError) as e:
        if output["error"] is None:
            output["error"] = e
    except AttributeError:                # no stdout at all
        pass
    if output["error"] is not None:
        return output_failure(prog, status)
    try:
        if sys.stderr is not None:
            sys.stderr.flush()
    except (OSError, ValueError):
        pass
    return code


def run_program(main, prog: str, status: int, usage_status: int, host_failure=None) -> int:
    """Run ``main()`` (returning an exit status) as a program's body, the way every pykvm tool
    does: stdout checked first (:func:`start_program`), stderr made tolerant, ``SystemExit``
    (``--help``, a usage error already said) turned into its status (``usage_status`` when it
    has none), an ``OSError`` from stdout into ``status``, and output lost at the end never
    success (:func:`finish_program`). Any other ``OSError`` or ``MemoryError`` goes to
    ``host_failure(e)`` (which returns the status, having said one line), or is raised when
    there is none."""
    code = start_program(prog, status)
    if code is not None:
        return code
    tolerant_stderr()
    try:
        code = main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else usage_status
    except (OSError, MemoryError) as e:
        if isinstance(e, OSError) and stdout_failed(e):
            code = status                     # told by finish_program
        elif host_failure is None:
            raise
        else:
            code = host_failure(e)
    return finish_program(code, prog, status)
