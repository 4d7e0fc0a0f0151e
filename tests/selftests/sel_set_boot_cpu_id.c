/*
 * Guest of test_sel_set_boot_cpu_id.py (port of x86_64/set_boot_cpu_id.c):
 * each vCPU reports SYNC(1), then asserts that IA32_APIC_BASE.BSP is set on
 * the vCPU whose APIC id is the boot CPU id the host chose (param 0) and
 * clear on the other.
 */
#include "pykvm_guest.h"

#define MSR_IA32_APICBASE	0x1b
#define MSR_IA32_APICBASE_BSP	(1ull << 8)

void guest_main(void)
{
	uint32_t apic_id = cpuid(1).ebx >> 24;
	uint64_t bsp_flag;

	GUEST_SYNC(1);

	bsp_flag = rdmsr(MSR_IA32_APICBASE) & MSR_IA32_APICBASE_BSP;
	if (apic_id == pykvm_params[0])
		GUEST_ASSERT_NE(bsp_flag, 0);
	else
		GUEST_ASSERT_EQ(bsp_flag, 0);

	GUEST_DONE();
}
