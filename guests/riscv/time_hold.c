/* time_hold: reads the time CSR in a tight loop on every hart and keeps, in memory, the
 * largest step between two reads and how often time went backwards, so that the host can see
 * what a pause looked like from inside: Machine.pause() holds the guest's time still on
 * RISC-V (tests/riscv/test_pause_riscv.py).
 *
 * Hart 0 starts the others (SBI HSM hart_start at pykvm_resume_entry, which calls
 * guest_resume); then every hart loops forever. The host reads, by name:
 *   max_step[h]  the largest rdtime difference between two reads of hart h (timebase ticks)
 *   reads[h]     reads so far on hart h
 *   backwards[h] reads that gave a smaller time than the one before on hart h
 */
#include "pykvm_guest.h"
#include "riscv.h"

#define MAX_HARTS 4		/* crt0.S has a stack for 4 */
#define SBI_HSM_HART_START 0

extern char pykvm_resume_entry[];

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

void guest_resume(unsigned long hartid, unsigned long opaque)
{
	(void)opaque;
	watch_time((unsigned)hartid);
}

void guest_main(unsigned long hartid, void *dtb)
{
	unsigned long h;

	(void)dtb;
	for (h = 1; h < MAX_HARTS; h++)	/* a hart the machine lacks answers an error */
		sbi_ecall(SBI_EXT_HSM, SBI_HSM_HART_START, h, (unsigned long)pykvm_resume_entry,
			  0, 0, 0, 0);
	watch_time((unsigned)hartid);
}
