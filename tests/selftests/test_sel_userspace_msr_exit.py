"""Port of tools/testing/selftests/kvm/x86_64/userspace_msr_exit_test.c (KVM_CAP_X86_USER_SPACE_MSR
with KVM_X86_SET_MSR_FILTER): filtered reads and writes of a known MSR (IA32_XSS), one KVM
emulates only partly (IA32_FLUSH_CMD) and a fabricated one exit to userspace, whose answer (a
value, or an error the guest sees as #GP) the guest checks, also through KVM's emulator when
kvm.force_emulation_prefix is on; a default-deny filter sends exactly 4 reads and 3 writes to
userspace (filter reason for denied MSRs, unknown reason for 0xdeadbeef) and none once it is
removed; swapping the filter between FS_BASE and GS_BASE moves which read exits; every undefined
flag bit of the capability, the filter and a filter range is refused with EINVAL."""
from pathlib import Path

import pytest

from pykvm.abi import ffi
from pykvm.errors import KvmError
from pykvm.report import GuestAssertion

pytestmark = [pytest.mark.requires_kvm, pytest.mark.requires_arch("x86_64"),
              pytest.mark.requires_cap("X86_USER_SPACE_MSR"), pytest.mark.requires_cap("X86_MSR_FILTER")]
MSR_IA32_XSS, MSR_IA32_FLUSH_CMD, MSR_IA32_POWER_CTL = 0xDA0, 0x10B, 0x1FC
MSR_SYSCALL_MASK, MSR_FS_BASE, MSR_GS_BASE = 0xC0000084, 0xC0000100, 0xC0000101
MSR_NON_EXISTENT = 0x474F4F00
READ, WRITE = 1, 2                                   # KVM_MSR_FILTER_READ / _WRITE
EXIT_INVAL, EXIT_UNKNOWN, EXIT_FILTER = 1, 2, 4      # KVM_MSR_EXIT_REASON_*
EXIT_VALID_MASK = EXIT_INVAL | EXIT_UNKNOWN | EXIT_FILTER
FILTER_VALID_MASK = 1                                # KVM_MSR_FILTER_DEFAULT_DENY
RANGE_VALID_MASK = READ | WRITE
BITMAP_BITS = 0x600 * 8                              # KVM_MSR_FILTER_MAX_BITMAP_SIZE * 8
DENY1 = b"\0"


