/* hello: the default guest.  Greets on COM1, tells which CPU mode it runs
 * in and the CPUID vendor, then reports DONE. */
#include "pykvm_guest.h"

#define CR0_PE (1UL << 0)
#define CR0_PG (1UL << 31)
#define MSR_EFER 0xc0000080
#define EFER_LMA (1ULL << 10)

static const char *cpu_mode(void)
{
	unsigned long cr0 = read_cr0();

	if (!(cr0 & CR0_PE))
		return "real (16-bit)";
	if ((cr0 & CR0_PG) && (rdmsr(MSR_EFER) & EFER_LMA))
		return "long (64-bit)";
	return "protected (32-bit)";
}

void guest_main(void)
{
	struct pykvm_cpuid r = cpuid(0);
	char vendor[13];
	char line[80];

	com1_puts("Hello from pykvm guest!\n");

	pykvm_snprintf(line, sizeof(line), "mode: %s\n", cpu_mode());
	com1_puts(line);

	*(uint32_t *)&vendor[0] = r.ebx;
	*(uint32_t *)&vendor[4] = r.edx;
	*(uint32_t *)&vendor[8] = r.ecx;
	vendor[12] = '\0';
	pykvm_snprintf(line, sizeof(line), "cpu vendor: %s\n", vendor);
	com1_puts(line);
}
