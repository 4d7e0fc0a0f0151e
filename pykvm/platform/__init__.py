"""Machines: which device sits where, the memory map, ACPI tables or the device tree. One
module per machine — ``pc`` (:mod:`.pc`), ``bare`` (:mod:`.bare`) on x86, ``virt``
(:mod:`.riscv_virt`) on RISC-V — each a :class:`~.base.Platform`; :func:`choose` picks one by
name, or by the image when the name is "auto", before anything is created or loaded."""
from __future__ import annotations

import importlib

from .._host import HOST_ARCH
from ..boot import detect
from ..boot.elf import load_reader as elf_reader
from .base import MachineControl, Platform

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Callable, Dict, Tuple, Type

__all__ = ["MachineControl", "Platform", "MACHINES", "choose", "machine_class", "preload"]

# machine name -> (architecture, module in this package, class). A machine's module, and the
# device models it brings, is imported only when that machine is chosen: booting a bare ELF guest
# does not load the PC's devices (about 10 ms of `pykvm run`'s start-up).
MACHINES: Dict[str, Tuple[str, str, str]] = {
    "pc": ("x86_64", ".pc", "PcPlatform"),
    "bare": ("x86_64", ".bare", "BarePlatform"),
    "virt": ("riscv64", ".riscv_virt", "VirtPlatform"),
}


def _auto_x86(fmt: str, options: dict) -> str:
    """A multiboot kernel, a Linux bzImage, PC devices or virtio devices ask for the PC;
    else bare."""
    return ("pc" if fmt in ("multiboot", "linux-x86") or options.get("devices")
            or options.get("virtio_mmio") or options.get("virtio_pci") or options.get("virtio")
            or options.get("virtio_spec")
            else "bare")


def _auto_riscv(fmt: str, options: dict) -> str:
    """RISC-V has one machine."""
    return "virt"


_AUTO: Callable[[str, dict], str] = {"x86_64": _auto_x86, "riscv64": _auto_riscv}.get(
    HOST_ARCH, _auto_x86)


def machine_class(name: str) -> Type:
    """The platform class of machine ``name`` on this host; raises :class:`ValueError` naming
    the machines this host has for a name it has not (another architecture's, or none)."""
    entry = MACHINES.get(name) if isinstance(name, str) else None
    if entry is None or entry[0] != HOST_ARCH:
        where = f" (a {entry[0]} machine)" if entry is not None else ""
        here = ", ".join(n for n, e in MACHINES.items() if e[0] == HOST_ARCH)
        raise ValueError(f"no machine {_shown(name)} on this {HOST_ARCH} host{where}; machines "
                         f"here: {here} (or auto)")
    return getattr(importlib.import_module(entry[1], __name__), entry[2])


def preload() -> None:
    """Import every machine of this host and the ELF reader now: a long-running process (a fuzz
    worker, a server) pays it at start rather than inside its first run's deadline."""
    for name, (arch, _, _) in MACHINES.items():
        if arch == HOST_ARCH:
            machine_class(name)
    elf_reader()


def _shown(name: str) -> str:
    """``name`` for a message: repr, cut short (a caller's string may be anything)."""
    return repr(name) if len(name) <= 40 else repr(name[:40]) + "..."


def choose(name: str, head: bytes, **options) -> Tuple[Type, str, dict]:
    """(platform class, image format, its options) for machine ``name`` ("auto", or one of
    :data:`MACHINES`) and an image whose first bytes are ``head`` (8 KiB;
    :func:`pykvm.boot.read_head`). "auto" picks, on x86, ``pc`` for a multiboot kernel, a Linux
    bzImage or when PC ``devices`` are asked for, else ``bare``; on RISC-V, ``virt``. Raises
    :class:`ValueError` naming the machines this host has for an unknown name, and for options
    that need another machine (PC ``devices`` on ``bare``) or that the machine does not have.
    The options returned are those given, less an empty ``devices``."""
    if not isinstance(name, str):
        raise ValueError(f"machine must be a name (a string), not {name!r}")
    devices = options.get("devices")
    if devices is not None and (isinstance(devices, (str, bytes)) or not all(
            isinstance(d, str) for d in devices)):
        raise ValueError(f"devices must be a sequence of device names, not {devices!r}")
    if not devices:
        options.pop("devices", None)          # none asked for: any machine will do
    for key in ("virtio_mmio", "virtio_pci", "virtio", "virtio_spec"):
        if key in options and not options[key]:
            options.pop(key)                  # no virtio devices: likewise
    fmt = detect(head, arch=HOST_ARCH)
    if name == "auto":
        name = _AUTO(fmt, options)
    cls = machine_class(name)
    if options.get("devices") and name != "pc":
        raise ValueError(f"devices ({', '.join(options['devices'])}) need the pc machine, "
                         f"not {name!r}")
    code = cls.__init__.__code__          # its parameters (inspect costs ~8 ms to import)
    params = code.co_varnames[:code.co_argcount + code.co_kwonlyargcount]
    if "virtio_spec" in options and getattr(cls, "make_virtio", None) is None:
        raise ValueError(f"the {name} machine has no virtio devices (disks, rng, "
                         f"console='virtio'); the pc machine has")
    for opt in options:
        if opt == "virtio_spec":              # built by Machine through cls.make_virtio
            continue
        if opt not in params or opt in ("self", "vm", "kvm", "control", "vcpus", "mem_size"):
            known = [p for p in params if p not in ("self", "vm", "kvm", "control", "vcpus",
                                                       "mem_size")]
            raise ValueError(f"the {name} machine has no option {opt!r} (its options: "
                             f"{', '.join(known) or 'none'})")
    return cls, fmt, options
