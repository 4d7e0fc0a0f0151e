"""Port of tools/testing/selftests/kvm/x86_64/sync_regs_test.c (KVM_CAP_SYNC_REGS): KVM_RUN
refuses an invalid bit in kvm_valid_regs or kvm_dirty_regs with EINVAL; the synced regs, sregs
and events equal KVM_GET_*; synced RBX and APIC base marked dirty reach the guest; with
kvm_dirty_regs clear, kvm_run.s is overwritten; with kvm_valid_regs clear it is left alone; and
three racers (CR4.PAE toggled, an invalid exception vector, an exception both pending and
injected) rewriting kvm_run.s for 2 s while the vCPU runs do not break KVM."""
import threading
import time

import pytest

from pykvm.abi import ffi
from pykvm.errors import KvmError

pytestmark = [pytest.mark.requires_kvm, pytest.mark.requires_arch("x86_64")]
SYNC_REGS, SYNC_SREGS, SYNC_EVENTS = 1, 2, 4
TEST_SYNC_FIELDS = SYNC_REGS | SYNC_SREGS | SYNC_EVENTS
INVALID_SYNC_FIELD = 0x80000000
PORT = 0x2000
UD_VECTOR = 6
X86_CR4_PAE, EFER_LME = 1 << 5, 1 << 8
REGS = ("rax rbx rcx rdx rsi rdi rsp rbp r8 r9 r10 r11 r12 r13 r14 r15 rip rflags").split()


@pytest.fixture
def vcpu(kvm, guest_vm):
    """The guest's vCPU, stopped at its SYNC before the IN loop (KVM_CAP_SYNC_REGS required as
    the C test's main() does)."""
    cap = kvm.check_extension("SYNC_REGS")
    if (cap & TEST_SYNC_FIELDS) != TEST_SYNC_FIELDS or cap & INVALID_SYNC_FIELD:
        pytest.skip(f"pykvm: host lacks KVM_CAP_SYNC_REGS {TEST_SYNC_FIELDS:#x} (has {cap:#x})")
    m = guest_vm("sel_sync_regs.c")
    m.sync(stage=0)
    return m.vcpus[0]


def s_regs(vcpu):
    """(regs, sregs, events): views of x86 ``struct kvm_sync_regs`` in ``kvm_run.s``."""
    base = ffi.cast("char *", ffi.addressof(vcpu.run_struct.s))
    rsz, ssz = ffi.sizeof("struct kvm_regs"), ffi.sizeof("struct kvm_sregs")
    return (ffi.cast("struct kvm_regs *", base), ffi.cast("struct kvm_sregs *", base + rsz),
            ffi.cast("struct kvm_vcpu_events *", base + rsz + ssz))


def run_io(vcpu):
    """vcpu_run() + TEST_ASSERT_KVM_EXIT_REASON(KVM_EXIT_IO) at the guest's port."""
    ex = vcpu.run()
    assert ex.name == "IO" and ex.port == PORT, f"Wanted KVM exit reason: IO at {PORT:#x}, got {ex}"


def compare_regs(left, right):
    for r in REGS:
        assert getattr(left, r) == getattr(right, r), \
            f"Register {r} values did not match: {getattr(left, r):#x}, {getattr(right, r):#x}"


def test_read_invalid(vcpu):
    run = vcpu.run_struct
    for valid in (INVALID_SYNC_FIELD, INVALID_SYNC_FIELD | TEST_SYNC_FIELDS):
        run.kvm_valid_regs = valid
        with pytest.raises(KvmError) as e:
            vcpu.run()
        assert e.value.errno == 22, "Invalid kvm_valid_regs did not cause expected KVM_RUN error"
        run.kvm_valid_regs = 0


def test_set_invalid(vcpu):
    run = vcpu.run_struct
    for dirty in (INVALID_SYNC_FIELD, INVALID_SYNC_FIELD | TEST_SYNC_FIELDS):
        run.kvm_dirty_regs = dirty
        with pytest.raises(KvmError) as e:
            vcpu.run()
        assert e.value.errno == 22, "Invalid kvm_dirty_regs did not cause expected KVM_RUN error"
        run.kvm_dirty_regs = 0


def test_req_and_verify_all_valid(vcpu):
    run = vcpu.run_struct
    run.kvm_valid_regs = TEST_SYNC_FIELDS
    run_io(vcpu)
    regs, _sregs, _events = s_regs(vcpu)
    compare_regs(vcpu.get_regs(), regs)
    vcpu.get_sregs()                # compare_sregs() and compare_vcpu_events() are empty in C
    vcpu.get_vcpu_events()


