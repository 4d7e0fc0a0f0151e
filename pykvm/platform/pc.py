"""The PC machine: which device answers at which port and address, the ACPI tables, the IRQ
routing, timed device events and S3 sleep/resume. Modelled on QEMU's ``pc`` (i440FX) machine as
kvm-unit-tests and multiboot kernels see it after SeaBIOS.

=====================  ================================================================
where                  what
=====================  ================================================================
in-kernel (KVM)        local APICs (0xFEE00000), IOAPIC (0xFEC00000), the two 8259 PICs
                       (0x20, 0xA0, ELCR 0x4D0), the i8254 PIT (0x40-0x43, 0x61) without
                       re-injection of lost ticks (QEMU ``kvm-pit.lost_tick_policy=discard``)
C run loop             COM1 (0x3F8), debug console (0xE9), isa-debug-exit (0xF4-0xF7)
0x60, 0x64             i8042 keyboard controller (:mod:`.i8042`): probing, reset, IRQ 1/12
0x70-0x71              CMOS RTC (:mod:`.rtc`), IRQ 8
0x92                   port 92: A20 reads as on; bit 0 written = reset
0x510-0x511            fw_cfg (:mod:`.fwcfg`)
0x600-0x60B            ACPI PM1a event/control blocks and the PM timer (:mod:`.pm`), SCI = IRQ 9;
                       moved or turned off by the guest through PMBA / PMREGMISC of 00:01.3
0xCF8-0xCFF            PCI configuration mechanism #1 (:mod:`.pci`); 0xCF9 reset control
0xE0-0xEB, 0x2000+     pc-testdev (:mod:`.testdev`), MMIO window 0xFF000000-0xFF00FFFF
0xE0000-0xFFFFF        ACPI tables (:mod:`.acpi`): RSDP at 0xE0000
anything else          unassigned: reads all-ones, writes are dropped (as on a PC bus)
=====================  ================================================================

Optional devices (``devices=``, ``pykvm run --device``), as QEMU's ``-device`` adds them:

* ``edu`` — QEMU's educational PCI device (:mod:`.edu`) at 00:03.0, BAR 0 at 0xFEA00000,
  INTA# on IRQ 11 (what SeaBIOS gives slot 3), MSI;
* ``intel-iommu`` — a VT-d IOMMU (:mod:`.vtd`) at 0xFED90000 with DMA and interrupt
  remapping, and an ACPI DMAR table.

GSI routing is QEMU's: ISA IRQs 0-15 reach the PICs (IRQ 2 is the cascade) and the IOAPIC pin of
the same number except IRQ 0 (the PIT), which reaches IOAPIC pin 2 — what the MADT's interrupt
source override says; GSIs 16-23 reach the IOAPIC only.

S3: a write of SLP_EN with SLP_TYP 1 to PM1a_CNT stops every vCPU with RAM kept. The machine
wakes at the RTC alarm when one is armed and PM1 RTC_EN is set, else at once; then vCPU 0
restarts in real mode at the FACS firmware waking vector (CS = vector >> 4, IP = vector & 0xF,
other segments 0) — or in flat 32-bit protected mode at X_Firmware_Waking_Vector when the OS set
that — and the other vCPUs wait for INIT/SIPI, as after a firmware resume. PM1 WAK_STS (and
RTC_STS) are set. Device state (APICs, PIC, PIT, RTC, PCI) is kept across the sleep.
"""
import errno
import heapq
import itertools
import struct
import threading
import time
import traceback
from typing import Callable, Dict, List, Optional, Tuple

from .. import abi
from ..errors import Closed, GuestMemoryError, KvmError
from . import acpi
from ..arch.x86 import modes, layout as L
from ..devices.fw_cfg import DATA_PORT as FWCFG_DATA, SELECTOR_PORT as FWCFG_SELECTOR, FwCfg
from ..devices.i8042 import I8042, PORTS as I8042_PORTS
from ..devices.pci_host import PM_FUNCTION, PciHost
from ..devices.acpi_pm import AcpiPm
from ..devices.cmos_rtc import CmosRtc
from ..devices.testdev import FLUSH_PORT, IOMEM_BASE, IOMEM_SIZE, IRQ_LINES, IRQ_PORT, SCRATCH_BYTE_PORT, SCRATCH_PORT, PcTestdev

