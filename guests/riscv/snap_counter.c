/* snap_counter (RISC-V): the twin of guests/x86/snap_counter.c for the virt machine.
 *
 * Hart <N> fills its own 16 KiB region at RAM + 32 MiB + 64 KiB x N with a pattern,
 * then runs ROUNDS rounds: each rewrites a few words of the region from the round
 * number and a running value, and every REPORT_EVERY rounds it prints
 *     "snap cpu<N> count=<round> sum=<checksum of the region>\n"
 * through the report channel (one line per report).  The lines depend on nothing but
 * the code, so an uninterrupted run and a run snapshotted and restored in another
 * process print the same ones.  Ends with "snap cpu<N> done" and DONE, or, with
 * pykvm_params[0] = 1, an SBI system reset (shutdown): the run ends even while other
 * harts are STOPPED.  pykvm_params[1]: extra busy iterations per round (0: none). */
#include "pykvm_guest.h"
#include "riscv.h"

#define RAM_START 0x80000000ul
#define REGION_BASE (RAM_START + 0x2000000ul)
#define REGION_STRIDE 0x10000ul
#define REGION_WORDS (16384 / 8)
#define ROUNDS 600
#define REPORT_EVERY 10

static uint64_t mix(uint64_t x)
{
	x ^= x >> 31;
	x *= 0x9e3779b97f4a7c15ull;
	x ^= x >> 29;
	return x;
}

static uint32_t checksum(volatile uint64_t *w)
{
	uint64_t h = 0xcbf29ce484222325ull;
	unsigned i;

	for (i = 0; i < REGION_WORDS; i++)
		h = (h ^ w[i]) * 0x100000001b3ull;
	return (uint32_t)(h ^ (h >> 32));
}

void guest_main(unsigned long hartid, void *dtb)
{
	unsigned id = (unsigned)hartid;
	volatile uint64_t *w = (volatile uint64_t *)(REGION_BASE + id * REGION_STRIDE);
	uint64_t delay = pykvm_params[1];
	uint64_t v = mix(id + 1), d;
	unsigned i, round;

	(void)dtb;
	for (i = 0; i < REGION_WORDS; i++)
		w[i] = mix(i ^ ((uint64_t)id << 20));
	for (round = 1; round <= ROUNDS; round++) {
		v = mix(v + round);
		for (i = 0; i < 4; i++)
			w[(v >> (i * 11)) % REGION_WORDS] ^= v + i;
		for (d = 0; d < delay; d++)
			__asm__ volatile("nop");
		if (round % REPORT_EVERY == 0)
			GUEST_PRINTF("snap cpu%u count=%u sum=%08x\n", id, round, checksum(w));
	}
	GUEST_PRINTF("snap cpu%u done\n", id);
	if (pykvm_params[0])
		sbi_ecall(SBI_EXT_SRST, SBI_SRST_RESET, 0, 0, 0, 0, 0, 0);
	GUEST_DONE();
}
