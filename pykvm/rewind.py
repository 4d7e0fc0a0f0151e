"""Dirty-page copy-back: return a VM's RAM to a baseline by copying back only the pages written
since (the RAM half of :meth:`pykvm.machine.Machine.reset`).

:class:`RamBaseline` turns KVM's dirty logging on for the VM's writable RAM slots
(``KVM_MEM_LOG_DIRTY_PAGES``, api.rst 4.35 KVM_SET_USER_MEMORY_REGION) and keeps a private,
sparse copy of them: only the pages that held a non-zero byte are copied, the others are
known to be zero (guest RAM is ``MAP_NORESERVE`` and a guest touches little of it; the scan
skips the pages ``/proc/self/pagemap`` shows neither present nor swapped, so a 64 GiB slot of
which the guest used 1 MiB costs 1 MiB and a bitmap). :meth:`RamBaseline.restore` fetches each
slot's dirty bitmap (KVM_GET_DIRTY_LOG, api.rst 4.37; with KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
KVM_CLEAR_DIRTY_LOG of exactly the pages fetched, api.rst 4.117) and copies back exactly those
pages (zeroing the ones that were zero) — or, for a VM with the dirty ring, harvests the
vCPUs' rings (api.rst 8.29) and puts back the pages they name —, then may issue a prepared list
of ioctls that put vCPU and VM state back, all in one call into C (csrc/rewind.c, in
``pykvm._native``), with every page index checked against the slot's size and the baseline
store's size.

KVM's log sees only the guest's writes. Writes the host makes through
:class:`~pykvm.memory.GuestMemory` (``write``, ``zero``, and so ``Machine.set_params`` and
``write_global``) are recorded here too (the memory's write hooks) and copied back as well;
writes through a raw :meth:`~pykvm.memory.GuestMemory.view` or by a device model in C (virtio
DMA) are not: call :meth:`RamBaseline.mark` for them.

The dirty log is the default (it can be turned on for an existing VM); the dirty ring, where
the VM enabled it, keeps a reset's cost independent of the size of RAM. docs/reset.md measures
both.
"""
from __future__ import annotations

import base64
import mmap
import os

import time

from . import abi, snapshot as _snapshot
from ._native import ffi as _nffi, lib as _nlib
from .abi import ioctls
from .errors import Closed, HostMemoryError, PykvmError, kvm_error
from .memory import PAGE_SIZE

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, List, Optional, Sequence, Tuple

# ioctl request names, for errors of the C reset call (index into its slots and puts)
_GET_DIRTY_LOG = "KVM_GET_DIRTY_LOG"