def bitmap(*deny):
    """A full range's bitmap (prepare_bitmaps()): all allowed but ``deny``, taken modulo the
    range size as the C test's deny_msr() does."""
    b = bytearray(b"\xff" * (BITMAP_BITS // 8))
    for msr in deny:
        idx = msr & (BITMAP_BITS // 8 - 1)      # KVM_MSR_FILTER_MAX_BITMAP_SIZE - 1, as in C
        b[idx // 8] &= ~(1 << idx % 8) & 0xFF
    return bytes(b)


def forced_emulation() -> bool:
    p = Path("/sys/module/kvm/parameters/force_emulation_prefix")
    return p.exists() and p.read_text().strip() not in ("0", "N")


def step_exit(m, name):
    """Run to the next exit and insist on ``name`` (a guest assertion raises first, as the C
    test's check_for_guest_assert())."""
    ev = m.step()
    if ev.kind == "report" and ev.report.kind in ("assert", "exception"):
        raise GuestAssertion(ev.report)
    assert ev.name == name, f"Wanted KVM exit reason {name}, got {m.describe(ev)}"
    return ev.exit


class Allow:
    """process_rdmsr()/process_wrmsr() of msr_filter_allow."""

    def __init__(self):
        self.non_existent = 0

    def rdmsr(self, m, index):
        ex = step_exit(m, "X86_RDMSR")
        assert ex.index == index, f"Unexpected msr ({ex.index:#06x}), expected {index:#06x}"
        if index == MSR_IA32_XSS:
            ex.respond(0)
        elif index == MSR_IA32_FLUSH_CMD:
            ex.respond(0, error=True)
        elif index == MSR_NON_EXISTENT:
            ex.respond(self.non_existent)
        else:
            raise AssertionError(f"Unexpected MSR: {index:#06x}")

    def wrmsr(self, m, index):
        ex = step_exit(m, "X86_WRMSR")
        assert ex.index == index, f"Unexpected msr ({ex.index:#06x}), expected {index:#06x}"
        if index == MSR_IA32_XSS:
            ex.respond(ex.data, error=ex.data != 0)
        elif index == MSR_IA32_FLUSH_CMD:
            ex.respond(ex.data, error=ex.data != 1)
        elif index == MSR_NON_EXISTENT:
            self.non_existent = ex.data
        else:
            raise AssertionError(f"Unexpected MSR: {index:#06x}")

    def round(self, m):
        self.rdmsr(m, MSR_IA32_XSS)
        self.wrmsr(m, MSR_IA32_XSS)
        self.wrmsr(m, MSR_IA32_XSS)
        self.rdmsr(m, MSR_IA32_FLUSH_CMD)
        self.wrmsr(m, MSR_IA32_FLUSH_CMD)
        self.wrmsr(m, MSR_IA32_FLUSH_CMD)
        self.wrmsr(m, MSR_NON_EXISTENT)
        self.rdmsr(m, MSR_NON_EXISTENT)


def test_msr_filter_allow(guest_vm):
    m = guest_vm("sel_userspace_msr_exit.c")
    fep = forced_emulation()
    m.set_params(0, int(fep))
    m.vm.enable_cap("X86_USER_SPACE_MSR", EXIT_FILTER)
    m.vm.set_msr_filter([(READ | WRITE, MSR_IA32_XSS, 1, DENY1),
                         (READ | WRITE, MSR_IA32_FLUSH_CMD, 1, DENY1),
                         (READ | WRITE, MSR_NON_EXISTENT, 1, DENY1)])
    allow = Allow()
    allow.round(m)
    if fep:
        m.sync(stage=0)
        allow.round(m)
    m.done()


def test_msr_filter_deny(guest_vm):
    m = guest_vm("sel_userspace_msr_exit.c")
    m.set_params(1)
    m.vm.enable_cap("X86_USER_SPACE_MSR", EXIT_INVAL | EXIT_UNKNOWN | EXIT_FILTER)
    allow_all = bitmap()
    m.vm.set_msr_filter([
        (READ, 0, BITMAP_BITS, allow_all),
        (WRITE, 0, BITMAP_BITS, bitmap(MSR_IA32_POWER_CTL)),
        (READ | WRITE, 0x40000000, BITMAP_BITS, allow_all),
        (READ, 0xC0000000, BITMAP_BITS, bitmap(MSR_SYSCALL_MASK, MSR_GS_BASE)),
        (WRITE, 0xC0000000, BITMAP_BITS, allow_all),
        (READ | WRITE, 0xDEADBEEF, 1, b"\x01"),
    ], default_deny=True)
    reads = writes = 0
    while True:
        ev = m.step()
        if ev.kind == "report":
            if ev.report.kind in ("assert", "exception"):
                raise GuestAssertion(ev.report)
            if ev.report.kind == "done":
                break
            assert ev.report.kind == "sync", f"Unknown ucall {m.describe(ev)}"
            m.vm.set_msr_filter()                       # no_filter_deny
            continue
        ex = ev.exit
        reason = ex.run.msr.reason
        if ev.name == "X86_RDMSR":
            ex.respond(ex.index)
            reads += 1
            if ex.index in (MSR_SYSCALL_MASK, MSR_GS_BASE):
                assert reason == EXIT_FILTER, "MSR read trap w/o access fault"
            if ex.index == 0xDEADBEEF:
                assert reason == EXIT_UNKNOWN, "MSR deadbeef read trap w/o inval fault"
        elif ev.name == "X86_WRMSR":
            writes += 1
            if ex.index == MSR_IA32_POWER_CTL:
                assert ex.data == 0x1234, "MSR data for MSR_IA32_POWER_CTL incorrect"
                assert reason == EXIT_FILTER, "MSR_IA32_POWER_CTL trap w/o access fault"
            if ex.index == 0xDEADBEEF:
                assert ex.data == 0x1234, "MSR data for deadbeef incorrect"
                assert reason == EXIT_UNKNOWN, "deadbeef trap w/o inval fault"
        else:
            raise AssertionError(f"unexpected {m.describe(ev)}")
    assert reads == 4, f"Handled 4 rdmsr in user space (got {reads})"
    assert writes == 3, f"Handled 3 wrmsr in user space (got {writes})"


def test_msr_permission_bitmap(guest_vm):
    m = guest_vm("sel_userspace_msr_exit.c")
    m.set_params(2)
    m.vm.enable_cap("X86_USER_SPACE_MSR", EXIT_FILTER)
    m.vm.set_msr_filter([(READ, MSR_FS_BASE, 1, DENY1)])
    ex = step_exit(m, "X86_RDMSR")
    assert ex.index == MSR_FS_BASE, f"Unexpected msr ({ex.index:#x}), expected {MSR_FS_BASE:#x}"
    ex.respond(MSR_FS_BASE)
    m.sync(stage=0)
    m.vm.set_msr_filter([(READ, MSR_GS_BASE, 1, DENY1)])
    ex = step_exit(m, "X86_RDMSR")
    assert ex.index == MSR_GS_BASE, f"Unexpected msr ({ex.index:#x}), expected {MSR_GS_BASE:#x}"
    ex.respond(MSR_GS_BASE)
    m.done()


def _flag_check(call, bit, valid_mask, what):
    try:
        call()
    except KvmError as e:
        assert not (1 << bit) & valid_mask, f"{what} with flag = {1 << bit:#x}: {e}"
        assert e.errno == 22, f"Wanted EINVAL for {what} with flag = {1 << bit:#x}, got {e}"
    else:
        assert (1 << bit) & valid_mask, f"Wanted EINVAL for {what} with flag = {1 << bit:#x}"


def test_user_exit_msr_flags(kvm):
    with kvm.create_vm() as vm:
        vm.create_irqchip()
        vm.create_vcpu()
        for i in range(64):                   # run_user_space_msr_flag_test()
            _flag_check(lambda i=i: vm.enable_cap("X86_USER_SPACE_MSR", 1 << i), i,
                        EXIT_VALID_MASK, "KVM_ENABLE_CAP")
        deny = ffi.new("uint64_t *", 0)       # run_msr_filter_flag_test()
        f = ffi.new("struct kvm_msr_filter *")
        f.ranges[0].flags, f.ranges[0].nmsrs, f.ranges[0].base = READ, 1, 0
        f.ranges[0].bitmap = ffi.cast("uint8_t *", deny)
        for i in range(32):
            f.flags = 1 << i
            _flag_check(lambda: vm.ioctl("KVM_X86_SET_MSR_FILTER", f), i, FILTER_VALID_MASK,
                        "KVM_X86_SET_MSR_FILTER")
        f.flags = 0
        for i in range(32):
            f.ranges[0].flags = 1 << i
            _flag_check(lambda: vm.ioctl("KVM_X86_SET_MSR_FILTER", f), i, RANGE_VALID_MASK,
                        "KVM_X86_SET_MSR_FILTER")
