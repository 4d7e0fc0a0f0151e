"""RISC-V parts of Kvm / Vm / Vcpu (the arch ioctl helpers below the vCPU layer). RISC-V has no
GET_REGS: every register goes through ONE_REG (api.rst 4.68 KVM_SET_ONE_REG, 4.69
KVM_GET_ONE_REG; the RISC-V ids are listed under 4.68), named as in
:mod:`pykvm.arch.riscv.regs`.

:class:`VcpuArch` and :class:`VmArch` are mixed into :class:`pykvm.vcpu.Vcpu` and
:class:`pykvm.vm.Vm` on RISC-V hosts, the typed counterparts of the kernel selftests'
``kvm_util`` RISC-V helpers (``vcpu_get_reg(RISCV_CORE_REG(...))``, ``__vcpu_has_isa_ext``,
``__vcpu_has_sbi_ext``, ...). Every method raises :class:`~pykvm.errors.KvmError` naming the
ioctl, the register and the errno when KVM refuses (ENOENT: the register or extension does not
exist on this vCPU; EBUSY: it can only change before the vCPU first runs), and KeyError for a
register name :mod:`~pykvm.arch.riscv.regs` does not know."""
from __future__ import annotations

from ..._ioctl import ioctl
from ...abi import ffi, ioctls, riscv64 as _uapi
from ...errors import KvmError
from . import regs as _regs
from .aia import Aia, available as _aia_available
from .cpu import (isa_extensions as _isa_extensions, named_reg_list, sbi_extensions as
                  _sbi_extensions, set_isa_extension, set_sbi_extension)
from .extensions import ISA_EXT_IDS, SBI_EXT_IDS
from .report import riscv_report
from .snapshot import VcpuSnapshot, VmSnapshot

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Dict, List, Mapping, Optional, Union

    from .regs import RiscvReg

# The core registers by their short name ("pc", "ra", ... "t6", "mode"), in ONE_REG index order.
CORE_NAMES = tuple(n[len("regs."):] if n.startswith("regs.") else n for n in _regs.CORE_REGS)
# csr.sip bit 9 (SEIP): what KVM shows of the VS-level external interrupt KVM_INTERRUPT raises
SIP_SEIP = 1 << 9


def core_reg_id(name: str) -> int:
    """The ONE_REG id (int) of core register ``name``: ``"pc"``, ``"ra"`` ... ``"t6"`` (struct
    user_regs_struct) or ``"mode"`` (the privilege mode the vCPU runs in: 1 S, 0 U). Raises
    KeyError for another name."""
    if name not in CORE_NAMES:
        raise KeyError(f"unknown RISC-V core register {name!r} (one of {', '.join(CORE_NAMES)})")
    return _regs.make_id(_regs.TYPE_CORE, CORE_NAMES.index(name))


def typed_reg_id(kind: str, name: str) -> int:
    """The ONE_REG id (int) of register ``name`` of type ``kind`` ("csr", "timer", "config",
    "sbi_state", "core"), e.g. ``("csr", "sscratch")``, ``("csr", "aia.siselect")``,
    ``("sbi_state", "sta.shmem_lo")``. Raises KeyError for a name of another type or none."""
    if kind not in ("csr", "timer", "config", "sbi_state", "core"):
        raise KeyError(f"unknown RISC-V register type {kind!r}")
    return _regs.reg_id(f"{kind}.{name}")


def interrupt_irq(raised: bool) -> int:
    """``struct kvm_interrupt.irq`` for KVM_INTERRUPT on RISC-V: KVM_INTERRUPT_SET (-1U) to
    raise the vCPU's VS-level external interrupt, KVM_INTERRUPT_UNSET (-2U) to lower it."""
    return _uapi.KVM_INTERRUPT_SET if raised else _uapi.KVM_INTERRUPT_UNSET


class KvmArch:
    """RISC-V methods of :class:`pykvm.Kvm`."""

    def arch_info(self) -> dict:
        """The RISC-V section of ``pykvm caps --json`` (:func:`riscv_report`)."""
        return {"riscv": riscv_report(self)}


