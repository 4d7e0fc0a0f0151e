"""x86 parts of Kvm / Vm / Vcpu (the arch ioctl helpers below the vCPU layer): supported and
emulated CPUID, MSR lists, regs/sregs/fpu, MSRs (KVM_GET_MSRS and ONE_REG), CPUID, TSS/identity
map, PIT, nested state; the further state ioctls (vCPU events, LAPIC, XSAVE, XCRs, debug
registers, SREGS2, the MSR filter) come from :mod:`pykvm.arch.x86.state`.

:class:`KvmArch`, :class:`VmArch` and :class:`VcpuArch` are mixed into :class:`pykvm.Kvm`,
:class:`pykvm.vm.Vm` and :class:`pykvm.vcpu.Vcpu` on x86 hosts; their methods are called on
those objects (``vcpu.get_sregs()``). Every method raises :class:`~pykvm.errors.KvmError`
naming the ioctl and the errno when KVM refuses it."""
from __future__ import annotations

import errno

from ... import abi
from ..._ioctl import ioctl
from ...abi import ffi, ioctls
from ...errors import KvmError, KvmTooBig, kvm_error
from .nested import get_nested_state, nested_report, set_nested_state
from .regs import REG_TYPE_MSR, CpuidEntry, cpuid_lookup, msr_reg_id  # noqa: F401 (public home)
from .snapshot import VcpuSnapshot, VmSnapshot
from .state import VcpuState, VmState

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Dict, Iterable, List, Optional, Tuple

def _grow(fd, op, ctype, count_field, array_field, first=64, limit=1 << 16):
    """Call a KVM 'fill this array' ioctl (a row of pykvm.abi.ioctls), growing the buffer on
    E2BIG."""
    n = first
    while n <= limit:
        obj = ffi.new(f"{ctype} *", {array_field: n})
        assert len(getattr(obj, array_field)) == n
        setattr(obj, count_field, n)
        try:
            ioctl(fd, op, obj)
            return obj
        except KvmTooBig:
            got = getattr(obj, count_field)
            n = got if got > n else n * 2
    raise RuntimeError(f"{op.name}: more than {limit} entries")


def _cpuid_entries(c) -> List[CpuidEntry]:
    return [CpuidEntry(e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx)
            for e in (c.entries[i] for i in range(c.nent))]


class KvmArch:
    """x86 methods of :class:`pykvm.Kvm` (the system fd)."""

    def supported_cpuid(self) -> List[CpuidEntry]:
        """KVM_GET_SUPPORTED_CPUID (api.rst "KVM_GET_SUPPORTED_CPUID"): the CPUID leaves KVM
        can give a guest, as :class:`~pykvm.arch.x86.regs.CpuidEntry` values."""
        c = _grow(self.fd, ioctls.KVM_GET_SUPPORTED_CPUID,
                  "struct kvm_cpuid2", "nent", "entries", first=128)
        return _cpuid_entries(c)

    def emulated_cpuid(self) -> List[CpuidEntry]:
        """KVM_GET_EMULATED_CPUID (api.rst "KVM_GET_EMULATED_CPUID", needs
        KVM_CAP_EXT_EMUL_CPUID): the CPUID features KVM emulates in software (e.g. MOVBE,
        RDPID), which the host CPU may lack; they are slow and not in
        :meth:`supported_cpuid`. Raises :class:`~pykvm.errors.KvmError` if KVM refuses."""
        c = _grow(self.fd, ioctls.KVM_GET_EMULATED_CPUID,
                  "struct kvm_cpuid2", "nent", "entries", first=64)
        return _cpuid_entries(c)

    def msr_index_list(self) -> List[int]:
        """KVM_GET_MSR_INDEX_LIST: MSRs KVM saves/restores (usable with GET/SET_MSRS, ONE_REG)."""
        m = _grow(self.fd, ioctls.KVM_GET_MSR_INDEX_LIST,
                  "struct kvm_msr_list", "nmsrs", "indices", first=256)
        return [m.indices[i] for i in range(m.nmsrs)]

    def arch_info(self) -> dict:
        """x86 facts for ``pykvm caps``: the nested-virtualization report."""
        return {"nested": nested_report(self).as_dict()}


