/*
 * Guest of test_sel_userspace_io.py (port of x86_64/userspace_io_test.c):
 * "rep insb" from port 0x80 with counts 2 and 3, which the host rewrites to
 * 1 and 8192 on the I/O exit, then 8192 with the count untouched; each time
 * the count must end at 0 and RDI at the end KVM's count implies; the last
 * buffer must be all 0xaa (what the host answered).
 */
#include "pykvm_guest.h"

static uint8_t buffer[8192];

static void guest_ins_port80(uint8_t *buf, unsigned int count)
{
	unsigned long end;

	if (count == 2)
		end = (unsigned long)buf + 1;
	else
		end = (unsigned long)buf + 8192;

	__asm__ volatile("cld; rep; insb" : "+D"(buf), "+c"(count) : "d"(0x80) : "memory");
	GUEST_ASSERT_EQ(count, 0);
	GUEST_ASSERT_EQ((unsigned long)buf, end);
}

void guest_main(void)
{
	unsigned int i;

	guest_ins_port80(buffer, 2);
	guest_ins_port80(buffer, 3);

	for (i = 0; i < sizeof(buffer); i++)
		buffer[i] = 0;
	guest_ins_port80(buffer, 8192);
	for (i = 0; i < sizeof(buffer); i++)
		GUEST_ASSERT_EQ(buffer[i], 0xaa);

	GUEST_DONE();
}
