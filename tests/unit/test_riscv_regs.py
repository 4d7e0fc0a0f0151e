"""RISC-V ONE_REG id encoding, decoding and names (no KVM needed)."""

import pytest

from pykvm.arch.riscv import regs as R
from pykvm.arch.riscv.extensions import ISA_EXTENSIONS, SBI_EXTENSIONS


def test_constants_match_uapi():
    assert R.KVM_REG_RISCV == 0x8000000000000000
    assert R.KVM_REG_SIZE_U32 == 0x0020000000000000
    assert R.KVM_REG_SIZE_U64 == 0x0030000000000000
    assert R.KVM_REG_SIZE_U128 == 0x0040000000000000
    assert (R.TYPE_CONFIG, R.TYPE_CORE, R.TYPE_CSR, R.TYPE_TIMER, R.TYPE_FP_F,
            R.TYPE_FP_D, R.TYPE_ISA_EXT, R.TYPE_SBI_EXT, R.TYPE_VECTOR,
            R.TYPE_SBI_STATE) == tuple(range(1, 11))


@pytest.mark.parametrize("name, expected", [
    ("config.isa", 0x8030000001000000),
    ("config.satp_mode", 0x8030000001000006),
    ("config.zicbop_block_size", 0x8030000001000007),
    ("core.regs.pc", 0x8030000002000000),
    ("core.regs.a0", 0x803000000200000A),
    ("core.regs.t6", 0x803000000200001F),
    ("core.mode", 0x8030000002000020),
    ("csr.sstatus", 0x8030000003000000),
    ("csr.satp", 0x8030000003000008),
    ("csr.senvcfg", 0x803000000300000A),
    ("csr.aia.siselect", 0x8030000003010000),
    ("csr.aia.iprio2h", 0x8030000003010006),
    ("csr.smstateen.sstateen0", 0x8030000003020000),
    ("timer.frequency", 0x8030000004000000),
    ("timer.state", 0x8030000004000003),
    ("fp_f.f0", 0x8020000005000000),
    ("fp_f.fcsr", 0x8020000005000020),
    ("fp_d.f31", 0x803000000600001F),
    ("fp_d.fcsr", 0x8020000006000020),
    ("isa_ext.a", 0x8030000007000000),
    ("isa_ext.zabha", 0x8030000007000043),
    ("isa_ext.multi_en[0]", 0x8030000007010000),
    ("isa_ext.multi_dis[1]", 0x8030000007020001),
    ("sbi_ext.dbcn", 0x8030000008000009),
    ("sbi_ext.susp", 0x803000000800000B),
    ("sbi_ext.multi_en[0]", 0x8030000008010000),
    ("vector.vstart", 0x8030000009000000),
    ("vector.vlenb", 0x8030000009000004),
    ("sbi_state.sta.shmem_lo", 0x803000000A000000),
    ("sbi_state.sta.shmem_hi", 0x803000000A000001),
    ("sbi_state.fwft.misaligned_deleg.enable", 0x803000000A010000),
    ("sbi_state.fwft.pointer_masking.value", 0x803000000A010005),
])
def test_known_ids(name, expected):
    assert R.reg_id(name) == expected
    r = R.decode(expected)
    assert r.name == name and r.known
    assert R.parse(name) == expected
    assert R.parse(hex(expected)) == expected


def test_sizes_per_type():
    assert R.decode(R.reg_id("timer.time")).size == 8
    assert R.decode(R.reg_id("fp_f.f5")).size == 4
    assert R.decode(R.reg_id("fp_f.fcsr")).size == 4
    assert R.decode(R.reg_id("fp_d.f5")).size == 8
    assert R.decode(R.reg_id("fp_d.fcsr")).size == 4
    for n in ("config.isa", "core.regs.sp", "csr.sip", "isa_ext.v", "sbi_ext.pmu",
              "vector.vtype", "sbi_state.sta.shmem_lo"):
        assert R.decode(R.reg_id(n)).size == 8


@pytest.mark.parametrize("vlenb, code", [(16, 0x0040000000000000), (32, 0x0050000000000000),
                                         (64, 0x0060000000000000), (256, 0x0080000000000000)])
