"""x86 for the GDB stub: gdb's ``i386:x86-64`` and ``i386`` target descriptions over KVM's
register ioctls, KVM_TRANSLATE, ``int3`` breakpoints, the debug registers (DR0-DR3, DR7) for
hardware breakpoints and watchpoints, KVM_GUESTDBG_SINGLESTEP.

Facts used: the register layouts are gdb's features ``org.gnu.gdb.i386.core``, ``.sse`` and
``.segments`` (GDB manual, "i386 Features"); the guest-debug control bits and
``struct kvm_guest_debug_arch`` are Linux's Documentation/virt/kvm/api.rst
"KVM_SET_GUEST_DEBUG"; DR7's layout is the Intel SDM vol. 3, 18.2.4 "Debug Control Register".

Software breakpoints and this host: where KVM runs ring-0 guest code in its instruction
emulator (a paravirtual KVM such as kvm_pvm), the emulator cannot execute ``int3`` and the
run stops with KVM_EXIT_INTERNAL_ERROR (suberror EMULATION) with RIP at the ``int3``; on
VMX/SVM hardware KVM_GUESTDBG_USE_SW_BP makes the ``#BP`` a KVM_EXIT_DEBUG (exception 3), RIP
again at the ``int3``. Both are taken as a breakpoint hit when RIP is at a breakpoint the stub
planted; anything else (the guest's own ``int3``) is left to the machine, as without a
debugger."""
from __future__ import annotations

from .. import abi
from ..abi import ffi
from ..errors import PykvmError
from ..machine import Machine
from .arch import (GdbTarget, GuestAccess, Stop as DebugStop, TargetError, Unsupported,
                   Z_ACCESS_WATCH, Z_HW_BREAK, Z_READ_WATCH, Z_WRITE_WATCH)

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Dict, List, Optional, Sequence, Tuple

_EFER_LMA = 1 << 10
_EMULATION = abi.INTERNAL_ERROR_SUBERRORS.get("EMULATION", 1)
_DR6_BS = 1 << 14                     # single step
_DR7_FIXED = 1 << 10                  # reads as 1
_LEN_BITS = {1: 0, 2: 1, 8: 2, 4: 3}  # DR7 LENn encodings
_RW_BITS = {Z_HW_BREAK: 0, Z_WRITE_WATCH: 1, Z_ACCESS_WATCH: 3}

_GPR64 = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp",
          "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")
# gdb's i386 order of the same registers, and the kvm_regs field each one is
_GPR32 = (("eax", "rax"), ("ecx", "rcx"), ("edx", "rdx"), ("ebx", "rbx"),
          ("esp", "rsp"), ("ebp", "rbp"), ("esi", "rsi"), ("edi", "rdi"))
_SEGS = ("cs", "ss", "ds", "es", "fs", "gs")
_FPU_CTL = ("fctrl", "fstat", "ftag", "fiseg", "fioff", "foseg", "fooff", "fop")
_SYS = ("cr0", "cr2", "cr3", "cr4", "efer")

# one register of a layout: (name, size in bytes, xml type, source, key)
#   source: "gpr" kvm_regs field, "flags", "seg" selector, "segbase", "st" x87 stack slot,
#   "fpu" control word name, "xmm" index, "mxcsr", "sys" kvm_sregs field
_Reg = tuple


def _layout(long_mode: bool) -> List[_Reg]:
    regs: List[_Reg] = []
    if long_mode:
        regs += [(n, 8, "int64", "gpr", n) for n in _GPR64]
        regs.append(("rip", 8, "code_ptr", "gpr", "rip"))
    else:
        regs += [(n, 4, "int32", "gpr", f) for n, f in _GPR32]
        regs.append(("eip", 4, "code_ptr", "gpr", "rip"))
    regs.append(("eflags", 4, "i386_eflags", "flags", "rflags"))
    regs += [(s, 4, "int32", "seg", s) for s in _SEGS]
    regs += [(f"st{i}", 10, "i387_ext", "st", i) for i in range(8)]
    regs += [(n, 4, "int", "fpu", n) for n in _FPU_CTL]
    regs += [(f"xmm{i}", 16, "vec128", "xmm", i) for i in range(16 if long_mode else 8)]
    regs.append(("mxcsr", 4, "i386_mxcsr", "mxcsr", "mxcsr"))
    if long_mode:
        regs += [("fs_base", 8, "int64", "segbase", "fs"), ("gs_base", 8, "int64", "segbase", "gs")]
    regs += [(n, 8, "int64", "sys", n) for n in _SYS]
    return regs