class VmArch(VmState, VmSnapshot):
    """x86 methods of :class:`pykvm.vm.Vm`."""

    def _arch_init(self) -> None:
        pass

    def set_tss_addr(self, addr: int = 0xFFFBD000) -> None:
        """KVM_SET_TSS_ADDR (3 pages KVM uses on Intel for real-mode emulation)."""
        ioctl(self.fd, ioctls.KVM_SET_TSS_ADDR, addr, what=f"{addr:#x}")

    def set_identity_map_addr(self, addr: int = 0xFFFBC000) -> None:
        """KVM_SET_IDENTITY_MAP_ADDR: the guest-physical page KVM uses for the identity-mapped
        page table of real-mode emulation on Intel."""
        v = ffi.new("uint64_t *", addr)
        ioctl(self.fd, ioctls.KVM_SET_IDENTITY_MAP_ADDR, v,
              what=f"{addr:#x}")

    def create_pit2(self, *, speaker_dummy: bool = True) -> None:
        """KVM_CREATE_PIT2: the in-kernel i8254 (needs the irqchip)."""
        p = ffi.new("struct kvm_pit_config *")
        p.flags = abi.PIT_SPEAKER_DUMMY if speaker_dummy else 0
        ioctl(self.fd, ioctls.KVM_CREATE_PIT2, p)

    def reinject_control(self, pit_reinject: bool) -> None:
        """KVM_REINJECT_CONTROL: whether the in-kernel PIT re-injects ticks the guest missed
        (QEMU's ``kvm-pit.lost_tick_policy``: delay = re-inject, discard = do not)."""
        c = ffi.new("struct kvm_reinject_control *")
        c.pit_reinject = 1 if pit_reinject else 0
        ioctl(self.fd, ioctls.KVM_REINJECT_CONTROL, c,
              what=f"pit_reinject={c.pit_reinject}")

    def set_gsi_routing(self, routes) -> None:
        """KVM_SET_GSI_ROUTING from (gsi, irqchip, pin) triples (irqchip: 0 PIC master,
        1 PIC slave, 2 IOAPIC); replaces the whole table."""
        routes = list(routes)
        r = ffi.new("struct kvm_irq_routing *", {"entries": max(1, len(routes))})
        r.nr, r.flags = len(routes), 0
        for i, (gsi, chip, pin) in enumerate(routes):
            e = r.entries[i]
            e.gsi, e.type, e.flags = gsi, abi.IRQ_ROUTING_IRQCHIP, 0
            e.u.irqchip.irqchip, e.u.irqchip.pin = chip, pin
        ioctl(self.fd, ioctls.KVM_SET_GSI_ROUTING, r,
              what=f"{len(routes)} routes")


