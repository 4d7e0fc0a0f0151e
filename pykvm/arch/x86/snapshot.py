"""x86 vCPU and VM state capture and load for snapshots and resets: every piece of
architectural state KVM holds for a vCPU and for the VM, as an
:class:`~pykvm.arch.snapstate.ArchState` of raw uAPI structures.

vCPU blobs (Linux ``Documentation/virt/kvm/api.rst`` names each ioctl), in load order:

==============  =====================================================================
``sregs2``      KVM_GET/SET_SREGS2, ``struct kvm_sregs2`` (``sregs``, ``struct
                kvm_sregs``, where KVM_CAP_SREGS2 is missing)
``nested``      KVM_GET/SET_NESTED_STATE, ``struct kvm_nested_state`` and its data
                (only where KVM_CAP_NESTED_STATE > 0; else recorded absent); after the
                special registers, whose EFER.SVME KVM requires for an SVM guest-mode
                state (QEMU's kvm_arch_put_registers orders them so too)
``regs``        KVM_GET/SET_REGS, ``struct kvm_regs``
``xsave``       KVM_GET_XSAVE2 (or KVM_GET_XSAVE) / KVM_SET_XSAVE, the XSAVE area
                (``fpu``, ``struct kvm_fpu``, without KVM_CAP_XSAVE)
``xcrs``        KVM_GET/SET_XCRS, ``struct kvm_xcrs`` (where KVM_CAP_XCRS)
``lapic``       KVM_GET/SET_LAPIC, the 1024-byte register page (with the in-kernel irqchip)
``msrs``        KVM_GET/SET_MSRS, an array of ``struct kvm_msr_entry`` (16 bytes each:
                index u32, reserved u32, data u64) over every MSR of
                KVM_GET_MSR_INDEX_LIST this vCPU can read and KVM takes back (some are
                read-only for the vCPU's CPUID), IA32_TSC_DEADLINE last (after the
                LAPIC, whose load re-arms the timer, as QEMU orders it)
``debugregs``   KVM_GET/SET_DEBUGREGS, ``struct kvm_debugregs``
``events``      KVM_GET/SET_VCPU_EVENTS, ``struct kvm_vcpu_events`` (loaded with
                NMI_PENDING and SIPI_VECTOR flagged valid too)
``mp_state``    KVM_GET/SET_MP_STATE, ``struct kvm_mp_state``
==============  =====================================================================

The vCPU's CPUID (``cpuid``: KVM_GET_CPUID2's entries, ``struct kvm_cpuid_entry2`` each) is
captured but not loaded: it is fixed when the vCPU is made, and a machine restoring a state
compares it instead (another CPUID is a foreign snapshot).

VM blobs: ``pic_master``, ``pic_slave``, ``ioapic`` (KVM_GET/SET_IRQCHIP, ``struct
kvm_irqchip``; with the in-kernel irqchip), ``pit2`` (KVM_GET/SET_PIT2, ``struct
kvm_pit_state2``; with the in-kernel PIT), ``clock`` (KVM_GET/SET_CLOCK, ``struct
kvm_clock_data``; loaded last, the kvm-clock value alone).

Loading reuses cffi buffers kept on the vCPU/VM and the MSR list worked out once per VM
(:func:`msr_indices`), so that a reset can load a state many times cheaply. Every function
raises :class:`~pykvm.errors.KvmError` naming the ioctl where KVM refuses, and
:class:`~pykvm.errors.SnapshotError` for a state that does not fit this vCPU or VM (a blob of
the wrong size, an MSR KVM would not take back).
"""
from __future__ import annotations

import errno

from ... import abi
from ..._ioctl import check_extension, ioctl
from ...abi import ffi, ioctls
from ...errors import KvmError, SnapshotError
from ..snapstate import ArchState

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Dict, List, Optional, Tuple

    # One prepared SET ioctl of a state load: (fd, uAPI request number, argument buffer (cffi;
    # the caller keeps it alive), the return value expected (-1: any non-negative), a name for
    # errors)
    LoadRow = Tuple[int, int, Any, int, str]

