"""Port of tools/testing/selftests/kvm/x86_64/get_msr_index_features.c: with
KVM_CAP_GET_MSR_FEATURES, KVM_GET_MSR_INDEX_LIST works and every MSR of
KVM_GET_MSR_FEATURE_INDEX_LIST reads through KVM_GET_MSRS on /dev/kvm (one MSR read per call):
``kvm.msr_index_list()``, ``kvm.feature_msr_index_list()`` and ``kvm.get_feature_msrs()``."""
import pytest

pytestmark = [pytest.mark.requires_kvm, pytest.mark.requires_arch("x86_64")]


@pytest.mark.requires_cap("GET_MSR_FEATURES")
def test_get_msr_index_features(kvm):
    assert kvm.msr_index_list()                       # kvm_get_msr_index_list()
    features = kvm.feature_msr_index_list()
    for index in features:                            # kvm_get_feature_msr(): r == 1
        got = kvm.get_feature_msrs([index])
        assert list(got) == [index], f"KVM_GET_MSRS({index:#x}) on /dev/kvm read {got}"