class _Slot:
    """The baseline of one memory slot: the C descriptor and the buffers it points to."""

    def __init__(self, mslot: Any, desc: Any):
        self.mslot = mslot
        self.desc = desc                      # struct pykvm_rewind_slot * (into the array)
        pages = mslot.size // PAGE_SIZE
        self.words = max((pages + 63) // 64, 1)
        self.nonzero = _nffi.new("uint64_t[]", self.words)
        self.rank = _nffi.new("uint32_t[]", self.words)
        self.dirty = _nffi.new("uint64_t[]", self.words)
        self.extra = _nffi.new("uint64_t[]", self.words)
        self.store: Optional[mmap.mmap] = None
        self.store_pin: Any = None
        self.turned_on = False                # dirty logging turned on here (off at close)


class RamBaseline:
    """A sparse baseline of ``vm``'s writable RAM slots and the copy-back that restores it.

    ``vm``: a :class:`pykvm.vm.Vm` whose vCPUs are stopped while :meth:`take` and
    :meth:`restore` run. ``manual_protect``: use KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 (GET then
    CLEAR of the fetched pages; two ioctls a slot instead of one); default False, no slower for
    the few pages a reset copies (docs/reset.md).

    A VM that enabled the dirty ring (:meth:`pykvm.vm.Vm.enable_dirty_ring`, before its first
    vCPU; KVM then has no dirty log) is served through the rings instead: each vCPU's ring is
    harvested (the pages it names put back as they are read) and KVM_RESET_DIRTY_RINGS issued,
    a cost that follows the pages written rather than the size of RAM (KVM_GET_DIRTY_LOG copies
    the whole bitmap). The baseline then harvests the rings itself (keeping each
    :class:`~pykvm.vcpu.DirtyRing`'s ``fetch_index``); a guest that writes more pages than a
    ring holds between two resets stops with KVM_EXIT_DIRTY_RING_FULL.

    Raises :class:`~pykvm.errors.PykvmError` when the VM has no writable RAM slot (or for
    manual protection with the dirty ring), :class:`~pykvm.errors.KvmError` when KVM refuses
    dirty logging, and :class:`~pykvm.errors.HostMemoryError` when the baseline cannot be
    stored."""

    def __init__(self, vm: Any, *, manual_protect: bool = False):
        self.vm = vm
        self.ring = bool(vm.dirty_ring_bytes)
        if self.ring and manual_protect:
            raise PykvmError("manual dirty-log protection applies to the dirty log; this VM "
                             "reports dirty pages through the dirty ring")
        self._rings: Any = None
        self._ring_vcpus: List[Any] = []
        self.manual = bool(manual_protect)
        self._slots: List[_Slot] = []
        self._descs: Any = None
        self._closed = False
        self.pages_stored = 0                 # non-zero pages the baseline holds
        self.last_pages = 0                   # pages the last restore() copied back
        slots = [s for s in vm.memory if not s.readonly]
        if not slots:
            raise PykvmError("the VM has no writable RAM slot to take a baseline of")
        if self.manual:
            vm.enable_cap("MANUAL_DIRTY_LOG_PROTECT2", abi.DIRTY_LOG_MANUAL_PROTECT_ENABLE)
        self._descs = _nffi.new("struct pykvm_rewind_slot[]", len(slots))
        try:
            for i, ms in enumerate(slots):
                st = _Slot(ms, self._descs + i)
                self._slots.append(st)
                d = st.desc
                d.host, d.size, d.slot, d.page_size = ms.host_addr, ms.size, ms.slot, PAGE_SIZE
                d.nonzero = int(_nffi.cast("uintptr_t", st.nonzero))
                d.rank = int(_nffi.cast("uintptr_t", st.rank))
                d.dirty = int(_nffi.cast("uintptr_t", st.dirty))
                d.extra = 0                   # set by mark() when the host wrote a page
                if not ms.log_dirty:
                    vm.set_memory_flags(ms, log_dirty=True)   # write-protects every page
                    st.turned_on = True
            vm.memory.write_hooks.append(self.mark)
            self.take()
        except BaseException:
            self.close()
            raise

    @property
    def slots(self) -> Tuple[Any, ...]:
        """The :class:`~pykvm.memory.MemorySlot` objects the baseline covers."""
        return tuple(s.mslot for s in self._slots)

    @property
    def bytes_stored(self) -> int:
        """Host bytes the baseline's page store holds (non-zero pages only)."""
        return self.pages_stored * PAGE_SIZE

    def _check(self) -> None:
        if self._closed:
            raise Closed("the RAM baseline is closed")
        if self.vm.memory.closed:
            raise Closed("the VM's memory is closed")

    def take(self) -> int:
        """Make RAM as it is now the baseline: clear the dirty log, then scan each slot for its
        non-zero pages and copy them to a private store. Returns the pages stored (int).
        Raises :class:`~pykvm.errors.HostMemoryError` when the store cannot be mapped."""
        self._check()
        self._fetch_and_clear()
        try:
            pagemap = os.open("/proc/self/pagemap", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            pagemap = -1                      # no pagemap: every page is looked at
        try:
            total = 0
            for st in self._slots:
                n = _nlib.pykvm_rewind_scan(st.desc, pagemap if st.mslot.fd < 0 else -1,
                                            st.mslot.fd)
                if n < 0:
                    raise PykvmError(f"slot {st.mslot.slot}: scanning RAM failed: "
                                     f"{os.strerror(-n)}")
                self._store(st, n)
                got = _nlib.pykvm_rewind_capture(st.desc)
                if got != n:
                    raise PykvmError(f"slot {st.mslot.slot}: RAM changed while the baseline "
                                     "was taken (is a vCPU running?)")
                total += n
        finally:
            if pagemap >= 0:
                os.close(pagemap)
        for st in self._slots:
            _nffi.memmove(st.extra, bytes(st.words * 8), st.words * 8)
            st.desc.extra = 0
        self.pages_stored = total
        return total

    def _store(self, st: _Slot, pages: int) -> None:
        """(Re)allocate ``st``'s page store for ``pages`` pages (an anonymous private
        mapping, so it costs what it holds)."""
        if st.store is not None:
            if st.store_pin is not None:
                _nffi.release(st.store_pin)
            st.store.close()
            st.store, st.store_pin = None, None
        size = max(pages, 1) * PAGE_SIZE
        try:
            st.store = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS,
                                 prot=mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError as e:
            from_err = e.strerror or str(e)
            raise HostMemoryError(f"cannot map {size} bytes for the RAM baseline: "
                                   f"{from_err}") from None
        st.store_pin = _nffi.from_buffer(st.store)
        st.desc.store = int(_nffi.cast("uintptr_t", st.store_pin))
        st.desc.store_pages = pages

    def _ring_array(self) -> Any:
        """The C descriptors of the vCPUs' dirty rings (made again when vCPUs were added),
        their next indices taken from each ring's ``fetch_index``."""
        vcpus = [v for v in self.vm.vcpus if v.dirty_ring is not None]
        if self._rings is None or len(vcpus) != len(self._ring_vcpus):
            self._rings = _nffi.new("struct pykvm_rewind_ring[]", max(len(vcpus), 1))
            self._ring_vcpus = vcpus
            for i, v in enumerate(vcpus):
                ring = v.dirty_ring
                self._rings[i].gfns = int(_nffi.cast("uintptr_t", ring._gfns))
                self._rings[i].entries = ring.entries
        for i, v in enumerate(self._ring_vcpus):
            self._rings[i].next = v.dirty_ring.fetch_index
        return self._rings

    def _ring_done(self) -> None:
        """Give each ring's harvest index back to its :class:`~pykvm.vcpu.DirtyRing`."""
        for i, v in enumerate(self._ring_vcpus):
            v.dirty_ring.fetch_index = int(self._rings[i].next)

    def _fetch_and_clear(self) -> None:
        """Empty every slot's dirty log, or the dirty rings (the pages written so far stop
        counting)."""
        if self.ring:
            r = _nlib.pykvm_rewind_ring_drop(self.vm.fd, self._ring_array(),
                                             len(self._ring_vcpus))
            self._ring_done()
            if r < 0:
                raise kvm_error("KVM_RESET_DIRTY_RINGS", -r)
            return
        for st in self._slots:
            self.vm.get_dirty_log(st.mslot)
            if self.manual:
                self.vm.clear_dirty_log(st.mslot)

    def mark(self, gpa: int, size: int) -> None:
        """Record that the host wrote guest-physical ``[gpa, gpa + size)`` (bytes) outside
        KVM's view (a device model's DMA, a raw memory view): :meth:`restore` copies those
        pages back too. Ranges outside the baseline's slots are ignored (read-only slots are
        not restored). Called by :class:`~pykvm.memory.GuestMemory` for its own writes."""
        if self._closed or size <= 0:
            return
        end = gpa + size
        for st in self._slots:
            ms = st.mslot
            lo, hi = max(gpa, ms.gpa), min(end, ms.gpa + ms.size)
            if lo >= hi:
                continue
            for p in range((lo - ms.gpa) // PAGE_SIZE, (hi - 1 - ms.gpa) // PAGE_SIZE + 1):
                st.extra[p // 64] |= 1 << (p % 64)
            st.desc.extra = int(_nffi.cast("uintptr_t", st.extra))   # C clears it after use

    def restore(self, put: Any = None, nput: int = 0,
                names: Sequence[str] = ()) -> int:
        """Copy back every page written since the baseline (KVM's dirty log and the host's
        writes :meth:`mark` recorded), then issue the ``nput`` ioctls of ``put`` (a cffi
        ``struct pykvm_rewind_ioctl[]``; ``names`` names each for errors) in order, all in one
        call into C. Returns the pages copied back (int). The vCPUs must be out of KVM_RUN.
        Raises :class:`~pykvm.errors.Closed` after :meth:`close` or once the VM's memory is
        closed, :class:`~pykvm.errors.PykvmError` when the VM's writable slots are no longer
        the baseline's (one added or removed since), :class:`~pykvm.errors.KvmError` naming
        the ioctl KVM refused."""
        self._check()
        now = [s for s in self.vm.memory if not s.readonly]
        if len(now) != len(self._slots) or any(a is not b.mslot
                                                for a, b in zip(now, self._slots)):
            raise PykvmError("the VM's RAM slots changed since the baseline was taken; take "
                             "it again")
        failed = _nffi.new("int32_t *")
        rings = self._ring_array() if self.ring else _nffi.NULL
        r = _nlib.pykvm_rewind_reset(self.vm.fd, self._descs, len(self._slots),
                                     1 if self.manual else 0, rings, len(self._ring_vcpus),
                                     put if put is not None else _nffi.NULL, nput, failed)
        if self.ring:
            self._ring_done()
        if r < 0:
            i = failed[0]
            if i == -2:
                raise kvm_error("KVM_RESET_DIRTY_RINGS", -r)
            if i == -1:
                raise PykvmError(f"copying back the pages of the dirty rings failed: "
                                 f"{os.strerror(-r)}")
            if i < len(self._slots):
                what = f"slot={self._slots[i].mslot.slot}" if i >= 0 else ""
                raise kvm_error(_GET_DIRTY_LOG if not self.manual else
                                "KVM_GET_DIRTY_LOG/KVM_CLEAR_DIRTY_LOG", -r, what)
            j = i - len(self._slots)
            raise kvm_error(names[j] if j < len(names) else f"state ioctl {j}", -r)
        self.last_pages = r
        return r

    def close(self) -> None:
        """Drop the baseline and stop dirty logging on the slots where :class:`RamBaseline`
        turned it on (while the VM is open). Idempotent."""
        if self._closed:
            return
        self._closed = True
        hooks = getattr(self.vm.memory, "write_hooks", None)
        if hooks is not None and self.mark in hooks:
            hooks.remove(self.mark)
        for st in self._slots:
            if st.turned_on and not self.vm.memory.closed and not self.vm.closed:
                try:
                    self.vm.set_memory_flags(st.mslot, log_dirty=False)
                except PykvmError:
                    pass
            if st.store_pin is not None:
                _nffi.release(st.store_pin)
            if st.store is not None:
                st.store.close()
            st.store, st.store_pin = None, None
        self._slots = []


# exits KVM completes on the next KVM_RUN (api.rst "KVM_RUN": I/O, MMIO, hypercalls, the MSR
# exits, RISC-V's SBI and CSR exits): a state loaded over one would be overwritten by it
_PENDING_EXITS = frozenset(n for n, name in abi.EXIT_NAMES.items()
                           if name in ("IO", "MMIO", "HYPERCALL", "X86_RDMSR", "X86_WRMSR",
                                       "RISCV_SBI", "RISCV_CSR"))


def complete_pending(vcpu: Any) -> bool:
    """Finish the exit KVM waits on for ``vcpu`` (an I/O or MMIO exit, ...), if its last exit
    was one, with :meth:`pykvm.vcpu.Vcpu.complete_io` (one KVM_RUN with ``immediate_exit``).
    Returns True when it had to. A state saved or loaded without this is wrong: KVM would
    finish the exit on the next KVM_RUN, over the loaded registers (api.rst, "KVM_RUN")."""
    if int(vcpu.run_struct.exit_reason) in _PENDING_EXITS:
        vcpu.complete_io()
        return True
    return False


def _predecode(v: Any) -> Any:
    """A device state (JSON-able, :mod:`pykvm.devices.snapstate`) with its ``$bytes`` and
    ``$bytearray`` leaves decoded once (``bytes``, ``bytearray``): ``restore_state()`` takes
    such leaves as they are (its ``decode`` passes anything but lists and dicts through), so a
    reset does not decode base64 again each time. Other tags are left to ``decode``."""
    if isinstance(v, list):
        return [_predecode(x) for x in v]
    if isinstance(v, dict):
        if len(v) == 1:
            (tag, x), = v.items()
            if tag == "$bytes" and isinstance(x, str):
                return base64.b64decode(x, validate=True)
            if tag == "$bytearray" and isinstance(x, str):
                return bytearray(base64.b64decode(x, validate=True))
        return {k: _predecode(x) for k, x in v.items()}
    return v


def _fresh(v: Any) -> Any:
    """A copy of a :func:`_predecode` state whose lists, dicts and bytearrays are new objects,
    so that a device given it cannot change the baseline (its ``bytes`` are immutable)."""
    if isinstance(v, list):
        return [_fresh(x) for x in v]
    if isinstance(v, dict):
        return {k: _fresh(x) for k, x in v.items()}
    if isinstance(v, bytearray):
        return bytearray(v)
    return v


class StatePut:
    """The ioctls that load a captured state again, prepared once: each state blob copied into
    a cffi buffer of its uAPI structure and listed as (fd, SET request, buffer) in the order
    and with the adjustments :func:`pykvm.arch.x86.snapshot.load_vcpu_state` and
    :func:`~pykvm.arch.x86.snapshot.load_vm_state` use (their tables), so that
    :meth:`RamBaseline.restore` issues them from C in the same call as the page copy, with no
    Python per ioctl. Each vCPU's list starts with a completion of its pending exit
    (``PYKVM_REWIND_COMPLETE``). x86 only, and only for states without nested state
    (:attr:`supported`); elsewhere the states are loaded through ``load_state()``.

    ``vcpus``/``states``: the vCPUs and their :class:`~pykvm.arch.snapstate.ArchState`;
    ``vm``/``vm_state`` likewise. Each state must have passed ``load_state()`` once (which
    checks it against KVM)."""

    def __init__(self, vcpus: Sequence[Any], states: Sequence[Any], vm: Any, vm_state: Any):
        self._keep: List[Any] = []
        self.names: List[str] = []
        rows: List[Tuple[int, int, int, Any, int]] = []   # (fd, flags, request, buffer, expect)
        # each arch prepares its own SET ioctls (load_rows()), or None where it has no fast path
        per_vcpu = [v.load_rows(s) for v, s in zip(vcpus, states)]
        vm_rows = vm.load_rows(vm_state)
        self.supported = vm_rows is not None and all(r is not None for r in per_vcpu)
        if self.supported:
            for v, vrows in zip(vcpus, per_vcpu):
                rows.append((v.fd, _nlib.PYKVM_REWIND_COMPLETE, int(ioctls.KVM_RUN),
                             v.run_struct, -1))
                self.names.append(f"KVM_RUN (vCPU {v.id}: completing its exit)")
                for fd, request, buf, expect, name in vrows:
                    rows.append((fd, 0, request, buf, expect))
                    self.names.append(name)
            for fd, request, buf, expect, name in vm_rows:
                rows.append((fd, 0, request, buf, expect))
                self.names.append(name)
        self.count = len(rows)
        self.array = _nffi.new("struct pykvm_rewind_ioctl[]", max(len(rows), 1))
        for i, (fd, flags, request, buf, expect) in enumerate(rows):
            e = self.array[i]
            e.fd, e.flags, e.request, e.expect = fd, flags, request, expect
            e.arg = int(_nffi.cast("uintptr_t", buf))
            self._keep.append(buf)


class MachineBaseline:
    """What :meth:`pykvm.machine.Machine.reset` returns a machine to: its RAM
    (:class:`RamBaseline`), every vCPU's and the VM's KVM state (``save_state()`` of
    :class:`pykvm.vcpu.Vcpu` and :class:`pykvm.vm.Vm`: :mod:`pykvm.arch.x86.snapshot`,
    :mod:`pykvm.arch.riscv.snapshot`) and the device models' state (their
    ``snapshot_state()``/``restore_state()`` protocol, :mod:`pykvm.devices.snapstate`, and the
    16550's registers, as :mod:`pykvm.snapshot` takes them). Taken with every vCPU out of
    KVM_RUN; held in memory only.

    ``machine``: a :class:`pykvm.machine.Machine`. Raises :class:`~pykvm.errors.PykvmError`
    (one line) for a machine with a device whose state cannot be put back
    (:func:`pykvm.snapshot.refusals`: virtio devices, whose C workers also write guest RAM
    behind KVM's dirty log, VT-d, edu, the RISC-V AIA), and what :class:`RamBaseline` and
    ``save_state()`` raise."""

    def __init__(self, machine: Any, *, manual_protect: bool = False):
        refused = _snapshot.refusals(machine)
        if refused:
            raise PykvmError("checkpoint/reset cannot put back the state of " + "; ".join(refused))
        self.machine = machine
        vm = machine.vm
        for v in machine.vcpus:
            complete_pending(v)
        self.ram = RamBaseline(vm, manual_protect=manual_protect)
        try:
            self.vcpu_states = [v.save_state() for v in machine.vcpus]
            self.vm_state = vm.save_state()
            p = machine.platform
            self._devices = _snapshot.device_models(p)
            self.device_state = {name: _predecode(d.snapshot_state())
                                 for name, d in self._devices.items()}
            group = getattr(p, "_uart_group", None)
            self.uart_state = _snapshot.uart_state(group) if group is not None else None
            self.platform_fields = {k: getattr(p, k) for k in _snapshot.PC_FIELDS
                                    if hasattr(p, k)}
        except BaseException:
            self.ram.close()
            raise
        self.taken_ns = time.monotonic_ns()
        self.resets = 0
        # load each state once through the snapshot API (KVM checks it), then prepare the
        # same ioctls for the C path
        for v, s in zip(machine.vcpus, self.vcpu_states):
            v.load_state(s)
        vm.load_state(self.vm_state)
        self.put = StatePut(machine.vcpus, self.vcpu_states, vm, self.vm_state)

    def restore(self) -> int:
        """Put the machine back: pages, vCPU state, VM state, device state. The vCPUs must be
        out of KVM_RUN. Returns the pages copied back (int). Raises
        :class:`~pykvm.errors.KvmError` naming the ioctl KVM refused."""
        m = self.machine
        if self.put.supported:
            pages = self.ram.restore(self.put.array, self.put.count, self.put.names)
        else:
            for v in m.vcpus:
                complete_pending(v)
            pages = self.ram.restore()
            for v, s in zip(m.vcpus, self.vcpu_states):
                v.load_state(s)
            m.vm.load_state(self.vm_state)
        self._restore_devices()
        self.resets += 1
        return pages

    def _restore_devices(self) -> None:
        """The device models' state, as pykvm.snapshot loads it: each model, the 16550, the
        platform's own fields, then the platform's hooks that map what those fields say."""
        p = self.machine.platform
        delta = time.monotonic_ns() - self.taken_ns   # device clocks stand still, as kvm-clock
        for name, d in self._devices.items():
            d.restore_state(_fresh(self.device_state[name]), mono_delta=delta)
        group = getattr(p, "_uart_group", None)
        if self.uart_state is not None and group is not None:
            s = group.state
            s.uart_in_len = 0                  # host input typed since is dropped
            _snapshot.load_uart(group, self.uart_state)
        for k, v in self.platform_fields.items():
            setattr(p, k, v)
        for hook in ("_map_pm", "_rtc_changed", "_pm_changed"):
            fn = getattr(p, hook, None)
            if fn is not None:
                fn()

    def close(self) -> None:
        """Drop the baseline (:meth:`RamBaseline.close`). Idempotent."""
        self.ram.close()
