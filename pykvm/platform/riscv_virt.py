"""The RISC-V ``virt`` machine (``--machine virt``), shaped like QEMU's ``virt`` machine:
RAM at 0x80000000, an ns16550a UART at 0x10000000 (served in the run loop), cpu type applied
through ONE_REG, DBCN/SUSP enabled before the first run, a generated device tree in a1, an
initrd named in it, and forwarded SBI calls served by :class:`~pykvm.arch.riscv.sbi.SbiServices`.

Images: ELF (at their physical addresses), Linux ``Image`` files (at RAM base + their
``text_offset``, e.g. kvm-unit-tests' ``.flat`` files and Linux itself) and flat binaries.
Memory map, from the top of RAM down: the device tree (:data:`DTB_SPACE`, more for machines
of many harts: :func:`dtb_space`), then the initrd, page-aligned, which must end up above the
image.

Virtio devices (``virtio=`` or its alias ``virtio_mmio=``: a sequence of
:class:`pykvm.devices.virtio.VirtioDevice` objects, at most :data:`VIRTIO_MMIO_MAX`) sit on
virtio-mmio transports where QEMU's virt puts them: device *i* at 0x10001000 + *i* x 0x1000
(:mod:`pykvm.devices.virtio.mmio`, 4 KiB windows), its level-triggered interrupt on APLIC
source 1 + *i*, each a ``virtio,mmio`` node of the device tree. Their interrupts go through
KVM's in-kernel AIA irqchip (:mod:`pykvm.arch.riscv.aia`: an APLIC at 0x0D000000 delivering
MSIs to an IMSIC file per hart from 0x28000000, described in the device tree as QEMU's virt
describes them under KVM), driven with KVM_IRQ_LINE. The AIA is created when virtio devices
are asked for (or ``aia=True``); a host whose KVM has none refuses such a machine with one line
(:class:`~pykvm.arch.riscv.aia.AiaUnavailable`). The guest needs Ssaia to use its IMSIC: a cpu
type without it is refused (ValueError) when the AIA is on."""
from __future__ import annotations

import os
import threading

from .. import boot, status
from ..arch.riscv import aia as aia_mod
from ..arch.riscv import cpu, insn, sbi
from ..arch.riscv.extensions import canonical_isa_string
from ..devices.bus import MMIO_LIMIT, Bus
from ..devices.virtio import VirtioDevice
from ..devices.virtio.mmio import MAX_ACCESS as VIRTIO_MMIO_ACCESS, VirtioMmio
from ..errors import Closed, KvmError
from ..report import decode as decode_report
from ..runloop import LoopConfig, UartGroup
from . import fdt, virtio_devices
from .base import MachineControl

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import ClassVar, Iterable, List, Optional, Tuple

RAM_BASE = 0x80000000
DTB_SPACE = 64 << 10
DTB_SPACE_PER_HART = 2 << 10    # bytes: a cpu@N node with every ISA extension named is ~1 KiB
UART_BASE = fdt.UART_BASE
INITRD_ALIGN = 4096
VIRTIO_MMIO_BASE = fdt.VIRTIO_MMIO_BASE      # device i at base + i * stride
VIRTIO_MMIO_STRIDE = fdt.VIRTIO_MMIO_STRIDE
VIRTIO_MMIO_IRQ = fdt.VIRTIO_MMIO_IRQ        # device i on APLIC source 1 + i
VIRTIO_MMIO_MAX = fdt.VIRTIO_MMIO_MAX
CSR_SEED = 0x015                # Zkr entropy source CSR
SEED_OPST_ES16 = 0b10 << 30     # "16 bits of entropy follow"

# SBI system reset (SRST) reasons (SBI spec, "System Reset Extension"); KVM passes the reason
# in kvm_run.system_event.data[0].
SRST_REASON_NONE = 0
SRST_REASON_SYSFAIL = 1


