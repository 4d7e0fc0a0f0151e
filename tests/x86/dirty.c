/*
 * dirty: dirties a list of pages, one 64-bit store at the start of each.
 *
 * params[0] = base address (0: 0x400000)
 * params[1] = number of pages (0: 16)
 * params[2] = stride in bytes (0: 4096)
 * params[3] = rounds (0: 1)
 * Round r (1-based) stores (r << 32) | page_index into each page, then
 * SYNC(r, base, pages, stride).
 */
#include "pykvm_guest.h"

void guest_main(void)
{
	uint64_t base = pykvm_params[0] ? pykvm_params[0] : 0x400000;
	uint64_t n = pykvm_params[1] ? pykvm_params[1] : 16;
	uint64_t stride = pykvm_params[2] ? pykvm_params[2] : 4096;
	uint64_t rounds = pykvm_params[3] ? pykvm_params[3] : 1;
	uint64_t r, i;

	for (r = 1; r <= rounds; r++) {
		for (i = 0; i < n; i++)
			*(volatile uint64_t *)(uintptr_t)(base + i * stride) =
				(r << 32) | i;
		GUEST_SYNC(r, base, n, stride);
	}
}
