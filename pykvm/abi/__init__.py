"""The KVM ABI as pykvm sees it: one cffi ``ffi`` holding our own struct declarations for the host
architecture, the constants, and the ioctl table (``pykvm.abi.ioctls``).

The architecture is chosen once, here, from ``platform.machine()``; code elsewhere never branches
on it in the middle of a function.
"""
import platform

import cffi

from . import common
from .common import *  # noqa: F401,F403  (constants are part of this module's API)

_MACHINE = platform.machine()
if _MACHINE in ("x86_64", "amd64"):
    from . import x86_64 as arch
elif _MACHINE == "riscv64":
    from . import riscv64 as arch
else:  # pragma: no cover - we only describe the two arches we test
    raise ImportError(f"pykvm: no KVM ABI description for this machine ({_MACHINE})")

ARCH = arch.ARCH


def build_ffi(arch_module) -> cffi.FFI:
    """An FFI with the common declarations plus one architecture's."""
    f = cffi.FFI()
    f.cdef(common.CDEF)
    f.cdef(arch_module.CDEF)
    f.cdef(common.KVM_RUN_CDEF)
    return f


ffi = build_ffi(arch)
