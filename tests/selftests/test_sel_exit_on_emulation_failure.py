"""Port of tools/testing/selftests/kvm/x86_64/exit_on_emulation_failure_test.c: with
KVM_CAP_EXIT_ON_EMULATION_FAILURE enabled, a guest "flds" from an MMIO address exits with
KVM_EXIT_INTERNAL_ERROR, suberror KVM_INTERNAL_ERROR_EMULATION, flags with
KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES, at least 3 data words, an instruction of at
least 2 bytes starting d9 00; after the host steps RIP past it the guest reaches DONE.
The MMIO address is 0xc0000000 (inside pykvm's 4 GiB identity map, above guest RAM) where the C
test maps 0x700000000 with virt_map()."""
import struct

import pytest

pytestmark = [pytest.mark.requires_kvm, pytest.mark.requires_arch("x86_64")]
KVM_INTERNAL_ERROR_EMULATION = 1
KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES = 1


@pytest.mark.requires_cap("EXIT_ON_EMULATION_FAILURE")
def test_exit_on_emulation_failure(guest_vm):
    m = guest_vm("sel_exit_on_emulation_failure.c")
    m.vm.enable_cap("EXIT_ON_EMULATION_FAILURE", 1)
    ev = m.step()
    assert ev.kind == "exit" and ev.exit.name == "INTERNAL_ERROR", m.describe(ev)
    ex = ev.exit                       # handle_flds_emulation_failure_exit()
    assert ex.suberror == KVM_INTERNAL_ERROR_EMULATION, f"Unexpected suberror: {ex.suberror}"
    data = ex.data                     # struct kvm_run.emulation_failure: flags, insn_size, bytes
    flags = data[0] if data else 0
    assert len(data) >= 3 and flags & KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES, \
        "run->emulation_failure is missing instruction bytes"
    raw = struct.pack("<2Q", data[1], data[2])
    insn_size, insn = raw[0], raw[1:]
    assert insn_size >= 2, f"Expected a 2-byte opcode for 'flds', got {insn_size} bytes"
    assert insn[:2] == b"\xd9\x00", \
        f"Expected 'flds [eax]', opcode '0xd9 0x00', got opcode {insn[0]:#04x} {insn[1]:#04x}"
    vcpu = m.vcpus[0]
    regs = vcpu.get_regs()
    regs.rip += 2
    vcpu.set_regs(regs)
    m.done()
