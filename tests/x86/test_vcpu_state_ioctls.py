"""Issue 21 item 1 (x86): the vCPU/VM state ioctls a KVM selftest uses, each through its typed
method on the real /dev/kvm: get → change a field → set → get shows it (and, where another ioctl
sees the same state, that one agrees); the MSR filter and the manual dirty log with a running
guest; the raw escape hatch ``vcpu.ioctl(row, arg)``; the CPUID helpers.

A capability this host's KVM lacks skips its test ("pykvm: host lacks KVM_CAP_...").
"""
import pytest

from pykvm import abi
from pykvm.abi import ffi
from pykvm.arch.x86.regs import (CpuidEntry, cpuid_for_vcpu, cpuid_has, cpuid_lookup, cpuid_set,
                                 cpuid_with_feature)
from pykvm.arch.x86.state import MsrFilterRange, apic_reg, set_apic_reg
from pykvm.errors import KvmError
from pykvm.report import GuestAssertion

pytestmark = pytest.mark.requires_arch("x86_64")
STAR = 0xC0000081
XMM0 = 160                    # byte offset of XMM0 in the XSAVE legacy region (FXSAVE layout)
XSTATE_BV = 512               # the XSAVE header's XSTATE_BV: which components the area holds


@pytest.fixture
def vcpu(kvm):
    """A vCPU of a fresh VM with an in-kernel irqchip and the supported CPUID; never run."""
    with kvm.create_vm() as vm:
        vm.create_irqchip()
        v = vm.create_vcpu()
        v.set_cpuid(cpuid_for_vcpu(kvm.supported_cpuid(), 0))
        yield v


@pytest.mark.requires_cap("DEBUGREGS")
def test_debug_registers_round_trip(vcpu):
    d = vcpu.get_debugregs()
    assert d.dr7 & 0xFFFF == 0x400                    # architectural reset value
    d.db[0], d.db[1], d.db[2], d.db[3] = 0x1000, 0x2008, 0x300010, 0xFFFF800000001000
    d.dr7 = 0x400 | 0b01010101 | (0b1101 << 16)       # L0-L3, RW0 = write, LEN0 = 4 bytes
    vcpu.set_debugregs(d)
    got = vcpu.get_debugregs()
    assert list(got.db) == [0x1000, 0x2008, 0x300010, 0xFFFF800000001000]
    assert got.dr7 == d.dr7


@pytest.mark.requires_cap("XCRS")
def test_xcr0_round_trip_within_the_supported_bits(kvm, vcpu):
    supported = cpuid_lookup(kvm.supported_cpuid(), 0xD, 0).eax
    assert vcpu.get_xcrs() == {0: 1}                    # reset: x87 only
    want = supported & 0b111                            # x87 | SSE | AVX, as offered
    if want == 1:
        pytest.skip("pykvm: host lacks XSAVE state components beyond x87 (CPUID.0xD.0:EAX)")
    vcpu.set_xcrs({0: want})
    assert vcpu.get_xcrs() == {0: want}
    with pytest.raises(KvmError, match=r"KVM_SET_XCRS\(xcr0=0x4\): EINVAL"):
        vcpu.set_xcrs({0: 0x4})                          # AVX without x87: architecturally invalid
    assert vcpu.get_xcrs() == {0: want}


@pytest.mark.requires_cap("IRQCHIP")
def test_lapic_register_round_trip_and_cr8_follows_the_tpr(vcpu):
    page = vcpu.get_lapic()
    assert len(page) == abi.arch.APIC_REG_SIZE
    assert apic_reg(page, 0x20) >> 24 == vcpu.id        # APIC ID register
    set_apic_reg(page, 0x80, 0x20)                      # TPR: priority class 2
    set_apic_reg(page, 0x380, 123456)                   # timer initial count
    vcpu.set_lapic(page)
    got = vcpu.get_lapic()
    assert apic_reg(got, 0x80) == 0x20
    assert vcpu.get_sregs().cr8 == 2                    # CR8 is TPR[7:4]
    with pytest.raises(ValueError):
        vcpu.set_lapic(bytes(100))


def test_lapic_without_an_irqchip_is_refused_naming_the_ioctl(kvm):
    with kvm.create_vm() as vm:
        v = vm.create_vcpu()
        with pytest.raises(KvmError, match="KVM_GET_LAPIC"):
            v.get_lapic()


