/*
 * Guest of test_sel_dirty_log.py (port of dirty_log_test.c): writes the
 * host's current iteration number into the first 8 bytes of every page of
 * the logged slot (pykvm_params[0]: its address, identity-mapped;
 * pykvm_params[1]: its pages), then forever: 1024 such writes to random
 * pages, then a SYNC.  The host updates "iteration" while the guest runs.
 */
#include "pykvm_guest.h"

#define TEST_PAGES_PER_LOOP 1024

volatile uint64_t iteration;

static uint64_t rng = 0x6b8b4567;

static uint64_t guest_random(void)
{
	rng ^= rng << 13;
	rng ^= rng >> 7;
	rng ^= rng << 17;
	return rng;
}

void guest_main(void)
{
	uint64_t base = pykvm_params[0], pages = pykvm_params[1], i;

	for (i = 0; i < pages; i++)
		*(volatile uint64_t *)(base + i * 4096) = iteration;
	for (;;) {
		for (i = 0; i < TEST_PAGES_PER_LOOP; i++)
			*(volatile uint64_t *)(base + guest_random() % pages * 4096) = iteration;
		GUEST_SYNC(1);
	}
}
