"""RISC-V vCPU and VM state capture and load for snapshots and resets, as an
:class:`~pykvm.arch.snapstate.ArchState`.

RISC-V KVM holds a vCPU's state in ONE_REG registers (api.rst 4.68 KVM_SET_ONE_REG lists the
RISC-V ids) and its multiprocessing state. vCPU blobs, in load order:

* ``one_reg``: every register of KVM_GET_REG_LIST that this vCPU reads and takes back
  (core, CSR, FP, vector, SBI state ...),
  then the timer registers ``time``, ``compare``, ``state`` in that order (as
  QEMU's ``kvm_riscv_put_regs_timer``; ``frequency`` is read-only; ``state`` is loaded
  only when ON: KVM refuses OFF with EINVAL, so a timer armed now stays armed). Encoded as
  a run of records: the register id (8 bytes, little-endian) followed by its
  value (``1 << size field`` bytes, as KVM exchanges it).
* ``mp_state``: KVM_GET/SET_MP_STATE, ``struct kvm_mp_state`` (STOPPED or RUNNABLE).
* ``fixed_regs``: the config, ISA-extension and SBI-extension registers, which KVM fixes once
  the vCPU has run (EBUSY): the vCPU's configuration, set by the machine when it makes the
  vCPU. Compared with the loading vCPU's (another value is a foreign snapshot), not loaded.

The VM has no state of its own without an irqchip; a machine with the in-kernel AIA irqchip
is refused by the machine's snapshot (its APLIC/IMSIC attributes are not captured here), so
the VM state records ``aia`` absent.

Functions raise :class:`~pykvm.errors.KvmError` where KVM refuses and
:class:`~pykvm.errors.SnapshotError` for a state that does not fit the vCPU.
"""
from __future__ import annotations

from ... import abi
from ..._ioctl import ioctl
from ...abi import ffi, ioctls
from ...errors import KvmError, SnapshotError
from ..snapstate import ArchState
from . import regs as _regs

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, List, Optional, Tuple

_TYPE_SHIFT = 24
_TYPE_MASK = 0xFF << _TYPE_SHIFT
_TIMER_ORDER = ("time", "compare", "state")
# register types KVM fixes once the vCPU first runs (EBUSY after): the vCPU's configuration,
# which the machine sets when it makes the vCPU (cpu type, SBI extensions)
_FIXED_TYPES = (_regs.TYPE_CONFIG, _regs.TYPE_ISA_EXT, _regs.TYPE_SBI_EXT)
VCPU_BLOBS = ("one_reg", "mp_state")
VM_BLOBS: Tuple[str, ...] = ()


def _reg_type(reg_id: int) -> int:
    return (reg_id & _TYPE_MASK) >> _TYPE_SHIFT


def _timer_id(name: str) -> int:
    return _regs.reg_id(f"timer.{name}")


class _Plan:
    """The register ids a VM's vCPUs capture, in load order (worked out once per VM)."""

    def __init__(self, vcpu: Any):
        timers = {_timer_id(n): n for n in _TIMER_ORDER}
        ids: List[int] = []
        one = ffi.new("struct kvm_one_reg *")
        fixed: List[int] = []
        for rid in vcpu.reg_list():
            if _reg_type(rid) == _regs.TYPE_TIMER:
                continue                       # added below, in their order
            if _reg_type(rid) in _FIXED_TYPES:
                fixed.append(rid)              # set when the vCPU is made: compared, not loaded
                continue
            n = abi.reg_size_bytes(rid)
            buf = ffi.new("uint8_t[]", n)
            one.id, one.addr = rid, int(ffi.cast("uintptr_t", buf))
            try:                               # read it and write its own value back
                ioctl(vcpu.fd, ioctls.KVM_GET_ONE_REG, one)
                ioctl(vcpu.fd, ioctls.KVM_SET_ONE_REG, one)
            except KvmError:
                continue                       # read-only here (or not readable): not state
            ids.append(rid)
        ids.extend(t for t in timers)
        self.ids: Tuple[int, ...] = tuple(ids)
        self.fixed: Tuple[int, ...] = tuple(fixed)
        self.timer_state = _timer_id("state")
        self.size = sum(8 + abi.reg_size_bytes(r) for r in self.ids)
        self.buf = ffi.new("uint8_t[]", max(abi.reg_size_bytes(r) for r in self.ids + self.fixed))
        self.one = ffi.new("struct kvm_one_reg *")
        self.one.addr = int(ffi.cast("uintptr_t", self.buf))


