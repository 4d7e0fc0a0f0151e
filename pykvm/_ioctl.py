"""Issue ioctls through the C helper (no copies, GIL released) and raise typed errors."""
from . import errors
from ._native import lib as _nlib
from .abi import ffi


def addr(cdata) -> int:
    """The address of a cffi object (from any FFI) as an int."""
    return int(ffi.cast("uintptr_t", cdata))


def ioctl(fd: int, name: str, request: int, arg=0, what: str = "", hint: str = "") -> int:
    """Issue ``request`` on ``fd``; ``arg`` is an int or a cffi pointer. Returns the ioctl's value
    or raises the :class:`~pykvm.errors.KvmError` subclass for its errno."""
    if not isinstance(arg, int):
        arg = addr(arg)
    r = _nlib.pykvm_ioctl(fd, request, arg)
    if r < 0:
        raise errors.kvm_error(name, -r, what, hint)
    return r


def enable_cap(fd: int, cap, args=(), flags: int = 0) -> None:
    """KVM_ENABLE_CAP on a VM or vCPU fd."""
    from .abi import ioctls
    from .kvm import cap_number
    ec = ffi.new("struct kvm_enable_cap *")
    ec.cap, ec.flags = cap_number(cap), flags
    for i, a in enumerate(tuple(args)[:4]):
        ec.args[i] = a
    ioctl(fd, "KVM_ENABLE_CAP", ioctls.KVM_ENABLE_CAP, ec, what=str(cap))


def stats(fd: int) -> dict:
    """KVM_GET_STATS_FD on a VM or vCPU fd, decoded (the stats fd is closed again)."""
    import os
    from .abi import ioctls
    from .stats import read_stats
    sfd = ioctl(fd, "KVM_GET_STATS_FD", ioctls.KVM_GET_STATS_FD)
    try:
        return read_stats(sfd)
    finally:
        os.close(sfd)
