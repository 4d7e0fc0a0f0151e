/*
 * unbacked: jumps to an address with no RAM behind it.
 *
 * params[0] = target (0: 0xc0000000, identity mapped but not RAM unless the
 *             guest has more than 3 GiB)
 * SYNC(1, target) just before the jump.  What follows is up to KVM (an
 * emulation failure / internal error, or an MMIO exit); a target beyond
 * the identity map gives an EXCEPTION report (#PF, vector 14).
 */
#include "pykvm_guest.h"

void guest_main(void)
{
	uint64_t target = pykvm_params[0] ? pykvm_params[0] : 0xc0000000ULL;

	GUEST_SYNC(1, target);
	((void (*)(void))(uintptr_t)target)();
}