def _plan(vcpu: Any) -> _Plan:
    vm = vcpu.vm
    p = getattr(vm, "_snapshot_plan", None)
    if p is None:
        p = vm._snapshot_plan = _Plan(vcpu)
    return p


def save_vcpu_state(vcpu: Any) -> ArchState:
    """Capture ``vcpu``'s registers and MP state (module docstring). Call it while the vCPU is
    not running. Raises :class:`~pykvm.errors.KvmError` if KVM refuses a read."""
    p = _plan(vcpu)
    mp = ffi.new("struct kvm_mp_state *")
    ioctl(vcpu.fd, ioctls.KVM_GET_MP_STATE, mp)
    return ArchState({"one_reg": _read_regs(vcpu, p, p.ids),
                      "mp_state": bytes(ffi.buffer(mp)),
                      "fixed_regs": _read_regs(vcpu, p, p.fixed)},
                     {"nested": "RISC-V KVM has no nested state"})


def _read_regs(vcpu: Any, p: _Plan, ids: Tuple[int, ...]) -> bytes:
    fd = vcpu.fd
    out = bytearray()
    one, buf = p.one, p.buf
    for rid in ids:
        n = abi.reg_size_bytes(rid)
        one.id = rid
        ioctl(fd, ioctls.KVM_GET_ONE_REG, one, what=f"{rid:#x}")
        out += rid.to_bytes(8, "little")
        out += ffi.buffer(buf, n)
    return bytes(out)


def parse_one_reg(blob: bytes) -> List[Tuple[int, bytes]]:
    """The (register id, value bytes) records of a ``one_reg`` blob. Raises
    :class:`~pykvm.errors.SnapshotError` for a truncated record or a size field above 256
    bytes."""
    out: List[Tuple[int, bytes]] = []
    i = 0
    while i < len(blob):
        if i + 8 > len(blob):
            raise SnapshotError(f"ONE_REG record at byte {i} is truncated")
        rid = int.from_bytes(blob[i:i + 8], "little")
        n = abi.reg_size_bytes(rid)
        if n > 256 or i + 8 + n > len(blob):
            raise SnapshotError(f"ONE_REG record {rid:#x} at byte {i} is truncated or too large")
        out.append((rid, bytes(blob[i + 8:i + 8 + n])))
        i += 8 + n
    return out


def check_vcpu_state(vcpu: Any, state: ArchState) -> None:
    """Raise :class:`~pykvm.errors.SnapshotError` unless ``state`` holds exactly the registers
    this vCPU captures, in its order, and an MP state (touches nothing)."""
    p = _plan(vcpu)
    if "one_reg" not in state or "mp_state" not in state:
        raise SnapshotError(f"vCPU {vcpu.id} state lacks its registers or MP state")
    ids = tuple(r for r, _ in parse_one_reg(state["one_reg"]))
    if ids != p.ids:
        missing = sorted(set(p.ids) - set(ids))
        extra = sorted(set(ids) - set(p.ids))
        raise SnapshotError(f"vCPU {vcpu.id} registers differ from this vCPU's: "
                            f"{len(missing)} missing ({', '.join(hex(r) for r in missing[:3])}), "
                            f"{len(extra)} unknown ({', '.join(hex(r) for r in extra[:3])})")
    if len(state["mp_state"]) != ffi.sizeof("struct kvm_mp_state"):
        raise SnapshotError(f"vCPU {vcpu.id} MP state is {len(state['mp_state'])} bytes")
    fixed = state.get("fixed_regs")
    if fixed is not None:
        here = dict(parse_one_reg(_read_regs(vcpu, p, p.fixed)))
        for rid, value in parse_one_reg(fixed):
            if here.get(rid) != value:
                raise SnapshotError(f"vCPU {vcpu.id} was made with another configuration: "
                                    f"register {_regs.decode(rid).name} "
                                    "differs (cpu type, ISA or SBI extensions)")


