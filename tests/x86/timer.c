/*
 * timer: counts PIT interrupts through the (in-kernel) 8259 PIC.
 *
 * Programs the master/slave 8259 (vector bases 0x20/0x28, only IRQ0
 * unmasked) and PIT channel 0 as a ~1000 Hz rate generator, then halts
 * with interrupts enabled until N ticks arrived.
 *
 * params[0] = N ticks (0: 10)
 * SYNC(1, ticks, tsc cycles elapsed)
 */
#include "pykvm_guest.h"

#define PIC1_CMD 0x20
#define PIC1_DATA 0x21
#define PIC2_CMD 0xa0
#define PIC2_DATA 0xa1
#define PIC_EOI 0x20
#define PIT_CH0 0x40
#define PIT_MODE 0x43
#define PIT_HZ 1193182
#define TICK_HZ 1000
#define TIMER_VECTOR 0x20

static volatile uint64_t ticks;

static void on_timer(struct pykvm_intr_frame *f)
{
	(void)f;
	ticks++;
	outb(PIC1_CMD, PIC_EOI);
}

static uint64_t rdtsc(void)
{
	uint32_t lo, hi;

	__asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
	return ((uint64_t)hi << 32) | lo;
}

static void pic_init(void)
{
	outb(PIC1_CMD, 0x11);		/* ICW1: edge, cascade, ICW4 needed */
	outb(PIC2_CMD, 0x11);
	outb(PIC1_DATA, TIMER_VECTOR);	/* ICW2: vector base */
	outb(PIC2_DATA, TIMER_VECTOR + 8);
	outb(PIC1_DATA, 0x04);		/* ICW3: slave on IRQ2 */
	outb(PIC2_DATA, 0x02);		/* ICW3: slave id */
	outb(PIC1_DATA, 0x01);		/* ICW4: 8086 mode */
	outb(PIC2_DATA, 0x01);
	outb(PIC1_DATA, 0xfe);		/* OCW1: only IRQ0 */
	outb(PIC2_DATA, 0xff);
}

static void pit_init(void)
{
	uint16_t div = PIT_HZ / TICK_HZ;

	outb(PIT_MODE, 0x34);		/* channel 0, lo/hi byte, mode 2, binary */
	outb(PIT_CH0, (uint8_t)div);
	outb(PIT_CH0, (uint8_t)(div >> 8));
}

void guest_main(void)
{
	uint64_t n = pykvm_params[0] ? pykvm_params[0] : 10;
	uint64_t t0, t1;

	pykvm_set_handler(TIMER_VECTOR, on_timer);
	pic_init();
	pit_init();
	t0 = rdtsc();
	while (ticks < n) {
		sti_hlt();
		cli();
	}
	t1 = rdtsc();
	outb(PIC1_DATA, 0xff);		/* mask everything again */
	GUEST_SYNC(1, ticks, t1 - t0);
}
