/*
 * msr: writes an MSR, reads it back, and reads it again after the host had
 * a chance to change it.
 *
 * params[0] = MSR index (0: STAR, 0xc0000081; IA32_TSC_AUX 0xc0000103 needs
 *             RDTSCP in the guest CPUID)
 * params[1] = value to write (0: 0x0023001012345678)
 * SYNC(1, msr, written, read back)
 * SYNC(2, msr, value read after the host resumed the guest)
 */
#include "pykvm_guest.h"

void guest_main(void)
{
	uint32_t msr = (uint32_t)pykvm_params[0];
	uint64_t val = pykvm_params[1];

	if (!msr)
		msr = 0xc0000081;
	if (!val)
		val = 0x0023001012345678ULL;
	wrmsr(msr, val);
	GUEST_SYNC(1, msr, val, rdmsr(msr));
	GUEST_SYNC(2, msr, rdmsr(msr));
}
