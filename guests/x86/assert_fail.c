/* assert_fail: a deliberately failing assertion for the framework's
 * self-test: ASSERT_FAILED with expression "1 + 1 == 3", flags 1,
 * values 2 and 3. */
#include "pykvm_guest.h"

void guest_main(void)
{
	GUEST_ASSERT_EQ(1 + 1, 3);
}
