/* control_counter: counts forever without exiting, in guest memory (`counter`, whose address
 * it reports with GUEST_SYNC(1, &counter)) and in RAX: the guest that pause/resume through the
 * control socket is seen to hold and release (tests/hw/test_control_socket.py). */
#include "pykvm_guest.h"

volatile uint64_t counter;

void guest_main(void)
{
	GUEST_SYNC(1, (uint64_t)&counter);
	__asm__ volatile("1: incq (%0)\n\t"
			 "inc %%rax\n\t"
			 "jmp 1b" :: "r"(&counter) : "rax", "memory");
	__builtin_unreachable();
}
