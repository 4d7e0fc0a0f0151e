/*
 * triple_fault: loads an empty IDT (limit 0) and raises an exception.
 * Delivering it faults, delivering that faults again: the CPU shuts down
 * (KVM_EXIT_SHUTDOWN).  No reports.
 *
 * params[0] = how to raise the first exception: 0 = ud2 (#UD), 1 = int3
 *             (#BP).  Some KVM backends that emulate guest ring-0 code
 *             fail to emulate a software interrupt through a broken IDT
 *             (KVM_EXIT_INTERNAL_ERROR) but do shut down on #UD.
 */
#include "pykvm_guest.h"

void guest_main(void)
{
	struct {
		uint16_t limit;
		uint64_t base;
	} __attribute__((packed)) empty = { 0, 0 };

	__asm__ volatile("lidt %0" : : "m"(empty) : "memory");
	if (pykvm_params[0] == 1)
		__asm__ volatile("int3");
	else
		__asm__ volatile("ud2");
	for (;;)
		;
}
