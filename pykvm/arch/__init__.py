"""Architecture packages: the arch ioctl helpers below the vCPU layer, and each architecture's
facts (register ids, CPU modes, extension tables, the x86 boot layout).

``current`` is the host's mixins module (``pykvm.arch.x86.mixins`` or
``pykvm.arch.riscv.mixins``), which provides ``KvmArch`` (system fd), ``VmArch`` (VM fd) and
``VcpuArch`` (vCPU fd) for the common classes to inherit from, and ``describe_registers``, so
that common code never branches on the architecture in the middle of a function;
``current_snapshot`` the host's snapshot module (``host_vendor``, ``cpuid_mismatch``,
``CPUID_REQUIRED``: what :mod:`pykvm.snapshot` checks a snapshot's host identity with).
"""
from .._host import HOST_ARCH

if HOST_ARCH != "riscv64":
    from .x86 import mixins as current
    from .x86 import snapshot as current_snapshot
else:
    # mypy types `current` as the x86 module; the RISC-V one provides the same class names
    from .riscv import mixins as current  # type: ignore[no-redef]
    from .riscv import snapshot as current_snapshot  # type: ignore[no-redef]

__all__ = ["current", "current_snapshot", "HOST_ARCH"]
