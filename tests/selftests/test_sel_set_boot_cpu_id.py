"""Port of tools/testing/selftests/kvm/x86_64/set_boot_cpu_id.c: KVM_SET_BOOT_CPU_ID refuses an
id above KVM_CAP_MAX_VCPU_ID and one with bits 63:32 set (EINVAL); with boot CPU 0, 1, 0 in
turn, a two-vCPU VM's boot vCPU sees IA32_APIC_BASE.BSP set and the other clear; the ioctl is
refused with EBUSY while a vCPU runs (at its SYNC), after vCPUs were added, and after they
finished.

The two invalid ids and the boot CPU id go to the Machine's VM through its ``vm_setup`` hook,
after KVM_CREATE_VM and before its vCPUs exist, as vm_create() + KVM_SET_BOOT_CPU_ID +
vm_vcpu_add() do in C."""
import errno

import pytest

from pykvm.errors import KvmError

pytestmark = [pytest.mark.requires_kvm, pytest.mark.requires_arch("x86_64")]


def _refused(vm, vcpu_id, err, msg):
    with pytest.raises(KvmError) as ei:
        vm.ioctl("KVM_SET_BOOT_CPU_ID", vcpu_id)
    assert ei.value.errno == err, f"{msg}: {ei.value}"


def _machine(guest_vm, bsp):
    def set_bsp(vm):
        max_id = vm.check_extension("MAX_VCPU_ID")        # test_set_invalid_bsp()
        if max_id:
            _refused(vm, max_id + 1, errno.EINVAL, "BSP with ID > MAX should fail")
        _refused(vm, 1 << 32, errno.EINVAL, "BSP with ID[63:32]!=0 should fail")
        vm.ioctl("KVM_SET_BOOT_CPU_ID", bsp)

    m = guest_vm("sel_set_boot_cpu_id.c", vcpus=2, vm_setup=set_bsp)
    m.set_params(bsp)
    return m


def _run_vcpu(m, i):
    m.sync(i, stage=1)
    _refused(m.vm, i, errno.EBUSY, "KVM_SET_BOOT_CPU_ID set while running vm")
    m.done(i)


@pytest.mark.requires_cap("SET_BOOT_CPU_ID")
@pytest.mark.parametrize("bsp", [0, 1, 0])
def test_run_vm_bsp(guest_vm, bsp):
    m = _machine(guest_vm, bsp)
    _run_vcpu(m, 0)
    _run_vcpu(m, 1)


@pytest.mark.requires_cap("SET_BOOT_CPU_ID")
def test_check_set_bsp_busy(guest_vm):
    m = _machine(guest_vm, 0)
    _refused(m.vm, 1, errno.EBUSY, "KVM_SET_BOOT_CPU_ID set after adding vcpu")
    _run_vcpu(m, 0)
    _run_vcpu(m, 1)
    _refused(m.vm, 1, errno.EBUSY, "KVM_SET_BOOT_CPU_ID set to a terminated vcpu")