def test_set_and_verify_various(vcpu):
    run = vcpu.run_struct
    run.kvm_valid_regs = TEST_SYNC_FIELDS
    run_io(vcpu)
    regs, sregs, _events = s_regs(vcpu)
    regs.rbx = 0xBAD1DEA
    sregs.apic_base = 1 << 11
    run.kvm_valid_regs = TEST_SYNC_FIELDS
    run.kvm_dirty_regs = SYNC_REGS | SYNC_SREGS
    run_io(vcpu)
    assert regs.rbx == 0xBAD1DEA + 1, f"rbx sync regs value incorrect {regs.rbx:#x}."
    assert sregs.apic_base == 1 << 11, f"apic_base sync regs value incorrect {sregs.apic_base:#x}."
    compare_regs(vcpu.get_regs(), regs)
    vcpu.get_sregs()
    vcpu.get_vcpu_events()


def test_clear_kvm_dirty_regs_bits(vcpu):
    run = vcpu.run_struct
    regs, _, _ = s_regs(vcpu)
    run.kvm_valid_regs = TEST_SYNC_FIELDS
    run.kvm_dirty_regs = 0
    regs.rbx = 0xDEADBEEF
    run_io(vcpu)
    assert regs.rbx != 0xDEADBEEF, f"rbx sync regs value incorrect {regs.rbx:#x}."


def test_clear_kvm_valid_and_dirty_regs(vcpu):
    run = vcpu.run_struct
    regs, _, _ = s_regs(vcpu)
    run.kvm_valid_regs = TEST_SYNC_FIELDS
    run_io(vcpu)
    run.kvm_valid_regs = 0
    run.kvm_dirty_regs = 0
    regs.rbx = 0xAAAA
    g = vcpu.get_regs()
    g.rbx = 0xBAC0
    vcpu.set_regs(g)
    run_io(vcpu)
    assert regs.rbx == 0xAAAA, f"rbx sync regs value incorrect {regs.rbx:#x}."
    assert vcpu.get_regs().rbx == 0xBAC0 + 1, f"rbx guest value incorrect {vcpu.get_regs().rbx:#x}."


def test_clear_kvm_valid_regs_bits(vcpu):
    run = vcpu.run_struct
    regs, _, _ = s_regs(vcpu)
    run.kvm_valid_regs = TEST_SYNC_FIELDS
    run_io(vcpu)
    run.kvm_valid_regs = 0
    run.kvm_dirty_regs = TEST_SYNC_FIELDS
    regs.rbx = 0xBBBB
    run_io(vcpu)
    assert regs.rbx == 0xBBBB, f"rbx sync regs value incorrect {regs.rbx:#x}."
    assert vcpu.get_regs().rbx == 0xBBBB + 1, f"rbx guest value incorrect {vcpu.get_regs().rbx:#x}."


# -- the racers: each rewrites kvm_run.s while the main thread runs the vCPU ----------------
def race_sregs_cr4(run, sregs, events, stop):
    pae_enabled = sregs.cr4
    pae_disabled = pae_enabled & ~X86_CR4_PAE
    while not stop.is_set():
        run.kvm_dirty_regs = SYNC_SREGS
        sregs.cr4 = pae_enabled
        sregs.cr4 = pae_disabled


def race_events_exc(run, sregs, events, stop):
    while not stop.is_set():
        run.kvm_dirty_regs = SYNC_EVENTS
        events.flags = 0
        events.exception.nr = UD_VECTOR
        events.exception.pending = 1
        events.exception.nr = 255


def race_events_inj_pen(run, sregs, events, stop):
    events.exception.nr = UD_VECTOR
    while not stop.is_set():
        run.kvm_dirty_regs = SYNC_EVENTS
        events.flags = 0
        events.exception.injected = 1
        events.exception.pending = 1


@pytest.mark.parametrize("racer", [race_sregs_cr4, race_events_exc, race_events_inj_pen],
                         ids=["race_cr4", "race_exc", "race_inj_pen"])
def test_race(vcpu, racer):
    run = vcpu.run_struct
    _, sregs, events = s_regs(vcpu)
    run.kvm_valid_regs = SYNC_SREGS
    vcpu.run()
    run.kvm_valid_regs = 0
    # vcpu_save_state(), before the racer starts
    saved = (vcpu.get_regs(), vcpu.get_sregs(), vcpu.get_vcpu_events())
    assert sregs.cr4 & X86_CR4_PAE and sregs.efer & EFER_LME, \
        f"vCPU should be in long mode, CR4.PAE={int(bool(sregs.cr4 & X86_CR4_PAE))}, " \
        f"EFER.LME={int(bool(sregs.efer & EFER_LME))}"
    stop = threading.Event()
    thread = threading.Thread(target=racer, args=(run, sregs, events, stop), daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline:
            try:                                       # __vcpu_run(): errors are not checked
                ex = vcpu.run()
            except KvmError:
                continue
            if ex.name == "SHUTDOWN":                  # reload the known good state
                vcpu.set_regs(saved[0])
                vcpu.set_sregs(saved[1])
                vcpu.set_vcpu_events(saved[2])
            if racer is race_sregs_cr4:
                try:
                    vcpu.translate(0)
                except KvmError:
                    pass
    finally:
        stop.set()
        thread.join()
