/*
 * exits: N port writes, for exit statistics.
 *
 * params[0] = N (0: 100)
 * params[1] = port (0: 0x80)
 * Writes byte i & 0xff to the port N times, then SYNC(1, N, port).
 */
#include "pykvm_guest.h"

void guest_main(void)
{
	uint64_t n = pykvm_params[0] ? pykvm_params[0] : 100;
	uint16_t port = pykvm_params[1] ? (uint16_t)pykvm_params[1] : 0x80;
	uint64_t i;

	for (i = 0; i < n; i++)
		outb(port, (uint8_t)i);
	GUEST_SYNC(1, n, port);
}
