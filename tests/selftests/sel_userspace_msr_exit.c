/*
 * Guest of test_sel_userspace_msr_exit.py (port of
 * x86_64/userspace_msr_exit_test.c).  pykvm_params[0] picks the guest code:
 * 0 filter_allow, 1 filter_deny, 2 permission_bitmap; pykvm_params[1] != 0
 * runs filter_allow's checks a second time through KVM's instruction
 * emulator (the "forced emulation" prefix, kvm.force_emulation_prefix=1).
 * Where the C test's #GP handler counts faults at its rdmsr/wrmsr labels,
 * this guest counts the vectors rdmsr_safe()/wrmsr_safe() return.
 */
#include "pykvm_guest.h"

#define MSR_IA32_XSS		0x00000da0
#define MSR_IA32_FLUSH_CMD	0x0000010b
#define MSR_IA32_POWER_CTL	0x000001fc
#define MSR_SYSCALL_MASK	0xc0000084
#define MSR_FS_BASE		0xc0000100
#define MSR_GS_BASE		0xc0000101
#define MSR_NON_EXISTENT	0x474f4f00
#define GP_VECTOR		13
#define KVM_FEP			"ud2; .byte 'k', 'v', 'm'; "

static int guest_exception_count;

static uint64_t test_rdmsr(uint32_t msr)
{
	uint64_t v;

	guest_exception_count = rdmsr_safe(msr, &v) == GP_VECTOR;
	return v;
}

static void test_wrmsr(uint32_t msr, uint64_t value)
{
	guest_exception_count = wrmsr_safe(msr, value) == GP_VECTOR;
}

static uint64_t test_em_rdmsr(uint32_t msr)
{
	uint64_t vec, ec;
	uint32_t lo = 0, hi = 0;

	__asm__ volatile(PYKVM_ASM_SAFE(KVM_FEP "rdmsr")
			 : "+a"(lo), "+d"(hi), PYKVM_ASM_SAFE_OUTPUTS(vec, ec)
			 : "c"(msr)
			 : PYKVM_ASM_SAFE_CLOBBERS);
	(void)ec;
	guest_exception_count = vec == GP_VECTOR;
	return ((uint64_t)hi << 32) | lo;
}

static void test_em_wrmsr(uint32_t msr, uint64_t value)
{
	uint64_t vec, ec;

	__asm__ volatile(PYKVM_ASM_SAFE(KVM_FEP "wrmsr")
			 : PYKVM_ASM_SAFE_OUTPUTS(vec, ec)
			 : "c"(msr), "a"((uint32_t)value), "d"((uint32_t)(value >> 32))
			 : PYKVM_ASM_SAFE_CLOBBERS);
	(void)ec;
	guest_exception_count = vec == GP_VECTOR;
}

static void guest_code_filter_allow(int emulated)
{
	uint64_t (*rd)(uint32_t) = emulated ? test_em_rdmsr : test_rdmsr;
	void (*wr)(uint32_t, uint64_t) = emulated ? test_em_wrmsr : test_wrmsr;
	uint64_t data;

	/* userspace answers MSR_IA32_XSS reads with 0 and refuses writes of non-zero */
	data = rd(MSR_IA32_XSS);
	GUEST_ASSERT(data == 0);
	GUEST_ASSERT(guest_exception_count == 0);
	wr(MSR_IA32_XSS, 0);
	GUEST_ASSERT(guest_exception_count == 0);
	wr(MSR_IA32_XSS, 1);
	GUEST_ASSERT(guest_exception_count == 1);

	/* MSR_IA32_FLUSH_CMD: #GP on read and on writing anything but 1 */
	rd(MSR_IA32_FLUSH_CMD);
	GUEST_ASSERT(guest_exception_count == 1);
	wr(MSR_IA32_FLUSH_CMD, 0);
	GUEST_ASSERT(guest_exception_count == 1);
	wr(MSR_IA32_FLUSH_CMD, 1);
	GUEST_ASSERT(guest_exception_count == 0);

	/* a fabricated MSR passes through KVM to userspace */
	wr(MSR_NON_EXISTENT, 2);
	GUEST_ASSERT(guest_exception_count == 0);
	data = rd(MSR_NON_EXISTENT);
	GUEST_ASSERT(data == 2);
	GUEST_ASSERT(guest_exception_count == 0);
}

static void guest_msr_calls(int trapped)
{
	wrmsr(MSR_SYSCALL_MASK, 0);			/* in-kernel */
	if (trapped) {					/* userspace */
		GUEST_ASSERT(rdmsr(MSR_SYSCALL_MASK) == MSR_SYSCALL_MASK);
		GUEST_ASSERT(rdmsr(MSR_GS_BASE) == MSR_GS_BASE);
	} else {
		GUEST_ASSERT(rdmsr(MSR_SYSCALL_MASK) != MSR_SYSCALL_MASK);
		GUEST_ASSERT(rdmsr(MSR_GS_BASE) != MSR_GS_BASE);
	}
	wrmsr(MSR_IA32_POWER_CTL, 0x1234);		/* userspace if trapped */
	rdmsr(MSR_IA32_POWER_CTL);			/* in-kernel */
	GUEST_ASSERT(rdmsr(0xdeadbeef) == 0xdeadbeef);	/* always userspace */
	wrmsr(0xdeadbeef, 0x1234);
}

static void guest_code_permission_bitmap(void)
{
	GUEST_ASSERT(test_rdmsr(MSR_FS_BASE) == MSR_FS_BASE);
	GUEST_ASSERT(test_rdmsr(MSR_GS_BASE) != MSR_GS_BASE);
	GUEST_SYNC(0);					/* the host switches the filter */
	GUEST_ASSERT(test_rdmsr(MSR_FS_BASE) != MSR_FS_BASE);
	GUEST_ASSERT(test_rdmsr(MSR_GS_BASE) == MSR_GS_BASE);
}

void guest_main(void)
{
	switch (pykvm_params[0]) {
	case 0:
		guest_code_filter_allow(0);
		if (pykvm_params[1]) {
			GUEST_SYNC(0);
			guest_code_filter_allow(1);
		}
		break;
	case 1:
		guest_msr_calls(1);
		GUEST_SYNC(0);				/* the host removes the filter */
		guest_msr_calls(0);
		break;
	case 2:
		guest_code_permission_bitmap();
		break;
	}
	GUEST_DONE();
}
