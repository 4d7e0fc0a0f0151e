/*
 * svm_tlb_multi: several L2 guests with different ASIDs multiplexed on each
 * L1 vCPU, run round-robin; each must always read its own page.
 *
 * Every vCPU (up to 8; all enter here) runs K L2 guests, ASIDs 1..K, each
 * in an address space of its own that maps window page 0 (non-global) to a
 * page of its own: the same virtual address, K different pages, and the same
 * ASIDs on every vCPU with different pages behind them.  A round runs each
 * L2 once; L2 reads the window and L1 checks it read its own page's tag.
 * With remapping on, each round also points one L2 (in turn) at the other
 * page of its pair, flushing by TLB_CONTROL 1, 3 or 7 or by INVLPGA from L1
 * in turn (3 and 7 only with FlushByAsid).
 *
 * params[0] = K, L2 guests per vCPU (0: 4; at most 7)
 * params[1] = rounds (0: until params[3] is non-zero)
 * params[2] = 1: SYNC(2) after every round
 * params[3] = the host's stop flag (with rounds = 0)
 * params[4] = 1: remap one L2 per round
 *
 * SYNC(1, vcpu, K)                                   before the first VMRUN
 * SYNC(2, vcpu, round, runs, remaps)                 after each round (params[2])
 * SYNC(3, vcpu, rounds, runs, remaps by TLB_CONTROL, remaps by INVLPGA)
 * then DONE.  vcpu is the initial APIC id.  A wrong read fails a
 * GUEST_ASSERT naming the vCPU, L2, ASID, round, what it read and what its
 * page holds.
 */
#include "svm/svm.c"

#define MAX_CPUS 8
#define MAX_L2 7
#define TAG(cpu, k, i) (0x5a00000000ull | (uint64_t)(cpu) << 16 | (uint64_t)(k) << 8 | (i))

static struct svm_l2 l2s[MAX_CPUS][MAX_L2];
static uint8_t hsave[MAX_CPUS][4096] __attribute__((aligned(4096)));

/* flush methods, in turn: a TLB_CONTROL value, or 0xff for INVLPGA from L1 */
#define BY_INVLPGA 0xff
static const uint8_t methods_asid[] = { SVM_TLB_FLUSH_ALL, SVM_TLB_FLUSH_ASID,
					SVM_TLB_FLUSH_ASID_LOCAL, BY_INVLPGA };
static const uint8_t methods_all[] = { SVM_TLB_FLUSH_ALL, BY_INVLPGA };

void guest_main(void)
{
	unsigned int cpu = cpuid(1).ebx >> 24;
	unsigned int nl2 = pykvm_params[0] ? (unsigned int)pykvm_params[0] : 4;
	uint64_t rounds = pykvm_params[1], sync_each = pykvm_params[2];
	uint64_t remap = pykvm_params[4];
	int by_asid = !!(cpuid(0x8000000a).edx & CPUID_8000000A_EDX_FLUSHBYASID);
	const uint8_t *methods = by_asid ? methods_asid : methods_all;
	unsigned int nmethods = by_asid ? sizeof(methods_asid) : sizeof(methods_all);
	uint64_t r, runs = 0, by_tlb_ctl = 0, by_invlpga = 0;
	unsigned int k;

	GUEST_ASSERT(cpu < MAX_CPUS);
	GUEST_ASSERT(nl2 >= 1 && nl2 <= MAX_L2);
	svm_enable(hsave[cpu]);
	for (k = 0; k < nl2; k++) {
		struct svm_l2 *g = &l2s[cpu][k];

		g->page[0][0] = TAG(cpu, k, 0);
		g->page[1][0] = TAG(cpu, k, 1);
		g->cur = 0;
		svm_l2_space_init(&g->space);
		svm_l2_map(&g->space, 0, g->page[0], 0);
		svm_vmcb_init(&g->vmcb, svm_l2_load2, g->stack + sizeof(g->stack) - 8);
		g->vmcb.save.cr3 = (uint64_t)(uintptr_t)g->space.pml4;
		g->vmcb.save.cr4 |= X86_CR4_PGE;
		g->vmcb.control.asid = k + 1;
		g->gprs.rdi = svm_l2_va(0);
		g->gprs.rsi = svm_l2_va(0);
	}
	GUEST_SYNC(1, cpu, nl2);

	for (r = 0; rounds ? r < rounds : !pykvm_params[3]; r++) {
		for (k = 0; k < nl2; k++) {
			struct svm_l2 *g = &l2s[cpu][k];
			uint8_t how = 0;
			uint64_t code, want;

			if (remap && k == r % nl2) {
				how = methods[(r / nl2) % nmethods];
				g->cur ^= 1;
				svm_l2_map(&g->space, 0, g->page[g->cur], 0);
				if (how == BY_INVLPGA) {
					invlpga(svm_l2_va(0), g->vmcb.control.asid);
					by_invlpga++;
				} else {
					g->vmcb.control.tlb_ctl = how;
					by_tlb_ctl++;
				}
			}
			code = svm_run_gprs(&g->vmcb, &g->gprs);
			g->vmcb.control.tlb_ctl = SVM_TLB_DO_NOTHING;
			SVM_ASSERT_EXIT(&g->vmcb, code, SVM_EXIT_VMMCALL);
			svm_skip(&g->vmcb, SVM_VMMCALL_LEN);
			runs++;
			want = TAG(cpu, k, g->cur);
			GUEST_ASSERT_MSG(g->gprs.rbx == want && g->gprs.rcx == want,
					 "vCPU %u L2 %u (ASID %u) round %lu: read %lx then %lx, its page "
					 "holds %lx (remapped this round: %s %u)",
					 cpu, k, g->vmcb.control.asid, (unsigned long)r,
					 (unsigned long)g->gprs.rbx, (unsigned long)g->gprs.rcx,
					 (unsigned long)want,
					 how == BY_INVLPGA ? "INVLPGA" : how ? "TLB_CONTROL" : "no",
					 how == BY_INVLPGA ? 0 : how);
		}
		if (sync_each)
			GUEST_SYNC(2, cpu, r, runs, by_tlb_ctl + by_invlpga);
	}
	GUEST_SYNC(3, cpu, r, runs, by_tlb_ctl, by_invlpga);
}
