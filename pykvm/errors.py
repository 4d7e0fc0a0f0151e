"""pykvm's exceptions. Every failed ioctl raises a :class:`KvmError` subclass chosen by errno, and
its message names the ioctl, what was asked, the errno name and what it means in that context:

    KVM_SET_ONE_REG(0x80300000070000ff): ENOENT — register not present on this host
"""
from __future__ import annotations

import errno as _errno
import os

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Optional, Tuple


class PykvmError(Exception):
    """Base of every pykvm exception."""


class KvmError(PykvmError, OSError):
    """An ioctl on a KVM file descriptor failed."""

    def __init__(self, ioctl: str, err: int, what: str = "", hint: str = ""):
        self.ioctl = ioctl
        self.what = what
        self.hint = hint or _default_hint(ioctl, err)
        name = _errno.errorcode.get(err, f"errno {err}")
        call = f"{ioctl}({what})" if what else ioctl
        msg = f"{call}: {name}"
        if self.hint:
            msg += f" — {self.hint}"
        OSError.__init__(self, err, msg)
        self.errno_name = name

    def __str__(self) -> str:
        return str(self.args[1])

    def __reduce__(self) -> Tuple[type, Tuple[object, ...]]:
        return (type(self), (self.ioctl, self.errno, self.what, self.hint))


class KvmNotFound(KvmError):
    """ENOENT: the object (register, slot, ...) does not exist here."""


class KvmInvalid(KvmError):
    """EINVAL: KVM rejected the arguments."""


class KvmBusy(KvmError):
    """EBUSY: not allowed any more (e.g. the vCPU has already run)."""


class KvmUnsupported(KvmError):
    """ENOTTY/ENXIO/EOPNOTSUPP/ENOSYS: this KVM does not implement it."""


class KvmPermission(KvmError):
    """EPERM/EACCES."""


class KvmTooBig(KvmError):
    """E2BIG: the buffer given was too small (KVM reports the size it needs)."""


class KvmFault(KvmError):
    """EFAULT: KVM could not access a buffer or guest memory it was given."""


class KvmInterrupted(KvmError):
    """EINTR: interrupted by a signal."""


class KvmExists(KvmError):
    """EEXIST: already there (slot overlap, device already created)."""


class HostResourceError(PykvmError):
    """The host ran out of something pykvm needs: ``resource`` names it (``"memory"``,
    ``"file descriptors"``, ``"threads"``). A failure of the host, never of the guest:
    :class:`~pykvm.machine.Machine` reports it as a VMM error (status 8). The message is one
    line naming the resource and, where there is one, the limit to raise."""

    resource = "host resources"

    def __init__(self, message: str = "", resource: str = ""):
        super().__init__(message)
        if resource:
            self.resource = resource


class HostMemoryError(HostResourceError, MemoryError):
    """The host could not provide memory pykvm asked for (e.g. mapping guest RAM)."""

    resource = "memory"


class KvmFdLimit(KvmError, HostResourceError):
    """EMFILE/ENFILE: KVM could not make a file descriptor (a VM, a vCPU, a stats or device
    fd) because the process's (``ulimit -n``) or the system's limit is reached."""

    resource = "file descriptors"


class KvmNoMemory(KvmError, HostMemoryError):
    """ENOMEM: the kernel could not allocate what KVM needed for this ioctl."""


class GuestRamUnbacked(KvmFault, HostMemoryError):
    """KVM_RUN failed with EFAULT: the host could not back guest RAM (typically a memory limit:
    a cgroup at its ``memory.max`` with the OOM killer off, ``ulimit -v``). ``gpa``: the
    guest-physical address KVM named (KVM_EXIT_MEMORY_FAULT), or None."""

    def __init__(self, ioctl: str, err: int, what: str = "", hint: str = "",
                 gpa: Optional[int] = None):
        self.gpa = gpa
        if not hint:
            at = f" at GPA {gpa:#x}" if gpa is not None else ""
            hint = f"host could not back guest RAM{at} (memory limit?)"
        super().__init__(ioctl, err, what, hint)

    def __reduce__(self) -> Tuple[type, Tuple[object, ...]]:
        return (type(self), (self.ioctl, self.errno, self.what, self.hint, self.gpa))


