"""RISC-V extension control and cpu types against a fake vCPU."""

import errno

import pytest

from pykvm.arch.riscv import cpu as C
from pykvm.arch.riscv import regs as R
from pykvm.arch.riscv.extensions import KVM_ISA_NEVER_DISABLE


class FakeKvmError(Exception):
    def __init__(self, err):
        super().__init__(errno.errorcode[err])
        self.errno = err


class FakeVcpu:
    """Mimics KVM's rules for single ISA/SBI extension registers."""

    def __init__(self, isa, sbi=None, *, never_disable=KVM_ISA_NEVER_DISABLE,
                 never_enable=("h",), extra_ids=(), ran=False):
        self.isa = dict(isa)            # name -> bool (absent names: ENOENT)
        self.sbi = dict(sbi or {})
        self.never_disable = set(never_disable)
        self.never_enable = set(never_enable)
        self.extra = {rid: 1 for rid in extra_ids}
        self.ran = ran
        self.other = {}

    def _lookup(self, rid):
        r = R.decode(rid)
        if r.type == "isa_ext" and r.known:
            return self.isa, r.name.split(".", 1)[1]
        if r.type == "sbi_ext" and r.known:
            return self.sbi, r.name.split(".", 1)[1]
        return None, r

    def get_one_reg(self, rid):
        table, key = self._lookup(rid)
        if table is None:
            if rid in self.extra:
                return self.extra[rid]
            if rid in self.other:
                return self.other[rid]
            raise FakeKvmError(errno.ENOENT)
        if key not in table:
            raise FakeKvmError(errno.ENOENT)
        return int(table[key])

    def set_one_reg(self, rid, value):
        table, key = self._lookup(rid)
        if table is None:
            self.other[rid] = value
            return
        if key not in table:
            raise FakeKvmError(errno.ENOENT)
        want = bool(value)
        if table[key] == want:
            return
        if self.ran:
            raise FakeKvmError(errno.EBUSY)
        if table is self.isa:
            if want and key in self.never_enable:
                raise FakeKvmError(errno.EINVAL)
            if not want and key in self.never_disable:
                raise FakeKvmError(errno.EINVAL)
        table[key] = want

    def reg_list(self):
        ids = [R.isa_ext_id(n) for n in self.isa] + [R.sbi_ext_id(n) for n in self.sbi]
        return ids + list(self.extra) + [R.reg_id("core.regs.pc")]


HOST = {n: True for n in ["a", "c", "d", "f", "i", "m", "v", "zicsr", "zifencei", "zicntr",
                          "zihpm", "zba", "zbb", "zbs", "zabha", "zicond", "sstc", "svpbmt",
                          "zicbom", "ssaia", "svadu"]}
HOST["h"] = False


def test_isa_extensions_reports_absent_as_none_and_unknown_from_list():
    extra = R.make_id(R.TYPE_ISA_EXT, 120)
    v = FakeVcpu(HOST, extra_ids=[extra])
    exts = C.isa_extensions(v)
    assert exts["zabha"] is True and exts["h"] is False
    assert exts["zacas"] is None
    assert exts["isa_ext.120"] is True
    assert "isa_ext.120" not in C.isa_extensions(v, include_unknown=False)


def test_isa_string_from_one_reg():
    v = FakeVcpu(HOST)
    assert C.isa_string(v) == ("rv64imafdcv_zicbom_zicntr_zicond_zicsr_zifencei_zihpm_"
                               "zabha_zba_zbb_zbs_ssaia_sstc_svadu_svpbmt")


def test_set_isa_extension_typed_errors():
    v = FakeVcpu(HOST)
    C.set_isa_extension(v, "v", False)
    assert v.isa["v"] is False
    with pytest.raises(C.ExtensionAbsent) as ei:
        C.set_isa_extension(v, "zacas", True)
    assert ei.value.errno == errno.ENOENT and isinstance(ei.value.error, FakeKvmError)
    with pytest.raises(C.ExtensionNotAllowed):
        C.set_isa_extension(v, "zicsr", False)
    with pytest.raises(KeyError):
        C.set_isa_extension(v, "nosuchext", True)
    v.ran = True
    with pytest.raises(C.ExtensionBusy) as ei:
        C.set_isa_extension(v, "v", True)
    assert isinstance(ei.value, C.ExtensionError) and ei.value.__cause__ is ei.value.error


