"""Machines: which device sits where, the memory map, ACPI tables or the device tree. One
module per machine — ``pc`` (:mod:`.pc`), ``bare`` (:mod:`.bare`) on x86, ``virt``
(:mod:`.riscv_virt`) on RISC-V — each a :class:`~.base.Platform`; :func:`choose` picks one by
name, or by the image when the name is "auto", before anything is created or loaded."""
import inspect
from typing import Dict, Optional, Tuple, Type

from .._host import HOST_ARCH
from ..boot import detect
from .base import MachineControl, Platform

if HOST_ARCH == "riscv64":
    from .riscv_virt import VirtPlatform
    PLATFORMS: Dict[str, Type] = {"virt": VirtPlatform}
    PC_DEVICES: Tuple[str, ...] = ()

    def _auto(fmt: str, options: dict) -> str:
        return "virt"
else:
    from .bare import BarePlatform
    from .pc import DEVICES as PC_DEVICES, PcPlatform
    PLATFORMS = {"pc": PcPlatform, "bare": BarePlatform}

    def _auto(fmt: str, options: dict) -> str:
        """A multiboot kernel, a Linux bzImage or PC devices ask for the PC; else bare."""
        return "pc" if fmt in ("multiboot", "linux-x86") or options.get("devices") else "bare"

__all__ = ["MachineControl", "Platform", "PLATFORMS", "PC_DEVICES", "choose", "MACHINE_NAMES"]

# every machine pykvm has, by architecture (for --help and messages on any host)
MACHINE_NAMES = {"x86_64": ("pc", "bare"), "riscv64": ("virt",)}


def choose(name: str, head: bytes, **options) -> Tuple[Type, str]:
    """(platform class, image format) for machine ``name`` ("auto", or one of
    :data:`PLATFORMS`) and an image whose first bytes are ``head`` (8 KiB;
    :func:`pykvm.boot.read_head`). "auto" picks, on x86, ``pc`` for a multiboot kernel, a Linux
    bzImage or when PC ``devices`` are asked for, else ``bare``; on RISC-V, ``virt``. Raises
    :class:`ValueError` naming the machines this host has for an unknown name, and for options
    that need another machine (PC ``devices`` on ``bare``) or that the machine does not have."""
    fmt = detect(head, arch=HOST_ARCH)
    if name in (None, "auto"):
        name = _auto(fmt, options)
    cls: Optional[Type] = PLATFORMS.get(name)
    if cls is None:
        other = [a for a, names in MACHINE_NAMES.items() if name in names]
        where = f" (a {other[0]} machine)" if other else ""
        raise ValueError(f"no machine {name!r} on this {HOST_ARCH} host{where}; machines here: "
                         f"{', '.join(PLATFORMS)}")
    if options.get("devices") and name != "pc":
        raise ValueError(f"devices ({', '.join(options['devices'])}) need the pc machine, "
                         f"not {name!r}")
    params = inspect.signature(cls.__init__).parameters
    for opt in options:
        if opt not in params or opt in ("self", "vm", "kvm", "control", "vcpus", "mem_size"):
            known = [p for p in params if p not in ("self", "vm", "kvm", "control", "vcpus",
                                                       "mem_size")]
            raise ValueError(f"the {name} machine has no option {opt!r} (its options: "
                             f"{', '.join(known) or 'none'})")
    return cls, fmt
