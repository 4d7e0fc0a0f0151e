/* spin: loops forever without exiting (for run timeouts / kicks). */
#include "pykvm_guest.h"

void guest_main(void)
{
	__asm__ volatile("1: jmp 1b");
	__builtin_unreachable();
}
