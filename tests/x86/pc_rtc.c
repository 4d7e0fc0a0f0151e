/*
 * pc_rtc: the CMOS RTC at 0x70/0x71.
 *
 * SYNC(1, A, B, D, century, year, month, day)          registers at start
 * SYNC(2, hours, minutes, seconds, seconds after the next update, UIP seen)
 *      (all read before the one sync: no host round trip between the two updates)
 * SYNC(3, alarm second set, second at the alarm interrupt, C read in the
 *      handler, interrupts, vector)                    AIE through IOAPIC pin 8; the
 *      alarm is set two seconds after an update the guest has just seen itself
 * SYNC(4, update-ended interrupts counted, C of the last)    UIE
 * SYNC(5, B, hours read in binary 12-hour mode after 12:34:56 PM was
 *      written with SET, then hh mm ss read as BCD 24-hour, CMOS RAM byte 0x40)
 */
#include "pc.h"

#define VEC 0x48

static volatile uint64_t irqs, last_c, last_vec, sec_at_irq;

static void isr(struct pykvm_intr_frame *f)
{
	last_c = cmos_read(RTC_REG_C);
	sec_at_irq = from_bcd(cmos_read(RTC_SECONDS));
	last_vec = f->vector;
	irqs++;
	lapic_write(LAPIC_EOI, 0);
}

static int wait_irqs(uint64_t n)
{
	uint64_t i;

	for (i = 0; i < 2000000000ull && irqs < n; i++)
		sti_hlt();
	cli();
	return irqs >= n;
}

void guest_main(void)
{
	uint8_t s0, s1, hours, minutes, alarm, b;
	int uip = 0;

	GUEST_SYNC(1, cmos_read(RTC_REG_A), cmos_read(RTC_REG_B), cmos_read(RTC_REG_D),
		   cmos_read(RTC_CENTURY), cmos_read(RTC_YEAR), cmos_read(RTC_MONTH),
		   cmos_read(RTC_DAY_OF_MONTH));

	/* one update: UIP rises and falls, the seconds move on */
	while (!(cmos_read(RTC_REG_A) & RTC_A_UIP))
		;
	uip = 1;
	while (cmos_read(RTC_REG_A) & RTC_A_UIP)
		;
	s0 = cmos_read(RTC_SECONDS);
	hours = cmos_read(RTC_HOURS);
	minutes = cmos_read(RTC_MINUTES);
	rtc_wait_update();
	s1 = cmos_read(RTC_SECONDS);
	GUEST_SYNC(2, hours, minutes, s0, s1, uip);

	/* alarm two seconds after the next update, any minute and hour: timed from an update
	 * seen here, not from s1 (the host's handling of the sync above, however long a loaded
	 * host takes, would count against the two seconds, and a missed alarm comes a minute
	 * later) */
	pykvm_set_handler(VEC, isr);
	pc_interrupts_via_ioapic();
	ioapic_route(8, VEC, 0);
	rtc_wait_update();
	alarm = to_bcd((from_bcd(cmos_read(RTC_SECONDS)) + 2) % 60);
	cmos_write(RTC_SECONDS_ALARM, alarm);
	cmos_write(RTC_MINUTES_ALARM, 0xc0);
	cmos_write(RTC_HOURS_ALARM, 0xc0);
	cmos_read(RTC_REG_C);
	cmos_write(RTC_REG_B, cmos_read(RTC_REG_B) | RTC_B_AIE);
	GUEST_ASSERT(wait_irqs(1));
	cmos_write(RTC_REG_B, cmos_read(RTC_REG_B) & ~RTC_B_AIE);
	GUEST_SYNC(3, from_bcd(alarm), sec_at_irq, last_c, irqs, last_vec);

	/* update-ended interrupts: two of them */
	irqs = 0;
	cmos_read(RTC_REG_C);
	cmos_write(RTC_REG_B, cmos_read(RTC_REG_B) | RTC_B_UIE);
	GUEST_ASSERT(wait_irqs(2));
	cmos_write(RTC_REG_B, cmos_read(RTC_REG_B) & ~RTC_B_UIE);
	GUEST_SYNC(4, irqs, last_c);

	/* SET: stop the clock, write a time in binary 12-hour mode, start it again */
	b = cmos_read(RTC_REG_B);
	cmos_write(RTC_REG_B, (b | RTC_B_SET | RTC_B_DM) & ~RTC_B_24H);
	cmos_write(RTC_HOURS, 0x80 | 12);	/* 12 PM = 12:xx in 24-hour time */
	cmos_write(RTC_MINUTES, 34);
	cmos_write(RTC_SECONDS, 56);
	cmos_write(RTC_DAY_OF_MONTH, 3);	/* 2001-02-03 */
	cmos_write(RTC_MONTH, 2);
	cmos_write(RTC_YEAR, 1);
	cmos_write(RTC_REG_B, (b | RTC_B_DM) & ~(RTC_B_24H | RTC_B_SET));
	{
		uint8_t h12 = cmos_read(RTC_HOURS);

		cmos_write(RTC_REG_B, b);	/* BCD, 24-hour: the same time, read differently */
		cmos_write(0x40, 0xa5);
		GUEST_SYNC(5, cmos_read(RTC_REG_B), h12, cmos_read(RTC_HOURS),
			   cmos_read(RTC_MINUTES), cmos_read(RTC_SECONDS), cmos_read(0x40));
	}
}
