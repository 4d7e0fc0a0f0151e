"""KVM's in-kernel RISC-V AIA irqchip: one APLIC (wired interrupt sources, MSI mode) and an
IMSIC interrupt file per hart, created with KVM_CREATE_DEVICE (type KVM_DEV_TYPE_RISCV_AIA) and
configured through KVM_SET_DEVICE_ATTR, laid out as QEMU's ``virt`` machine lays them out under
KVM (S-level APLIC at :data:`APLIC_BASE`, S-level IMSIC files from :data:`IMSIC_BASE`, one 4 KiB
page per hart when there are no guest files).

Order (the kernel's, ``arch/riscv/kvm/aia_device.c``): create the device and set its CONFIG
attributes and the APLIC address (:class:`Aia`), create every vCPU, give each its IMSIC address
(:meth:`Aia.set_imsic`), then :meth:`Aia.init` (CTRL_INIT) before any vCPU runs. After that a
wired source is driven with KVM_IRQ_LINE (irq = APLIC source number, 1 ..
:attr:`Aia.sources`), which KVM delivers as an MSI to the IMSIC the guest routed it to.

A host without the device (no Ssaia on the host harts, a KVM older than Linux 6.5, or another
architecture) makes :class:`Aia` raise :class:`AiaUnavailable` with one line saying so.
"""
from __future__ import annotations

import errno

from ..._fd import FdObject
from ..._ioctl import ioctl
from ...abi import ffi, ioctls
from ...abi import riscv64 as uapi
from ...errors import KvmError, PykvmError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Optional

# QEMU virt's S-level interrupt controllers (hw/riscv/virt.c memmap: VIRT_APLIC_S, VIRT_IMSIC_S)
APLIC_BASE = 0x0D000000
APLIC_SIZE = uapi.KVM_DEV_RISCV_APLIC_SIZE
IMSIC_BASE = 0x28000000
IMSIC_FILE_SIZE = uapi.KVM_DEV_RISCV_IMSIC_SIZE
SOURCES = 96            # QEMU virt's VIRT_IRQCHIP_NUM_SOURCES: wired sources 1..96
IDS = 255               # QEMU virt's VIRT_IRQCHIP_NUM_MSIS: MSI identities 1..255 per file

MODES = {"emul": uapi.KVM_DEV_RISCV_AIA_MODE_EMUL,
         "hwaccel": uapi.KVM_DEV_RISCV_AIA_MODE_HWACCEL,
         "auto": uapi.KVM_DEV_RISCV_AIA_MODE_AUTO}
MODE_NAMES = {v: k for k, v in MODES.items()}


class AiaUnavailable(PykvmError):
    """This host's KVM has no in-kernel AIA irqchip (or cannot configure it as asked); the
    message is one line naming what is missing."""


def index_bits(n: int) -> int:
    """Bits that index ``n`` items (0 for one): ceil(log2(n)), as Linux's IMSIC driver derives
    ``riscv,hart-index-bits`` from the number of harts when the device tree does not say."""
    if n < 1:
        raise ValueError(f"index_bits of {n}")
    return (n - 1).bit_length()


def imsic_stride(guest_bits: int = 0) -> int:
    """Bytes between two harts' IMSIC files: the S-level file and 2**guest_bits guest files."""
    return IMSIC_FILE_SIZE << guest_bits


def imsic_address(hart: int, guest_bits: int = 0, base: int = IMSIC_BASE) -> int:
    """Guest-physical address of hart ``hart``'s S-level IMSIC file."""
    return base + hart * imsic_stride(guest_bits)


def available(vm_fd: int) -> bool:
    """Whether the KVM behind the VM descriptor ``vm_fd`` offers KVM_DEV_TYPE_RISCV_AIA (a
    KVM_CREATE_DEVICE with the TEST flag: nothing is created)."""
    cd = ffi.new("struct kvm_create_device *")
    cd.type, cd.flags = uapi.KVM_DEV_TYPE_RISCV_AIA, uapi.KVM_CREATE_DEVICE_TEST
    try:
        ioctl(vm_fd, ioctls.KVM_CREATE_DEVICE, cd, what="type=RISCV_AIA test")
    except KvmError:
        return False
    return True