def test_sbi_extension_enable():
    v = FakeVcpu(HOST, {"dbcn": False, "susp": False, "srst": True})
    assert C.sbi_extensions(v)["dbcn"] is False
    assert C.sbi_extensions(v)["mpxy"] is None
    C.set_sbi_extension(v, "susp", True)
    assert v.sbi["susp"] is True
    with pytest.raises(C.ExtensionAbsent):
        C.set_sbi_extension(v, "mpxy", True)


def test_parse_cpu_type():
    assert C.parse_cpu_type("min,zabha,-zicond") == ("min", {"zabha"}, {"zicond"})
    assert C.parse_cpu_type("max", disable=["-zabha", "v"]) == ("max", set(), {"zabha", "v"})
    assert C.parse_cpu_type("host")[0] == "max"
    for bad in ("", "medium", "max,zba,-zba"):
        with pytest.raises(ValueError):
            C.parse_cpu_type(bad)


def test_resolve_cpu_type_logic():
    avail = {n: (n != "zabha") for n in HOST}
    avail.update({"h": False, "zacas": None})
    t = C.resolve_cpu_type("max", avail)
    assert t["zabha"] is True and t["h"] is True and "zacas" not in t
    t = C.resolve_cpu_type("min", avail)
    assert {n for n, on in t.items() if on} == set("imafdc")
    t = C.resolve_cpu_type("min,zabha,zicond", avail)
    assert {n for n, on in t.items() if on} == set("imafdc") | {"zabha", "zicond"}
    t = C.resolve_cpu_type("max,-zabha", avail, disable=["v"])
    assert t["zabha"] is False and t["v"] is False and t["zba"] is True
    with pytest.raises(C.ExtensionAbsent):
        C.resolve_cpu_type("min,zacas", avail)
    with pytest.raises(KeyError):
        C.resolve_cpu_type("min,notanext", avail)


def test_apply_cpu_type_min_disables_what_kvm_allows():
    v = FakeVcpu(HOST)
    res = C.apply_cpu_type(v, "min")
    on = {n for n, s in res.final.items() if s}
    # v, svadu... can be disabled; zicsr, zba, ... cannot
    assert "v" not in on and "svpbmt" not in on and "zicbom" not in on
    assert set("imafdc") <= on
    assert "zicsr" in res.not_allowed and "zba" in res.not_allowed
    assert not res.exact
    assert res.changed["v"] is False


def test_apply_cpu_type_max_and_explicit_refusal():
    v = FakeVcpu(dict(HOST, v=False))
    res = C.apply_cpu_type(v, "max")
    assert res.final["v"] is True and res.changed == {"v": True}
    assert res.not_allowed == {"h": True}
    v = FakeVcpu(HOST)
    with pytest.raises(C.ExtensionNotAllowed):
        C.apply_cpu_type(v, "max", disable=["zicsr"])
    v = FakeVcpu(HOST, never_disable=set())
    res = C.apply_cpu_type(v, "min,zabha")
    assert {n for n, s in res.final.items() if s} == set("imafdc") | {"zabha"}
    assert res.exact


def test_apply_cpu_type_after_run_is_busy():
    v = FakeVcpu(HOST, ran=True)
    with pytest.raises(C.ExtensionBusy):
        C.apply_cpu_type(v, "min")


def test_named_reg_list_and_boot_helpers():
    v = FakeVcpu({"i": True}, {"susp": False}, extra_ids=[0x8030000011000000])
    names = [r.name for r in C.named_reg_list(v)]
    assert names == ["isa_ext.i", "sbi_ext.susp", "riscv.0x8030000011000000", "core.regs.pc"]
    C.set_boot_state(v, pc=0x80200000, hartid=1, dtb=0x87e00000)
    assert v.other[R.reg_id("pc")] == 0x80200000
    assert v.other[R.reg_id("a0")] == 1 and v.other[R.reg_id("a1")] == 0x87e00000
    assert v.other[R.reg_id("core.mode")] == 1
    v.other[R.reg_id("config.satp_mode")] = 9
    assert C.hart_description(v, 0) == {"hartid": 0, "isa": "rv64i", "mmu_type": 9}
    assert C.mmu_type_for_satp_mode(10) == "riscv,sv57"
    assert C.mmu_type_for_satp_mode(0) is None
