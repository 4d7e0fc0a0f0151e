"""What the two x86 machines (``pc``, :mod:`.pc`; ``bare``, :mod:`.bare`) share: RAM from 0,
split around the 32-bit PCI hole as QEMU's pc splits it (:func:`pykvm.arch.x86.layout.ram_split`);
KVM's real-mode TSS and identity-map pages; per-vCPU CPUID with each vCPU's APIC id
(:func:`pykvm.arch.x86.regs.cpuid_for_vcpu`); the images they boot — a Linux bzImage through the
Linux boot protocol (:mod:`pykvm.boot.linux_x86`), anything else through
:mod:`pykvm.boot.x86_images`; the console ports the C run loop serves (COM1 0x3F8, the 0xE9
debug console, isa-debug-exit at 0xF4-0xF7); and pykvm's guest-report port (0x1000).
"""
from __future__ import annotations

from .. import status
from ..abi import ffi
from ..arch.x86 import decode, layout, modes
from ..arch.x86.regs import cpuid_for_vcpu
from ..boot import detect, linux_x86, read_head, x86_images
from ..errors import GuestError
from ..memory import new_mapping
from ..report import decode as decode_report
from ..runloop import LoopConfig, UartGroup
from .base import MachineControl

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import ClassVar, List, Optional, Sequence, Tuple

REPORT_PORT = 0x1000              # pykvm's guest-report port (docs/guest-abi.md)
COM1 = 0x3F8                      # the 16550 the C loop serves
COM1_IRQ = 4
DEBUGCON_PORT = 0xE9              # QEMU's isa-debugcon
DEBUG_EXIT_PORT = 0xF4            # QEMU's isa-debug-exit,iobase=0xf4,iosize=4
DEBUG_EXIT_SIZE = 4
# xAPIC ids are 8 bits and 0xff is the broadcast id, so ids 0..254 name CPUs: the most vCPUs an
# x86 machine with an interrupt controller can describe (the MADT's Processor Local APIC
# structure has a one-byte APIC ID, ACPI 6.5 table 5.22; QEMU's pc stops at 255 without
# x2APIC and interrupt remapping).
XAPIC_MAX_CPUS = 255


