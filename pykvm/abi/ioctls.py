"""Every KVM ioctl pykvm issues: the rows of :mod:`pykvm.abi.ioctl_rows` as :class:`Ioctl`
objects, each an ``int`` equal to its request number.

A row gives the name, the fd kind it is issued on, the direction, the command number, the
argument struct, the capability that gates it and the architectures it exists on. The request
number is computed by ``ioctl-opt`` (:func:`ioctl_opt.IOC`, the kernel's
``asm-generic/ioctl.h`` ``_IOC(dir, type, nr, size)`` in Python) from the row's direction, KVMIO,
the command number and the argument's size in bytes taken from *our* cffi declarations, so the
struct layout and the number can never disagree. That happens when pykvm is built:
csrc/build_native.py computes every row's number with ``ioctl_opt.IOC`` over the builder's
``ffi.sizeof`` (and has the C compiler assert each of those sizes for the target it compiles
for), and compiles the numbers into ``pykvm._native`` (``pykvm_ioctl_text()``). Importing this
module takes them from there when the build is current (:data:`COMPILED`: the compiled ABI is
today's, ``pykvm.abi.COMPILED``, and every row is found under its :func:`ioctl_key`), so it loads
neither ioctl-opt nor ctypes; a stale build, a missing one, a row edited since the build or a
new :class:`Ioctl` gets its number from :func:`ioc` at run time, the same computation. The header
proof (:mod:`pykvm.abi.proof`) checks every number against the installed ``<linux/kvm.h>`` by
compiling it, independently of this computation.

A row is an :class:`Ioctl`, which *is* its request number (an ``int``), so every call site passes
the row itself: ``ioctl(fd, ioctls.KVM_GET_ONE_REG, arg)`` (:func:`pykvm._ioctl.ioctl`), and the
row's name, capability and architectures are at hand when it fails.
"""
from __future__ import annotations

from . import ARCH, COMPILED as _ABI_COMPILED, KVMIO, _native, ffi
from .ioctl_rows import ALL, DIRECTIONS, NONE, ROWS, WR, R, W, ioctl_key
from .ioctl_rows import X86  # noqa: F401  (part of this module's API, as before)

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Dict, Iterable, List, Optional, Tuple


def ioc(direction: str, nr: int, size: int, type_: int = KVMIO) -> int:
    """The request number ``_IOC(dir, type_, nr, size)``, computed by :func:`ioctl_opt.IOC`.

    ``direction`` is one of NONE, W, R, WR; ``nr`` and ``type_`` are 8-bit command and driver
    numbers; ``size`` is the argument's size in bytes. Raises ValueError for an unknown direction
    or a field that does not fit its bits (ioctl-opt only asserts, which ``python -O`` drops).
    Imports ioctl-opt (and with it ctypes, a few ms) on its first call: a current build never
    calls it while pykvm is imported.
    """
    import ioctl_opt
    dirs = {NONE: ioctl_opt.IOC_NONE, W: ioctl_opt.IOC_WRITE, R: ioctl_opt.IOC_READ,
            WR: ioctl_opt.IOC_READ | ioctl_opt.IOC_WRITE}
    if direction not in dirs:
        raise ValueError(f"ioctl direction {direction!r} is not one of {', '.join(DIRECTIONS)}")
    # the largest argument size the number's size field holds (14 bits on x86_64 and riscv64,
    # asm-generic/ioctl.h), as ioctl-opt exports it
    if not 0 <= size <= ioctl_opt.IOCSIZE_MASK >> ioctl_opt.IOCSIZE_SHIFT:
        raise ValueError(f"ioctl argument of {size} bytes does not fit the request number")
    if not (0 <= nr <= 0xFF and 0 <= type_ <= 0xFF):
        raise ValueError(f"ioctl type {type_:#x} / nr {nr:#x} does not fit 8 bits")
    return int(ioctl_opt.IOC(dirs[direction], type_, nr, size))


