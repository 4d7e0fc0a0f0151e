/*
 * SBI arguments that the spec makes 32-bit, called with the upper 32 bits of
 * the register set: they must act on the low 32 bits.
 *
 * SYNC(1, error of HSM hart_suspend(type 0), error of hart_suspend(type
 * 1 << 32)): retentive suspends, each woken by an SBI timer (sie.STIE on,
 * sstatus.SIE off, so the wake-up is not taken as a trap).
 * SYNC(2, error, value of DBCN write_byte(0x64636241)) then write_byte of
 * 0xffffff0a: the console gets "A\n".
 */
#include "pykvm_guest.h"
#include "riscv.h"

#define SIE_STIE (1UL << 5)

static struct sbiret suspend_woken_by_timer(unsigned long type)
{
	struct sbiret r;

	__asm__ volatile("csrs sie, %0" : : "r"(SIE_STIE));
	sbi_ecall(SBI_EXT_TIME, SBI_TIME_SET_TIMER, rdtime() + 100000, 0, 0, 0, 0, 0);
	r = sbi_ecall(SBI_EXT_HSM, SBI_HSM_HART_SUSPEND, type, 0, 0, 0, 0, 0);
	sbi_ecall(SBI_EXT_TIME, SBI_TIME_SET_TIMER, ~0UL, 0, 0, 0, 0, 0);
	__asm__ volatile("csrc sie, %0" : : "r"(SIE_STIE));
	return r;
}

void guest_main(unsigned long hartid, void *dtb)
{
	struct sbiret r0, r1;

	(void)hartid;
	(void)dtb;
	r0 = suspend_woken_by_timer(SBI_HSM_SUSPEND_RET_DEFAULT);
	r1 = suspend_woken_by_timer((1UL << 32) | SBI_HSM_SUSPEND_RET_DEFAULT);
	GUEST_SYNC(1, (uint64_t)r0.error, (uint64_t)r1.error);

	r0 = sbi_ecall(SBI_EXT_DBCN, SBI_DBCN_WRITE_BYTE, 0x64636241UL, 0, 0, 0, 0, 0);
	r1 = sbi_ecall(SBI_EXT_DBCN, SBI_DBCN_WRITE_BYTE, 0xffffff0aUL, 0, 0, 0, 0, 0);
	GUEST_SYNC(2, (uint64_t)r0.error, (uint64_t)r0.value, (uint64_t)r1.error);
	GUEST_DONE();
}
