"""RISC-V parts of Kvm / Vm / Vcpu (the arch ioctl helpers below the vCPU layer). RISC-V has no
GET_REGS: everything goes through ONE_REG."""
from ...errors import KvmError
from .cpu import named_reg_list
from .report import riscv_report


class KvmArch:
    def arch_info(self) -> dict:
        return {"riscv": riscv_report(self)}


class VmArch:
    def _arch_init(self) -> None:
        pass


class VcpuArch:
    def _arch_init(self) -> None:
        pass


def describe_registers(vcpu):
    """(name, ONE_REG id, size, value) for every register KVM_GET_REG_LIST reports."""
    rows = []
    for reg in named_reg_list(vcpu):
        try:
            v = vcpu.get_one_reg(reg.id)
        except KvmError as e:
            v = e.errno_name
        rows.append((reg.name, reg.id, reg.size, v))
    return rows
