/*
 * hello16: a real-mode flat binary (linked for 0x8000, entered at
 * 0000:8000).  Greets on COM1, then sends one PRINT report (through the
 * 32-bit report port, with a linear address) and DONE.
 */
#include "pykvm_guest.h"

void guest_main16(void)
{
	uint16_t msw;

	__asm__ volatile("smsw %0" : "=r"(msw));
	com1_puts("Hello from pykvm guest! (16-bit real mode)\n");
	com1_puts((msw & 1) ? "mode: protected\n" : "mode: real (16-bit)\n");
	GUEST_PRINTF("hello16: cr0=0x%x at %p\n", msw, (void *)guest_main16);
}
