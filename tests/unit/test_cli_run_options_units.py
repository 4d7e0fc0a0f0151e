"""The pieces of `pykvm run --param/--cpuid/--cpu-features` and `pykvm regs` that need no KVM
(issue 21, item 5): the option parsers, the refusal on a RISC-V host, and the x86 MSR name
table (pykvm.arch.x86.msrs). The end-to-end runs are tests/x86/test_cli_run_options.py."""
import argparse

import pytest

from pykvm import cli
from pykvm.arch.x86 import msrs


# -- option parsers -----------------------------------------------------------------------
def test_param_list_takes_decimal_hex_and_all_64_bits():
    assert cli._param_list("1,0x80000001, 0o7,0b11") == (1, 0x80000001, 7, 3)
    assert cli._param_list("18446744073709551615") == (2 ** 64 - 1,)
    assert cli._param_list(",".join(["0"] * cli.MAX_PARAMS)) == (0,) * 16


@pytest.mark.parametrize("text", ["", "1,", "x", "-1", str(2 ** 64), "1.5",
                                  ",".join(["1"] * 17)])
def test_param_list_refuses(text):
    with pytest.raises(argparse.ArgumentTypeError):
        cli._param_list(text)


@pytest.mark.parametrize("text, want", [
    ("0x80000001:edx=0x28100800", (0x80000001, 0, "edx", 0x28100800)),
    ("7.1:EAX=5", (7, 1, "eax", 5)),
    ("0x4000000a.0x2:ecx=0xffffffff", (0x4000000A, 2, "ecx", 0xFFFFFFFF)),
    ("1:ebx=0", (1, 0, "ebx", 0)),
])
def test_cpuid_spec(text, want):
    assert cli._cpuid_spec(text) == want


@pytest.mark.parametrize("text", ["1", "1:eax", ":eax=1", "1:rax=1", "1.:eax=1", "x:eax=1",
                                  "0x100000000:eax=0", "1.0x100000000:eax=0",
                                  "1:eax=0x100000000", "1:eax=-1", "1:eax=1:ebx=2"])
def test_cpuid_spec_refuses(text):
    with pytest.raises(argparse.ArgumentTypeError):
        cli._cpuid_spec(text)


def test_feature_list_spellings():
    assert cli._feature_list("+rdtscp,-avx") == (("rdtscp", True), ("avx", False))
    assert cli._feature_list("host,sse4.2,x2apic=off,tsc_deadline=on") == (
        ("sse4.2", True), ("x2apic", False), ("tsc_deadline", True))


@pytest.mark.parametrize("text", ["", "host", "+", "+rdtscp,", "avx=yes", "+no-such-flag",
                                  "+a b"])
def test_feature_list_refuses(text):
    with pytest.raises(argparse.ArgumentTypeError):
        cli._feature_list(text)


def test_help_names_the_new_options(capsys):
    assert cli.main(["run", "--help"]) == 0
    text = capsys.readouterr().out
    for opt in ("--param N[,N...]", "--cpuid LEAF[.SUB]:REG=VALUE", "--cpu-features"):
        assert opt in text


@pytest.mark.parametrize("argv, flag", [(["--cpuid", "1:eax=0"], "--cpuid"),
                                        (["--cpu-features", "+zicboz"], "--cpu-features")])
def test_cpuid_options_are_refused_on_a_riscv_host(monkeypatch, capsys, argv, flag):
    """On RISC-V the options are one line and status 2, before any VM (the feature names are
    not checked against the x86 table there)."""
    monkeypatch.setattr(cli, "HOST_ARCH", "riscv64")
    assert cli.main(["run", "--no-input", *argv]) == 2
    err = capsys.readouterr().err
    assert err.splitlines() == [f"pykvm: {flag} applies to x86 guests"]


# -- MSR names ------------------------------------------------------------------------------
@pytest.mark.parametrize("index, name", [
    (0x10, "IA32_TIME_STAMP_COUNTER"), (0x1B, "IA32_APIC_BASE"), (0x1A0, "IA32_MISC_ENABLE"),
    (0x277, "IA32_PAT"), (0x174, "IA32_SYSENTER_CS"), (0x176, "IA32_SYSENTER_EIP"),
    (0xC0000080, "IA32_EFER"), (0xC0000081, "IA32_STAR"), (0xC0000082, "IA32_LSTAR"),
    (0xC0000083, "CSTAR"), (0xC0000084, "IA32_FMASK"), (0xC0000100, "IA32_FS_BASE"),
    (0xC0000101, "IA32_GS_BASE"), (0xC0000102, "IA32_KERNEL_GS_BASE"),
    (0xC0000103, "IA32_TSC_AUX"), (0x4B564D01, "MSR_KVM_SYSTEM_TIME_NEW"),
    (0x401, "IA32_MC0_STATUS"), (0x47F, "IA32_MC31_MISC"), (0x20F, "IA32_MTRR_PHYSMASK7"),
    (0x491, "IA32_VMX_VMFUNC"), (0x40000093, "HV_X64_MSR_SINT3"),
])
def test_msr_names(index, name):
    assert msrs.msr_name(index) == name
    assert msrs.msr_index(name) == index
    assert msrs.msr_label(index) == f"msr {index:#x} {name}"


def test_every_name_maps_back_to_its_own_index():
    assert all(msrs.msr_index(n) == i for i, n in msrs.MSR_NAMES.items())
    assert len(set(msrs.MSR_NAMES.values())) == len(msrs.MSR_NAMES)


@pytest.mark.parametrize("name, index", [("efer", 0xC0000080), ("MSR_IA32_PAT", 0x277),
                                         ("IA32_TSC", 0x10), ("sfmask", 0xC0000084),
                                         ("msr_kvm_steal_time", 0x4B564D03),
                                         ("kernel-gs-base", 0xC0000102)])
def test_msr_index_spellings(name, index):
    assert msrs.msr_index(name) == index


def test_unknown_msrs():
    assert msrs.msr_name(0x12345678) is None
    assert msrs.msr_label(0x12345678) == "msr 0x12345678"
    with pytest.raises(ValueError, match="unknown MSR name 'NOPE'"):
        msrs.msr_index("NOPE")