def dtb_space(harts: int) -> int:
    """Bytes kept for the device tree at the top of RAM for a machine of ``harts`` harts:
    :data:`DTB_SPACE` (64 KiB), or, for more than 16 harts, room for each hart's node
    (:data:`DTB_SPACE_PER_HART`) besides 32 KiB for the rest, rounded up to 64 KiB."""
    need = (32 << 10) + harts * DTB_SPACE_PER_HART
    return max(DTB_SPACE, -(-need // DTB_SPACE) * DTB_SPACE)


class _RamView:
    """Guest RAM seen from RAM_BASE, for the loader (which checks against ``size``)."""

    def __init__(self, mem, size):
        self._mem, self.size = mem, size

    def write(self, gpa, data):
        self._mem.write(gpa, data)

    def read(self, gpa, n):
        return self._mem.read(gpa, n)


class VirtPlatform:
    """The RISC-V machine (module docstring). ``vm``/``kvm``: the VM and ``/dev/kvm``
    handles; ``vcpus``: harts; ``mem_size``: RAM in bytes from :data:`RAM_BASE`. Options:
    ``cpu_type`` and ``disable`` (see :func:`pykvm.arch.riscv.cpu.apply_cpu_type`),
    ``suspend_seconds`` (how long an SBI system suspend sleeps), ``sbi_extensions`` (KVM SBI
    extensions enabled before the first run), ``on_suspend`` (called with each
    :class:`~pykvm.arch.riscv.sbi.SuspendEvent`), ``uart`` (the ns16550a at
    :data:`UART_BASE`: in the device tree and served by the run loop), ``virtio`` /
    ``virtio_mmio`` (virtio device models on virtio-mmio, module docstring; the two lists are
    joined, ``virtio_mmio`` first: :attr:`virtio_mmio_devices` lists ``(base, irq,
    transport)``), ``aia`` (None: the in-kernel AIA irqchip when there are virtio devices;
    True: always, False: never, which refuses virtio devices), ``aia_mode`` ("emul",
    "hwaccel", "auto" or None for KVM's default). Raises ValueError for more than
    :data:`VIRTIO_MMIO_MAX` devices or one that is not a VirtioDevice,
    :class:`~pykvm.arch.riscv.aia.AiaUnavailable` where the host has no AIA."""
    name: ClassVar[str] = "virt"
    arch: ClassVar[str] = "riscv64"
    ram_base: ClassVar[int] = RAM_BASE

    def __init__(self, vm, kvm, control: MachineControl, *, vcpus: int, mem_size: int,
                 cpu_type: str = "max", disable: Iterable[str] = (),
                 suspend_seconds: float = 0.0, sbi_extensions: Iterable[str] = ("dbcn", "susp"),
                 on_suspend=None, uart: bool = True, virtio=(), virtio_mmio=(),
                 aia: Optional[bool] = None, aia_mode: Optional[str] = None):
        models = tuple(virtio_mmio) + tuple(virtio)
        if len(models) > VIRTIO_MMIO_MAX:
            raise ValueError(f"{len(models)} virtio devices; the virt machine has "
                             f"{VIRTIO_MMIO_MAX} virtio-mmio slots")
        for d in models:
            if not isinstance(d, VirtioDevice):
                raise ValueError(f"virtio takes VirtioDevice objects, not {d!r}")
        if models and aia is False:
            raise ValueError("virtio devices on the virt machine need the AIA irqchip "
                             "(aia=False was given)")
        self.vm, self.kvm, self.control = vm, kvm, control
        self.vcpus = vcpus
        self.cpu_type = cpu_type
        self.disable = tuple(disable)
        self.sbi_extensions = tuple(sbi_extensions)
        self.uart_base = UART_BASE if uart else None
        self.cpu_result = None
        self.dtb_addr = None
        self.dtb = None
        self.cmdline = ""
        self.initrd = None             # (start, end) guest-physical, once loaded
        self.image = None
        self.dtb_space = dtb_space(vcpus)
        self._uart_group = UartGroup()        # one UART, whichever hart touches it
        self.sbi = sbi.SbiServices(vm.memory, console=control.console,
                                   suspend_seconds=suspend_seconds, on_suspend=on_suspend)
        self.ram = vm.add_memory(RAM_BASE, mem_size)
        self.aia: Optional[aia_mod.Aia] = None
        self.mmio = Bus("mmio", MMIO_LIMIT)
        self.virtio_mmio_devices: List[Tuple[int, int, VirtioMmio]] = []
        self._irq_lock = threading.Lock()
        if models or aia:
            try:
                self.aia = aia_mod.Aia(vm.fd, max(vcpus, 1), mode=aia_mode)
            except aia_mod.AiaUnavailable as e:
                if models:
                    raise aia_mod.AiaUnavailable(
                        f"virtio devices need an interrupt controller: {e}") from None
                raise
        for i, model in enumerate(models):
            base, irq = VIRTIO_MMIO_BASE + i * VIRTIO_MMIO_STRIDE, VIRTIO_MMIO_IRQ + i
            transport = VirtioMmio(model, vm.memory,
                                   set_irq=lambda level, n=irq: self.irq(n, level))
            transport.enable_fastpath(vm, base, irq, quiet=self.control.stopping)
            self.mmio.insert(base, VIRTIO_MMIO_STRIDE, transport, max_access=VIRTIO_MMIO_ACCESS,
                             name=f"virtio-mmio{i}")
            self.virtio_mmio_devices.append((base, irq, transport))

    make_virtio = staticmethod(virtio_devices.build)   # disks, rng, console -> models

    @classmethod
    def max_vcpus(cls, image_format: str, **_options) -> Tuple[Optional[int], str]:
        """(None, ""): the device tree grows with the harts (:func:`dtb_space`) and the UART
        and SBI serve any number, so KVM's KVM_CAP_MAX_VCPUS is the limit."""
        return None, ""

    def load(self, image, *, cmdline="", initrd=(), flat_addr=None, flat_mode="riscv"):
        """Load ``image`` and, if given, the one ``initrd`` file (QEMU's ``-initrd``): just
        below the device tree at the top of RAM, page-aligned and clear of the image; the
        device tree written at the first vCPU's setup names it in ``/chosen``."""
        initrd = tuple(initrd)
        if len(initrd) > 1:
            raise boot.LoadError(f"RISC-V takes one initrd file, got {len(initrd)}")
        self.cmdline = cmdline
        ram_size = self.ram.size
        if ram_size <= self.dtb_space:
            raise boot.LoadError(f"guest RAM ({ram_size:#x} bytes) leaves no room beside "
                                   "the device tree")
        view = _RamView(self.vm.memory, ram_size - self.dtb_space)    # the DTB's space stays free
        data = path = None
        if initrd:
            path = initrd[0]
            if isinstance(path, str) and not os.path.isfile(path) and len(path.split()) > 1:
                raise boot.LoadError(f"a RISC-V initrd takes no arguments: {path!r}")
            try:                  # opened, then streamed into RAM: never read whole
                data = boot.InputFile(path, ram_size, "guest RAM", what="file")
            except boot.LoadError as e:
                raise boot.LoadError(f"initrd: {e}") from e
        try:
            loaded = boot.load_image(view, image, arch="riscv64", ram_base=RAM_BASE,
                                       reserved=None, flat_addr=flat_addr, flat_mode="riscv")
            if data is not None:
                self.initrd = self._place_initrd(loaded, data, os.fspath(path))
        finally:
            if data is not None:
                data.close()
        self.image = loaded
        return loaded

    def _place_initrd(self, loaded, data, name: str):
        ram_size = self.ram.size
        top = RAM_BASE + ram_size - self.dtb_space
        start = (top - data.size) // INITRD_ALIGN * INITRD_ALIGN
        image_end = max((a + n for a, n in loaded.written), default=RAM_BASE)
        if start < image_end:
            raise boot.LoadError(
                f"initrd {name} ({data.size:#x} bytes) does not fit between the image (ends at "
                f"{image_end:#x}) and the device tree at {top:#x}; give the guest more --mem")
        data.copy_to(self.vm.memory, start)
        loaded.written.append((start, data.size))
        return start, start + data.size

    def loop_config(self):
        """No port I/O on RISC-V; the SBI debug console and the virtio-mmio windows'
        InterruptStatus/InterruptACK are served in the C loop, the console reading guest RAM
        through the regions known now (anything else goes to Python)."""
        ram = tuple((s.gpa, s.host_addr, s.size) for s in self.vm.memory)
        if getattr(self, "_uart_group", None) is None:
            self._uart_group = UartGroup()        # one UART, whichever hart touches it
        return LoopConfig(serial_base=0, debugcon_port=0, exit_port=0, sbi_console=True, ram=ram,
                          uart_mmio_base=self.uart_base or 0, uart_group=self._uart_group,
                          report_sbi_eid=sbi.PYKVM_REPORT_EID,
                          vmmio=tuple(line for _, _, t in self.virtio_mmio_devices
                                      for line in t.loop_handles()))

    def setup_vcpu(self, vcpu, index: int) -> None:
        """Before vCPU ``index`` first runs: its cpu type and SBI extensions, the device tree
        (written with vCPU 0), the boot registers; harts other than 0 start STOPPED."""
        try:
            self.cpu_result = cpu.apply_cpu_type(vcpu, self.cpu_type, disable=self.disable)
        except KeyError as e:             # an extension name nobody knows: the caller's input
            raise ValueError(e.args[0] if e.args else str(e)) from e
        for name in self.sbi_extensions:
            try:
                sbi.enable_sbi_extension(vcpu, name)
            except (KvmError, cpu.ExtensionError):
                pass                      # absent on this kernel: guests see NOT_SUPPORTED
        if self.aia is not None:
            if self.cpu_result is not None and not self.cpu_result.final.get("ssaia"):
                raise ValueError(f"cpu type {self.cpu_type!r} leaves out Ssaia, which the "
                                 "guest needs to take interrupts from the AIA irqchip "
                                 "(virtio devices)")
            self.aia.set_imsic(index)
            if index == max(self.vcpus, 1) - 1:
                self.aia.init()          # every vCPU has its IMSIC: the irqchip goes live
        if index == 0:
            self._write_dtb(vcpu)
        cpu.set_boot_state(vcpu, pc=self.image.entry, hartid=index, dtb=self.dtb_addr)
        if index:
            vcpu.set_mp_state("STOPPED")  # secondary harts wait for SBI HSM

    def advertised_isa(self, vcpu) -> str:
        """The riscv,isa the guest is told: what ONE_REG says is on, less what the cpu type
        asked to turn off but KVM would not let go (e.g. Zicsr under ``min``): the guest is
        promised exactly the cpu type, and ``cpu_result.not_allowed`` records the rest."""
        state = self.cpu_result.final if self.cpu_result is not None else cpu.isa_extensions(vcpu)
        on = {n for n, v in state.items() if v}
        if self.cpu_result is not None:
            on -= {n for n, want in self.cpu_result.target.items() if not want}
        return canonical_isa_string(on)

    def _write_dtb(self, vcpu) -> None:
        hart = cpu.hart_description(vcpu, 0, isa=self.advertised_isa(vcpu))
        harts = [dict(hart, hartid=i) for i in range(max(self.vcpus, 1))]
        self.dtb = fdt.build_dtb(harts, RAM_BASE, self.ram.size, cpu.timebase_frequency(vcpu),
                                 self.cmdline, uart_base=self.uart_base, initrd=self.initrd,
                                 aia=self.aia_nodes(), virtio_mmio=self.virtio_nodes())
        if len(self.dtb) > self.dtb_space:
            raise ValueError(f"device tree ({len(self.dtb)} bytes) larger than its space "
                             f"({self.dtb_space} bytes): a shorter command line, or fewer harts")
        self.dtb_addr = RAM_BASE + self.ram.size - self.dtb_space
        self.vm.memory.write(self.dtb_addr, self.dtb)

    def aia_nodes(self) -> Optional[fdt.AiaNodes]:
        """The device tree's description of the AIA irqchip (None without one)."""
        a = self.aia
        if a is None:
            return None
        return fdt.AiaNodes(imsic_base=a.imsic_base, imsic_stride=aia_mod.imsic_stride(a.guest_bits),
                            num_ids=a.ids, aplic_base=a.aplic_base, aplic_size=aia_mod.APLIC_SIZE,
                            num_sources=a.sources, guest_index_bits=a.guest_bits)

    def virtio_nodes(self) -> List[fdt.VirtioMmioNode]:
        """The device tree's ``virtio,mmio`` nodes, one per virtio device."""
        return [fdt.VirtioMmioNode(base=base, size=VIRTIO_MMIO_STRIDE, irq=irq)
                for base, irq, _ in self.virtio_mmio_devices]

    def irq(self, source: int, level: int) -> None:
        """Drive APLIC source ``source`` to ``level`` (KVM_IRQ_LINE); after the machine has
        begun stopping a refused ioctl is dropped."""
        with self._irq_lock:
            try:
                self.vm.irq_line(source, level)
            except (KvmError, Closed):
                if not self.control.stopping():
                    raise

    def report_from_exit(self, index: int, ex) -> Optional[object]:
        """The guest report an exit carries (pykvm's SBI report call), else None."""
        if ex.name == "RISCV_SBI" and ex.extension_id == sbi.PYKVM_REPORT_EID:
            ex.set_return(0, 0)
            return decode_report(self.vm.memory, ex.args[0], index)
        return None

    def handle_exit(self, index: int, ex) -> bool:
        """Serve an exit the run loop left to Python (forwarded SBI calls); False: not ours."""
        if ex.name == "RISCV_SBI":
            self.sbi.handle(ex)
            return True
        if ex.name == "RISCV_CSR" and ex.csr_num == CSR_SEED:
            # Zkr's entropy source, which KVM leaves to the VMM (Linux reads it at boot when the
            # ISA has Zkr): status ES16 (bits 31:30 = 0b10) and 16 bits of host entropy
            ex.set_return(SEED_OPST_ES16 | int.from_bytes(os.urandom(2), "little"))
            return True
        if ex.name == "MMIO" and self.virtio_mmio_devices and \
                self.mmio.find(ex.phys_addr) is not None:
            addr, n = ex.phys_addr, ex.len
            if ex.is_write:
                self.mmio.write(addr, n, int.from_bytes(ex.data, "little"))
            else:
                ex.respond(self.mmio.read(addr, n).to_bytes(n, "little"))
            return True
        return False

    def hold(self, index: int) -> bool:
        """The virt machine never parks a hart (SBI suspend sleeps inside the exit)."""
        return False

    def close(self) -> None:
        """End an SBI system suspend that is sleeping, so its hart's thread returns."""
        self.sbi.wake()

    def close_devices(self) -> None:
        """Close the virtio devices (their image files and locks) and the AIA device's
        descriptor, once no vCPU runs."""
        for _, _, transport in getattr(self, "virtio_mmio_devices", ()):
            transport.close()
        if getattr(self, "aia", None) is not None:
            self.aia.close()

    def describe_internal_error(self, vcpu, ex, symbols=None) -> str:
        """One line on a KVM_EXIT_INTERNAL_ERROR of hart ``vcpu`` in the guest's terms: pc,
        symbol and file:line, privilege and translation mode, the instruction decoded
        (:mod:`.insn`)."""
        return insn.describe_internal_error(vcpu, self.vm.memory, ex, symbols)

    def ended(self, ex) -> str:
        """Why this machine cannot run again after a run that ended with exit ``ex`` (None for
        another ending), "" if it can: an SBI system reset (SRST: shutdown, cold or warm
        reboot) — KVM has stopped every hart, and pykvm does not reboot."""
        if ex is not None and ex.name == "SYSTEM_EVENT" and ex.type_name in ("SHUTDOWN", "RESET"):
            what = "shut the system down" if ex.type_name == "SHUTDOWN" else \
                "asked for a reboot, which pykvm does not perform"
            return f"the guest {what} (SBI system reset)"
        return ""

    def exit_verdict(self, ex):
        """(status, detail) for a run that ended with ``ex``. An SBI system reset reaches us as
        SYSTEM_EVENT (SHUTDOWN for a shutdown, RESET for a cold or warm reboot) with the SRST
        reason in data[0]: a shutdown without a failure reason is a finished guest (0); the
        "system failure" reason, or any other non-zero reason, is a guest failure (4);
        a reboot without one is a request pykvm does not serve — it does not reboot — so it is
        an unhandled exit (6). See docs/guest-abi.md."""
        if ex.name == "SYSTEM_EVENT" and ex.type_name in ("SHUTDOWN", "RESET"):
            data = ex.data
            reason = data[0] & 0xFFFFFFFF if data else SRST_REASON_NONE
            what = "shutdown" if ex.type_name == "SHUTDOWN" else "reboot"
            if reason == SRST_REASON_SYSFAIL:
                return status.GUEST_FAILURE, f"guest requested system {what} (system failure)"
            if reason != SRST_REASON_NONE:
                return (status.GUEST_FAILURE,
                        f"guest requested system {what} with reason {reason:#x}")
            if what == "shutdown":
                return status.OK, "guest requested system shutdown"
            return (status.UNHANDLED_EXIT,
                    "guest requested a system reboot; pykvm does not reboot guests")
        return status.UNHANDLED_EXIT, f"unhandled {ex.name} exit: {ex!r}"
