/*
 * svm_l2_io: an L1 hypervisor whose L2 does port I/O, VMMCALL and HLT.
 *
 * params[0] = port L1 does NOT intercept (0: 0x5000); L2 writes 0x5a to it,
 *             which exits to L0 userspace (the host sees an I/O exit in guest
 *             mode) and, once the host resumes it, L2 goes on
 * params[1] = port L1 intercepts (0: 0x5001); L2 writes 0xa5 to it
 *
 * SYNC(1, vmcb_pa)                                    before the first VMRUN
 * SYNC(2, exit code 0x7b, port, exit_info_1)          IOIO on the intercepted port
 * SYNC(3, exit code 0x81, L2's rbx)                   VMMCALL (rbx = 0x1234 from L2)
 * SYNC(4, exit code 0x78)                             HLT
 */
#include "svm/svm.c"

static uint8_t l2_stack[4096] __attribute__((aligned(16)));
static uint16_t port_pass, port_trap;

static void l2_main(void)
{
	outb(port_pass, 0x5a);
	outb(port_trap, 0xa5);
	__asm__ volatile("vmmcall" : : "b"(0x1234ul) : "memory");
	hlt();
	for (;;)
		vmmcall();
}

void guest_main(void)
{
	struct vmcb *v;
	uint64_t code;

	port_pass = pykvm_params[0] ? (uint16_t)pykvm_params[0] : 0x5000;
	port_trap = pykvm_params[1] ? (uint16_t)pykvm_params[1] : 0x5001;

	svm_init();
	v = svm_vmcb_setup(l2_main, l2_stack + sizeof(l2_stack) - 8);
	svm_intercept_port(port_trap);
	GUEST_SYNC(1, (uint64_t)(uintptr_t)v);

	code = svm_run(v);
	SVM_ASSERT_EXIT(v, code, SVM_EXIT_IOIO);
	GUEST_SYNC(2, code, SVM_IOIO_PORT(v->control.exit_info_1), v->control.exit_info_1);
	v->save.rip = v->control.exit_info_2;	/* IOIO: EXITINFO2 is the next RIP */

	code = svm_run(v);
	SVM_ASSERT_EXIT(v, code, SVM_EXIT_VMMCALL);
	GUEST_SYNC(3, code, svm_l2_gprs.rbx);
	svm_skip(v, SVM_VMMCALL_LEN);

	code = svm_run(v);
	SVM_ASSERT_EXIT(v, code, SVM_EXIT_HLT);
	GUEST_SYNC(4, code);
}
