"""Port of tools/testing/selftests/kvm/x86_64/userspace_io_test.c: a "rep insb" from port 0x80
exits to userspace; the host rewrites RCX (2 → 1, 3 → 8192) at the exit and answers 0xaa, and
KVM neither explodes nor overflows the buffer; every exit other than the guest's reports is
port I/O at 0x80; the final 8192-byte "rep insb" fills the whole buffer with 0xaa."""
import pytest

pytestmark = [pytest.mark.requires_kvm, pytest.mark.requires_arch("x86_64")]


def test_userspace_io(guest_vm):
    m = guest_vm("sel_userspace_io.c")
    seen = []

    def on_io(machine, index, ex):
        assert ex.port == 0x80, f"Expected I/O at port 0x80, got port {ex.port:#x}"
        vcpu = machine.vcpus[index]
        regs = vcpu.get_regs()
        if regs.rcx == 2:
            regs.rcx = 1
        if regs.rcx == 3:
            regs.rcx = 8192
        ex.respond(0xAA)
        vcpu.set_regs(regs)
        seen.append(ex.count)

    m.on("io", on_io)
    m.done()
    assert seen                                   # the guest's "rep insb" reached the host