class X86Platform:
    """The x86 machine base (see the module docstring); :class:`.pc.PcPlatform` and
    :class:`.bare.BarePlatform` are the machines. ``vm``/``kvm``: the VM and ``/dev/kvm``
    handles; ``vcpus``: how many vCPUs the machine will have; ``mem_size``: guest RAM in bytes;
    ``cpuid``: entries to give every vCPU instead of ``KVM_GET_SUPPORTED_CPUID``'s (each vCPU's
    APIC id is patched in either way)."""
    name: ClassVar[str] = ""
    arch: ClassVar[str] = "x86_64"
    ram_base: ClassVar[int] = 0
    boot_vcpus_all: ClassVar[bool] = True     # every vCPU starts at the entry (bare), or vCPU 0
    claimed: ClassVar[Sequence[Tuple[int, int]]] = ()   # guest-physical ranges images avoid
    virtio_mmio_devices: Sequence = ()        # (base, gsi, VirtioMmio) of the machine's windows

    def __init__(self, vm, kvm, control: MachineControl, *, vcpus: int, mem_size: int,
                 cpuid=None):
        self.vm, self.kvm, self.control = vm, kvm, control
        self.vcpus = vcpus
        self.cpuid = cpuid
        self._cpuid_given = cpuid is not None
        self.irqchip = False
        self.placed = None                # x86_images.PlacedImage of a non-Linux image
        self.image = None                 # what load() loaded
        self.boot_layout = layout.DEFAULT_LAYOUT
        self._uart_group = UartGroup()    # COM1: one UART for all vCPUs
        vm.set_tss_addr(layout.KVM_TSS_ADDR)
        vm.set_identity_map_addr(layout.KVM_IDENTITY_MAP_ADDR)
        self._create_irqchip()
        self.ram = self._add_ram(mem_size)
        self.memory_map = layout.e820_map(self.below_4g, self.above_4g,
                                          bios_area=self.bios_area)

    bios_area: ClassVar[bool] = False         # the e820 map reserves the PC BIOS area

    def _create_irqchip(self) -> None:
        """The in-kernel interrupt controllers a machine has from the start: none here.

        A machine with them creates them here, before RAM's memory slot, for the sake of the
        VM's teardown. Measured on kvm_pvm hosts (Intel Xeon, 2 CPUs, Linux 6.18): each device
        KVM_CREATE_IRQCHIP puts on a KVM I/O bus frees the bus it replaces after an SRCU grace
        period of the VM (``call_srcu``), and destroying the VM waits for those
        (``srcu_barrier`` in ``kvm_destroy_vm``): 15.5 ms at close when RAM came first. A
        memory slot added after them waits for an expedited grace period instead, which
        takes the pending ones along: 7.8 ms at creation, 0.2 ms at close."""

    # -- RAM --------------------------------------------------------------------------------
    def _add_ram(self, size: int):
        """Guest RAM: ``size`` bytes from 0, or, from 3.5 GiB up, 3 GiB below the 32-bit hole
        and the rest from 4 GiB (as QEMU's pc). Returns the slot at 0."""
        below, above = layout.ram_split(size)
        if above:
            # one mapping of the whole size first, so that a host too small for it says so
            # in one message naming the RAM size asked for
            m, pin = new_mapping(size, 0)
            ffi.release(pin)
            m.close()
        low = self.vm.add_memory(0, below)
        if above:
            self.vm.add_memory(layout.HIGH_RAM_START, above)
        self.ram_size, self.below_4g, self.above_4g = size, below, above
        return low

    def _ram_ranges(self) -> List[Tuple[int, int]]:
        out = [(0, self.below_4g)]
        if self.above_4g:
            out.append((layout.HIGH_RAM_START, layout.HIGH_RAM_START + self.above_4g))
        return out

    # -- the image ----------------------------------------------------------------------------
    def load(self, image, *, cmdline: str = "", initrd=(), flat_addr: Optional[int] = None,
             flat_mode: str = "real"):
        """Load ``image``: a Linux bzImage through :mod:`pykvm.boot.linux_x86` (``initrd``: its
        one initrd), anything else through :mod:`pykvm.boot.x86_images` (multiboot modules
        from ``initrd``, the command line ``"<image> <cmdline>"`` for multiboot kernels; a
        ``.bin`` file is a flat real-mode image at 0x8000 unless ``flat_addr`` says where).
        Raises :class:`~pykvm.boot.LoadError`."""
        mem = self.vm.memory
        if detect(read_head(image)) == "linux-x86":
            self._before_linux()
            self.image = linux_x86.load(mem, image, cmdline=cmdline, initrd=initrd,
                                        e820=self.memory_map)
            return self.image
        if flat_addr is None and isinstance(image, str) and image.endswith(".bin"):
            flat_addr = layout.REAL_MODE_LOAD_ADDR
        ram = self._ram_ranges()
        self.placed = x86_images.load(
            mem, image, cmdline=cmdline, initrd=initrd,
            name=image if isinstance(image, str) else None, ram=ram,
            memory_map=self.memory_map, claimed=list(self.claimed), flat_addr=flat_addr,
            flat_mode=flat_mode, boot_vcpus=self.vcpus if self.boot_vcpus_all else 1,
            ram_top=max(hi for lo, hi in ram))
        self.boot_layout = self.placed.layout
        self.image = self.placed.loaded
        return self.image

    def _before_linux(self) -> None:
        """What a Linux kernel needs of the machine before it loads (the bare machine gives it
        the in-kernel irqchip and PIT)."""

    # -- vCPUs ----------------------------------------------------------------------------
    def vcpu_cpuid(self, index: int):
        """The CPUID vCPU ``index`` gets: the supported (or given) entries with its APIC id, and
        the hypervisor bit on supported ones (:func:`~pykvm.arch.x86.regs.cpuid_for_vcpu`)."""
        if self.cpuid is None:
            self.cpuid = self.kvm.supported_cpuid()     # one ioctl for all vCPUs
        # entries the caller gave are theirs to the bit (a test may want no hypervisor bit)
        return cpuid_for_vcpu(self.cpuid, index, hypervisor=not self._cpuid_given)

    def setup_vcpu(self, vcpu, index: int) -> None:
        """CPUID and boot state of vCPU ``index`` (a Linux kernel, and a PC, start only vCPU 0:
        the others wait for INIT/SIPI)."""
        vcpu.set_cpuid(self.vcpu_cpuid(index))
        if isinstance(self.image, linux_x86.LinuxImage):
            if index == 0:
                linux_x86.setup_boot_cpu(vcpu, self.vm.memory, self.image)
            return
        if index > 0 and not self.boot_vcpus_all:
            return
        modes.setup_for_image(vcpu, self.vm.memory, self.image, vcpu_index=index,
                              layout=self.boot_layout)

    def loop_config(self) -> LoopConfig:
        """COM1, the 0xE9 debug console and isa-debug-exit at 0xF4, served in the C loop; COM1 is
        one UART for all vCPUs, its interrupt on IRQ 4 when there is an irqchip; the report
        port's exits always come back to the machine; the virtio-mmio windows' InterruptStatus
        and InterruptACK are served in the C loop too."""
        return LoopConfig(serial_base=COM1, debugcon_port=DEBUGCON_PORT,
                          exit_port=DEBUG_EXIT_PORT, exit_port_size=DEBUG_EXIT_SIZE,
                          uart_irq=COM1_IRQ if self.irqchip else 0, uart_group=self._uart_group,
                          report_port=REPORT_PORT,
                          vmmio=tuple(line for _, _, t in self.virtio_mmio_devices
                                      for line in t.loop_handles()))

    # -- exits ----------------------------------------------------------------------------
    def report_from_exit(self, index: int, ex) -> Optional[object]:
        """The guest report a 32-bit OUT to the report port (0x1000) hands over, else None."""
        if ex.name == "IO" and ex.port == REPORT_PORT and ex.is_out and ex.size == 4:
            return decode_report(self.vm.memory, ex.value, index)
        return None

    def handle_exit(self, index: int, ex) -> bool:
        """Exits this machine serves beyond the C loop's: none (the PC serves its devices)."""
        return False

    def replay_port_io(self, vcpu, ex) -> None:
        """Make ``vcpu`` execute again the IN/OUT instruction behind its current I/O exit ``ex``
        instead of finishing it here: for an access that a device KVM now serves in the
        kernel (created after the exit) must see. Called on the vCPU's thread while the
        exit is pending.

        The exit is completed first (:meth:`~pykvm.vcpu.Vcpu.complete_io`), then every
        register is put back as it was at the exit, RIP at the instruction's start. Where RIP
        is at the start during the exit (VMX and SVM: KVM skips the instruction when it
        completes it) that is RIP at the exit; where the backend has moved RIP past the
        instruction before exiting (kvm_pvm), the instruction is found in the code just before
        it (:func:`pykvm.arch.x86.decode.port_io_length`). Raises
        :class:`~pykvm.errors.GuestError` for string I/O or code that no longer holds the
        instruction."""
        port, size, is_out = ex.port, ex.size, ex.is_out     # the exit is stale once completed
        regs = vcpu.get_regs()
        rip = regs.rip
        vcpu.complete_io()
        if vcpu.get_regs().rip == rip:                 # RIP was past the instruction already
            sregs = vcpu.get_sregs()
            _, bits = decode.cpu_mode(sregs.cr0, sregs.efer, sregs.cs.l, sregs.cs.db,
                                      regs.rflags)
            if bits != 64:
                rip &= 0xFFFF if bits == 16 else 0xFFFFFFFF
            want = 3
            start = max(rip - want, 0)
            base = 0 if bits == 64 else sregs.cs.base       # long mode ignores CS.base
            code = decode.read_guest_code(vcpu, self.vm.memory, base + start,
                                          bool(sregs.cr0 & decode.CR0_PG), rip - start)
            try:
                regs.rip = rip - decode.port_io_length(code, port=port, size=size, is_out=is_out,
                                                       bits=bits)
            except ValueError as e:
                raise GuestError(f"cannot replay the port access at RIP {rip:#x}: {e}") from e
        vcpu.set_regs(regs)

    def hold(self, index: int) -> bool:
        """No x86 machine but the PC parks vCPUs."""
        return False

    def describe_internal_error(self, vcpu, ex, symbols=None) -> str:
        """One line on a KVM_EXIT_INTERNAL_ERROR of ``vcpu`` in the guest's terms: RIP, symbol
        and file:line, CPU mode, the instruction decoded (:mod:`pykvm.arch.x86.decode`)."""
        return decode.describe_internal_error(vcpu, self.vm.memory, ex, symbols)

    def ended(self, ex) -> str:
        """"": an x86 machine without power management can always run again."""
        return ""

    def exit_verdict(self, ex) -> Tuple[int, str]:
        """(exit status, detail) for a run that ended with exit ``ex``: HLT is a finished guest,
        SHUTDOWN (a triple fault) a failed one, anything else an unhandled exit."""
        if ex.name == "HLT":
            return status.OK, "guest halted"
        if ex.name == "SHUTDOWN":
            return status.GUEST_FAILURE, "guest triple-faulted (SHUTDOWN)"
        return status.UNHANDLED_EXIT, f"unhandled {ex.name} exit: {ex!r}"

    def close(self) -> None:
        """Nothing runs in the background of this machine."""

    def close_devices(self) -> None:
        """No device of this machine holds host resources."""
