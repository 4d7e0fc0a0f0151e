/*
 * Guest-side SVM helpers (see svm.h).  A guest includes this file once:
 *
 *	#include "svm/svm.c"
 */
#include "svm.h"

static struct vmcb svm_vmcb_page;
static uint8_t svm_hsave[4096] __attribute__((aligned(4096)));
static uint8_t svm_iopm[SVM_IOPM_SIZE] __attribute__((aligned(4096)));
static uint8_t svm_msrpm[SVM_MSRPM_SIZE] __attribute__((aligned(4096)));
struct svm_gprs svm_l2_gprs;

/* uint64_t __svm_vmrun(uint64_t vmcb_pa, struct svm_gprs *l2)
 *
 * VMRUN saves and restores only RAX, RSP, RIP, RFLAGS and the segment and
 * control state of the host; every other GPR comes back holding L2's value.
 * So: keep L1's callee-saved registers and the L2 register block pointer on
 * L1's stack, swap L2's GPRs in around VMRUN, and store them back after the
 * #VMEXIT.  GIF is cleared around the switch (CLGI ... STGI). */
__asm__(
	"	.text\n"
	"	.globl __svm_vmrun\n"
	"	.type __svm_vmrun, @function\n"
	"__svm_vmrun:\n"
	"	push %rbp\n"
	"	push %rbx\n"
	"	push %r12\n"
	"	push %r13\n"
	"	push %r14\n"
	"	push %r15\n"
	"	push %rsi\n"
	"	clgi\n"
	"	mov %rdi, %rax\n"
	"	mov 0x00(%rsi), %rbx\n"
	"	mov 0x08(%rsi), %rcx\n"
	"	mov 0x10(%rsi), %rdx\n"
	"	mov 0x20(%rsi), %rdi\n"
	"	mov 0x28(%rsi), %rbp\n"
	"	mov 0x30(%rsi), %r8\n"
	"	mov 0x38(%rsi), %r9\n"
	"	mov 0x40(%rsi), %r10\n"
	"	mov 0x48(%rsi), %r11\n"
	"	mov 0x50(%rsi), %r12\n"
	"	mov 0x58(%rsi), %r13\n"
	"	mov 0x60(%rsi), %r14\n"
	"	mov 0x68(%rsi), %r15\n"
	"	mov 0x18(%rsi), %rsi\n"
	"	vmrun %rax\n"
	"	xchg %rsi, (%rsp)\n"
	"	mov %rbx, 0x00(%rsi)\n"
	"	mov %rcx, 0x08(%rsi)\n"
	"	mov %rdx, 0x10(%rsi)\n"
	"	mov %rdi, 0x20(%rsi)\n"
	"	mov %rbp, 0x28(%rsi)\n"
	"	mov %r8, 0x30(%rsi)\n"
	"	mov %r9, 0x38(%rsi)\n"
	"	mov %r10, 0x40(%rsi)\n"
	"	mov %r11, 0x48(%rsi)\n"
	"	mov %r12, 0x50(%rsi)\n"
	"	mov %r13, 0x58(%rsi)\n"
	"	mov %r14, 0x60(%rsi)\n"
	"	mov %r15, 0x68(%rsi)\n"
	"	pop %rax\n"
	"	mov %rax, 0x18(%rsi)\n"
	"	stgi\n"
	"	pop %r15\n"
	"	pop %r14\n"
	"	pop %r13\n"
	"	pop %r12\n"
	"	pop %rbx\n"
	"	pop %rbp\n"
	"	ret\n"
	"	.size __svm_vmrun, . - __svm_vmrun\n");

void __svm_vmrun(uint64_t vmcb_pa, struct svm_gprs *l2);

_Static_assert(offsetof(struct svm_gprs, rsi) == 0x18, "svm_gprs layout");
_Static_assert(offsetof(struct svm_gprs, r15) == 0x68, "svm_gprs layout");

struct svm_dtr {
	uint16_t limit;
	uint64_t base;
} __attribute__((packed));

int svm_supported(void)
{
	return !!(cpuid(0x80000001).ecx & CPUID_80000001_ECX_SVM);
}

void svm_enable(void *hsave)
{
	GUEST_ASSERT(svm_supported());
	wrmsr(MSR_EFER, rdmsr(MSR_EFER) | EFER_SVME);
	wrmsr(MSR_VM_HSAVE_PA, (uint64_t)(uintptr_t)hsave);
}

