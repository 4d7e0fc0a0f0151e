"""The KVM ABI as pykvm sees it: one cffi ``ffi`` holding our own struct declarations for the host
architecture, the constants, and the ioctl table (``pykvm.abi.ioctls``).

The declarations are ours (``common.py``, ``x86_64.py``, ``riscv64.py``) and they are compiled
into ``pykvm._native`` when pykvm is built (csrc/build_native.py), so ``ffi`` is the native
module's and importing pykvm parses no C. Should the module have been built from other
declarations than these (a checkout whose ABI files changed since ``pip install -e .``), ``ffi``
is parsed from the sources instead and :data:`COMPILED` is False (tests/unit/test_abi_proof.py
fails then: rebuild).

The architecture is chosen once, here; code elsewhere never branches on it in the middle of a
function.
"""
from __future__ import annotations

from .._host import HOST_ARCH
from . import common
from .common import *  # noqa: F403  (constants are part of this module's API)
from .common import CAP_NAMES, CAPS

# typing is imported for the type checker only (mypy takes any name TYPE_CHECKING as True):
# importing pykvm does not load it.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from types import ModuleType
    from typing import Any, Optional, Union

    # cffi ships no type information: a cffi value (an FFI, a struct, a pointer, an array, a
    # buffer) is typed CData, an alias of Any, so signatures still say where a C value goes.
    CData = Any
    # a capability: its number, or its name with or without the KVM_CAP_ prefix
    Cap = Union[int, str]
else:
    # the same names at run time, where annotations only name them
    CData = object
    Cap = (int, str)

arch: ModuleType
if HOST_ARCH == "x86_64":
    from . import x86_64 as arch
elif HOST_ARCH == "riscv64":
    from . import riscv64 as arch
else:  # pragma: no cover - we only describe the two arches we test
    raise ImportError(f"pykvm: no KVM ABI description for this machine ({HOST_ARCH})")

ARCH: str = arch.ARCH


def abi_text(arch_module: ModuleType) -> str:
    """Every declaration of one architecture, as compiled into pykvm._native."""
    text: str = common.CDEF + arch_module.CDEF + common.KVM_RUN_CDEF
    return text


def build_ffi(arch_module: ModuleType) -> CData:
    """An FFI parsed from the common declarations plus one architecture's (cffi ABI mode)."""
    import cffi
    f = cffi.FFI()
    f.cdef(abi_text(arch_module))
    return f


try:
    from .. import _native as _native  # (re-exported: pykvm.abi.ioctls reads its table)
except ImportError:             # not built: the ABI facts alone still work (cffi ABI mode)
    _native = None


def _native_ffi() -> Optional[CData]:
    """pykvm._native's ffi if it was compiled from exactly our declarations, else None (also
    when the native module is not built)."""
    if _native is None:
        return None
    get = getattr(_native.lib, "pykvm_abi_text", None)
    if get is None:
        return None
    if _native.ffi.string(get()).decode() != abi_text(arch):
        return None
    return _native.ffi


_compiled = _native_ffi()
COMPILED = _compiled is not None
ffi: CData = _compiled if _compiled is not None else build_ffi(arch)


def cap_number(cap: Cap) -> int:
    """A capability number from ``"ONE_REG"``, ``"KVM_CAP_ONE_REG"`` or an int."""
    if isinstance(cap, int):
        return cap
    name = cap.upper()
    if name.startswith("KVM_CAP_"):
        name = name[len("KVM_CAP_"):]
    try:
        return CAPS[name]
    except KeyError:
        raise ValueError(f"unknown KVM capability {cap!r}") from None


def cap_name(cap: Cap) -> str:
    """``"KVM_CAP_ONE_REG"`` for 70, "ONE_REG" or "KVM_CAP_ONE_REG"."""
    n = cap_number(cap)
    return f"KVM_CAP_{CAP_NAMES.get(n, n)}"
