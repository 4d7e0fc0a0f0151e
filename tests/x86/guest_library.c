/*
 * The guest library at selftest level (issue 21): exception fixups
 * (rdmsr_safe, wrmsr_safe, asm_safe), a test's own handler beside them,
 * globals the host reads and writes by name, a range the host mapped with
 * virt_map, and an unexpected #GP the host reports at this file's line.
 *
 * pykvm_params[0] picks the scenario:
 *   0  fixups and a handler: SYNC(1, rdmsr vec, value, wrmsr vec, ud2 vec,
 *      asm_safe wrmsr vec, asm_safe ud2 vec while a #UD handler is installed,
 *      the handler's count)
 *   1  globals: SYNC(2, counter) with counter = 41 at start, then the host
 *      writes counter = 1000 and big[] and the guest reports SYNC(3, counter,
 *      big[0], big[3])
 *   2  virt_map: SYNC(4) with the GPA of a page the host fills, then the
 *      guest reads 8 bytes at the virtual address in pykvm_params[1] and
 *      SYNC(5, value)
 *   3  an unexpected #GP (no fixup, no handler)
 */
#include "pykvm_guest.h"

#define NO_SUCH_MSR 0xdeadbeefu
#define MSR_IA32_TSC 0x10u

volatile uint64_t counter = 41;
volatile uint64_t big[4] = { 1, 2, 3, 4 };
static volatile uint64_t ud_seen;

/* #UD is a fault: RIP is the ud2's, so step past it (2 bytes) */
static void on_ud(struct pykvm_intr_frame *f)
{
	ud_seen++;
	f->rip += 2;
}

static void fixups(void)
{
	uint64_t v = 0x1234, ec = 99;
	uint8_t rd, wr, ud, ud_handled, gp, good;

	rd = rdmsr_safe(NO_SUCH_MSR, &v);
	wr = wrmsr_safe(NO_SUCH_MSR, 1);
	ud = asm_safe("ud2");
	/* a #GP's error code comes back too (0: not a segment's fault) */
	ec = 99;
	gp = asm_safe_ec("wrmsr", &ec, "c"(NO_SUCH_MSR), "a"(0), "d"(0));
	GUEST_ASSERT_EQ(ec, 0);
	pykvm_set_handler(6, on_ud);
	__asm__ volatile("ud2");		/* the test's handler counts it */
	ud_handled = asm_safe("ud2");	/* the fixup takes it first */
	__asm__ volatile("ud2");
	pykvm_set_handler(6, NULL);
	good = wrmsr_safe(MSR_IA32_TSC, rdmsr(MSR_IA32_TSC));
	GUEST_ASSERT_EQ(good, 0);	/* a write the MSR takes raises nothing */
	GUEST_SYNC(1, rd, v, wr, ud, gp, ud_handled, ud_seen);
}

static void globals(void)
{
	GUEST_SYNC(2, counter);
	GUEST_SYNC(3, counter, big[0], big[3]);
}

static void mapped(void)
{
	GUEST_SYNC(4);
	GUEST_SYNC(5, *(volatile uint64_t *)(uintptr_t)pykvm_params[1]);
}

static void __attribute__((noinline)) unexpected_gp(void)
{
	wrmsr(NO_SUCH_MSR, 0); /* MARKER: unexpected #GP */
}

void guest_main(void)
{
	switch (pykvm_params[0]) {
	case 0:
		fixups();
		break;
	case 1:
		globals();
		break;
	case 2:
		mapped();
		break;
	case 3:
		unexpected_gp();
		break;
	}
	GUEST_DONE();
}
