/*
 * cpuid: reads CPUID leaves and reports each with a SYNC.
 *
 * params[0] = number of leaves N (0: a fixed default list)
 * params[k] = leaf | (subleaf << 32) for stage k = 1..N; read just before
 *             stage k, so the host may also fill it in while stopped at
 *             the previous SYNC.
 * SYNC(k, leaf, subleaf, eax, ebx, ecx, edx) for k = 1..N.
 */
#include "pykvm_guest.h"

static const uint64_t default_leaves[] = {
	0x0, 0x1, 0x7, 0x80000000, 0x80000001,
};

void guest_main(void)
{
	uint64_t k;

	for (k = 1;; k++) {
		uint64_t n = pykvm_params[0];
		uint64_t p;
		struct pykvm_cpuid r;

		if (n == 0) {
			if (k > sizeof(default_leaves) / sizeof(default_leaves[0]))
				break;
			p = default_leaves[k - 1];
		} else {
			if (k > n || k >= PYKVM_NPARAMS)
				break;
			p = pykvm_params[k];
		}
		r = cpuid_count((uint32_t)p, (uint32_t)(p >> 32));
		GUEST_SYNC(k, (uint32_t)p, p >> 32, r.eax, r.ebx, r.ecx, r.edx);
	}
}
