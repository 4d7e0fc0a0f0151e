"""Typed vCPU exits.

An exit object borrows its vCPU's shared ``kvm_run`` page: it reads the fields when you ask for
them (and only those) and stops being usable once the vCPU runs again
(:class:`~pykvm.errors.StaleExit`). Guest-controlled sizes and offsets (``io.data_offset``,
``io.size * io.count``, ``mmio.len``) are validated before any host memory is touched.

The run loop hands Python handlers exit objects it keeps and reuses (:class:`ExitCache`): an
exit that nobody holds on to is refilled for the next exit of its kind instead of being
allocated again; one that somebody keeps is left alone (and goes stale).
"""
from __future__ import annotations

from sys import getrefcount as _refs

from . import abi
from ._loopstate import ExitState, RunState
from .abi import CData, ffi
from .errors import (Closed, GuestError, GuestRamUnbacked, KvmError, PykvmError, StaleExit,
                     kvm_error)

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Dict, Optional, Protocol, Tuple, Type, Union
else:
    from ._record import Protocol    # a run-time stand-in: importing typing costs ~5 ms

_RUN_SIZE = ffi.sizeof("struct kvm_run")
_MMIO_DATA = ffi.offsetof("struct kvm_run", "mmio", "data")
_IO_OUT = abi.KVM_EXIT_IO_OUT


class VcpuView(Protocol):
    """What an exit reads of its vCPU, a :class:`pykvm.vcpu.Vcpu` (a protocol: the vCPU layer
    sits above this one)."""

    id: int
    run_size: int                # bytes of the mmapped kvm_run
    run_struct: CData            # struct kvm_run *
    _rs: RunState                # seq (bumped by every KVM_RUN) and closing, as C fields
    _io: CData                   # run_struct.io
    _mmio: CData                 # run_struct.mmio
    _run_bytes: memoryview       # the kvm_run page, writable


def _dead(ex: "Exit") -> Exception:
    """Closed or StaleExit for an exit that is no longer current."""
    v = ex._vcpu
    if v._rs.closing:
        return Closed(f"{ex.name} exit used after vCPU {v.id} was closed")
    return StaleExit(f"{ex.name} exit used after vCPU {v.id} ran again")


class Exit(ExitState):
    """Base class: ``reason`` (int), ``name`` (e.g. ``"IO"``), ``flags`` (kvm_run.flags)."""

    # From ExitState (C fields the C loop fills for a handler it calls): _rs (the vCPU's
    # RunState), _seq (the _rs.seq this exit belongs to); _decoded (True: _info/_a/_b hold the
    # exit's fields; False: read kvm_run); _info: size | direction << 8 (I/O), len | is_write
    # << 8 (MMIO); _a: port | count << 16 | data_offset << 32 (I/O), the address (MMIO); _b: the
    # first element written.
    __slots__ = ("_vcpu", "_reason", "__weakref__")
    _vcpu: VcpuView
    _rs: RunState
    _reason: int
    reason = -1

    def __init__(self, vcpu: VcpuView):
        self._vcpu = vcpu
        self._rs = rs = vcpu._rs
        self._seq = rs.seq
        self._reason = vcpu.run_struct.exit_reason

    @property
    def name(self) -> str:
        """The exit reason's name, e.g. ``"IO"``."""
        return abi.EXIT_NAMES.get(self._reason, f"EXIT_{self._reason}")

    @property
    def current(self) -> bool:
        """Whether this exit is still the vCPU's latest (its fields can be read)."""
        rs = self._rs
        return rs.seq == self._seq and not rs.closing

    @property
    def run(self) -> CData:
        """The live kvm_run struct, while this exit is current."""
        rs = self._rs
        if rs.seq != self._seq or rs.closing:
            raise _dead(self)
        return self._vcpu.run_struct

    @property
    def flags(self) -> int:
        """``kvm_run.flags`` (x86: SMM, bus lock, guest mode)."""
        return self.run.flags

    @property
    def guest_mode(self) -> bool:
        """x86: the exit happened while the vCPU was running a nested (L2) guest."""
        return bool(self.run.flags & abi.RUN_FLAGS["X86_GUEST_MODE"])

    def fields(self) -> Dict[str, object]:
        """The exit's decoded fields, for printing and JSON."""
        return {}

    def __repr__(self) -> str:
        """The exit and its fields; never raises (a stale or closed exit says so instead, and a
        field the guest made unreadable shows the error's one line)."""
        try:
            fields = self.fields()
        except (StaleExit, Closed) as e:
            return f"<{type(self).__name__} ({'closed' if isinstance(e, Closed) else 'stale'})>"
        except (PykvmError, ValueError, AttributeError) as e:
            return f"<{type(self).__name__} (unreadable: {e})>"
        f = ", ".join(f"{k}={v:#x}" if isinstance(v, int) else f"{k}={v!r}"
                      for k, v in fields.items())
        return f"<{type(self).__name__} {f}>" if f else f"<{type(self).__name__}>"


