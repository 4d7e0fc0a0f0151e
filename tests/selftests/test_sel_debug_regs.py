"""Port of tools/testing/selftests/kvm/x86_64/debug_regs.c (KVM_SET_GUEST_DEBUG): with a self-IPI
pending, a software breakpoint exits DEBUG with #BP at the int3; an instruction breakpoint in each
of DR0-DR3 exits with #DB at the nop and DR6 naming that register; a write watchpoint in each
exits just after the store; single-stepping (with KVM_GUESTDBG_BLOCKIRQ, so the pending interrupt
stays pending across the STI) exits after each of six instructions with DR6.BS; DR7.GD makes the
guest's MOV from DR0 exit with DR6.BD; with debugging off the guest reaches DONE."""
import struct

import pytest
from _selftest import host_fails

from pykvm.abi import ffi

pytestmark = [pytest.mark.requires_kvm, pytest.mark.requires_arch("x86_64"),
              pytest.mark.requires_cap("SET_GUEST_DEBUG")]
ENABLE, SINGLESTEP = 0x1, 0x2                     # KVM_GUESTDBG_*
USE_SW_BP, USE_HW_BP, BLOCKIRQ = 0x10000, 0x20000, 0x100000
DB_VECTOR, BP_VECTOR = 1, 3
DR6_BD, DR7_GD = 1 << 13, 1 << 13
SS_SIZE = (1, 2, 2, 5, 2, 1)                      # sti, xor, cpuid, mov, wrmsr, cli


@host_fails("INT3: exit 17 exception 1 rip 0x1: KVM_EXIT_INTERNAL_ERROR (emulation) instead of "
            "the #BP debug exit")
def test_debug_regs(guest_vm):
    m = guest_vm("sel_debug_regs.c", irqchip=True)
    sw_bp, hw_bp, write_data, ss_start, bd_start, guest_value = struct.unpack(
        "<6Q", m.globals.read_bytes("sel_debug_labels"))
    vcpu = m.vcpus[0]

    def set_debug(control, dr=None, dr7=0):
        g = ffi.new("struct kvm_guest_debug *")
        g.control = control
        for i, v in (dr or {}).items():
            g.arch.debugreg[i] = v
        g.arch.debugreg[7] = dr7
        vcpu.ioctl("KVM_SET_GUEST_DEBUG", g)

    def debug_run(control, dr=None, dr7=0):
        """vcpu_guest_debug_set() + vcpu_run(): (exception, pc, dr6) of a DEBUG exit (None for
        any other) and the event in words."""
        set_debug(control, dr, dr7)
        ev = m.step()
        if ev.kind != "exit" or ev.name != "DEBUG":
            return None, m.describe(ev)
        a = ev.exit.run.debug.arch
        return (a.exception, a.pc, a.dr6), m.describe(ev)

    def skip_insn(n):
        regs = vcpu.get_regs()
        regs.rip += n
        vcpu.set_regs(regs)

    got, what = debug_run(ENABLE | USE_SW_BP)
    assert got is not None and got[:2] == (BP_VECTOR, sw_bp), \
        f"INT3: {what} (should be #BP at {sw_bp:#x})"
    skip_insn(1)

    for i in range(4):                            # instruction breakpoints, DR0-DR3
        got, what = debug_run(ENABLE | USE_HW_BP, {i: hw_bp}, 0x400 | 1 << (2 * i + 1))
        want = (DB_VECTOR, hw_bp, 0xFFFF0FF0 | 1 << i)
        assert got == want, f"INS_HW_BP (DR{i}): {what} (should be #DB at {hw_bp:#x} " \
                            f"dr6 {want[2]:#x})"
    skip_insn(1)

    for i in range(4):                            # data write breakpoints, DR0-DR3
        got, what = debug_run(ENABLE | USE_HW_BP, {i: guest_value},
                              0x400 | 1 << (2 * i + 1) | 0xD0000 << (4 * i))
        want = (DB_VECTOR, write_data, 0xFFFF0FF0 | 1 << i)
        assert got == want, f"DATA_HW_BP (DR{i}): {what} (should be #DB at " \
                            f"{write_data:#x} dr6 {want[2]:#x})"
        skip_insn(-7)                             # back over the 7-byte "mov"
    skip_insn(7)

    rip = ss_start                                # single step
    for i, size in enumerate(SS_SIZE):
        rip += size
        got, what = debug_run(ENABLE | SINGLESTEP | BLOCKIRQ, dr7=0x400)
        want = (DB_VECTOR, rip, 0xFFFF4FF0)
        assert got == want, f"SINGLE_STEP[{i}]: {what} (should be #DB at {rip:#x} dr6 " \
                            f"{want[2]:#x})"

    got, what = debug_run(ENABLE | USE_HW_BP, dr7=0x400 | DR7_GD)
    want = (DB_VECTOR, bd_start, 0xFFFF0FF0 | DR6_BD)
    assert got == want, f"DR7.GD: {what} (should be #DB at {bd_start:#x} dr6 {want[2]:#x})"

    set_debug(0)                                  # all debug controls off: to the end
    m.done()
