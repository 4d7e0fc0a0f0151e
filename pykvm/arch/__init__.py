"""Architecture packages. ``current`` is the host's, picked once at import.

Each arch module provides three mixins that the common classes inherit from:
``KvmArch`` (system fd), ``VmArch`` (VM fd) and ``VcpuArch`` (vCPU fd), so that common code never
branches on the architecture in the middle of a function.
"""
from .. import abi

if abi.ARCH == "x86_64":
    from .x86 import mixins as current
else:
    from .riscv import mixins as current

__all__ = ["current"]
