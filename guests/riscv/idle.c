/* idle: waits until it is stopped (pykvm stop NAME, Ctrl-A x, --timeout) in WFI with
 * interrupts off, so that the control verbs have a running VM to act on.  Says so on the SBI
 * debug console first; never reports DONE. */
#include "pykvm_guest.h"
#include "riscv.h"

void guest_main(unsigned long hartid, void *dtb)
{
	(void)hartid;
	(void)dtb;
	sbi_console_puts("idle: waiting until stopped (pykvm stop NAME, Ctrl-A x or --timeout)\n");
	for (;;)
		__asm__ volatile("csrci sstatus, 2; wfi");
}
