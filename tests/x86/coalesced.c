/*
 * coalesced: several writes to a coalesced MMIO zone (and optionally a
 * coalesced PIO port).
 *
 * params[0] = MMIO base (0: 0xd0000000)
 * params[1] = number of writes (0: 8)
 * params[2] = port (0: no port writes)
 * 32-bit value i+1 is written to base + 4*i for i < count, then
 * SYNC(1, base, count).  With a port, outl(port, i+1) count times, then
 * SYNC(2, port, count).
 */
#include "pykvm_guest.h"

void guest_main(void)
{
	uint64_t base = pykvm_params[0] ? pykvm_params[0] : 0xd0000000;
	uint64_t n = pykvm_params[1] ? pykvm_params[1] : 8;
	uint16_t port = (uint16_t)pykvm_params[2];
	uint64_t i;

	for (i = 0; i < n; i++)
		*(volatile uint32_t *)(uintptr_t)(base + 4 * i) = (uint32_t)(i + 1);
	GUEST_SYNC(1, base, n);
	if (port) {
		for (i = 0; i < n; i++)
			outl(port, (uint32_t)(i + 1));
		GUEST_SYNC(2, port, n);
	}
}
