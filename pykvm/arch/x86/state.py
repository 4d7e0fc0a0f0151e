"""x86 vCPU and VM state ioctls beyond the register files: vCPU events, the local APIC page,
XSAVE and XCRs, debug registers, SREGS2, and the VM's MSR filter.

Each method issues one row of :mod:`pykvm.abi.ioctls` and is named after the section of Linux's
``Documentation/virt/kvm/api.rst`` that describes it. The ``get_*`` methods return a fresh
value the caller owns (a cffi struct, ``bytes`` or a ``dict``); the matching ``set_*`` takes the
same kind of value back, so a test reads, changes one field and writes::

    ev = vcpu.get_vcpu_events()
    ev.nmi.pending = 1
    ev.flags = abi.arch.VCPUEVENT_VALID["NMI_PENDING"]
    vcpu.set_vcpu_events(ev)

Every method raises :class:`~pykvm.errors.KvmError` (naming the ioctl and the errno) when KVM
refuses the call; where this KVM lacks the capability that gates the ioctl, the error's text
says "needs ``KVM_CAP_<name>``, which this KVM does not offer". These are mixed into
:class:`pykvm.vcpu.Vcpu` and :class:`pykvm.vm.Vm` on x86 hosts.
"""
from __future__ import annotations

from ... import abi
from ..._ioctl import check_extension, ioctl
from ...abi import CData, ffi, ioctls
from ...errors import CapabilityMissing

from collections import namedtuple

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Dict, Iterable, Union

_XSAVE_SIZE = 4096                   # sizeof(struct kvm_xsave) without its flexible tail
_arch = abi.arch


def apic_reg(page: bytes, offset: int) -> int:
    """The 32-bit local APIC register at byte ``offset`` (e.g. 0x80 TPR, 0x380 timer initial
    count; Intel SDM vol. 3A, "Local APIC Register Address Map") of a page from
    :meth:`VcpuState.get_lapic`, as an unsigned int. Raises ValueError for an offset that is not
    a 16-byte-aligned register inside the page."""
    _check_apic_offset(offset)
    return int.from_bytes(page[offset:offset + 4], "little")


def set_apic_reg(page: bytearray, offset: int, value: int) -> None:
    """Store ``value`` (an unsigned 32-bit int) into the local APIC register at byte ``offset``
    of ``page`` (a ``bytearray`` from :meth:`VcpuState.get_lapic`), for
    :meth:`VcpuState.set_lapic`. Raises ValueError for a bad offset or value."""
    _check_apic_offset(offset)
    if not 0 <= value <= 0xFFFFFFFF:
        raise ValueError(f"APIC register value {value:#x} does not fit 32 bits")
    page[offset:offset + 4] = value.to_bytes(4, "little")


def _check_apic_offset(offset: int) -> None:
    if offset % 16 or not 0 <= offset < _arch.APIC_REG_SIZE:
        raise ValueError(f"APIC register offset {offset:#x} is not a 16-byte-aligned offset "
                         f"below {_arch.APIC_REG_SIZE:#x}")


