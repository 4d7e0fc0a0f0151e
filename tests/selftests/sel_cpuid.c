/*
 * Guest of test_sel_cpuid.py (port of x86_64/cpuid_test.c): SYNC(1); then
 * CPUID of every entry the host wrote into guest_cpuid[] (what KVM_GET_CPUID2
 * gave the vCPU) must return that entry's registers; SYNC(2); then the max KVM
 * leaf (CPUID 0x40000000 EAX) must be 0x40000001.
 */
#include "pykvm_guest.h"

struct kvm_cpuid_entry2 {
	uint32_t function, index, flags;
	uint32_t eax, ebx, ecx, edx;
	uint32_t padding[3];
};

#define MAX_ENTRIES 256
volatile uint32_t guest_nent;
volatile struct kvm_cpuid_entry2 guest_cpuid[MAX_ENTRIES];

void guest_main(void)
{
	uint32_t i;

	GUEST_SYNC(1);

	for (i = 0; i < guest_nent && i < MAX_ENTRIES; i++) {
		struct pykvm_cpuid r = cpuid_count(guest_cpuid[i].function, guest_cpuid[i].index);

		GUEST_ASSERT_EQ(r.eax, guest_cpuid[i].eax);
		GUEST_ASSERT_EQ(r.ebx, guest_cpuid[i].ebx);
		GUEST_ASSERT_EQ(r.ecx, guest_cpuid[i].ecx);
		GUEST_ASSERT_EQ(r.edx, guest_cpuid[i].edx);
	}

	GUEST_SYNC(2);

	GUEST_ASSERT_EQ(cpuid(0x40000000).eax, 0x40000001);

	GUEST_DONE();
}
