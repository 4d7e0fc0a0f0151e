"""The PC machine: which device answers at which port and address, the ACPI tables, the IRQ
routing, timed device events and S3 sleep/resume. Modelled on QEMU's ``pc`` (i440FX) machine as
kvm-unit-tests and multiboot kernels see it after SeaBIOS. Every device sits on the port-I/O
or the MMIO bus (:mod:`pykvm.devices.bus`) at the place the table below gives; the platform
itself only wires interrupts, timers, DMA translation and power events between them.

=====================  ================================================================
where                  what
=====================  ================================================================
in-kernel (KVM)        local APICs (0xFEE00000), IOAPIC (0xFEC00000), the two 8259 PICs
                       (0x20, 0xA0, ELCR 0x4D0), the i8254 PIT (0x40-0x43, 0x61) without
                       re-injection of lost ticks (QEMU ``kvm-pit.lost_tick_policy=discard``),
                       created when the guest first touches its ports (see below)
C run loop             COM1 (0x3F8), debug console (0xE9), isa-debug-exit (0xF4-0xF7)
0x60, 0x64             i8042 keyboard controller (:mod:`pykvm.devices.i8042`), IRQ 1/12
0x70-0x71              CMOS RTC (:mod:`pykvm.devices.cmos_rtc`), IRQ 8
0x92                   System Control Port A (:mod:`pykvm.devices.port92`)
0x510-0x511            fw_cfg (:mod:`pykvm.devices.fw_cfg`)
0x600-0x60B            ACPI PM1a event/control blocks and the PM timer (:mod:`pykvm.devices.acpi_pm`), SCI = IRQ 9;
                       moved or turned off by the guest through PMBA / PMREGMISC of 00:01.3
0xCF8-0xCFF            PCI configuration mechanism #1 (:mod:`pykvm.devices.pci_host`); 0xCF9 reset control
0xE0-0xEB, 0x2000+     pc-testdev (:mod:`pykvm.devices.testdev`), MMIO window 0xFF000000-0xFF00FFFF
0xE0000-0xFFFFF        ACPI tables (:mod:`.acpi`): RSDP at 0xE0000
0xFEB00000 + i*0x200   virtio-mmio device i (``virtio_mmio=``, :mod:`pykvm.devices.virtio.mmio`),
                       i < 8, its interrupt on IOAPIC GSI 16 + i (level)
anything else          unassigned: reads all-ones, writes are dropped (as on a PC bus)
=====================  ================================================================

Optional devices (``devices=``, ``pykvm run --pc-device``), as QEMU's ``-device`` adds them:

* ``edu`` — QEMU's educational PCI device (:mod:`pykvm.devices.edu`) at 00:03.0, BAR 0 at 0xFEA00000,
  INTA# on IRQ 11 (what SeaBIOS gives slot 3), MSI;
* ``intel-iommu`` — a VT-d IOMMU (:mod:`pykvm.devices.vtd`) at 0xFED90000 with DMA and interrupt
  remapping, and an ACPI DMAR table.

Virtio devices on PCI (``virtio_pci=``: a sequence of
:class:`pykvm.devices.virtio.VirtioDevice` objects, at most :data:`VIRTIO_PCI_MAX`), as QEMU's
``-device virtio-*-pci`` adds them: device *i* is function 00:(4 + *i*).0
(:mod:`pykvm.devices.virtio.pci`), its MSI-X table in BAR 1 at 0xFE000000 + *i* x 0x10000 and its
virtio registers in BAR 4 0x4000 above that, INTA# on IRQ 10 or 11 (SeaBIOS's PIIX routing:
PIRQ ``(slot + pin - 1) & 3`` of 10, 10, 11, 11). INTx lines are wired-OR: a line shared by
several functions (edu included) is high while any of them holds it.

Virtio devices on virtio-mmio (``virtio_mmio=``: a sequence of
:class:`pykvm.devices.virtio.VirtioDevice` objects, at most :data:`VIRTIO_MMIO_MAX`) sit where
QEMU's microvm puts them: device *i* at 0xFEB00000 + *i* x 0x200, its level-triggered interrupt
on IOAPIC GSI 16 + *i* (a GSI only the IOAPIC has, so no ISA device shares it). A Linux guest
finds them through the kernel command line, to which :meth:`PcPlatform.load` appends one
``virtio_mmio.device=512@<base>:<gsi>`` per device (``CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES``),
as QEMU's microvm does; other guests probe the windows (MagicValue "virt" at offset 0).

The PIT is KVM's, created on the guest's first access to one of its ports (0x40-0x43,
0x61): that access exits to the VMM, which creates the PIT (``KVM_CREATE_PIT2``, then
``KVM_REINJECT_CONTROL`` for the lost-tick policy) and makes the vCPU execute the instruction
again (:meth:`.x86.X86Platform.replay_port_io`), so the guest sees the PIT of a PC from its
first access on. A guest that never touches the PIT never pays for it: on the kvm_pvm hosts
measured (Intel Xeon, 2 CPUs, Linux 6.18) setting a new PIT's lost-tick policy, or
destroying a PIT that re-injects, waits for one or two SRCU grace periods of the VM, 12-15
ms each, more than the rest of the machine's start-up. A PIT created this way starts its
channels at the moment of that first access, as if the PC's power-on had happened then.

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
from __future__ import annotations

import errno
import struct
import threading
import time

from .. import abi, status
from ..arch.x86 import layout as L, modes
from ..boot import detect, read_head
from ..devices.acpi_pm import AcpiPm
from ..devices.bus import MMIO_LIMIT, PIO_LIMIT, Bus, BusConflict
from ..devices.clock import Scheduler
from ..devices.cmos_rtc import CmosRtc
from ..devices.edu import Edu
from ..devices.fw_cfg import FwCfg
from ..devices.i8042 import I8042
from ..devices.pci_host import PM_FUNCTION, PciHost
from ..devices.port92 import Port92
from ..devices.virtio import VirtioDevice
from ..devices.virtio.mmio import MAX_ACCESS as VIRTIO_MMIO_ACCESS, MMIO_SIZE as VIRTIO_MMIO_SIZE
from ..devices.virtio.mmio import VirtioMmio, cmdline_fragment
from ..devices.virtio.pci import VirtioPci
from . import virtio_devices
from ..devices.testdev import PcTestdev
from ..devices.vtd import Vtd
from ..errors import Closed, KvmError
from . import acpi
from .base import MachineControl
from .x86 import XAPIC_MAX_CPUS, X86Platform

TYPE_CHECKING = False            # typing is not imported at run time (~5 ms of every start)
if TYPE_CHECKING:
    from typing import Callable, ClassVar, Dict, List, Optional, Tuple

DEVICES = ("edu", "intel-iommu")       # optional devices, QEMU's -device names
PIT_PORTS = range(0x40, 0x44)          # KVM's i8254 (KVM_PIT_BASE_ADDRESS, KVM_PIT_MEM_LENGTH)
SPEAKER_PORT = 0x61                    # its port 0x61 (KVM_SPEAKER_BASE_ADDRESS)
EDU_SLOT = 3
EDU_BAR = 0xFEA00000
EDU_IRQ = 11
VIRTIO_MMIO_BASE = 0xFEB00000          # QEMU microvm's first virtio-mmio window
VIRTIO_PCI_SLOT = 4                    # first PCI slot of virtio-pci functions
VIRTIO_PCI_MAX = 8
VIRTIO_PCI_BARS = 0xFE000000           # BAR 1 of function i at + i * 0x10000, BAR 4 at + 0x4000
PIRQ_LINES = acpi.PIRQ_IRQS              # SeaBIOS's PIRQA-D on the PIIX
VIRTIO_MMIO_GSI = 16                   # device i: GSI 16 + i (IOAPIC pins 16-23)
VIRTIO_MMIO_MAX = 8
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


class PcPlatform(X86Platform):
    """The PC machine (module docstring). ``devices``: optional devices by QEMU's ``-device``
    name (:data:`DEVICES`); ``cpuid``: as :class:`.x86.X86Platform`; ``irqchip``/``pit``: the
    PC always has both (True; False is refused); ``virtio`` (and ``virtio_pci``): virtio
    device models (:class:`pykvm.devices.virtio.VirtioDevice`) as PCI functions
    (:attr:`virtio_pci_devices` lists ``(slot, transport)``); ``virtio_mmio``: models on
    virtio-mmio transports (:attr:`virtio_mmio_devices` lists ``(base, gsi, transport)``); see
    the module docstring. The machine closes the models it was given. Raises
    :class:`ValueError` for an unknown device name, more virtio devices than
    :data:`VIRTIO_PCI_MAX` or :data:`VIRTIO_MMIO_MAX`, or one that is not a VirtioDevice."""
    name: ClassVar[str] = "pc"
    boot_vcpus_all: ClassVar[bool] = False       # vCPU 0 starts; the others wait for INIT/SIPI
    claimed = PC_CLAIMED
    bios_area: ClassVar[bool] = True

    def __init__(self, vm, kvm, control: MachineControl, *, vcpus: int, mem_size: int,
                 cpuid=None, devices=(), irqchip: bool = True, pit: bool = True,
                 lost_tick_policy: str = "discard", virtio_mmio=(), virtio_pci=(), virtio=()):
        if not (irqchip and pit):
            raise ValueError("the pc machine always has the in-kernel irqchip and PIT")
        if lost_tick_policy not in ("delay", "discard"):
            raise ValueError(f"lost_tick_policy {lost_tick_policy!r} is not delay or discard "
                             "(QEMU's kvm-pit policies)")
        self.lost_tick_policy = lost_tick_policy
        devices = tuple(devices)
        unknown = [d for d in devices if d not in DEVICES]
        if unknown:
            raise ValueError(f"no PC device {unknown[0]!r} (known: {', '.join(DEVICES)})")
        virtio_mmio = tuple(virtio_mmio)
        if len(virtio_mmio) > VIRTIO_MMIO_MAX:
            raise ValueError(f"{len(virtio_mmio)} virtio-mmio devices; the pc machine has "
                             f"{VIRTIO_MMIO_MAX} windows (GSIs {VIRTIO_MMIO_GSI}-"
                             f"{VIRTIO_MMIO_GSI + VIRTIO_MMIO_MAX - 1})")
        virtio_pci = tuple(virtio_pci) + tuple(virtio)       # the PC's own transport is PCI
        if len(virtio_pci) > VIRTIO_PCI_MAX:
            raise ValueError(f"{len(virtio_pci)} virtio-pci devices; the pc machine has "
                             f"{VIRTIO_PCI_MAX} slots for them")
        for name, ds in (("virtio_mmio", virtio_mmio), ("virtio_pci", virtio_pci)):
            for d in ds:
                if not isinstance(d, VirtioDevice):
                    raise ValueError(f"{name} takes VirtioDevice objects, not {d!r}")
        super().__init__(vm, kvm, control, vcpus=vcpus, mem_size=mem_size, cpuid=cpuid)
        self.devices = devices
        self.power_event: Optional[str] = None       # "poweroff" or "reset" once requested
        self.msi_dropped = 0                         # MSIs no local APIC accepted
        self.edu_bar_conflicts = 0                   # BAR placements over another device
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
        self._vcpus: dict = {}              # index -> vCPU, as setup_vcpu meets them
        self.pit_created = False                    # KVM's PIT exists (made at first use)
        self._pit_lock = threading.Lock()
        self.pio = Bus("pio", PIO_LIMIT)
        self.mmio = Bus("mmio", MMIO_LIMIT)
        mem = vm.memory
        below, above = self.below_4g, self.above_4g
        # the devices, each at its place on a bus (fixed devices first: they win over the PM
        # block where the guest moves it onto them, see _map_pm)
        self.i8042 = I8042(on_reset=lambda: self._power("reset"), set_irq=self.irq)
        self.rtc = CmosRtc(set_irq=lambda level: self.irq(RTC_IRQ, level),
                           on_alarm=lambda: self.pm.raise_status(0x400),
                           on_change=self._rtc_changed)
        self.rtc.set_memory_info(below_4g=below, above_4g=above, cpus=vcpus)
        self.pci = PciHost(on_reset=lambda: self._power("reset"))
        self.fwcfg = FwCfg(ram_size=mem_size, nb_cpus=vcpus)
        self.port92 = Port92(on_reset=lambda: self._power("reset"))
        self.testdev = PcTestdev(set_irq=self.irq)
        self.pm = AcpiPm(set_sci=lambda level: self.irq(SCI_IRQ, level), on_sleep=self._on_sleep,
                         on_change=self._pm_changed)
        for dev in (self.i8042, self.rtc, self.pci, self.fwcfg, self.port92, self.testdev):
            self.pio.attach(dev)
        self.mmio.attach(self.testdev.iomem)
        self.virtio_mmio_devices: List[Tuple[int, int, VirtioMmio]] = []
        for i, model in enumerate(virtio_mmio):
            base, gsi = VIRTIO_MMIO_BASE + i * VIRTIO_MMIO_SIZE, VIRTIO_MMIO_GSI + i
            transport = VirtioMmio(model, mem, set_irq=lambda level, g=gsi: self.irq(g, level))
            transport.enable_fastpath(vm, base, gsi, quiet=self.control.stopping)
            self.mmio.insert(base, VIRTIO_MMIO_SIZE, transport, max_access=VIRTIO_MMIO_ACCESS,
                             name=f"virtio-mmio{i}")
            self.virtio_mmio_devices.append((base, gsi, transport))
        self._intx_sources: Dict[int, set] = {}    # ISA line -> PCI functions holding it
        self._intx_lock = threading.Lock()
        self.virtio_bar_conflicts = 0
        self.virtio_pci_devices: List[Tuple[int, VirtioPci]] = []
        for i, model in enumerate(virtio_pci):
            slot = VIRTIO_PCI_SLOT + i
            line = PIRQ_LINES[slot & 3]
            bar1 = VIRTIO_PCI_BARS + i * 0x10000
            transport = VirtioPci(model, mem, bars=(bar1, bar1 + 0x4000), intx_line=line,
                                  send_msi=lambda a, d, b=slot << 3: self._device_msi(b, a, d),
                                  set_intx=lambda level, n=line, b=slot: self._intx(n, b, level))
            self.pci.functions[(slot, 0)] = transport.pci
            transport.pci.on_write = lambda t=transport: self._virtio_pci_config_written(t)
            self.virtio_pci_devices.append((slot, transport))
            self._map_virtio_pci(transport)
        self.vtd = self.edu = None
        if "intel-iommu" in devices:
            self.vtd = Vtd(mem, signal_msi=self._signal_msi, defer=self._vtd_defer)
            self.mmio.attach(self.vtd)
        for _, t in self.virtio_pci_devices:    # a C data path sends MSIs itself: no IOMMU
            t.fastpath_vm = self.vm if self.vtd is None else None
        if "edu" in devices:
            self.edu = Edu(bdf=EDU_SLOT << 3, bar=EDU_BAR, intx_line=EDU_IRQ, memory=mem,
                           msi=self._device_msi,
                           set_intx=lambda level: self._intx(EDU_IRQ, EDU_SLOT, level),
                           translate=self._dma_translate)
            self.pci.functions[(EDU_SLOT, 0)] = self.edu.pci
            self.edu.pci.on_write = self._edu_config_written
            self._map_edu()
        self.pm_base: Optional[int] = None           # where the PM block answers (None: off)
        self._pm_mapped = False
        self.pci.functions[PM_FUNCTION].on_write = self._map_pm
        self._map_pm()
        self._write_tables()

    make_virtio = staticmethod(virtio_devices.build)   # disks, rng, console -> models

    @classmethod
    def max_vcpus(cls, image_format: str, **_options) -> Tuple[Optional[int], str]:
        """255 (:data:`.x86.XAPIC_MAX_CPUS`): the MADT gives every vCPU an xAPIC id."""
        return XAPIC_MAX_CPUS, "the pc machine's MADT and 8-bit xAPIC ids (0xff is broadcast) describe"

    # -- set-up ------------------------------------------------------------------------------
    def _create_irqchip(self) -> None:
        """The in-kernel irqchip, with QEMU's GSI routing, before RAM (see
        :meth:`.x86.X86Platform._create_irqchip`); the PIT comes at its first use
        (:meth:`_ensure_pit`). Lost PIT ticks follow
        ``lost_tick_policy`` as QEMU's ``kvm-pit`` does: "discard" (the default here;
        KVM_REINJECT_CONTROL off) or "delay" (QEMU's default and a new PIT's: missed ticks are
        re-injected; no ioctl).

        Measured on kvm_pvm hosts (Intel Xeon, 2 CPUs, Linux 6.18): a PIT whose re-injection is
        on holds an IRQ ack notifier, and removing it waits for an SRCU grace period of the
        VM's irq_srcu, 12-15 ms whenever a grace period ended shortly before (the routing just
        set up), 0.1-0.4 ms otherwise. "discard" pays that once, at the PIT's creation;
        "delay" pays it, and a second one for the mask notifier, when the VM is destroyed (26
        ms median against 0.4 ms), so "discard" costs less over a VM's life."""
        vm = self.vm
        vm.create_irqchip()
        vm.set_gsi_routing(qemu_gsi_routes())
        self.irqchip = True

    def _ensure_pit(self) -> None:
        """Create the in-kernel PIT with the lost-tick policy, once (module docstring)."""
        with self._pit_lock:
            if self.pit_created:
                return
            vm = self.vm
            vm.create_pit2()
            if self.lost_tick_policy == "discard":
                try:
                    vm.reinject_control(False)
                except KvmError:              # an old KVM without the ioctl: keep its default
                    pass
            self.pit_created = True

    def _write_tables(self) -> None:
        """The ACPI tables, in the BIOS area of guest RAM."""
        self.tables = acpi.build_tables(ACPI_TABLES_ADDR, self.vcpus,
                                        iommu=self.vtd.MMIO_RANGES[0][0] if self.vtd else 0,
                                        pci_hole_start=self.below_4g)
        self.vm.memory.write(self.tables.base, self.tables.blob)

    def setup_vcpu(self, vcpu, index: int) -> None:
        """As :meth:`.x86.X86Platform.setup_vcpu`; the platform keeps the vCPU for S3."""
        self._vcpus[index] = vcpu
        super().setup_vcpu(vcpu, index)

    def load(self, image, *, cmdline: str = "", **kw):
        """As :meth:`.x86.X86Platform.load`; a Linux kernel's command line gets one
        ``virtio_mmio.device=`` per virtio-mmio device (:meth:`virtio_mmio_cmdline`)."""
        if self.virtio_mmio_devices and detect(read_head(image)) == "linux-x86":
            cmdline = " ".join(p for p in (cmdline, self.virtio_mmio_cmdline()) if p)
        return super().load(image, cmdline=cmdline, **kw)

    def virtio_mmio_cmdline(self) -> str:
        """The Linux command-line words that describe the virtio-mmio devices ("" if none)."""
        return " ".join(cmdline_fragment(base, gsi) for base, gsi, _ in self.virtio_mmio_devices)

    def close(self) -> None:
        """Stop the device timers and release any vCPU thread waiting in S3 sleep."""
        self.scheduler.close()
        with self._s3:
            self._sleeping = False
            self._s3.notify_all()

    def close_devices(self) -> None:
        """Close the virtio devices (their image files and locks), once no vCPU runs."""
        for _, _, transport in getattr(self, "virtio_mmio_devices", ()):
            transport.close()
        for _, pci_transport in getattr(self, "virtio_pci_devices", ()):
            pci_transport.core.close()

    # -- interrupts, DMA, timers: the handles the devices were given -------------------------
    def irq(self, gsi: int, level: int) -> None:
        """Drive ISA IRQ / GSI ``gsi`` (through KVM's routing)."""
        with self._irq_lock:
            try:
                self.vm.irq_line(gsi, level)
            except (KvmError, Closed):
                if not self.control.stopping():
                    raise

    def _intx(self, line: int, source: int, level: int) -> None:
        """PCI function ``source`` (its slot) drives INTx on ISA ``line``: the line is the OR
        of every function on it, as wired-OR PCI interrupt lines are."""
        with self._intx_lock:                    # held across the ioctl: levels stay in order
            holders = self._intx_sources.setdefault(line, set())
            before = bool(holders)
            if level:
                holders.add(source)
            else:
                holders.discard(source)
            if bool(holders) != before:
                self.irq(line, int(not before))

    def _signal_msi(self, address: int, data: int) -> None:
        """Deliver a compatibility-format MSI (guest-programmed ``address``/``data``) through
        KVM_SIGNAL_MSI. A message no local APIC accepts (KVM answers EPERM: no destination
        matched) or that is no valid MSI (EINVAL: e.g. bits KVM reserves in the address) is
        dropped and counted in ``msi_dropped``, as a PCI write to an address nothing decodes is
        lost on real hardware; the guest's values never end the VM."""
        try:
            self.vm.signal_msi(address, data)
        except KvmError as e:
            if self.control.stopping():
                return
            if e.errno in (errno.EPERM, errno.EINVAL):
                self.msi_dropped += 1
                return
            raise
        except Closed:
            if not self.control.stopping():
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

    # -- ranges the guest moves ------------------------------------------------------------
    def _map_pm(self) -> None:
        """Put the PM block where 00:01.3's PMBA and PMREGMISC say (called after every
        configuration write to that function, as QEMU's ``pm_io_space_update``): base = PMBA &
        0xFFC0, decoded while PMREGMISC bit 0 (PM I/O enable) is set. Where its ports overlap a
        fixed device's (fw_cfg and port 0x92 included) the fixed device answers: the block is
        inserted around them. Bounded work: a dozen ports."""
        base, enabled = self.pci.pm_io_space()
        new_base = base if enabled else None
        if new_base == self.pm_base and self._pm_mapped:
            return
        self.pm_base, self._pm_mapped = new_base, True
        self.pio.remove(self.pm)
        if new_base is None:
            return
        for rbase, size, offset, max_access in self.pm.PIO_RANGES:
            start = new_base + (rbase - acpi.PM_BASE)
            end = min(start + size, PIO_LIMIT)
            port = start
            while port < end:
                if self.pio.find(port) is not None:        # a fixed device's port
                    port += 1
                    continue
                run = port
                while port < end and self.pio.find(port) is None:
                    port += 1
                self.pio.insert(run, port - run, self.pm, offset=offset + (run - start),
                                max_access=max_access, name="acpi-pm")

    def _virtio_pci_config_written(self, transport: VirtioPci) -> None:
        transport.config_changed()
        self._map_virtio_pci(transport)

    def _map_virtio_pci(self, transport: VirtioPci) -> None:
        """Decode a virtio-pci function's BARs where the guest put them (nothing while memory
        decoding is off); a BAR over another device's range is not decoded."""
        self.mmio.remove(transport)
        self.mmio.remove(transport.msix)
        mapped = []
        for base, size, dev in transport.windows():
            try:
                self.mmio.insert(base, size, dev, max_access=8, name="virtio-pci")
                mapped.append((base, size, dev))
            except BusConflict:
                self.virtio_bar_conflicts += 1
        with transport.core.lock:              # the C path follows what the bus decodes
            transport.mapped_windows = mapped
            transport.fastpath_sync()

    def _edu_config_written(self) -> None:
        self.edu.config_changed()
        self._map_edu()

    def _map_edu(self) -> None:
        """Decode edu's BAR 0 where the guest put it (nothing while memory decoding is off). A
        BAR the guest places over another device's range is not decoded (counted in
        ``edu_bar_conflicts``), so a guest cannot take a device's registers away."""
        self.mmio.remove(self.edu)
        base = self.edu.bar0_window()
        if base is None:
            return
        try:
            self.mmio.insert(base, Edu.MMIO_SIZE, self.edu, max_access=Edu.MMIO_MAX_ACCESS,
                             name="edu")
        except BusConflict:
            self.edu_bar_conflicts += 1

    # -- exits -----------------------------------------------------------------------------
    def handle_exit(self, index: int, ex) -> bool:
        """Serve an IO or MMIO exit on the buses; False when the run must end (a power event,
        an exit not the PC's)."""
        name = ex.name
        if name == "IO":
            port, size = ex.port, ex.size
            if (port in PIT_PORTS and port + size <= PIT_PORTS.stop) or port == SPEAKER_PORT:
                self._ensure_pit()          # the first access: KVM serves the next one
                self.replay_port_io(self._vcpus[index], ex)
                return self.power_event is None
            if ex.is_out:
                self.pio.write_bytes(port, size, ex.data)
            else:
                ex.respond(self.pio.read_bytes(port, size, ex.count))
        elif name == "MMIO":
            addr, n = ex.phys_addr, ex.len
            if ex.is_write:
                self.mmio.write(addr, n, int.from_bytes(ex.data, "little"))
            else:
                ex.respond(self.mmio.read(addr, n).to_bytes(n, "little"))
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

    def ended(self, ex) -> str:
        """Why this machine cannot run again: the guest powered off (ACPI S5) or reset it."""
        if self.power_event == "poweroff":
            return "the guest powered off (ACPI S5)"
        if self.power_event == "reset":
            return "the guest reset the machine, and pykvm does not reboot"
        return ""

    def exit_verdict(self, ex) -> Tuple[int, str]:
        """A power-off is a finished guest, a reset one pykvm does not perform; otherwise as
        :meth:`.x86.X86Platform.exit_verdict`."""
        if self.power_event == "poweroff":
            return status.OK, "guest powered off (ACPI S5)"
        if self.power_event == "reset":
            return status.OK, "guest reset the machine (pykvm does not reboot)"
        return super().exit_verdict(ex)

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
            while self._sleeping and not self.control.stopping():
                self._s3.wait(0.05)
            self._parked.discard(index)
            if self.control.stopping():
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
            if self.control.stopping():
                return False
            time.sleep(min(left / 1e9, 0.01))

    def suspend(self, index: int) -> bool:
        """S3 entered by vCPU ``index``; returns when the machine has woken (True: run on).

        The other vCPUs are kicked and park in :meth:`hold`. Every vCPU takes its wake state
        (vCPU 0 at the waking vector, the others waiting for INIT/SIPI) in its own thread, as
        it leaves S3, so no vCPU ioctl ever targets a vCPU another thread runs. A vCPU that
        enters S3 while another one is already taking the machine there parks like the others
        (two vCPUs writing SLP_EN at once put the machine to sleep once)."""
        others = [j for j in range(self.vcpus) if j != index]
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
                self.control.kick(j)
            except Closed:
                pass
        # wait (briefly) for every other vCPU to be parked or outside KVM_RUN
        deadline = time.monotonic() + 1.0
        with self._s3:
            while time.monotonic() < deadline and any(
                    j not in self._parked and self.control.in_run(j)
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
                self._resume_pending = set(range(self.vcpus))
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
        v = self._vcpus[index]
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
        raw = self.vm.memory.read(self.tables.addr["FACS"], 64)
        return (struct.unpack_from("<I", raw, acpi.FACS_WAKING_VECTOR)[0],
                struct.unpack_from("<Q", raw, acpi.FACS_X_WAKING_VECTOR)[0])
