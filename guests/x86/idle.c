/* idle: waits until it is stopped, halted with interrupts off (`pykvm run idle --name NAME`),
 * so that the control verbs have a running VM to act on: pykvm stop NAME, Ctrl-A x or
 * --timeout end it.  Says so on COM1 first; never reports DONE.  A multiboot guest, so that
 * "auto" runs it on the pc machine, where a halt waits (on the bare machine a halt with
 * interrupts off ends the run at once). */
#include "pykvm_guest.h"

void guest_main32(uint32_t magic, void *info)
{
	(void)magic;
	(void)info;
	com1_puts("idle: halted until stopped (pykvm stop NAME, Ctrl-A x or --timeout)\n");
	for (;;)
		__asm__ volatile("cli; hlt");
}
