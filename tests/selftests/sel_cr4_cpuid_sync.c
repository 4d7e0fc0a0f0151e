/*
 * Guest of test_sel_cr4_cpuid_sync.py (port of x86_64/cr4_cpuid_sync_test.c):
 * set CR4.OSXSAVE, check CPUID.1:ECX.OSXSAVE follows it; SYNC(1) lets the
 * host clear CR4.OSXSAVE through KVM_SET_SREGS; CPUID must follow again.
 */
#include "pykvm_guest.h"

#define X86_CR4_OSXSAVE (1ul << 18)
#define CPUID_OSXSAVE (1u << 27)

static inline void set_cr4(unsigned long v)
{
	__asm__ volatile("mov %0, %%cr4" : : "r"(v) : "memory");
}

static int cr4_cpuid_is_sync(void)
{
	unsigned long cr4 = read_cr4();

	return !!(cpuid(1).ecx & CPUID_OSXSAVE) == !!(cr4 & X86_CR4_OSXSAVE);
}

void guest_main(void)
{
	set_cr4(read_cr4() | X86_CR4_OSXSAVE);
	GUEST_ASSERT(cr4_cpuid_is_sync());

	GUEST_SYNC(1);

	GUEST_ASSERT(cr4_cpuid_is_sync());
	GUEST_DONE();
}
