"""Issue ioctls through the C helper (no copies, GIL released) and raise typed errors."""
from . import errors
from ._native import ffi as _nffi, lib as _nlib  # noqa: F401
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