_EFLAGS_XML = """  <flags id="i386_eflags" size="4">
    <field name="CF" start="0" end="0"/><field name="" start="1" end="1"/>
    <field name="PF" start="2" end="2"/><field name="AF" start="4" end="4"/>
    <field name="ZF" start="6" end="6"/><field name="SF" start="7" end="7"/>
    <field name="TF" start="8" end="8"/><field name="IF" start="9" end="9"/>
    <field name="DF" start="10" end="10"/><field name="OF" start="11" end="11"/>
    <field name="NT" start="14" end="14"/><field name="RF" start="16" end="16"/>
    <field name="VM" start="17" end="17"/><field name="AC" start="18" end="18"/>
    <field name="VIF" start="19" end="19"/><field name="VIP" start="20" end="20"/>
    <field name="ID" start="21" end="21"/>
  </flags>
"""
_SSE_TYPES_XML = """  <vector id="v4f" type="ieee_single" count="4"/>
  <vector id="v2d" type="ieee_double" count="2"/>
  <vector id="v16i8" type="int8" count="16"/>
  <vector id="v8i16" type="int16" count="8"/>
  <vector id="v4i32" type="int32" count="4"/>
  <vector id="v2i64" type="int64" count="2"/>
  <union id="vec128">
    <field name="v4_float" type="v4f"/><field name="v2_double" type="v2d"/>
    <field name="v16_int8" type="v16i8"/><field name="v8_int16" type="v8i16"/>
    <field name="v4_int32" type="v4i32"/><field name="v2_int64" type="v2i64"/>
    <field name="uint128" type="uint128"/>
  </union>
  <flags id="i386_mxcsr" size="4">
    <field name="IE" start="0" end="0"/><field name="DE" start="1" end="1"/>
    <field name="ZE" start="2" end="2"/><field name="OE" start="3" end="3"/>
    <field name="UE" start="4" end="4"/><field name="PE" start="5" end="5"/>
    <field name="DAZ" start="6" end="6"/><field name="IM" start="7" end="7"/>
    <field name="DM" start="8" end="8"/><field name="ZM" start="9" end="9"/>
    <field name="OM" start="10" end="10"/><field name="UM" start="11" end="11"/>
    <field name="PM" start="12" end="12"/><field name="FZ" start="15" end="15"/>
  </flags>
"""


def _xml(long_mode: bool, layout: List[_Reg]) -> str:
    features = {"gpr": "core", "flags": "core", "seg": "core", "st": "core", "fpu": "core",
                "xmm": "sse", "mxcsr": "sse", "segbase": "segments", "sys": "sys"}
    names = {"core": "org.gnu.gdb.i386.core", "sse": "org.gnu.gdb.i386.sse",
             "segments": "org.gnu.gdb.i386.segments", "sys": "org.pykvm.x86.sys"}
    groups = {"fpu": ' group="float"', "mxcsr": ' group="vector"', "sys": ' group="system"'}
    out = ['<?xml version="1.0"?>\n<!DOCTYPE target SYSTEM "gdb-target.dtd">\n<target>\n',
           f"<architecture>{'i386:x86-64' if long_mode else 'i386'}</architecture>\n"]
    current = None
    for regnum, (name, size, xtype, source, _key) in enumerate(layout):
        feat = features[source]
        if feat != current:
            if current is not None:
                out.append("</feature>\n")
            out.append(f'<feature name="{names[feat]}">\n')
            if feat == "core":
                out.append(_EFLAGS_XML)
            elif feat == "sse":
                out.append(_SSE_TYPES_XML)
            current = feat
        out.append(f'  <reg name="{name}" bitsize="{size * 8}" type="{xtype}" '
                   f'regnum="{regnum}"{groups.get(source, "")}/>\n')
    out.append("</feature>\n</target>\n")
    return "".join(out)


