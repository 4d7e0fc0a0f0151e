"""RISC-V (RV64) for the GDB stub: gdb's ``riscv:rv64`` target description over KVM's ONE_REG
registers, a software walk of the guest's page tables, ``ebreak``/``c.ebreak`` breakpoints and
a single step emulated with a temporary breakpoint.

Facts used:

* Registers: gdb's features ``org.gnu.gdb.riscv.cpu`` (x0..x31 by their ABI names, then
  ``pc``), ``org.gnu.gdb.riscv.fpu`` (f0..f31 as ``ft0``.. ``ft11``, ``fflags``, ``frm``,
  ``fcsr``), ``org.gnu.gdb.riscv.csr`` and ``org.gnu.gdb.riscv.virtual`` (``priv``) (GDB manual,
  "RISC-V Features"). Each is a KVM ONE_REG (Linux ``arch/riscv/include/uapi/asm/kvm.h``:
  ``core.regs.*``, ``core.mode``, ``fp_d.f0``.. ``fp_d.fcsr``, ``csr.*``; for a guest these are
  its VS-level CSRs: ``csr.satp`` is its vsatp). The FPU feature is offered only where the
  vCPU's ``config.isa`` has D.
* Memory: RISC-V KVM has no KVM_TRANSLATE; a GVA goes through
  :func:`pykvm.arch.riscv.pagewalk.translate` from the guest's satp (Bare, Sv39/48/57).
* Breakpoints: gdb sends ``Z0`` with kind 2 (``c.ebreak`` 0x9002) or 4 (``ebreak``
  0x00100073) (GDB manual, "RISC-V" in "Architecture-Specific Protocol Details" / gdb's
  riscv_breakpoint_kind_from_pc). With KVM_GUESTDBG_ENABLE, KVM clears the breakpoint bit of
  hedeleg, so a guest ``ebreak`` exits to userspace as KVM_EXIT_DEBUG with pc at the
  ``ebreak`` (Linux ``arch/riscv/kvm/vcpu.c`` kvm_arch_vcpu_ioctl_set_guest_debug,
  ``vcpu_exit.c`` EXC_BREAKPOINT); with guest debug off the guest takes its own breakpoint
  exception, as without a debugger.
* Single step: KVM has none on RISC-V (KVM_GUESTDBG_SINGLESTEP is accepted and ignored).
  :meth:`RiscvTarget.prepare_resume` decodes the instruction at pc
  (:func:`pykvm.arch.riscv.step.next_pc`, a conditional branch evaluated from the registers),
  plants one temporary breakpoint of the same length as the instruction it covers at the next
  pc, and :meth:`RiscvTarget.stopped` puts the original bytes back.

A guest's own ``ebreak`` while gdb has breakpoints planted (guest debug on) exits to the stub
like a planted one: it is given to the guest as the breakpoint exception it would have taken
(scause 3, sepc/stval = pc, sstatus.SPP/SPIE/SIE updated, pc = stvec; privileged ISA,
"Supervisor Trap Handling"), and gdb is not told.
"""
from __future__ import annotations

from .. import abi
from ..abi import ffi
from ..arch.riscv import pagewalk, step as rvstep
from ..errors import KvmError
from .arch import GdbTarget, GuestAccess, Stop, TargetError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Dict, List, Optional, Sequence, Tuple

# x0..x31 in gdb's org.gnu.gdb.riscv.cpu names; ONE_REG core.regs.<name> for x1..x31
_XNAMES = ("zero", "ra", "sp", "gp", "tp", "t0", "t1", "t2", "fp", "s1",
           "a0", "a1", "a2", "a3", "a4", "a5", "a6", "a7",
           "s2", "s3", "s4", "s5", "s6", "s7", "s8", "s9", "s10", "s11",
           "t3", "t4", "t5", "t6")
# the same registers as struct user_regs_struct (ONE_REG core.regs.<name>) names them
_ONE_X = ("zero", "ra", "sp", "gp", "tp", "t0", "t1", "t2", "s0", "s1",
          "a0", "a1", "a2", "a3", "a4", "a5", "a6", "a7",
          "s2", "s3", "s4", "s5", "s6", "s7", "s8", "s9", "s10", "s11",
          "t3", "t4", "t5", "t6")
