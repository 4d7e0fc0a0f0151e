/*
 * Guest of test_sel_kvm_clock.py (port of x86_64/kvm_clock_test.c): enable
 * kvm-clock (MSR_KVM_SYSTEM_TIME_NEW) on a page of its own, then report the
 * kvm-clock value read from that page and RDTSC once per host test case:
 * SYNC(i, clock) for i = 0..3.
 */
#include "pvclock.h"

static volatile struct pvclock_vcpu_time_info pvti __attribute__((aligned(4096)));

static inline uint64_t rdtsc_now(void)
{
	uint32_t lo, hi;

	__asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
	return ((uint64_t)hi << 32) | lo;
}

/* __pvclock_read_cycles() of the kernel's asm/pvclock.h */
static uint64_t pvclock_read_cycles(uint64_t tsc)
{
	uint64_t delta = tsc - pvti.tsc_timestamp;
	int shift = pvti.tsc_shift;

	if (shift < 0)
		delta >>= -shift;
	else
		delta <<= shift;
	return pvti.system_time +
	       (uint64_t)(((unsigned __int128)delta * pvti.tsc_to_system_mul) >> 32);
}

void guest_main(void)
{
	int i;

	wrmsr(MSR_KVM_SYSTEM_TIME_NEW, (uint64_t)(uintptr_t)&pvti | KVM_MSR_ENABLED);
	for (i = 0; i < 4; i++)
		GUEST_SYNC(i, pvclock_read_cycles(rdtsc_now()));
	GUEST_DONE();
}
