/* time_hold: reads the time CSR in a tight loop on every hart and keeps, in memory, the
 * largest step between two reads and how often time went backwards, so that the host can see
 * what a pause looked like from inside: Machine.pause() holds the guest's time still on
 * RISC-V (tests/riscv/test_pause_riscv.py).
 *
 * Every hart (pykvm starts each at the entry point) loops forever; the host reads, by name:
 *   max_step[h]  the largest rdtime difference between two reads of hart h (timebase ticks)
 *   reads[h]     reads so far on hart h
 *   backwards[h] reads that gave a smaller time than the one before on hart h
 */
#include "pykvm_guest.h"
#include "riscv.h"

#define MAX_HARTS 8

volatile uint64_t max_step[MAX_HARTS], reads[MAX_HARTS], backwards[MAX_HARTS];

static void __attribute__((noreturn)) watch_time(unsigned h)
{
	uint64_t last = rdtime(), t;

	for (;;) {
		t = rdtime();
		if (t < last)
			backwards[h]++;
		else if (t - last > max_step[h])
			max_step[h] = t - last;
		last = t;
		reads[h]++;
	}
}

void guest_main(unsigned long hartid, void *dtb)
{
	(void)dtb;
	watch_time(hartid < MAX_HARTS ? (unsigned)hartid : MAX_HARTS - 1);
}