_XTYPES = {"ra": "code_ptr", "sp": "data_ptr", "gp": "data_ptr", "tp": "data_ptr"}
# gdb's ABI names of f0..f31
_FNAMES = ("ft0", "ft1", "ft2", "ft3", "ft4", "ft5", "ft6", "ft7", "fs0", "fs1",
           "fa0", "fa1", "fa2", "fa3", "fa4", "fa5", "fa6", "fa7",
           "fs2", "fs3", "fs4", "fs5", "fs6", "fs7", "fs8", "fs9", "fs10", "fs11",
           "ft8", "ft9", "ft10", "ft11")
_CSRS = ("sstatus", "sie", "stvec", "scounteren", "sscratch", "sepc", "scause", "stval", "sip",
         "satp")
_ISA_D = 1 << 3                       # config.isa: one bit per single-letter extension
_SSTATUS_SIE, _SSTATUS_SPIE, _SSTATUS_SPP = 1 << 1, 1 << 5, 1 << 8
_CAUSE_BREAKPOINT = 3
_MODE_S = 1                           # KVM_RISCV_MODE_S (core.mode); gdb's priv: 0 U, 1 S

# one register of the layout: (gdb name, size in bytes, xml type, feature, source)
#   source: "zero", a ONE_REG name, or ("fcsr", lo, width) for a field of fp_d.fcsr
_Reg = tuple


def _layout(fpu: bool) -> List[_Reg]:
    regs: List[_Reg] = [("zero", 8, "int", "cpu", "zero")]
    regs += [(n, 8, _XTYPES.get(n, "int"), "cpu", f"core.regs.{one}")
             for n, one in zip(_XNAMES[1:], _ONE_X[1:])]
    regs.append(("pc", 8, "code_ptr", "cpu", "core.regs.pc"))
    if fpu:
        regs += [(n, 8, "ieee_double", "fpu", f"fp_d.f{i}") for i, n in enumerate(_FNAMES)]
        regs += [("fflags", 4, "int", "fpu", ("fcsr", 0, 5)),
                 ("frm", 4, "int", "fpu", ("fcsr", 5, 3)),
                 ("fcsr", 4, "int", "fpu", ("fcsr", 0, 32))]
    regs += [(n, 8, "int", "csr", f"csr.{n}") for n in _CSRS]
    regs.append(("priv", 8, "int", "virtual", "core.mode"))
    return regs


_FEATURES = {"cpu": "org.gnu.gdb.riscv.cpu", "fpu": "org.gnu.gdb.riscv.fpu",
             "csr": "org.gnu.gdb.riscv.csr", "virtual": "org.gnu.gdb.riscv.virtual"}
_GROUPS = {"fpu": ' group="float"', "csr": ' group="system"', "virtual": ' group="system"'}


def _xml(layout: List[_Reg]) -> str:
    out = ['<?xml version="1.0"?>\n<!DOCTYPE target SYSTEM "gdb-target.dtd">\n<target>\n',
           "<architecture>riscv:rv64</architecture>\n"]
    current = None
    for regnum, (name, size, xtype, feat, _src) in enumerate(layout):
        if feat != current:
            if current is not None:
                out.append("</feature>\n")
            out.append(f'<feature name="{_FEATURES[feat]}">\n')
            current = feat
        out.append(f'  <reg name="{name}" bitsize="{size * 8}" type="{xtype}" '
                   f'regnum="{regnum}"{_GROUPS.get(feat, "")}/>\n')
    out.append("</feature>\n</target>\n")
    return "".join(out)