class MsrFilterRange(namedtuple("MsrFilterRange", "flags base nmsrs bitmap")):
    """One range of a KVM_X86_SET_MSR_FILTER filter: ``flags`` (``abi.arch.MSR_FILTER_READ``
    and/or ``MSR_FILTER_WRITE``: the accesses the range covers), ``base`` (the first MSR index),
    ``nmsrs`` (how many MSRs from ``base`` the bitmap covers) and ``bitmap`` (bytes, bit i for
    MSR ``base + i``, least significant bit first: 1 allows the access, 0 denies it; at least
    ``ceil(nmsrs / 8)`` and at most ``abi.arch.MSR_FILTER_MAX_BITMAP_SIZE`` bytes)."""

    __slots__ = ()

    @classmethod
    def deny(cls, *msrs: int, read: bool = True, write: bool = True) -> MsrFilterRange:
        """A range that denies ``read`` and/or ``write`` accesses to each of ``msrs`` (ints,
        MSR indices within one span of ``MSR_FILTER_MAX_BITMAP_SIZE * 8``) and allows every
        other MSR of its span. Raises ValueError for no MSRs, no access kind or too wide a
        span."""
        if not msrs or not (read or write):
            raise ValueError("MsrFilterRange.deny() needs at least one MSR and access kind")
        base = min(msrs)
        n = max(msrs) - base + 1
        if n > _arch.MSR_FILTER_MAX_BITMAP_SIZE * 8:
            raise ValueError(f"MSRs {base:#x}..{max(msrs):#x} span more than one filter range")
        bits = bytearray(b"\xff" * ((n + 7) // 8))
        for m in msrs:
            bits[(m - base) // 8] &= ~(1 << ((m - base) % 8)) & 0xFF
        flags = (_arch.MSR_FILTER_READ if read else 0) | (_arch.MSR_FILTER_WRITE if write else 0)
        return cls(flags, base, n, bytes(bits))


class VcpuState:
    """The x86 vCPU state ioctls (mixed into :class:`pykvm.vcpu.Vcpu`)."""

    if TYPE_CHECKING:
        vm: Any

        @property
        def fd(self) -> int: ...

    # -- KVM_GET/SET_VCPU_EVENTS ---------------------------------------------------------
    def get_vcpu_events(self) -> CData:
        """KVM_GET_VCPU_EVENTS (api.rst "KVM_GET_VCPU_EVENTS", needs KVM_CAP_VCPU_EVENTS): the
        vCPU's pending and injected exception, interrupt, NMI and SMI, its interrupt shadow,
        SIPI vector and pending triple fault, as a fresh ``struct kvm_vcpu_events *`` (fields
        as in the uAPI: ``exception.nr``, ``nmi.pending``, ``nmi.masked``,
        ``interrupt.shadow`` ...). Raises :class:`~pykvm.errors.KvmError` if KVM refuses."""
        ev = ffi.new("struct kvm_vcpu_events *")
        ioctl(self.fd, ioctls.KVM_GET_VCPU_EVENTS, ev)
        return ev

    def set_vcpu_events(self, events: CData) -> None:
        """KVM_SET_VCPU_EVENTS (api.rst "KVM_SET_VCPU_EVENTS"): load ``events`` (a
        ``struct kvm_vcpu_events *``, e.g. from :meth:`get_vcpu_events`). Its ``flags`` say
        which optional fields KVM takes (``abi.arch.VCPUEVENT_VALID``: "NMI_PENDING",
        "SIPI_VECTOR", "SHADOW", "SMM", "PAYLOAD", "TRIPLE_FAULT"); fields not flagged keep
        their value. Raises :class:`~pykvm.errors.KvmError` (EINVAL for an invalid combination,
        e.g. an exception vector above 31 or a flag whose capability is not enabled)."""
        ioctl(self.fd, ioctls.KVM_SET_VCPU_EVENTS, events,
              what=f"flags={int(events.flags):#x}")

    # -- KVM_GET/SET_LAPIC ----------------------------------------------------------------
    def get_lapic(self) -> bytearray:
        """KVM_GET_LAPIC (api.rst "KVM_GET_LAPIC"; needs the in-kernel irqchip,
        :meth:`pykvm.vm.Vm.create_irqchip`, made before this vCPU): the local APIC's register
        page, ``abi.arch.APIC_REG_SIZE`` (1024) bytes laid out as the APIC's MMIO page (read a
        register with :func:`apic_reg`). Raises :class:`~pykvm.errors.KvmError` (ENXIO without
        an in-kernel APIC)."""
        s = ffi.new("struct kvm_lapic_state *")
        ioctl(self.fd, ioctls.KVM_GET_LAPIC, s)
        return bytearray(ffi.buffer(s.regs))

    def set_lapic(self, page: bytes) -> None:
        """KVM_SET_LAPIC (api.rst "KVM_SET_LAPIC"): load the local APIC's register page from
        ``page`` (exactly 1024 bytes, as :meth:`get_lapic` returns; change a register with
        :func:`set_apic_reg`). Raises ValueError for another size and
        :class:`~pykvm.errors.KvmError` if KVM refuses (ENXIO without an in-kernel APIC)."""
        raw = bytes(page)
        if len(raw) != _arch.APIC_REG_SIZE:
            raise ValueError(f"the APIC page is {_arch.APIC_REG_SIZE} bytes, got {len(raw)}")
        s = ffi.new("struct kvm_lapic_state *")
        ffi.memmove(s.regs, raw, len(raw))
        ioctl(self.fd, ioctls.KVM_SET_LAPIC, s)

    # -- KVM_GET/SET_DEBUGREGS ------------------------------------------------------------
    def get_debugregs(self) -> CData:
        """KVM_GET_DEBUGREGS (api.rst "KVM_GET_DEBUGREGS", needs KVM_CAP_DEBUGREGS): the
        guest's debug registers as a fresh ``struct kvm_debugregs *``: ``db[0..3]`` (DR0-DR3,
        linear addresses), ``dr6``, ``dr7``, ``flags``. Raises
        :class:`~pykvm.errors.KvmError` if KVM refuses."""
        d = ffi.new("struct kvm_debugregs *")
        ioctl(self.fd, ioctls.KVM_GET_DEBUGREGS, d)
        return d

    def set_debugregs(self, regs: CData) -> None:
        """KVM_SET_DEBUGREGS (api.rst "KVM_SET_DEBUGREGS"): load DR0-DR3, DR6 and DR7 from
        ``regs`` (a ``struct kvm_debugregs *``, ``flags`` 0). Raises
        :class:`~pykvm.errors.KvmError` (EINVAL for non-zero flags or reserved DR6/DR7 upper
        bits set)."""
        ioctl(self.fd, ioctls.KVM_SET_DEBUGREGS, regs, what=f"dr7={int(regs.dr7):#x}")

    # -- KVM_GET/SET_XSAVE, KVM_GET_XSAVE2 ------------------------------------------------
    def get_xsave(self) -> bytes:
        """KVM_GET_XSAVE (api.rst "KVM_GET_XSAVE", needs KVM_CAP_XSAVE): the vCPU's XSAVE area
        (x87, SSE, AVX ... state in the XSAVE standard format, offsets as host CPUID leaf 0xD
        gives them), its first 4096 bytes. Use :meth:`get_xsave2` where dynamic features make
        the area larger. Raises :class:`~pykvm.errors.KvmError` if KVM refuses."""
        x = ffi.new("struct kvm_xsave *")
        ioctl(self.fd, ioctls.KVM_GET_XSAVE, x)
        return bytes(ffi.buffer(x))

    def xsave_size(self) -> int:
        """KVM_CHECK_EXTENSION(KVM_CAP_XSAVE2) on the VM: the size in bytes (>= 4096) of the
        XSAVE area that :meth:`get_xsave2` returns and :meth:`set_xsave` takes. Raises
        :class:`~pykvm.errors.CapabilityMissing` when this KVM lacks KVM_CAP_XSAVE2."""
        size = check_extension(self.vm.fd, "XSAVE2")
        if size <= 0:
            raise CapabilityMissing("KVM_GET_XSAVE2 needs KVM_CAP_XSAVE2, which this KVM does "
                                    "not offer (use get_xsave)")
        return max(size, _XSAVE_SIZE)

    def get_xsave2(self) -> bytes:
        """KVM_GET_XSAVE2 (api.rst "KVM_GET_XSAVE2", needs KVM_CAP_XSAVE2): the whole XSAVE
        area, :meth:`xsave_size` bytes (the first 4096 as :meth:`get_xsave`, then the
        dynamically enabled components such as AMX tile data). Raises
        :class:`~pykvm.errors.CapabilityMissing` without KVM_CAP_XSAVE2 and
        :class:`~pykvm.errors.KvmError` if KVM refuses."""
        size = self.xsave_size()
        x = ffi.new("struct kvm_xsave *", {"extra": (size - _XSAVE_SIZE) // 4 or 1})
        ioctl(self.fd, ioctls.KVM_GET_XSAVE2, x, what=f"{size} bytes")
        return bytes(ffi.buffer(x, size))

    def set_xsave(self, area: bytes) -> None:
        """KVM_SET_XSAVE (api.rst "KVM_SET_XSAVE"): load the XSAVE area from ``area`` (bytes as
        :meth:`get_xsave` or :meth:`get_xsave2` returns: 4096 bytes, or up to
        :meth:`xsave_size`; a multiple of 4). KVM reads 4096 bytes, or KVM_CAP_XSAVE2's size
        where that is larger, so a shorter area is zero-extended. Raises ValueError for a bad
        size and :class:`~pykvm.errors.KvmError` (EINVAL for state components or XSTATE_BV
        bits the guest's XCR0 / CPUID do not allow)."""
        raw = bytes(area)
        if len(raw) < _XSAVE_SIZE or len(raw) % 4:
            raise ValueError(f"an XSAVE area is at least {_XSAVE_SIZE} bytes and a multiple "
                             f"of 4, got {len(raw)}")
        size = _XSAVE_SIZE
        if len(raw) > _XSAVE_SIZE:
            size = self.xsave_size()
            if len(raw) > size:
                raise ValueError(f"XSAVE area of {len(raw)} bytes is larger than this KVM's "
                                 f"{size}")
        elif check_extension(self.vm.fd, "XSAVE2") > _XSAVE_SIZE:
            size = self.xsave_size()    # KVM reads this much: give it zeros past ``area``
        x = ffi.new("struct kvm_xsave *", {"extra": (size - _XSAVE_SIZE) // 4 or 1})
        ffi.memmove(x, raw, len(raw))
        ioctl(self.fd, ioctls.KVM_SET_XSAVE, x, what=f"{len(raw)} bytes")

    # -- KVM_GET/SET_XCRS -----------------------------------------------------------------
    def get_xcrs(self) -> Dict[int, int]:
        """KVM_GET_XCRS (api.rst "KVM_GET_XCRS", needs KVM_CAP_XCRS): the vCPU's extended
        control registers as ``{index: value}`` (ints; index 0 is XCR0, the enabled XSAVE
        state components). Raises :class:`~pykvm.errors.KvmError` if KVM refuses."""
        x = ffi.new("struct kvm_xcrs *")
        ioctl(self.fd, ioctls.KVM_GET_XCRS, x)
        return {int(x.xcrs[i].xcr): int(x.xcrs[i].value)
                for i in range(min(x.nr_xcrs, _arch.MAX_XCRS))}

    def set_xcrs(self, values: Dict[int, int]) -> None:
        """KVM_SET_XCRS (api.rst "KVM_SET_XCRS"): load extended control registers from
        ``{index: value}`` (at most ``abi.arch.MAX_XCRS``). Raises ValueError for too many and
        :class:`~pykvm.errors.KvmError` (EINVAL for an XCR0 that the guest's CPUID leaf 0xD
        does not allow, that lacks x87, or sets AVX without SSE)."""
        items = list(values.items())
        if len(items) > _arch.MAX_XCRS:
            raise ValueError(f"at most {_arch.MAX_XCRS} XCRs, got {len(items)}")
        x = ffi.new("struct kvm_xcrs *")
        x.nr_xcrs = len(items)
        for i, (k, v) in enumerate(items):
            x.xcrs[i].xcr, x.xcrs[i].value = k, v
        ioctl(self.fd, ioctls.KVM_SET_XCRS, x,
              what=", ".join(f"xcr{k}={v:#x}" for k, v in items))

    # -- KVM_GET/SET_SREGS2 ---------------------------------------------------------------
    def get_sregs2(self) -> CData:
        """KVM_GET_SREGS2 (api.rst "KVM_GET_SREGS2", needs KVM_CAP_SREGS2): the special
        registers as a fresh ``struct kvm_sregs2 *``: KVM_GET_SREGS's fields without the
        interrupt bitmap, plus ``flags`` and ``pdptrs[4]`` (PAE page-directory pointers, valid
        when ``flags`` has ``abi.arch.SREGS2_FLAGS_PDPTRS_VALID``). Raises
        :class:`~pykvm.errors.KvmError` if KVM refuses."""
        s = ffi.new("struct kvm_sregs2 *")
        ioctl(self.fd, ioctls.KVM_GET_SREGS2, s)
        return s

    def set_sregs2(self, sregs: CData) -> None:
        """KVM_SET_SREGS2 (api.rst "KVM_SET_SREGS2"): load the special registers from
        ``sregs`` (a ``struct kvm_sregs2 *``, e.g. from :meth:`get_sregs2`). Raises
        :class:`~pykvm.errors.KvmError` (EINVAL for an invalid CR0/CR4/EFER combination or
        unknown flags)."""
        ioctl(self.fd, ioctls.KVM_SET_SREGS2, sregs,
              what=f"cr0={int(sregs.cr0):#x} cr4={int(sregs.cr4):#x}")


class VmState:
    """The x86 VM-wide state ioctls (mixed into :class:`pykvm.vm.Vm`)."""

    if TYPE_CHECKING:
        @property
        def fd(self) -> int: ...

    def set_msr_filter(self, ranges: Iterable[Union[MsrFilterRange, tuple]] = (), *,
                       default_deny: bool = False) -> None:
        """KVM_X86_SET_MSR_FILTER (api.rst "KVM_X86_SET_MSR_FILTER", needs
        KVM_CAP_X86_MSR_FILTER): replace the VM's MSR filter with ``ranges`` (at most
        ``abi.arch.MSR_FILTER_MAX_RANGES`` :class:`MsrFilterRange` or equal tuples); an MSR no
        range covers is allowed, or denied with ``default_deny``. No ranges and no default deny
        removes the filter. A denied access raises #GP in the guest or, with
        KVM_CAP_X86_USER_SPACE_MSR enabled with ``abi.arch.MSR_EXIT_REASON_FILTER``, exits with
        KVM_EXIT_X86_RDMSR / KVM_EXIT_X86_WRMSR (:class:`pykvm.exits.X86Rdmsr`). Raises
        ValueError for too many ranges or a bitmap that does not fit and
        :class:`~pykvm.errors.KvmError` if KVM refuses."""
        rs = [MsrFilterRange(*r) for r in ranges]
        if len(rs) > _arch.MSR_FILTER_MAX_RANGES:
            raise ValueError(f"at most {_arch.MSR_FILTER_MAX_RANGES} MSR filter ranges, got "
                             f"{len(rs)}")
        f = ffi.new("struct kvm_msr_filter *")
        f.flags = _arch.MSR_FILTER_DEFAULT_DENY if default_deny else _arch.MSR_FILTER_DEFAULT_ALLOW
        keep = []
        for i, r in enumerate(rs):
            need = (r.nmsrs + 7) // 8
            if not 0 < r.nmsrs or len(r.bitmap) < need or \
                    len(r.bitmap) > _arch.MSR_FILTER_MAX_BITMAP_SIZE:
                raise ValueError(f"MSR filter range {i}: {r.nmsrs} MSRs need {need} bitmap "
                                 f"bytes (at most {_arch.MSR_FILTER_MAX_BITMAP_SIZE}), got "
                                 f"{len(r.bitmap)}")
            bm = ffi.new("uint8_t[]", bytes(r.bitmap))
            keep.append(bm)
            d = f.ranges[i]
            d.flags, d.nmsrs, d.base, d.bitmap = r.flags, r.nmsrs, r.base, bm
        ioctl(self.fd, ioctls.KVM_X86_SET_MSR_FILTER, f,
              what=f"{len(rs)} ranges{', default deny' if default_deny else ''}")
        del keep
