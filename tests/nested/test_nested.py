"""Nested SVM on real KVM: an L1 hypervisor guest (guests/x86/svm_*.c) running its own L2.

These run inside the nested lab (``python -m pykvm.lab nested``: QEMU TCG ``-cpu max`` with SVM,
kvm_amd nested=1). On a host whose KVM offers no nested SVM they skip with the plugin's
"pykvm: host lacks" prefix. Under TCG an L1<->L2 round trip costs milliseconds: guests are tiny.
"""
import errno
import json
import subprocess
import sys
import time

import pytest

from pykvm import KvmError, abi
from pykvm.arch.x86 import svm
from pykvm.arch.x86.nested import (FLAGS, NestedState, enable_svm_cpuid, has_svm_cpuid,
                                   set_efer_svme)
from pykvm.machine import Machine

pytestmark = [
    pytest.mark.requires_arch("x86_64"),
    # the lab's inner JUnit is xunit2; the properties still reach the merged XML
    pytest.mark.filterwarnings("ignore:record_property is incompatible:pytest.PytestWarning"),
]

FMT_VMX, FMT_SVM = 0, 1
GUEST_MODE, RUN_PENDING, GIF_SET = FLAGS["GUEST_MODE"], FLAGS["RUN_PENDING"], FLAGS["GIF_SET"]
HDR = 128
SVM_STATE_SIZE = HDR + 0x1000           # header + VMCB image: 4224
PASS_PORT, TRAP_PORT = 0x5000, 0x5001
MEM = 8 << 20
STEP = 120.0                            # seconds per step: TCG is slow, but never this slow


@pytest.fixture
def fresh_vcpu(nested, kvm):
    with kvm.create_vm() as vm:
        v = vm.create_vcpu()
        v.set_cpuid(enable_svm_cpuid(kvm.supported_cpuid()))
        yield v


def expect_io(m, port, value):
    """Step until the guest's port write; return (exit, guest_mode) while it is current."""
    ev = m.step(timeout=STEP)
    assert ev.kind == "exit" and ev.exit.name == "IO", m.describe(ev)
    ex = ev.exit
    assert (ex.port, ex.is_out, ex.size, ex.data[0]) == (port, True, 1, value), repr(ex)
    return ex, ex.guest_mode


# -- the verdict -------------------------------------------------------------------------------

def test_caps_nested_verdict(nested):
    out = subprocess.run([sys.executable, "-m", "pykvm", "caps", "--json"], capture_output=True,
                         text=True, check=True).stdout
    n = json.loads(out)["nested"]
    assert n["available"] is True, n
    assert n["backend"] == "svm"
    assert n["module"] == "kvm_amd" and n["switches"]["nested"] in (True, 1)
    assert n["cpuid_svm"] is True
    assert n["nested_state_size"] == SVM_STATE_SIZE


def test_machine_cpuid_passes_svm_through(nested, kvm):
    """Machine's default CPUID is KVM_GET_SUPPORTED_CPUID, which has SVM when nested=1."""
    assert has_svm_cpuid(kvm.supported_cpuid())
    with Machine("hello", kvm=kvm, mem_size=MEM) as m:
        assert has_svm_cpuid(m.vcpus[0].get_cpuid())


# -- KVM_SET_NESTED_STATE validation on a fresh vCPU (as the kernel's state selftests) ---------

def _raw(fmt=FMT_SVM, flags=0, size=HDR, vmcb_pa=0, data=b""):
    return NestedState(format=fmt, flags=flags, size=size, svm_vmcb_pa=vmcb_pa,
                       data=data).to_bytes()


def _einval(vcpu, raw):
    with pytest.raises(KvmError) as e:
        vcpu.set_nested_state(raw)
    assert e.value.errno == errno.EINVAL, str(e.value)


def test_set_nested_state_size_below_header(fresh_vcpu):
    _einval(fresh_vcpu, _raw(flags=GIF_SET, size=HDR - 1))
    _einval(fresh_vcpu, _raw(flags=GIF_SET, size=0))


@pytest.mark.parametrize("flags", [0x80, 0x10, 0x8000])
def test_set_nested_state_unknown_flags(fresh_vcpu, flags):
    set_efer_svme(fresh_vcpu)
    _einval(fresh_vcpu, _raw(flags=GIF_SET | flags))


def test_set_nested_state_run_pending_needs_guest_mode(fresh_vcpu):
    set_efer_svme(fresh_vcpu)
    _einval(fresh_vcpu, _raw(flags=GIF_SET | RUN_PENDING))


