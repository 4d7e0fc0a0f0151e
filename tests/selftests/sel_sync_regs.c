/*
 * Guest of test_sel_sync_regs.py (port of x86_64/sync_regs_test.c): after one
 * SYNC, an endless loop of "in" from port 0x2000 followed by RBX += 1, so the
 * host sees each register change KVM_CAP_SYNC_REGS makes as RBX + 1 at the
 * next exit.
 */
#include "pykvm_guest.h"

void guest_main(void)
{
	GUEST_SYNC(0);
	__asm__ volatile("1: in %%dx, %%al\n\t"
			 "add $0x1, %%rbx\n\t"
			 "jmp 1b"
			 : : "d"(0x2000) : "rax", "rbx");
}
