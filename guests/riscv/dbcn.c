/*
 * Exercises the SBI debug console: one DBCN write of a known string, then the
 * same bytes through write_byte, then a zero-length read.
 * SYNC(1, bytes written by the write call, its error code).
 */
#include "pykvm_guest.h"
#include "riscv.h"

static const char msg[] = "pykvm dbcn write\n";
static const char byte_msg[] = "pykvm dbcn byte\n";

void guest_main(unsigned long hartid, void *dtb)
{
	struct sbiret r;
	const char *p;
	char in[8];

	(void)hartid;
	(void)dtb;
	r = sbi_ecall(SBI_EXT_DBCN, SBI_DBCN_WRITE, sizeof(msg) - 1,
		      (unsigned long)msg, 0, 0, 0, 0);
	GUEST_ASSERT_EQ(r.error, 0);
	GUEST_ASSERT_EQ(r.value, sizeof(msg) - 1);
	GUEST_SYNC(1, (uint64_t)r.value, (uint64_t)r.error);

	for (p = byte_msg; *p; p++) {
		r = sbi_ecall(SBI_EXT_DBCN, SBI_DBCN_WRITE_BYTE, (unsigned char)*p,
			      0, 0, 0, 0, 0);
		GUEST_ASSERT_EQ(r.error, 0);
	}

	r = sbi_ecall(SBI_EXT_DBCN, SBI_DBCN_READ, sizeof(in),
		      (unsigned long)in, 0, 0, 0, 0);
	GUEST_SYNC(2, (uint64_t)r.error, (uint64_t)r.value);
	GUEST_DONE();
}
