/*
 * svm_tlb_invlpga_self: L2 rewrites its own page table entry and invalidates
 * the address with INVLPGA, with no nested transition in between: its next
 * read must go through the new entry.  A second L2 with another ASID keeps
 * its own translation of the same address.
 *
 * L2 A (ASID 1) and B (ASID 2) each map window page 0 (non-global) to page 0
 * of their own pair.  A's page tables live in L1's memory, which L2 reaches
 * writable through L1's identity map (PML4 slot 0).  L1 runs B (it reads
 * its page), then A once: A reads the window, then for each round points its
 * own PTE at the other page of its pair (a plain store, so L0's shadow MMU
 * may have let the page table go out of sync), runs INVLPGA with RAX = the
 * window address and ECX = its ASID, and reads the window again, storing
 * every read in an array of L1's.  Then B runs again.
 *
 * params[0] = who serves A's INVLPGA:
 *   0  L1 does not intercept it: L0 serves it in L2's context (the essential
 *      case: no VMRUN, hence no nested-entry flush, between the PTE write
 *      and the read)
 *   1  L1 intercepts it (#VMEXIT INVLPGA) and runs it for A with A's RAX
 *      and ECX, then resumes A
 * params[1] = rounds (0: 16, at most 64)
 *
 * SYNC(1, mode, rounds, B's first read)            before A runs
 * SYNC(2, round, A seen, new tag, old tag)           per round, after A's run
 * SYNC(3, A's read before its first remap, B's read after A's run,
 *      INVLPGA #VMEXITs L1 took)
 * then DONE.  Tags: L2 x (0 = A, 1 = B) page i holds 0x5e1f0000 + x * 16 + i.
 */
#include "svm/svm.c"

#define TAG(x, i) (0x5e1f0000ull + (x) * 16 + (i))
#define MAX_ROUNDS 64

static struct svm_l2 l2s[2];
/* what A read: [0] before its first remap, [r + 1] after round r */
static volatile uint64_t seen[MAX_ROUNDS + 1] __attribute__((aligned(4096)));

/*
 * L2 A's code (no stack):
 *   RDI  window address          RSI  address of its own PTE (identity map)
 *   RDX  where reads are stored  R8   ASID that INVLPGA names
 *   R10  PTE of the other page   R11  PTE of the current page
 *   R12  rounds (>= 1)
 * Reads the window into (RDX), then per round: store R10 into its PTE, swap
 * R10/R11, INVLPGA RAX = RDI, ECX = R8D, read the window into the next slot.
 * VMMCALL at the end; L1 does not resume it.
 */
void l2_self_remap(void);
__asm__(
	"	.text\n"
	"	.globl l2_self_remap\n"
	"	.type l2_self_remap, @function\n"
	"l2_self_remap:\n"
	"	mov (%rdi), %rbx\n"
	"	mov %rbx, (%rdx)\n"
	"1:	add $8, %rdx\n"
	"	mov %r10, (%rsi)\n"
	"	xchg %r10, %r11\n"
	"	mov %rdi, %rax\n"
	"	mov %r8d, %ecx\n"
	"	invlpga %rax, %ecx\n"
	"	mov (%rdi), %rbx\n"
	"	mov %rbx, (%rdx)\n"
	"	dec %r12\n"
	"	jnz 1b\n"
	"	vmmcall\n"
	"2:	hlt\n"
	"	jmp 2b\n"
	"	.size l2_self_remap, . - l2_self_remap\n");

static uint64_t pte(const volatile void *page)
{
	return (uint64_t)(uintptr_t)page | SVM_PTE_P | SVM_PTE_W;
}

/* Run `g` to its VMMCALL, doing the INVLPGAs L1 intercepts for it. */
static void run(struct svm_l2 *g, uint64_t *invlpga_exits)
{
	uint64_t code;

	for (;;) {
		code = svm_run_gprs(&g->vmcb, &g->gprs);
		if (code != SVM_EXIT_INVLPGA)
			break;
		invlpga(g->vmcb.save.rax, (uint32_t)g->gprs.rcx);
		svm_skip(&g->vmcb, SVM_INVLPGA_LEN);
		(*invlpga_exits)++;
	}
	SVM_ASSERT_EXIT(&g->vmcb, code, SVM_EXIT_VMMCALL);
	svm_skip(&g->vmcb, SVM_VMMCALL_LEN);
}

void guest_main(void)
{
	uint64_t mode = pykvm_params[0];
	uint64_t rounds = pykvm_params[1] ? pykvm_params[1] : 16;
	uint64_t exits = 0, r;
	struct svm_l2 *a = &l2s[0], *b = &l2s[1];
	unsigned int x;

	GUEST_ASSERT(mode <= 1);
	GUEST_ASSERT(rounds <= MAX_ROUNDS);
	svm_init();
	for (x = 0; x < 2; x++) {
		struct svm_l2 *g = &l2s[x];

		g->page[0][0] = TAG(x, 0);
		g->page[1][0] = TAG(x, 1);
		svm_l2_space_init(&g->space);
		svm_l2_map(&g->space, 0, g->page[0], 0);
		svm_vmcb_init(&g->vmcb, x ? svm_l2_load2 : l2_self_remap,
			      g->stack + sizeof(g->stack) - 8);
		g->vmcb.save.cr3 = (uint64_t)(uintptr_t)g->space.pml4;
		g->vmcb.control.asid = x + 1;
		g->gprs.rdi = svm_l2_va(0);
	}
	b->gprs.rsi = svm_l2_va(0);
	a->gprs.rsi = (uint64_t)(uintptr_t)&a->space.pt[0];
	a->gprs.rdx = (uint64_t)(uintptr_t)seen;
	a->gprs.r8 = a->vmcb.control.asid;
	a->gprs.r10 = pte(a->page[1]);
	a->gprs.r11 = pte(a->page[0]);
	a->gprs.r12 = rounds;
	if (mode == 1)
		a->vmcb.control.intercept_word3 |= SVM_INTERCEPT_INVLPGA;

	run(b, &exits);
	GUEST_SYNC(1, mode, rounds, b->gprs.rbx);
	run(a, &exits);
	run(b, &exits);
	for (r = 0; r < rounds; r++)
		GUEST_SYNC(2, r, seen[r + 1], TAG(0, (r + 1) & 1), TAG(0, r & 1));
	GUEST_SYNC(3, seen[0], b->gprs.rbx, exits);
}
