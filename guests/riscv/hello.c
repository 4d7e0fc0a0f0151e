/* Prints a line through the SBI debug console and reports DONE. */
#include "pykvm_guest.h"
#include "riscv.h"

void guest_main(unsigned long hartid, void *dtb)
{
	(void)hartid;
	(void)dtb;
	sbi_console_puts("Hello from a pykvm RISC-V guest\n");
	GUEST_DONE();
}