_arch = abi.arch
MSR_IA32_TSC = 0x10
MSR_IA32_TSC_DEADLINE = 0x6E0
_MSR_ENTRY = ffi.sizeof("struct kvm_msr_entry")
_XSAVE_BASE = 4096
_EVENTS_LOAD_FLAGS = _arch.VCPUEVENT_VALID["NMI_PENDING"] | _arch.VCPUEVENT_VALID["SIPI_VECTOR"]
IRQCHIPS = (("pic_master", abi.IRQCHIP_PIC_MASTER), ("pic_slave", abi.IRQCHIP_PIC_SLAVE),
            ("ioapic", abi.IRQCHIP_IOAPIC))
_NESTED_HDR = ffi.sizeof("struct kvm_nested_state")

# the fixed-size structures: blob name -> (C type, GET row, SET row)
_FIXED = {
    "sregs2": ("struct kvm_sregs2", ioctls.KVM_GET_SREGS2, ioctls.KVM_SET_SREGS2),
    "sregs": ("struct kvm_sregs", ioctls.KVM_GET_SREGS, ioctls.KVM_SET_SREGS),
    "regs": ("struct kvm_regs", ioctls.KVM_GET_REGS, ioctls.KVM_SET_REGS),
    "fpu": ("struct kvm_fpu", ioctls.KVM_GET_FPU, ioctls.KVM_SET_FPU),
    "xcrs": ("struct kvm_xcrs", ioctls.KVM_GET_XCRS, ioctls.KVM_SET_XCRS),
    "lapic": ("struct kvm_lapic_state", ioctls.KVM_GET_LAPIC, ioctls.KVM_SET_LAPIC),
    "debugregs": ("struct kvm_debugregs", ioctls.KVM_GET_DEBUGREGS, ioctls.KVM_SET_DEBUGREGS),
    "events": ("struct kvm_vcpu_events", ioctls.KVM_GET_VCPU_EVENTS, ioctls.KVM_SET_VCPU_EVENTS),
    "mp_state": ("struct kvm_mp_state", ioctls.KVM_GET_MP_STATE, ioctls.KVM_SET_MP_STATE),
}
_VCPU_ORDER = ("sregs2", "sregs", "nested", "regs", "xsave", "fpu", "xcrs", "lapic", "msrs",
               "debugregs", "events", "mp_state")
_VM_ORDER = ("pic_master", "pic_slave", "ioapic", "pit2", "clock")
VCPU_BLOBS = _VCPU_ORDER + ("cpuid",)
VM_BLOBS = _VM_ORDER


class _Plan:
    """What one VM's vCPUs capture, worked out once per VM (capabilities, the MSR list)."""

    def __init__(self, vcpu: Any):
        vm = vcpu.vm
        self.nested = check_extension(vm.kvm.fd, "NESTED_STATE")
        self.sregs = "sregs2" if check_extension(vm.fd, "SREGS2") else "sregs"
        xsave2 = check_extension(vm.fd, "XSAVE2")
        self.xsave_size = max(xsave2, _XSAVE_BASE) if xsave2 > 0 else (
            _XSAVE_BASE if check_extension(vm.fd, "XSAVE") else 0)
        self.xcrs = bool(check_extension(vm.fd, "XCRS"))
        self.lapic = _has_lapic(vcpu)
        self.msrs = _readable_msrs(vcpu, vm.kvm.msr_index_list())


def _has_lapic(vcpu: Any) -> bool:
    s = ffi.new("struct kvm_lapic_state *")
    try:
        ioctl(vcpu.fd, ioctls.KVM_GET_LAPIC, s)
    except KvmError as e:        # ENXIO (or EINVAL on some hosts): no in-kernel irqchip
        if e.errno not in (errno.ENXIO, errno.EINVAL):
            raise
        return False
    return True


