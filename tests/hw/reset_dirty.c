/*
 * reset_dirty: a guest that counts and dirties memory, for Machine.reset() tests
 * (tests/hw/test_reset.py).
 *
 * params[0] = pages of `area` to write each round (default 8, at most AREA_PAGES)
 * SYNC(0, counter, checksum): the baseline point (the host checkpoints here)
 * then, per round: counter += 1, `rounds` += 1, each of the pages gets a byte
 *   changed (page i at offset counter*8 % 4096) and a page of `zeros`, zero at the
 *   start, gets one too; SYNC(1, counter, rounds, checksum of area, zeros_sum) once, DONE.
 * A freshly reset machine reports the same SYNC(1) every time; one that was not reset
 * counts on.
 */
#include "pykvm_guest.h"

#define AREA_PAGES 64

static uint8_t area[AREA_PAGES * 4096] __attribute__((aligned(4096))) = { 1, 2, 3 };
static uint8_t zeros[16 * 4096] __attribute__((aligned(4096)));
static volatile uint64_t counter = 1000;
static volatile uint64_t rounds;

static uint64_t checksum(const uint8_t *p, uint64_t n)
{
	uint64_t h = 1469598103934665603ULL;

	for (uint64_t i = 0; i < n; i += 8)
		h = (h ^ *(const uint64_t *)(p + i)) * 1099511628211ULL;
	return h;
}

void guest_main(void)
{
	uint64_t pages = pykvm_params[0] ? pykvm_params[0] : 8;

	if (pages > AREA_PAGES)
		pages = AREA_PAGES;
	GUEST_SYNC(0, counter, checksum(area, sizeof(area)));
	counter++;
	rounds++;
	for (uint64_t i = 0; i < pages; i++)
		area[i * 4096 + (counter * 8) % 4096] += (uint8_t)(counter + i);
	zeros[(counter % 16) * 4096] = (uint8_t)counter;
	GUEST_SYNC(1, counter, rounds, checksum(area, sizeof(area)),
		   checksum(zeros, sizeof(zeros)));
	GUEST_DONE();
}
