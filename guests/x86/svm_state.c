/*
 * svm_state: an L1 hypervisor whose L2 stops at a port write the host sees,
 * so the host can save the nested state there (and restore it elsewhere).
 *
 * params[0] = port L1 does not intercept (0: 0x5000)
 *
 * SYNC(1, vmcb_pa, hsave_pa)                    before VMRUN
 *   L2: r12 = 0xabcdef; outb(port, 1) -> I/O exit to the host (guest mode);
 *   on resume L2 stores 0xfeed0001 into l2_marker and VMMCALLs
 * SYNC(2, exit code 0x81, l2_marker, L2's r12)  back in L1
 */
#include "svm/svm.c"

static uint8_t l2_stack[4096] __attribute__((aligned(16)));
static volatile uint64_t l2_marker;
static uint16_t port_pass;

static void l2_main(void)
{
	/* r12 is live across the I/O exit: it must survive a save/restore */
	__asm__ volatile("mov $0xabcdef, %%r12\n\t"
			 "outb %%al, %%dx\n\t"
			 "mov %[mark], %[dst]\n\t"
			 "vmmcall"
			 : [dst] "=m"(l2_marker)
			 : "a"(1), "d"(port_pass), [mark] "r"(0xfeed0001ull)
			 : "r12", "memory");
	for (;;)
		hlt();
}

void guest_main(void)
{
	struct vmcb *v;
	uint64_t code;

	port_pass = pykvm_params[0] ? (uint16_t)pykvm_params[0] : 0x5000;
	svm_init();
	v = svm_vmcb_setup(l2_main, l2_stack + sizeof(l2_stack) - 8);
	GUEST_SYNC(1, (uint64_t)(uintptr_t)v, rdmsr(MSR_VM_HSAVE_PA));

	code = svm_run(v);
	SVM_ASSERT_EXIT(v, code, SVM_EXIT_VMMCALL);
	GUEST_SYNC(2, code, l2_marker, svm_l2_gprs.r12);
}
