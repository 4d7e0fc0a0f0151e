/* gdb_target: the gdb stub's test guest: gdb_tick() five times, its findings, then DONE.
 * It prints what a debugger may have changed, then reports DONE.
 *
 * gdb_tick() adds its argument to the global gdb_counter; the loop's total is printed as
 * "counter: N" (15 untouched). gdb_buffer holds "unchanged" unless a debugger writes it
 * ("buffer: ..."). gdb_value (7) is printed as "value: N". With pykvm_params[0] nonzero (pykvm
 * run --param 1) the guest first spins until a debugger sets gdb_hold to 0 (for Ctrl-C tests);
 * with pykvm_params[1] nonzero it then executes an int3 of its own (a debugger must leave it to
 * the guest: with the runtime's IDT that is a #BP report, or what KVM makes of it).
 * The names are global so that gdb finds them by name in the ELF's symbols and DWARF. */
#include "pykvm_guest.h"

volatile unsigned int gdb_counter;
volatile unsigned int gdb_value = 7;
volatile unsigned long gdb_hold;
volatile unsigned long gdb_spins;
char gdb_buffer[16] = "unchanged";

__attribute__((noinline)) void gdb_tick(unsigned int n)
{
	gdb_counter += n;
}

__attribute__((noinline)) void gdb_spin(void)
{
	while (gdb_hold)
		gdb_spins++;
}

void guest_main(void)
{
	unsigned int i;

	gdb_hold = pykvm_params[0];
	gdb_spin();
	if (pykvm_params[1])
		__asm__ volatile("int3");
	for (i = 1; i <= 5; i++)
		gdb_tick(i);
	gdb_buffer[sizeof(gdb_buffer) - 1] = '\0';
	GUEST_PRINTF("counter: %u\n", gdb_counter);
	GUEST_PRINTF("value: %u\n", gdb_value);
	GUEST_PRINTF("buffer: %s\n", gdb_buffer);
	GUEST_DONE();
}