class VcpuArch(VcpuState, VcpuSnapshot):
    """x86 methods of :class:`pykvm.vcpu.Vcpu`."""

    def _arch_init(self) -> None:
        pass

    # -- register files -------------------------------------------------------------------
    def get_regs(self):
        """KVM_GET_REGS (api.rst "KVM_GET_REGS"): the general-purpose registers, RIP and
        RFLAGS as a fresh ``struct kvm_regs *`` (``rax`` ... ``r15``, ``rip``, ``rflags``)."""
        r = ffi.new("struct kvm_regs *")
        ioctl(self.fd, ioctls.KVM_GET_REGS, r)
        return r

    def set_regs(self, regs) -> None:
        """KVM_SET_REGS (api.rst "KVM_SET_REGS"): load ``regs`` (a ``struct kvm_regs *``)."""
        ioctl(self.fd, ioctls.KVM_SET_REGS, regs)

    def get_sregs(self):
        """KVM_GET_SREGS (api.rst "KVM_GET_SREGS"): segment, descriptor-table and control
        registers, EFER and the APIC base as a fresh ``struct kvm_sregs *`` (``cs`` ...
        ``ldt``, ``gdt``, ``idt``, ``cr0`` ... ``cr8``, ``efer``, ``apic_base``)."""
        s = ffi.new("struct kvm_sregs *")
        ioctl(self.fd, ioctls.KVM_GET_SREGS, s)
        return s

    def set_sregs(self, sregs) -> None:
        """KVM_SET_SREGS (api.rst "KVM_SET_SREGS"): load ``sregs`` (a
        ``struct kvm_sregs *``); EINVAL for an invalid CR0/CR4/EFER combination."""
        ioctl(self.fd, ioctls.KVM_SET_SREGS, sregs)

    def get_fpu(self):
        """KVM_GET_FPU (api.rst "KVM_GET_FPU"): x87 and SSE state as a fresh
        ``struct kvm_fpu *`` (``fpr``, ``fcw``, ``fsw``, ``xmm``, ``mxcsr`` ...)."""
        f = ffi.new("struct kvm_fpu *")
        ioctl(self.fd, ioctls.KVM_GET_FPU, f)
        return f

    def set_fpu(self, fpu) -> None:
        """KVM_SET_FPU (api.rst "KVM_SET_FPU"): load ``fpu`` (a ``struct kvm_fpu *``)."""
        ioctl(self.fd, ioctls.KVM_SET_FPU, fpu)

    def translate(self, gva: int) -> Optional[int]:
        """KVM_TRANSLATE: the guest-physical address for ``gva`` under the vCPU's paging."""
        t = ffi.new("struct kvm_translation *")
        t.linear_address = gva
        ioctl(self.fd, ioctls.KVM_TRANSLATE, t, what=f"{gva:#x}")
        return t.physical_address if t.valid else None

    # -- MSRs -----------------------------------------------------------------------------
    def get_msrs(self, indices: Iterable[int]) -> Dict[int, int]:
        """KVM_GET_MSRS. Raises if KVM returns fewer MSRs than asked (naming the first missing)."""
        idx = list(indices)
        m = ffi.new("struct kvm_msrs *", {"entries": len(idx) or 1})
        m.nmsrs = len(idx)
        for i, x in enumerate(idx):
            m.entries[i].index = x
        got = ioctl(self.fd, ioctls.KVM_GET_MSRS, m,
                    what=",".join(hex(i) for i in idx[:4]) + ("..." if len(idx) > 4 else ""))
        if got != len(idx):
            raise kvm_error("KVM_GET_MSRS", errno.EINVAL, f"{idx[got]:#x}",
                            f"MSR {idx[got]:#x} not readable ({got} of {len(idx)} read)")
        return {m.entries[i].index: m.entries[i].data for i in range(got)}

    def set_msrs(self, values: Dict[int, int]) -> None:
        """KVM_SET_MSRS; raises naming the first MSR KVM refused."""
        items = list(values.items())
        m = ffi.new("struct kvm_msrs *", {"entries": len(items) or 1})
        m.nmsrs = len(items)
        for i, (k, v) in enumerate(items):
            m.entries[i].index, m.entries[i].data = k, v
        got = ioctl(self.fd, ioctls.KVM_SET_MSRS, m)
        if got != len(items):
            raise kvm_error("KVM_SET_MSRS", errno.EINVAL, f"{items[got][0]:#x}",
                            f"MSR {items[got][0]:#x} refused value {items[got][1]:#x}")

    def get_msr(self, index: int) -> int:
        """One MSR through KVM_GET_MSRS: its value (int); KvmError if KVM cannot read it."""
        return self.get_msrs([index])[index]

    def set_msr(self, index: int, value: int) -> None:
        """One MSR through KVM_SET_MSRS; KvmError naming the MSR if KVM refuses the value."""
        self.set_msrs({index: value})

    def get_msr_one_reg(self, index: int) -> int:
        """Read MSR ``index`` through KVM_GET_ONE_REG (Linux 6.18+)."""
        return self.get_one_reg(msr_reg_id(index))

    def set_msr_one_reg(self, index: int, value: int) -> None:
        """Write MSR ``index`` through KVM_SET_ONE_REG (Linux 6.18+)."""
        self.set_one_reg(msr_reg_id(index), value)

    # -- CPUID ----------------------------------------------------------------------------
    def set_cpuid(self, entries: Iterable[Tuple]) -> None:
        """KVM_SET_CPUID2 (api.rst "KVM_SET_CPUID2") from (function, index, flags, eax, ebx,
        ecx, edx) tuples or :class:`~pykvm.arch.x86.regs.CpuidEntry` values (see
        :func:`~pykvm.arch.x86.regs.cpuid_set` and
        :func:`~pykvm.arch.x86.regs.cpuid_with_feature` to change one leaf or feature)."""
        es = list(entries)
        c = ffi.new("struct kvm_cpuid2 *", {"entries": len(es) or 1})
        c.nent = len(es)
        for i, e in enumerate(es):
            d = c.entries[i]
            d.function, d.index, d.flags, d.eax, d.ebx, d.ecx, d.edx = e
        ioctl(self.fd, ioctls.KVM_SET_CPUID2, c, what=f"{len(es)} entries")

    def get_cpuid(self) -> List[CpuidEntry]:
        """KVM_GET_CPUID2: what this vCPU was given."""
        c = _grow(self.fd, ioctls.KVM_GET_CPUID2, "struct kvm_cpuid2", "nent",
                  "entries", first=128)
        return _cpuid_entries(c)

    def tsc_khz(self) -> int:
        """KVM_GET_TSC_KHZ: the guest's TSC frequency in kHz."""
        return ioctl(self.fd, ioctls.KVM_GET_TSC_KHZ)

    def nmi(self) -> None:
        """KVM_NMI (api.rst "KVM_NMI", needs KVM_CAP_USER_NMI): queue an NMI for the vCPU."""
        ioctl(self.fd, ioctls.KVM_NMI)

    def interrupt(self, vector: int) -> None:
        """KVM_INTERRUPT (only without an in-kernel irqchip)."""
        i = ffi.new("struct kvm_interrupt *")
        i.irq = vector
        ioctl(self.fd, ioctls.KVM_INTERRUPT, i, what=str(vector))

    def notify_paused(self) -> bool:
        """KVM_KVMCLOCK_CTRL (api.rst "KVM_KVMCLOCK_CTRL"): tell the guest that the host held
        this vCPU, as QEMU does for each vCPU when a VM stops. At the vCPU's next entry KVM sets
        PVCLOCK_GUEST_STOPPED (bit 1 of ``flags``) in the guest's kvmclock area; Linux's
        soft-lockup and RCU-stall detectors read and clear it (kvm_check_and_clear_guest_paused)
        and so do not report the held time as a lockup. Call it while the vCPU is out of
        KVM_RUN (:meth:`pykvm.machine.Machine.pause` does, in the vCPU's own thread).

        Returns True when the notice is set; False when the guest has not enabled kvmclock
        (EINVAL: nothing to tell) or KVM lacks KVM_CAP_KVMCLOCK_CTRL. Raises
        :class:`~pykvm.errors.KvmError` for any other refusal, :class:`~pykvm.errors.Busy`
        when the vCPU is in KVM_RUN in another thread, :class:`~pykvm.errors.Closed` after the
        vCPU was closed."""
        try:
            ioctl(self.fd, ioctls.KVM_KVMCLOCK_CTRL)
        except KvmError as e:
            if e.errno in (errno.EINVAL, errno.ENOTTY):
                return False
            raise
        return True

    def save_guest_time(self) -> Optional[int]:
        """The guest time to put back when a pause ends: None on x86, whose guests learn of a
        pause from :meth:`notify_paused` instead (their kvmclock runs on, as the TSC does)."""
        return None

    def restore_guest_time(self, saved: int) -> None:
        """Nothing on x86 (see :meth:`save_guest_time`)."""

    # -- nested ---------------------------------------------------------------------------
    def nested_state(self):
        """KVM_GET_NESTED_STATE → :class:`pykvm.arch.x86.nested.NestedState`."""
        return get_nested_state(self)

    def set_nested_state(self, state) -> None:
        """KVM_SET_NESTED_STATE from a :class:`pykvm.arch.x86.nested.NestedState`."""
        set_nested_state(self, state)


def describe_registers(vcpu):
    """(name, ONE_REG id or None, size, value) rows for ``pykvm regs``: the GPRs and control
    registers, then every MSR in KVM's index list read through ONE_REG."""
    rows = []
    r = vcpu.get_regs()
    for n in ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp", "r8", "r9", "r10", "r11",
              "r12", "r13", "r14", "r15", "rip", "rflags"):
        rows.append((n, None, 8, getattr(r, n)))
    s = vcpu.get_sregs()
    for n in ("cr0", "cr2", "cr3", "cr4", "cr8", "efer", "apic_base"):
        rows.append((n, None, 8, getattr(s, n)))
    for idx in vcpu.vm.kvm.msr_index_list():
        try:
            v = vcpu.get_msr_one_reg(idx)
        except KvmError as e:
            v = e.errno_name
        rows.append((f"msr {idx:#x}", msr_reg_id(idx), 8, v))
    return rows
