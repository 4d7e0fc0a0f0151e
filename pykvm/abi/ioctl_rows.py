"""The rows of pykvm's ioctl table, as plain data: every KVM ioctl pykvm issues, declared once.

A row gives the name, the fd kind it is issued on ("system", "vm", "vcpu", "device" for a
descriptor from KVM_CREATE_DEVICE, or a combination "vm,vcpu"), the direction (NONE, W, R, WR:
_IO, _IOW, _IOR, _IOWR), the command number, the argument's C type (None when the argument is
a plain int), the capability that gates it (None when it is always there) and the architectures
it exists on. :mod:`pykvm.abi.ioctls` makes each
row an :class:`~pykvm.abi.ioctls.Ioctl`, an ``int`` equal to its request number.

Like ``common.py`` and the arch modules, this file imports nothing, so csrc/build_native.py loads
it on its own when pykvm is built: there each row's request number is computed with
``ioctl_opt.IOC`` over the size of the row's argument in our declarations and compiled into
``pykvm._native``, so importing pykvm computes no numbers and loads neither ioctl-opt nor ctypes.
"""
from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Iterable, Optional, Tuple

    # (name, fd, direction, nr, arg, cap, arches)
    Row = Tuple[str, str, str, int, Optional[str], Optional[str], Tuple[str, ...]]

# Directions as the kernel's _IOC names them from user space's side: W is _IOW (user space
# writes the argument to the kernel), R is _IOR, WR is _IOWR.
NONE, W, R, WR = "none", "w", "r", "wr"
DIRECTIONS = (NONE, W, R, WR)
ALL = ("x86_64", "riscv64")
X86 = ("x86_64",)


def _row(name: str, fd: str, direction: str, nr: int, arg: Optional[str] = None,
         cap: Optional[str] = None, arches: Iterable[str] = ALL) -> Row:
    """One row as a tuple, in :data:`ROWS`' field order."""
    return (name, fd, direction, nr, arg, cap, tuple(arches))


def ioctl_key(name: str, direction: str, nr: int, type_: int, arg: Optional[str]) -> str:
    """The text (str) that names one row's request number in the table compiled into
    pykvm._native: the row's name and every field its number depends on (direction, command
    number, driver type, argument type; the argument's size is fixed by the compiled ABI text,
    which ``pykvm.abi.COMPILED`` checks). The builder and :mod:`pykvm.abi.ioctls` both use it,
    so a row edited since the build finds no compiled number."""
    return f"{name} {direction} {nr:#x} {type_:#x} {arg or '-'}"


