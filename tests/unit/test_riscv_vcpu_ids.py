"""Issue 21 item 1 (RISC-V), checked on any host: the ONE_REG ids and KVM_INTERRUPT values the
typed RISC-V vCPU methods (:class:`pykvm.arch.riscv.mixins.VcpuArch`) use equal what the
kernel's RISC-V uAPI header computes. Each id is compiled into a ``_Static_assert`` against the
header's own macros (``KVM_REG_RISCV_CORE_REG(regs.pc)`` ...) by the RISC-V cross compiler, so
the header, not pykvm, does the arithmetic. The methods themselves run in the RISC-V lab
(tests/riscv/test_vcpu_surface_riscv.py)."""
import shutil
import subprocess

import pytest

from pykvm.arch.riscv import mixins, regs

CC = "riscv64-linux-gnu-gcc"
BASE = "KVM_REG_RISCV | KVM_REG_SIZE_U64"


def _cases():
    """(C expression over the header's macros, pykvm's value) pairs."""
    out = []
    for i, n in enumerate(regs.CORE_REGS):
        out.append((f"{BASE} | KVM_REG_RISCV_CORE | KVM_REG_RISCV_CORE_REG({n})",
                    mixins.core_reg_id(mixins.CORE_NAMES[i])))
    for n in ("sstatus", "sie", "stvec", "sscratch", "sepc", "scause", "stval", "sip", "satp",
              "scounteren"):
        out.append((f"{BASE} | KVM_REG_RISCV_CSR | KVM_REG_RISCV_CSR_REG({n})",
                    mixins.typed_reg_id("csr", n)))
    for n in regs.TIMER_REGS:
        out.append((f"{BASE} | KVM_REG_RISCV_TIMER | KVM_REG_RISCV_TIMER_REG({n})",
                    mixins.typed_reg_id("timer", n)))
    for n in ("isa", "zicbom_block_size"):          # (the cross header is Linux 6.1's)
        out.append((f"{BASE} | KVM_REG_RISCV_CONFIG | KVM_REG_RISCV_CONFIG_REG({n})",
                    mixins.typed_reg_id("config", n)))
    for n in ("a", "c", "h", "sstc", "zicbom"):
        out.append((f"{BASE} | KVM_REG_RISCV_ISA_EXT | KVM_RISCV_ISA_EXT_{n.upper()}",
                    regs.isa_ext_id(n)))
    out.append(("KVM_INTERRUPT_SET", mixins.interrupt_irq(True)))
    out.append(("KVM_INTERRUPT_UNSET", mixins.interrupt_irq(False)))
    return out


def test_ids_equal_the_riscv_uapi_header(tmp_path):
    if not shutil.which(CC):
        pytest.skip(f"pykvm: host lacks a RISC-V cross compiler ({CC}) to expand the uAPI header")
    lines = ["#include <stddef.h>", "#include <linux/kvm.h>"]
    cases = _cases()
    for i, (expr, ours) in enumerate(cases):
        lines.append(f"_Static_assert((unsigned long long)({expr}) == {ours:#x}ULL, "
                     f"\"case {i}\");")
    src = tmp_path / "ids.c"
    src.write_text("\n".join(lines) + "\n")
    r = subprocess.run([CC, "-fsyntax-only", str(src)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert len(cases) >= 50, len(cases)


def test_a_wrong_id_fails_the_check(tmp_path):
    """The check is not a rubber stamp: pc's id plus one does not compile."""
    if not shutil.which(CC):
        pytest.skip(f"pykvm: host lacks a RISC-V cross compiler ({CC}) to expand the uAPI header")
    src = tmp_path / "bad.c"
    src.write_text("#include <stddef.h>\n#include <linux/kvm.h>\n"
                   f"_Static_assert(({BASE} | KVM_REG_RISCV_CORE | KVM_REG_RISCV_CORE_REG(regs.pc))"
                   f" == {mixins.core_reg_id('pc') + 1:#x}ULL, \"x\");\n")
    r = subprocess.run([CC, "-fsyntax-only", str(src)], capture_output=True, text=True)
    assert r.returncode != 0 and "static assertion failed" in r.stderr


def test_names_of_another_type_are_refused():
    with pytest.raises(KeyError, match="core register 'sstatus'"):
        mixins.core_reg_id("sstatus")
    with pytest.raises(KeyError):
        mixins.typed_reg_id("csr", "pc")
    with pytest.raises(KeyError, match="register type 'vector'"):
        mixins.typed_reg_id("vector", "vlenb")
    assert mixins.CORE_NAMES[0] == "pc" and mixins.CORE_NAMES[-1] == "mode"


def test_sip_seip_is_the_supervisor_external_interrupt_bit():
    assert mixins.SIP_SEIP == 1 << 9          # the privileged spec's sip.SEIP
