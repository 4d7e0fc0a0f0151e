"""`Vcpu`: a vCPU file descriptor — ONE_REG, the mmapped kvm_run, run() → typed exits, kick."""
from __future__ import annotations

import mmap
import signal
import threading
import weakref

from . import abi
from ._fd import FdObject
from ._ioctl import enable_cap as _enable_cap, ioctl, raw_ioctl as _raw_ioctl
from ._ioctl import stats as _stats
from ._loopstate import RunState
from ._native import lib as _nlib
from .abi import CData, ffi, ioctls
from .abi.ioctls import Ioctl
from .arch import current as _arch
from .errors import Busy, Closed, GuestError, HostResourceError, KvmTooBig, kvm_error
from .errors import host_resource_error
from .exits import Exit, decode_exit, kvm_run_error

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Callable, Dict, List, Optional, Tuple, Union

_get_ident = threading.get_ident
_native_ioctl = _nlib.pykvm_ioctl
_KVM_RUN = int(ioctls.KVM_RUN)
_EXIT_INTR = abi.EXIT_REASONS["INTR"]


_GFN_SIZE = ffi.sizeof("struct kvm_dirty_gfn")
_GFN_DIRTY = abi.DIRTY_GFN_F_DIRTY
_GFN_RESET = abi.DIRTY_GFN_F_RESET


class DirtyRing:
    """One vCPU's dirty ring (KVM_CAP_DIRTY_LOG_RING, api.rst 8.29): the array of
    ``struct kvm_dirty_gfn`` KVM fills as the guest dirties pages of slots that log dirty
    pages, mapped from page :data:`pykvm.abi.arch.DIRTY_LOG_PAGE_OFFSET` of the vCPU fd.

    Made by :class:`Vcpu` when its VM enabled the ring (:meth:`pykvm.vm.Vm.enable_dirty_ring`);
    read it with :meth:`harvest`, then :meth:`pykvm.vm.Vm.reset_dirty_rings`. Harvesting needs
    no vCPU ioctl, so another thread may harvest while the vCPU runs (entries the CPU still
    buffers appear once the vCPU exits, e.g. after a kick). ``entries`` (int): the ring's
    size in entries; ``fetch_index`` (int): the free-running index of the next entry to read.
    """

    def __init__(self, fd: int, vcpu_id: int, size: int, ordered: bool):
        """Map ``size`` bytes (the ring size given to KVM_ENABLE_CAP) of vCPU fd ``fd``.
        ``ordered``: the ring was enabled as KVM_CAP_DIRTY_LOG_RING_ACQ_REL, so each entry's
        flags are read before, and written after, its other fields with a memory barrier in
        between (a lock's atomic acquire and release). Raises
        :class:`~pykvm.errors.KvmError` naming ``mmap(dirty ring)`` if the mapping fails."""
        self.entries = size // _GFN_SIZE
        self.fetch_index = 0
        self._ordered = ordered
        self._fence = threading.Lock()
        try:
            self._map: Optional[mmap.mmap] = mmap.mmap(
                fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE,
                offset=abi.arch.DIRTY_LOG_PAGE_OFFSET * mmap.PAGESIZE)
        except OSError as e:
            hr: Optional[HostResourceError] = host_resource_error(e)
            if hr is not None:
                raise hr from e
            raise kvm_error("mmap(dirty ring)", e.errno or 0,
                            f"vcpu {vcpu_id} size={size}") from None
        self._gfns = ffi.from_buffer("struct kvm_dirty_gfn[]", self._map)

    def harvest(self, limit: Optional[int] = None) -> List[Tuple[int, int]]:
        """Collect the dirty entries from :attr:`fetch_index` on, in ring order, and mark each
        harvested (flags RESET) for the next KVM_RESET_DIRTY_RINGS; stops at the first entry
        that is not dirty, or after ``limit`` entries. Returns ``[(slot, offset), ...]``:
        ``slot`` is ``address_space << 16 | slot number`` and ``offset`` the page's index
        (pages of :data:`pykvm.memory.PAGE_SIZE` bytes) within that slot. Raises
        :class:`~pykvm.errors.Closed` once the vCPU is closed."""
        gfns = self._gfns
        if gfns is None:
            raise Closed("dirty ring used after its vCPU was closed")
        out: List[Tuple[int, int]] = []
        mask = self.entries - 1                  # a power of two
        i = self.fetch_index
        fence = self._fence if self._ordered else None
        while limit is None or len(out) < limit:
            e = gfns[i & mask]
            if e.flags != _GFN_DIRTY:            # 0: not yet written; RESET: not yet reset
                break
            if fence is not None:                # load-acquire of flags
                fence.acquire()
                fence.release()
            out.append((e.slot, e.offset))
            if fence is not None:                # store-release of flags
                fence.acquire()
                fence.release()
            e.flags = _GFN_RESET
            i += 1
        self.fetch_index = i
        return out

    def close(self) -> None:
        """Unmap the ring (idempotent); :meth:`harvest` raises Closed afterwards."""
        gfns, self._gfns = self._gfns, None
        if gfns is not None:
            ffi.release(gfns)
        m, self._map = self._map, None
        if m is not None:
            m.close()


