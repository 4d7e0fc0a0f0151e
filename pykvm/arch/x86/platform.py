"""The x86 platform of :class:`pykvm.machine.Machine`: RAM at 0, optional in-kernel irqchip/PIT,
per-vCPU CPUID (APIC ids), boot state from the loader, and the report port (0x1000)."""
from typing import Optional

from ... import loader, status
from ...report import decode as decode_report
from . import boot, layout, linux
from .regs import CpuidEntry

REPORT_PORT = 0x1000


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


class Platform:
    ram_base = 0
    arch = "x86_64"

    def __init__(self, machine, *, irqchip: bool = False, pit: bool = False, cpuid=None):
        self.m = machine
        self.irqchip = irqchip or pit
        self.pit = pit
        self.cpuid = cpuid

    def create_devices(self) -> None:
        vm = self.m.vm
        vm.set_tss_addr(0xFFFBD000)
        vm.set_identity_map_addr(0xFFFBC000)
        if self.irqchip:
            vm.create_irqchip()
        if self.pit:
            vm.create_pit2()

    def load(self, image, *, cmdline="", initrd=(), flat_addr=None, flat_mode="real"):
        if _looks_like_bzimage(image):
            # A Linux kernel expects a PC: the in-kernel irqchip (local APICs, IOAPIC, PIC) and
            # PIT. vCPUs do not exist yet, so it is not too late to create them.
            if not self.irqchip:
                self.m.vm.create_irqchip()
                self.irqchip = True
            if not self.pit:
                self.m.vm.create_pit2()
                self.pit = True
            return linux.load(self.m.vm.memory, image, cmdline=cmdline, initrd=initrd)
        if initrd:
            raise loader.LoadError("--initrd is not supported on this platform yet")
        if flat_addr is None and isinstance(image, str) and image.endswith(".bin"):
            flat_addr = layout.REAL_MODE_LOAD_ADDR
        return loader.load_image(self.m.vm.memory, image, arch="x86_64", cmdline=cmdline,
                                 flat_addr=flat_addr, flat_mode=flat_mode)

    def vcpu_cpuid(self, index: int):
        """Supported CPUID with this vCPU's APIC id patched into leaves 1, 0xB and 0x1F."""
        if self.cpuid is None:
            self.cpuid = self.m.kvm.supported_cpuid()     # one ioctl for all vCPUs
        out = []
        entries = self.cpuid
        for e in entries:
            e = CpuidEntry(*e)
            if e.function == 1:
                e = e._replace_ebx((e.ebx & 0x00FFFFFF) | (index << 24))
            elif e.function in (0xB, 0x1F):
                e = CpuidEntry(e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, index)
            out.append(e)
        return out

    def loop_config(self):
        """COM1, the 0xe9 debug port and isa-debug-exit at 0xf4, served in the C loop."""
        from ...runloop import LoopConfig
        return LoopConfig()

    def setup_vcpu(self, vcpu, index: int) -> None:
        vcpu.set_cpuid(self.vcpu_cpuid(index))
        if isinstance(self.m.image, linux.LinuxImage):
            if index == 0:                   # the kernel starts the others by INIT/SIPI
                linux.setup_boot_cpu(vcpu, self.m.vm.memory, self.m.image)
            return
        boot.setup_for_image(vcpu, self.m.vm.memory, self.m.image, vcpu_index=index)

    def report_from_exit(self, index: int, ex) -> Optional[object]:
        if ex.name == "IO" and ex.port == REPORT_PORT and ex.is_out and ex.size == 4:
            return decode_report(self.m.vm.memory, ex.value, index)
        return None

    def handle_exit(self, index: int, ex) -> bool:
        """Exits the platform resumes silently (none on x86 so far)."""
        return False

    def exit_verdict(self, ex):
        """(exit status, detail) for a run that ended with exit ``ex``."""
        if ex.name == "HLT":
            return status.OK, "guest halted"
        if ex.name == "SHUTDOWN":
            return status.GUEST_FAILURE, "guest triple-faulted (SHUTDOWN)"
        return status.UNHANDLED_EXIT, f"unhandled {ex.name} exit: {ex!r}"
