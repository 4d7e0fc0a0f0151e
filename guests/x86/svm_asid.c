/*
 * svm_asid: L1 changes L2's ASID, its data and its page tables between
 * runs; L2 must always see what L1 wrote last (no stale translations).
 *
 * L2 runs on its own page tables: the first 4 GiB shared with L1, plus one
 * 4 KiB "window" page at 4 GiB that L1 points at page A or page B.
 *
 * run 1, ASID 1, window -> A:  L2 stores 0x1111 to window[0], loads window[1]
 * SYNC(1, asid, L2 saw, A[0])                       (A[1] = 0xa1 before)
 * run 2, ASID 2, window -> B, L1 wrote A[1] = 0xa2, B[1] = 0xb2:
 *   L2 loads window[1], stores 0x2222 to window[0]
 * SYNC(2, asid, L2 saw, B[0], A[0])
 * run 3, ASID 2 + TLB_CONTROL flush-all, window -> A:  L2 loads window[1]
 * SYNC(3, asid, L2 saw, tlb_ctl)
 * then L2 halts: SYNC(4, exit code 0x78)
 */
#include "svm/svm.c"

#define WINDOW 0x100000000ull		/* 4 GiB: outside L1's identity map */
#define PTE_P_W 3ull

static uint8_t l2_stack[4096] __attribute__((aligned(16)));
static uint64_t l2_pml4[512] __attribute__((aligned(4096)));
static uint64_t l2_pdpt[512] __attribute__((aligned(4096)));
static uint64_t l2_pd[512] __attribute__((aligned(4096)));
static uint64_t l2_pt[512] __attribute__((aligned(4096)));
static volatile uint64_t page_a[512] __attribute__((aligned(4096)));
static volatile uint64_t page_b[512] __attribute__((aligned(4096)));
static volatile uint64_t l2_seen[3];

static void l2_main(void)
{
	volatile uint64_t *w = (volatile uint64_t *)WINDOW;

	w[0] = 0x1111;
	l2_seen[0] = w[1];
	vmmcall();
	l2_seen[1] = w[1];
	w[0] = 0x2222;
	vmmcall();
	l2_seen[2] = w[1];
	vmmcall();
	hlt();
	for (;;)
		vmmcall();
}

static void map_window(volatile uint64_t *page)
{
	l2_pt[0] = (uint64_t)(uintptr_t)page | PTE_P_W;
}

void guest_main(void)
{
	uint64_t *l1_pml4 = (uint64_t *)(uintptr_t)(read_cr3() & ~0xfffull);
	uint64_t *l1_pdpt = (uint64_t *)(uintptr_t)(l1_pml4[0] & 0x000ffffffffff000ull);
	struct vmcb *v;
	uint64_t code;
	unsigned int i;

	for (i = 0; i < 512; i++)
		l2_pdpt[i] = l1_pdpt[i];
	GUEST_ASSERT_EQ(l2_pdpt[4], 0);		/* the window is L2's alone */
	l2_pml4[0] = (uint64_t)(uintptr_t)l2_pdpt | PTE_P_W;
	l2_pdpt[4] = (uint64_t)(uintptr_t)l2_pd | PTE_P_W;
	l2_pd[0] = (uint64_t)(uintptr_t)l2_pt | PTE_P_W;
	map_window(page_a);
	page_a[1] = 0xa1;

	svm_init();
	v = svm_vmcb_setup(l2_main, l2_stack + sizeof(l2_stack) - 8);
	v->save.cr3 = (uint64_t)(uintptr_t)l2_pml4;

	v->control.asid = 1;
	code = svm_run(v);
	SVM_ASSERT_EXIT(v, code, SVM_EXIT_VMMCALL);
	GUEST_SYNC(1, v->control.asid, l2_seen[0], page_a[0]);

	page_a[1] = 0xa2;
	page_b[1] = 0xb2;
	map_window(page_b);
	v->control.asid = 2;
	svm_skip(v, SVM_VMMCALL_LEN);
	code = svm_run(v);
	SVM_ASSERT_EXIT(v, code, SVM_EXIT_VMMCALL);
	GUEST_SYNC(2, v->control.asid, l2_seen[1], page_b[0], page_a[0]);

	map_window(page_a);
	v->control.tlb_ctl = SVM_TLB_FLUSH_ALL;
	svm_skip(v, SVM_VMMCALL_LEN);
	code = svm_run(v);
	SVM_ASSERT_EXIT(v, code, SVM_EXIT_VMMCALL);
	GUEST_SYNC(3, v->control.asid, l2_seen[2], v->control.tlb_ctl);
	v->control.tlb_ctl = SVM_TLB_DO_NOTHING;

	svm_skip(v, SVM_VMMCALL_LEN);
	code = svm_run(v);
	SVM_ASSERT_EXIT(v, code, SVM_EXIT_HLT);
	GUEST_SYNC(4, code);
}
