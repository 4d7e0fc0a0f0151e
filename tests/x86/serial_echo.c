/*
 * serial_echo: an interrupt-driven console on COM1, as a driver uses the 16550's receiver.
 *
 * Routes IRQ 4 through the IOAPIC (pc machine), sets FCR from params[0] (0: FIFOs off; else
 * the value, e.g. 0xc7 for FIFOs on with a trigger level of 14), turns on the received-data
 * interrupt (IER.ERBFI) and OUT2, then halts with interrupts on. Its interrupt handler reads
 * RBR while LSR.DR is set and echoes each byte: a-z in upper case, other control bytes but
 * CR, LF and TAB as ^X, everything else as it is. Byte 0x04 (Ctrl-D) ends the echo.
 *
 * prints "serial_echo: ready" (CR LF) on COM1, then
 * SYNC(1, &irqs, &idle_at)                               ready: input may come. The host
 *      reads the two counters from guest memory: idle_at == irqs says the last interrupt's
 *      handler has returned and the guest is in (or about to enter) its HLT with interrupts
 *      off until then, so input sent from now on is taken by a new interrupt
 * SYNC(2, bytes received before Ctrl-D, their sum, LSR.OE seen, interrupts, bytes after the
 *      first RBR read of an interrupt (more than one: the FIFO or the host ring refilled it))
 * then DONE
 */
#include "pc.h"

#define COM1 0x3f8
#define VEC 0x44
#define EOT 0x04

static volatile uint64_t received, sum, overruns, irqs, batched;
static volatile uint64_t idle_at;	/* irqs when the idle loop last went to sleep */
static volatile int ended;

static void put(uint8_t c)
{
	outb(COM1, c);			/* the transmitter is always empty here */
}

static void puts_com1(const char *s)
{
	while (*s)
		put((uint8_t)*s++);
}

static void echo(uint8_t c)
{
	if (c >= 'a' && c <= 'z') {
		put((uint8_t)(c - 'a' + 'A'));
	} else if (c < 0x20 && c != '\r' && c != '\n' && c != '\t') {
		put('^');
		put((uint8_t)(c + 0x40));
	} else {
		put(c);
	}
}

static void isr(struct pykvm_intr_frame *f)
{
	uint8_t lsr;
	uint64_t n = 0;

	(void)f;
	irqs++;
	while ((lsr = inb(COM1 + 5)) & 0x01) {
		uint8_t c = inb(COM1);

		if (lsr & 0x02)
			overruns++;
		if (n++)
			batched++;
		if (ended)
			continue;
		if (c == EOT) {
			ended = 1;
			continue;
		}
		received++;
		sum += c;
		echo(c);
	}
	lapic_write(LAPIC_EOI, 0);
}

void guest_main(void)
{
	pykvm_set_handler(VEC, isr);
	pc_interrupts_via_ioapic();
	ioapic_route(4, VEC, 0);
	outb(COM1 + 3, 0x03);			/* 8N1 */
	outb(COM1 + 2, (uint8_t)pykvm_params[0]);
	outb(COM1 + 4, 0x0b);			/* DTR, RTS, OUT2 */
	outb(COM1 + 1, 0x01);			/* IER: received data */
	puts_com1("serial_echo: ready\r\n");
	GUEST_SYNC(1, (uint64_t)&irqs, (uint64_t)&idle_at);
	while (!ended) {
		cli();
		if (!ended) {
			idle_at = irqs;
			sti_hlt();		/* sti's shadow: no interrupt slips in before hlt */
		}
	}
	cli();
	outb(COM1 + 1, 0x00);
	GUEST_SYNC(2, received, sum, overruns, irqs, batched);
}
