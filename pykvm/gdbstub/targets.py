"""The one place the GDB stub picks an architecture: :data:`TARGETS` maps the machine's
architecture (:data:`pykvm.arch.HOST_ARCH`: pykvm runs guests of the host's architecture) to
its :class:`~pykvm.gdbstub.arch.GdbTarget` class."""
from __future__ import annotations

from ..arch import HOST_ARCH
from ..errors import PykvmError
from .arch import GdbTarget
from .riscv import RiscvTarget
from .x86 import X86Target

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Dict, Type

#: architecture name -> the GdbTarget subclass that serves it
TARGETS: Dict[str, Type[GdbTarget]] = {
    "x86_64": X86Target,
    "riscv64": RiscvTarget,
}


def target_for(machine: Any, arch: str = HOST_ARCH) -> GdbTarget:
    """A new :class:`GdbTarget` for ``machine`` (a :class:`pykvm.machine.Machine`) of
    architecture ``arch``. Raises :class:`~pykvm.errors.PykvmError` for an architecture the
    stub does not serve."""
    cls = TARGETS.get(arch)
    if cls is None:
        raise PykvmError(f"the GDB stub does not serve {arch} guests "
                         f"(it serves {', '.join(sorted(TARGETS))})")
    return cls(machine)
