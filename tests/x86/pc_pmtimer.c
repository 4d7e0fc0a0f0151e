/*
 * pc_pmtimer: the ACPI PM timer (port from the FADT, 3.579545 MHz, 24 bits)
 * and the PM1 event/control registers.
 *
 * params[0] = reads (default 2000); params[1] = 1: also count PM timer ticks
 * over one RTC second.
 *
 * SYNC(1, first value, last value, ticks elapsed (sum of deltas), TSC cycles from
 *      before the first read to after the last, TSC cycles from after the first read
 *      to before the last, largest single delta, reads)
 *      The two TSC spans bracket the span the PM timer counted, however long the host
 *      took to serve the first and the last read (a descheduled vCPU thread widens the
 *      bracket; it never moves the true span outside it).
 * SYNC(2, pm_tmr_blk, PM1_CNT, PM1_EN after writing 0x0401, PM1_STS & ~TMR_STS after
 *      writing all-ones, byte read of PM1_EN's low half)
 * SYNC(3, PM ticks in each of three RTC seconds)      (params[1] = 1)
 */
#include "pc.h"

void guest_main(void)
{
	struct acpi_header *fadt = acpi_find("FACP");
	uint32_t n = pykvm_params[0] ? (uint32_t)pykvm_params[0] : 2000;
	uint16_t tmr, evt, cnt;
	uint32_t first, prev, cur, delta, max = 0, i;
	uint64_t total = 0, tsc0, tsc0_after, tsc1_before, tsc1;

	GUEST_ASSERT(fadt != NULL);
	tmr = (uint16_t)rd32(fadt, 76);
	evt = (uint16_t)rd32(fadt, 56);
	cnt = (uint16_t)rd32(fadt, 64);
	tsc0 = rdtsc();
	first = prev = cur = inl(tmr);
	tsc0_after = rdtsc();
	GUEST_ASSERT_EQ(first >> 24, 0);
	tsc1_before = tsc0_after;
	for (i = 0; i < n; i++) {
		tsc1_before = rdtsc();
		cur = inl(tmr);
		GUEST_ASSERT_EQ(cur >> 24, 0);
		delta = (cur - prev) & 0xffffff;
		/* monotonic: a step "backwards" would be a huge delta mod 2^24 */
		GUEST_ASSERT(delta < 0x800000);
		if (delta > max)
			max = delta;
		total += delta;
		prev = cur;
	}
	tsc1 = rdtsc();
	GUEST_SYNC(1, first, cur, total, tsc1 - tsc0, tsc1_before - tsc0_after, max, n);

	outw(evt + 2, 0x0401);
	outw(evt, 0xffff);
	GUEST_SYNC(2, tmr, inw(cnt), inw(evt + 2), inw(evt) & ~1u, inb(evt + 2));
	outw(evt + 2, 0);

	if (pykvm_params[1]) {
		/* three consecutive RTC seconds: the host takes the median, so one interval that
		 * a busy host stretched or shrank (the vCPU descheduled next to an update) does
		 * not decide */
		uint32_t t[4];
		int i;

		rtc_wait_update();
		t[0] = inl(tmr);
		for (i = 1; i < 4; i++) {
			rtc_wait_update();
			t[i] = inl(tmr);
		}
		GUEST_SYNC(3, (t[1] - t[0]) & 0xffffff, (t[2] - t[1]) & 0xffffff,
			   (t[3] - t[2]) & 0xffffff);
	}
}
