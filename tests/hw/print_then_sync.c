/* print_then_sync: one line of console output (a PRINT report, served on the stepping thread,
 * which calls the machine's on_console there), then GUEST_SYNC(1, 7) and GUEST_DONE: the guest
 * of tests/hw/test_hold_races.py's checkpoint taken from the stepping thread's own callback. */
#include "pykvm_guest.h"

void guest_main(void)
{
	GUEST_PRINTF("print_then_sync: hello\n");
	GUEST_SYNC(1, 7);
	GUEST_DONE();
}