def load_vcpu_state(vcpu: Any, state: ArchState) -> None:
    """Load ``state`` (from :func:`save_vcpu_state`) into ``vcpu``: its registers in order,
    then the MP state. Raises :class:`~pykvm.errors.SnapshotError` for a state that does not
    fit and :class:`~pykvm.errors.KvmError` when KVM refuses a register."""
    check_vcpu_state(vcpu, state)
    p = _plan(vcpu)
    fd = vcpu.fd
    one, buf = p.one, p.buf
    for rid, raw in parse_one_reg(state["one_reg"]):
        if rid == p.timer_state and not any(raw):
            continue      # KVM refuses timer.state OFF (EINVAL); a new vCPU's timer is off
        ffi.memmove(buf, raw, len(raw))
        one.id = rid
        ioctl(fd, ioctls.KVM_SET_ONE_REG, one, what=f"vcpu {vcpu.id} reg {rid:#x}")
    mp = ffi.new("struct kvm_mp_state *")
    ffi.memmove(mp, state["mp_state"], len(state["mp_state"]))
    ioctl(fd, ioctls.KVM_SET_MP_STATE, mp, what=f"vcpu {vcpu.id}")


def save_vm_state(vm: Any) -> ArchState:
    """The VM's own state: none without an irqchip (module docstring)."""
    return ArchState({}, {"aia": "no VM-wide state is captured on RISC-V (a machine with the "
                                 "AIA irqchip is refused)"})


def check_vm_state(vm: Any, state: ArchState) -> None:
    """Raise :class:`~pykvm.errors.SnapshotError` for a VM state with pieces RISC-V lacks."""
    for name in state:
        raise SnapshotError(f"VM state has a piece {name!r} a RISC-V VM does not have")


def load_vm_state(vm: Any, state: ArchState) -> None:
    """Load a VM state of :func:`save_vm_state` (nothing to load; checked)."""
    check_vm_state(vm, state)


# -- the host identity a snapshot records (pykvm.snapshot) ---------------------------------------

CPUID_REQUIRED = False               # RISC-V has no CPUID; the ISA registers travel as ONE_REG


def host_vendor(kvm: Any) -> str:
    """"riscv64": a RISC-V snapshot is checked register by register (the config and ISA
    registers are compared on restore), not by a vendor string."""
    return "riscv64"


def cpuid_mismatch(entries: List[Tuple[int, ...]], kvm: Any, vendor: str) -> str:
    """"": RISC-V has no CPUID table to check."""
    return ""


class VcpuSnapshot:
    """``save_state()`` / ``load_state()`` on :class:`pykvm.vcpu.Vcpu` (RISC-V)."""

    def load_rows(self, state: ArchState) -> Optional[List[Any]]:
        """None: a RISC-V state loads through :meth:`load_state` only (its ONE_REG writes are
        one ioctl per register; no prepared fast path)."""
        return None

    def save_state(self) -> ArchState:
        """:func:`save_vcpu_state` of this vCPU."""
        return save_vcpu_state(self)

    def load_state(self, state: ArchState) -> None:
        """:func:`load_vcpu_state` into this vCPU."""
        load_vcpu_state(self, state)

    def check_state(self, state: ArchState) -> None:
        """:func:`check_vcpu_state`: raise SnapshotError unless ``state`` fits this vCPU."""
        check_vcpu_state(self, state)


class VmSnapshot:
    """``save_state()`` / ``load_state()`` on :class:`pykvm.vm.Vm` (RISC-V)."""

    def load_rows(self, state: ArchState) -> Optional[List[Any]]:
        """None: as :meth:`VcpuSnapshot.load_rows`."""
        return None

    def save_state(self) -> ArchState:
        """:func:`save_vm_state` of this VM."""
        return save_vm_state(self)

    def load_state(self, state: ArchState) -> None:
        """:func:`load_vm_state` into this VM."""
        load_vm_state(self, state)

    def check_state(self, state: ArchState) -> None:
        """:func:`check_vm_state`: raise SnapshotError unless ``state`` fits this VM."""
        check_vm_state(self, state)