_BY_ERRNO = {
    _errno.ENOENT: KvmNotFound, _errno.EINVAL: KvmInvalid, _errno.EBUSY: KvmBusy,
    _errno.ENOTTY: KvmUnsupported, _errno.ENXIO: KvmUnsupported,
    _errno.EOPNOTSUPP: KvmUnsupported, _errno.ENOSYS: KvmUnsupported,
    _errno.EPERM: KvmPermission, _errno.EACCES: KvmPermission, _errno.E2BIG: KvmTooBig,
    _errno.EFAULT: KvmFault, _errno.EINTR: KvmInterrupted, _errno.EEXIST: KvmExists,
    _errno.EMFILE: KvmFdLimit, _errno.ENFILE: KvmFdLimit, _errno.ENOMEM: KvmNoMemory,
}

# Context-specific meanings: (ioctl, errno) first, then errno alone.
_HINTS = {
    ("KVM_GET_ONE_REG", _errno.ENOENT): "register not present on this host",
    ("KVM_SET_ONE_REG", _errno.ENOENT): "register not present on this host",
    ("KVM_SET_ONE_REG", _errno.EINVAL): "value not allowed for this register",
    ("KVM_SET_ONE_REG", _errno.EBUSY): "too late: the vCPU has already run",
    ("KVM_GET_ONE_REG", _errno.EINVAL): "register id not valid on this host",
    ("KVM_CREATE_VCPU", _errno.EEXIST): "a vCPU with this id already exists",
    ("KVM_CREATE_VCPU", _errno.EINVAL): "vCPU id out of range",
    ("KVM_SET_USER_MEMORY_REGION", _errno.EEXIST): "overlaps an existing slot",
    ("KVM_GET_NESTED_STATE", _errno.EINVAL): "nested virtualization not available on this host",
    ("KVM_SET_NESTED_STATE", _errno.EINVAL): "nested state rejected",
    ("KVM_RUN", _errno.EFAULT): "KVM could not access guest memory or the run page",
    ("KVM_RUN", _errno.ENOEXEC): "the vCPU's state cannot be run",
}
_GENERIC = {
    _errno.ENOTTY: "ioctl not implemented by this KVM",
    _errno.ENXIO: "not supported by this KVM",
    _errno.E2BIG: "buffer too small",
    _errno.EFAULT: "bad address",
    _errno.EPERM: "not permitted",
    _errno.EACCES: "permission denied",
    _errno.EMFILE: "out of file descriptors: the process's limit (ulimit -n) is reached",
    _errno.ENFILE: "out of file descriptors: the system's limit (fs.file-max) is reached",
    _errno.ENOMEM: "out of host memory",
}


def _default_hint(ioctl: str, err: int) -> str:
    return _HINTS.get((ioctl, err)) or _GENERIC.get(err, os.strerror(err))


def kvm_error(ioctl: str, err: int, what: str = "", hint: str = "") -> KvmError:
    """The right :class:`KvmError` subclass for ``err``."""
    return _BY_ERRNO.get(err, KvmError)(ioctl, err, what, hint)


class SnapshotError(PykvmError):
    """A VM snapshot cannot be taken or restored: a corrupted, truncated or foreign snapshot
    file (another architecture, CPU vendor or CPUID, an unknown format version), a state that
    does not fit the machine, or a device that cannot be snapshotted. The message is one line
    naming what is wrong; nothing was restored when it is raised."""


class CapabilityMissing(PykvmError):
    """A capability the call needs is not offered by this KVM."""


class GuestMemoryError(PykvmError, ValueError):
    """A guest-physical range is not backed by guest RAM (or not writable)."""


class GuestError(PykvmError):
    """The guest did something the VMM cannot honour (bad report, bad I/O, ...)."""


class StaleExit(PykvmError):
    """An exit object was used after the vCPU ran again: its kvm_run contents are gone."""


