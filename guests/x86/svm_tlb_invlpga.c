/*
 * svm_tlb_invlpga: INVLPGA for an L2 address and ASID invalidates that
 * translation, and the other ASID's translation of the same address stays
 * correct.
 *
 * Two L2 guests, A (ASID 1) and B (ASID 2), each in an address space of its
 * own, map window page 0 (non-global) to a page of their own.  Each round
 * L1 points one of them (the target, A and B in turn) at the other page of
 * its pair, keeps both ASIDs, invalidates the window address in the
 * target's ASID with INVLPGA and runs the target, then the other L2.
 *
 * params[0] = who runs INVLPGA and what intercepts it:
 *   0  L1 runs it; both VMCBs intercept INVLPGA (L2 never runs one)
 *   1  L1 runs it; neither VMCB intercepts INVLPGA
 *   2  the target L2 runs it, L1 intercepts it (#VMEXIT INVLPGA) and runs
 *      it for L2 with L2's RAX and ECX
 *   3  the target L2 runs it, L1 does not intercept it (L0 serves it)
 * params[1] = rounds (0: 4)
 *
 * SYNC(1, mode, A seen, B seen)                    first runs
 * SYNC(2, round << 8 | target ASID, target seen, target new, target old,
 *      other seen, other's tag, INVLPGA #VMEXITs L1 has taken so far)
 * then DONE.  Tags: L2 x (0 = A, 1 = B) page i holds 0xa5a50000 + x * 16 + i.
 */
#include "svm/svm.c"

#define TAG(x, i) (0xa5a50000ull + (x) * 16 + (i))

static struct svm_l2 l2s[2];

static uint64_t run(struct svm_l2 *g, uint64_t *invlpga_exits)
{
	uint64_t code;

	for (;;) {
		code = svm_run_gprs(&g->vmcb, &g->gprs);
		if (code != SVM_EXIT_INVLPGA)
			break;
		/* L1 intercepted L2's INVLPGA: do it for L2, step over it */
		invlpga(g->vmcb.save.rax, (uint32_t)g->gprs.rcx);
		svm_skip(&g->vmcb, SVM_INVLPGA_LEN);
		(*invlpga_exits)++;
	}
	SVM_ASSERT_EXIT(&g->vmcb, code, SVM_EXIT_VMMCALL);
	svm_skip(&g->vmcb, SVM_VMMCALL_LEN);
	return g->gprs.rbx;
}

void guest_main(void)
{
	uint64_t mode = pykvm_params[0];
	uint64_t rounds = pykvm_params[1] ? pykvm_params[1] : 4;
	uint64_t exits = 0, seen_a, seen_b, r;
	unsigned int x;

	GUEST_ASSERT(mode <= 3);
	svm_init();
	for (x = 0; x < 2; x++) {
		struct svm_l2 *g = &l2s[x];

		g->page[0][0] = TAG(x, 0);
		g->page[1][0] = TAG(x, 1);
		g->cur = 0;
		svm_l2_space_init(&g->space);
		svm_l2_map(&g->space, 0, g->page[0], 0);
		svm_vmcb_init(&g->vmcb, mode >= 2 ? svm_l2_invlpga_load2 : svm_l2_load2,
			      g->stack + sizeof(g->stack) - 8);
		g->vmcb.save.cr3 = (uint64_t)(uintptr_t)g->space.pml4;
		g->vmcb.control.asid = x + 1;
		if (mode == 0 || mode == 2)
			g->vmcb.control.intercept_word3 |= SVM_INTERCEPT_INVLPGA;
		g->gprs.rdi = svm_l2_va(0);
		g->gprs.rsi = svm_l2_va(0);
		g->gprs.r8 = x + 1;		/* the ASID an L2 INVLPGA names */
	}
	seen_a = run(&l2s[0], &exits);
	seen_b = run(&l2s[1], &exits);
	GUEST_SYNC(1, mode, seen_a, seen_b);

	for (r = 0; r < rounds; r++) {
		unsigned int t = r & 1;
		struct svm_l2 *tg = &l2s[t], *other = &l2s[t ^ 1];
		uint64_t seen_t, seen_o;
		unsigned int old = tg->cur;

		tg->cur ^= 1;
		svm_l2_map(&tg->space, 0, tg->page[tg->cur], 0);
		if (mode < 2)
			invlpga(svm_l2_va(0), tg->vmcb.control.asid);
		else
			tg->gprs.r9 = 1;
		seen_t = run(tg, &exits);
		tg->gprs.r9 = 0;
		seen_o = run(other, &exits);
		GUEST_SYNC(2, r << 8 | tg->vmcb.control.asid, seen_t, TAG(t, tg->cur), TAG(t, old),
			   seen_o, TAG(t ^ 1, other->cur), exits);
	}
}
