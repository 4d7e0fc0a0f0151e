/*
 * svm_roundtrip: N L1 <-> L2 round trips (VMRUN, VMMCALL #VMEXIT).
 *
 * params[0] = N (0: 50)
 *
 * SYNC(1, N)                     just before the first VMRUN
 * SYNC(2, N, tsc delta, round trips done)
 */
#include "svm/svm.c"

static uint8_t l2_stack[4096] __attribute__((aligned(16)));

static void l2_main(void)
{
	for (;;)
		vmmcall();
}

void guest_main(void)
{
	uint64_t n = pykvm_params[0] ? pykvm_params[0] : 50;
	uint64_t i, t0, t1, code;
	struct vmcb *v;

	svm_init();
	v = svm_vmcb_setup(l2_main, l2_stack + sizeof(l2_stack) - 8);
	GUEST_SYNC(1, n);
	t0 = rdtsc();
	for (i = 0; i < n; i++) {
		code = svm_run(v);
		if (code != SVM_EXIT_VMMCALL)
			break;
		svm_skip(v, SVM_VMMCALL_LEN);
	}
	t1 = rdtsc();
	SVM_ASSERT_EXIT(v, code, SVM_EXIT_VMMCALL);
	GUEST_SYNC(2, n, t1 - t0, i);
}