def compiled_numbers() -> Dict[str, int]:
    """The request numbers pykvm._native was built with, ``{ioctl_key(...): number}`` (str to
    int), one per row of the host's architecture; empty when the native module is missing, has
    no table, or was built from other ABI declarations than today's (``pykvm.abi.COMPILED``
    False: its sizes may not be ours)."""
    if not _ABI_COMPILED or _native is None:
        return {}
    get = getattr(_native.lib, "pykvm_ioctl_text", None)
    if get is None:
        return {}
    numbers = {}
    for line in _native.ffi.string(get()).decode().splitlines():
        key, _, number = line.rpartition(" ")
        numbers[key] = int(number, 16)
    return numbers


_BUILT = compiled_numbers()


class Ioctl(int):
    """One ioctl: an ``int`` equal to its request number, with ``name``, ``fd`` ("system",
    "vm", "vcpu" or a combination "vm,vcpu"), ``direction``, ``nr``, ``arg`` (the C type of the
    argument, or None when it is a plain int), ``cap`` (the capability that gates it, None when
    it is always there) and ``arches``. A row of another architecture than the host's is 0 (its
    argument struct is not declared here) and has ``available`` False. The number is the one
    compiled into pykvm._native for this row when the build is current, else :func:`ioc` of
    the row's direction, command number and ``ffi.sizeof(arg)`` (raising its ValueError)."""

    name: str
    fd: str
    direction: str
    nr: int
    arg: Optional[str]
    cap: Optional[str]
    arches: Tuple[str, ...]
    available: bool

    def __new__(cls, name: str, fd: str, direction: str, nr: int, arg: Optional[str] = None,
                cap: Optional[str] = None, arches: Iterable[str] = ALL) -> Ioctl:
        arches = tuple(arches)
        available = ARCH in arches
        request = _BUILT.get(ioctl_key(name, direction, nr, KVMIO, arg), -1) if available else 0
        if request < 0:
            request = ioc(direction, nr, ffi.sizeof(arg) if arg else 0)
        self = int.__new__(cls, request)
        self.__dict__.update(name=name, fd=fd, direction=direction, nr=nr, arg=arg, cap=cap,
                             arches=arches, available=available)
        return self

    def __setattr__(self, key: str, value: object) -> None:
        raise AttributeError(f"{self.name} is read-only")

    @property
    def request(self) -> int:
        """The ioctl request number: ``ioctl_opt.IOC(dir, KVMIO, nr, sizeof(arg))``. Raises
        ValueError for a row of another architecture."""
        if not self.available:
            raise ValueError(f"{self.name} does not exist on {ARCH} (only on "
                             f"{', '.join(self.arches)})")
        return int(self)

    def __repr__(self) -> str:
        return f"<Ioctl {self.name} {int(self):#x}>"

    __str__ = __repr__

    def __reduce__(self) -> Tuple[Any, Tuple[str]]:
        return (row, (self.name,))             # unpickles to this module's row of that name


TABLE = [Ioctl(*row) for row in ROWS]
# True when every row of the host's architecture took its number from the build (no ioctl-opt
# at import); False for a stale or missing build, which computes them with ioc().
COMPILED = all(ioctl_key(i.name, i.direction, i.nr, KVMIO, i.arg) in _BUILT
               for i in TABLE if i.available)

BY_NAME = {i.name: i for i in TABLE}


def row(name: str) -> Ioctl:
    """The table's row named ``name`` (e.g. ``"KVM_RUN"``). Raises KeyError for no such row."""
    return BY_NAME[name]


def available() -> List[Ioctl]:
    """The ioctls that exist on this machine's architecture."""
    return [i for i in TABLE if i.available]


# The rows by name for the host arch, e.g. ``ioctls.KVM_RUN`` (== its request number 0xae80).
globals().update((i.name, i) for i in TABLE if i.available)


def __getattr__(name: str) -> Ioctl:
    """Only reached for a name that is not a row of this host's architecture (the rows are
    module globals, installed above); it types ``ioctls.KVM_RUN`` and the like as
    :class:`Ioctl` for mypy."""
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