class Vcpu(_arch.VcpuArch, FdObject):
    """A vCPU. Create it with :meth:`pykvm.vm.Vm.create_vcpu`.

    ``run()`` issues one KVM_RUN from Python and returns a typed exit that borrows the shared
    ``kvm_run`` page (valid until the next run). For the fast path, see
    :class:`pykvm.runloop.RunLoop`, which serves console/exit ports in C.
    """

    # ``vm``: the pykvm.vm.Vm that made it (Any: vm.py imports this module, so naming the type
    # here would make an import cycle)
    def __init__(self, vm: Any, fd: int, vcpu_id: int):
        self.vm = vm
        self.id = vcpu_id
        self._own_fd(fd)
        size = vm.kvm.vcpu_mmap_size
        addr = _nlib.pykvm_map_shared(fd, size)
        if addr < 0:
            FdObject.close(self)                 # the fd, whatever the interpreter state
            raise kvm_error("mmap(kvm_run)", -addr, f"vcpu {vcpu_id} size={size}")
        # The mapping lives as long as this object: close() retires it (replaces it with zeroed
        # anonymous memory), the finalizer unmaps it when the last reference goes.
        self._unmapper = weakref.finalize(self, _nlib.pykvm_unmap, addr, size)
        self._run_addr = addr
        self._run_map = ffi.buffer(ffi.cast("uint8_t *", addr), size)
        self._run_bytes = memoryview(self._run_map)      # exits read and write data through it
        self.run_struct = ffi.cast("struct kvm_run *", addr)
        self._io = self.run_struct.io                   # views into kvm_run, made once
        self._mmio = self.run_struct.mmio
        self.run_size = size
        self._rs = RunState(addr, size)  # seq: bumped by every KVM_RUN (exits check it); closing
        self._thread_ident: Optional[int] = None
        # Lifecycle: one thread at a time may be inside KVM_RUN (through run() or a run loop);
        # close() waits for it to leave before the fd is closed and kvm_run unmapped.
        self._lock = threading.RLock()
        # a Condition on _lock, made by the first close() to wait
        self._cond: Optional[threading.Condition] = None
        self._runner: Optional[int] = None      # thread ident of the caller inside a run, or None
        self._runner_kick: Optional[Callable[[], None]] = None  # how to make that run return
        self._run_depth = 0              # nested claims by the same thread (a loop, then run())
        self._closed_done = False
        # the dirty ring, mapped here when the VM enabled one (Vm.enable_dirty_ring)
        self.dirty_ring: Optional[DirtyRing] = None
        ring = getattr(vm, "dirty_ring_bytes", 0)
        if ring:
            try:
                self.dirty_ring = DirtyRing(fd, vcpu_id, ring, vm.dirty_ring_ordered)
            except BaseException:
                self._unmapper()
                FdObject.close(self)
                raise
        self._arch_init()

    @property
    def run_seq(self) -> int:
        """KVM_RUNs made so far (each run loop entry and each exit a handler resumed count one):
        an exit object belongs to one value of it and is stale after."""
        return self._rs.seq

    @property
    def fd(self) -> int:
        """The vCPU file descriptor, for an ioctl. Raises :class:`~pykvm.errors.Closed` after
        :meth:`close` and :class:`~pykvm.errors.Busy` while another thread runs the vCPU: KVM
        would hold any other vCPU ioctl until that run returns, which may be never."""
        runner = self._runner
        if runner is not None and runner != threading.get_ident():
            raise Busy(f"vCPU {self.id} is running in another thread: kick it (or let the run "
                       "end) before other vCPU ioctls")
        fd = self._fd                    # FdObject.fd, inlined
        if fd < 0:
            raise Closed(f"{type(self).__name__} is closed")
        return fd

    @property
    def run_addr(self) -> int:
        """Host address of the mmapped ``struct kvm_run`` (valid while the object lives; after
        :meth:`close` it points at retired, zeroed memory)."""
        return self._run_addr

    # -- lifecycle --------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        """True while some thread is inside a run of this vCPU (:meth:`run` or a run loop)."""
        return self._runner is not None

    def _enter_run(self, kick: Callable[[], None]) -> None:
        """Claim the vCPU for one run (``kick()`` must make that run return promptly).

        Raises :class:`~pykvm.errors.Closed` once :meth:`close` has begun and
        :class:`~pykvm.errors.Busy` if another thread is running the vCPU."""
        me = _get_ident()
        with self._lock:
            if self._rs.closing:
                raise Closed(f"vCPU {self.id} is closed")
            if self._runner is not None and self._runner != me:
                raise Busy(f"vCPU {self.id} is already running in another thread")
            if self._runner is None:
                self._runner, self._runner_kick = me, kick
            self._run_depth += 1

    def _leave_run(self) -> None:
        with self._lock:
            self._run_depth -= 1
            if self._run_depth > 0:
                return
            self._runner = self._runner_kick = None
            finish = self._rs.closing and not self._closed_done
            if self._cond is not None:
                self._cond.notify_all()
        if finish:                        # close() was called from inside the run: finish it
            self._finish_close()

    def _check_open(self) -> None:
        if self._rs.closing:
            raise Closed(f"vCPU {self.id} is closed")

    # -- ONE_REG --------------------------------------------------------------------------
    def get_one_reg(self, reg_id: int) -> int:
        """KVM_GET_ONE_REG: the register's value as an unsigned int of the id's size."""
        n = abi.reg_size_bytes(reg_id)
        buf = ffi.new("uint8_t[]", n)
        r = ffi.new("struct kvm_one_reg *")
        r.id = reg_id
        r.addr = int(ffi.cast("uintptr_t", buf))
        ioctl(self.fd, ioctls.KVM_GET_ONE_REG, r, what=f"{reg_id:#x}")
        return int.from_bytes(ffi.buffer(buf), "little")

    def set_one_reg(self, reg_id: int, value: Union[int, bytes]) -> None:
        """KVM_SET_ONE_REG: ``value`` is an int (must fit the id's size) or exactly-sized bytes."""
        n = abi.reg_size_bytes(reg_id)
        if isinstance(value, int):
            if value < 0 or value >> (8 * n):
                raise ValueError(f"value {value:#x} does not fit register {reg_id:#x} "
                                 f"({n} bytes)")
            raw = value.to_bytes(n, "little")
        else:
            raw = bytes(value)
            if len(raw) != n:
                raise ValueError(f"register {reg_id:#x} takes {n} bytes, got {len(raw)}")
        buf = ffi.new("uint8_t[]", raw)
        r = ffi.new("struct kvm_one_reg *")
        r.id = reg_id
        r.addr = int(ffi.cast("uintptr_t", buf))
        ioctl(self.fd, ioctls.KVM_SET_ONE_REG, r, what=f"{reg_id:#x}")

    def reg_list(self) -> List[int]:
        """KVM_GET_REG_LIST: the ids of every register KVM enumerates for this vCPU."""
        n = 0
        for _ in range(4):
            rl = ffi.new("struct kvm_reg_list *", {"n": n, "reg": n or 1})
            rl.n = n
            try:
                ioctl(self.fd, ioctls.KVM_GET_REG_LIST, rl)
            except KvmTooBig:
                n = rl.n       # KVM wrote the count it needs
                continue
            return [rl.reg[i] for i in range(rl.n)]
        raise RuntimeError("KVM_GET_REG_LIST kept growing")

    # -- misc state -----------------------------------------------------------------------
    def get_mp_state(self) -> int:
        """KVM_GET_MP_STATE: the vCPU's multiprocessing state (``abi.MP_STATES``)."""
        m = ffi.new("struct kvm_mp_state *")
        ioctl(self.fd, ioctls.KVM_GET_MP_STATE, m)
        return m.mp_state

    def set_mp_state(self, state: Union[int, str]) -> None:
        """KVM_SET_MP_STATE, from a number or a name such as ``"RUNNABLE"``."""
        m = ffi.new("struct kvm_mp_state *")
        m.mp_state = abi.MP_STATES[state] if isinstance(state, str) else state
        ioctl(self.fd, ioctls.KVM_SET_MP_STATE, m, what=str(state))

    def enable_cap(self, cap: abi.Cap, *args: int, flags: int = 0) -> None:
        """KVM_ENABLE_CAP on the vCPU."""
        _enable_cap(self.fd, cap, args, flags)

    def set_guest_debug(self, *, enable: bool = True, single_step: bool = False,
                        control: int = 0) -> None:
        """KVM_SET_GUEST_DEBUG (e.g. single-stepping: every instruction exits with DEBUG)."""
        g = ffi.new("struct kvm_guest_debug *")
        g.control = control | (abi.GUESTDBG_ENABLE if enable else 0) | \
            (abi.GUESTDBG_SINGLESTEP if single_step else 0)
        ioctl(self.fd, ioctls.KVM_SET_GUEST_DEBUG, g)

    def stats(self) -> Dict[str, object]:
        """The vCPU's binary stats (KVM_GET_STATS_FD) as {name: value}."""
        return _stats(self.fd)

    # -- raw ioctls -------------------------------------------------------------------------
    def ioctl(self, row: Union[Ioctl, str], arg: Union[int, CData] = 0, *,
              what: str = "") -> int:
        """Issue a row of the ioctl table (:mod:`pykvm.abi.ioctls`) that has no method here on
        the vCPU fd: ``row`` is the :class:`~pykvm.abi.ioctls.Ioctl` or its name
        (``"KVM_GET_VCPU_EVENTS"``), ``arg`` an int for a row without an argument type, else a cffi pointer
        to (or array of at least the size of) the row's argument struct (``ffi.new(row.arg + " *")``; :data:`pykvm.abi.ffi` declares every row's
        struct). Returns the ioctl's non-negative result. Raises TypeError for an argument of another kind or smaller than
        the row's struct (the kernel would write past it), KeyError for an unknown name,
        ValueError for a row that is not issued on a vCPU fd or does not exist on this
        architecture, :class:`~pykvm.errors.Busy` while another thread runs the vCPU, and
        :class:`~pykvm.errors.KvmError` (naming the row, ``what`` and the errno, and a missing
        capability) when KVM refuses. Not for KVM_RUN: use :meth:`run`."""
        if (row if isinstance(row, str) else getattr(row, "name", "")) == "KVM_RUN":
            raise ValueError("KVM_RUN goes through Vcpu.run() (it claims the vCPU and decodes "
                             "the exit)")
        return _raw_ioctl(self.fd, "vcpu", row, arg, what)

    # -- running --------------------------------------------------------------------------
    def run(self, immediate_exit: bool = False) -> Exit:
        """One KVM_RUN from Python; returns the typed exit (see :mod:`pykvm.exits`), which
        borrows ``kvm_run`` until the next run.

        A kick (:meth:`kick`) makes it return an :class:`~pykvm.exits.Intr` exit.
        ``immediate_exit``: set ``kvm_run.immediate_exit`` once the vCPU is claimed (so that
        nothing another thread does between runs can clear it first): KVM completes a pending
        exit and returns at once (:meth:`complete_io`). Raises
        :class:`~pykvm.errors.Closed` after :meth:`close`, :class:`~pykvm.errors.Busy` while
        another thread runs this vCPU, and a :class:`~pykvm.errors.KvmError` if KVM_RUN fails
        (:class:`~pykvm.errors.GuestRamUnbacked` for EFAULT: the host could not back guest
        RAM)."""
        self._enter_run(self._kick_thread)
        try:
            if immediate_exit:
                self.run_struct.immediate_exit = 1
            self._thread_ident = _get_ident()
            self._rs.seq += 1
            r = _native_ioctl(self._fd, _KVM_RUN, 0)     # the cheapest call: no wrapper
            if r < 0:
                if -r not in (4, 11):               # EINTR / EAGAIN: report as an INTR exit
                    raise kvm_run_error(self, -r)
                self.run_struct.immediate_exit = 0
                self.run_struct.exit_reason = _EXIT_INTR
            return decode_exit(self)
        finally:
            self._thread_ident = None
            self._leave_run()

    def complete_io(self) -> None:
        """Finish the I/O or MMIO exit KVM is waiting on without running the guest: one
        KVM_RUN with ``kvm_run.immediate_exit`` set (Linux's Documentation/virt/kvm/api.rst,
        "immediate_exit": pending operations complete, then KVM_RUN returns EINTR). Afterwards
        the registers are those after the instruction (an IN's data, from ``kvm_run``, in
        RAX; RIP past it), so they can be read or changed consistently.

        Call it on the thread that runs the vCPU, from an exit handler or between runs.
        Raises :class:`~pykvm.errors.Busy` from another thread's run,
        :class:`~pykvm.errors.Closed` after :meth:`close`, :class:`~pykvm.errors.KvmError` if
        KVM_RUN fails, and :class:`~pykvm.errors.GuestError` if completing the exit needs
        userspace again (KVM returned another exit: a string I/O with iterations left)."""
        ex = self.run(immediate_exit=True)
        if ex.name != "INTR":
            self.run_struct.immediate_exit = 0
            raise GuestError(f"vCPU {self.id}: completing the pending exit gave another "
                             f"exit ({ex.name})")

    def _kick_thread(self) -> None:
        sig = _nlib.pykvm_kick_signal()
        self.run_struct.immediate_exit = 1
        ident = self._thread_ident
        if ident is not None:
            try:
                signal.pthread_kill(ident, sig)
            except ProcessLookupError:
                pass

    def kick(self) -> None:
        """Make a running (or the next) :meth:`run` return: set ``immediate_exit``, then signal
        the vCPU thread. Safe from any thread and from a signal handler (it takes no lock).
        Raises :class:`~pykvm.errors.Closed` after :meth:`close`."""
        self._check_open()
        self._kick_thread()

    def close(self) -> None:
        """Stop and close the vCPU (idempotent, safe from any thread).

        If a run is in progress in another thread, it is kicked and waited for until it has left
        KVM_RUN; then ``kvm_run`` is retired (its address range replaced by zeroed anonymous
        memory, so nothing can fault on a stale pointer) and the fd closed. Called from inside a
        run (an exit handler or console callback on the vCPU's own thread), the close completes
        when that run returns. Every later method call raises :class:`~pykvm.errors.Closed`."""
        me = threading.get_ident()
        with self._lock:
            if self._closed_done:
                return
            self._rs.closing = True
            if self._runner == me:
                return                        # finished by _leave_run()
            if self._runner is not None and self._cond is None:
                self._cond = threading.Condition(self._lock)
            cond = self._cond                 # set whenever there is a runner to wait for
            while self._runner is not None and cond is not None:
                kick = self._runner_kick
                if kick is not None:
                    kick()
                cond.wait(0.02)
            if self._closed_done:
                return
        self._finish_close()

    def _finish_close(self) -> None:
        with self._lock:
            if self._closed_done:
                return
            self._closed_done = True
        _nlib.pykvm_retire_mapping(self._run_addr, self.run_size)
        if self.dirty_ring is not None:
            self.dirty_ring.close()
        super().close()

    def __repr__(self) -> str:
        return f"<Vcpu id={self.id} fd={self._fd}>"
