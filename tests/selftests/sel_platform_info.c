/*
 * Guest of test_sel_platform_info.py (port of x86_64/platform_info_test.c).
 * SYNC(1, 1): the host enables KVM_CAP_MSR_PLATFORM_INFO; the guest reads
 * MSR_PLATFORM_INFO and asserts the max turbo ratio bits the host set.
 * SYNC(2, 0): the host disables it; RDMSR must raise #GP.
 */
#include "sel_safe.h"

#define MSR_PLATFORM_INFO 0xce
#define MAX_TURBO_RATIO 0xff00

void guest_main(void)
{
	uint64_t v;

	GUEST_SYNC(1, 1);
	v = rdmsr(MSR_PLATFORM_INFO);
	GUEST_ASSERT_EQ(v & MAX_TURBO_RATIO, MAX_TURBO_RATIO);

	GUEST_SYNC(2, 0);
	GUEST_ASSERT_EQ(sel_rdmsr_safe(MSR_PLATFORM_INFO, &v), GP_VECTOR);

	GUEST_DONE();
}
