"""Port of tools/testing/selftests/kvm/x86_64/max_vcpuid_cap_test.c: KVM_CAP_MAX_VCPU_ID cannot
be enabled beyond what KVM reports, nor below a KVM_SET_BOOT_CPU_ID id, nor twice; once it is
2, vCPU ids 2 and 1<<32 are refused and id 0 is created."""
import os

import pytest

from pykvm.errors import KvmError

pytestmark = [pytest.mark.requires_kvm, pytest.mark.requires_arch("x86_64")]
MAX_VCPU_ID = 2


def test_max_vcpuid_cap(kvm):
    with kvm.create_vm() as vm:                               # barebones
        cap = vm.check_extension("MAX_VCPU_ID")
        with pytest.raises(KvmError):
            vm.enable_cap("MAX_VCPU_ID", cap + 1)             # beyond KVM's cap
        if kvm.check_extension("SET_BOOT_CPU_ID"):
            vm.ioctl("KVM_SET_BOOT_CPU_ID", MAX_VCPU_ID)
            with pytest.raises(KvmError):                     # below BOOT_CPU_ID
                vm.enable_cap("MAX_VCPU_ID", MAX_VCPU_ID - 1)
        vm.enable_cap("MAX_VCPU_ID", MAX_VCPU_ID)
        with pytest.raises(KvmError):                         # set twice
            vm.enable_cap("MAX_VCPU_ID", MAX_VCPU_ID + 1)
        with pytest.raises(KvmError):                         # id > MAX_VCPU_ID
            vm.ioctl("KVM_CREATE_VCPU", MAX_VCPU_ID)
        with pytest.raises(KvmError):                         # id bits 63:32 set
            vm.ioctl("KVM_CREATE_VCPU", 1 << 32)
        fd = vm.ioctl("KVM_CREATE_VCPU", 0)                   # raw: the id-range check is KVM's
        assert fd >= 0, "Creating vCPU with ID 0 should succeed"
        os.close(fd)
