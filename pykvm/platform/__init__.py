"""Machines: which device sits where, the memory map, ACPI tables or the device tree."""
from .._host import HOST_ARCH

if HOST_ARCH == "riscv64":
    from .riscv_virt import Platform
else:
    from .x86 import Platform

__all__ = ["Platform"]
