/*
 * Guest of test_sel_kvm_pv.py (port of x86_64/kvm_pv_test.c): with
 * KVM_CAP_ENFORCE_PV_FEATURE_CPUID and the KVM_CPUID_FEATURES leaf cleared,
 * every KVM paravirtual MSR must #GP on RDMSR and on WRMSR, and the KICK_CPU,
 * SEND_IPI and SCHED_YIELD hypercalls must return -KVM_ENOSYS.
 */
#include "sel_safe.h"

#define KVM_ENOSYS 1000

static const uint32_t msrs[] = {
	0x12,		/* MSR_KVM_SYSTEM_TIME */
	0x4b564d01,	/* MSR_KVM_SYSTEM_TIME_NEW */
	0x11,		/* MSR_KVM_WALL_CLOCK */
	0x4b564d00,	/* MSR_KVM_WALL_CLOCK_NEW */
	0x4b564d02,	/* MSR_KVM_ASYNC_PF_EN */
	0x4b564d03,	/* MSR_KVM_STEAL_TIME */
	0x4b564d04,	/* MSR_KVM_PV_EOI_EN */
	0x4b564d05,	/* MSR_KVM_POLL_CONTROL */
	0x4b564d06,	/* MSR_KVM_ASYNC_PF_INT */
	0x4b564d07,	/* MSR_KVM_ASYNC_PF_ACK */
};

static const uint64_t hcalls[] = {
	5,		/* KVM_HC_KICK_CPU */
	10,		/* KVM_HC_SEND_IPI */
	11,		/* KVM_HC_SCHED_YIELD */
};

static uint64_t kvm_hypercall(uint64_t nr)
{
	uint64_t r;

	/* the host CPU's own instruction: VMCALL on Intel (the host of this port) */
	__asm__ volatile("vmcall" : "=a"(r) : "a"(nr), "b"(0), "c"(0), "d"(0), "S"(0)
			 : "memory");
	return r;
}

void guest_main(void)
{
	uint64_t ignored;
	unsigned int i;

	for (i = 0; i < sizeof(msrs) / sizeof(msrs[0]); i++) {
		GUEST_ASSERT_MSG(sel_rdmsr_safe(msrs[i], &ignored) == GP_VECTOR,
				 "RDMSR %x: no #GP", msrs[i]);
		GUEST_ASSERT_MSG(sel_wrmsr_safe(msrs[i], 0) == GP_VECTOR,
				 "WRMSR %x: no #GP", msrs[i]);
	}
	for (i = 0; i < sizeof(hcalls) / sizeof(hcalls[0]); i++)
		GUEST_ASSERT_MSG(kvm_hypercall(hcalls[i]) == (uint64_t)-KVM_ENOSYS,
				 "hypercall %u: not -KVM_ENOSYS", (unsigned int)hcalls[i]);
	GUEST_DONE();
}
