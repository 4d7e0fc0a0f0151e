/* A failing GUEST_ASSERT_EQ: the host must report expression, file, line
 * and both values (42 and 43). */
#include "pykvm_guest.h"
#include "riscv.h"

static volatile uint64_t answer = 42;

void guest_main(unsigned long hartid, void *dtb)
{
	(void)hartid;
	(void)dtb;
	GUEST_ASSERT_EQ(answer, 43);
	GUEST_DONE();
}
