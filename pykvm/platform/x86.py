"""The x86 platform of :class:`pykvm.machine.Machine`: RAM from 0 (split around the 32-bit PCI
hole as QEMU's pc splits it), per-vCPU CPUID (APIC ids), boot state from the loader, the report
port (0x1000), and one of two machines:

* ``pc`` — the PC of :mod:`pykvm.arch.x86.pc`: in-kernel irqchip and PIT, fw_cfg, PCI, ACPI,
  PM timer, CMOS RTC, S3, pc-testdev; only vCPU 0 starts, the others wait for INIT/SIPI. The
  default for multiboot kernels and Linux bzImages.
* bare — RAM, the console ports and optionally the in-kernel irqchip/PIT (``irqchip``, ``pit``);
  every vCPU starts at the entry. The default for ELF64 and flat images (pykvm's own guests).

``pc=True``/``False`` chooses; ``None`` (the default) picks by the image.
"""
import os
import stat
from typing import Optional

from .. import boot as loader, status
from ..abi import ffi
from ..memory import new_mapping
from ..report import decode as decode_report
from ..runloop import LoopConfig, UartGroup
from ..arch.x86 import modes as boot, decode, layout
from ..boot import x86_images as images, linux_x86 as linux
from ..arch.x86.regs import CpuidEntry
from .pc import PC_CLAIMED, PcMachine

REPORT_PORT = 0x1000
# xAPIC ids are 8 bits and 0xff is the broadcast id, so ids 0..254 name CPUs: the most vCPUs an
# x86 machine with an interrupt controller can describe (the MADT's Processor Local APIC
# structure has a one-byte APIC ID, ACPI 6.5 table 5.22; QEMU's pc stops at 255 without
# x2APIC and interrupt remapping).
XAPIC_MAX_CPUS = 255