DEVICES = ("edu", "intel-iommu")
EDU_SLOT = 3
EDU_BAR = 0xFEA00000
EDU_IRQ = 11

PORT92 = 0x92
RTC_IRQ = 8
SCI_IRQ = acpi.SCI_IRQ
ACPI_TABLES_ADDR = L.BIOS_AREA_START
PC_CLAIMED = L.PC_NO_RAM_FOR_IMAGES    # video window, ACPI + BIOS area (the EBDA is image RAM)


def qemu_gsi_routes() -> List[Tuple[int, int, int]]:
    """(gsi, irqchip, pin) as QEMU's pc sets them up for the in-kernel irqchip."""
    routes = []
    for i in range(8):
        if i != 2:
            routes.append((i, abi.IRQCHIP_PIC_MASTER, i))
    for i in range(8, 16):
        routes.append((i, abi.IRQCHIP_PIC_SLAVE, i - 8))
    for i in range(24):
        if i == 0:
            routes.append((0, abi.IRQCHIP_IOAPIC, 2))
        elif i != 2:
            routes.append((i, abi.IRQCHIP_IOAPIC, i))
    return routes


class Scheduler:
    """Timed callbacks on one daemon thread (monotonic nanoseconds). ``schedule(key, when,
    fn)`` replaces the pending event of the same key. A callback that raises is counted in
    ``failures`` (its traceback kept in ``last_failure``) and the thread goes on."""

    def __init__(self, clock: Callable[[], int] = time.monotonic_ns):
        self.clock = clock
        self._cond = threading.Condition()
        self._heap: List[tuple] = []
        self._live: Dict[str, int] = {}
        self._seq = itertools.count()
        self._thread: Optional[threading.Thread] = None
        self._closed = False
        self.failures = 0                     # device callbacks that raised
        self.last_failure: Optional[str] = None   # the traceback of the latest one

    def schedule(self, key: str, when_ns: Optional[int], fn: Callable[[], None]) -> None:
        """Call ``fn`` on the timer thread at monotonic time ``when_ns`` (nanoseconds), replacing
        the pending event of ``key``; ``when_ns`` None cancels it. Starts the thread on first use;
        does nothing once the scheduler is closed."""
        with self._cond:
            if self._closed:
                return
            if when_ns is None:
                self._live.pop(key, None)
                return
            n = next(self._seq)
            self._live[key] = n
            heapq.heappush(self._heap, (when_ns, n, key, fn))
            if self._thread is None:
                self._thread = threading.Thread(target=self._main, name="pykvm-pc-timers",
                                                daemon=True)
                self._thread.start()
            self._cond.notify()

    def _main(self) -> None:
        while True:
            with self._cond:
                while not self._closed:
                    while self._heap and self._live.get(self._heap[0][2]) != self._heap[0][1]:
                        heapq.heappop(self._heap)            # superseded
                    if self._heap:
                        wait = (self._heap[0][0] - self.clock()) / 1e9
                        if wait <= 0:
                            break
                        self._cond.wait(min(wait, 1.0))
                    else:
                        self._cond.wait()
                if self._closed:
                    return
                _, n, key, fn = heapq.heappop(self._heap)
                self._live.pop(key, None)
            try:
                fn()
            except Exception as e:            # a device callback must not kill the timer thread,
                self.failures += 1            # but its failure stays visible (pykvm's own bug)
                self.last_failure = "".join(traceback.format_exception(type(e), e,
                                                                       e.__traceback__))

    def close(self) -> None:
        """Stop the timer thread: pending events are dropped and later :meth:`schedule` calls
        ignored."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()


class _Rebased:
    """A device seen at ports moved by ``-delta``: an access at ``port`` reaches
    ``device`` at ``port + delta`` (the PM block wherever PMBA puts it; the device keeps
    QEMU pc's default addresses)."""

    def __init__(self, device, delta: int = 0):
        self.device = device
        self.delta = delta

    def read(self, port: int, size: int) -> int:
        return self.device.read(port + self.delta, size)

    def write(self, port: int, size: int, value: int) -> None:
        self.device.write(port + self.delta, size, value)


class PcMachine:
    """The devices of the PC machine for :class:`pykvm.arch.x86.platform.Platform`."""

    def __init__(self, machine, *, vcpus: int, ram_size: int, below_4g: int, above_4g: int,
                 pit: bool = True, devices=()):
        unknown = [d for d in devices if d not in DEVICES]
        if unknown:
            raise ValueError(f"no PC device {unknown[0]!r} (known: {', '.join(DEVICES)})")
        self.m = machine
        self.vcpus = vcpus
        self.ram_size = ram_size
        self.below_4g, self.above_4g = below_4g, above_4g
        self.pit = pit
        self.power_event: Optional[str] = None       # "poweroff" or "reset" once requested
        self.unassigned: Dict[int, int] = {}         # port -> accesses nobody answered
        self.msi_dropped = 0                         # MSIs no local APIC accepted
        self.sleeps = 0
        self.tables: Optional[acpi.AcpiTables] = None
        self.scheduler = Scheduler()
        self._pending_sleep: Optional[int] = None
        self._irq_lock = threading.Lock()
        self._s3 = threading.Condition()
        self._sleeping = False
        self._s3_kicked: set = set()
        self._parked: set = set()
        self._resume_pending: set = set()   # vCPUs yet to take their state after a wake
        self.fwcfg = FwCfg(ram_size=ram_size, nb_cpus=vcpus)
        self.pci = PciHost(on_reset=lambda: self._power("reset"))
        self.pm = AcpiPm(set_sci=lambda level: self.irq(SCI_IRQ, level),
                         on_sleep=self._on_sleep)
        self.rtc = CmosRtc(set_irq=lambda level: self.irq(RTC_IRQ, level),
                           on_alarm=lambda: self.pm.raise_status(0x400),
                           on_change=self._rtc_changed)
        self.rtc.set_memory_info(below_4g=below_4g, above_4g=above_4g, cpus=vcpus)
        self.testdev = PcTestdev(set_irq=self.irq)
        self.vtd = self.edu = None
        mem = machine.vm.memory
        if "intel-iommu" in devices:
            from ..devices.vtd import Vtd
            self.vtd = Vtd(mem, signal_msi=self._signal_msi, defer=self._vtd_defer)
        if "edu" in devices:
            from ..devices.edu import Edu
            self.edu = Edu(bdf=EDU_SLOT << 3, bar=EDU_BAR, intx_line=EDU_IRQ, memory=mem,
                           msi=self._device_msi, set_intx=lambda level: self.irq(EDU_IRQ, level),
                           translate=self._dma_translate)
            self.edu.pci.on_write = self.edu.config_changed
            self.pci.functions[(EDU_SLOT, 0)] = self.edu.pci
        self.i8042 = I8042(on_reset=lambda: self._power("reset"), set_irq=self.irq)
        self.port92 = 0x02
        # the port map, kept here only: fixed devices, then the PM block where the guest's
        # PMBA puts it (fixed devices win where they overlap, see _map_pm)
        self._fixed_ports: Dict[int, object] = {}
        for p in I8042_PORTS:
            self._fixed_ports[p] = self.i8042
        for p in (0x70, 0x71):
            self._fixed_ports[p] = self.rtc
        for p in range(0xCF8, 0xD00):
            self._fixed_ports[p] = self.pci
        for p in list(range(SCRATCH_PORT, SCRATCH_PORT + 4)) + \
                list(range(FLUSH_PORT, FLUSH_PORT + 4)) + \
                list(range(SCRATCH_BYTE_PORT, SCRATCH_BYTE_PORT + 4)) + \
                list(range(IRQ_PORT, IRQ_PORT + IRQ_LINES)):
            self._fixed_ports[p] = self.testdev
        self.ports: Dict[int, object] = {}
        self.pm_base: Optional[int] = None           # where the PM block answers (None: off)
        self._pm_port = _Rebased(self.pm)
        self.pci.functions[PM_FUNCTION].on_write = self._map_pm
        self._map_pm()

    # -- set-up ------------------------------------------------------------------------------
    def create_chips(self) -> None:
        """The in-kernel irqchip and PIT, with QEMU's GSI routing."""
        vm = self.m.vm
        vm.create_irqchip()
        vm.set_gsi_routing(qemu_gsi_routes())
        if self.pit:
            vm.create_pit2()
            try:
                vm.reinject_control(False)
            except Exception:                 # an old KVM without the ioctl: keep its default
                pass

    def write_tables(self, mem) -> acpi.AcpiTables:
        """Write the ACPI tables into the BIOS area of guest RAM."""
        from ..devices.vtd import BASE as VTD_BASE
        self.tables = acpi.build_tables(ACPI_TABLES_ADDR, self.vcpus,
                                        iommu=VTD_BASE if self.vtd else 0)
        mem.write(self.tables.base, self.tables.blob)
        return self.tables

    def close(self) -> None:
        """Stop the device timers and release any vCPU thread waiting in S3 sleep."""
        self.scheduler.close()
        with self._s3:
            self._sleeping = False
            self._s3.notify_all()

    # -- interrupts ------------------------------------------------------------------------
    def irq(self, gsi: int, level: int) -> None:
        """Drive ISA IRQ / GSI ``gsi`` (through KVM's routing)."""
        with self._irq_lock:
            try:
                self.m.vm.irq_line(gsi, level)
            except Exception:
                if not getattr(self.m, "closed", False):
                    raise

    def _signal_msi(self, address: int, data: int) -> None:
        """Deliver a compatibility-format MSI (guest-programmed ``address``/``data``) through
        KVM_SIGNAL_MSI. A message no local APIC accepts (KVM answers EPERM: no destination
        matched) or that is no valid MSI (EINVAL: e.g. bits KVM reserves in the address) is
        dropped and counted in ``msi_dropped``, as a PCI write to an address nothing decodes is
        lost on real hardware; the guest's values never end the VM."""
        try:
            self.m.vm.signal_msi(address, data)
        except KvmError as e:
            if getattr(self.m, "closed", False):
                return
            if e.errno in (errno.EPERM, errno.EINVAL):
                self.msi_dropped += 1
                return
            raise
        except Closed:
            if not getattr(self.m, "closed", False):
                raise

    def _device_msi(self, source_id: int, address: int, data: int) -> None:
        """An MSI a PCI device sends: through the IOMMU's interrupt remapping if there is one."""
        if self.vtd is not None:
            self.vtd.deliver_msi(address, data, source_id)
        else:
            self._signal_msi(address, data)

    def _dma_translate(self, source_id: int, address: int, write: bool) -> int:
        return self.vtd.translate(source_id, address, write) if self.vtd else address

    def _vtd_defer(self, delay_ns: int, fn: Callable[[], None]) -> None:
        """The IOMMU's handle on the timer thread: ``fn`` in ``delay_ns`` nanoseconds (its
        invalidation queue's next step; one pending at a time)."""
        self.scheduler.schedule("vtd-iq", self.scheduler.clock() + delay_ns, fn)

    def _rtc_changed(self) -> None:
        self.scheduler.schedule("rtc", self.rtc.next_event_ns(), self._rtc_timer)

    def _rtc_timer(self) -> None:
        self.rtc.poll()
        self._rtc_changed()

    def _pm_timer(self) -> None:
        self.pm.timer_event()
        self._pm_changed()

    def _pm_changed(self) -> None:
        when = self.pm.next_timer_flip_ns() if self.pm.timer_interrupt_enabled else None
        self.scheduler.schedule("pmtmr", when, self._pm_timer)

    # -- the port map ------------------------------------------------------------------------
    def _map_pm(self) -> None:
        """Put the PM block where 00:01.3's PMBA and PMREGMISC say (called after every
        configuration write to that function, as QEMU's ``pm_io_space_update``): base = PMBA &
        0xFFC0, decoded while PMREGMISC bit 0 (PM I/O enable) is set. Twelve ports (PM1a_EVT,
        PM1a_CNT, PM_TMR); where they overlap a fixed device's port (fw_cfg and port 0x92
        included) the fixed device answers.
        Bounded work: a few dozen dictionary entries."""
        base, enabled = self.pci.pm_io_space()
        new_base = base if enabled else None
        if new_base == self.pm_base and self.ports:
            return
        self.pm_base = new_base
        ports: Dict[int, object] = {}
        if new_base is not None:
            self._pm_port.delta = acpi.PM_BASE - new_base
            for p in range(new_base, min(new_base + 12, 0x10000)):
                if p not in (FWCFG_SELECTOR, FWCFG_DATA, PORT92):
                    ports[p] = self._pm_port
        ports.update(self._fixed_ports)
        self.ports = ports

    # -- exits -----------------------------------------------------------------------------
    def io_read(self, port: int, size: int) -> int:
        """Serve an IN of ``size`` bytes (1, 2 or 4) at I/O ``port``: from the device that owns the
        port, fw_cfg or port 0x92. Unassigned ports read all-ones and are counted in
        ``unassigned``."""
        dev = self.ports.get(port)
        if dev is not None:
            return dev.read(port, size)
        if port in (FWCFG_SELECTOR, FWCFG_DATA):
            return int.from_bytes(self.fwcfg.io_read(port, size, 1), "little")
        if port == PORT92:
            return self.port92
        self.unassigned[port] = self.unassigned.get(port, 0) + 1
        return (1 << (8 * size)) - 1

    def io_write(self, port: int, size: int, value: int) -> None:
        """Serve an OUT of ``value`` (``size`` bytes) at I/O ``port``: to the device that owns the
        port, fw_cfg, or port 0x92 (bit 0 requests a reset; A20 stays enabled). Writes to
        unassigned ports are dropped and counted in ``unassigned``."""
        dev = self.ports.get(port)
        if dev is not None:
            dev.write(port, size, value)
            if dev is self._pm_port:
                self._pm_changed()
            return
        if port in (FWCFG_SELECTOR, FWCFG_DATA):
            self.fwcfg.io_write(port, size, value.to_bytes(size, "little"))
        elif port == PORT92:
            self.port92 = (value & 0x02) | 0x02      # A20 stays on
            if value & 0x01:
                self._power("reset")
        else:
            self.unassigned[port] = self.unassigned.get(port, 0) + 1

    def handle_exit(self, index: int, ex) -> bool:
        """Serve an exit; False when the run must end (a power event, an exit not ours)."""
        name = ex.name
        if name == "IO":
            port, size, count = ex.port, ex.size, ex.count
            # guest memory refusing a request made on the guest's behalf (a device's DMA) is
            # the guest's fault: the access ends as a master abort, never as a VMM error
            if ex.is_out:
                data = ex.data
                try:
                    for i in range(count):
                        self.io_write(port, size,
                                      int.from_bytes(data[i * size:(i + 1) * size], "little"))
                except GuestMemoryError:
                    pass
            else:
                try:
                    if port == FWCFG_DATA and size == 1:
                        out = self.fwcfg.io_read(port, 1, count)
                    else:
                        out = b"".join(self.io_read(port, size).to_bytes(size, "little")
                                       for _ in range(count))
                except GuestMemoryError:
                    out = b"\xff" * (size * count)
                ex.respond(out)
        elif name == "MMIO":
            addr, n = ex.phys_addr, ex.len
            dev = None
            if IOMEM_BASE <= addr < IOMEM_BASE + IOMEM_SIZE:
                dev = self.testdev
            elif self.vtd is not None and 0xFED90000 <= addr < 0xFED91000:
                dev = self.vtd
            elif self.edu is not None and self.edu.decodes(addr):
                dev = self.edu
            if dev is not None:
                # a device reports a guest-programmed bad address itself; should guest memory
                # still refuse a request made on the guest's behalf, it is the guest's fault
                # and ends as a master abort, never as a VMM error
                if ex.is_write:
                    try:
                        dev.mmio_write(addr, ex.data)
                    except GuestMemoryError:
                        pass
                else:
                    try:
                        data = dev.mmio_read(addr, n)
                    except GuestMemoryError:
                        data = b"\xff" * n
                    ex.respond(data)
            elif not ex.is_write:
                ex.respond(b"\xff" * n)               # nothing there: a master abort
        else:
            return False
        if self._pending_sleep is not None:
            typ, self._pending_sleep = self._pending_sleep, None
            if typ == acpi.SLP_TYP_S3:
                return self.suspend(index)
            if typ == acpi.SLP_TYP_S5:
                self._power("poweroff")
        return self.power_event is None

    def _power(self, what: str) -> None:
        if self.power_event is None:
            self.power_event = what

    def _on_sleep(self, slp_typ: int) -> None:
        self._pending_sleep = slp_typ

    # -- S3 ------------------------------------------------------------------------------------
    def hold(self, index: int) -> bool:
        """vCPU ``index``'s run was kicked: if S3 did it, park until the machine wakes (then
        True: run on, in the state the wake gave it), else False."""
        with self._s3:
            if index not in self._s3_kicked:
                return False
            self._s3_kicked.discard(index)
            self._parked.add(index)
            self._s3.notify_all()
            while self._sleeping and not self.m._stop and not self.m.closed:
                self._s3.wait(0.05)
            self._parked.discard(index)
            if self.m._stop:
                return False
        self._apply_resume(index)
        return True

    def _wait(self, until_ns: int) -> bool:
        """Sleep until ``until_ns`` (monotonic) unless the machine is stopped; True if woken
        on time."""
        while True:
            left = until_ns - time.monotonic_ns()
            if left <= 0:
                return True
            if self.m._stop or self.m.closed:
                return False
            time.sleep(min(left / 1e9, 0.01))

    def suspend(self, index: int) -> bool:
        """S3 entered by vCPU ``index``; returns when the machine has woken (True: run on).

        The other vCPUs are kicked and park in :meth:`hold`. Every vCPU takes its wake state
        (vCPU 0 at the waking vector, the others waiting for INIT/SIPI) in its own thread, as
        it leaves S3, so no vCPU ioctl ever targets a vCPU another thread runs. A vCPU that
        enters S3 while another one is already taking the machine there parks like the others
        (two vCPUs writing SLP_EN at once put the machine to sleep once)."""
        others = [j for j in range(len(self.m.vcpus)) if j != index]
        with self._s3:
            if self._sleeping:                     # another vCPU is suspending the machine
                self._s3_kicked.add(index)
                joined = True
            else:
                joined = False
                self._sleeping = True
                self._s3_kicked.update(others)
        if joined:
            return self.hold(index)
        self.sleeps += 1
        for j in others:
            try:
                self.m.loops[j].kick()
            except Exception:
                pass
        # wait (briefly) for every other vCPU to be parked or outside KVM_RUN
        deadline = time.monotonic() + 1.0
        with self._s3:
            while time.monotonic() < deadline and any(
                    j not in self._parked and self.m.vcpus[j]._runner is not None
                    for j in others):
                self._s3.wait(0.01)
        # when does the machine wake?
        wake_ns = time.monotonic_ns()
        by_rtc = False
        if self.pm.rtc_wake_enabled and self.rtc.alarm_armed():
            when = self.rtc.next_event_ns()
            if when is not None:
                wake_ns, by_rtc = when, True
        woke = self._wait(wake_ns)
        if woke:
            self.pm.wake(by_rtc)
            self.rtc.poll()
            with self._s3:
                self._resume_pending = set(range(len(self.m.vcpus)))
        with self._s3:
            self._sleeping = False
            self._s3.notify_all()
        if woke:
            self._apply_resume(index)
        return woke

    def _apply_resume(self, index: int) -> None:
        """Give vCPU ``index`` (called from its own thread) its state after an S3 wake, once:
        vCPU 0 restarts at the FACS waking vector, the others wait for INIT/SIPI."""
        with self._s3:
            if index not in self._resume_pending:
                return
            self._resume_pending.discard(index)
        v = self.m.vcpus[index]
        if index != 0:
            v.set_mp_state("UNINITIALIZED")
            return
        vec, xvec = self.waking_vectors()
        if xvec:
            # ACPI: a nonzero X_Firmware_Waking_Vector asks for a 32-bit protected-mode wake
            sregs = v.get_sregs()
            modes.fill_protected_mode_sregs(sregs)
            sregs.gdt.base, sregs.gdt.limit = 0, 0
            v.set_sregs(sregs)
            modes._set_regs(v, rip=xvec & 0xFFFFFFFF, rsp=0)
        else:
            modes.setup_real_mode(v, (vec >> 4) & 0xFFFF, vec & 0xF, sp=0)
        v.set_mp_state("RUNNABLE")

    def waking_vectors(self) -> Tuple[int, int]:
        """(Firmware_Waking_Vector, X_Firmware_Waking_Vector) from the FACS in guest RAM."""
        raw = self.m.vm.memory.read(self.tables.addr["FACS"], 64)
        return (struct.unpack_from("<I", raw, acpi.FACS_WAKING_VECTOR)[0],
                struct.unpack_from("<Q", raw, acpi.FACS_X_WAKING_VECTOR)[0])
