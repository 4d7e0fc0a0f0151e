"""Issue 21 item 1 (x86): KVM_GET_CLOCK / KVM_SET_CLOCK as ``vm.get_clock`` / ``vm.set_clock``,
the feature MSRs on /dev/kvm (KVM_GET_MSR_FEATURE_INDEX_LIST, KVM_GET_MSRS on the system fd) as
``kvm.feature_msr_index_list`` / ``kvm.get_feature_msrs``, the system-fd escape hatch
``kvm.ioctl``, and Machine's ``vm_setup`` hook, on the real /dev/kvm.

A capability this host's KVM lacks skips its test ("pykvm: host lacks KVM_CAP_...").
"""
import errno
import time

import pytest

from pykvm import abi
from pykvm.abi import ffi, ioctls
from pykvm.errors import KvmError
from pykvm.machine import Machine

pytestmark = [pytest.mark.requires_kvm, pytest.mark.requires_arch("x86_64")]
SEC = 1_000_000_000
# an index no CPU defines as an MSR (so never a feature MSR)
NOT_AN_MSR = 0x12345678
IGNORE_MSRS = "/sys/module/kvm/parameters/ignore_msrs"


def _now_real() -> int:
    return time.clock_gettime_ns(time.CLOCK_REALTIME)


# -- KVM_GET_CLOCK / KVM_SET_CLOCK ------------------------------------------------------------
@pytest.mark.requires_cap("ADJUST_CLOCK")
def test_set_clock_then_get_clock_reads_it_back_advancing(kvm):
    with kvm.create_vm() as vm:
        for base in (0, 5 * SEC, 3600 * SEC):
            vm.set_clock(base)
            first = vm.get_clock().clock
            second = vm.get_clock().clock
            assert base <= first <= second < base + 5 * SEC, (base, first, second)


@pytest.mark.requires_cap("ADJUST_CLOCK")
def test_get_clock_flags_are_ones_kvm_offers(kvm):
    offered = kvm.check_extension("ADJUST_CLOCK")
    with kvm.create_vm() as vm:
        d = vm.get_clock()
        assert ffi.typeof(d) is ffi.typeof("struct kvm_clock_data *")
        assert d.flags & ~offered == 0, (d.flags, offered)
        if d.flags & abi.CLOCK_REALTIME:       # sampled with the clock: close to ours
            assert abs(d.realtime - _now_real()) < 5 * SEC


@pytest.mark.requires_cap("ADJUST_CLOCK")
def test_set_clock_realtime_adds_the_host_time_since_then(kvm):
    if not kvm.check_extension("ADJUST_CLOCK") & abi.CLOCK_REALTIME:
        pytest.skip("pykvm: host lacks KVM_CLOCK_REALTIME in KVM_CAP_ADJUST_CLOCK")
    with kvm.create_vm() as vm:
        vm.set_clock(0, realtime=_now_real() - 60 * SEC)      # a minute ago: +60 s
        assert 60 * SEC <= vm.get_clock().clock < 65 * SEC
        vm.set_clock(SEC, realtime=_now_real() + 60 * SEC)    # ahead: nothing added
        assert SEC <= vm.get_clock().clock < 6 * SEC


@pytest.mark.requires_cap("ADJUST_CLOCK")
@pytest.mark.parametrize("kw", [{"clock": -1}, {"clock": 1 << 64}, {"clock": 1.5},
                                {"clock": 0, "realtime": -5}])
def test_set_clock_refuses_values_outside_u64(kvm, kw):
    with kvm.create_vm() as vm:
        vm.set_clock(7 * SEC)
        with pytest.raises(ValueError, match="2\\*\\*64"):
            vm.set_clock(**kw)
        assert vm.get_clock().clock >= 7 * SEC           # nothing was set


def test_clock_rows_are_vm_rows_gated_by_adjust_clock():
    for r in (ioctls.KVM_GET_CLOCK, ioctls.KVM_SET_CLOCK):
        assert (r.fd, r.cap, r.arg) == ("vm", "ADJUST_CLOCK", "struct kvm_clock_data")
    assert ffi.sizeof("struct kvm_clock_data") == 48


# -- feature MSRs on /dev/kvm -----------------------------------------------------------------
@pytest.mark.requires_cap("GET_MSR_FEATURES")
def test_feature_msrs_read_one_by_one_and_all_at_once_alike(kvm):
    features = kvm.feature_msr_index_list()
    assert features and len(set(features)) == len(features)
    together = kvm.get_feature_msrs(features)
    assert list(together) == features
    for index in features:
        assert kvm.get_feature_msrs([index]) == {index: together[index]}


