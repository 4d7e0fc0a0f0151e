/*
 * readonly: reads, writes and re-reads a 64-bit word, normally inside a
 * read-only memory slot (the write then becomes an MMIO exit).
 *
 * params[0] = address (must be set)
 * params[1] = value to write (0: 0xdeadbeefcafef00d)
 * SYNC(1, addr, value before the write)
 * SYNC(2, addr, value read after the write)
 */
#include "pykvm_guest.h"

void guest_main(void)
{
	uint64_t addr = pykvm_params[0];
	uint64_t val = pykvm_params[1];
	volatile uint64_t *p = (volatile uint64_t *)(uintptr_t)addr;
	uint64_t before;

	GUEST_ASSERT_NE(addr, 0);
	if (!val)
		val = 0xdeadbeefcafef00dULL;
	before = *p;
	GUEST_SYNC(1, addr, before);
	*p = val;
	GUEST_SYNC(2, addr, *p);
}