void svm_init(void)
{
	svm_enable(svm_hsave);
}

/* The VMCB form of the GDT descriptor behind `sel` in L1's GDT. */
static void svm_seg_from_gdt(struct vmcb_seg *seg, uint16_t sel, uint64_t gdt_base)
{
	uint64_t d;
	uint32_t limit;

	seg->selector = sel;
	if (!(sel & ~3u)) {		/* null selector: unusable */
		seg->attrib = 0;
		seg->limit = 0;
		seg->base = 0;
		return;
	}
	d = *(volatile uint64_t *)(uintptr_t)(gdt_base + (sel & ~7u));
	seg->attrib = (uint16_t)(((d >> 40) & 0xff) | (((d >> 52) & 0xf) << 8));
	limit = (uint32_t)((d & 0xffff) | ((d >> 32) & 0xf0000));
	if (d & (1ull << 55))		/* G: 4 KiB granularity */
		limit = (limit << 12) | 0xfff;
	seg->limit = limit;
	seg->base = ((d >> 16) & 0xffffff) | (((d >> 56) & 0xff) << 24);
}

struct vmcb *svm_vmcb_setup(void (*rip)(void), void *rsp)
{
	svm_vmcb_init(&svm_vmcb_page, rip, rsp);
	return &svm_vmcb_page;
}

void svm_vmcb_init(struct vmcb *v, void (*rip)(void), void *rsp)
{
	struct vmcb_control *c = &v->control;
	struct vmcb_save *s = &v->save;
	struct svm_dtr gdtr, idtr;
	uint16_t cs, ds, es, ss;
	unsigned long cr0, cr3, cr4;
	uint8_t *p = (uint8_t *)v;
	unsigned int i;

	for (i = 0; i < sizeof(*v); i++)
		p[i] = 0;

	c->intercept_word3 = SVM_INTERCEPT_HLT | SVM_INTERCEPT_IOIO_PROT | SVM_INTERCEPT_SHUTDOWN;
	c->intercept_word4 = SVM_INTERCEPT_VMRUN | SVM_INTERCEPT_VMMCALL;
	c->iopm_base_pa = (uint64_t)(uintptr_t)svm_iopm;
	c->msrpm_base_pa = (uint64_t)(uintptr_t)svm_msrpm;
	c->asid = 1;
	c->tlb_ctl = SVM_TLB_DO_NOTHING;

	__asm__ volatile("sgdt %0" : "=m"(gdtr));
	__asm__ volatile("sidt %0" : "=m"(idtr));
	__asm__ volatile("mov %%cs, %0" : "=r"(cs));
	__asm__ volatile("mov %%ds, %0" : "=r"(ds));
	__asm__ volatile("mov %%es, %0" : "=r"(es));
	__asm__ volatile("mov %%ss, %0" : "=r"(ss));
	__asm__ volatile("mov %%cr0, %0" : "=r"(cr0));
	__asm__ volatile("mov %%cr3, %0" : "=r"(cr3));
	__asm__ volatile("mov %%cr4, %0" : "=r"(cr4));

	svm_seg_from_gdt(&s->cs, cs, gdtr.base);
	svm_seg_from_gdt(&s->ds, ds, gdtr.base);
	svm_seg_from_gdt(&s->es, es, gdtr.base);
	svm_seg_from_gdt(&s->ss, ss, gdtr.base);
	s->gdtr.base = gdtr.base;
	s->gdtr.limit = gdtr.limit;
	s->idtr.base = idtr.base;
	s->idtr.limit = idtr.limit;
	s->cpl = 0;
	s->efer = rdmsr(MSR_EFER);	/* includes SVME, which VMRUN requires */
	s->cr0 = cr0;
	s->cr3 = cr3;
	s->cr4 = cr4;
	s->dr6 = 0xffff0ff0;
	s->dr7 = 0x400;
	s->rflags = 2;
	s->rip = (uint64_t)(uintptr_t)rip;
	s->rsp = (uint64_t)(uintptr_t)rsp;
	s->g_pat = rdmsr(0x277);
}

void svm_intercept_port(uint16_t port)
{
	svm_iopm[port >> 3] |= (uint8_t)(1u << (port & 7));
}

uint64_t svm_run_gprs(struct vmcb *vmcb, struct svm_gprs *gprs)
{
	vmcb->control.clean = 0;	/* L1 may have changed anything */
	__svm_vmrun((uint64_t)(uintptr_t)vmcb, gprs);
	return vmcb->control.exit_code;
}