def test_vector_registers_sized_by_vlenb(vlenb, code):
    rid = R.reg_id("vector.v0", vlenb=vlenb)
    assert rid == 0x8000000009000006 | code
    r = R.decode(R.reg_id("vector.v31", vlenb=vlenb))
    assert r.name == "vector.v31" and r.size == vlenb and r.index == 6 + 31


def test_vector_register_needs_vlenb():
    with pytest.raises(ValueError):
        R.reg_id("vector.v1")


def test_every_table_entry_round_trips():
    names = ([f"config.{n}" for n in R.CONFIG_REGS] + [f"core.{n}" for n in R.CORE_REGS]
             + [f"csr.{n}" for n in R.CSR_GENERAL_REGS]
             + [f"csr.aia.{n}" for n in R.CSR_AIA_REGS]
             + [f"timer.{n}" for n in R.TIMER_REGS]
             + [f"fp_f.f{i}" for i in range(32)] + [f"fp_d.f{i}" for i in range(32)]
             + [f"isa_ext.{n}" for n in ISA_EXTENSIONS]
             + [f"sbi_ext.{n}" for n in SBI_EXTENSIONS]
             + [f"vector.{n}" for n in R.VECTOR_CSR_REGS]
             + [f"sbi_state.fwft.{f}.{x}" for f in R.SBI_FWFT_FEATURES
                for x in R.SBI_FWFT_FIELDS])
    ids = set()
    for n in names:
        rid = R.reg_id(n)
        assert R.decode(rid).name == n
        ids.add(rid)
    assert len(ids) == len(names)


def test_short_aliases():
    assert R.reg_id("pc") == R.reg_id("core.regs.pc")
    assert R.reg_id("a1") == R.reg_id("core.regs.a1")
    assert R.reg_id("mode") == R.reg_id("core.mode")
    assert R.reg_id("stvec") == R.reg_id("csr.stvec")
    assert R.reg_id("satp_mode") == R.reg_id("config.satp_mode")
    assert R.reg_id("vlenb") == R.reg_id("vector.vlenb")
    with pytest.raises(KeyError):
        R.reg_id("nonsense")
    with pytest.raises(KeyError):
        R.reg_id("isa_ext.nonsense")
    with pytest.raises(KeyError):
        R.reg_id("csr.nonsense")


@pytest.mark.parametrize("rid, name", [
    (0x8030000007000000 | 200, "isa_ext.200"),          # ISA ext newer than the table
    (0x8030000008000000 | 77, "sbi_ext.77"),
    (0x8030000001000000 | 40, "config.40"),
    (0x8030000002000000 | 99, "core.99"),
    (0x8030000003000000 | 50, "csr.50"),
    (0x8030000003070003, "csr.sub7.3"),                 # unknown CSR subtype
    (0x803000000A050002, "sbi_state.sub5.2"),           # unknown SBI state subtype
    (0x8030000004000000 | 9, "timer.9"),
])
def test_unknown_ids_get_generic_round_tripping_names(rid, name):
    r = R.decode(rid)
    assert r.name == name
    assert not r.known
    assert R.parse(r.name) == rid


@pytest.mark.parametrize("rid", [
    0x8030000011000000,          # unknown type 0x11
    0x6030000002000000,          # not RISC-V at all
    0x8030000102000000,          # reserved bits set
    0x8020000002000000,          # core.regs.pc with a 32-bit size
    0x8030000001050000,          # config with a subtype
])
def test_oddities_are_kept_with_raw_names(rid):
    r = R.decode(rid)
    assert r.id == rid
    assert r.name.startswith("riscv.0x") or not r.known
    assert R.parse(r.name) == rid


def test_isa_and_sbi_ext_helpers():
    assert R.isa_ext_id("zabha") == R.reg_id("isa_ext.zabha")
    assert R.isa_ext_id(67) == R.reg_id("isa_ext.zabha")
    assert R.sbi_ext_id("SUSP") == R.reg_id("sbi_ext.susp")


def test_make_id_validation():
    with pytest.raises(ValueError):
        R.make_id(R.TYPE_CORE, 0, size=3)
    with pytest.raises(ValueError):
        R.make_id(R.TYPE_CORE, 0x10000)