ROWS = (
    # /dev/kvm
    _row("KVM_GET_API_VERSION", "system", NONE, 0x00, None),
    _row("KVM_CREATE_VM", "system", NONE, 0x01, None),
    _row("KVM_GET_MSR_INDEX_LIST", "system", WR, 0x02, "struct kvm_msr_list", arches=X86),
    _row("KVM_CHECK_EXTENSION", "system,vm", NONE, 0x03, None),
    _row("KVM_GET_VCPU_MMAP_SIZE", "system", NONE, 0x04, None),
    _row("KVM_GET_SUPPORTED_CPUID", "system", WR, 0x05, "struct kvm_cpuid2", "EXT_CPUID", X86),
    _row("KVM_GET_EMULATED_CPUID", "system", WR, 0x09, "struct kvm_cpuid2", "EXT_EMUL_CPUID", X86),
    _row("KVM_GET_MSR_FEATURE_INDEX_LIST", "system", WR, 0x0A, "struct kvm_msr_list",
         "GET_MSR_FEATURES", X86),
    # VM
    _row("KVM_CREATE_VCPU", "vm", NONE, 0x41, None),
    _row("KVM_GET_DIRTY_LOG", "vm", W, 0x42, "struct kvm_dirty_log"),
    _row("KVM_SET_USER_MEMORY_REGION", "vm", W, 0x46, "struct kvm_userspace_memory_region",
         "USER_MEMORY"),
    _row("KVM_SET_TSS_ADDR", "vm", NONE, 0x47, None, "SET_TSS_ADDR", X86),
    _row("KVM_SET_IDENTITY_MAP_ADDR", "vm", W, 0x48, "uint64_t", "SET_IDENTITY_MAP_ADDR", X86),
    _row("KVM_SET_USER_MEMORY_REGION2", "vm", W, 0x49, "struct kvm_userspace_memory_region2",
         "USER_MEMORY2"),
    _row("KVM_CREATE_IRQCHIP", "vm", NONE, 0x60, None, "IRQCHIP"),
    _row("KVM_IRQ_LINE", "vm", W, 0x61, "struct kvm_irq_level", "IRQCHIP"),
    _row("KVM_CREATE_PIT", "vm", NONE, 0x64, None, "PIT", X86),
    # KVM_SET_IRQCHIP is _IOR in the uAPI header (a historical slip the number keeps)
    _row("KVM_GET_IRQCHIP", "vm", WR, 0x62, "struct kvm_irqchip", "IRQCHIP", X86),
    _row("KVM_SET_IRQCHIP", "vm", R, 0x63, "struct kvm_irqchip", "IRQCHIP", X86),
    _row("KVM_GET_PIT2", "vm", R, 0x9F, "struct kvm_pit_state2", "PIT_STATE2", X86),
    _row("KVM_SET_PIT2", "vm", W, 0xA0, "struct kvm_pit_state2", "PIT_STATE2", X86),
    _row("KVM_REGISTER_COALESCED_MMIO", "vm", W, 0x67, "struct kvm_coalesced_mmio_zone",
         "COALESCED_MMIO"),
    _row("KVM_IRQ_LINE_STATUS", "vm", WR, 0x67, "struct kvm_irq_level", "IRQ_INJECT_STATUS"),
    _row("KVM_SET_GSI_ROUTING", "vm", W, 0x6A, "struct kvm_irq_routing", "IRQ_ROUTING"),
    _row("KVM_UNREGISTER_COALESCED_MMIO", "vm", W, 0x68, "struct kvm_coalesced_mmio_zone",
         "COALESCED_MMIO"),
    _row("KVM_IRQFD", "vm", W, 0x76, "struct kvm_irqfd", "IRQFD"),
    _row("KVM_REINJECT_CONTROL", "vm", NONE, 0x71, None, "REINJECT_CONTROL", X86),
    _row("KVM_CREATE_PIT2", "vm", W, 0x77, "struct kvm_pit_config", "PIT2", X86),
    _row("KVM_SET_BOOT_CPU_ID", "vm", NONE, 0x78, None, "SET_BOOT_CPU_ID", X86),
    _row("KVM_IOEVENTFD", "vm", W, 0x79, "struct kvm_ioeventfd", "IOEVENTFD"),
    _row("KVM_SET_CLOCK", "vm", W, 0x7B, "struct kvm_clock_data", "ADJUST_CLOCK", X86),
    _row("KVM_GET_CLOCK", "vm", R, 0x7C, "struct kvm_clock_data", "ADJUST_CLOCK", X86),
    _row("KVM_SIGNAL_MSI", "vm", W, 0xA5, "struct kvm_msi", "SIGNAL_MSI"),
    _row("KVM_ENABLE_CAP", "vm,vcpu", W, 0xA3, "struct kvm_enable_cap", "ENABLE_CAP"),
    _row("KVM_X86_SET_MSR_FILTER", "vm", W, 0xC6, "struct kvm_msr_filter", "X86_MSR_FILTER",
         X86),
    _row("KVM_CLEAR_DIRTY_LOG", "vm", WR, 0xC0, "struct kvm_clear_dirty_log",
         "MANUAL_DIRTY_LOG_PROTECT2"),
    _row("KVM_RESET_DIRTY_RINGS", "vm", NONE, 0xC7, None, "DIRTY_LOG_RING"),
    _row("KVM_SET_MEMORY_ATTRIBUTES", "vm", W, 0xD2, "struct kvm_memory_attributes",
         "MEMORY_ATTRIBUTES"),
    _row("KVM_CREATE_GUEST_MEMFD", "vm", WR, 0xD4, "struct kvm_create_guest_memfd",
         "GUEST_MEMFD"),
    _row("KVM_GET_STATS_FD", "vm,vcpu", NONE, 0xCE, None, "BINARY_STATS_FD"),
    # in-kernel devices (KVM_CREATE_DEVICE on the VM; the attribute ioctls on the fd it returns)
    _row("KVM_CREATE_DEVICE", "vm", WR, 0xE0, "struct kvm_create_device", "DEVICE_CTRL"),
    _row("KVM_SET_DEVICE_ATTR", "device", W, 0xE1, "struct kvm_device_attr", "DEVICE_CTRL"),
    _row("KVM_GET_DEVICE_ATTR", "device", W, 0xE2, "struct kvm_device_attr", "DEVICE_CTRL"),
    _row("KVM_HAS_DEVICE_ATTR", "device", W, 0xE3, "struct kvm_device_attr", "DEVICE_CTRL"),
    # vCPU
    _row("KVM_RUN", "vcpu", NONE, 0x80, None),
    _row("KVM_GET_REGS", "vcpu", R, 0x81, "struct kvm_regs", arches=X86),
    _row("KVM_SET_REGS", "vcpu", W, 0x82, "struct kvm_regs", arches=X86),
    _row("KVM_GET_SREGS", "vcpu", R, 0x83, "struct kvm_sregs", arches=X86),
    _row("KVM_SET_SREGS", "vcpu", W, 0x84, "struct kvm_sregs", arches=X86),
    _row("KVM_TRANSLATE", "vcpu", WR, 0x85, "struct kvm_translation", arches=X86),
    _row("KVM_INTERRUPT", "vcpu", W, 0x86, "struct kvm_interrupt"),
    # on /dev/kvm it reads feature MSRs (KVM_CAP_GET_MSR_FEATURES, api.rst 4.3 / 4.18)
    _row("KVM_GET_MSRS", "system,vcpu", WR, 0x88, "struct kvm_msrs", arches=X86),
    _row("KVM_SET_MSRS", "vcpu", W, 0x89, "struct kvm_msrs", arches=X86),
    _row("KVM_SET_SIGNAL_MASK", "vcpu", W, 0x8B, "struct kvm_signal_mask"),
    _row("KVM_GET_FPU", "vcpu", R, 0x8C, "struct kvm_fpu", arches=X86),
    _row("KVM_SET_FPU", "vcpu", W, 0x8D, "struct kvm_fpu", arches=X86),
    _row("KVM_SET_CPUID2", "vcpu", W, 0x90, "struct kvm_cpuid2", "EXT_CPUID", X86),
    _row("KVM_GET_CPUID2", "vcpu", WR, 0x91, "struct kvm_cpuid2", "EXT_CPUID", X86),
    _row("KVM_GET_MP_STATE", "vcpu", R, 0x98, "struct kvm_mp_state", "MP_STATE"),
    _row("KVM_SET_MP_STATE", "vcpu", W, 0x99, "struct kvm_mp_state", "MP_STATE"),
    _row("KVM_NMI", "vcpu", NONE, 0x9A, None, "USER_NMI", X86),
    _row("KVM_SET_GUEST_DEBUG", "vcpu", W, 0x9B, "struct kvm_guest_debug", "SET_GUEST_DEBUG"),
    _row("KVM_GET_TSC_KHZ", "vcpu", NONE, 0xA3, None, "GET_TSC_KHZ", X86),
    _row("KVM_GET_ONE_REG", "vcpu", W, 0xAB, "struct kvm_one_reg", "ONE_REG"),
    _row("KVM_SET_ONE_REG", "vcpu", W, 0xAC, "struct kvm_one_reg", "ONE_REG"),
    _row("KVM_KVMCLOCK_CTRL", "vcpu", NONE, 0xAD, None, "KVMCLOCK_CTRL", X86),
    _row("KVM_GET_REG_LIST", "vcpu", WR, 0xB0, "struct kvm_reg_list", "ONE_REG"),
    _row("KVM_GET_LAPIC", "vcpu", R, 0x8E, "struct kvm_lapic_state", "IRQCHIP", X86),
    _row("KVM_SET_LAPIC", "vcpu", W, 0x8F, "struct kvm_lapic_state", "IRQCHIP", X86),
    _row("KVM_GET_VCPU_EVENTS", "vcpu", R, 0x9F, "struct kvm_vcpu_events", "VCPU_EVENTS", X86),
    _row("KVM_SET_VCPU_EVENTS", "vcpu", W, 0xA0, "struct kvm_vcpu_events", "VCPU_EVENTS", X86),
    _row("KVM_GET_DEBUGREGS", "vcpu", R, 0xA1, "struct kvm_debugregs", "DEBUGREGS", X86),
    _row("KVM_SET_DEBUGREGS", "vcpu", W, 0xA2, "struct kvm_debugregs", "DEBUGREGS", X86),
    _row("KVM_GET_XSAVE", "vcpu", R, 0xA4, "struct kvm_xsave", "XSAVE", X86),
    _row("KVM_SET_XSAVE", "vcpu", W, 0xA5, "struct kvm_xsave", "XSAVE", X86),
    _row("KVM_GET_XCRS", "vcpu", R, 0xA6, "struct kvm_xcrs", "XCRS", X86),
    _row("KVM_SET_XCRS", "vcpu", W, 0xA7, "struct kvm_xcrs", "XCRS", X86),
    _row("KVM_GET_SREGS2", "vcpu", R, 0xCC, "struct kvm_sregs2", "SREGS2", X86),
    _row("KVM_SET_SREGS2", "vcpu", W, 0xCD, "struct kvm_sregs2", "SREGS2", X86),
    _row("KVM_GET_XSAVE2", "vcpu", R, 0xCF, "struct kvm_xsave", "XSAVE2", X86),
    _row("KVM_GET_NESTED_STATE", "vcpu", WR, 0xBE, "struct kvm_nested_state", "NESTED_STATE", X86),
    _row("KVM_SET_NESTED_STATE", "vcpu", W, 0xBF, "struct kvm_nested_state", "NESTED_STATE", X86),
)