class Aia(FdObject):
    """The AIA device of one VM (module docstring). ``vm_fd``: the VM's descriptor; ``harts``:
    how many vCPUs will get an IMSIC (1 .. 16384); ``sources``: wired APLIC sources (1 ..
    1024); ``ids``: MSI identities per IMSIC file wanted (63, 127, 255, ...: one less than a
    multiple of 64; lowered to what the host offers); ``mode``: "emul", "hwaccel", "auto" or
    None for the kernel's default. After construction :attr:`mode` (its name), :attr:`ids`,
    :attr:`sources`, :attr:`hart_bits` hold what KVM took.

    Raises :class:`AiaUnavailable` (one line) when the host has no such device or refuses the
    mode; ValueError for arguments out of range; :class:`~pykvm.errors.KvmError` for any
    other refusal."""

    def __init__(self, vm_fd: int, harts: int, *, sources: int = SOURCES, ids: int = IDS,
                 mode: Optional[str] = None, aplic_base: int = APLIC_BASE,
                 imsic_base: int = IMSIC_BASE):
        if not 1 <= harts <= uapi.KVM_DEV_RISCV_APLIC_MAX_HARTS:
            raise ValueError(f"an AIA serves 1 to {uapi.KVM_DEV_RISCV_APLIC_MAX_HARTS} harts, "
                             f"not {harts}")
        if not 1 <= sources <= uapi.KVM_DEV_RISCV_AIA_SRCS_MAX:
            raise ValueError(f"APLIC sources must be 1 to {uapi.KVM_DEV_RISCV_AIA_SRCS_MAX}, "
                             f"not {sources}")
        if (ids & 63) != 63 or not uapi.KVM_DEV_RISCV_AIA_IDS_MIN <= ids \
                < uapi.KVM_DEV_RISCV_AIA_IDS_MAX:
            raise ValueError(f"IMSIC ids must be 63, 127, ... below "
                             f"{uapi.KVM_DEV_RISCV_AIA_IDS_MAX}, not {ids}")
        if mode is not None and mode not in MODES:
            raise ValueError(f"AIA mode must be one of {', '.join(MODES)}, not {mode!r}")
        self.harts = harts
        self.aplic_base, self.imsic_base = aplic_base, imsic_base
        self.guest_bits = 0
        self.hart_bits = index_bits(harts)
        self.initialized = False
        cd = ffi.new("struct kvm_create_device *")
        cd.type = uapi.KVM_DEV_TYPE_RISCV_AIA
        try:
            ioctl(vm_fd, ioctls.KVM_CREATE_DEVICE, cd, what="type=RISCV_AIA")
        except KvmError as e:
            raise AiaUnavailable(
                "this host's KVM has no in-kernel RISC-V AIA irqchip (KVM_CREATE_DEVICE "
                f"KVM_DEV_TYPE_RISCV_AIA: {e.errno_name}; it needs Ssaia on the host harts "
                "and Linux 6.5 or later)") from None
        self._own_fd(cd.fd)
        try:
            self._configure(sources, ids, mode)
        except BaseException:
            self.close()
            raise

    def _configure(self, sources: int, ids: int, mode: Optional[str]) -> None:
        config = uapi.KVM_DEV_RISCV_AIA_GRP_CONFIG
        default_mode = self.get(config, uapi.KVM_DEV_RISCV_AIA_CONFIG_MODE)
        if mode is not None and MODES[mode] != default_mode:
            try:
                self.set(config, uapi.KVM_DEV_RISCV_AIA_CONFIG_MODE, MODES[mode])
            except KvmError as e:
                raise AiaUnavailable(
                    f"this host's KVM cannot run the AIA in {mode} mode ({e.errno_name}; its "
                    f"default is {MODE_NAMES.get(default_mode, default_mode)})") from None
        self.mode = MODE_NAMES.get(self.get(config, uapi.KVM_DEV_RISCV_AIA_CONFIG_MODE),
                                   "unknown")
        host_ids = self.get(config, uapi.KVM_DEV_RISCV_AIA_CONFIG_IDS)
        self.ids = min(ids, host_ids)
        self.set(config, uapi.KVM_DEV_RISCV_AIA_CONFIG_IDS, self.ids)
        self.set(config, uapi.KVM_DEV_RISCV_AIA_CONFIG_SRCS, sources)
        self.sources = sources
        self.set(config, uapi.KVM_DEV_RISCV_AIA_CONFIG_HART_BITS, self.hart_bits)
        self.set(config, uapi.KVM_DEV_RISCV_AIA_CONFIG_GUEST_BITS, self.guest_bits)
        self.set(uapi.KVM_DEV_RISCV_AIA_GRP_ADDR, uapi.KVM_DEV_RISCV_AIA_ADDR_APLIC,
                 self.aplic_base, width=8)

    # -- attributes -----------------------------------------------------------------------
    def _attr(self, group: int, attr: int, value: Optional[int], width: int):
        buf = ffi.new("uint64_t *" if width == 8 else "uint32_t *")
        if value is not None:
            buf[0] = value
        a = ffi.new("struct kvm_device_attr *")
        a.group, a.attr, a.addr = group, attr, int(ffi.cast("uintptr_t", buf))
        return a, buf

    def set(self, group: int, attr: int, value: Optional[int] = None, *, width: int = 4) -> None:
        """KVM_SET_DEVICE_ATTR: ``value`` (a u32, or a u64 with ``width`` 8; None: no value,
        as CTRL_INIT takes) into attribute ``attr`` of ``group``."""
        if value is None:
            a = ffi.new("struct kvm_device_attr *")
            a.group, a.attr = group, attr
            ioctl(self.fd, ioctls.KVM_SET_DEVICE_ATTR, a, what=f"group={group} attr={attr}")
            return
        a, _buf = self._attr(group, attr, value, width)
        ioctl(self.fd, ioctls.KVM_SET_DEVICE_ATTR, a,
              what=f"group={group} attr={attr} value={value:#x}")

    def get(self, group: int, attr: int, *, width: int = 4) -> int:
        """KVM_GET_DEVICE_ATTR: attribute ``attr`` of ``group`` (a u32, or a u64 with
        ``width`` 8)."""
        a, buf = self._attr(group, attr, None, width)
        ioctl(self.fd, ioctls.KVM_GET_DEVICE_ATTR, a, what=f"group={group} attr={attr}")
        return int(buf[0])

    def has(self, group: int, attr: int) -> bool:
        """KVM_HAS_DEVICE_ATTR: whether the device knows attribute ``attr`` of ``group``."""
        a = ffi.new("struct kvm_device_attr *")
        a.group, a.attr = group, attr
        try:
            ioctl(self.fd, ioctls.KVM_HAS_DEVICE_ATTR, a, what=f"group={group} attr={attr}")
        except KvmError as e:
            if e.errno in (errno.ENXIO, errno.EINVAL):
                return False
            raise
        return True

    # -- after the vCPUs exist --------------------------------------------------------------
    def imsic_address(self, hart: int) -> int:
        """Guest-physical address of hart ``hart``'s S-level IMSIC file."""
        return imsic_address(hart, self.guest_bits, self.imsic_base)

    def set_imsic(self, vcpu_id: int) -> None:
        """Give vCPU ``vcpu_id`` (created already) its IMSIC file at :meth:`imsic_address`."""
        self.set(uapi.KVM_DEV_RISCV_AIA_GRP_ADDR, uapi.KVM_DEV_RISCV_AIA_ADDR_IMSIC(vcpu_id),
                 self.imsic_address(vcpu_id), width=8)

    def init(self) -> None:
        """CTRL_INIT: KVM checks the layout and makes the irqchip live (once; every vCPU must
        have its IMSIC address by now)."""
        if not self.initialized:
            self.set(uapi.KVM_DEV_RISCV_AIA_GRP_CTRL, uapi.KVM_DEV_RISCV_AIA_CTRL_INIT)
            self.initialized = True
