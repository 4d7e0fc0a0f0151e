/*
 * Guest of test_sel_debug_regs.py (port of x86_64/debug_regs.c): a self-IPI
 * left pending through the x2APIC, then the instructions the host sets
 * guest-debug breakpoints on: an int3 (sw_bp), a nop (hw_bp), a store to
 * guest_value (ending at write_data), six instructions to single-step
 * (ss_start: sti, xor, cpuid, mov, wrmsr to TSC_DEADLINE, cli) and a read of
 * DR0 with DR7.GD set (bd_start).  The labels' addresses are in
 * sel_debug_labels[] for the host to read before the run.
 */
#include "pykvm_guest.h"

#define MSR_IA32_APICBASE	0x1b
#define MSR_IA32_TSC_DEADLINE	0x6e0
#define X2APIC_ICR		0x830		/* x2APIC MSR of APIC_ICR */
#define APIC_BASE_ENABLE	(1u << 11)
#define APIC_BASE_X2APIC	(1u << 10)
#define APIC_DEST_SELF		0x40000
#define APIC_INT_ASSERT		0x4000
#define APIC_DM_FIXED		0x0
#define IRQ_VECTOR		0xaa

uint32_t guest_value;
extern char sw_bp[], hw_bp[], write_data[], ss_start[], bd_start[];
const uint64_t sel_debug_labels[6] = {
	(uint64_t)sw_bp, (uint64_t)hw_bp, (uint64_t)write_data,
	(uint64_t)ss_start, (uint64_t)bd_start, (uint64_t)&guest_value,
};

void guest_main(void)
{
	/* a pending interrupt on this vCPU (x2apic_enable(), x2apic_write_reg(APIC_ICR)) */
	wrmsr(MSR_IA32_APICBASE, rdmsr(MSR_IA32_APICBASE) | APIC_BASE_ENABLE | APIC_BASE_X2APIC);
	wrmsr(X2APIC_ICR, APIC_DEST_SELF | APIC_INT_ASSERT | APIC_DM_FIXED | IRQ_VECTOR);

	__asm__ volatile("sw_bp: int3");
	__asm__ volatile("hw_bp: nop");
	__asm__ volatile("mov $1234, %%rax\n\t"
			 "mov %%rax, %0\n\t"
			 "write_data:"
			 : "=m"(guest_value) : : "rax");
	__asm__ volatile("ss_start: sti\n\t"
			 "xor %%eax, %%eax\n\t"
			 "cpuid\n\t"
			 "movl $0x6e0, %%ecx\n\t"
			 "wrmsr\n\t"
			 "cli"
			 : : : "eax", "ebx", "ecx", "edx");
	__asm__ volatile("bd_start: mov %%dr0, %%rax" : : : "rax");
	GUEST_DONE();
}