def _looks_like_bzimage(image) -> bool:
    """Peek at the setup header (first 0x210 bytes) of a path or bytes."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        return linux.is_bzimage(bytes(image[:0x210]))
    import os
    import stat
    try:
        if not stat.S_ISREG(os.stat(image).st_mode):
            return False                      # never open a FIFO or device to peek
        fd = os.open(image, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except (OSError, TypeError, ValueError):
        return False                          # the loader reports what is wrong
    try:
        return linux.is_bzimage(os.read(fd, 0x210))
    except OSError:
        return False
    finally:
        os.close(fd)


def _head(image, n: int = 8192) -> bytes:
    """The first ``n`` bytes of a path or bytes (b"" if it cannot be read: the loader then
    reports what is wrong)."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        return bytes(image[:n])
    try:
        if not stat.S_ISREG(os.stat(image).st_mode):
            return b""
        fd = os.open(image, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except (OSError, TypeError, ValueError):
        return b""
    try:
        return os.read(fd, n)
    except OSError:
        return b""
    finally:
        os.close(fd)


def is_multiboot(head: bytes) -> bool:
    """Whether an image (its first 8 KiB) is a multiboot v1 kernel: an ELF32 with a multiboot
    header, or any file (an ELF64 too, as QEMU reads it) whose header uses the a.out kludge."""
    try:
        mb = loader.find_multiboot_header(head)
    except loader.LoadError:
        return False
    if mb is None:
        return False
    if loader.is_elf(head) and not mb.aout_kludge:
        return len(head) > 4 and head[4] == 1        # ELFCLASS32
    return mb.aout_kludge


class Platform:
    """The x86 machine under a :class:`pykvm.machine.Machine` (see the module docstring).
    Options: ``pc`` (True: the PC machine, False: bare, None: by image), ``devices`` (optional
    PC devices: "edu", "intel-iommu"), ``irqchip`` and ``pit`` (bare machine: the in-kernel
    irqchip and PIT), ``cpuid`` (entries instead of the supported CPUID)."""
    ram_base = 0
    arch = "x86_64"

    def __init__(self, machine, *, irqchip: bool = False, pit: bool = False, cpuid=None,
                 pc: Optional[bool] = None, devices=()):
        if pc not in (None, True, False):
            raise ValueError(f"pc must be True, False or None (by image), not {pc!r}")
        self.m = machine
        self.irqchip = irqchip or pit
        self.pit = pit
        self.cpuid = cpuid
        self.pc = pc
        self.devices = tuple(devices)
        if self.devices and pc is False:
            raise ValueError("devices need the PC machine (pc=True or by image)")
        self.pcm = None                    # the PcMachine, once the machine is a PC
        self.ram_size = 0
        self.below_4g = self.above_4g = 0
        self.memory_map = []
        self.boot_layout = layout.DEFAULT_LAYOUT
        self.placed = None                 # images.PlacedImage of a non-Linux image

    @staticmethod
    def max_vcpus(image, *, pc: Optional[bool] = None, devices=(), irqchip: bool = False,
                  pit: bool = False, flat_mode: str = "real", **_opts):
        """(most vCPUs, what sets that limit) for a machine made with these options and
        ``image`` (a path or bytes), asked before anything is created: the pc machine gives
        every vCPU an xAPIC id in its MADT, so 255 (:data:`XAPIC_MAX_CPUS`); the bare machine
        starts every vCPU of an ELF or a protected/long-mode flat image on its own boot stack,
        of which the boot layout has :data:`.layout.MAX_VCPUS` (64), and with the in-kernel
        irqchip its xAPIC ids stop at 255; a bare real-mode flat image without an irqchip has
        no limit of its own ((None, ""): KVM's applies). The image is only peeked at (its
        first 8 KiB)."""
        head = _head(image) if image is not None else b""
        if pc is None:
            pc = bool(devices) or (len(head) >= 0x210 and linux.is_bzimage(head[:0x210])) \
                or is_multiboot(head)
        if pc:
            return XAPIC_MAX_CPUS, ("the pc machine's MADT and 8-bit xAPIC ids (0xff is "
                                    "broadcast) describe")
        if loader.is_elf(head) or flat_mode in ("long", "protected"):
            return layout.MAX_VCPUS, "the bare machine's boot layout has stacks for"
        if irqchip or pit:
            return XAPIC_MAX_CPUS, "the in-kernel irqchip's 8-bit xAPIC ids (0xff is broadcast) name"
        return None, ""

    def create_devices(self) -> None:
        """VM-wide set-up before RAM exists: KVM's real-mode TSS and identity-map pages (in the
        32-bit hole)."""
        vm = self.m.vm
        vm.set_tss_addr(layout.KVM_TSS_ADDR)
        vm.set_identity_map_addr(layout.KVM_IDENTITY_MAP_ADDR)
        # the irqchip and PIT wait for load(): the image decides whether this is a PC

    def add_ram(self, size: int):
        """Guest RAM: ``size`` bytes from 0, or, from 3.5 GiB up, 3 GiB below the 32-bit hole
        and the rest from 4 GiB (as QEMU's pc). Returns the slot at 0."""
        below, above = layout.ram_split(size)
        if above:
            # one mapping of the whole size first, so that a host too small for it says so
            # in one message naming the RAM size asked for
            m, pin = new_mapping(size, 0)
            ffi.release(pin)
            m.close()
        low = self.m.vm.add_memory(0, below)
        if above:
            self.m.vm.add_memory(layout.HIGH_RAM_START, above)
        self.ram_size, self.below_4g, self.above_4g = size, below, above
        return low

    def _ram_ranges(self):
        out = [(0, self.below_4g)]
        if self.above_4g:
            out.append((layout.HIGH_RAM_START, layout.HIGH_RAM_START + self.above_4g))
        return out

    def _make_pc(self) -> None:
        self.pcm = PcMachine(self.m, vcpus=self.m.vcpu_count, ram_size=self.ram_size,
                             below_4g=self.below_4g, above_4g=self.above_4g,
                             devices=self.devices)
        self.pcm.create_chips()
        self.irqchip = self.pit = True
        self.pcm.write_tables(self.m.vm.memory)

    def load(self, image, *, cmdline="", initrd=(), flat_addr=None, flat_mode="real"):
        """Choose the machine by the image (unless ``pc`` was given), create its interrupt
        controllers and devices, and load the image (a Linux bzImage through
        :mod:`.linux`, anything else through :mod:`.images`: multiboot modules from
        ``initrd``, the command line ``"<image> <cmdline>"`` for multiboot kernels)."""
        if not self.ram_size:                     # RAM added without add_ram()
            self.ram_size = self.below_4g = self.m.vm.memory.size
        head = _head(image)
        bz = linux.is_bzimage(head[:0x210]) if len(head) >= 0x210 else False
        if self.pc is None:
            self.pc = bz or is_multiboot(head) or bool(self.devices)
        self.memory_map = layout.e820_map(self.below_4g, self.above_4g, bios_area=self.pc)
        # vCPUs do not exist yet, so it is not too late for the irqchip and the PIT
        if self.pc:
            self._make_pc()
        else:
            if bz:                      # a Linux kernel needs the irqchip and PIT at least
                self.irqchip = self.pit = True
            if self.irqchip:
                self.m.vm.create_irqchip()
            if self.pit:
                self.m.vm.create_pit2()
        if bz:
            return linux.load(self.m.vm.memory, image, cmdline=cmdline, initrd=initrd,
                              e820=self.memory_map)
        if flat_addr is None and isinstance(image, str) and image.endswith(".bin"):
            flat_addr = layout.REAL_MODE_LOAD_ADDR
        ram = self._ram_ranges()
        self.placed = images.load(
            self.m.vm.memory, image, cmdline=cmdline, initrd=initrd,
            name=image if isinstance(image, str) else None, ram=ram,
            memory_map=self.memory_map, claimed=self._claimed(), flat_addr=flat_addr,
            flat_mode=flat_mode, boot_vcpus=1 if self.pc else self.m.vcpu_count,
            ram_top=max(hi for lo, hi in ram))
        self.boot_layout = self.placed.layout
        return self.placed.loaded

    def _claimed(self):
        if self.pc:
            return list(PC_CLAIMED)
        return []

    def vcpu_cpuid(self, index: int):
        """Supported CPUID with this vCPU's APIC id patched into leaves 1, 0xB and 0x1F."""
        if self.cpuid is None:
            self.cpuid = self.m.kvm.supported_cpuid()     # one ioctl for all vCPUs
        out = []
        entries = self.cpuid
        for e in entries:
            e = CpuidEntry(*e)
            if e.function == 1:
                # the initial APIC id's low 8 bits (the x2APIC id, whole, is in leaf 0xB)
                e = e._replace_ebx((e.ebx & 0x00FFFFFF) | ((index & 0xFF) << 24))
            elif e.function in (0xB, 0x1F):
                e = CpuidEntry(e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, index)
            out.append(e)
        return out

    def loop_config(self):
        """COM1, the 0xe9 debug port and isa-debug-exit at 0xf4, served in the C loop; COM1 is
        one UART for all vCPUs, its THR-empty interrupt on IRQ 4 when there is an irqchip."""
        if getattr(self, "_uart_group", None) is None:
            self._uart_group = UartGroup()
        return LoopConfig(uart_irq=4 if self.irqchip else 0, uart_group=self._uart_group)

    def setup_vcpu(self, vcpu, index: int) -> None:
        """CPUID and boot state of vCPU ``index`` (on a PC only vCPU 0 gets a boot state)."""
        vcpu.set_cpuid(self.vcpu_cpuid(index))
        if isinstance(self.m.image, linux.LinuxImage):
            if index == 0:                   # the kernel starts the others by INIT/SIPI
                linux.setup_boot_cpu(vcpu, self.m.vm.memory, self.m.image)
            return
        if self.pc and index > 0:
            return                           # a PC's APs wait for INIT/SIPI from the BSP
        boot.setup_for_image(vcpu, self.m.vm.memory, self.m.image, vcpu_index=index,
                             layout=self.boot_layout)

    def report_from_exit(self, index: int, ex) -> Optional[object]:
        """The guest report a 32-bit OUT to the report port (0x1000) hands over, else None."""
        if ex.name == "IO" and ex.port == REPORT_PORT and ex.is_out and ex.size == 4:
            return decode_report(self.m.vm.memory, ex.value, index)
        return None

    def handle_exit(self, index: int, ex) -> bool:
        """Exits the platform serves (the PC machine's devices); False ends the step."""
        if self.pcm is not None:
            return self.pcm.handle_exit(index, ex)
        return False

    def hold(self, index: int) -> bool:
        """vCPU ``index``'s run was kicked while the machine runs on: True after waiting out an
        S3 sleep (the vCPU then runs on), False if the kick was not the platform's."""
        return self.pcm.hold(index) if self.pcm is not None else False

    def close(self) -> None:
        """Stop the PC machine's timers (Machine.close calls this)."""
        if self.pcm is not None:
            self.pcm.close()

    def describe_internal_error(self, vcpu, ex, symbols=None) -> str:
        """One line on a KVM_EXIT_INTERNAL_ERROR of ``vcpu`` in the guest's terms: RIP, symbol
        and file:line, CPU mode, the instruction decoded (:mod:`.decode`)."""
        return decode.describe_internal_error(vcpu, self.m.vm.memory, ex, symbols)

    def ended(self, ex) -> str:
        """Why this machine cannot run again after a run that ended with exit ``ex`` (or None
        for another ending), "" if it can: the guest powered off (ACPI S5) or reset it."""
        if self.pcm is not None and self.pcm.power_event == "poweroff":
            return "the guest powered off (ACPI S5)"
        if self.pcm is not None and self.pcm.power_event == "reset":
            return "the guest reset the machine, and pykvm does not reboot"
        return ""

    def exit_verdict(self, ex):
        """(exit status, detail) for a run that ended with exit ``ex``."""
        if self.pcm is not None and self.pcm.power_event == "poweroff":
            return status.OK, "guest powered off (ACPI S5)"
        if self.pcm is not None and self.pcm.power_event == "reset":
            return status.OK, "guest reset the machine (pykvm does not reboot)"
        if ex.name == "HLT":
            return status.OK, "guest halted"
        if ex.name == "SHUTDOWN":
            return status.GUEST_FAILURE, "guest triple-faulted (SHUTDOWN)"
        return status.UNHANDLED_EXIT, f"unhandled {ex.name} exit: {ex!r}"
