/*
 * Guest of test_sel_exit_on_emulation_failure.py (port of
 * x86_64/exit_on_emulation_failure_test.c): "flds (%rax)" (d9 00) with RAX an
 * MMIO address, which KVM must emulate and cannot; the host skips the
 * instruction; then DONE.
 */
#include "pykvm_guest.h"

#define MMIO_GPA 0xc0000000ul	/* identity-mapped, no RAM there */

void guest_main(void)
{
	__asm__ volatile(".byte 0xd9, 0x00" : : "a"(MMIO_GPA) : "memory");
	GUEST_DONE();
}
