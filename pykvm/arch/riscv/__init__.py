"""RISC-V support: ONE_REG ids and names, ISA/SBI extension tables, CPU types,
a device-tree writer and the userspace SBI services pykvm provides.

Importing this package does not touch /dev/kvm; the functions in ``cpu`` and
``sbi`` work on any vCPU object that offers ``get_one_reg``, ``set_one_reg``
and ``reg_list``.
"""

from .regs import RiscvReg, decode, parse, reg_id  # noqa: F401
from .extensions import (  # noqa: F401
    ISA_EXTENSIONS, SBI_EXTENSIONS, canonical_isa_string, parse_isa_string,
)
