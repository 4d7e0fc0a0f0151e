"""RISC-V extension tables and canonical ISA strings."""

import pytest

from pykvm.arch.riscv import extensions as E

# KVM_RISCV_ISA_EXT_* in uAPI order (Linux 7.x arch/riscv/include/uapi/asm/kvm.h),
# typed independently of the table under test.
UAPI_ISA = """A C D F H I M SVPBMT SSTC SVINVAL ZIHINTPAUSE ZICBOM ZICBOZ ZBB SSAIA V
SVNAPOT ZBA ZBS ZICNTR ZICSR ZIFENCEI ZIHPM SMSTATEEN ZICOND ZBC ZBKB ZBKC ZBKX ZKND ZKNE
ZKNH ZKR ZKSED ZKSH ZKT ZVBB ZVBC ZVKB ZVKG ZVKNED ZVKNHA ZVKNHB ZVKSED ZVKSH ZVKT ZFH
ZFHMIN ZIHINTNTL ZVFH ZVFHMIN ZFA ZTSO ZACAS SSCOFPMF ZIMOP ZCA ZCB ZCD ZCF ZCMOP ZAWRS
SMNPM SSNPM SVADE SVADU SVVPTC ZABHA ZICCRSE ZAAMO ZALRSC ZICBOP ZFBFMIN ZVFBFMIN
ZVFBFWMA ZCLSD ZILSD ZALASR""".split()
UAPI_SBI = "V01 TIME IPI RFENCE SRST HSM PMU EXPERIMENTAL VENDOR DBCN STA SUSP FWFT MPXY".split()


def test_isa_enum_order_matches_uapi():
    assert [e.upper() for e in E.ISA_EXTENSIONS[:len(UAPI_ISA)]] == UAPI_ISA
    assert E.ISA_EXT_IDS["svvptc"] == 66
    assert E.ISA_EXT_IDS["zabha"] == 67
    assert E.ISA_EXT_IDS["ziccrse"] == 68
    assert E.ISA_EXT_IDS["zalasr"] == 77
    assert set(E.ISA_EXTENSIONS[len(UAPI_ISA):]) == E.ISA_NEXT_EXTENSIONS
    assert len(set(E.ISA_EXTENSIONS)) == len(E.ISA_EXTENSIONS)
    for name in ("svvptc", "zabha", "ziccrse"):
        assert E.ISA_EXT_SINCE[name] == "6.14"


def test_sbi_enum_and_eids():
    assert [e.upper() for e in E.SBI_EXTENSIONS] == UAPI_SBI
    assert E.SBI_EXT_IDS["dbcn"] == 9 and E.SBI_EXT_IDS["susp"] == 11
    assert E.SBI_EXT_DBCN == int.from_bytes(b"DBCN", "big")
    assert E.SBI_EXT_SRST == int.from_bytes(b"SRST", "big")
    assert E.SBI_EXT_SUSP == int.from_bytes(b"SUSP", "big")
    assert E.SBI_EXT_TIME == int.from_bytes(b"TIME", "big")
    assert E.SBI_EXT_FWFT == int.from_bytes(b"FWFT", "big")
    assert E.SBI_EXT_MPXY == int.from_bytes(b"MPXY", "big")
    assert E.SBI_EXT_RFENCE == 0x52464E43
    assert (E.SBI_EXT_HSM, E.SBI_EXT_IPI, E.SBI_EXT_PMU, E.SBI_EXT_STA) == \
        (0x48534D, 0x735049, 0x504D55, 0x535441)
    lo, hi = E.SBI_EID_RANGES["experimental"]
    assert lo <= E.PYKVM_REPORT_EID <= hi


def test_sbi_errors():
    assert (E.SBI_SUCCESS, E.SBI_ERR_FAILED, E.SBI_ERR_NOT_SUPPORTED, E.SBI_ERR_INVALID_PARAM,
            E.SBI_ERR_DENIED, E.SBI_ERR_INVALID_ADDRESS) == (0, -1, -2, -3, -4, -5)
    assert E.SBI_ERR_DENIED_LOCKED == -14
    assert E.SBI_ERROR_NAMES[-2] == "NOT_SUPPORTED"


@pytest.mark.parametrize("exts, expected", [
    ("imafdc", "rv64imafdc"),
    ("cdfami", "rv64imafdc"),
    (["c", "a", "zifencei", "zicsr", "m", "f", "d"], "rv64imafdc_zicsr_zifencei"),
    (["i", "v", "h", "c", "b"], "rv64icbvh"),
    # z-extensions by category letter (i m a f d q l c b k j t p v h), then name
    (["i", "zbb", "zicsr", "zaamo", "zfh", "zca", "zkt", "zvbb", "zmmul", "zba", "zicond"],
     "rv64i_zicond_zicsr_zmmul_zaamo_zfh_zca_zba_zbb_zkt_zvbb"),
    # then s-extensions alphabetically, then x-extensions
    (["i", "xtheadba", "svpbmt", "sstc", "smstateen", "zihpm", "ssaia", "svvptc"],
     "rv64i_zihpm_smstateen_ssaia_sstc_svpbmt_svvptc_xtheadba"),
    ([], "rv64i"),
    (["i", "isa_ext.93"], "rv64i"),
])
def test_canonical_isa_string(exts, expected):
    assert E.canonical_isa_string(exts) == expected


def test_parse_isa_string():
    assert E.parse_isa_string("rv64imafdc_zicsr_zifencei") == \
        ["i", "m", "a", "f", "d", "c", "zicsr", "zifencei"]
    assert E.parse_isa_string("rv64gc") == \
        ["i", "m", "a", "f", "d", "c", "zicsr", "zifencei"]
    s = "rv64imafdcvh_zicbom_zba_sstc_svpbmt"
    assert E.canonical_isa_string(E.parse_isa_string(s)) == s
    with pytest.raises(ValueError):
        E.parse_isa_string("x86_64")
