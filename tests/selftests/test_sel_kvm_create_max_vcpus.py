"""Port of tools/testing/selftests/kvm/kvm_create_max_vcpus.c: KVM_CAP_MAX_VCPU_ID (or, when 0,
KVM_CAP_MAX_VCPUS) is at least KVM_CAP_MAX_VCPUS; a barebones VM takes KVM_CAP_MAX_VCPUS vCPUs
with ids 0..N-1 and, when the id space is larger, N vCPUs with the top N ids (RLIMIT_NOFILE
raised to N + 100 as the C test does, skipped when the hard limit is lower)."""
import resource

import pytest

pytestmark = [pytest.mark.requires_kvm, pytest.mark.requires_arch("x86_64")]


def _create(kvm, first, n):
    with kvm.create_vm() as vm:
        for i in range(first, first + n):
            vm.create_vcpu(i)                   # raises if KVM refuses one


def test_kvm_create_max_vcpus(kvm):
    max_id = kvm.check_extension("MAX_VCPU_ID")
    max_vcpus = kvm.check_extension("MAX_VCPUS")
    want = max_vcpus + 100
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < want:
        if hard != resource.RLIM_INFINITY and hard < want:
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (want, want))
            except (ValueError, OSError):
                pytest.skip(f"pykvm: host lacks RLIMIT_NOFILE room (hard limit {hard}, wanted {want})")
        else:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    try:
        max_id = max_id or max_vcpus
        assert max_id >= max_vcpus, \
            f"KVM_MAX_VCPU_IDS ({max_id}) must be at least as large as KVM_MAX_VCPUS ({max_vcpus})."
        _create(kvm, 0, max_vcpus)
        if max_id > max_vcpus:
            _create(kvm, max_id - max_vcpus, max_vcpus)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
