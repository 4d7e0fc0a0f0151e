"""The ``riscv`` section of ``pykvm caps``: ISA and SBI extensions a fresh vCPU offers."""
from . import cpu


def riscv_report(kvm) -> dict:
    with kvm.create_vm() as vm:
        vcpu = vm.create_vcpu()
        isa = cpu.isa_extensions(vcpu)
        sbi = cpu.sbi_extensions(vcpu)
        return {
            "isa_extensions": sorted(n for n, v in isa.items() if v),
            "isa_extensions_disabled": sorted(n for n, v in isa.items() if v is False),
            "sbi_extensions": sorted(n for n, v in sbi.items() if v),
            "sbi_extensions_disabled": sorted(n for n, v in sbi.items() if v is False),
            "isa_string": cpu.isa_string(vcpu),
            "satp_mode": cpu.satp_mode(vcpu),
        }
