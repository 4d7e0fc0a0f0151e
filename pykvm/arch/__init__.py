"""Architecture packages. ``current`` is the host's: ``pykvm.arch.x86.mixins`` or
``pykvm.arch.riscv.mixins``, imported on first use (so that a module of one arch, e.g.
``pykvm.arch.x86.layout``, can be imported without the mixins and everything they pull in).

Each arch module provides three mixins that the common classes inherit from:
``KvmArch`` (system fd), ``VmArch`` (VM fd) and ``VcpuArch`` (vCPU fd), and the ``Platform`` of
:class:`pykvm.machine.Machine`, so that common code never branches on the architecture in the
middle of a function.
"""
import importlib
import os

__all__ = ["current"]

_HOST = os.uname().machine
_CURRENT = {"x86_64": ".x86.mixins", "amd64": ".x86.mixins", "riscv64": ".riscv.mixins"}


def __getattr__(name):
    if name == "current":
        mod = importlib.import_module(_CURRENT.get(_HOST, ".x86.mixins"), __name__)
        globals()["current"] = mod
        return mod
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