@pytest.mark.parametrize("fmt", [FMT_VMX, 2, 0xFFFF])
def test_set_nested_state_bad_format(fresh_vcpu, fmt):
    set_efer_svme(fresh_vcpu)
    _einval(fresh_vcpu, _raw(fmt=fmt, flags=GIF_SET))


def test_set_nested_state_guest_mode_needs_svme(fresh_vcpu):
    full = dict(flags=GUEST_MODE | GIF_SET, size=SVM_STATE_SIZE, vmcb_pa=0x10000,
                data=bytes(0x1000))
    _einval(fresh_vcpu, _raw(**full))                      # EFER.SVME clear
    _einval(fresh_vcpu, _raw(flags=GUEST_MODE | GIF_SET))   # and header-only
    # without SVME only "GIF set, not in guest mode" is acceptable
    _einval(fresh_vcpu, _raw(flags=0))


def test_set_nested_state_guest_mode_needs_vmcb(fresh_vcpu):
    set_efer_svme(fresh_vcpu)
    _einval(fresh_vcpu, _raw(flags=GUEST_MODE | GIF_SET, size=HDR))          # no VMCB image
    _einval(fresh_vcpu, _raw(flags=GUEST_MODE | GIF_SET, size=SVM_STATE_SIZE,
                             vmcb_pa=0x10001, data=bytes(0x1000)))           # unaligned vmcb_pa


@pytest.mark.parametrize("svme", [False, True], ids=["svme-clear", "svme-set"])
def test_set_nested_state_header_only_gif(fresh_vcpu, svme):
    if svme:
        set_efer_svme(fresh_vcpu)
    fresh_vcpu.set_nested_state(_raw(flags=GIF_SET, size=HDR))
    st = fresh_vcpu.nested_state()
    assert st.format == FMT_SVM and st.format_name == "SVM"
    assert st.flags == GIF_SET and st.flag_names == ["GIF_SET"]
    assert st.size == HDR and st.header_only and not st.guest_mode
    # GIF cleared outside guest mode is only legal with SVME
    if svme:
        fresh_vcpu.set_nested_state(_raw(flags=0, size=HDR))
        assert fresh_vcpu.nested_state().flags == 0


# -- L1 runs L2 ----------------------------------------------------------------------------------

def test_l2_port_io_reaches_host_and_l1_sees_vmmcall_hlt(svm_vm, kvm, record_property):
    m = svm_vm("svm_l2_io")
    m.set_params(PASS_PORT, TRAP_PORT)
    vmcb_pa, = m.sync(stage=1, timeout=STEP)
    assert vmcb_pa % 4096 == 0
    # L2's write to a port L1's IOPM lets through: an I/O exit to us, taken in guest mode
    ex, guest_mode = expect_io(m, PASS_PORT, 0x5A)
    flags = ex.flags
    record_property("kvm_run_flags", hex(flags))
    if kvm.check_extension("X86_GUEST_MODE"):
        assert guest_mode, f"KVM_RUN_X86_GUEST_MODE not in kvm_run.flags ({flags:#x}) for L2 I/O"
    st = m.vcpus[0].nested_state()             # the kernel's own view, on any kernel
    assert st.guest_mode and st.svm_vmcb_pa == vmcb_pa
    # the port L1 intercepts goes to L1 instead: #VMEXIT IOIO
    code, port, info1 = m.sync(stage=2, timeout=STEP)
    assert (code, port) == (svm.EXIT_IOIO, TRAP_PORT), svm.exit_name(code)
    assert not info1 & 1                              # OUT
    code, rbx = m.sync(stage=3, timeout=STEP)
    assert svm.exit_name(code) == "VMMCALL" and code == 0x81
    assert rbx == 0x1234                              # L2's GPRs reach L1
    code, = m.sync(stage=4, timeout=STEP)
    assert svm.exit_name(code) == "HLT" and code == 0x78
    m.done(timeout=STEP)


@pytest.mark.requires_cap("X86_GUEST_MODE")            # Linux 6.11+
def test_l2_io_exit_has_guest_mode_flag_l1_exit_has_not(svm_vm):
    m = svm_vm("svm_l2_io")
    m.set_params(PASS_PORT, TRAP_PORT)
    m.sync(stage=1, timeout=STEP)
    ex, guest_mode = expect_io(m, PASS_PORT, 0x5A)
    assert guest_mode and ex.flags & abi.RUN_FLAGS["X86_GUEST_MODE"], hex(ex.flags)
    # L1's own report port write (stage 2 SYNC) is not in guest mode
    ev = m.step(timeout=STEP)
    assert ev.name == "sync" and ev.report.stage == 2
    assert not m.vcpus[0].run_struct.flags & abi.RUN_FLAGS["X86_GUEST_MODE"]


