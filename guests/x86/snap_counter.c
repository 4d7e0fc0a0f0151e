/* snap_counter: a guest whose progress and memory a snapshot must carry over exactly.
 *
 * Each vCPU that runs guest_main (every vCPU on the bare machine; vCPU 0 on the pc
 * machine) fills its own 16 KiB region at 32 MiB + 64 KiB x APIC id with a pattern,
 * then runs ROUNDS rounds: each rewrites a few words of the region from the round
 * number and a running value, and every REPORT_EVERY rounds it prints
 *     "snap cpu<N> count=<round> sum=<checksum of the region>\n"
 * through the report port (one line per report, so vCPUs never interleave
 * characters).  The sequence depends on nothing but the code, so an uninterrupted
 * run and a run snapshotted and restored in another process print the same lines.
 *
 * On the pc machine, with pykvm_params[0] = number of APs to wake, vCPU 0 wakes the
 * others by INIT/SIPI into a real-mode loop at 0x7000 that counts forever in the
 * 32-bit word at 0x7f00 + 4 x APIC id; vCPU 0's lines then add
 * " aps=<sum of the AP counters>" (a value that grows while the APs run).
 *
 * Ends with DONE ("snap cpu<N> done"; with APs, isa-debug-exit 0: exit status 1).
 * pykvm_params[1]: extra pause iterations per round (0: none), to slow the guest
 * down for a snapshot to land mid-run.  pykvm_params[2]: with N > 1, vCPUs 0..N-1
 * run in loose step: none starts a round more than SLACK rounds ahead of the
 * slowest of them, so that while one of them is mid-run every one is (host
 * threads scheduled unevenly cannot let one vCPU finish before another starts).
 * The lines do not depend on it. */
#include "pc.h"

#define REGION_BASE 0x2000000ul
#define REGION_STRIDE 0x10000ul
#define REGION_WORDS (16384 / 8)
#define ROUNDS 600
#define REPORT_EVERY 10
#define TRAMPOLINE 0x7000u
#define AP_COUNTERS 0x7f00u
#define SLACK 100

static volatile unsigned progress[64];	/* the last round each vCPU finished */

extern char snap_ap_start[], snap_ap_end[];

__asm__(
	".pushsection .text\n"
	".code16\n"
	".globl snap_ap_start\n"
	"snap_ap_start:\n"
	"	cli\n"
	"	xorw %ax, %ax\n"
	"	movw %ax, %ds\n"
	"	movl $1, %eax\n"
	"	cpuid\n"
	"	shrl $24, %ebx\n"
	"	shll $2, %ebx\n"
	"	addl $0x7f00, %ebx\n"
	"1:	lock incl (%bx)\n"
	"	jmp 1b\n"
	".globl snap_ap_end\n"
	"snap_ap_end:\n"
	".code64\n"
	".popsection\n");

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

static void wake_aps(void)
{
	volatile uint8_t *dst = (volatile uint8_t *)(uintptr_t)TRAMPOLINE;
	unsigned i, n = (unsigned)(snap_ap_end - snap_ap_start);

	for (i = 0; i < n; i++)
		dst[i] = (uint8_t)snap_ap_start[i];
	for (i = 0; i < 64; i++)
		((volatile uint32_t *)(uintptr_t)AP_COUNTERS)[i] = 0;
	lapic_write(LAPIC_SVR, 0x1ff);
	lapic_write(LAPIC_ICR_HI, 0);
	lapic_write(LAPIC_ICR_LO, 0xc4500);			/* INIT, all but self */
	lapic_write(LAPIC_ICR_LO, 0xc4600 | (TRAMPOLINE >> 12));	/* SIPI */
}

/* Wait until every vCPU below n has finished round r - SLACK. */
static void keep_step(unsigned n, unsigned r)
{
	unsigned j;

	if (r <= SLACK)
		return;
	for (j = 0; j < n && j < 64; j++)
		while (progress[j] < r - SLACK)
			__asm__ volatile("pause");
}

static uint64_t ap_total(unsigned aps)
{
	uint64_t t = 0;
	unsigned i;

	for (i = 1; i <= aps && i < 64; i++)
		t += ((volatile uint32_t *)(uintptr_t)AP_COUNTERS)[i];
	return t;
}

void guest_main(void)
{
	unsigned id = cpuid(1).ebx >> 24;
	volatile uint64_t *w = (volatile uint64_t *)(REGION_BASE + id * REGION_STRIDE);
	unsigned aps = id == 0 ? (unsigned)pykvm_params[0] : 0;
	uint64_t delay = pykvm_params[1];
	unsigned step = (unsigned)pykvm_params[2];
	uint64_t v = mix(id + 1), d;
	unsigned i, round;

	for (i = 0; i < REGION_WORDS; i++)
		w[i] = mix(i ^ (id << 20));
	if (aps)
		wake_aps();
	for (round = 1; round <= ROUNDS; round++) {
		if (step > 1)
			keep_step(step, round);
		v = mix(v + round);
		for (i = 0; i < 4; i++)
			w[(v >> (i * 11)) % REGION_WORDS] ^= v + i;
		for (d = 0; d < delay; d++)
			__asm__ volatile("pause");
		if (id < 64)
			progress[id] = round;
		if (round % REPORT_EVERY)
			continue;
		if (aps)
			GUEST_PRINTF("snap cpu%u count=%u sum=%08x aps=%lu\n", id, round,
				     checksum(w), (unsigned long)ap_total(aps));
		else
			GUEST_PRINTF("snap cpu%u count=%u sum=%08x\n", id, round, checksum(w));
	}
	GUEST_PRINTF("snap cpu%u done\n", id);
	if (aps)
		pykvm_debug_exit(0);	/* the APs count forever: end the run */
	GUEST_DONE();
}