def _readable_msrs(vcpu: Any, indices: List[int]) -> Tuple[int, ...]:
    """The MSRs of ``indices`` KVM_GET_MSRS reads for this vCPU (KVM stops at the first it
    cannot read and says how many it did: drop that one and go on), TSC_DEADLINE last."""
    left = list(indices)
    good: List[int] = []
    while left:
        m = ffi.new("struct kvm_msrs *", {"entries": len(left)})
        m.nmsrs = len(left)
        for i, x in enumerate(left):
            m.entries[i].index = x
        got = ioctl(vcpu.fd, ioctls.KVM_GET_MSRS, m, what=f"{len(left)} MSRs")
        good.extend(left[:got])
        left = left[got + 1:]                # skip the one KVM could not read
    # keep those KVM also takes back: write each its own value (no change to the vCPU; the
    # TSC and the TSC deadline are always writable and are not touched here)
    back: List[int] = []
    one = ffi.new("struct kvm_msrs *", {"entries": 1})
    one.nmsrs = 1
    for x in good:
        if x in (MSR_IA32_TSC, MSR_IA32_TSC_DEADLINE):
            back.append(x)
            continue
        one.entries[0].index = x
        if ioctl(vcpu.fd, ioctls.KVM_GET_MSRS, one) == 1 and \
                ioctl(vcpu.fd, ioctls.KVM_SET_MSRS, one) == 1:
            back.append(x)
    back.sort(key=lambda x: x == MSR_IA32_TSC_DEADLINE)
    return tuple(back)


def _plan(vcpu: Any) -> _Plan:
    vm = vcpu.vm
    p = getattr(vm, "_snapshot_plan", None)
    if p is None:
        p = _Plan(vcpu)
        vm._snapshot_plan = p
    return p


def msr_indices(vcpu: Any) -> Tuple[int, ...]:
    """The MSR indices a state of ``vcpu`` holds (every MSR of KVM_GET_MSR_INDEX_LIST this
    vCPU can read, IA32_TSC_DEADLINE last), worked out on first use and kept for the VM."""
    return _plan(vcpu).msrs


def _bufs(obj: Any) -> Dict[str, Any]:
    b = getattr(obj, "_snapshot_bufs", None)
    if b is None:
        b = {}
        obj._snapshot_bufs = b
    return b


def _buf(obj: Any, name: str, ctype: str, init: Any = None) -> Any:
    b = _bufs(obj)
    x = b.get(name)
    if x is None:
        x = b[name] = ffi.new(ctype + " *", init) if init is not None else ffi.new(ctype + " *")
    return x


def _msr_buf(vcpu: Any, indices: Tuple[int, ...]) -> Any:
    b = _bufs(vcpu)
    m = b.get("msrs")
    if m is None or len(m.entries) != len(indices):
        m = b["msrs"] = ffi.new("struct kvm_msrs *", {"entries": max(len(indices), 1)})
    return m


