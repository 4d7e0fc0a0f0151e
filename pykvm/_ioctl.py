"""Issue ioctls through the C helper (no copies, GIL released) and raise typed errors.

There is one way to issue a KVM ioctl: :func:`ioctl` with a row of the table
(``pykvm.abi.ioctls``), e.g. ``ioctl(vcpu.fd, ioctls.KVM_GET_ONE_REG, reg)``. The row gives the
request number and, when the ioctl fails, its name, the capability that gates it and the
architectures it exists on, so an ENOTTY/EINVAL from a KVM that lacks the capability reads
``KVM_GET_NESTED_STATE: EINVAL — needs KVM_CAP_NESTED_STATE, which this KVM does not offer``.
"""
from __future__ import annotations

import errno as _errno
import os

from . import errors
from ._native import lib as _nlib
from .abi import Cap, CData, cap_name, cap_number, ffi
from .abi.ioctls import BY_NAME, KVM_CHECK_EXTENSION, KVM_ENABLE_CAP, KVM_GET_STATS_FD, Ioctl
from .stats import read_stats

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Dict, Iterable, Optional, Union

# errnos with which a KVM that lacks an ioctl's capability answers it
_GATED = frozenset((_errno.ENOTTY, _errno.EINVAL, _errno.ENXIO, _errno.EOPNOTSUPP,
                    _errno.ENOSYS))
_native_ioctl = _nlib.pykvm_ioctl


def addr(cdata: CData) -> int:
    """The address of a cffi object (from any FFI) as an int."""
    return int(ffi.cast("uintptr_t", cdata))


def ioctl(fd: int, op: Ioctl, *arg: CData, what: str = "", hint: str = "") -> int:
    """Issue the ioctl ``op`` (a row of :mod:`pykvm.abi.ioctls`) on ``fd`` with an optional
    argument (an int or a cffi pointer; default 0). Returns the ioctl's value or raises the
    :class:`~pykvm.errors.KvmError` subclass for its errno, naming the ioctl, ``what`` it was
    asked and why it failed."""
    if type(op) is not Ioctl:
        raise TypeError(f"ioctl() takes a row of pykvm.abi.ioctls, not {op!r}")
    a = arg[0] if arg else 0
    if a.__class__ is not int:
        a = int(ffi.cast("uintptr_t", a))
    r: int = _native_ioctl(fd, op, a)
    if r < 0:
        raise error(fd, op, -r, what, hint)
    return r


def raw_ioctl(fd: int, kind: str, row: Union[Ioctl, str], arg: Union[int, CData] = 0,
              what: str = "") -> int:
    """:func:`ioctl` for ``Vm.ioctl`` / ``Vcpu.ioctl``: ``row`` (an :class:`Ioctl` or the name
    of a row of :mod:`pykvm.abi.ioctls`) must be issued on a ``kind`` fd ("vm", "vcpu") and
    exist on this architecture. Raises KeyError for an unknown name, ValueError for a row of
    another fd kind or architecture, else as :func:`ioctl`."""
    op = BY_NAME[row] if isinstance(row, str) else row
    if type(op) is not Ioctl:
        raise TypeError(f"an ioctl row of pykvm.abi.ioctls or its name, not {row!r}")
    if kind not in op.fd.split(","):
        raise ValueError(f"{op.name} is issued on a {op.fd} fd, not on a {kind} fd")
    if not op.available:
        raise ValueError(f"{op.name} exists only on {'/'.join(op.arches)}")
    _check_arg(op, arg)
    return ioctl(fd, op, arg, what=what)


def _check_arg(op: Ioctl, arg: object) -> None:
    """The escape hatch's guard: the kernel reads or writes ``sizeof(op.arg)`` bytes where the
    argument points, so a row with an argument type takes a cffi pointer to (or array of) at
    least that many bytes, never an int (it would be taken as a host address) nor a smaller
    object (the kernel would write past it); a row without one takes an int. TypeError
    otherwise."""
    if not op.arg:
        if type(arg) is not int:
            raise TypeError(f"{op.name} takes an int argument, not {type(arg).__name__}")
        return
    need = ffi.sizeof(op.arg)
    if not isinstance(arg, ffi.CData):
        raise TypeError(f"{op.name} takes a pointer to {op.arg} ({need} bytes; e.g. "
                        f"pykvm.abi.ffi.new({op.arg + ' *'!r})), not {type(arg).__name__}")
    t = ffi.typeof(arg)
    if t.kind == "array":
        have = ffi.sizeof(arg)
    elif t.kind == "pointer" and t.item.kind in ("struct", "union", "primitive", "array"):
        have = ffi.sizeof(t.item)
    else:
        raise TypeError(f"{op.name} takes a pointer to {op.arg}, not {t.cname}")
    if have < need:
        raise TypeError(f"{op.name} needs a buffer of {need} bytes ({op.arg}); "
                        f"{t.cname} holds {have}")


def error(fd: int, op: Ioctl, err: int, what: str = "", hint: str = "") -> errors.KvmError:
    """The exception for ``op`` failing on ``fd`` with ``err``. An ENOTTY/EINVAL-like errno from
    an ioctl whose capability this KVM does not offer (or that does not exist on this
    architecture) says so."""
    if not hint and err in _GATED:
        hint = gate_hint(fd, op)
    return errors.kvm_error(op.name, err, what, hint)


def gate_hint(fd: int, op: Ioctl) -> str:
    """Why ``op`` may be refused here: another architecture's ioctl, or a capability this KVM
    does not offer; "" when neither is the case (or cannot be told)."""
    if not op.available:
        return f"{op.name} exists only on {'/'.join(op.arches)}"
    if op.cap is None:
        return ""
    if _cap_value(fd, op) == 0:
        return f"needs {cap_name(op.cap)}, which this KVM does not offer"
    return ""


def _cap_value(fd: int, op: Ioctl) -> Optional[int]:
    """KVM_CHECK_EXTENSION(op.cap) on ``fd`` when it is a system or VM fd, else on the KVM
    device; None when neither answers (or ``op`` is not gated by a capability)."""
    if op.cap is None:
        return None
    n = cap_number(op.cap)
    if "system" in op.fd or "vm" in op.fd:
        r: int = _native_ioctl(fd, KVM_CHECK_EXTENSION, n)
        if r >= 0:
            return r
    try:
        dev = os.open(os.environ.get("PYKVM_DEVICE") or "/dev/kvm",
                      os.O_RDWR | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        r = _native_ioctl(dev, KVM_CHECK_EXTENSION, n)
        return r if r >= 0 else None
    finally:
        os.close(dev)


def check_extension(fd: int, cap: Cap) -> int:
    """KVM_CHECK_EXTENSION on a system or VM fd: 0 if absent, else a cap-specific value."""
    return ioctl(fd, KVM_CHECK_EXTENSION, cap_number(cap), what=str(cap))


def enable_cap(fd: int, cap: Cap, args: Iterable[int] = (), flags: int = 0) -> None:
    """KVM_ENABLE_CAP on a VM or vCPU fd."""
    ec = ffi.new("struct kvm_enable_cap *")
    ec.cap, ec.flags = cap_number(cap), flags
    for i, a in enumerate(tuple(args)[:4]):
        ec.args[i] = a
    ioctl(fd, KVM_ENABLE_CAP, ec, what=str(cap))


def stats(fd: int) -> Dict[str, object]:
    """KVM_GET_STATS_FD on a VM or vCPU fd, decoded (the stats fd is closed again)."""
    sfd = ioctl(fd, KVM_GET_STATS_FD)
    try:
        return read_stats(sfd)
    finally:
        os.close(sfd)
