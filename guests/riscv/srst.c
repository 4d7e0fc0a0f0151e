/*
 * Ends the run with an SBI system reset: KVM turns it into
 * KVM_EXIT_SYSTEM_EVENT (SHUTDOWN, or RESET for a reboot) with the reason in
 * data[0].  The reset type is pykvm_params[0] and the reason pykvm_params[1]
 * (both 0 unless the host sets them: a shutdown, no reason).  SYNC(1) first,
 * so the host knows the guest got that far; anything after the ecall is a
 * failure.
 */
#include "pykvm_guest.h"
#include "riscv.h"

void guest_main(unsigned long hartid, void *dtb)
{
	struct sbiret r;

	(void)hartid;
	(void)dtb;
	GUEST_SYNC(1);
	r = sbi_ecall(SBI_EXT_SRST, SBI_SRST_RESET, (unsigned long)pykvm_params[0],
		      (unsigned long)pykvm_params[1], 0, 0, 0, 0);
	GUEST_ASSERT_MSG(0, "system reset returned error %ld", r.error);
}