class RiscvTarget(GdbTarget):
    """RV64 guests (S-mode and U-mode code, Bare or Sv39/48/57 paging) for
    :mod:`pykvm.gdbstub`; see the module docstring."""

    arch_name = "riscv:rv64"
    stop_exits = ("DEBUG",)

    def __init__(self, machine: Any):
        super().__init__(machine)
        self._fpu: Optional[bool] = None
        # per vCPU id: the temporary step breakpoint (gva, original bytes) planted for it
        self._steps: Dict[int, Tuple[int, bytes]] = {}

    # -- description and registers --------------------------------------------------------
    def _has_fpu(self, vcpu: Any) -> bool:
        if self._fpu is None:
            try:
                self._fpu = bool(vcpu.get_reg("config.isa") & _ISA_D)
            except KvmError:
                self._fpu = False
        return self._fpu

    def _regs(self, vcpu: Any) -> List[_Reg]:
        return _layout(self._has_fpu(vcpu))

    def documents(self, vcpu: Any) -> Dict[str, str]:
        return {"target.xml": _xml(self._regs(vcpu))}

    @staticmethod
    def _get(vcpu: Any, reg: _Reg) -> bytes:
        _name, size, _t, _f, src = reg
        if src == "zero":
            v = 0
        elif isinstance(src, tuple):
            _fcsr, lo, width = src
            v = (vcpu.get_reg("fp_d.fcsr") >> lo) & ((1 << width) - 1)
        else:
            v = vcpu.get_reg(src)
        return (v & ((1 << (8 * size)) - 1)).to_bytes(size, "little")

    @staticmethod
    def _put(vcpu: Any, reg: _Reg, raw: bytes) -> None:
        name, _size, _t, _f, src = reg
        v = int.from_bytes(raw, "little")
        if src == "zero":
            return                                    # x0 is hard-wired; a write is dropped
        if src == "core.mode":
            if v not in (0, 1):
                raise TargetError(f"priv {v}: a guest runs in U (0) or S (1) mode", 22)
            # the mode a guest's sret/trap would change: settable, KVM checks it
        try:
            if isinstance(src, tuple):
                _fcsr, lo, width = src
                mask = ((1 << width) - 1) << lo
                old = vcpu.get_reg("fp_d.fcsr")
                vcpu.set_reg("fp_d.fcsr", (old & ~mask & 0xFFFFFFFF) | ((v << lo) & mask))
            else:
                vcpu.set_reg(src, v)
        except KvmError as e:
            raise TargetError(f"KVM refused {name} = {v:#x}: {e}", 22) from e

    def read_registers(self, vcpu: Any) -> bytes:
        return b"".join(self._get(vcpu, r) for r in self._regs(vcpu))

    def write_registers(self, vcpu: Any, data: bytes) -> None:
        layout = self._regs(vcpu)
        want = sum(r[1] for r in layout)
        if len(data) != want:
            raise TargetError(f"G blob of {len(data)} bytes, the description has {want}", 22)
        off = 0
        for r in layout:
            raw = data[off:off + r[1]]
            off += r[1]
            if raw != self._get(vcpu, r):             # write what changed only
                self._put(vcpu, r, raw)

    def _reg(self, vcpu: Any, regno: int) -> _Reg:
        layout = self._regs(vcpu)
        if not 0 <= regno < len(layout):
            raise TargetError(f"no register {regno}", 22)
        return layout[regno]

    def read_register(self, vcpu: Any, regno: int) -> bytes:
        return self._get(vcpu, self._reg(vcpu, regno))

    def write_register(self, vcpu: Any, regno: int, data: bytes) -> None:
        reg = self._reg(vcpu, regno)
        if len(data) != reg[1]:
            raise TargetError(f"register {reg[0]} takes {reg[1]} bytes, got {len(data)}", 22)
        self._put(vcpu, reg, data)

    def pc(self, vcpu: Any) -> int:
        return int(vcpu.get_reg("core.regs.pc"))

    # -- memory ---------------------------------------------------------------------------
    def translate(self, vcpu: Any, gva: int) -> Optional[int]:
        return pagewalk.translate(self.machine.memory, vcpu.get_reg("csr.satp"), gva)

    # -- breakpoints and stepping ---------------------------------------------------------
    def breakpoint_bytes(self, kind: int) -> bytes:
        if kind == 2:
            return rvstep.C_EBREAK
        if kind == 4:
            return rvstep.EBREAK
        raise TargetError(f"RISC-V breakpoints are kind 2 (c.ebreak) or 4 (ebreak), "
                          f"not {kind}", 22)

    @staticmethod
    def _set_debug(vcpu: Any, on: bool) -> None:
        g = ffi.new("struct kvm_guest_debug *")
        g.control = abi.GUESTDBG_ENABLE if on else 0
        vcpu.ioctl("KVM_SET_GUEST_DEBUG", g)

    def _next_pc(self, vcpu: Any, mem: GuestAccess) -> int:
        pc = self.pc(vcpu)
        first = int.from_bytes(mem.read(pc, 2), "little")
        length = rvstep.insn_length(first) or 4
        insn = first
        if length > 2:
            insn |= int.from_bytes(mem.read(pc + 2, length - 2), "little") << 16

        def xreg(n: int) -> int:
            return int(vcpu.get_reg(f"core.regs.{_ONE_X[n]}"))

        return rvstep.next_pc(insn, pc, xreg, lambda: int(vcpu.get_reg("csr.sepc")))

    def prepare_resume(self, vcpu: Any, *, step: bool, sw_breakpoints: bool,
                       mem: GuestAccess) -> None:
        # a step breakpoint still planted (no stop came since: a detach while stepping) goes
        # first, so that its original bytes are never lost under a second one
        self.stopped(vcpu, mem)
        if step:
            target = self._next_pc(vcpu, mem)
            first = int.from_bytes(mem.read(target, 2), "little")
            bp = rvstep.breakpoint_for(first)
            original = mem.read(target, len(bp))
            mem.write(target, bp)
            self._steps[vcpu.id] = (target, original)
        self._set_debug(vcpu, step or sw_breakpoints)

    def stopped(self, vcpu: Any, mem: GuestAccess) -> None:
        planted = self._steps.pop(vcpu.id, None)
        if planted is not None:
            gva, original = planted
            mem.write(gva, original)

    def classify_stop(self, vcpu: Any, ex: Any, planted: Sequence[int]) -> Optional[Stop]:
        if ex.name != "DEBUG":
            return None
        pc = self.pc(vcpu)
        mine = self._steps.get(vcpu.id)
        if mine is not None and mine[0] == pc:
            return Stop()                             # the step is done
        if pc in planted:
            return Stop(reason="swbreak")
        if any(gva == pc for gva, _orig in self._steps.values()):
            # another vCPU's step breakpoint: "swbreak" at an address with no breakpoint of
            # gdb's is a trap gdb knows to be from a breakpoint since removed, and resumes
            return Stop(reason="swbreak")
        return None

    def give_to_guest(self, vcpu: Any, ex: Any) -> bool:
        if ex.name != "DEBUG":
            return False
        self.deliver_breakpoint(vcpu, self.pc(vcpu))
        return True

    @staticmethod
    def deliver_breakpoint(vcpu: Any, pc: int) -> None:
        """Give the guest the breakpoint exception its own ``ebreak`` at GVA ``pc`` raised
        while guest debug was on, as the hart would have (privileged ISA, "Supervisor Trap
        Handling", for a trap taken into S-mode, i.e. the guest's VS-mode): scause = 3,
        sepc = stval = ``pc``, sstatus.SPP = the mode it came from, SPIE = SIE, SIE = 0,
        mode S, pc = stvec's BASE (exceptions ignore vectored mode). Raises
        :class:`~pykvm.errors.KvmError` if KVM refuses a register."""
        mode = vcpu.get_reg("core.mode")
        sstatus = vcpu.get_reg("csr.sstatus")
        sie = sstatus & _SSTATUS_SIE
        sstatus &= ~(_SSTATUS_SIE | _SSTATUS_SPIE | _SSTATUS_SPP)
        sstatus |= (_SSTATUS_SPIE if sie else 0) | (_SSTATUS_SPP if mode == _MODE_S else 0)
        vcpu.set_reg("csr.sepc", pc)
        vcpu.set_reg("csr.scause", _CAUSE_BREAKPOINT)
        vcpu.set_reg("csr.stval", pc)
        vcpu.set_reg("csr.sstatus", sstatus)
        vcpu.set_reg("core.mode", _MODE_S)
        vcpu.set_reg("core.regs.pc", vcpu.get_reg("csr.stvec") & ~3)
