/*
 * 64-bit runtime: the IDT and interrupt dispatch.
 *
 * The IDT does not depend on a particular GDT: the gates use whatever code
 * selector the VMM booted us with.  By default every vector reports an
 * EXCEPTION to the host and stops the vCPU; a guest may route a vector to
 * its own C handler with pykvm_set_handler().  A fault inside an asm_safe()
 * sequence is fixed up before any handler is looked at (pykvm_fixup).
 */
#include "pykvm_guest.h"

struct idt_gate {
	uint16_t offset_lo;
	uint16_t selector;
	uint8_t ist;
	uint8_t type_attr;
	uint16_t offset_mid;
	uint32_t offset_hi;
	uint32_t reserved;
} __attribute__((packed));

_Static_assert(sizeof(struct idt_gate) == 16, "IDT gate layout");

struct idt_ptr {
	uint16_t limit;
	uint64_t base;
} __attribute__((packed));

#define IDT_INTERRUPT_GATE 0x8e	/* present, DPL 0, 64-bit interrupt gate */
#define ISR_STUB_SIZE 16

extern char pykvm_isr_stubs[];

static struct idt_gate idt[256] __attribute__((aligned(16)));
static volatile pykvm_intr_handler_t handlers[256];

void pykvm_isr_dispatch(struct pykvm_intr_frame *f);

void pykvm_idt_install(void)
{
	struct idt_ptr p;
	uint16_t cs;
	unsigned int i;

	__asm__ volatile("mov %%cs, %0" : "=r"(cs));
	for (i = 0; i < 256; i++) {
		uint64_t a = (uint64_t)(uintptr_t)(pykvm_isr_stubs + i * ISR_STUB_SIZE);

		idt[i].offset_lo = (uint16_t)a;
		idt[i].selector = cs;
		idt[i].ist = 0;
		idt[i].type_attr = IDT_INTERRUPT_GATE;
		idt[i].offset_mid = (uint16_t)(a >> 16);
		idt[i].offset_hi = (uint32_t)(a >> 32);
		idt[i].reserved = 0;
	}
	p.limit = sizeof(idt) - 1;
	p.base = (uint64_t)(uintptr_t)idt;
	__asm__ volatile("lidt %0" : : "m"(p) : "memory");
}

void pykvm_set_handler(unsigned int vector, pykvm_intr_handler_t fn)
{
	handlers[vector & 0xff] = fn;
}

extern const struct pykvm_extable_entry __pykvm_extable_start[];
extern const struct pykvm_extable_entry __pykvm_extable_end[];

/*
 * An exception inside an asm_safe() sequence: resume after the sequence with
 * the vector in R9 and the error code in R10 (pykvm_guest.h).  A fault leaves
 * RIP at the faulting instruction, inside [start, end); the trap-type vectors
 * (#DB, #BP, #OF) leave it after the instruction, which may be the end.
 */
static int pykvm_fixup(struct pykvm_intr_frame *f)
{
	const struct pykvm_extable_entry *e;
	uint64_t v = f->vector;
	int trap = v == 1 || v == 3 || v == 4;

	if (v >= 32)
		return 0;			/* interrupts are not the sequence's */
	for (e = __pykvm_extable_start; e < __pykvm_extable_end; e++) {
		if (f->rip >= e->start && (f->rip < e->end || (trap && f->rip == e->end))) {
			f->r9 = v;
			f->r10 = f->error_code;
			f->rip = e->end;
			return 1;
		}
	}
	return 0;
}

void pykvm_isr_dispatch(struct pykvm_intr_frame *f)
{
	pykvm_intr_handler_t h = handlers[f->vector & 0xff];
	uint64_t a[4];
	uint64_t cr2;

	if (pykvm_fixup(f))
		return;
	if (h) {
		h(f);
		return;
	}
	__asm__ volatile("mov %%cr2, %0" : "=r"(cr2));
	a[0] = f->vector;
	a[1] = f->error_code;
	a[2] = f->rip;
	a[3] = cr2;
	for (;;) {
		pykvm_report(PYKVM_CMD_EXCEPTION, 4, a);
		pykvm_arch_stop();
	}
}