class Closed(PykvmError, ValueError):
    """The object (``Kvm``, ``Vm``, ``Vcpu``, guest memory, a run loop or a ``Machine``) has been
    closed; every method of a closed object raises this. A subclass of :class:`ValueError`, as
    Python's own closed files raise."""


class InvalidArgument(PykvmError, ValueError):
    """An argument of a pykvm call is of the wrong type or outside its documented range (a
    timeout that is not a finite number of seconds >= 0, a memory size that is not a positive
    number of bytes, an empty guest name...). The message names the argument and shows the
    value given, shortened to :data:`SHOWN_CHARS` characters. A subclass of
    :class:`ValueError`, which pykvm raised for these before."""


SHOWN_CHARS = 60                  # how much of a bad value a message quotes


def shown(value: object, n: int = SHOWN_CHARS) -> str:
    """``value`` as an error line quotes it (an argument, or a value taken from a file, which
    may be of any length and hold any character): its repr with every character that is not
    printable ASCII escaped (``ascii()``: ``\\x1b``, ``\\ufffd``, never the raw control or
    replacement character), at most ``n`` characters (then ending in "...")."""
    text = ascii(value)
    return text if len(text) <= n else text[:max(n - 3, 1)] + "..."


class Busy(PykvmError):
    """The vCPU is already running in another thread (one ``KVM_RUN`` caller at a time)."""


class KvmDeviceError(PykvmError):
    """The KVM device (``/dev/kvm``, ``--device``, ``$PYKVM_DEVICE``) cannot be used: missing,
    no permission, or not a KVM device. The message says what to do about it."""


class MachineEnded(PykvmError):
    """:meth:`pykvm.machine.Machine.run` was asked to run a machine that cannot run again
    (the guest powered off, or reset a machine that pykvm does not reboot). ``reason``: why,
    in a few words."""

    def __init__(self, reason: str):
        self.reason = reason
        super().__init__(f"the machine cannot run again: {reason}")


_THREAD_MESSAGES = ("can't start new thread", "cannot start new thread")


def host_resource_error(e: BaseException, _depth: int = 0) -> Optional["HostResourceError"]:
    """The :class:`HostResourceError` that ``e`` amounts to when it is the host running out of
    a resource (itself when it already is one), else None: a Python :class:`MemoryError`
    (memory), an :class:`OSError` with EMFILE/ENFILE (file descriptors), ENOMEM (memory) or
    EAGAIN from a thread start, and the :class:`RuntimeError` Python raises when it cannot
    start a thread (threads: ``ulimit -u``, or ``ulimit -v`` too small for a thread's stack);
    also when ``e`` merely wraps such an error (its ``__cause__`` chain, e.g. a
    :class:`~pykvm.boot.LoadError` for an image the process had no descriptor left to open).
    Pure; the result's ``__cause__`` is the error it stands for."""
    if isinstance(e, HostResourceError):
        return e
    out: Optional[HostResourceError] = None
    if isinstance(e, MemoryError):
        out = HostMemoryError(f"out of host memory ({type(e).__name__}"
                              f"{': ' + str(e) if str(e) else ''})")
    elif isinstance(e, RuntimeError) and any(m in str(e) for m in _THREAD_MESSAGES):
        out = HostResourceError(f"cannot start a thread: {e} (thread limit ulimit -u, or too "
                                "little address space under ulimit -v)", "threads")
    elif isinstance(e, OSError) and e.errno in (_errno.EMFILE, _errno.ENFILE):
        what = f"{e.filename}: " if e.filename else ""
        limit = "the process's limit (ulimit -n)" if e.errno == _errno.EMFILE else \
            "the system's limit (fs.file-max)"
        out = HostResourceError(f"out of file descriptors: {what}{os.strerror(e.errno)} "
                                f"({limit} is reached)", "file descriptors")
    elif isinstance(e, OSError) and e.errno == _errno.ENOMEM:
        out = HostMemoryError(f"out of host memory: {e.strerror or os.strerror(e.errno)}")
    if out is None and e.__cause__ is not None and _depth < 4:
        return host_resource_error(e.__cause__, _depth + 1)  # wrapped: a LoadError over EMFILE
    if out is not None:
        out.__cause__ = e
    return out
