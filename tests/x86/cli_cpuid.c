/*
 * cli_cpuid: prints its parameters and the CPUID leaves they name, for the
 * end-to-end tests of `pykvm run --param/--cpuid/--cpu-features`
 * (test_cli_run_options.py).
 *
 * params[0]     = N, the number of leaves (at most 15)
 * params[1..N]  = leaf | subleaf << 32
 * Prints "params P0 P1 ... P15" (all 16, hex), then per leaf
 * "cpuid LEAF.SUB eax=.. ebx=.. ecx=.. edx=.." (hex).
 */
#include "pykvm_guest.h"

void guest_main(void)
{
	uint64_t n = pykvm_params[0];
	uint64_t k;

	pykvm_printf("params");
	for (k = 0; k < PYKVM_NPARAMS; k++)
		pykvm_printf(" %llx", (unsigned long long)pykvm_params[k]);
	pykvm_printf("\n");
	GUEST_ASSERT(n < PYKVM_NPARAMS);
	for (k = 1; k <= n; k++) {
		uint64_t p = pykvm_params[k];
		struct pykvm_cpuid r = cpuid_count((uint32_t)p, (uint32_t)(p >> 32));

		pykvm_printf("cpuid %x.%x eax=%x ebx=%x ecx=%x edx=%x\n",
			     (uint32_t)p, (uint32_t)(p >> 32), r.eax, r.ebx, r.ecx, r.edx);
	}
}
