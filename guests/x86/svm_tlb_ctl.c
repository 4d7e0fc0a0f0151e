/*
 * svm_tlb_ctl: the TLB_CONTROL value L1 writes is honoured for L2 on the
 * next VMRUN.
 *
 * One L2 (ASID 1, CR4.PGE set) in an address space of its own reads two
 * window pages: slot 0 mapped non-global, slot 1 global.  After each run L1
 * points both slots at the other page of their pair (the ASID stays), writes
 * TLB_CONTROL and runs L2 again: L2's first read of each slot then comes from
 * the TLB (stale) or from a fresh walk of L1's new page table entries.
 *
 * params[0] = TLB_CONTROL for the runs after a remap (0, 1, 3 or 7)
 * params[1] = rounds (0: 4)
 *
 * SYNC(1, tlb_ctl, non-global seen, global seen)     first run, pages 0
 * SYNC(2, round, non-global seen, global seen, non-global new, global new,
 *      non-global old, global old)                   after each remap
 * then DONE.  Tags: non-global page i holds 0x6e670000 + i, global page i
 * 0x67000000 + i.
 */
#include "svm/svm.c"

#define TAG_NG(i) (0x6e670000ull + (i))
#define TAG_G(i) (0x67000000ull + (i))

static struct vmcb vmcb;
static struct svm_l2_space space;
static struct svm_gprs gprs;
static volatile uint64_t page_ng[2][512] __attribute__((aligned(4096)));
static volatile uint64_t page_g[2][512] __attribute__((aligned(4096)));
static uint8_t l2_stack[4096] __attribute__((aligned(16)));

static void map_pair(unsigned int i)
{
	svm_l2_map(&space, 0, page_ng[i], 0);
	svm_l2_map(&space, 1, page_g[i], 1);
}

void guest_main(void)
{
	uint8_t tlb_ctl = (uint8_t)pykvm_params[0];
	uint64_t rounds = pykvm_params[1] ? pykvm_params[1] : 4;
	uint64_t code, r;
	unsigned int cur = 0;

	if (tlb_ctl == SVM_TLB_FLUSH_ASID || tlb_ctl == SVM_TLB_FLUSH_ASID_LOCAL)
		GUEST_ASSERT(cpuid(0x8000000a).edx & CPUID_8000000A_EDX_FLUSHBYASID);
	page_ng[0][0] = TAG_NG(0);
	page_ng[1][0] = TAG_NG(1);
	page_g[0][0] = TAG_G(0);
	page_g[1][0] = TAG_G(1);
	svm_l2_space_init(&space);
	map_pair(0);

	svm_init();
	svm_vmcb_init(&vmcb, svm_l2_load2, l2_stack + sizeof(l2_stack) - 8);
	vmcb.save.cr3 = (uint64_t)(uintptr_t)space.pml4;
	vmcb.save.cr4 |= X86_CR4_PGE;
	vmcb.control.asid = 1;
	gprs.rdi = svm_l2_va(0);
	gprs.rsi = svm_l2_va(1);

	code = svm_run_gprs(&vmcb, &gprs);
	SVM_ASSERT_EXIT(&vmcb, code, SVM_EXIT_VMMCALL);
	GUEST_SYNC(1, tlb_ctl, gprs.rbx, gprs.rcx);

	for (r = 0; r < rounds; r++) {
		unsigned int old = cur;

		cur ^= 1;
		map_pair(cur);
		vmcb.control.tlb_ctl = tlb_ctl;
		svm_skip(&vmcb, SVM_VMMCALL_LEN);
		code = svm_run_gprs(&vmcb, &gprs);
		vmcb.control.tlb_ctl = SVM_TLB_DO_NOTHING;
		SVM_ASSERT_EXIT(&vmcb, code, SVM_EXIT_VMMCALL);
		GUEST_SYNC(2, r, gprs.rbx, gprs.rcx, TAG_NG(cur), TAG_G(cur), TAG_NG(old),
			   TAG_G(old));
	}
}
