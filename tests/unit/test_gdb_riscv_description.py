"""The RISC-V GDB target's description (pykvm.gdbstub.riscv), which gdb parses: the features,
names, sizes and numbering gdb's riscv code looks for (GDB manual, "RISC-V Features"), and the
breakpoint instructions it plants. No KVM: the description is built from the layout alone; the
lab test tests/riscv/test_gdb_riscv.py has gdb read it from a running guest."""
import xml.etree.ElementTree as ET

import pytest

from pykvm.arch.riscv import regs, step
from pykvm.gdbstub import riscv
from pykvm.gdbstub.arch import TargetError

ABI = ["zero", "ra", "sp", "gp", "tp", "t0", "t1", "t2", "fp", "s1"] + \
    [f"a{i}" for i in range(8)] + [f"s{i}" for i in range(2, 12)] + [f"t{i}" for i in range(3, 7)]


@pytest.mark.parametrize("fpu", [False, True])
def test_description_features_and_numbering(fpu):
    root = ET.fromstring(riscv._xml(riscv._layout(fpu)))
    assert root.findtext("architecture") == "riscv:rv64"
    feats = {f.get("name"): f for f in root.findall("feature")}
    want = ["org.gnu.gdb.riscv.cpu"] + (["org.gnu.gdb.riscv.fpu"] if fpu else []) + \
        ["org.gnu.gdb.riscv.csr", "org.gnu.gdb.riscv.virtual"]
    assert [f.get("name") for f in root.findall("feature")] == want
    cpu = [(r.get("name"), r.get("bitsize")) for r in feats["org.gnu.gdb.riscv.cpu"]]
    assert cpu == [(n, "64") for n in ABI + ["pc"]]
    if fpu:
        names = [r.get("name") for r in feats["org.gnu.gdb.riscv.fpu"]]
        assert len(names) == 35 and names[:8] == [f"ft{i}" for i in range(8)]
        assert names[-3:] == ["fflags", "frm", "fcsr"]
    csrs = [r.get("name") for r in feats["org.gnu.gdb.riscv.csr"]]
    assert {"sstatus", "stvec", "sepc", "scause", "stval", "satp"} <= set(csrs)
    assert [r.get("name") for r in feats["org.gnu.gdb.riscv.virtual"]] == ["priv"]
    assert [int(r.get("regnum")) for r in root.iter("reg")] == \
        list(range(len(riscv._layout(fpu))))
    # every register is a ONE_REG of its size (x0 aside; fflags/frm/fcsr: fields of fp_d.fcsr)
    for name, size, _t, _feat, src in riscv._layout(fpu):
        if src == "zero":
            continue
        one = "fp_d.fcsr" if isinstance(src, tuple) else src
        assert regs.size_of_id(regs.reg_id(one)) == size, name


def test_breakpoint_kinds():
    t = riscv.RiscvTarget(machine=None)
    assert t.breakpoint_bytes(2) == step.C_EBREAK == b"\x02\x90"
    assert t.breakpoint_bytes(4) == step.EBREAK == b"\x73\x00\x10\x00"
    for kind in (0, 1, 3, 8):
        with pytest.raises(TargetError):
            t.breakpoint_bytes(kind)