class Unknown(Exit):
    __slots__ = ()
    reason = abi.EXIT_REASONS["UNKNOWN"]

    @property
    def hardware_exit_reason(self) -> int:
        """The hardware's reason, for an exit KVM could not classify."""
        return self.run.hw.hardware_exit_reason

    def fields(self) -> Dict[str, object]:
        return {"hardware_exit_reason": self.hardware_exit_reason}


class Io(Exit):
    """Port I/O. ``out``: ``data`` holds what the guest wrote. ``in``: call :meth:`respond`."""
    __slots__ = ()
    reason = abi.EXIT_REASONS["IO"]

    @property
    def port(self) -> int:
        """The I/O port."""
        rs, v = self._rs, self._vcpu
        if rs.seq != self._seq or rs.closing:
            raise _dead(self)
        return self._a & 0xFFFF if self._decoded else v._io.port

    @property
    def size(self) -> int:
        """Bytes per element (1, 2 or 4)."""
        rs, v = self._rs, self._vcpu
        if rs.seq != self._seq or rs.closing:
            raise _dead(self)
        return self._info & 0xFF if self._decoded else v._io.size

    @property
    def count(self) -> int:
        """Elements (more than 1 for ``rep ins``/``rep outs``)."""
        rs, v = self._rs, self._vcpu
        if rs.seq != self._seq or rs.closing:
            raise _dead(self)
        return (self._a >> 16) & 0xFFFF if self._decoded else v._io.count

    @property
    def is_out(self) -> bool:
        """True for ``out``, False for ``in``."""
        rs, v = self._rs, self._vcpu
        if rs.seq != self._seq or rs.closing:
            raise _dead(self)
        if self._decoded:
            return (self._info >> 8) & 0xFF == _IO_OUT
        return v._io.direction == _IO_OUT

    @property
    def direction(self) -> str:
        """``"out"`` or ``"in"``."""
        return "out" if self.is_out else "in"

    def _span(self) -> Tuple[int, int, int]:
        """(offset, bytes, element size) of the data in the run page, validated."""
        rs, v = self._rs, self._vcpu
        if rs.seq != self._seq or rs.closing:
            raise _dead(self)
        if self._decoded:
            a = self._a
            off, size, count = a >> 32, self._info & 0xFF, (a >> 16) & 0xFFFF
        else:
            io = v._io
            off, size, count = io.data_offset, io.size, io.count
        n = size * count
        limit = v.run_size
        if size not in (1, 2, 4) or off < _RUN_SIZE or off > limit or n > limit - off:
            raise GuestError(f"I/O exit with data outside the run page: offset={off:#x} "
                             f"size={size} count={count}")
        return off, n, size

    @property
    def data(self) -> bytes:
        """What the guest wrote (``out``): ``size * count`` bytes."""
        off, n, _ = self._span()
        return bytes(self._vcpu._run_bytes[off:off + n])

    value = ExitState._value
    """The first element written, as an int (for ``out``). Raises StaleExit/Closed once the
    vCPU ran again or closed, GuestError for data outside the run page."""

    def _value_slow(self) -> int:
        off, _, size = self._span()
        mv = self._vcpu._run_bytes
        return mv[off] if size == 1 else int.from_bytes(mv[off:off + size], "little")

    respond = ExitState._respond
    """respond(data): supply the data an ``in`` reads: bytes (``size * count`` long) or an int
    (repeated for each element). Raises ValueError for bytes of another length, StaleExit/Closed
    once the vCPU ran again or closed."""

    def _respond_slow(self, data: Union[int, bytes]) -> None:
        off, n, size = self._span()
        mv = self._vcpu._run_bytes
        if isinstance(data, int):
            if n == 1:
                mv[off] = data & 0xFF
                return
            data = (data & ((1 << (8 * size)) - 1)).to_bytes(size, "little") * (n // size)
        data = bytes(data)
        if len(data) != n:
            raise ValueError(f"in of {n} bytes needs {n} bytes of data, got {len(data)}")
        mv[off:off + n] = data

    def fields(self) -> Dict[str, object]:
        f: Dict[str, object] = {"direction": self.direction, "port": self.port, "size": self.size,
                                "count": self.count}
        if self.is_out:
            f["data"] = self.data.hex()
        return f


class Mmio(Exit):
    """MMIO. Writes: ``data``. Reads: call :meth:`respond`."""
    __slots__ = ()
    reason = abi.EXIT_REASONS["MMIO"]

    @property
    def phys_addr(self) -> int:
        """The guest-physical address accessed."""
        rs, v = self._rs, self._vcpu
        if rs.seq != self._seq or rs.closing:
            raise _dead(self)
        return self._a if self._decoded else v._mmio.phys_addr

    @property
    def len(self) -> int:
        """Bytes accessed (1..8; anything else raises GuestError)."""
        rs, v = self._rs, self._vcpu
        if rs.seq != self._seq or rs.closing:
            raise _dead(self)
        n = self._info & 0xFF if self._decoded else v._mmio.len
        if not 1 <= n <= 8:
            raise GuestError(f"MMIO exit with length {v._mmio.len}")
        return n

    @property
    def is_write(self) -> bool:
        """True for a write, False for a read."""
        rs, v = self._rs, self._vcpu
        if rs.seq != self._seq or rs.closing:
            raise _dead(self)
        if self._decoded:
            return bool(self._info & 0x100)
        return bool(v._mmio.is_write)

    @property
    def data(self) -> bytes:
        """What the guest wrote (``len`` bytes)."""
        n = self.len
        return bytes(self._vcpu._run_bytes[_MMIO_DATA:_MMIO_DATA + n])

    value = ExitState._value
    """What the guest wrote, as a little-endian int. Raises StaleExit/Closed once the vCPU ran
    again or closed, GuestError for a length outside 1..8."""

    def _value_slow(self) -> int:
        n = self.len
        if self._decoded:
            return self._b                 # decoded by the C loop
        return int.from_bytes(self._vcpu._run_bytes[_MMIO_DATA:_MMIO_DATA + n], "little")

    respond = ExitState._respond
    """respond(data): supply what a read returns: ``len`` bytes, or an int (truncated to ``len``
    bytes). Raises ValueError for bytes of another length, StaleExit/Closed once the vCPU ran
    again or closed."""

    def _respond_slow(self, data: Union[int, bytes]) -> None:
        n = self.len
        mv = self._vcpu._run_bytes
        if isinstance(data, int):
            data = (data & ((1 << (8 * n)) - 1)).to_bytes(n, "little")
        data = bytes(data)
        if len(data) != n:
            raise ValueError(f"MMIO read of {n} bytes needs {n} bytes, got {len(data)}")
        mv[_MMIO_DATA:_MMIO_DATA + n] = data

    def fields(self) -> Dict[str, object]:
        f: Dict[str, object] = {"phys_addr": self.phys_addr, "len": self.len,
                                "is_write": self.is_write}
        if self.is_write:
            f["data"] = self.data.hex()
        return f


class Hlt(Exit):
    __slots__ = ()
    reason = abi.EXIT_REASONS["HLT"]


class Shutdown(Exit):
    """x86 triple fault (or a shutdown KVM could not handle)."""
    __slots__ = ()
    reason = abi.EXIT_REASONS["SHUTDOWN"]


class Intr(Exit):
    """KVM_RUN returned because of a signal or a kick."""
    __slots__ = ()
    reason = abi.EXIT_REASONS["INTR"]


class IrqWindowOpen(Exit):
    __slots__ = ()
    reason = abi.EXIT_REASONS["IRQ_WINDOW_OPEN"]


class Nmi(Exit):
    __slots__ = ()
    reason = abi.EXIT_REASONS["NMI"]


class Exception_(Exit):
    __slots__ = ()
    reason = abi.EXIT_REASONS["EXCEPTION"]

    def fields(self) -> Dict[str, object]:
        return {"exception": self.run.ex.exception, "error_code": self.run.ex.error_code}


class FailEntry(Exit):
    __slots__ = ()
    reason = abi.EXIT_REASONS["FAIL_ENTRY"]

    @property
    def hardware_entry_failure_reason(self) -> int:
        """Why the hardware refused to enter the guest."""
        return self.run.fail_entry.hardware_entry_failure_reason

    @property
    def cpu(self) -> int:
        """The host CPU the entry failed on."""
        return self.run.fail_entry.cpu

    def fields(self) -> Dict[str, object]:
        return {"hardware_entry_failure_reason": self.hardware_entry_failure_reason, "cpu": self.cpu}


class InternalError(Exit):
    __slots__ = ()
    reason = abi.EXIT_REASONS["INTERNAL_ERROR"]
    SUBERRORS = {v: k for k, v in abi.INTERNAL_ERROR_SUBERRORS.items()}

    @property
    def suberror(self) -> int:
        """KVM's sub-error number (1 = emulation failure, ...)."""
        return self.run.internal.suberror

    @property
    def suberror_name(self) -> str:
        """The sub-error's name, e.g. ``"EMULATION"``."""
        return self.SUBERRORS.get(self.suberror, f"SUBERROR_{self.suberror}")

    @property
    def data(self) -> Tuple[int, ...]:
        """KVM's extra words about the error (at most 16)."""
        n = min(self.run.internal.ndata, 16)
        return tuple(self.run.internal.data[i] for i in range(n))

    def fields(self) -> Dict[str, object]:
        return {"suberror": self.suberror_name, "data": [hex(x) for x in self.data]}


class SystemEvent(Exit):
    __slots__ = ()
    reason = abi.EXIT_REASONS["SYSTEM_EVENT"]
    TYPES = {v: k for k, v in abi.SYSTEM_EVENTS.items()}

    @property
    def type(self) -> int:
        """The event type number (1 = shutdown, 2 = reset, ...)."""
        return self.run.system_event.type

    @property
    def type_name(self) -> str:
        """The event type's name, e.g. ``"SHUTDOWN"``."""
        return self.TYPES.get(self.type, f"TYPE_{self.type}")

    @property
    def data(self) -> Tuple[int, ...]:
        """The event's data words (at most 16)."""
        n = min(self.run.system_event.ndata, 16)
        return tuple(self.run.system_event.data[i] for i in range(n))

    def fields(self) -> Dict[str, object]:
        return {"type": self.type_name, "data": [hex(x) for x in self.data]}


class Debug(Exit):
    __slots__ = ()
    reason = abi.EXIT_REASONS["DEBUG"]

    def fields(self) -> Dict[str, object]:
        arch = self.run.debug.arch
        return {k: getattr(arch, k) for k in ("exception", "pc", "dr6", "dr7") if hasattr(arch, k)}

    @property
    def pc(self) -> Optional[int]:
        """The guest address of the debug exit (x86), or None."""
        return getattr(self.run.debug.arch, "pc", None)


class Hypercall(Exit):
    __slots__ = ()
    reason = abi.EXIT_REASONS["HYPERCALL"]

    @property
    def nr(self) -> int:
        """The hypercall number."""
        return self.run.hypercall.nr

    @property
    def args(self) -> Tuple[int, ...]:
        """The six argument words."""
        return tuple(self.run.hypercall.args)

    def set_return(self, value: int) -> None:
        """Set the value the guest's hypercall returns."""
        self.run.hypercall.ret = value

    def fields(self) -> Dict[str, object]:
        return {"nr": self.nr, "args": [hex(a) for a in self.args]}


class _Msr(Exit):
    __slots__ = ()
    @property
    def index(self) -> int:
        return self.run.msr.index

    @property
    def data(self) -> int:
        return self.run.msr.data

    def respond(self, value: int = 0, *, error: bool = False) -> None:
        self.run.msr.data = value
        self.run.msr.error = 1 if error else 0

    def fields(self) -> Dict[str, object]:
        return {"index": self.index, "data": self.data, "reason": self.run.msr.reason}


class X86Rdmsr(_Msr):
    __slots__ = ()
    reason = abi.EXIT_REASONS["X86_RDMSR"]


class X86Wrmsr(_Msr):
    __slots__ = ()
    reason = abi.EXIT_REASONS["X86_WRMSR"]


class RiscvSbi(Exit):
    """An SBI call KVM forwarded to userspace. Answer with :meth:`set_return`."""
    __slots__ = ()
    reason = abi.EXIT_REASONS["RISCV_SBI"]

    @property
    def extension_id(self) -> int:
        """The SBI extension id (a7)."""
        return self.run.riscv_sbi.extension_id

    @property
    def function_id(self) -> int:
        """The SBI function id (a6)."""
        return self.run.riscv_sbi.function_id

    @property
    def args(self) -> Tuple[int, ...]:
        """The six argument registers (a0..a5)."""
        return tuple(self.run.riscv_sbi.args)

    def set_return(self, error: int, value: int = 0) -> None:
        """Write ``ret[0]`` (SBI error, may be negative) and ``ret[1]`` (value)."""
        mask = (1 << 64) - 1
        self.run.riscv_sbi.ret[0] = error & mask
        self.run.riscv_sbi.ret[1] = value & mask

    def fields(self) -> Dict[str, object]:
        return {"extension_id": self.extension_id, "function_id": self.function_id,
                "args": [hex(a) for a in self.args]}


class RiscvCsr(Exit):
    __slots__ = ()
    reason = abi.EXIT_REASONS["RISCV_CSR"]

    @property
    def csr_num(self) -> int:
        """The CSR number the guest accessed."""
        return self.run.riscv_csr.csr_num

    @property
    def new_value(self) -> int:
        """The value the guest writes."""
        return self.run.riscv_csr.new_value

    @property
    def write_mask(self) -> int:
        """Which bits the guest writes."""
        return self.run.riscv_csr.write_mask

    def set_return(self, value: int) -> None:
        """Set the value the guest's CSR read returns."""
        self.run.riscv_csr.ret_value = value

    def fields(self) -> Dict[str, object]:
        return {"csr_num": self.csr_num, "new_value": self.new_value, "write_mask": self.write_mask}


class MemoryFault(Exit):
    __slots__ = ()
    reason = abi.EXIT_REASONS["MEMORY_FAULT"]

    def fields(self) -> Dict[str, object]:
        m = self.run.memory_fault
        return {"flags": m.flags, "gpa": m.gpa, "size": m.size}


class Notify(Exit):
    __slots__ = ()
    reason = abi.EXIT_REASONS["NOTIFY"]


class IoapicEoi(Exit):
    __slots__ = ()
    reason = abi.EXIT_REASONS["IOAPIC_EOI"]


class DirtyRingFull(Exit):
    """KVM_EXIT_DIRTY_RING_FULL (api.rst 8.29): this vCPU's dirty ring reached its soft limit,
    and KVM_RUN will keep returning this exit until the ring has room. Harvest it
    (:meth:`pykvm.vcpu.DirtyRing.harvest`, or :meth:`pykvm.vm.Vm.harvest_dirty_rings` for every
    vCPU) and reset (:meth:`pykvm.vm.Vm.reset_dirty_rings`), then run the vCPU again. No
    fields."""
    __slots__ = ()
    reason = abi.EXIT_REASONS["DIRTY_RING_FULL"]


_CLASSES: Dict[int, Type[Exit]] = {
    c.reason: c for c in (Unknown, Io, Mmio, Hlt, Shutdown, Intr, IrqWindowOpen, Nmi, Exception_,
                          FailEntry, InternalError, SystemEvent, Debug, Hypercall, X86Rdmsr,
                          X86Wrmsr, RiscvSbi, RiscvCsr, MemoryFault, Notify, IoapicEoi,
                          DirtyRingFull)
}
for _c in _CLASSES.values():
    # a plain class attribute that shadows Exit.name (the property): no lookup per access
    _c.name = abi.EXIT_NAMES[_c.reason]  # type: ignore[method-assign, assignment]
del _c


_EFAULT = 14
_EXIT_MEMORY_FAULT = abi.EXIT_REASONS["MEMORY_FAULT"]


def kvm_run_error(vcpu: VcpuView, err: int) -> KvmError:
    """The exception for KVM_RUN on ``vcpu`` failing with errno ``err``: EFAULT is the host
    failing to back guest RAM (:class:`~pykvm.errors.GuestRamUnbacked`, with the GPA when KVM
    filled in ``kvm_run.memory_fault``, KVM_CAP_MEMORY_FAULT_INFO), anything else the
    :class:`~pykvm.errors.KvmError` for that errno."""
    what = f"vcpu {vcpu.id}"
    if err == _EFAULT:
        gpa = None
        try:
            run = vcpu.run_struct
            if run.exit_reason == _EXIT_MEMORY_FAULT:
                gpa = int(run.memory_fault.gpa)
        except Exception:                      # noqa: BLE001 — a closed vCPU: no GPA
            pass
        return GuestRamUnbacked("KVM_RUN", err, what, gpa=gpa)
    return kvm_error("KVM_RUN", err, what)


def decode_exit(vcpu: VcpuView) -> Exit:
    """The typed exit for what the vCPU's kvm_run page holds now."""
    return _CLASSES.get(vcpu.run_struct.exit_reason, Exit)(vcpu)


class ExitCache:
    """Exit objects of one vCPU, one per exit reason, refilled for each new exit unless
    somebody still holds the previous one (then a new object takes its place in the cache)."""

    __slots__ = ("vcpu", "_by_reason")

    def __init__(self, vcpu: VcpuView):
        self.vcpu = vcpu
        self._by_reason: Dict[int, Exit] = {}

    def get(self, reason: int) -> Exit:
        """The exit for the vCPU's current kvm_run, whose exit reason is ``reason``."""
        ex = self._by_reason.get(reason)
        if ex is None or _refs(ex) > 3:        # the cache, `ex` and getrefcount's argument
            ex = self._by_reason[reason] = new_exit(self.vcpu, reason)
        ex._seq = self.vcpu._rs.seq
        ex._decoded = False
        return ex


def new_exit(vcpu: VcpuView, reason: int) -> Exit:
    """A blank exit object of the class for ``reason`` (its run sequence number, and any fields
    decoded ahead, are filled in by whoever hands it out)."""
    cls = _CLASSES.get(reason, Exit)
    ex = cls.__new__(cls)
    ex._vcpu = vcpu
    ex._rs = vcpu._rs
    ex._reason = reason
    return ex
