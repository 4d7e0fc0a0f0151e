"""Writing a report file (``pytest --ktap FILE``, the lab's results, a command's ``-o``/``--plot``
path) without ever destroying what the path names.

What the path names decides how it is written:

=========================  ===================================================================
path                       how
=========================  ===================================================================
nothing (yet)              created atomically: a temporary file in the same directory, renamed
                           over the name (rename(2) is atomic within one file system), so a
                           reader sees the old file or the whole new one, never half of it
a regular file             replaced the same way; the new file keeps the old one's permission
                           bits (a new one gets 0666 less the umask, as open(2) would)
a symlink                  written *through*: what the link resolves to is written as this
                           table says for it (a regular target replaced atomically in its own
                           directory, so a failed write leaves the old report whole; a device
                           or FIFO written); the link itself stays. Through
                           ``/proc/<pid>/fd/N`` or ``/dev/fd/N``
                           (``/dev/stdout``, ``/dev/stderr``) the open file is appended to, never
                           truncated, so ``--ktap /dev/stdout > log`` keeps what came before
a character device, FIFO   written through, as a shell redirection would (``/dev/null``,
                           ``/dev/full``, a terminal, a pipe). A FIFO with no reader is refused
                           (ENXIO) rather than waited on forever
a directory, socket or     refused: there is no way to write a report there that does not
block device               destroy something (a block device is a disk)
=========================  ===================================================================

Every failure raises :class:`ReportPathError` (an :class:`OSError` with the errno of the cause)
whose ``str()`` is one line: ``cannot write <what> to <path>: <reason>``.
"""
import errno
import os
import stat

_FD_LINK_PREFIXES = ("/proc/", "/dev/fd/")
_MAX_LINKS = 40                       # Linux's own limit on symlinks followed in one lookup


class ReportPathError(OSError):
    """A report could not be written to the path asked for (or the path is refused up front).
    ``errno`` is the cause's; ``str(e)`` is one line naming what, where and why."""

    def __init__(self, err: int, message: str, path: str):
        super().__init__(err, message)
        self.filename = path
        self.message = message

    def __str__(self):
        return self.message


def _reason(e: OSError) -> str:
    return e.strerror or os.strerror(e.errno) if e.errno else str(e)


def _through_fd_link(path: str) -> bool:
    """True when ``path``, or a symlink on the way to its target, names an open file of a
    process (``/proc/<pid>/fd/N``, ``/dev/fd/N``): such a "link" is the open file itself, so it
    must be appended to, never truncated or renamed over."""
    p = os.path.abspath(path)
    for _ in range(_MAX_LINKS):
        if p.startswith(_FD_LINK_PREFIXES):
            return True
        try:
            target = os.readlink(p)
        except OSError:
            return False
        p = os.path.normpath(os.path.join(os.path.dirname(p), target))
    return False


def check_report_path(path, what: str = "report") -> None:
    """Refuse, before any work is done, a path a report can never be written to: a directory,
    a socket, a block device, or a name whose directory is not a directory. A path that does not
    exist yet is fine (its directory is created when the report is written).

    Raises :class:`ReportPathError` (one line)."""
    p = os.fspath(path)
    if not p:
        raise ReportPathError(errno.ENOENT, f"cannot write {what} to '': empty path", p)
    try:
        st = os.stat(p)                       # follows symlinks: the target is what is written
    except FileNotFoundError:
        parent = os.path.dirname(os.path.abspath(p))
        while parent and not os.path.exists(parent):
            parent = os.path.dirname(parent)
        if parent and not os.path.isdir(parent):
            raise ReportPathError(errno.ENOTDIR, f"cannot write {what} to {p}: "
                                  f"{parent} is not a directory", p) from None
        return
    except OSError as e:
        raise ReportPathError(e.errno, f"cannot write {what} to {p}: {_reason(e)}", p) from None
    kind = ("a directory" if stat.S_ISDIR(st.st_mode) else
            "a socket" if stat.S_ISSOCK(st.st_mode) else
            "a block device" if stat.S_ISBLK(st.st_mode) else None)
    if kind:
        err = errno.EISDIR if stat.S_ISDIR(st.st_mode) else errno.EINVAL
        raise ReportPathError(err, f"cannot write {what} to {p}: it is {kind}, not a file", p)


def write_report(path, data, what: str = "report") -> None:
    """Write ``data`` (``bytes``, or ``str`` written as UTF-8) to ``path`` as the module's table
    says: regular files replaced atomically, symlinks, character devices and FIFOs written
    through, directories, sockets and block devices refused. A missing directory is created.

    Raises :class:`ReportPathError` (one line; ``errno`` from the cause, e.g. ENOSPC for a full
    file system, ENXIO for a FIFO nobody reads)."""
    p = os.fspath(path)
    if isinstance(data, str):
        data = data.encode("utf-8")
    check_report_path(p, what)
    try:
        if _through_fd_link(p):
            _write_through(p, data, append=True)
            return
        target = os.path.realpath(p) if os.path.islink(p) else p
        try:
            st = os.stat(target)
        except FileNotFoundError:
            st = None
        if st is not None and not stat.S_ISREG(st.st_mode):      # a device or a FIFO
            _write_through(target, data, append=False)
            return
        _replace(target, data, st)        # a link's regular (or missing) target: atomically
    except ReportPathError:
        raise
    except OSError as e:
        msg = f"cannot write {what} to {p}: {_reason(e)}"
        if e.errno == errno.ENXIO:
            msg += " (a FIFO with no reader)"
        raise ReportPathError(e.errno or errno.EIO, msg, p) from None


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        if n <= 0:                          # a device that takes nothing: do not spin
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        view = view[n:]


def _write_through(path: str, data: bytes, append: bool) -> None:
    """Open ``path`` following symlinks and write ``data`` into whatever it is. A FIFO is
    opened without blocking (ENXIO when nobody reads it), then written in blocking mode."""
    flags = os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC
    flags |= os.O_APPEND if append else os.O_CREAT      # a dangling link: create its target
    fd = os.open(path, flags, 0o666)
    try:
        st = os.fstat(fd)
        if stat.S_ISREG(st.st_mode) and not append:
            os.ftruncate(fd, 0)
        os.set_blocking(fd, True)
        _write_all(fd, data)
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _replace(path: str, data: bytes, old) -> None:
    """Atomic replacement (or creation) of the regular file ``path``: a temporary file beside
    it, written whole, then rename(2)d over it; removed again on any failure."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    mode = stat.S_IMODE(old.st_mode) if old is not None else 0o666 & ~_umask()
    base = os.path.basename(path)
    for _ in range(100):
        tmp = os.path.join(d, f".{base}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            break
        except FileExistsError:
            continue
    else:
        raise OSError(errno.EEXIST, "no free temporary file name")
    try:
        try:
            _write_all(fd, data)
            os.fchmod(fd, mode)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
