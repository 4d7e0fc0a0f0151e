/*
 * vcpu_id: every vCPU reports its initial APIC id (CPUID.1:EBX[31:24]).
 * All vCPUs enter at the same point; the VMM gives each its own stack.
 * SYNC(1, apic_id), then DONE (once per vCPU).
 */
#include "pykvm_guest.h"

void guest_main(void)
{
	GUEST_SYNC(1, cpuid(1).ebx >> 24);
}
