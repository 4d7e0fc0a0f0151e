/*
 * Ends the run with an SBI system reset (shutdown): KVM turns it into
 * KVM_EXIT_SYSTEM_EVENT (type SHUTDOWN).  SYNC(1) first, so the host knows
 * the guest got that far; anything after the ecall is a failure.
 */
#include "pykvm_guest.h"
#include "riscv.h"

void guest_main(unsigned long hartid, void *dtb)
{
	struct sbiret r;

	(void)hartid;
	(void)dtb;
	GUEST_SYNC(1);
	r = sbi_ecall(SBI_EXT_SRST, SBI_SRST_RESET, SBI_SRST_TYPE_SHUTDOWN,
		      SBI_SRST_REASON_NONE, 0, 0, 0, 0);
	GUEST_ASSERT_MSG(0, "system reset returned error %ld", r.error);
}
