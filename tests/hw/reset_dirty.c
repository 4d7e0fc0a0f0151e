/*
 * reset_dirty: a guest that counts and dirties memory, for Machine.reset() tests
 * (tests/hw/test_reset.py). Every vCPU runs it on its own half of `area` and its own counter
 * (vCPU 0 and 1, told apart by the initial APIC id).
 *
 * params[0] = pages of its half of `area` each vCPU writes (default 8, at most HALF_PAGES)
 * params[1] = 0: one round, then DONE; otherwise: rounds forever (no report)
 * SYNC(0, counter, checksum of area): the baseline point (the host checkpoints here)
 * a round: counter += 1, rounds += 1, a byte of each page changes (at offset counter*8 % 4096),
 *   a page of `zeros` (all zero at the start) gets one byte
 * SYNC(1, counter, rounds, checksum of area, checksum of zeros) after the first round, DONE.
 * A machine reset to SYNC(0) reports the same SYNC(1) every time; one not reset counts on.
 */
#include "pykvm_guest.h"

#define HALF_PAGES 16

static uint8_t area[2 * HALF_PAGES * 4096] __attribute__((aligned(4096))) = { 1, 2, 3 };
static uint8_t zeros[16 * 4096] __attribute__((aligned(4096)));
static volatile uint64_t counter[2] = { 1000, 2000 };
static volatile uint64_t rounds[2];

static uint32_t vcpu_index(void)
{
	uint32_t a = 1, b, c = 0, d;

	__asm__ volatile("cpuid" : "+a"(a), "=b"(b), "+c"(c), "=d"(d));
	return (b >> 24) & 1;
}

/* A checksum of `pages` pages at p: two words of each, the first and the one at `off`
 * (ring-0 guest code can be slow to run on some hosts: a few reads a page keep a round short,
 * and they cover every byte a round writes). */
static uint64_t checksum(const volatile uint8_t *p, uint64_t pages, uint64_t off)
{
	uint64_t h = 1469598103934665603ULL;

	for (uint64_t i = 0; i < pages; i++) {
		h = (h ^ *(const volatile uint64_t *)(p + i * 4096)) * 1099511628211ULL;
		h = (h ^ *(const volatile uint64_t *)(p + i * 4096 + off)) * 1099511628211ULL;
	}
	return h;
}

static void one_round(uint32_t id, uint64_t pages)
{
	uint64_t c = ++counter[id];

	rounds[id]++;
	for (uint64_t i = 0; i < pages; i++)
		area[(id * HALF_PAGES + i) * 4096 + (c * 8) % 4096] += (uint8_t)(c + i);
	zeros[(id * 8 + c % 8) * 4096] = (uint8_t)c;
}

void guest_main(void)
{
	uint32_t id = vcpu_index();
	uint64_t pages = pykvm_params[0] ? pykvm_params[0] : 8;

	if (pages > HALF_PAGES)
		pages = HALF_PAGES;
	GUEST_SYNC(0, counter[id], checksum(area, 2 * HALF_PAGES, (counter[id] + 1) * 8 % 4096));
	one_round(id, pages);
	GUEST_SYNC(1, counter[id], rounds[id], checksum(area, 2 * HALF_PAGES, counter[id] * 8 % 4096),
		   checksum(zeros, 16, 0));
	if (pykvm_params[1])
		for (;;)
			one_round(id, pages);
}