class VmArch(VmSnapshot):
    """RISC-V methods of :class:`pykvm.vm.Vm`."""

    if TYPE_CHECKING:
        @property
        def fd(self) -> int: ...

    def _arch_init(self) -> None:
        pass

    def has_aia(self) -> bool:
        """Whether this KVM can create the in-kernel AIA irqchip (KVM_CREATE_DEVICE of
        KVM_DEV_TYPE_RISCV_AIA with KVM_CREATE_DEVICE_TEST, api.rst 4.79: nothing is made)."""
        return _aia_available(self.fd)

    def create_aia(self, harts: int, **kwargs: Any) -> Aia:
        """Create and configure the in-kernel AIA irqchip (APLIC + one IMSIC per hart) for
        ``harts`` vCPUs: a :class:`pykvm.arch.riscv.aia.Aia` (keyword arguments as there:
        ``sources``, ``ids``, ``mode``, ``aplic_base``, ``imsic_base``). Call its
        ``set_imsic(vcpu_id)`` for each vCPU and ``init()`` once they exist. Raises
        :class:`~pykvm.arch.riscv.aia.AiaUnavailable` when the host has none."""
        return Aia(self.fd, harts, **kwargs)


class VcpuArch(VcpuSnapshot):
    """RISC-V methods of :class:`pykvm.vcpu.Vcpu`: ONE_REG by register name, the core, CSR,
    timer, config and SBI-state register files, ISA and SBI extensions, and KVM_INTERRUPT."""

    if TYPE_CHECKING:
        @property
        def fd(self) -> int: ...

        def get_one_reg(self, reg_id: int) -> int: ...

        def set_one_reg(self, reg_id: int, value: Union[int, bytes]) -> None: ...

        def reg_list(self) -> List[int]: ...

    def _arch_init(self) -> None:
        pass

    def notify_paused(self) -> bool:
        """What x86's KVM_KVMCLOCK_CTRL does when the host holds a vCPU; RISC-V KVM has no such
        notice (the SBI STA extension reports steal time, not a stop), so this returns False
        and does nothing: a held RISC-V guest's time stands still instead
        (:meth:`save_guest_time`). :meth:`pykvm.machine.Machine.pause` calls it on every arch.
        """
        return False

    def save_guest_time(self) -> Optional[int]:
        """The guest's time now (the ``timer.time`` register, in timebase ticks), read while
        every vCPU of the VM is held, for :meth:`restore_guest_time` when the hold ends: what
        QEMU's kvm_riscv_vm_state_change does on a stop. KVM keeps one time offset per VM, so
        one vCPU's register stands for all."""
        return self.get_reg("timer.time")

    def restore_guest_time(self, saved: int) -> None:
        """KVM_SET_ONE_REG of ``timer.time`` to ``saved`` (ticks): KVM sets the VM's time offset
        so that the guest's time goes on from there and the hold is not seen. Call it before
        any vCPU of the VM re-enters KVM_RUN."""
        self.set_reg("timer.time", saved)

    # -- any register by name ---------------------------------------------------------------
    def get_reg(self, name: str, *, vlenb: Optional[int] = None) -> int:
        """KVM_GET_ONE_REG of the register named ``name`` (:func:`pykvm.arch.riscv.regs.reg_id`:
        ``"core.regs.a0"``, ``"a0"``, ``"csr.sstatus"``, ``"isa_ext.zbb"``, ``"vector.v3"`` with
        ``vlenb``...): its value as an unsigned int of the register's size."""
        return self.get_one_reg(_regs.reg_id(name, vlenb=vlenb))

    def set_reg(self, name: str, value: Union[int, bytes], *,
                vlenb: Optional[int] = None) -> None:
        """KVM_SET_ONE_REG of the register named ``name`` (as :meth:`get_reg`); ``value`` an
        unsigned int that fits the register, or bytes of exactly its size."""
        self.set_one_reg(_regs.reg_id(name, vlenb=vlenb), value)

    def named_reg_list(self) -> List[RiscvReg]:
        """KVM_GET_REG_LIST (api.rst 4.84) with every id named and sized
        (:class:`pykvm.arch.riscv.regs.RiscvReg`), in KVM's order."""
        return named_reg_list(self)

    # -- register files ---------------------------------------------------------------------
    def get_core_regs(self) -> Dict[str, int]:
        """The core registers ``{"pc": ..., "ra": ..., ... "t6": ..., "mode": ...}`` (ints; the
        ``unsigned long`` fields of struct kvm_riscv_core, one KVM_GET_ONE_REG each). ``mode``
        is 1 for S-mode, 0 for U-mode."""
        return {n: self.get_one_reg(core_reg_id(n)) for n in CORE_NAMES}

    def set_core_regs(self, values: Mapping[str, int]) -> None:
        """Set the core registers named in ``values`` (``{"pc": 0x80200000, "a0": 0}``; names as
        :meth:`get_core_regs`), one KVM_SET_ONE_REG each, in the mapping's order. Every name
        is checked (KeyError) before any register is written."""
        ids = [(core_reg_id(n), v) for n, v in values.items()]
        for rid, v in ids:
            self.set_one_reg(rid, v)

    def get_csr(self, name: str) -> int:
        """A guest supervisor CSR by name: ``"sstatus"``, ``"sie"``, ``"stvec"``, ``"sscratch"``,
        ``"sepc"``, ``"scause"``, ``"stval"``, ``"sip"``, ``"satp"``, ``"scounteren"``,
        ``"senvcfg"``; the AIA ones as ``"aia.siselect"``...; ``"smstateen.sstateen0"``
        (KVM_REG_RISCV_CSR). ``sip`` shows the interrupts pending for the guest (SEIP, bit 9,
        follows KVM_INTERRUPT)."""
        return self.get_one_reg(typed_reg_id("csr", name))

    def set_csr(self, name: str, value: int) -> None:
        """Set a guest supervisor CSR by name (as :meth:`get_csr`)."""
        self.set_one_reg(typed_reg_id("csr", name), value)

    def get_timer(self, name: str) -> int:
        """A timer register (KVM_REG_RISCV_TIMER, u64): ``"frequency"`` (Hz, read-only),
        ``"time"`` (the guest's time CSR, ticks), ``"compare"`` (the next timer event, ticks),
        ``"state"`` (1 while the compare is armed)."""
        return self.get_one_reg(typed_reg_id("timer", name))

    def set_timer(self, name: str, value: int) -> None:
        """Set a timer register by name (as :meth:`get_timer`; ``frequency`` refuses:
        EINVAL)."""
        self.set_one_reg(typed_reg_id("timer", name), value)

    def get_config(self, name: str) -> int:
        """A configuration register (KVM_REG_RISCV_CONFIG): ``"isa"`` (the single-letter
        extensions, bit ``ord(c) - ord('a')``), ``"zicbom_block_size"``,
        ``"zicboz_block_size"``, ``"zicbop_block_size"`` (bytes), ``"mvendorid"``,
        ``"marchid"``, ``"mimpid"``, ``"satp_mode"``."""
        return self.get_one_reg(typed_reg_id("config", name))

    def set_config(self, name: str, value: int) -> None:
        """Set a configuration register (as :meth:`get_config`; only before the first run:
        EBUSY after)."""
        self.set_one_reg(typed_reg_id("config", name), value)

    def get_sbi_state(self, name: str) -> int:
        """A register of an SBI extension's state (KVM_REG_RISCV_SBI_STATE):
        ``"sta.shmem_lo"``/``"sta.shmem_hi"`` (the steal-time shared memory's guest-physical
        address; all ones when unset), ``"fwft.<feature>.<enable|flags|value>"``."""
        return self.get_one_reg(typed_reg_id("sbi_state", name))

    def set_sbi_state(self, name: str, value: int) -> None:
        """Set an SBI-state register by name (as :meth:`get_sbi_state`). On rv64 write
        ``sta.shmem_hi`` (which must be 0) before ``sta.shmem_lo``: KVMs of Linux 7.x reset
        the address to "none" when shmem_hi is written."""
        self.set_one_reg(typed_reg_id("sbi_state", name), value)

    # -- extensions --------------------------------------------------------------------------
    def isa_extensions(self) -> Dict[str, Optional[bool]]:
        """Every ISA extension KVM numbers: True (on), False (off, may be turned on), None
        (absent) (:func:`pykvm.arch.riscv.cpu.isa_extensions`)."""
        return _isa_extensions(self)

    def has_isa_ext(self, name: str) -> bool:
        """Whether ISA extension ``name`` (``"zbb"``, ``"sstc"``...) is on for this vCPU (the
        selftests' ``__vcpu_has_isa_ext``): its KVM_REG_RISCV_ISA_EXT register reads 1; False
        also when KVM does not know it (ENOENT). KeyError for a name pykvm does not know."""
        return self._ext_on(_regs.TYPE_ISA_EXT, ISA_EXT_IDS, name)

    def set_isa_ext(self, name: str, enabled: bool) -> None:
        """Turn ISA extension ``name`` on or off before the first run
        (:func:`pykvm.arch.riscv.cpu.set_isa_extension`, whose typed errors it raises)."""
        set_isa_extension(self, name, enabled)

    def sbi_extensions(self) -> Dict[str, Optional[bool]]:
        """KVM's SBI extensions, as :meth:`isa_extensions`."""
        return _sbi_extensions(self)

    def has_sbi_ext(self, name: str) -> bool:
        """Whether KVM's SBI extension ``name`` (``"time"``, ``"ipi"``, ``"hsm"``, ``"srst"``,
        ``"sta"``, ``"dbcn"``...; SBI base is always on and has no register) is on for this vCPU (``__vcpu_has_sbi_ext``), as :meth:`has_isa_ext`."""
        return self._ext_on(_regs.TYPE_SBI_EXT, SBI_EXT_IDS, name)

    def set_sbi_ext(self, name: str, enabled: bool) -> None:
        """Turn KVM's SBI extension ``name`` on or off before the first run
        (:func:`pykvm.arch.riscv.cpu.set_sbi_extension`)."""
        set_sbi_extension(self, name, enabled)

    def _ext_on(self, rtype: int, ids: Mapping[str, int], name: str) -> bool:
        idx = ids.get(name.lower())
        if idx is None:
            raise KeyError(f"unknown RISC-V extension {name!r}")
        try:
            return bool(self.get_one_reg(_regs.make_id(rtype, idx, subtype=_regs.EXT_SINGLE)))
        except KvmError as e:
            if e.errno_name == "ENOENT":
                return False
            raise

    # -- interrupts --------------------------------------------------------------------------
    def set_external_interrupt(self, raised: bool) -> None:
        """KVM_INTERRUPT (api.rst 4.16, RISC-V): raise (``True``: KVM_INTERRUPT_SET) or lower
        (KVM_INTERRUPT_UNSET) the vCPU's VS-level external interrupt, for a VMM that models
        the interrupt controller itself (no in-kernel AIA). The guest sees it pending as
        sip.SEIP (:meth:`get_csr` ``("sip")``, bit 9) and takes it when sie.SEIE and
        sstatus.SIE allow."""
        i = ffi.new("struct kvm_interrupt *")
        i.irq = interrupt_irq(raised)
        ioctl(self.fd, ioctls.KVM_INTERRUPT, i, what="set" if raised else "unset")


def describe_registers(vcpu):
    """(name, ONE_REG id, size, value) for every register KVM_GET_REG_LIST reports."""
    rows = []
    for reg in named_reg_list(vcpu):
        try:
            v = vcpu.get_one_reg(reg.id)
        except KvmError as e:
            v = e.errno_name
        rows.append((reg.name, reg.id, reg.size, v))
    return rows
