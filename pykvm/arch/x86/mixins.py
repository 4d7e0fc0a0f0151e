"""x86 parts of Kvm / Vm / Vcpu (the arch ioctl helpers below the vCPU layer): supported CPUID, MSR lists, regs/sregs/fpu, MSRs (KVM_GET_MSRS
and ONE_REG), CPUID, TSS/identity map, PIT, nested state."""
from __future__ import annotations

import errno

from ... import abi
from ..._ioctl import ioctl
from ...abi import ffi, ioctls
from ...errors import KvmError, KvmTooBig, kvm_error
from .nested import get_nested_state, nested_report, set_nested_state
from .regs import REG_TYPE_MSR, CpuidEntry, cpuid_lookup, msr_reg_id  # noqa: F401 (public home)

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
    def supported_cpuid(self) -> List[CpuidEntry]:
        """KVM_GET_SUPPORTED_CPUID."""
        c = _grow(self.fd, ioctls.KVM_GET_SUPPORTED_CPUID,
                  "struct kvm_cpuid2", "nent", "entries", first=128)
        return _cpuid_entries(c)

    def msr_index_list(self) -> List[int]:
        """KVM_GET_MSR_INDEX_LIST: MSRs KVM saves/restores (usable with GET/SET_MSRS, ONE_REG)."""
        m = _grow(self.fd, ioctls.KVM_GET_MSR_INDEX_LIST,
                  "struct kvm_msr_list", "nmsrs", "indices", first=256)
        return [m.indices[i] for i in range(m.nmsrs)]

    def arch_info(self) -> dict:
        return {"nested": nested_report(self).as_dict()}


class VmArch:
    def _arch_init(self) -> None:
        pass

    def set_tss_addr(self, addr: int = 0xFFFBD000) -> None:
        """KVM_SET_TSS_ADDR (3 pages KVM uses on Intel for real-mode emulation)."""
        ioctl(self.fd, ioctls.KVM_SET_TSS_ADDR, addr, what=f"{addr:#x}")

    def set_identity_map_addr(self, addr: int = 0xFFFBC000) -> None:
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


class VcpuArch:
    def _arch_init(self) -> None:
        pass

    # -- register files -------------------------------------------------------------------
    def get_regs(self):
        r = ffi.new("struct kvm_regs *")
        ioctl(self.fd, ioctls.KVM_GET_REGS, r)
        return r

    def set_regs(self, regs) -> None:
        ioctl(self.fd, ioctls.KVM_SET_REGS, regs)

    def get_sregs(self):
        s = ffi.new("struct kvm_sregs *")
        ioctl(self.fd, ioctls.KVM_GET_SREGS, s)
        return s

    def set_sregs(self, sregs) -> None:
        ioctl(self.fd, ioctls.KVM_SET_SREGS, sregs)

    def get_fpu(self):
        f = ffi.new("struct kvm_fpu *")
        ioctl(self.fd, ioctls.KVM_GET_FPU, f)
        return f

    def set_fpu(self, fpu) -> None:
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
        return self.get_msrs([index])[index]

    def set_msr(self, index: int, value: int) -> None:
        self.set_msrs({index: value})

    def get_msr_one_reg(self, index: int) -> int:
        """Read MSR ``index`` through KVM_GET_ONE_REG (Linux 6.18+)."""
        return self.get_one_reg(msr_reg_id(index))

    def set_msr_one_reg(self, index: int, value: int) -> None:
        self.set_one_reg(msr_reg_id(index), value)

    # -- CPUID ----------------------------------------------------------------------------
    def set_cpuid(self, entries: Iterable[Tuple]) -> None:
        """KVM_SET_CPUID2 from (function, index, flags, eax, ebx, ecx, edx) tuples."""
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
        ioctl(self.fd, ioctls.KVM_NMI)

    def interrupt(self, vector: int) -> None:
        """KVM_INTERRUPT (only without an in-kernel irqchip)."""
        i = ffi.new("struct kvm_interrupt *")
        i.irq = vector
        ioctl(self.fd, ioctls.KVM_INTERRUPT, i, what=str(vector))

    # -- nested ---------------------------------------------------------------------------
    def nested_state(self):
        """KVM_GET_NESTED_STATE → :class:`pykvm.arch.x86.nested.NestedState`."""
        return get_nested_state(self)

    def set_nested_state(self, state) -> None:
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
