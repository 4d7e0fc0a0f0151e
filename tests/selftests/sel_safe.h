/*
 * sel_safe.h: fault-tolerant MSR access for the selftest ports, built only on
 * pykvm_set_handler() (guests/include/pykvm_guest.h): a #GP or #UD raised by
 * the 2-byte RDMSR/WRMSR is recorded and the instruction skipped.  Returns
 * the vector (0 when none), as the kernel selftests' rdmsr_safe/wrmsr_safe.
 */
#ifndef SEL_SAFE_H
#define SEL_SAFE_H
#include "pykvm_guest.h"

#define GP_VECTOR 13
#define UD_VECTOR 6

static volatile uint8_t sel_vector;

static void sel_skip2(struct pykvm_intr_frame *f)
{
	sel_vector = (uint8_t)f->vector;
	f->rip += 2;			/* RDMSR 0f 32 / WRMSR 0f 30 */
}

static inline void sel_arm(pykvm_intr_handler_t fn)
{
	pykvm_set_handler(GP_VECTOR, fn);
	pykvm_set_handler(UD_VECTOR, fn);
}

static inline uint8_t sel_rdmsr_safe(uint32_t msr, uint64_t *val)
{
	uint32_t lo = 0, hi = 0;

	sel_vector = 0;
	sel_arm(sel_skip2);
	__asm__ volatile("rdmsr" : "+a"(lo), "+d"(hi) : "c"(msr) : "memory");
	sel_arm(0);
	*val = ((uint64_t)hi << 32) | lo;
	return sel_vector;
}

static inline uint8_t sel_wrmsr_safe(uint32_t msr, uint64_t v)
{
	sel_vector = 0;
	sel_arm(sel_skip2);
	__asm__ volatile("wrmsr" : : "c"(msr), "a"((uint32_t)v), "d"((uint32_t)(v >> 32))
			 : "memory");
	uint8_t vec = sel_vector;
	sel_arm(0);
	return vec;
}
#endif