uint64_t svm_run(struct vmcb *vmcb)
{
	return svm_run_gprs(vmcb, &svm_l2_gprs);
}

void svm_skip(struct vmcb *vmcb, unsigned int len)
{
	vmcb->save.rip += len;
}

const char *svm_exit_name(uint64_t code)
{
	switch (code) {
	case SVM_EXIT_CPUID: return "CPUID";
	case SVM_EXIT_HLT: return "HLT";
	case SVM_EXIT_INVLPGA: return "INVLPGA";
	case SVM_EXIT_IOIO: return "IOIO";
	case SVM_EXIT_MSR: return "MSR";
	case SVM_EXIT_SHUTDOWN: return "SHUTDOWN";
	case SVM_EXIT_VMRUN: return "VMRUN";
	case SVM_EXIT_VMMCALL: return "VMMCALL";
	case SVM_EXIT_NPF: return "NPF";
	case SVM_EXIT_INVALID: return "INVALID";
	}
	if (code < 0x20)
		return code < 0x10 ? "CR_READ" : "CR_WRITE";
	if (code >= 0x40 && code < 0x60)
		return "EXCP";
	return "?";
}

/* -- L2 address spaces ------------------------------------------------------ */

#define SVM_PTE_ADDR	0x000ffffffffff000ull

void svm_l2_space_init(struct svm_l2_space *s)
{
	uint64_t *l1_pml4 = (uint64_t *)(uintptr_t)(read_cr3() & SVM_PTE_ADDR);
	unsigned int i;

	for (i = 0; i < 512; i++) {
		s->pml4[i] = 0;
		s->pdpt[i] = 0;
		s->pd[i] = 0;
		s->pt[i] = 0;
	}
	s->pml4[0] = l1_pml4[0];
	s->pml4[1] = (uint64_t)(uintptr_t)s->pdpt | SVM_PTE_P | SVM_PTE_W;
	s->pdpt[0] = (uint64_t)(uintptr_t)s->pd | SVM_PTE_P | SVM_PTE_W;
	s->pd[0] = (uint64_t)(uintptr_t)s->pt | SVM_PTE_P | SVM_PTE_W;
}

void svm_l2_map(struct svm_l2_space *s, unsigned int slot, const volatile void *page,
		int global)
{
	GUEST_ASSERT(slot < SVM_L2_WINDOW_PAGES);
	GUEST_ASSERT(((uintptr_t)page & 0xfff) == 0);
	*(volatile uint64_t *)&s->pt[slot] = (uint64_t)(uintptr_t)page | SVM_PTE_P | SVM_PTE_W |
					      (global ? SVM_PTE_G : 0);
}

/* L2 code for the TLB tests (svm.h).  Each loop starts over after the
 * VMMCALL: L1 steps L2's RIP past it. */
__asm__(
	"	.text\n"
	"	.globl svm_l2_load2\n"
	"	.type svm_l2_load2, @function\n"
	"svm_l2_load2:\n"
	"	mov (%rdi), %rbx\n"
	"	mov (%rsi), %rcx\n"
	"	vmmcall\n"
	"	jmp svm_l2_load2\n"
	"	.size svm_l2_load2, . - svm_l2_load2\n"
	"\n"
	"	.globl svm_l2_invlpga_load2\n"
	"	.type svm_l2_invlpga_load2, @function\n"
	"svm_l2_invlpga_load2:\n"
	"	test %r9, %r9\n"
	"	jz 1f\n"
	"	mov %rdi, %rax\n"
	"	mov %r8d, %ecx\n"
	"	invlpga %rax, %ecx\n"
	"1:	mov (%rdi), %rbx\n"
	"	mov (%rsi), %rcx\n"
	"	vmmcall\n"
	"	jmp svm_l2_invlpga_load2\n"
	"	.size svm_l2_invlpga_load2, . - svm_l2_invlpga_load2\n"
	"\n"
	"	.globl svm_l2_load_out_load\n"
	"	.type svm_l2_load_out_load, @function\n"
	"svm_l2_load_out_load:\n"
	"	mov (%rdi), %rbx\n"
	"	mov %r8d, %edx\n"
	"	mov $1, %eax\n"
	"	outb %al, %dx\n"
	"	mov (%rdi), %rcx\n"
	"	vmmcall\n"
	"	jmp svm_l2_load_out_load\n"
	"	.size svm_l2_load_out_load, . - svm_l2_load_out_load\n");
