/*
 * SBI system suspend round trip.
 *
 * Stage 1 reports SYNC(1, hartid, resume address, opaque, a0) and suspends to
 * RAM with resume_addr = pykvm_resume_entry; a0 (the sleep type) is
 * pykvm_params[0], 0 unless the host sets it (sleep_type is a 32-bit SBI
 * argument: e.g. 0xffffffff00000000 must act as suspend-to-RAM).  KVM resets the hart on the next run
 * (pc = resume address, a0 = hart id, a1 = opaque, other GPRs zero), so the
 * state we want afterwards lives in RAM (.data).  guest_resume reports
 * SYNC(2, hartid, opaque, saved marker, suspend count), then DONE.
 */
#include "pykvm_guest.h"
#include "riscv.h"

#define SUSPEND_OPAQUE 0x1234abcd5678ef90UL
#define MARKER         0x5afe5afe0000c0deUL

/* In .data (initialised), not .bss: survives the reset, never re-cleared. */
static volatile uint64_t saved_marker = 1;
static volatile uint64_t suspend_count = 1;

void guest_main(unsigned long hartid, void *dtb)
{
	unsigned long sleep_type = (unsigned long)pykvm_params[0];
	struct sbiret r;

	(void)dtb;
	saved_marker = MARKER;
	suspend_count = 0;
	GUEST_SYNC(1, hartid, (uint64_t)(uintptr_t)pykvm_resume_entry, SUSPEND_OPAQUE,
		   sleep_type);
	suspend_count++;
	r = sbi_ecall(SBI_EXT_SUSP, SBI_SUSP_SYSTEM_SUSPEND, sleep_type,
		      (unsigned long)pykvm_resume_entry, SUSPEND_OPAQUE, 0, 0, 0);
	/* Only reached when the suspend was refused. */
	GUEST_ASSERT_MSG(0, "system_suspend returned error %ld value %ld",
			 r.error, r.value);
}

void guest_resume(unsigned long hartid, unsigned long opaque)
{
	GUEST_SYNC(2, hartid, opaque, saved_marker, suspend_count);
	GUEST_ASSERT_EQ(opaque, SUSPEND_OPAQUE);
	GUEST_ASSERT_EQ(saved_marker, MARKER);
	GUEST_DONE();
}