@pytest.mark.requires_cap("GET_MSR_FEATURES")
def test_feature_msrs_match_the_raw_system_fd_ioctl(kvm):
    features = kvm.feature_msr_index_list()
    m = ffi.new("struct kvm_msrs *", {"entries": len(features)})
    m.nmsrs = len(features)
    for k, index in enumerate(features):
        m.entries[k].index = index
    assert kvm.ioctl("KVM_GET_MSRS", m) == len(features)
    assert {m.entries[k].index: m.entries[k].data for k in range(len(features))} \
        == kvm.get_feature_msrs(features)
    lst = ffi.new("struct kvm_msr_list *", {"indices": len(features)})
    lst.nmsrs = len(features)
    kvm.ioctl(ioctls.KVM_GET_MSR_FEATURE_INDEX_LIST, lst)
    assert [lst.indices[k] for k in range(lst.nmsrs)] == features


@pytest.mark.requires_cap("GET_MSR_FEATURES")
def test_get_feature_msrs_names_the_first_msr_kvm_did_not_read(kvm):
    try:
        with open(IGNORE_MSRS) as f:
            if f.read().strip() == "Y":
                pytest.skip("pykvm: host KVM ignores unknown MSRs (kvm.ignore_msrs=Y)")
    except OSError:
        pass
    first = kvm.feature_msr_index_list()[0]
    with pytest.raises(KvmError) as ei:
        kvm.get_feature_msrs([first, NOT_AN_MSR])
    assert ei.value.errno == errno.EINVAL and f"{NOT_AN_MSR:#x}" in str(ei.value)
    assert "1 of 2" in str(ei.value)


@pytest.mark.requires_cap("GET_MSR_FEATURES")
@pytest.mark.parametrize("bad", [-1, 1 << 32, "0x10a"])
def test_get_feature_msrs_refuses_a_bad_index(kvm, bad):
    with pytest.raises(ValueError, match="32-bit"):
        kvm.get_feature_msrs([bad])


# -- the system-fd escape hatch and the fd kinds of KVM_GET_MSRS ------------------------------
def test_kvm_ioctl_issues_system_rows_only(kvm):
    assert kvm.ioctl("KVM_GET_API_VERSION") == 12
    assert kvm.ioctl(ioctls.KVM_CHECK_EXTENSION, abi.cap_number("USER_MEMORY")) == 1
    with pytest.raises(ValueError, match="not on a system fd"):
        kvm.ioctl("KVM_CREATE_VCPU", 0)
    with pytest.raises(KeyError):
        kvm.ioctl("KVM_NO_SUCH_IOCTL")


def test_get_msrs_is_a_system_and_vcpu_row_not_a_vm_row(kvm):
    assert ioctls.KVM_GET_MSRS.fd.split(",") == ["system", "vcpu"]
    with kvm.create_vm() as vm:
        with pytest.raises(ValueError, match="not on a vm fd"):
            vm.ioctl("KVM_GET_MSRS", ffi.new("struct kvm_msrs *", {"entries": 1}))
        v = vm.create_vcpu(0)
        m = ffi.new("struct kvm_msrs *", {"entries": 1})
        m.nmsrs, m.entries[0].index = 1, 0x10                 # IA32_TSC of the vCPU
        assert v.ioctl("KVM_GET_MSRS", m) == 1


# -- Machine(vm_setup=...) ----------------------------------------------------------------------
def test_vm_setup_runs_once_on_the_machines_vm_before_its_vcpus(kvm):
    seen = []

    def setup(vm):
        seen.append((vm, len(vm.vcpus), len(list(vm.memory))))

    m = Machine(kvm=kvm, vcpus=2, vm_setup=setup)
    try:
        assert [s[0] for s in seen] == [m.vm]
        assert seen[0][1:] == (0, 0)                         # no vCPU, no memory yet
        assert len(m.vm.vcpus) == 2
    finally:
        m.close()


@pytest.mark.requires_cap("SET_BOOT_CPU_ID")
def test_vm_setup_can_issue_ioctls_kvm_takes_only_before_vcpus(kvm):
    m = Machine(kvm=kvm, vcpus=2, vm_setup=lambda vm: vm.ioctl("KVM_SET_BOOT_CPU_ID", 1))
    try:
        assert [v.get_sregs().apic_base >> 8 & 1 for v in m.vcpus] == [0, 1]   # BSP bit
        with pytest.raises(KvmError) as ei:                 # too late once vCPUs exist
            m.vm.ioctl("KVM_SET_BOOT_CPU_ID", 0)
        assert ei.value.errno == errno.EBUSY
    finally:
        m.close()


def test_vm_setup_error_propagates_and_closes_the_vm(kvm):
    made = []

    def setup(vm):
        made.append(vm)
        raise RuntimeError("setup refused")

    with pytest.raises(RuntimeError, match="setup refused"):
        Machine(kvm=kvm, vm_setup=setup)
    assert made and made[0].closed
