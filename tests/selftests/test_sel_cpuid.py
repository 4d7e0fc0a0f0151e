"""Port of tools/testing/selftests/kvm/x86_64/cpuid_test.c: KVM_SET_CPUID2 with
KVM_GET_SUPPORTED_CPUID, read back with KVM_GET_CPUID2, gives the same entries (the same count,
function, index and flags; the same registers except 0xd.0 and 0xd.1, which depend on XCR0 and
IA32_XSS); the guest's CPUID instruction returns every entry's registers; the max KVM leaf is
0x40000001; after KVM_RUN an unchanged KVM_SET_CPUID2 is taken, a changed CPUID.7.0:EBX or
MAXPHYADDR refused; KVM_GET_CPUID2 updates nent on success and, with a buffer too small, fails
with E2BIG and leaves nent alone."""
import errno
import struct

import pytest
from _selftest import host_fails

from pykvm.abi import ffi
from pykvm.arch.x86.regs import cpuid_lookup, cpuid_set
from pykvm.errors import KvmError

pytestmark = [pytest.mark.requires_kvm, pytest.mark.requires_arch("x86_64")]
MANGLED = {(0xD, 0), (0xD, 1)}
ENTRY = struct.Struct("<7I12x")                # struct kvm_cpuid_entry2


def _compare(c1, c2):
    assert len(c1) == len(c2), f"CPUID nent mismatch: {len(c1)} vs. {len(c2)}"
    for i, (e1, e2) in enumerate(zip(c1, c2)):
        assert e1[:3] == e2[:3], f"CPUID entries[{i}] mismtach: {e1[:3]} vs. {e2[:3]}"
        if (e1.function, e1.index) in MANGLED:
            continue
        assert e1[3:] == e2[3:], f"CPUID {e1.function:#x}.{e1.index:x} differ: {e1} vs {e2}"


def _set_cpuid_after_run(vcpu, cpuid):
    vcpu.set_cpuid(cpuid)                      # unmodified: allowed
    e7 = cpuid_lookup(cpuid, 7, 0)
    with pytest.raises(KvmError):              # "Changing CPU features should fail"
        vcpu.set_cpuid(cpuid_set(cpuid, 7, 0, ebx=(e7.ebx - 1) & 0xFFFFFFFF))
    e8 = cpuid_lookup(cpuid, 0x80000008, 0)
    with pytest.raises(KvmError):              # "Changing MAXPHYADDR should fail"
        vcpu.set_cpuid(cpuid_set(cpuid, 0x80000008, 0,
                                 eax=(e8.eax & ~0xFF) | ((e8.eax & 0xFF) - 1) & 0xFF))


def _test_get_cpuid2(vcpu, nent):
    c = ffi.new("struct kvm_cpuid2 *", {"entries": nent + 1})
    c.nent = nent + 1
    vcpu.ioctl("KVM_GET_CPUID2", c)
    assert c.nent == nent, f"KVM didn't update nent on success, wanted {nent}, got {c.nent}"
    for i in range(nent):
        c.nent = i
        with pytest.raises(KvmError) as ei:
            vcpu.ioctl("KVM_GET_CPUID2", c)
        assert ei.value.errno == errno.E2BIG, ei.value
        assert c.nent == i, "KVM modified nent on failure"


@host_fails("CPUID nent mismatch: KVM_GET_CPUID2 gives 2 entries fewer than the "
            "KVM_GET_SUPPORTED_CPUID set with KVM_SET_CPUID2")
def test_cpuid(kvm, guest_vm):
    m = guest_vm("sel_cpuid.c")
    vcpu = m.vcpus[0]
    supported = kvm.supported_cpuid()
    vcpu.set_cpuid(supported)                  # vm_create_with_one_vcpu(): vcpu_init_cpuid()
    cpuid = vcpu.get_cpuid()
    _compare(supported, cpuid)
    addr, size = m.symbols.variable("guest_cpuid")
    assert len(cpuid) * ENTRY.size <= size
    m.memory.write(addr, b"".join(ENTRY.pack(*e) for e in cpuid))
    m.memory.write_u32(m.symbols.variable("guest_nent")[0], len(cpuid))
    m.sync(stage=1)
    m.sync(stage=2)
    m.done()
    _set_cpuid_after_run(vcpu, cpuid)
    _test_get_cpuid2(vcpu, len(cpuid))
