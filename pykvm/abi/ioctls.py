"""Every KVM ioctl pykvm issues, declared once.

Each row gives the name, the fd kind it is issued on, the direction, the command number, the
argument struct, the capability that gates it and the architectures it exists on. The request
number is computed by ``ioctl-opt`` (:func:`ioctl_opt.IOC`, the kernel's
``asm-generic/ioctl.h`` ``_IOC(dir, type, nr, size)`` in Python) from the row's direction, KVMIO,
the command number and the argument's size in bytes taken from *our* cffi declarations
(``ffi.sizeof``), so the struct layout and the number can never disagree. The header proof
(:mod:`pykvm.abi.proof`) checks every number against the installed ``<linux/kvm.h>`` by
compiling it, independently of this computation.

A row is an :class:`Ioctl`, which *is* its request number (an ``int``), so every call site passes
the row itself: ``ioctl(fd, ioctls.KVM_GET_ONE_REG, arg)`` (:func:`pykvm._ioctl.ioctl`), and the
row's name, capability and architectures are at hand when it fails.
"""
from typing import Any, Iterable, List, Optional, Tuple

import ioctl_opt

from . import ARCH, KVMIO, ffi

# Directions as the kernel's _IOC names them from user space's side: W is _IOW (user space
# writes the argument to the kernel), R is _IOR, WR is _IOWR.
NONE, W, R, WR = "none", "w", "r", "wr"
_DIRS = {NONE: ioctl_opt.IOC_NONE, W: ioctl_opt.IOC_WRITE, R: ioctl_opt.IOC_READ,
         WR: ioctl_opt.IOC_READ | ioctl_opt.IOC_WRITE}
# The largest argument size the request number's size field holds (14 bits on x86_64 and
# riscv64, asm-generic/ioctl.h), as ioctl-opt exports it.
_SIZE_MAX = ioctl_opt.IOCSIZE_MASK >> ioctl_opt.IOCSIZE_SHIFT
ALL = ("x86_64", "riscv64")
X86 = ("x86_64",)


def ioc(direction: str, nr: int, size: int, type_: int = KVMIO) -> int:
    """The request number ``_IOC(dir, type_, nr, size)``, computed by :func:`ioctl_opt.IOC`.

    ``direction`` is one of NONE, W, R, WR; ``nr`` and ``type_`` are 8-bit command and driver
    numbers; ``size`` is the argument's size in bytes. Raises ValueError for an unknown direction
    or a field that does not fit its bits (ioctl-opt only asserts, which ``python -O`` drops).
    """
    if direction not in _DIRS:
        raise ValueError(f"ioctl direction {direction!r} is not one of {', '.join(_DIRS)}")
    if not 0 <= size <= _SIZE_MAX:
        raise ValueError(f"ioctl argument of {size} bytes does not fit the request number")
    if not (0 <= nr <= 0xFF and 0 <= type_ <= 0xFF):
        raise ValueError(f"ioctl type {type_:#x} / nr {nr:#x} does not fit 8 bits")
    return int(ioctl_opt.IOC(_DIRS[direction], type_, nr, size))


class Ioctl(int):
    """One ioctl: an ``int`` equal to its request number, with ``name``, ``fd`` ("system",
    "vm", "vcpu" or a combination "vm,vcpu"), ``direction``, ``nr``, ``arg`` (the C type of the
    argument, or None when it is a plain int), ``cap`` (the capability that gates it, None when
    it is always there) and ``arches``. A row of another architecture than the host's is 0 (its
    argument struct is not declared here) and has ``available`` False."""

    name: str
    fd: str
    direction: str
    nr: int
    arg: Optional[str]
    cap: Optional[str]
    arches: Tuple[str, ...]
    available: bool

    def __new__(cls, name: str, fd: str, direction: str, nr: int, arg: Optional[str] = None,
                cap: Optional[str] = None, arches: Iterable[str] = ALL) -> "Ioctl":
        available = ARCH in arches
        request = ioc(direction, nr, ffi.sizeof(arg) if arg else 0) if available else 0
        self = int.__new__(cls, request)
        d = self.__dict__
        d.update(name=name, fd=fd, direction=direction, nr=nr, arg=arg, cap=cap,
                 arches=tuple(arches), available=available)
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
        return (BY_NAME.__getitem__, (self.name,))


