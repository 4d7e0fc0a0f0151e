/*
 * pc_smp: brings up the other vCPUs by INIT/SIPI from the boot CPU, as an OS
 * does on a PC.  The APs run a real-mode trampoline at 0x7000 (SIPI vector 7)
 * that counts them and records their APIC ids (CPUID.1:EBX[31:24]) as a bit
 * mask, then halts.
 *
 * SYNC(1, APs that ran, fw_cfg CPU count, mask of AP APIC ids, BSP APIC id)
 * then isa-debug-exit 0 (status 1).
 */
#include "pc.h"

#define TRAMPOLINE 0x7000u
#define COUNT 0x7ff0u
#define MASK 0x7ff4u

extern char ap_start[], ap_end[];

__asm__(
	".pushsection .text\n"
	".code16\n"
	".globl ap_start\n"
	"ap_start:\n"
	"	cli\n"
	"	xorw %ax, %ax\n"
	"	movw %ax, %ds\n"
	"	movl $1, %eax\n"
	"	cpuid\n"
	"	shrl $24, %ebx\n"
	"	movb %bl, %cl\n"
	"	movl $1, %eax\n"
	"	shll %cl, %eax\n"
	"	lock orl %eax, 0x7ff4\n"
	"	lock incl 0x7ff0\n"
	"1:	hlt\n"
	"	jmp 1b\n"
	".globl ap_end\n"
	"ap_end:\n"
	".code64\n"
	".popsection\n");

void guest_main(void)
{
	volatile uint32_t *count = (volatile uint32_t *)(uintptr_t)COUNT;
	volatile uint32_t *mask = (volatile uint32_t *)(uintptr_t)MASK;
	volatile uint8_t *dst = (volatile uint8_t *)(uintptr_t)TRAMPOLINE;
	unsigned i, n = (unsigned)(ap_end - ap_start);
	uint64_t cpus = fw_cfg_read(FW_CFG_NB_CPUS, 2);
	uint64_t spins;

	for (i = 0; i < n; i++)
		dst[i] = (uint8_t)ap_start[i];
	*count = 0;
	*mask = 0;
	lapic_write(LAPIC_SVR, 0x1ff);
	lapic_write(LAPIC_ICR_HI, 0);
	lapic_write(LAPIC_ICR_LO, 0xc4500);		/* INIT, all but self */
	lapic_write(LAPIC_ICR_LO, 0xc4600 | (TRAMPOLINE >> 12));	/* SIPI */
	for (spins = 0; spins < 100000000ull && *count < cpus - 1; spins++)
		__asm__ volatile("pause");
	GUEST_SYNC(1, *count, cpus, *mask, lapic_read(LAPIC_ID) >> 24);
	pykvm_debug_exit(0);
}
