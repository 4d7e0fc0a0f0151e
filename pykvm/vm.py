"""`Vm`: a VM file descriptor — memory slots, irqchip, eventfds, dirty log, vCPUs, stats."""
from __future__ import annotations

import os

from . import abi
from ._fd import FdObject
from ._ioctl import check_extension as _check_extension, enable_cap as _enable_cap, ioctl
from ._ioctl import raw_ioctl, stats as _stats
from .abi import CData, ffi, ioctls
from .abi.ioctls import Ioctl
from .arch import current as _arch
from .errors import CapabilityMissing, GuestMemoryError, PykvmError, host_resource_error
from .memory import PAGE_SIZE, GuestMemory, MemorySlot, new_mapping, new_shared_mapping
from .vcpu import Vcpu

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple, Union


class Vm(_arch.VmArch, FdObject):
    """A KVM virtual machine. Create it with :meth:`pykvm.Kvm.create_vm`."""

    # ``kvm``: the pykvm.kvm.Kvm that made it (Any: kvm.py imports this module, so naming the
    # type here would make an import cycle)
    def __init__(self, kvm: Any, fd: int):
        self.kvm = kvm
        self._own_fd(fd)
        self.memory = GuestMemory()
        self.vcpus: List[Vcpu] = []
        self._eventfds: List[int] = []
        self._coalesced: List[Tuple[int, int, bool]] = []       # (addr, size, pio)
        # add_memory's default for ``shared``: a machine with a vhost-user device (virtio-fs)
        # sets it before its platform adds the RAM, so every slot is a shareable memfd
        self.shared_memory = False
        # the dirty ring's size in bytes once enable_dirty_ring() ran (0: none), and whether it
        # was enabled as KVM_CAP_DIRTY_LOG_RING_ACQ_REL (entries then need ordered accesses)
        self.dirty_ring_bytes = 0
        self.dirty_ring_ordered = False
        # slots set with KVM_SET_USER_MEMORY_REGION2: slot number -> (guest_memfd, its offset),
        # (-1, 0) for one without guest_memfd; and the guest_memfds this VM made
        self._region2: Dict[int, Tuple[int, int]] = {}
        self._gmem_fds: List[int] = []
        self._arch_init()

    # -- capabilities ---------------------------------------------------------------------
    def check_extension(self, cap: abi.Cap) -> int:
        """KVM_CHECK_EXTENSION on the VM fd (VM-specific answers, e.g. NR_MEMSLOTS)."""
        return _check_extension(self.fd, cap)

    def enable_cap(self, cap: abi.Cap, *args: int, flags: int = 0) -> None:
        """KVM_ENABLE_CAP on the VM."""
        _enable_cap(self.fd, cap, args, flags)

    # -- memory ---------------------------------------------------------------------------
    def _free_slot_number(self) -> int:
        used = {s.slot for s in self.memory}
        n = 0
        while n in used:
            n += 1
        return n

    def add_memory(self, gpa: int, size: int, *, readonly: bool = False,
                   log_dirty: bool = False, slot: Optional[int] = None,
                   shared: Optional[bool] = None, region2: bool = False,
                   guest_memfd: Optional[int] = None,
                   guest_memfd_offset: int = 0) -> MemorySlot:
        """Back guest-physical [gpa, gpa + size) with fresh zeroed host memory
        (KVM_SET_USER_MEMORY_REGION) and return its :class:`~pykvm.memory.MemorySlot`.

        ``region2``: set the slot with KVM_SET_USER_MEMORY_REGION2 (api.rst 4.140, needs
        KVM_CAP_USER_MEMORY2, Linux 6.8+) instead; later changes to the slot (flags, removal)
        use it too. ``guest_memfd`` (an fd from :meth:`create_guest_memfd`; implies
        ``region2``) backs the slot's private memory with that guest_memfd from byte
        ``guest_memfd_offset`` (page aligned) on, and sets KVM_MEM_GUEST_MEMFD; the host
        mapping still backs its shared memory.

        ``shared`` (default: :attr:`shared_memory`, False unless a machine set it): back the
        slot with a memfd mapped ``MAP_SHARED`` (:func:`pykvm.memory.new_shared_mapping`;
        :attr:`MemorySlot.fd <pykvm.memory.MemorySlot.fd>`) that another process, a vhost-user
        backend, can map; otherwise a private anonymous mapping.

        ``gpa`` and ``size`` are bytes, page aligned, inside the 64-bit guest-physical space;
        ``slot`` (default: the lowest free number) is KVM's slot number, 0..32767. Raises
        :class:`~pykvm.errors.GuestMemoryError` for bad values or an overlap,
        :class:`~pykvm.errors.HostMemoryError` when the host cannot map the RAM and a
        :class:`~pykvm.errors.KvmError` when KVM refuses the slot."""
        for name, v in (("address", gpa), ("size", size)):
            if not isinstance(v, int) or isinstance(v, bool):
                raise GuestMemoryError(f"slot {name} must be an int, not {type(v).__name__}")
        if gpa < 0 or gpa % PAGE_SIZE or gpa >= 1 << 64:
            raise GuestMemoryError(f"slot address {gpa:#x} is not a page-aligned guest-physical "
                                   "address")
        if size <= 0 or size % PAGE_SIZE or gpa + size > 1 << 64:
            raise GuestMemoryError(f"slot size {size:#x} must be a positive multiple of "
                                   f"{PAGE_SIZE} that fits above {gpa:#x}")
        if slot is not None and (not isinstance(slot, int) or isinstance(slot, bool)
                                 or not 0 <= slot < 1 << 15):
            raise GuestMemoryError(f"slot number {slot!r} is not in 0..32767")
        for s in self.memory:
            if gpa < s.end and s.gpa < gpa + size:
                raise GuestMemoryError(
                    f"[{gpa:#x}, {gpa + size:#x}) overlaps slot {s.slot} [{s.gpa:#x}, {s.end:#x})")
        flags = (abi.MEM_READONLY if readonly else 0) | (abi.MEM_LOG_DIRTY_PAGES if log_dirty else 0)
        gmem = None
        if guest_memfd is not None:
            if (not isinstance(guest_memfd_offset, int) or guest_memfd_offset < 0
                    or guest_memfd_offset % PAGE_SIZE):
                raise GuestMemoryError(f"guest_memfd offset {guest_memfd_offset!r} is not a "
                                       "page-aligned byte offset")
            flags |= abi.MEM_GUEST_MEMFD
            gmem = (guest_memfd, guest_memfd_offset)
        elif region2:
            gmem = (-1, 0)
        if slot is None:
            slot = self._free_slot_number()
        self._check_open()
        if shared is None:
            shared = self.shared_memory
        if shared:
            m, pin, mfd = new_shared_mapping(size, gpa)
        else:
            (m, pin), mfd = new_mapping(size, gpa), -1
        ms = MemorySlot(slot, gpa, size, flags, m, pin, mfd)
        try:
            self._set_region(slot, flags, gpa, size, ms.host_addr, gmem)
        except BaseException:
            ms._release()
            raise
        if gmem is not None:
            self._region2[slot] = gmem
        self.memory._add(ms)
        return ms

    def _set_region(self, slot: int, flags: int, gpa: int, size: int, host_addr: int,
                    gmem: Optional[Tuple[int, int]] = None) -> None:
        """KVM_SET_USER_MEMORY_REGION, or KVM_SET_USER_MEMORY_REGION2 when ``gmem`` is
        (guest_memfd, offset) ((-1, 0): REGION2 without a guest_memfd)."""
        what = f"slot={slot} gpa={gpa:#x} size={size:#x} flags={flags:#x}"
        if gmem is None:
            r = ffi.new("struct kvm_userspace_memory_region *")
            r.slot, r.flags, r.guest_phys_addr = slot, flags, gpa
            r.memory_size, r.userspace_addr = size, host_addr
            ioctl(self.fd, ioctls.KVM_SET_USER_MEMORY_REGION, r, what=what)
            return
        r2 = ffi.new("struct kvm_userspace_memory_region2 *")
        r2.slot, r2.flags, r2.guest_phys_addr = slot, flags, gpa
        r2.memory_size, r2.userspace_addr = size, host_addr
        if gmem[0] >= 0:
            r2.guest_memfd, r2.guest_memfd_offset = gmem
            what += f" guest_memfd={gmem[0]} offset={gmem[1]:#x}"
        ioctl(self.fd, ioctls.KVM_SET_USER_MEMORY_REGION2, r2, what=what)

    def remove_memory(self, slot: MemorySlot) -> None:
        """Delete a slot this VM holds (KVM_SET_USER_MEMORY_REGION with size 0) and give its
        host memory back. A slot already removed, or another VM's, raises
        :class:`~pykvm.errors.GuestMemoryError` before KVM is asked anything."""
        self._check_open()
        if not any(s is slot for s in self.memory):
            what = (f"memory slot {slot.slot} at {slot.gpa:#x}" if isinstance(slot, MemorySlot)
                    else repr(slot))
            raise GuestMemoryError(f"{what} is not a memory slot of this VM (already removed, "
                                   "or another VM's)")
        gmem = self._region2.pop(slot.slot, None)
        self._set_region(slot.slot, 0, slot.gpa, 0, 0, None if gmem is None else (-1, 0))
        self.memory._remove(slot)
        slot._release()

    def set_memory_flags(self, slot: MemorySlot, *, log_dirty: bool) -> None:
        """Turn dirty logging on or off for an existing slot."""
        flags = (slot.flags & ~abi.MEM_LOG_DIRTY_PAGES) | (abi.MEM_LOG_DIRTY_PAGES if log_dirty else 0)
        self._set_region(slot.slot, flags, slot.gpa, slot.size, slot.host_addr,
                         self._region2.get(slot.slot))
        slot.flags = flags

    def get_dirty_log(self, slot: MemorySlot) -> List[int]:
        """KVM_GET_DIRTY_LOG: guest-physical addresses of the pages written since the last call."""
        pages = slot.size // PAGE_SIZE
        words = (pages + 63) // 64
        bitmap = ffi.new("uint64_t[]", max(words, 1))
        d = ffi.new("struct kvm_dirty_log *")
        d.slot = slot.slot
        d.dirty_bitmap = bitmap
        ioctl(self.fd, ioctls.KVM_GET_DIRTY_LOG, d, what=f"slot={slot.slot}")
        out = []
        for w in range(words):
            bits = bitmap[w]
            while bits:
                low = bits & -bits
                out.append(slot.gpa + (w * 64 + low.bit_length() - 1) * PAGE_SIZE)
                bits ^= low
        return out

    def clear_dirty_log(self, slot: MemorySlot, gpas: Optional[Iterable[int]] = None) -> None:
        """KVM_CLEAR_DIRTY_LOG (api.rst "KVM_CLEAR_DIRTY_LOG", needs
        KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2): clear the dirty bits of the pages at ``gpas``
        (guest-physical addresses inside ``slot``, each rounded down to its page; default:
        every page of the slot) and write-protect them again, so the guest's next write to each
        shows in :meth:`get_dirty_log`. Only meaningful once manual protection is enabled,
        ``vm.enable_cap("MANUAL_DIRTY_LOG_PROTECT2", abi.DIRTY_LOG_MANUAL_PROTECT_ENABLE)``
        (then :meth:`get_dirty_log` reports without clearing). Raises ValueError for an address
        outside ``slot`` and :class:`~pykvm.errors.KvmError` if KVM refuses (EINVAL without
        manual protection enabled)."""
        pages = slot.size // PAGE_SIZE
        words = max((pages + 63) // 64, 1)
        bitmap = ffi.new("uint64_t[]", words)
        if gpas is None:
            for w in range(words):
                bitmap[w] = (1 << 64) - 1
        else:
            for gpa in gpas:
                if not slot.gpa <= gpa < slot.gpa + slot.size:
                    raise ValueError(f"{gpa:#x} is outside slot {slot.slot} "
                                     f"[{slot.gpa:#x}, {slot.gpa + slot.size:#x})")
                page = (gpa - slot.gpa) // PAGE_SIZE
                bitmap[page // 64] |= 1 << (page % 64)
        c = ffi.new("struct kvm_clear_dirty_log *")
        c.slot, c.first_page, c.num_pages = slot.slot, 0, pages
        c.dirty_bitmap = bitmap
        ioctl(self.fd, ioctls.KVM_CLEAR_DIRTY_LOG, c, what=f"slot={slot.slot} pages={pages}")

    # -- dirty ring -------------------------------------------------------------------------
    def enable_dirty_ring(self, size: int) -> None:
        """Enable per-vCPU dirty rings of ``size`` bytes each (KVM_ENABLE_CAP of
        KVM_CAP_DIRTY_LOG_RING, or of KVM_CAP_DIRTY_LOG_RING_ACQ_REL where KVM offers only
        that one, as on weakly ordered hosts; api.rst 8.29). ``size`` is a power of two, at
        least one page, at most what KVM_CHECK_EXTENSION answers for the capability; each
        entry (``struct kvm_dirty_gfn``) is 16 bytes. Only before the first vCPU exists: every
        vCPU made afterwards maps its ring (:attr:`pykvm.vcpu.Vcpu.dirty_ring`). Slots that log
        dirty pages (``add_memory(..., log_dirty=True)``) then report through the rings, not
        :meth:`get_dirty_log` (KVM refuses that). Raises
        :class:`~pykvm.errors.CapabilityMissing` when KVM offers neither capability, ValueError
        for a bad size or once a vCPU exists, and :class:`~pykvm.errors.KvmError` when KVM
        refuses (EINVAL: below KVM's reserved entries)."""
        if self.vcpus:
            raise ValueError("the dirty ring must be enabled before the first vCPU is created")
        if self.dirty_ring_bytes:
            raise ValueError(f"the dirty ring is already enabled ({self.dirty_ring_bytes} bytes)")
        if (not isinstance(size, int) or isinstance(size, bool) or size < PAGE_SIZE
                or size & (size - 1)):
            raise ValueError(f"dirty ring size {size!r} must be a power of two of at least "
                             f"{PAGE_SIZE} bytes")
        cap = "DIRTY_LOG_RING"
        most = self.check_extension(cap)
        if not most:
            cap = "DIRTY_LOG_RING_ACQ_REL"
            most = self.check_extension(cap)
        if not most:
            raise CapabilityMissing("host lacks KVM_CAP_DIRTY_LOG_RING (and "
                                    "KVM_CAP_DIRTY_LOG_RING_ACQ_REL)")
        if size > most:
            raise ValueError(f"dirty ring size {size} is above KVM's limit of {most} bytes "
                             f"(KVM_CAP_{cap})")
        self.enable_cap(cap, size)
        self.dirty_ring_bytes = size
        self.dirty_ring_ordered = cap.endswith("ACQ_REL")

    def reset_dirty_rings(self) -> int:
        """KVM_RESET_DIRTY_RINGS (api.rst 8.29): KVM write-protects again the pages of every
        ring entry marked harvested and frees those entries. Call it after harvesting and
        before reading the dirty pages' contents. Returns the number of entries reset (int).
        Raises :class:`~pykvm.errors.KvmError` naming the ioctl and errno."""
        return ioctl(self.fd, ioctls.KVM_RESET_DIRTY_RINGS)

    def harvest_dirty_rings(self, *, reset: bool = True) -> List[int]:
        """Harvest every vCPU's dirty ring (:meth:`pykvm.vcpu.DirtyRing.harvest`) and, when
        ``reset``, :meth:`reset_dirty_rings`. Returns the guest-physical addresses (int, one
        per page, sorted, each once) of the pages reported. Raises ValueError when the dirty
        ring is not enabled and :class:`~pykvm.errors.GuestMemoryError` for an entry naming a
        slot this VM does not hold (KVM reports only its own)."""
        if not self.dirty_ring_bytes:
            raise ValueError("the dirty ring is not enabled (Vm.enable_dirty_ring)")
        base = {s.slot: s.gpa for s in self.memory}
        pages = set()
        for v in self.vcpus:
            ring = v.dirty_ring
            if ring is None:
                continue
            for slot, offset in ring.harvest():
                gpa = base.get(slot & 0xFFFF)
                if gpa is None:
                    raise GuestMemoryError(f"dirty ring entry names slot {slot:#x}, which "
                                           "this VM does not hold")
                pages.add(gpa + offset * PAGE_SIZE)
        if reset:
            self.reset_dirty_rings()
        return sorted(pages)

    # -- guest_memfd and memory attributes ------------------------------------------------
    def create_guest_memfd(self, size: int, flags: int = 0) -> int:
        """KVM_CREATE_GUEST_MEMFD (api.rst 4.142, needs KVM_CAP_GUEST_MEMFD): a file of
        ``size`` bytes (page aligned) of guest-private memory bound to this VM, which user
        space cannot map, read or write; pass it to :meth:`add_memory` (``guest_memfd=``).
        ``flags``: KVM's GUEST_MEMFD_FLAG_* bits (0: none). Returns the fd (int), which the
        VM owns and closes with itself. Raises ValueError for a bad size and
        :class:`~pykvm.errors.KvmError` naming the ioctl and errno (saying the capability is
        missing when it is)."""
        if not isinstance(size, int) or size <= 0 or size % PAGE_SIZE:
            raise ValueError(f"guest_memfd size {size!r} must be a positive multiple of "
                             f"{PAGE_SIZE} bytes")
        g = ffi.new("struct kvm_create_guest_memfd *")
        g.size, g.flags = size, flags
        fd = ioctl(self.fd, ioctls.KVM_CREATE_GUEST_MEMFD, g,
                   what=f"size={size:#x} flags={flags:#x}")
        self._gmem_fds.append(fd)
        return fd

    def set_memory_attributes(self, gpa: int, size: int, *, private: bool) -> None:
        """KVM_SET_MEMORY_ATTRIBUTES (api.rst 4.141, needs KVM_CAP_MEMORY_ATTRIBUTES): make
        guest-physical [gpa, gpa + size) (bytes, page aligned) private (backed by its slot's
        guest_memfd: KVM_MEMORY_ATTRIBUTE_PRIVATE) or shared (``private=False``: backed by
        the slot's host mapping). KVM keeps no "get"; track the state yourself. Raises
        ValueError for an unaligned range and :class:`~pykvm.errors.KvmError` naming the
        ioctl and errno."""
        if gpa % PAGE_SIZE or size <= 0 or size % PAGE_SIZE:
            raise ValueError(f"[{gpa:#x}, +{size:#x}) is not a page-aligned range")
        a = ffi.new("struct kvm_memory_attributes *")
        a.address, a.size = gpa, size
        a.attributes = abi.MEMORY_ATTRIBUTE_PRIVATE if private else 0
        ioctl(self.fd, ioctls.KVM_SET_MEMORY_ATTRIBUTES, a,
              what=f"gpa={gpa:#x} size={size:#x} {'private' if private else 'shared'}")

    # -- kvm-clock (x86) --------------------------------------------------------------------
    if ioctls.row("KVM_GET_CLOCK").available:
        def get_clock(self) -> CData:
            """KVM_GET_CLOCK (api.rst 4.56, needs KVM_CAP_ADJUST_CLOCK): the VM's kvm-clock as
            a fresh ``struct kvm_clock_data *``: ``clock``, the kvm-clock (ns) the guest reads
            now; ``flags``, a mask of ``abi.CLOCK_TSC_STABLE`` (every vCPU sees the same
            clock), ``abi.CLOCK_REALTIME`` (``realtime``, the host's CLOCK_REALTIME in ns, was
            sampled with it) and ``abi.CLOCK_HOST_TSC`` (``host_tsc``, the host's TSC in
            cycles, was sampled with it); the bits KVM_CHECK_EXTENSION(KVM_CAP_ADJUST_CLOCK)
            returns say which of them this KVM can set. Raises
            :class:`~pykvm.errors.KvmError` if KVM refuses."""
            d = ffi.new("struct kvm_clock_data *")
            ioctl(self.fd, ioctls.KVM_GET_CLOCK, d)
            return d

        def set_clock(self, clock: int, *, realtime: Optional[int] = None) -> None:
            """KVM_SET_CLOCK (api.rst 4.55, needs KVM_CAP_ADJUST_CLOCK): set the VM's
            kvm-clock to ``clock`` (int, ns, 0 to 2**64-1). With ``realtime`` (int, ns of the
            host's CLOCK_REALTIME, e.g. a :meth:`get_clock` ``realtime``), the flag
            ``abi.CLOCK_REALTIME`` is set and KVM adds the time the host's CLOCK_REALTIME has
            moved since ``realtime`` to ``clock`` (a ``realtime`` ahead of the host's clock
            adds nothing). The guest sees the new value at its vCPUs' next entry. Raises
            ValueError for a value outside 0..2**64-1 and :class:`~pykvm.errors.KvmError`
            when KVM refuses (ENOTTY/EINVAL naming KVM_CAP_ADJUST_CLOCK where it is
            missing)."""
            for name, v in (("clock", clock), ("realtime", realtime)):
                if v is not None and (not isinstance(v, int) or not 0 <= v < 1 << 64):
                    raise ValueError(f"{name} must be an int in 0..2**64-1 (ns), not {v!r}")
            d = ffi.new("struct kvm_clock_data *")
            d.clock = clock
            if realtime is not None:
                d.flags, d.realtime = abi.CLOCK_REALTIME, realtime
            ioctl(self.fd, ioctls.KVM_SET_CLOCK, d,
                  what=f"clock={clock}" + ("" if realtime is None else f" realtime={realtime}"))

    # -- raw ioctls -------------------------------------------------------------------------
    def ioctl(self, row: Union[Ioctl, str], arg: Union[int, CData] = 0, *,
              what: str = "") -> int:
        """Issue a row of the ioctl table (:mod:`pykvm.abi.ioctls`) that has no method here on
        the VM fd: ``row`` is the :class:`~pykvm.abi.ioctls.Ioctl` or its name
        (``"KVM_CHECK_EXTENSION"``), ``arg`` an int for a row without an argument type, else a cffi pointer
        to (or array of at least the size of) the row's argument struct (``ffi.new(row.arg + " *")``; :data:`pykvm.abi.ffi` declares every row's
        struct). Returns the ioctl's non-negative result. Raises TypeError for an argument of another kind or smaller than
        the row's struct (the kernel would write past it), KeyError for an unknown name,
        ValueError for a row that is not issued on a VM fd or does not exist on this
        architecture, and :class:`~pykvm.errors.KvmError` (naming the row, ``what`` and the
        errno, and a missing capability) when KVM refuses. The escape hatch for selftests;
        the typed methods remain the way to call the rows they cover."""
        return raw_ioctl(self.fd, "vm", row, arg, what)

    # -- interrupts and eventfds ----------------------------------------------------------
    def create_irqchip(self) -> None:
        """KVM_CREATE_IRQCHIP (x86: PIC + IOAPIC + per-vCPU LAPIC)."""
        ioctl(self.fd, ioctls.KVM_CREATE_IRQCHIP)

    def irq_line(self, irq: int, level: int) -> None:
        """KVM_IRQ_LINE: drive GSI ``irq`` to ``level``."""
        lv = ffi.new("struct kvm_irq_level *")
        lv.irq, lv.level = irq, level
        ioctl(self.fd, ioctls.KVM_IRQ_LINE, lv, what=f"irq={irq} level={level}")

    def signal_msi(self, address: int, data: int) -> int:
        """KVM_SIGNAL_MSI; returns >0 if delivered, 0 if blocked by the guest."""
        m = ffi.new("struct kvm_msi *")
        m.address_lo, m.address_hi, m.data = address & 0xFFFFFFFF, address >> 32, data
        return ioctl(self.fd, ioctls.KVM_SIGNAL_MSI, m,
                     what=f"addr={address:#x} data={data:#x}")

    def ioeventfd(self, addr: int, length: int, *, pio: bool = False,
                  datamatch: Optional[int] = None, fd: Optional[int] = None) -> int:
        """KVM_IOEVENTFD: guest writes to ``addr`` signal an eventfd (returned) without an exit."""
        def attach(efd: int) -> None:
            e = ffi.new("struct kvm_ioeventfd *")
            e.addr, e.len, e.fd = addr, length, efd
            e.flags = (abi.IOEVENTFD_FLAG_PIO if pio else 0)
            if datamatch is not None:
                e.flags |= abi.IOEVENTFD_FLAG_DATAMATCH
                e.datamatch = datamatch
            ioctl(self.fd, ioctls.KVM_IOEVENTFD, e,
                  what=f"{'pio' if pio else 'mmio'} addr={addr:#x} len={length}")
        return self._with_eventfd(fd, attach)

    def remove_ioeventfd(self, addr: int, length: int, fd: int, *, pio: bool = False,
                         datamatch: Optional[int] = None) -> None:
        """KVM_IOEVENTFD with KVM_IOEVENTFD_FLAG_DEASSIGN: stop ``fd`` being signalled by guest
        writes to ``addr``; ``length``, ``pio`` and ``datamatch`` as given to :meth:`ioeventfd`.
        The eventfd stays open (an eventfd the VM made is still closed with it). Raises
        :class:`~pykvm.errors.KvmError` (ENOENT) when no such registration exists."""
        e = ffi.new("struct kvm_ioeventfd *")
        e.addr, e.len, e.fd = addr, length, fd
        e.flags = abi.IOEVENTFD_FLAG_DEASSIGN | (abi.IOEVENTFD_FLAG_PIO if pio else 0)
        if datamatch is not None:
            e.flags |= abi.IOEVENTFD_FLAG_DATAMATCH
            e.datamatch = datamatch
        ioctl(self.fd, ioctls.KVM_IOEVENTFD, e,
              what=f"deassign {'pio' if pio else 'mmio'} addr={addr:#x} len={length}")

    def irqfd(self, gsi: int, fd: Optional[int] = None) -> int:
        """KVM_IRQFD: writing to the returned eventfd raises GSI ``gsi``."""
        def attach(efd: int) -> None:
            f = ffi.new("struct kvm_irqfd *")
            f.fd, f.gsi = efd, gsi
            ioctl(self.fd, ioctls.KVM_IRQFD, f, what=f"gsi={gsi} fd={efd}")
        return self._with_eventfd(fd, attach)

    def _with_eventfd(self, fd: Optional[int], attach: Callable[[int], None]) -> int:
        """Run ``attach(efd)`` on ``fd`` or on a new eventfd that the VM then owns (closed with
        it, or at once if ``attach`` fails). A new eventfd the host cannot make raises
        :class:`~pykvm.errors.HostResourceError` (file descriptors, memory)."""
        if fd is None:
            try:
                efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            except OSError as e:               # EMFILE/ENFILE/ENOMEM: the host's limits
                raise (host_resource_error(e) or e) from e
        else:
            efd = fd
        try:
            attach(efd)
        except BaseException:
            if fd is None:
                os.close(efd)
            raise
        if fd is None:
            self._eventfds.append(efd)
        return efd

    def register_coalesced_mmio(self, addr: int, size: int, *, pio: bool = False) -> None:
        """KVM_REGISTER_COALESCED_MMIO: guest writes in the zone are queued in the ring page
        instead of exiting (drained by the run loop)."""
        z = ffi.new("struct kvm_coalesced_mmio_zone *")
        z.addr, z.size, z.pio = addr, size, 1 if pio else 0
        ioctl(self.fd, ioctls.KVM_REGISTER_COALESCED_MMIO, z,
              what=f"addr={addr:#x} size={size:#x}")
        self._coalesced.append((addr, size, pio))

    def unregister_coalesced_mmio(self, addr: int, size: int, *, pio: bool = False) -> None:
        """KVM_UNREGISTER_COALESCED_MMIO: stop coalescing the zone registered with the same
        ``addr``, ``size`` (bytes) and ``pio``."""
        z = ffi.new("struct kvm_coalesced_mmio_zone *")
        z.addr, z.size, z.pio = addr, size, 1 if pio else 0
        ioctl(self.fd, ioctls.KVM_UNREGISTER_COALESCED_MMIO, z,
              what=f"addr={addr:#x} size={size:#x}")
        self._coalesced.remove((addr, size, pio))

    # -- vCPUs and stats --------------------------------------------------------------------
    def create_vcpu(self, vcpu_id: Optional[int] = None) -> Vcpu:
        """KVM_CREATE_VCPU → :class:`~pykvm.vcpu.Vcpu` (ids count up from 0 by default).

        ``vcpu_id`` is the vCPU's id (x86: its initial APIC id), an int >= 0; KVM's limit is
        KVM_CAP_MAX_VCPU_ID. Raises ValueError for a bad id and a KvmError if KVM refuses it."""
        if vcpu_id is None:
            vcpu_id = len(self.vcpus)
        if not isinstance(vcpu_id, int) or isinstance(vcpu_id, bool) or not 0 <= vcpu_id < 1 << 31:
            raise ValueError(f"vCPU id must be an int in 0..2**31-1, not {vcpu_id!r}")
        fd = ioctl(self.fd, ioctls.KVM_CREATE_VCPU, vcpu_id, what=f"id={vcpu_id}")
        v = Vcpu(self, fd, vcpu_id)
        self.vcpus.append(v)
        return v

    def stats(self) -> Dict[str, object]:
        """The VM's binary stats (KVM_GET_STATS_FD) as {name: value}."""
        return _stats(self.fd)

    def close(self) -> None:
        """Close the VM (idempotent, safe from any thread): stop and close every vCPU (each
        waits until its running thread, if any, has left KVM_RUN), then close the VM fd and the
        eventfds it owns, then give guest memory back. Afterwards every method, and
        :attr:`memory`, raises :class:`~pykvm.errors.Closed`."""
        for v in list(self.vcpus):
            v.close()
        super().close()
        efds, self._eventfds = self._eventfds, []
        gfds, self._gmem_fds = self._gmem_fds, []
        for efd in efds + gfds:
            os.close(efd)
        self.memory._close()

    def __repr__(self) -> str:
        return f"<Vm fd={self._fd} slots={len(list(self.memory))} vcpus={len(self.vcpus)}>"


__all__ = ["Vm", "PykvmError"]