TABLE = [
    # /dev/kvm
    Ioctl("KVM_GET_API_VERSION", "system", NONE, 0x00, None),
    Ioctl("KVM_CREATE_VM", "system", NONE, 0x01, None),
    Ioctl("KVM_GET_MSR_INDEX_LIST", "system", WR, 0x02, "struct kvm_msr_list", arches=X86),
    Ioctl("KVM_CHECK_EXTENSION", "system,vm", NONE, 0x03, None),
    Ioctl("KVM_GET_VCPU_MMAP_SIZE", "system", NONE, 0x04, None),
    Ioctl("KVM_GET_SUPPORTED_CPUID", "system", WR, 0x05, "struct kvm_cpuid2", "EXT_CPUID", X86),
    Ioctl("KVM_GET_EMULATED_CPUID", "system", WR, 0x09, "struct kvm_cpuid2", "EXT_EMUL_CPUID", X86),
    Ioctl("KVM_GET_MSR_FEATURE_INDEX_LIST", "system", WR, 0x0A, "struct kvm_msr_list",
          "GET_MSR_FEATURES", X86),
    # VM
    Ioctl("KVM_CREATE_VCPU", "vm", NONE, 0x41, None),
    Ioctl("KVM_GET_DIRTY_LOG", "vm", W, 0x42, "struct kvm_dirty_log"),
    Ioctl("KVM_SET_USER_MEMORY_REGION", "vm", W, 0x46, "struct kvm_userspace_memory_region",
          "USER_MEMORY"),
    Ioctl("KVM_SET_TSS_ADDR", "vm", NONE, 0x47, None, "SET_TSS_ADDR", X86),
    Ioctl("KVM_SET_IDENTITY_MAP_ADDR", "vm", W, 0x48, "uint64_t", "SET_IDENTITY_MAP_ADDR", X86),
    Ioctl("KVM_SET_USER_MEMORY_REGION2", "vm", W, 0x49, "struct kvm_userspace_memory_region2",
          "USER_MEMORY2"),
    Ioctl("KVM_CREATE_IRQCHIP", "vm", NONE, 0x60, None, "IRQCHIP"),
    Ioctl("KVM_IRQ_LINE", "vm", W, 0x61, "struct kvm_irq_level", "IRQCHIP"),
    Ioctl("KVM_CREATE_PIT", "vm", NONE, 0x64, None, "PIT", X86),
    Ioctl("KVM_REGISTER_COALESCED_MMIO", "vm", W, 0x67, "struct kvm_coalesced_mmio_zone",
          "COALESCED_MMIO"),
    Ioctl("KVM_IRQ_LINE_STATUS", "vm", WR, 0x67, "struct kvm_irq_level", "IRQ_INJECT_STATUS"),
    Ioctl("KVM_SET_GSI_ROUTING", "vm", W, 0x6A, "struct kvm_irq_routing", "IRQ_ROUTING"),
    Ioctl("KVM_UNREGISTER_COALESCED_MMIO", "vm", W, 0x68, "struct kvm_coalesced_mmio_zone",
          "COALESCED_MMIO"),
    Ioctl("KVM_IRQFD", "vm", W, 0x76, "struct kvm_irqfd", "IRQFD"),
    Ioctl("KVM_REINJECT_CONTROL", "vm", NONE, 0x71, None, "REINJECT_CONTROL", X86),
    Ioctl("KVM_CREATE_PIT2", "vm", W, 0x77, "struct kvm_pit_config", "PIT2", X86),
    Ioctl("KVM_SET_BOOT_CPU_ID", "vm", NONE, 0x78, None, "SET_BOOT_CPU_ID", X86),
    Ioctl("KVM_IOEVENTFD", "vm", W, 0x79, "struct kvm_ioeventfd", "IOEVENTFD"),
    Ioctl("KVM_SIGNAL_MSI", "vm", W, 0xA5, "struct kvm_msi", "SIGNAL_MSI"),
    Ioctl("KVM_ENABLE_CAP", "vm,vcpu", W, 0xA3, "struct kvm_enable_cap", "ENABLE_CAP"),
    Ioctl("KVM_CLEAR_DIRTY_LOG", "vm", WR, 0xC0, "struct kvm_clear_dirty_log",
          "MANUAL_DIRTY_LOG_PROTECT2"),
    Ioctl("KVM_GET_STATS_FD", "vm,vcpu", NONE, 0xCE, None, "BINARY_STATS_FD"),
    # vCPU
    Ioctl("KVM_RUN", "vcpu", NONE, 0x80, None),
    Ioctl("KVM_GET_REGS", "vcpu", R, 0x81, "struct kvm_regs", arches=X86),
    Ioctl("KVM_SET_REGS", "vcpu", W, 0x82, "struct kvm_regs", arches=X86),
    Ioctl("KVM_GET_SREGS", "vcpu", R, 0x83, "struct kvm_sregs", arches=X86),
    Ioctl("KVM_SET_SREGS", "vcpu", W, 0x84, "struct kvm_sregs", arches=X86),
    Ioctl("KVM_TRANSLATE", "vcpu", WR, 0x85, "struct kvm_translation", arches=X86),
    Ioctl("KVM_INTERRUPT", "vcpu", W, 0x86, "struct kvm_interrupt"),
    Ioctl("KVM_GET_MSRS", "vcpu", WR, 0x88, "struct kvm_msrs", arches=X86),
    Ioctl("KVM_SET_MSRS", "vcpu", W, 0x89, "struct kvm_msrs", arches=X86),
    Ioctl("KVM_SET_SIGNAL_MASK", "vcpu", W, 0x8B, "struct kvm_signal_mask"),
    Ioctl("KVM_GET_FPU", "vcpu", R, 0x8C, "struct kvm_fpu", arches=X86),
    Ioctl("KVM_SET_FPU", "vcpu", W, 0x8D, "struct kvm_fpu", arches=X86),
    Ioctl("KVM_SET_CPUID2", "vcpu", W, 0x90, "struct kvm_cpuid2", "EXT_CPUID", X86),
    Ioctl("KVM_GET_CPUID2", "vcpu", WR, 0x91, "struct kvm_cpuid2", "EXT_CPUID", X86),
    Ioctl("KVM_GET_MP_STATE", "vcpu", R, 0x98, "struct kvm_mp_state", "MP_STATE"),
    Ioctl("KVM_SET_MP_STATE", "vcpu", W, 0x99, "struct kvm_mp_state", "MP_STATE"),
    Ioctl("KVM_NMI", "vcpu", NONE, 0x9A, None, "USER_NMI", X86),
    Ioctl("KVM_SET_GUEST_DEBUG", "vcpu", W, 0x9B, "struct kvm_guest_debug", "SET_GUEST_DEBUG"),
    Ioctl("KVM_GET_TSC_KHZ", "vcpu", NONE, 0xA3, None, "GET_TSC_KHZ", X86),
    Ioctl("KVM_GET_ONE_REG", "vcpu", W, 0xAB, "struct kvm_one_reg", "ONE_REG"),
    Ioctl("KVM_SET_ONE_REG", "vcpu", W, 0xAC, "struct kvm_one_reg", "ONE_REG"),
    Ioctl("KVM_KVMCLOCK_CTRL", "vcpu", NONE, 0xAD, None, "KVMCLOCK_CTRL", X86),
    Ioctl("KVM_GET_REG_LIST", "vcpu", WR, 0xB0, "struct kvm_reg_list", "ONE_REG"),
    Ioctl("KVM_GET_NESTED_STATE", "vcpu", WR, 0xBE, "struct kvm_nested_state", "NESTED_STATE", X86),
    Ioctl("KVM_SET_NESTED_STATE", "vcpu", W, 0xBF, "struct kvm_nested_state", "NESTED_STATE", X86),
]

BY_NAME = {i.name: i for i in TABLE}


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