def _full_tag(abridged: int, fsw: int) -> int:
    """The x87 tag word from FXSAVE's abridged one (1 bit per physical register: valid or
    empty): 11b for empty, 00b (valid) otherwise — the finer zero/special classes are not
    known without decoding the values."""
    tag = 0
    for i in range(8):
        if not abridged >> i & 1:
            tag |= 3 << (2 * i)
    return tag


def _abridged_tag(full: int) -> int:
    return sum(1 << i for i in range(8) if (full >> (2 * i)) & 3 != 3)


_PROBE_CODE = bytes([0xC6, 0x06, 0x00, 0x05, 0x01,   # mov byte [0x500], 1  (real mode)
                     0xF4])                           # hlt
_probe_result: Dict[int, bool] = {}


def _dr0_fires(kvm: Any, rw: int, addr: int) -> bool:
    """Whether DR0 at ``addr`` with DR7 R/W0 = ``rw`` (0 execute, 1 write) stops
    :data:`_PROBE_CODE` (a throw-away real-mode VM) with KVM_EXIT_DEBUG; cached per process
    and kind; a probe that fails to run counts as False."""
    if rw not in _probe_result:
        fired = False
        try:
            with Machine(_PROBE_CODE, kvm=kvm, machine="bare", flat_mode="real",
                         flat_addr=0x8000, mem_size=1 << 20) as m:
                g = ffi.new("struct kvm_guest_debug *")
                g.control = abi.GUESTDBG_ENABLE | abi.arch.GUESTDBG_USE_HW_BP
                g.arch.debugreg[0] = addr
                g.arch.debugreg[7] = _DR7_FIXED | 2 | (rw << 16)
                m.vcpus[0].ioctl("KVM_SET_GUEST_DEBUG", g)
                ev = m.step(0, timeout=5)
                fired = ev.kind == "exit" and ev.exit.name == "DEBUG"
        except (PykvmError, OSError):
            fired = False
        _probe_result[rw] = fired
    return _probe_result[rw]


def data_breakpoints_fire(kvm: Any) -> bool:
    """Whether a data breakpoint in DR0/DR7 (KVM_GUESTDBG_USE_HW_BP) stops a guest's write on
    this host: a throw-away real-mode VM writes a byte that DR0 watches. False where KVM
    runs the guest's code in its instruction emulator (kvm_pvm: the emulator checks
    instruction breakpoints, not data ones), and on QEMU 7.2's emulated SVM (the nested lab:
    its VMRUN loads the VMCB's DR7 without arming the breakpoints). Cached per process; a
    probe that fails to run counts as False."""
    return _dr0_fires(kvm, _RW_BITS[Z_WRITE_WATCH], 0x500)


def instruction_breakpoints_fire(kvm: Any) -> bool:
    """Whether an instruction breakpoint in DR0/DR7 (KVM_GUESTDBG_USE_HW_BP; gdb's
    ``hbreak``) stops a guest on this host: the same throw-away VM as
    :func:`data_breakpoints_fire`, DR0 at its ``hlt``. True on VMX/SVM hardware and on
    kvm_pvm; False on QEMU 7.2's emulated SVM (the nested lab), where the stub then refuses
    ``Z1`` (gdb says it cannot insert the hardware breakpoint) rather than accept one that
    would never stop the guest. Cached per process."""
    return _dr0_fires(kvm, _RW_BITS[Z_HW_BREAK], 0x8000 + len(_PROBE_CODE) - 1)


