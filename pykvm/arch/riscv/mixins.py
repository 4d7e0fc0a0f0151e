"""RISC-V parts of Kvm / Vm / Vcpu. RISC-V has no GET_REGS: everything goes through ONE_REG."""


class KvmArch:
    def arch_info(self) -> dict:
        from .report import riscv_report
        return {"riscv": riscv_report(self)}


class VmArch:
    def _arch_init(self) -> None:
        pass


class VcpuArch:
    def _arch_init(self) -> None:
        pass
