"""`Kvm`: the system file descriptor, /dev/kvm."""
from __future__ import annotations

import errno
import os
import stat

from . import abi
from ._fd import FdObject
from ._ioctl import check_extension as _check_extension, ioctl, raw_ioctl
from .abi import CData, cap_number, ffi, ioctls
from .abi.ioctls import Ioctl
from .arch import current as _arch
from .errors import (CapabilityMissing, KvmDeviceError, KvmError, host_resource_error,
                     kvm_error)
from .vm import Vm

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Dict, Iterable, List, Optional, Union

DEFAULT_PATH = "/dev/kvm"


def _open_hint(path: str, e: OSError) -> str:
    """One line on why ``path`` could not be opened and what to do."""
    if e.errno in (errno.EACCES, errno.EPERM):
        return (f"permission denied opening {path}: add your user to the group that owns it "
                f"(usually 'kvm': sudo usermod -aG kvm $USER, then log in again), or run as root")
    if e.errno == errno.ENOENT:
        return (f"{path} does not exist: load KVM (modprobe kvm_intel or kvm_amd), enable "
                f"virtualization in the firmware, or pick a device with --device or "
                f"$PYKVM_DEVICE")
    return f"cannot open {path}: {e.strerror}"


class Kvm(_arch.KvmArch, FdObject):
    """An open ``/dev/kvm``.

    >>> with Kvm() as kvm:
    ...     vm = kvm.create_vm()
    """

    def __init__(self, path: Optional[str] = None):
        """Open the KVM device: ``path``, else ``$PYKVM_DEVICE``, else ``/dev/kvm``.

        Raises :class:`~pykvm.errors.KvmDeviceError` (one line saying what to do) when the
        device is missing, not accessible, not a character device or not KVM, or speaks another
        KVM API version than 12, and :class:`~pykvm.errors.HostResourceError` when the process
        is out of file descriptors (EMFILE/ENFILE) or memory."""
        self.path = path or os.environ.get("PYKVM_DEVICE") or DEFAULT_PATH
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY)
        except OSError as e:
            hr = host_resource_error(e)         # out of fds or memory: the host, not the device
            if hr is not None:
                raise hr from e
            raise KvmDeviceError(_open_hint(self.path, e)) from None
        self._own_fd(fd)
        try:
            if not stat.S_ISCHR(os.fstat(fd).st_mode):
                raise KvmDeviceError(f"{self.path} is not a KVM device (not a character device)")
            try:
                self.api_version = ioctl(fd, ioctls.KVM_GET_API_VERSION)
            except KvmError as e:
                raise KvmDeviceError(f"{self.path} is not a KVM device (KVM_GET_API_VERSION: "
                                     f"{e.errno_name})") from None
        except BaseException:
            self.close()
            raise
        if self.api_version != 12:
            self.close()
            raise KvmDeviceError(f"{self.path}: KVM API version {self.api_version}, "
                                 "pykvm needs 12")
        self.vcpu_mmap_size = ioctl(fd, ioctls.KVM_GET_VCPU_MMAP_SIZE)

    arch = abi.ARCH

    if hasattr(_arch.KvmArch, "supported_cpuid"):          # x86
        def supported_cpuid(self) -> "List[_arch.CpuidEntry]":
            """KVM_GET_SUPPORTED_CPUID, asked once per open device (the answer does not change
            while it is open) and shared by every machine made with it: each call returns a new
            list of the same immutable entries."""
            cached = self.__dict__.get("_supported_cpuid")
            if cached is None:
                cached = self._supported_cpuid = tuple(super().supported_cpuid())
            return list(cached)

    if ioctls.row("KVM_GET_MSR_FEATURE_INDEX_LIST").available:    # x86
        def feature_msr_index_list(self) -> List[int]:
            """KVM_GET_MSR_FEATURE_INDEX_LIST (api.rst 4.3, needs KVM_CAP_GET_MSR_FEATURES): the
            indices (ints) of the feature MSRs, the MSRs that describe what the host's CPU and
            KVM offer a guest (e.g. IA32_ARCH_CAPABILITIES 0x10a, the VMX capability MSRs) and
            that :meth:`get_feature_msrs` reads. Raises :class:`~pykvm.errors.KvmError` (naming
            the missing capability) when KVM refuses."""
            n = 64
            while True:
                m = ffi.new("struct kvm_msr_list *", {"indices": n})
                m.nmsrs = n
                try:
                    ioctl(self.fd, ioctls.KVM_GET_MSR_FEATURE_INDEX_LIST, m)
                except KvmError as e:
                    # E2BIG: KVM wrote the count it needs into nmsrs; ask again with room
                    if e.errno == errno.E2BIG and n < m.nmsrs <= 1 << 16:
                        n = m.nmsrs
                        continue
                    raise
                return [int(m.indices[i]) for i in range(min(m.nmsrs, n))]

        def get_feature_msrs(self, indices: Iterable[int]) -> Dict[int, int]:
            """KVM_GET_MSRS issued on /dev/kvm (api.rst 4.18, needs KVM_CAP_GET_MSR_FEATURES):
            the values KVM reports for the feature MSRs ``indices`` (ints, 32-bit MSR numbers,
            e.g. from :meth:`feature_msr_index_list`) as ``{index: value}`` (64-bit ints), in
            the order asked. Raises ValueError for an index that is not a 32-bit number,
            :class:`~pykvm.errors.CapabilityMissing` when this KVM lacks
            KVM_CAP_GET_MSR_FEATURES, and :class:`~pykvm.errors.KvmError` when KVM refuses
            or reads fewer MSRs than asked (KVM stops at the first index that is not a feature
            MSR; the message names it)."""
            idx = list(indices)
            for i in idx:
                if not isinstance(i, int) or not 0 <= i < 1 << 32:
                    raise ValueError(f"an MSR index is a 32-bit number, not {i!r}")
            self.require("GET_MSR_FEATURES")
            m = ffi.new("struct kvm_msrs *", {"entries": max(1, len(idx))})
            m.nmsrs = len(idx)
            for k, i in enumerate(idx):
                m.entries[k].index = i
            got = ioctl(self.fd, ioctls.KVM_GET_MSRS, m, what=f"{len(idx)} feature MSRs")
            if got != len(idx):
                raise kvm_error("KVM_GET_MSRS", errno.EINVAL, f"{idx[got]:#x}",
                                f"{idx[got]:#x} is not a feature MSR ({got} of {len(idx)} "
                                f"read on {self.path})")
            return {int(m.entries[k].index): int(m.entries[k].data) for k in range(got)}

    def ioctl(self, row: Union[Ioctl, str], arg: Union[int, CData] = 0, *,
              what: str = "") -> int:
        """Issue a row of the ioctl table (:mod:`pykvm.abi.ioctls`) that has no method here on
        /dev/kvm: ``row`` is the :class:`~pykvm.abi.ioctls.Ioctl` or its name
        (``"KVM_GET_MSR_FEATURE_INDEX_LIST"``), ``arg`` an int for a row without an argument type,
        else a cffi pointer to (or array of at least the size of) the row's argument struct (``ffi.new(row.arg + " *")``). Returns the ioctl's non-negative result.
        Raises TypeError for an argument of another kind or smaller than
        the row's struct (the kernel would write past it), KeyError for an unknown name, ValueError for a row that is not issued on the
        system fd or does not exist on this architecture, and
        :class:`~pykvm.errors.KvmError` (naming the row, ``what``, the errno and a missing
        capability) when KVM refuses. The escape hatch for selftests, as
        :meth:`pykvm.vm.Vm.ioctl` and :meth:`pykvm.vcpu.Vcpu.ioctl`; an fd KVM_CREATE_VM
        returns this way is the caller's to close."""
        return raw_ioctl(self.fd, "system", row, arg, what)

    def check_extension(self, cap: Union[str, int]) -> int:
        """KVM_CHECK_EXTENSION on /dev/kvm: 0 if absent, else a cap-specific value."""
        return _check_extension(self.fd, cap)

    def require(self, cap: Union[str, int]) -> int:
        """Like :meth:`check_extension` but raises :class:`CapabilityMissing` when absent."""
        v = self.check_extension(cap)
        if not v:
            raise CapabilityMissing(f"KVM_CAP_{abi.CAP_NAMES.get(cap_number(cap), cap)} is not "
                                    f"offered by {self.path}")
        return v

    def caps(self) -> Dict[str, int]:
        """Every capability pykvm knows by name, with its KVM_CHECK_EXTENSION value."""
        return {name: self.check_extension(num) for name, num in abi.CAPS.items()}

    def vm_types(self) -> List[str]:
        """The VM types KVM_CREATE_VM accepts here, by name (``"DEFAULT"``, x86:
        ``"SW_PROTECTED"``, ``"SEV"``, ... as in :data:`pykvm.abi.arch.VM_TYPES`): the bits of
        KVM_CHECK_EXTENSION(KVM_CAP_VM_TYPES) (api.rst 8.41); ``["DEFAULT"]`` on a KVM
        without that capability. A bit pykvm has no name for shows as ``"TYPE_<n>"``."""
        bits = self.check_extension("VM_TYPES") or 1
        names = {v: k for k, v in abi.arch.VM_TYPES.items()}
        return [names.get(n, f"TYPE_{n}") for n in range(bits.bit_length()) if bits >> n & 1]

    def create_vm(self, vm_type: Union[int, str] = 0, **kwargs: Any) -> Vm:
        """KVM_CREATE_VM (api.rst 4.2) → :class:`~pykvm.vm.Vm`. ``vm_type``: the machine
        type, an int or a name of :data:`pykvm.abi.arch.VM_TYPES` (x86: ``"SW_PROTECTED"``
        for KVM_X86_SW_PROTECTED_VM; see :meth:`vm_types` for what this KVM offers). Raises
        ValueError for an unknown name and :class:`~pykvm.errors.KvmError` (EINVAL for a type
        this KVM does not offer) when KVM refuses."""
        if isinstance(vm_type, str):
            try:
                vm_type = abi.arch.VM_TYPES[vm_type.upper()]
            except KeyError:
                raise ValueError(f"unknown VM type {vm_type!r} (known: "
                                 f"{', '.join(abi.arch.VM_TYPES)})") from None
        fd = ioctl(self.fd, ioctls.KVM_CREATE_VM, vm_type, what=str(vm_type))
        return Vm(self, fd, **kwargs)

    def info(self) -> Dict[str, object]:
        """A JSON-ready description of this KVM (what ``pykvm caps --json`` prints)."""
        out: Dict[str, object] = {
            "path": self.path,
            "api_version": self.api_version,
            "arch": self.arch,
            "vcpu_mmap_size": self.vcpu_mmap_size,
            "caps": self.caps(),
        }
        out.update(self.arch_info())
        return out

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"fd={self._fd}"
        return f"<Kvm {self.path} {state} api={self.api_version}>"


__all__ = ["Kvm", "KvmError", "cap_number"]
