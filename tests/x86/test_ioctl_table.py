"""One ioctl path through the table: every call passes a row of pykvm.abi.ioctls, and a row's
capability and architectures explain a refusal."""
import pytest

from pykvm import KvmError
from pykvm._ioctl import error, gate_hint, ioctl
from pykvm.abi import ffi, ioctls

pytestmark = [pytest.mark.requires_kvm, pytest.mark.requires_arch("x86_64")]


def test_a_refusal_names_the_capability_this_kvm_lacks(kvm):
    """KVM_GET_NESTED_STATE on a KVM without KVM_CAP_NESTED_STATE (this machine's: EINVAL)."""
    with kvm.create_vm() as vm:
        v = vm.create_vcpu()
        s = ffi.new("struct kvm_nested_state *")
        s.size = ffi.sizeof("struct kvm_nested_state")
        if kvm.check_extension("NESTED_STATE"):
            ioctl(v.fd, ioctls.KVM_GET_NESTED_STATE, s)     # a KVM that has it answers
            return
        with pytest.raises(KvmError) as e:
            ioctl(v.fd, ioctls.KVM_GET_NESTED_STATE, s)
        assert str(e.value).startswith("KVM_GET_NESTED_STATE: E")
        assert "needs KVM_CAP_NESTED_STATE, which this KVM does not offer" in str(e.value)


def test_a_refusal_of_an_offered_capability_keeps_the_plain_reason(kvm):
    with kvm.create_vm() as vm:
        v = vm.create_vcpu()
        r = ffi.new("struct kvm_one_reg *")
        r.id, r.addr = 0x2030000200000000 | 0xDEADBEEF, 0
        with pytest.raises(KvmError) as e:
            ioctl(v.fd, ioctls.KVM_GET_ONE_REG, r, what="x")
        assert "KVM_CAP_ONE_REG" not in str(e.value)


def test_rows_of_another_architecture_say_where_they_exist():
    row = ioctls.Ioctl("KVM_ELSEWHERE", "vcpu", ioctls.W, 0xEE, "struct kvm_nowhere", "ONE_REG",
                       ("riscv64",))
    assert not row.available and int(row) == 0
    with pytest.raises(ValueError, match="does not exist on x86_64"):
        _ = row.request
    assert gate_hint(-1, row) == "KVM_ELSEWHERE exists only on riscv64"
    e = error(-1, row, 25)                          # ENOTTY
    assert str(e) == "KVM_ELSEWHERE: ENOTTY — KVM_ELSEWHERE exists only on riscv64"


def test_ungated_rows_give_the_errno_meaning(kvm):
    e = error(kvm.fd, ioctls.KVM_CREATE_VCPU, 17)   # EEXIST
    assert "a vCPU with this id already exists" in str(e)
