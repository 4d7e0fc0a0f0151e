"""Port of tools/testing/selftests/kvm/x86_64/get_msr_index_features.c: with
KVM_CAP_GET_MSR_FEATURES, KVM_GET_MSR_INDEX_LIST works and every MSR of
KVM_GET_MSR_FEATURE_INDEX_LIST reads through KVM_GET_MSRS on /dev/kvm (one MSR read per call).
pykvm has no method for the two system-fd rows: the test issues them through
``pykvm._ioctl.raw_ioctl(kvm.fd, "system", row, arg)`` (the system-fd form of ``Vm.ioctl``);
KVM_GET_MSRS on /dev/kvm through ``pykvm._ioctl.ioctl``, as pykvm's table lists that row for the
vCPU fd only."""
import pytest

from pykvm.abi import ffi
from pykvm._ioctl import ioctl, raw_ioctl
from pykvm.abi import ioctls
from pykvm.errors import KvmError

pytestmark = [pytest.mark.requires_kvm, pytest.mark.requires_arch("x86_64")]


def _feature_list(kvm):
    n = 64
    while True:
        m = ffi.new("struct kvm_msr_list *", {"indices": n})
        m.nmsrs = n
        try:
            raw_ioctl(kvm.fd, "system", "KVM_GET_MSR_FEATURE_INDEX_LIST", m)
        except KvmError as e:
            if e.errno_name == "E2BIG" and m.nmsrs > n:
                n = m.nmsrs
                continue
            raise
        return [m.indices[i] for i in range(m.nmsrs)]


@pytest.mark.requires_cap("GET_MSR_FEATURES")
def test_get_msr_index_features(kvm):
    assert kvm.msr_index_list()                       # kvm_get_msr_index_list()
    features = _feature_list(kvm)
    for index in features:                            # kvm_get_feature_msr(): r == 1
        m = ffi.new("struct kvm_msrs *", {"entries": 1})
        m.nmsrs, m.entries[0].index = 1, index
        got = ioctl(kvm.fd, ioctls.KVM_GET_MSRS, m, what=f"{index:#x}")
        assert got == 1, f"KVM_GET_MSRS({index:#x}) on /dev/kvm read {got} MSRs"
