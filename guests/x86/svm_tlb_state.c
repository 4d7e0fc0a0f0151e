/*
 * svm_tlb_state: two L2 guests with different ASIDs and pages behind the
 * same address; L2 A stops at a port write the host sees, so the host can
 * save the nested state there and restore it into a fresh VM.  Afterwards
 * each L2 must still read its own page, and a TLB_CONTROL flush of A's ASID
 * must still make A see a remap.
 *
 * A (ASID 1) and B (ASID 2) each map window page 0 (non-global) to a page
 * of their own.
 *
 * params[0] = port L1 does not intercept (0: 0x5000)
 *
 * SYNC(1, vmcb A pa, hsave pa, A seen, B seen)      A and B ran once
 *   A runs again: reads the window, OUTB 1 to the port (an I/O exit to the
 *   host in guest mode), reads the window again, VMMCALL
 * SYNC(2, A ASID, A seen before the OUT, A seen after it, A's tag)
 * SYNC(3, B seen, B's tag)                           B ran
 * SYNC(4, A seen, A's new tag)   A remapped to its other page, TLB_CONTROL 3
 * SYNC(5, A seen, A's new tag)   and back, TLB_CONTROL 7
 * SYNC(6, B seen, B's tag)
 * then DONE.  Tags: L2 x (0 = A, 1 = B) page i holds 0x57a70000 + x * 16 + i.
 */
#include "svm/svm.c"

#define TAG(x, i) (0x57a70000ull + (x) * 16 + (i))

static struct svm_l2 l2s[2];

static void run(struct svm_l2 *g, uint8_t tlb_ctl)
{
	uint64_t code;

	g->vmcb.control.tlb_ctl = tlb_ctl;
	code = svm_run_gprs(&g->vmcb, &g->gprs);
	g->vmcb.control.tlb_ctl = SVM_TLB_DO_NOTHING;
	SVM_ASSERT_EXIT(&g->vmcb, code, SVM_EXIT_VMMCALL);
	svm_skip(&g->vmcb, SVM_VMMCALL_LEN);
}

void guest_main(void)
{
	uint64_t port = pykvm_params[0] ? pykvm_params[0] : 0x5000;
	struct svm_l2 *a = &l2s[0], *b = &l2s[1];
	unsigned int x;

	GUEST_ASSERT(cpuid(0x8000000a).edx & CPUID_8000000A_EDX_FLUSHBYASID);
	svm_init();
	for (x = 0; x < 2; x++) {
		struct svm_l2 *g = &l2s[x];

		g->page[0][0] = TAG(x, 0);
		g->page[1][0] = TAG(x, 1);
		svm_l2_space_init(&g->space);
		svm_l2_map(&g->space, 0, g->page[0], 0);
		svm_vmcb_init(&g->vmcb, svm_l2_load2, g->stack + sizeof(g->stack) - 8);
		g->vmcb.save.cr3 = (uint64_t)(uintptr_t)g->space.pml4;
		g->vmcb.control.asid = x + 1;
		g->gprs.rdi = svm_l2_va(0);
		g->gprs.rsi = svm_l2_va(0);
		g->gprs.r8 = port;
	}
	run(a, SVM_TLB_DO_NOTHING);
	run(b, SVM_TLB_DO_NOTHING);
	GUEST_SYNC(1, (uint64_t)(uintptr_t)&a->vmcb, rdmsr(MSR_VM_HSAVE_PA), a->gprs.rbx,
		   b->gprs.rbx);

	a->vmcb.save.rip = (uint64_t)(uintptr_t)svm_l2_load_out_load;
	run(a, SVM_TLB_DO_NOTHING);
	GUEST_SYNC(2, a->vmcb.control.asid, a->gprs.rbx, a->gprs.rcx, TAG(0, 0));

	a->vmcb.save.rip = (uint64_t)(uintptr_t)svm_l2_load2;
	run(b, SVM_TLB_DO_NOTHING);
	GUEST_SYNC(3, b->gprs.rbx, TAG(1, 0));

	svm_l2_map(&a->space, 0, a->page[1], 0);
	run(a, SVM_TLB_FLUSH_ASID);
	GUEST_SYNC(4, a->gprs.rbx, TAG(0, 1));

	svm_l2_map(&a->space, 0, a->page[0], 0);
	run(a, SVM_TLB_FLUSH_ASID_LOCAL);
	GUEST_SYNC(5, a->gprs.rbx, TAG(0, 0));

	run(b, SVM_TLB_DO_NOTHING);
	GUEST_SYNC(6, b->gprs.rbx, TAG(1, 0));
}
