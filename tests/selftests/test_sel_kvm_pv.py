"""Port of tools/testing/selftests/kvm/x86_64/kvm_pv_test.c: with KVM_CAP_ENFORCE_PV_FEATURE_CPUID
enabled and the KVM_CPUID_FEATURES leaf (0x40000001) cleared, the guest's RDMSR and WRMSR of
each KVM paravirtual MSR raise #GP and the KICK_CPU, SEND_IPI and SCHED_YIELD hypercalls return
-KVM_ENOSYS; then (test_pv_unhalt) KVM_FEATURE_PV_UNHALT set through KVM_SET_CPUID2 shows in
KVM_GET_CPUID2, and after KVM_CAP_X86_DISABLE_EXITS(HLT) a KVM_SET_CPUID2 with it set (the KVM
signature leaf changed in between, so KVM recomputes its PV state) no longer has it."""
import pytest
from _selftest import host_fails

from pykvm.arch.x86.regs import CpuidEntry, cpuid_for_vcpu, cpuid_lookup, cpuid_set
from pykvm.errors import KvmError

pytestmark = [pytest.mark.requires_kvm, pytest.mark.requires_arch("x86_64")]
KVM_CPUID_SIGNATURE, KVM_CPUID_FEATURES = 0x40000000, 0x40000001
KVM_FEATURE_PV_UNHALT = 1 << 7
KVM_X86_DISABLE_EXITS_HLT = 1 << 1


@host_fails("the guest's VMCALL (KVM_HC_KICK_CPU) never completes: RIP stays on it (the MSR "
            "checks before it pass); the C original stops earlier, at an emulation failure in its "
            "own #GP fixup (SSE code), see docs/selftests.md")
def test_kvm_pv(kvm, guest_vm):
    if not kvm.check_extension("ENFORCE_PV_FEATURE_CPUID"):
        pytest.skip("pykvm: host lacks KVM_CAP_ENFORCE_PV_FEATURE_CPUID")
    m = guest_vm("sel_kvm_pv.c")
    vcpu = m.vcpus[0]
    vcpu.enable_cap("ENFORCE_PV_FEATURE_CPUID", 1)
    vcpu.set_cpuid(cpuid_set(vcpu.get_cpuid(), KVM_CPUID_FEATURES, eax=0, ebx=0, ecx=0, edx=0))
    m.done(timeout=5)


def _pv_unhalt(vcpu):
    e = cpuid_lookup(vcpu.get_cpuid(), KVM_CPUID_FEATURES)
    return e is not None and bool(e.eax & KVM_FEATURE_PV_UNHALT)


@host_fails("KVM_ENABLE_CAP(KVM_CAP_X86_DISABLE_EXITS) EINVAL once a vCPU exists (the 6.18 "
            "host); the C original's test_pv_unhalt() fails the same way when run alone")
def test_pv_unhalt(kvm):
    if not kvm.check_extension("ENFORCE_PV_FEATURE_CPUID"):
        pytest.skip("pykvm: host lacks KVM_CAP_ENFORCE_PV_FEATURE_CPUID")
    with kvm.create_vm() as vm:
        vm.create_irqchip()
        vcpu = vm.create_vcpu()
        cpuid = cpuid_for_vcpu(kvm.supported_cpuid(), 0)
        feat = cpuid_lookup(cpuid, KVM_CPUID_FEATURES)
        cpuid = cpuid_set(cpuid, KVM_CPUID_FEATURES, eax=feat.eax | KVM_FEATURE_PV_UNHALT)
        vcpu.set_cpuid(cpuid)
        assert _pv_unhalt(vcpu), "Enabling X86_FEATURE_KVM_PV_UNHALT had no effect"
        sig: CpuidEntry = cpuid_lookup(cpuid, KVM_CPUID_SIGNATURE)
        vcpu.set_cpuid(cpuid_set(cpuid, KVM_CPUID_SIGNATURE, ebx=0xDEADBEEF))
        try:
            vm.enable_cap("X86_DISABLE_EXITS", KVM_X86_DISABLE_EXITS_HLT)
        except KvmError as e:                      # vm_enable_cap() asserts success
            raise AssertionError(f"KVM_ENABLE_CAP failed: {e}") from None
        vcpu.set_cpuid(cpuid_set(cpuid, KVM_CPUID_SIGNATURE, ebx=sig.ebx))
        assert not _pv_unhalt(vcpu), "KVM_FEATURE_PV_UNHALT is set with KVM_CAP_X86_DISABLE_EXITS"