def test_nested_state_at_l2_io_exit_restores_into_fresh_vm(svm_vm, kvm):
    m1 = svm_vm("svm_state")
    m1.set_params(PASS_PORT)
    vmcb_pa, hsave_pa = m1.sync(stage=1, timeout=STEP)
    v1 = m1.vcpus[0]
    expect_io(m1, PASS_PORT, 1)

    st = v1.nested_state()                       # L2 stopped at its port write
    assert st.format_name == "SVM"
    assert st.guest_mode and st.flags & GIF_SET, st.flag_names
    assert st.size == SVM_STATE_SIZE and len(st.data) == 0x1000
    assert st.svm_vmcb_pa == vmcb_pa
    assert svm.vmcb_field(st.data, "asid") == 1
    assert svm.vmcb_field(st.data, "intercept_word4") & 1          # VMRUN intercepted
    assert svm.vmcb_field(st.data, "save.efer") & svm.EFER_SVME     # L1's own EFER
    assert NestedState.from_bytes(st.to_bytes()) == st

    # finish the pending OUT without running the guest (KVM_RUN with immediate_exit), so the
    # saved registers are past it; the nested state must not change
    v1.kick()
    assert v1.run().name == "INTR"
    st2 = v1.nested_state()
    assert (st2.format, st2.flags, st2.size, st2.svm_vmcb_pa) == \
        (st.format, st.flags, st.size, st.svm_vmcb_pa)
    regs, sregs = v1.get_regs(), v1.get_sregs()
    assert sregs.efer & svm.EFER_SVME
    msrs = v1.get_msrs([svm.MSR_VM_HSAVE_PA])
    assert msrs[svm.MSR_VM_HSAVE_PA] == hsave_pa
    ram = m1.memory.read(0, MEM)

    m2 = svm_vm("svm_state")                      # a fresh VM and vCPU
    v2 = m2.vcpus[0]
    m2.memory.write(0, ram)
    v2.set_sregs(sregs)
    v2.set_msrs(msrs)
    v2.set_regs(regs)
    v2.set_nested_state(st2)
    got = v2.nested_state()
    assert got.guest_mode and got.svm_vmcb_pa == vmcb_pa
    code, marker, r12 = m2.sync(stage=2, timeout=STEP)      # L2 went on to its VMMCALL
    assert code == svm.EXIT_VMMCALL
    assert marker == 0xFEED0001
    assert r12 == 0xABCDEF
    m2.done(timeout=STEP)
    assert not v2.nested_state().guest_mode


def test_asid_change_l2_sees_l1_writes(svm_vm):
    m = svm_vm("svm_asid")
    assert m.sync(stage=1, timeout=STEP) == (1, 0xA1, 0x1111)
    # new ASID, window remapped to page B, data changed: L2 reads B's new value
    assert m.sync(stage=2, timeout=STEP) == (2, 0xB2, 0x2222, 0x1111)
    # back to page A under TLB_CONTROL flush-all: L2 reads what L1 last wrote to A
    assert m.sync(stage=3, timeout=STEP) == (2, 0xA2, 1)
    assert m.sync(stage=4, timeout=STEP) == (svm.EXIT_HLT,)
    m.done(timeout=STEP)


def test_round_trip_rate(svm_vm, record_property):
    n = 50
    m = svm_vm("svm_roundtrip")
    m.set_params(n)
    assert m.sync(stage=1, timeout=STEP) == (n,)
    t0 = time.monotonic()
    got_n, tsc_delta, done = m.sync(stage=2, timeout=STEP)
    dt = time.monotonic() - t0
    m.done(timeout=STEP)
    assert (got_n, done) == (n, n)
    rate = n / dt
    record_property("svm_round_trips", n)
    record_property("svm_round_trips_per_s", round(rate, 1))
    record_property("svm_transitions_per_s", round(2 * rate, 1))
    record_property("svm_round_trip_tsc_cycles", tsc_delta // n)
    print(f"\nnested SVM: {n} L1<->L2 round trips in {dt * 1000:.1f} ms: {rate:.1f} round trips/s "
          f"({2 * rate:.1f} transitions/s), {tsc_delta // n} TSC cycles each")
