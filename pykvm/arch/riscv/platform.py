"""The RISC-V platform of :class:`pykvm.machine.Machine`: RAM at 0x80000000, cpu type applied
through ONE_REG, DBCN/SUSP enabled before the first run, a generated device tree in a1, and
forwarded SBI calls served by :class:`~pykvm.arch.riscv.sbi.SbiServices`."""
from typing import Iterable, Optional

from ... import loader, status
from ...errors import KvmError
from ...report import decode as decode_report
from . import cpu, fdt, sbi
from .extensions import canonical_isa_string

RAM_BASE = 0x80000000
DTB_SPACE = 64 << 10


class _RamView:
    """Guest RAM seen from RAM_BASE, for the loader (which checks against ``size``)."""

    def __init__(self, mem, size):
        self._mem, self.size = mem, size

    def write(self, gpa, data):
        self._mem.write(gpa, data)

    def read(self, gpa, n):
        return self._mem.read(gpa, n)


class Platform:
    ram_base = RAM_BASE
    arch = "riscv64"

    def __init__(self, machine, *, cpu_type: str = "max", disable: Iterable[str] = (),
                 suspend_seconds: float = 0.0, sbi_extensions: Iterable[str] = ("dbcn", "susp"),
                 on_suspend=None):
        self.m = machine
        self.cpu_type = cpu_type
        self.disable = tuple(disable)
        self.sbi_extensions = tuple(sbi_extensions)
        self.cpu_result = None
        self.dtb_addr = None
        self.dtb = None
        self.cmdline = ""
        self.sbi = sbi.SbiServices(machine.vm.memory, console=machine._console_out,
                                   suspend_seconds=suspend_seconds, on_suspend=on_suspend)

    def create_devices(self) -> None:
        pass

    def load(self, image, *, cmdline="", initrd=(), flat_addr=None, flat_mode="riscv"):
        if initrd:
            raise loader.LoadError("--initrd is not supported on this platform yet")
        self.cmdline = cmdline
        view = _RamView(self.m.vm.memory, self.m.ram.size)
        return loader.load_image(view, image, arch="riscv64", ram_base=RAM_BASE, reserved=None,
                                 flat_addr=flat_addr, flat_mode="riscv")

    def loop_config(self):
        """No port I/O on RISC-V; the SBI debug console is served in the C loop, reading
        guest RAM through the regions known now (anything else goes to Python)."""
        from ...runloop import LoopConfig
        ram = tuple((s.gpa, s.host_addr, s.size) for s in self.m.vm.memory)
        return LoopConfig(serial_base=0, debugcon_port=0, exit_port=0, sbi_console=True, ram=ram)

    def setup_vcpu(self, vcpu, index: int) -> None:
        self.cpu_result = cpu.apply_cpu_type(vcpu, self.cpu_type, disable=self.disable)
        for name in self.sbi_extensions:
            try:
                sbi.enable_sbi_extension(vcpu, name)
            except (KvmError, cpu.ExtensionError):
                pass                      # absent on this kernel: guests see NOT_SUPPORTED
        if index == 0:
            self._write_dtb(vcpu)
        cpu.set_boot_state(vcpu, pc=self.m.image.entry, hartid=index, dtb=self.dtb_addr)
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
        n = len(getattr(self.m, "vcpus", [])) or 1
        hart = cpu.hart_description(vcpu, 0, isa=self.advertised_isa(vcpu))
        harts = [dict(hart, hartid=i) for i in range(max(n, 1))]
        self.dtb = fdt.build_dtb(harts, RAM_BASE, self.m.ram.size, cpu.timebase_frequency(vcpu),
                                 self.cmdline)
        if len(self.dtb) > DTB_SPACE:
            raise ValueError("device tree larger than its space")
        self.dtb_addr = RAM_BASE + self.m.ram.size - DTB_SPACE
        self.m.vm.memory.write(self.dtb_addr, self.dtb)

    def report_from_exit(self, index: int, ex) -> Optional[object]:
        if ex.name == "RISCV_SBI" and ex.extension_id == sbi.PYKVM_REPORT_EID:
            ex.set_return(0, 0)
            return decode_report(self.m.vm.memory, ex.args[0], index)
        return None

    def handle_exit(self, index: int, ex) -> bool:
        if ex.name == "RISCV_SBI":
            self.sbi.handle(ex)
            return True
        return False

    def exit_verdict(self, ex):
        if ex.name == "SYSTEM_EVENT" and ex.type_name in ("SHUTDOWN", "RESET"):
            return status.OK, f"guest requested system {ex.type_name.lower()}"
        return status.UNHANDLED_EXIT, f"unhandled {ex.name} exit: {ex!r}"
