"""NestedState (struct kvm_nested_state) encoding, SVM helpers: pure Python, no KVM needed."""
import struct

import pytest

from pykvm.arch.x86 import svm
from pykvm.arch.x86.regs import CpuidEntry, cpuid_lookup
from pykvm.arch.x86.nested import (FLAGS, NestedState, enable_svm_cpuid, has_svm_cpuid)

HDR = 128
FMT_VMX, FMT_SVM = 0, 1


def header(fmt, flags, size, *hdr_u64):
    """struct kvm_nested_state's 128-byte header built by hand: u16 flags, u16 format,
    u32 size, then the 120-byte union."""
    raw = struct.pack("<HHI", flags, fmt, size) + struct.pack(f"<{len(hdr_u64)}Q", *hdr_u64)
    return raw + bytes(HDR - len(raw))


def test_flag_values_are_the_uapi_ones():
    assert FLAGS == {"GUEST_MODE": 1, "RUN_PENDING": 2, "EVMCS": 4, "MTF_PENDING": 8,
                     "GIF_SET": 0x100}


def test_svm_header_only_from_bytes():
    st = NestedState.from_bytes(header(FMT_SVM, 0x100, HDR))
    assert (st.format, st.flags, st.size) == (FMT_SVM, 0x100, HDR)
    assert st.format_name == "SVM"
    assert st.flag_names == ["GIF_SET"]
    assert st.header_only and not st.guest_mode and st.data == b""


def test_svm_full_state_round_trip():
    vmcb = bytearray(0x1000)
    vmcb[0x058:0x05C] = (7).to_bytes(4, "little")                 # asid
    vmcb[0x4D0:0x4D8] = (svm.EFER_SVME | 0x500).to_bytes(8, "little")
    raw = header(FMT_SVM, 0x101, HDR + 0x1000, 0x114000) + bytes(vmcb)
    st = NestedState.from_bytes(raw)
    assert st.guest_mode and not st.header_only
    assert st.flag_names == ["GUEST_MODE", "GIF_SET"]
    assert st.svm_vmcb_pa == 0x114000 and st.size == 4224 and len(st.data) == 0x1000
    assert svm.vmcb_field(st.data, "asid") == 7
    assert svm.vmcb_field(st.data, "save.efer") & svm.EFER_SVME
    assert st.to_bytes() == raw
    assert NestedState.from_bytes(st.to_bytes()) == st


def test_vmx_header_fields_round_trip():
    # vmx hdr: u64 vmxon_pa, u64 vmcs12_pa, u16 smm.flags, u16 pad, u32 flags, u64 deadline
    raw = bytearray(header(FMT_VMX, 0, HDR, 0x1000, 0x2000))
    struct.pack_into("<HHIQ", raw, 8 + 16, 2, 0, 1, 12345)  # smm VMXON, timer deadline valid
    st = NestedState.from_bytes(bytes(raw))
    assert st.format_name == "VMX"
    assert (st.vmx_vmxon_pa, st.vmx_vmcs12_pa) == (0x1000, 0x2000)
    assert (st.vmx_smm_flags, st.vmx_flags, st.vmx_preemption_timer_deadline) == (2, 1, 12345)
    assert st.header_only and st.flag_names == []
    assert NestedState.from_bytes(st.to_bytes()) == st
    assert st.to_bytes() == bytes(raw)


def test_unknown_flags_and_format_are_named_not_dropped():
    st = NestedState.from_bytes(header(7, 0x8001, HDR))
    assert st.format_name == "FORMAT_7"
    assert st.flag_names == ["GUEST_MODE", "0x8000"]
    assert st.guest_mode
    assert NestedState.from_bytes(st.to_bytes()).flags == 0x8001


def test_size_field_bounds_the_data():
    raw = header(FMT_SVM, 0x100, HDR) + b"\xaa" * 64       # trailing bytes beyond size
    st = NestedState.from_bytes(raw)
    assert st.header_only and st.data == b""
    # a size larger than the buffer keeps what is there and remembers the claimed size
    st = NestedState.from_bytes(header(FMT_SVM, 0x101, HDR + 0x1000) + b"\x01" * 16)
    assert st.size == HDR + 0x1000 and st.data == b"\x01" * 16


def test_short_buffer_is_refused():
    with pytest.raises(ValueError):
        NestedState.from_bytes(bytes(HDR - 1))


def test_invalid_state_encodes_as_given():
    """Tests send invalid states on purpose (size below the header, bad format)."""
    raw = NestedState(format=2, flags=0x100, size=64).to_bytes()
    assert len(raw) == HDR
    assert struct.unpack_from("<HHI", raw) == (0x100, 2, 64)


def test_enable_svm_cpuid():
    base = [CpuidEntry(0, 0, 0, 0x80000001, 1, 2, 3),
            CpuidEntry(0x80000001, 0, 0, 0, 0, 0x1, 0x2)]
    assert not has_svm_cpuid(base)
    out = enable_svm_cpuid(base)
    assert has_svm_cpuid(out)
    e = cpuid_lookup(out, 0x80000001)
    assert (e.ecx, e.edx) == (0x1 | 0x4, 0x2)                   # only ECX[2] added
    assert cpuid_lookup(out, 0x8000000A) is not None
    assert cpuid_lookup(out, 0) == base[0]
    assert has_svm_cpuid(enable_svm_cpuid([]))
    assert enable_svm_cpuid(out) == out                         # idempotent


def test_svm_exit_names():
    assert svm.exit_name(0x81) == "VMMCALL"
    assert svm.exit_name(0x78) == "HLT"
    assert svm.exit_name(0x7B) == "IOIO"
    assert svm.exit_name(0x80) == "VMRUN"
    assert svm.exit_name(0x400) == "NPF"
    assert svm.exit_name(-1) == "INVALID"
    assert svm.exit_name(0x4E) == "EXCP14"
    assert svm.exit_name(0x13) == "WRITE_CR3"
    assert svm.EXIT_NUMBERS["VMMCALL"] == svm.EXIT_VMMCALL == 0x81
    assert svm.ioio_port(0x50010010) == 0x5001


def test_vmcb_field_bounds():
    with pytest.raises(ValueError):
        svm.vmcb_field(bytes(0x100), "save.rip")