def _xsave_buf(vcpu: Any, size: int) -> Any:
    b = _bufs(vcpu)
    x = b.get("xsave")
    if x is None or b.get("xsave_size") != size:
        x = b["xsave"] = ffi.new("struct kvm_xsave *", {"extra": (size - _XSAVE_BASE) // 4 or 1})
        b["xsave_size"] = size
    return x


# -- vCPU -------------------------------------------------------------------------------------

def save_vcpu_state(vcpu: Any) -> ArchState:
    """Capture every piece of ``vcpu``'s architectural state KVM holds (module docstring) as an
    :class:`~pykvm.arch.snapstate.ArchState`. Call it while the vCPU is not running (between
    runs, or from the vCPU's own thread). Raises :class:`~pykvm.errors.KvmError` if KVM
    refuses a read, :class:`~pykvm.errors.Busy` while another thread runs the vCPU."""
    p = _plan(vcpu)
    fd = vcpu.fd
    blobs: Dict[str, bytes] = {}
    absent: Dict[str, str] = {}
    if p.nested > 0:
        blobs["nested"] = _get_nested(vcpu, p.nested)
    else:
        absent["nested"] = "KVM_CAP_NESTED_STATE is 0 on this host"
    names = [p.sregs, "regs"]
    for name in names:
        _get_fixed(fd, vcpu, name, blobs)
    if p.xsave_size:
        x = _xsave_buf(vcpu, p.xsave_size)
        row = ioctls.KVM_GET_XSAVE2 if p.xsave_size > _XSAVE_BASE or \
            check_extension(vcpu.vm.fd, "XSAVE2") > 0 else ioctls.KVM_GET_XSAVE
        ioctl(fd, row, x)
        blobs["xsave"] = bytes(ffi.buffer(x, p.xsave_size))
    else:
        absent["xsave"] = "KVM_CAP_XSAVE is missing (the x87/SSE state is in fpu)"
        _get_fixed(fd, vcpu, "fpu", blobs)
    if p.xcrs:
        _get_fixed(fd, vcpu, "xcrs", blobs)
    else:
        absent["xcrs"] = "KVM_CAP_XCRS is missing"
    if p.lapic:
        _get_fixed(fd, vcpu, "lapic", blobs)
    else:
        absent["lapic"] = "no in-kernel irqchip"
    m = _msr_buf(vcpu, p.msrs)
    m.nmsrs = len(p.msrs)
    for i, x in enumerate(p.msrs):
        m.entries[i].index = x
    got = ioctl(fd, ioctls.KVM_GET_MSRS, m, what=f"{len(p.msrs)} MSRs")
    if got != len(p.msrs):
        raise SnapshotError(f"vCPU {vcpu.id}: KVM_GET_MSRS read {got} of {len(p.msrs)} MSRs "
                            f"(stopped at MSR {p.msrs[got]:#x})")
    blobs["msrs"] = bytes(ffi.buffer(m.entries, len(p.msrs) * _MSR_ENTRY))
    for name in ("debugregs", "events", "mp_state"):
        _get_fixed(fd, vcpu, name, blobs)
    blobs["cpuid"] = _get_cpuid(vcpu)
    return ArchState(blobs, absent)


def _get_fixed(fd: int, vcpu: Any, name: str, blobs: Dict[str, bytes]) -> None:
    ctype, get, _ = _FIXED[name]
    x = _buf(vcpu, name, ctype)
    ioctl(fd, get, x)
    blobs[name] = bytes(ffi.buffer(x))


def _get_nested(vcpu: Any, max_size: int) -> bytes:
    size = max(max_size, _NESTED_HDR)
    buf = bytearray(size)
    s = ffi.from_buffer("struct kvm_nested_state *", buf)
    s.size = size
    ioctl(vcpu.fd, ioctls.KVM_GET_NESTED_STATE, s, what=f"size={size}")
    return bytes(buf[:max(int(s.size), _NESTED_HDR)])


def _get_cpuid(vcpu: Any) -> bytes:
    entries = vcpu.get_cpuid()
    c = ffi.new("struct kvm_cpuid2 *", {"entries": max(len(entries), 1)})
    c.nent = len(entries)
    for i, e in enumerate(entries):
        d = c.entries[i]
        d.function, d.index, d.flags, d.eax, d.ebx, d.ecx, d.edx = e
    return bytes(ffi.buffer(c.entries, len(entries) * ffi.sizeof("struct kvm_cpuid_entry2")))


def check_vcpu_state(vcpu: Any, state: ArchState) -> None:
    """Raise :class:`~pykvm.errors.SnapshotError` (one line) unless ``state`` fits ``vcpu``:
    every blob this vCPU loads is there with its structure's size, the MSR list is the one
    this VM captures. Touches no vCPU state."""
    p = _plan(vcpu)
    want = [p.sregs, "regs", "debugregs", "events", "mp_state", "msrs"]
    want.append("xsave" if p.xsave_size else "fpu")
    if p.xcrs:
        want.append("xcrs")
    if p.lapic:
        want.append("lapic")
    if p.nested > 0 and "nested" in state:
        want.append("nested")
    for name in want:
        if name not in state:
            raise SnapshotError(f"vCPU {vcpu.id} state lacks {name!r}, which this vCPU has")
    for name, blob in state.items():
        if name in _FIXED and len(blob) != ffi.sizeof(_FIXED[name][0]):
            raise SnapshotError(f"vCPU {vcpu.id} state {name!r} is {len(blob)} bytes, not "
                                f"{ffi.sizeof(_FIXED[name][0])}")
    if p.xsave_size and len(state["xsave"]) != p.xsave_size:
        raise SnapshotError(f"vCPU {vcpu.id} XSAVE area is {len(state['xsave'])} bytes; this "
                            f"KVM's is {p.xsave_size}")
    msrs = state["msrs"]
    if len(msrs) % _MSR_ENTRY:
        raise SnapshotError(f"vCPU {vcpu.id} MSR blob is {len(msrs)} bytes, not a multiple of "
                            f"{_MSR_ENTRY}")


def _vcpu_sets(vcpu: Any, state: ArchState) -> List[Tuple[int, Any, Any, int, str]]:
    """The SET ioctls that load ``state`` into ``vcpu``, in the module docstring's order and
    with its adjustments (vCPU events also load the NMI and SIPI fields), each argument in a
    fresh buffer: (fd, ioctl row, buffer, the count it must return or -1, what it sets). The
    one place that builds them, for :func:`load_vcpu_state` and :func:`vcpu_load_rows`."""
    sets = []
    for name in _VCPU_ORDER:
        blob = state.get(name)
        if blob is None:
            continue
        what = f"vCPU {vcpu.id}"
        if name in _FIXED:
            ctype, _get, op = _FIXED[name]
            buf = _new(ctype, blob)
            if name == "events":
                buf.flags |= _EVENTS_LOAD_FLAGS
            sets.append((vcpu.fd, op, buf, -1, what))
        elif name == "xsave":
            extra = (len(blob) - _XSAVE_BASE) // 4 or 1
            sets.append((vcpu.fd, ioctls.KVM_SET_XSAVE,
                         _new("struct kvm_xsave", blob, {"extra": extra}), -1, what))
        elif name == "msrs":
            n = len(blob) // _MSR_ENTRY
            buf = ffi.new("struct kvm_msrs *", {"entries": max(n, 1)})
            buf.nmsrs = n
            ffi.memmove(buf.entries, blob, len(blob))
            sets.append((vcpu.fd, ioctls.KVM_SET_MSRS, buf, n, f"{what}, {n} MSRs"))
        elif name == "nested":
            buf = ffi.from_buffer("struct kvm_nested_state *", bytearray(blob))
            sets.append((vcpu.fd, ioctls.KVM_SET_NESTED_STATE, buf, -1,
                         f"{what}, size={len(blob)}"))
    return sets


def load_vcpu_state(vcpu: Any, state: ArchState) -> None:
    """Load ``state`` (from :func:`save_vcpu_state` of a vCPU of the same kind) into ``vcpu``,
    in the module docstring's order. Checks it first (:func:`check_vcpu_state`). Raises
    :class:`~pykvm.errors.SnapshotError` for a state that does not fit or an MSR KVM does not
    take back, :class:`~pykvm.errors.KvmError` when KVM refuses a piece."""
    check_vcpu_state(vcpu, state)
    for fd, op, buf, expect, what in _vcpu_sets(vcpu, state):
        got = ioctl(fd, op, buf, what=what)
        if expect >= 0 and got != expect:
            bad = buf.entries[got]
            raise SnapshotError(f"vCPU {vcpu.id}: KVM refused MSR {int(bad.index):#x} = "
                                f"{int(bad.data):#x} ({got} of {expect} MSRs loaded)")


def cpuid_entries(blob: bytes) -> List[Tuple[int, ...]]:
    """The (function, index, flags, eax, ebx, ecx, edx) tuples of a ``cpuid`` blob. Raises
    :class:`~pykvm.errors.SnapshotError` for a blob that is not whole entries."""
    size = ffi.sizeof("struct kvm_cpuid_entry2")
    if len(blob) % size:
        raise SnapshotError(f"a CPUID blob of {len(blob)} bytes is not whole {size}-byte entries")
    arr = ffi.from_buffer("struct kvm_cpuid_entry2[]", bytearray(blob))
    return [(int(e.function), int(e.index), int(e.flags), int(e.eax), int(e.ebx), int(e.ecx),
             int(e.edx)) for e in arr]


# -- VM ---------------------------------------------------------------------------------------

def save_vm_state(vm: Any) -> ArchState:
    """Capture the VM-wide state KVM holds (module docstring): the PICs and IOAPIC where the VM
    has the in-kernel irqchip, the PIT where it has the in-kernel PIT, the kvm-clock. Call it
    with every vCPU stopped. Raises :class:`~pykvm.errors.KvmError` if KVM refuses a read."""
    blobs: Dict[str, bytes] = {}
    absent: Dict[str, str] = {}
    fd = vm.fd
    for name, chip in IRQCHIPS:
        c = _buf(vm, name, "struct kvm_irqchip")
        c.chip_id = chip
        try:
            ioctl(fd, ioctls.KVM_GET_IRQCHIP, c, what=name)
        except KvmError as e:               # ENXIO: no in-kernel irqchip
            if e.errno not in (errno.ENXIO, errno.EINVAL):
                raise
            absent[name] = "no in-kernel irqchip"
            continue
        blobs[name] = bytes(ffi.buffer(c))
    p = _buf(vm, "pit2", "struct kvm_pit_state2")
    try:
        ioctl(fd, ioctls.KVM_GET_PIT2, p)
        blobs["pit2"] = bytes(ffi.buffer(p))
    except KvmError as e:                   # ENXIO: no in-kernel PIT
        if e.errno not in (errno.ENXIO, errno.EINVAL):
            raise
        absent["pit2"] = "no in-kernel PIT"
    d = _buf(vm, "clock", "struct kvm_clock_data")
    ioctl(fd, ioctls.KVM_GET_CLOCK, d)
    blobs["clock"] = bytes(ffi.buffer(d))
    return ArchState(blobs, absent)


def check_vm_state(vm: Any, state: ArchState) -> None:
    """Raise :class:`~pykvm.errors.SnapshotError` unless every blob of ``state`` has its
    structure's size (touches nothing)."""
    sizes = {"pit2": ffi.sizeof("struct kvm_pit_state2"),
             "clock": ffi.sizeof("struct kvm_clock_data")}
    for name, _ in IRQCHIPS:
        sizes[name] = ffi.sizeof("struct kvm_irqchip")
    for name, blob in state.items():
        if name not in sizes:
            raise SnapshotError(f"VM state has an unknown piece {name!r}")
        if len(blob) != sizes[name]:
            raise SnapshotError(f"VM state {name!r} is {len(blob)} bytes, not {sizes[name]}")
    if "clock" not in state:
        raise SnapshotError("VM state lacks the kvm-clock")


def _vm_sets(vm: Any, state: ArchState) -> List[Tuple[int, Any, Any, int, str]]:
    """The SET ioctls that load ``state`` into ``vm`` (irqchips, PIT, then the kvm-clock with
    no flags), as :func:`_vcpu_sets` gives a vCPU's."""
    sets = []
    for name, chip in IRQCHIPS:
        blob = state.get(name)
        if blob is None:
            continue
        buf = _new("struct kvm_irqchip", blob)
        buf.chip_id = chip
        sets.append((vm.fd, ioctls.KVM_SET_IRQCHIP, buf, -1, name))
    blob = state.get("pit2")
    if blob is not None:
        sets.append((vm.fd, ioctls.KVM_SET_PIT2, _new("struct kvm_pit_state2", blob), -1, "pit2"))
    saved = ffi.from_buffer("struct kvm_clock_data *", bytearray(state["clock"]))
    clock = ffi.new("struct kvm_clock_data *")
    clock.clock, clock.flags = saved.clock, 0
    sets.append((vm.fd, ioctls.KVM_SET_CLOCK, clock, -1, f"clock={int(saved.clock)}"))
    return sets


def load_vm_state(vm: Any, state: ArchState) -> None:
    """Load ``state`` (from :func:`save_vm_state`) into ``vm``: irqchip, PIT, then the
    kvm-clock. The VM must have the same in-kernel devices (irqchip, PIT) the state has.
    Raises :class:`~pykvm.errors.SnapshotError` for a state that does not fit and
    :class:`~pykvm.errors.KvmError` when KVM refuses."""
    check_vm_state(vm, state)
    for fd, op, buf, _expect, what in _vm_sets(vm, state):
        ioctl(fd, op, buf, what=what)


def _new(ctype: str, blob: bytes, init: Any = None) -> Any:
    buf = ffi.new(ctype + " *", init) if init is not None else ffi.new(ctype + " *")
    ffi.memmove(buf, blob, len(blob))
    return buf


def _rows(sets: List[Tuple[int, Any, Any, int, str]]) -> List[LoadRow]:
    return [(fd, int(op), buf, expect, f"{op.name} ({what})") for fd, op, buf, expect, what in sets]


def vcpu_load_rows(vcpu: Any, state: ArchState) -> Optional[List[LoadRow]]:
    """The SET ioctls :func:`load_vcpu_state` issues for ``state`` (the same buffers), as
    (fd, request, buffer, the count it must return or -1, label) rows: for a caller that
    issues them again and again with no Python per ioctl (:class:`pykvm.rewind.StatePut`,
    from C). None for a state with nested state, which :meth:`pykvm.machine.Machine.reset`
    loads through :func:`load_vcpu_state` instead. ``state`` must have passed :func:`load_vcpu_state` once (which checks it)."""
    if state.get("nested") is not None:
        return None
    return _rows(_vcpu_sets(vcpu, state))


def vm_load_rows(vm: Any, state: ArchState) -> Optional[List[LoadRow]]:
    """The SET ioctls :func:`load_vm_state` issues for ``state`` (irqchips, PIT, clock),
    as :func:`vcpu_load_rows` gives a vCPU's."""
    return _rows(_vm_sets(vm, state))


# -- the host identity a snapshot records (pykvm.snapshot) ---------------------------------------

CPUID_REQUIRED = True                # every x86 machine gives its vCPUs a CPUID table
# the leaves whose feature bits a restoring host must offer: (leaf, subleaf, register)
_FEATURE_WORDS = ((1, 0, "ecx"), (1, 0, "edx"), (7, 0, "ebx"), (7, 0, "ecx"), (7, 0, "edx"),
                  (0xD, 1, "eax"), (0x80000001, 0, "ecx"), (0x80000001, 0, "edx"))
_HYPERVISOR_BIT = 1 << 31          # CPUID.1:ECX[31], which pykvm sets for its guests


def _vendor_of(ebx: int, edx: int, ecx: int) -> str:
    raw = b"".join(int(x).to_bytes(4, "little") for x in (ebx, edx, ecx))
    return raw.decode("ascii", "replace")


def host_vendor(kvm: Any) -> str:
    """The host CPU's vendor string ("GenuineIntel", "AuthenticAMD"): CPUID leaf 0 as
    KVM_GET_SUPPORTED_CPUID gives it; "unknown" without that leaf."""
    for e in kvm.supported_cpuid():
        if e.function == 0:
            return _vendor_of(e.ebx, e.edx, e.ecx)
    return "unknown"


def cpuid_mismatch(entries: List[Tuple[int, ...]], kvm: Any, vendor: str) -> str:
    """Why the CPUID table a snapshot's guest was given (``entries``: (function, index, flags,
    eax, ebx, ecx, edx) tuples) does not fit this host, whose vendor is ``vendor``: another
    vendor in leaf 0, or feature bits (leaves 1, 7, 0xD.1, 0x80000001; the hypervisor bit
    aside) this host's KVM_GET_SUPPORTED_CPUID does not offer. "" when it fits."""
    for e in entries:
        if e[0] == 0 and _vendor_of(e[4], e[6], e[5]) != vendor:
            return f"its guest CPUID says {_vendor_of(e[4], e[6], e[5])}, this host is {vendor}"
    have: Dict[Tuple[int, int], Any] = {}
    for s in kvm.supported_cpuid():
        have.setdefault((s.function, s.index), s)
    regs = {"eax": 3, "ebx": 4, "ecx": 5, "edx": 6}
    for e in entries:
        for leaf, sub, reg in _FEATURE_WORDS:
            if e[0] != leaf or e[1] != sub:
                continue
            want = e[regs[reg]]
            if (leaf, reg) == (1, "ecx"):
                want &= ~_HYPERVISOR_BIT
            h = have.get((leaf, sub))
            got = getattr(h, reg) if h is not None else 0
            if want & ~got:
                return (f"the guest was given CPUID features this host's KVM does not offer "
                        f"(leaf {leaf:#x}.{sub} {reg.upper()} bits {want & ~got:#x})")
    return ""


class VcpuSnapshot:
    """``save_state()`` / ``load_state()`` on :class:`pykvm.vcpu.Vcpu` (x86)."""

    def load_rows(self, state: ArchState) -> Optional[List[LoadRow]]:
        """:func:`vcpu_load_rows` for this vCPU."""
        return vcpu_load_rows(self, state)

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
    """``save_state()`` / ``load_state()`` on :class:`pykvm.vm.Vm` (x86)."""

    def load_rows(self, state: ArchState) -> Optional[List[LoadRow]]:
        """:func:`vm_load_rows` for this VM."""
        return vm_load_rows(self, state)

    def save_state(self) -> ArchState:
        """:func:`save_vm_state` of this VM."""
        return save_vm_state(self)

    def load_state(self, state: ArchState) -> None:
        """:func:`load_vm_state` into this VM."""
        load_vm_state(self, state)

    def check_state(self, state: ArchState) -> None:
        """:func:`check_vm_state`: raise SnapshotError unless ``state`` fits this VM."""
        check_vm_state(self, state)