@pytest.mark.requires_cap("VCPU_EVENTS")
def test_vcpu_events_nmi_pending_round_trip(vcpu):
    ev = vcpu.get_vcpu_events()
    assert (ev.nmi.pending, ev.nmi.injected, ev.exception.injected) == (0, 0, 0)
    ev.nmi.pending = 1
    ev.flags = abi.arch.VCPUEVENT_VALID["NMI_PENDING"]
    vcpu.set_vcpu_events(ev)
    assert vcpu.get_vcpu_events().nmi.pending == 1
    ev = vcpu.get_vcpu_events()
    ev.nmi.masked = 1
    ev.flags = 0
    vcpu.set_vcpu_events(ev)
    assert vcpu.get_vcpu_events().nmi.masked == 1
    ev.exception.injected, ev.exception.nr = 1, 40        # vectors above 31 are no exception
    with pytest.raises(KvmError, match="KVM_SET_VCPU_EVENTS.*EINVAL"):
        vcpu.set_vcpu_events(ev)


@pytest.mark.requires_cap("SREGS2")
def test_sregs2_cr4_bit_round_trip_agrees_with_sregs(vcpu):
    s = vcpu.get_sregs2()
    assert s.cr4 & (1 << 9) == 0 and s.flags == 0
    s.cr4 |= 1 << 9                                     # CR4.OSFXSR
    s.cs.base = 0x10000
    vcpu.set_sregs2(s)
    got = vcpu.get_sregs2()
    assert got.cr4 & (1 << 9) and got.cs.base == 0x10000
    old = vcpu.get_sregs()
    assert old.cr4 == got.cr4 and old.cs.base == 0x10000
    s.cr4 |= 1 << 63                                    # reserved
    with pytest.raises(KvmError, match="KVM_SET_SREGS2"):
        vcpu.set_sregs2(s)


@pytest.mark.requires_cap("XSAVE")
def test_xsave_region_round_trip_agrees_with_the_fpu(vcpu):
    area = bytearray(vcpu.get_xsave())
    assert len(area) == 4096
    pattern = bytes(range(0xA0, 0xB0))
    area[XMM0:XMM0 + 16] = pattern
    area[XSTATE_BV] |= 1 << 1                           # SSE state present (else: init state)
    vcpu.set_xsave(bytes(area))
    assert vcpu.get_xsave()[XMM0:XMM0 + 16] == pattern
    assert bytes(vcpu.get_fpu().xmm[0]) == pattern      # KVM_GET_FPU sees the same state
    with pytest.raises(ValueError):
        vcpu.set_xsave(bytes(100))


@pytest.mark.requires_cap("XSAVE2")
def test_xsave2_is_the_size_the_vm_reports(vcpu):
    size = vcpu.vm.check_extension("XSAVE2")
    area = vcpu.get_xsave2()
    assert len(area) == vcpu.xsave_size() == max(size, 4096)
    assert area[:4096] == vcpu.get_xsave()
    vcpu.set_xsave(area)
    assert vcpu.get_xsave2() == area


@pytest.mark.requires_cap("X86_MSR_FILTER", "X86_USER_SPACE_MSR")
def test_msr_filter_sends_a_denied_rdmsr_to_user_space(guest_vm):
    m = guest_vm("msr")                                 # writes STAR, then reads it twice
    m.vm.enable_cap("X86_USER_SPACE_MSR", abi.arch.MSR_EXIT_REASON_FILTER)
    m.vm.set_msr_filter([MsrFilterRange.deny(STAR, write=False)])
    seen = []

    def on_rdmsr(m_, i, ex):
        seen.append((ex.index, ex.run.msr.reason))
        ex.respond(0x1111_2222_3333_4444)
    m.on("X86_RDMSR", on_rdmsr)
    m.set_params(STAR, 0x0023001012345678)
    assert m.sync(stage=1) == (STAR, 0x0023001012345678, 0x1111_2222_3333_4444)
    m.vm.set_msr_filter([])                             # no ranges: the filter is gone
    assert m.sync(stage=2) == (STAR, 0x0023001012345678)   # the real STAR, no exit
    m.done()
    assert seen == [(STAR, abi.arch.MSR_EXIT_REASON_FILTER)]


@pytest.mark.requires_cap("X86_MSR_FILTER")
def test_msr_filter_denied_rdmsr_raises_gp_in_the_guest(guest_vm):
    m = guest_vm("msr")
    m.vm.set_msr_filter([MsrFilterRange.deny(STAR, write=False)])
    m.set_params(STAR, 0x0023001012345678)
    with pytest.raises(GuestAssertion, match=r"#GP \(vector 13\)"):
        m.sync(stage=1)


def test_msr_filter_range_is_checked_before_the_ioctl(kvm):
    with kvm.create_vm() as vm:
        with pytest.raises(ValueError, match="bitmap"):
            vm.set_msr_filter([(abi.arch.MSR_FILTER_READ, 0, 64, b"\xff")])
        with pytest.raises(ValueError, match="ranges"):
            vm.set_msr_filter([MsrFilterRange.deny(STAR)] * 17)