class X86Target(GdbTarget):
    """x86 (64-bit, 32-bit and real-mode guests) for :mod:`pykvm.gdbstub`; see the module
    docstring."""

    arch_name = "i386:x86-64"
    stop_exits = ("DEBUG", "INTERNAL_ERROR")

    def __init__(self, machine: Any):
        super().__init__(machine)
        self._long: Optional[bool] = None           # the layout chosen (None: not yet)
        self._slots: List[Optional[Tuple[int, int, int]]] = [None] * 4   # (ztype, gva, len)

    # -- description and registers --------------------------------------------------------
    def _mode(self, vcpu: Any) -> bool:
        if self._long is None:
            s = vcpu.get_sregs()
            self._long = bool(s.efer & _EFER_LMA)
        return self._long

    def _regs(self, vcpu: Any) -> List[_Reg]:
        return _layout(self._mode(vcpu))

    def documents(self, vcpu: Any) -> Dict[str, str]:
        long_mode = self._mode(vcpu)
        return {"target.xml": _xml(long_mode, _layout(long_mode))}

    def _values(self, vcpu: Any) -> Tuple[Any, Any, Any]:
        return vcpu.get_regs(), vcpu.get_sregs(), vcpu.get_fpu()

    @staticmethod
    def _get(reg: _Reg, regs: Any, sregs: Any, fpu: Any) -> bytes:
        name, size, _t, source, key = reg
        if source == "gpr" or source == "flags":
            v = getattr(regs, key)
        elif source == "seg":
            v = getattr(sregs, key).selector
        elif source == "segbase":
            v = getattr(sregs, key).base
        elif source == "sys":
            v = getattr(sregs, key)
        elif source == "st":
            return bytes(ffi.buffer(fpu.fpr[key], 16))[:10]
        elif source == "xmm":
            return bytes(ffi.buffer(fpu.xmm[key], 16))
        elif source == "mxcsr":
            v = fpu.mxcsr
        else:                                       # "fpu"
            v = {"fctrl": fpu.fcw, "fstat": fpu.fsw, "ftag": _full_tag(fpu.ftwx, fpu.fsw),
                 "fiseg": fpu.last_ip >> 32 & 0xFFFF, "fioff": fpu.last_ip & 0xFFFFFFFF,
                 "foseg": fpu.last_dp >> 32 & 0xFFFF, "fooff": fpu.last_dp & 0xFFFFFFFF,
                 "fop": fpu.last_opcode}[name]
        return (v & ((1 << (8 * size)) - 1)).to_bytes(size, "little")

    @staticmethod
    def _put(reg: _Reg, raw: bytes, regs: Any, sregs: Any, fpu: Any) -> None:
        """Store ``raw`` into the structs; a segment or system register may only be written
        with its current value (loading a selector needs a descriptor: not done here)."""
        name, size, _t, source, key = reg
        v = int.from_bytes(raw, "little")
        if source == "gpr":
            old = getattr(regs, key)
            if size < 8:                            # a 32-bit view keeps the upper half
                v |= old & ~0xFFFFFFFF
            setattr(regs, key, v)
        elif source == "flags":
            regs.rflags = (regs.rflags & ~0xFFFFFFFF) | v
        elif source in ("seg", "segbase", "sys"):
            cur = X86Target._get(reg, regs, sregs, fpu)
            if cur != raw:
                raise TargetError(f"register {name} cannot be changed from the debugger", 22)
        elif source == "st":
            ffi.memmove(fpu.fpr[key], raw, 10)
        elif source == "xmm":
            ffi.memmove(fpu.xmm[key], raw, 16)
        elif source == "mxcsr":
            fpu.mxcsr = v
        elif name == "fctrl":
            fpu.fcw = v & 0xFFFF
        elif name == "fstat":
            fpu.fsw = v & 0xFFFF
        elif name == "ftag":
            fpu.ftwx = _abridged_tag(v)
        elif name == "fop":
            fpu.last_opcode = v & 0x7FF
        elif name == "fioff":
            fpu.last_ip = (fpu.last_ip & ~0xFFFFFFFF) | v
        elif name == "fooff":
            fpu.last_dp = (fpu.last_dp & ~0xFFFFFFFF) | v
        # fiseg/foseg: not kept by FXSAVE in 64-bit format; writes are ignored

    def read_registers(self, vcpu: Any) -> bytes:
        regs, sregs, fpu = self._values(vcpu)
        return b"".join(self._get(r, regs, sregs, fpu) for r in self._regs(vcpu))

    def write_registers(self, vcpu: Any, data: bytes) -> None:
        layout = self._regs(vcpu)
        want = sum(r[1] for r in layout)
        if len(data) != want:
            raise TargetError(f"G blob of {len(data)} bytes, the description has {want}", 22)
        regs, sregs, fpu = self._values(vcpu)
        off = 0
        for r in layout:
            self._put(r, data[off:off + r[1]], regs, sregs, fpu)
            off += r[1]
        vcpu.set_regs(regs)
        vcpu.set_fpu(fpu)

    def _reg(self, vcpu: Any, regno: int) -> _Reg:
        layout = self._regs(vcpu)
        if not 0 <= regno < len(layout):
            raise TargetError(f"no register {regno}", 22)
        return layout[regno]

    def read_register(self, vcpu: Any, regno: int) -> bytes:
        reg = self._reg(vcpu, regno)
        return self._get(reg, *self._values(vcpu))

    def write_register(self, vcpu: Any, regno: int, data: bytes) -> None:
        reg = self._reg(vcpu, regno)
        if len(data) != reg[1]:
            raise TargetError(f"register {reg[0]} takes {reg[1]} bytes, got {len(data)}", 22)
        regs, sregs, fpu = self._values(vcpu)
        self._put(reg, data, regs, sregs, fpu)
        if reg[3] in ("gpr", "flags"):
            vcpu.set_regs(regs)
        elif reg[3] in ("st", "xmm", "mxcsr", "fpu"):
            vcpu.set_fpu(fpu)

    def pc(self, vcpu: Any) -> int:
        regs, sregs = vcpu.get_regs(), vcpu.get_sregs()
        if sregs.efer & _EFER_LMA and sregs.cs.l:
            return regs.rip
        return (sregs.cs.base + regs.rip) & 0xFFFFFFFF

    # -- memory ---------------------------------------------------------------------------
    def translate(self, vcpu: Any, gva: int) -> Optional[int]:
        return vcpu.translate(gva)

    # -- breakpoints and stepping ---------------------------------------------------------
    def breakpoint_bytes(self, kind: int) -> bytes:
        if kind != 1:
            raise TargetError(f"x86 breakpoints are 1 byte (int3), not kind {kind}", 22)
        return b"\xcc"

    def insert_hw(self, ztype: int, gva: int, kind: int) -> None:
        if ztype == Z_READ_WATCH:
            raise Unsupported("x86 debug registers have no read-only watchpoint")
        if ztype not in _RW_BITS:
            raise Unsupported(f"no Z{ztype} on x86")
        if ztype == Z_HW_BREAK and not instruction_breakpoints_fire(self.machine.kvm):
            raise Unsupported("instruction breakpoints in the debug registers do not fire on "
                              "this host")
        if ztype != Z_HW_BREAK and not data_breakpoints_fire(self.machine.kvm):
            raise Unsupported("data breakpoints do not fire on this host (KVM emulates the "
                              "guest's code)")
        length = 1 if ztype == Z_HW_BREAK else kind
        if ztype != Z_HW_BREAK and (length not in _LEN_BITS or gva % length):
            raise TargetError(f"cannot watch {kind} bytes at {gva:#x} (1, 2, 4 or 8, "
                              "aligned)", 22)
        for i, s in enumerate(self._slots):
            if s is None:
                self._slots[i] = (ztype, gva, length)
                return
        raise TargetError("all four debug registers are taken", 28)

    def remove_hw(self, ztype: int, gva: int, kind: int) -> None:
        if ztype not in _RW_BITS:
            raise Unsupported(f"no Z{ztype} on x86")
        length = 1 if ztype == Z_HW_BREAK else kind
        for i, s in enumerate(self._slots):
            if s == (ztype, gva, length):
                self._slots[i] = None
                return
        raise TargetError(f"no hardware point Z{ztype} at {gva:#x}", 22)

    def hw_count(self) -> int:
        return sum(s is not None for s in self._slots)

    def _dr7(self) -> int:
        dr7 = 0
        for i, s in enumerate(self._slots):
            if s is None:
                continue
            ztype, _gva, length = s
            dr7 |= 2 << (2 * i)                       # Gn: global enable
            bits = _RW_BITS[ztype] | ((_LEN_BITS[length] if ztype != Z_HW_BREAK else 0) << 2)
            dr7 |= bits << (16 + 4 * i)
        return dr7 | _DR7_FIXED if dr7 else 0

    def prepare_resume(self, vcpu: Any, *, step: bool, sw_breakpoints: bool,
                       mem: GuestAccess) -> None:
        g = ffi.new("struct kvm_guest_debug *")
        control = 0
        if sw_breakpoints:
            control |= abi.GUESTDBG_ENABLE | abi.arch.GUESTDBG_USE_SW_BP
        if step:
            control |= abi.GUESTDBG_ENABLE | abi.GUESTDBG_SINGLESTEP
        dr7 = self._dr7()
        if dr7:
            control |= abi.GUESTDBG_ENABLE | abi.arch.GUESTDBG_USE_HW_BP
            for i, s in enumerate(self._slots):
                g.arch.debugreg[i] = 0 if s is None else s[1]
            g.arch.debugreg[7] = dr7
        g.control = control
        vcpu.ioctl("KVM_SET_GUEST_DEBUG", g)

    def give_to_guest(self, vcpu: Any, ex: Any) -> bool:
        """A ``#BP`` KVM stopped for (KVM_GUESTDBG_USE_SW_BP is on while breakpoints are
        planted) at an ``int3`` the stub did not plant is the guest's own: queue it back into
        the guest through KVM_SET_VCPU_EVENTS (exception 3, injected), as QEMU's
        kvm_handle_debug does, so the guest's IDT sees it as without a debugger. Only VMX/SVM
        KVM exits this way; on a host that emulates ring-0 code the guest's ``int3`` is an
        emulation failure instead, which is left to the machine."""
        if ex.name != "DEBUG" or ex.run.debug.arch.exception != 3:
            return False
        events = vcpu.get_vcpu_events()
        events.exception.injected = 1
        events.exception.nr = 3
        events.exception.has_error_code = 0
        events.exception.pending = 0
        vcpu.set_vcpu_events(events)
        return True

    def classify_stop(self, vcpu: Any, ex: Any, planted: Sequence[int]) -> Optional[DebugStop]:
        if ex.name == "DEBUG":
            arch = ex.run.debug.arch
            if arch.exception == 3:                   # #BP: ours only where we planted one
                return DebugStop(reason="swbreak") if arch.pc in planted else None
            if arch.exception != 1:
                return None
            dr6 = arch.dr6
            for i, s in enumerate(self._slots):
                if s is not None and dr6 >> i & 1:
                    ztype, gva, _len = s
                    if ztype == Z_HW_BREAK:
                        return DebugStop(reason="hwbreak")
                    return DebugStop(reason="watch" if ztype == Z_WRITE_WATCH else "awatch",
                                addr=gva)
            return DebugStop()                        # a single step (DR6.BS) or other #DB
        if ex.name == "INTERNAL_ERROR" and ex.suberror == _EMULATION and planted:
            pc = self.pc(vcpu)
            if pc in planted:                         # KVM's emulator stopped at our int3
                return DebugStop(reason="swbreak")
        return None