@pytest.mark.requires_cap("MANUAL_DIRTY_LOG_PROTECT2")
def test_clear_dirty_log_rearms_only_the_pages_cleared(guest_vm):
    m = guest_vm("dirty.c")
    m.vm.enable_cap("MANUAL_DIRTY_LOG_PROTECT2", abi.DIRTY_LOG_MANUAL_PROTECT_ENABLE)
    slot = m.vm.add_memory(0x8000000, 64 * 4096, log_dirty=True)
    m.set_params(slot.gpa, 8, 4096, 2)                 # pages 0..7, two rounds
    m.sync(stage=1)
    written = [slot.gpa + i * 4096 for i in range(8)]
    assert m.vm.get_dirty_log(slot) == written
    assert m.vm.get_dirty_log(slot) == written         # manual protect: reading clears nothing
    m.vm.clear_dirty_log(slot, written[:4])
    assert m.vm.get_dirty_log(slot) == written[4:]
    m.vm.clear_dirty_log(slot)
    assert m.vm.get_dirty_log(slot) == []
    m.sync(stage=2)                                     # the guest writes all 8 again
    assert m.vm.get_dirty_log(slot) == written
    with pytest.raises(ValueError, match="outside slot"):
        m.vm.clear_dirty_log(slot, [slot.gpa + slot.size])
    m.done()


@pytest.mark.requires_cap("EXT_EMUL_CPUID")
def test_emulated_cpuid_lists_movbe(kvm):
    em = kvm.emulated_cpuid()
    assert em and all(isinstance(e, CpuidEntry) for e in em)
    assert cpuid_has(em, "movbe")                       # KVM emulates MOVBE on every host


def test_raw_ioctl_issues_a_row_without_a_method(vcpu):
    d = ffi.new("struct kvm_debugregs *")
    assert vcpu.ioctl("KVM_GET_DEBUGREGS", d) == 0
    assert d.dr7 == vcpu.get_debugregs().dr7
    from pykvm.abi import ioctls
    assert vcpu.vm.ioctl(ioctls.KVM_CHECK_EXTENSION, abi.CAPS["XSAVE"]) == \
        vcpu.vm.check_extension("XSAVE")
    with pytest.raises(ValueError, match="vm fd"):
        vcpu.ioctl("KVM_CREATE_VCPU", 5)
    with pytest.raises(ValueError, match="run"):
        vcpu.ioctl("KVM_RUN")
    with pytest.raises(KeyError):
        vcpu.ioctl("KVM_NO_SUCH_IOCTL")
    with pytest.raises(KvmError, match="KVM_SET_DEBUGREGS.*EINVAL"):
        d.flags = 1                                     # flags must be 0
        vcpu.ioctl("KVM_SET_DEBUGREGS", d)


def test_raw_ioctl_refuses_an_argument_the_kernel_would_overrun(vcpu):
    """The escape hatch checks the argument against the row's type before the kernel writes
    sizeof(type) bytes there: a smaller struct or array, an int (a host address) or a float is a
    TypeError, and nothing is written (the process stays healthy to read its registers)."""
    for bad, what in ((ffi.new("struct kvm_regs *"), "4096 bytes"), (ffi.new("char[1]"), "holds 1"),
                      (12345, "not int"), (1.5, "not float"), (True, "not bool")):
        with pytest.raises(TypeError, match=what):
            vcpu.ioctl("KVM_GET_XSAVE", bad)
    with pytest.raises(TypeError, match="int argument"):
        vcpu.vm.ioctl("KVM_CHECK_EXTENSION", ffi.new("int *"))
    buf = ffi.new("char[]", ffi.sizeof("struct kvm_regs"))            # a byte buffer will do
    assert vcpu.ioctl("KVM_GET_REGS", buf) == 0
    assert ffi.cast("struct kvm_regs *", buf).rip == vcpu.get_regs().rip


def test_cpuid_entry_replace_and_feature_helpers_reach_the_guest(guest_vm, kvm):
    entries = kvm.supported_cpuid()
    leaf1 = cpuid_lookup(entries, 1)
    assert leaf1._replace(eax=5) == (1, leaf1.index, leaf1.flags, 5, leaf1.ebx, leaf1.ecx,
                                     leaf1.edx)
    with pytest.raises(ValueError):
        leaf1._replace(rax=1)
    had = cpuid_has(entries, "rdtscp")
    changed = cpuid_with_feature(entries, "rdtscp", on=not had)
    assert cpuid_has(changed, "rdtscp") is not had
    changed = cpuid_set(changed, 0x40000000, eax=0x40000000, ebx=0x6B767970)   # "pykv"
    m = guest_vm("cpuid", cpuid=changed)
    m.set_params(2, 0x80000001, 0)
    ext = m.sync(stage=1)
    assert (ext[5] >> 27) & 1 == (not had)              # EDX bit 27 as set above
    m.sync(stage=2)
    m.done()
    with pytest.raises(ValueError, match="unknown CPUID feature"):
        cpuid_has(entries, "no-such-feature")
