/*
 * kvmclock for x86 guests (Documentation/virt/kvm/x86/msr.rst, "MSR_KVM_SYSTEM_TIME_NEW"):
 * the MSR that enables it and the per-vCPU time area KVM keeps up to date. Header-only.
 */
#ifndef PYKVM_PVCLOCK_H
#define PYKVM_PVCLOCK_H

#include "pykvm_guest.h"

#define MSR_KVM_SYSTEM_TIME_NEW 0x4b564d01
#define KVM_MSR_ENABLED 1                 /* bit 0 of the MSR: the area is live */

/* flags */
#define PVCLOCK_TSC_STABLE_BIT (1 << 0)
#define PVCLOCK_GUEST_STOPPED (1 << 1)    /* set by KVM_KVMCLOCK_CTRL; the guest clears it */

/* struct pvclock_vcpu_time_info: 32 bytes, 4-byte aligned or better */
struct pvclock_vcpu_time_info {
	uint32_t version;
	uint32_t pad0;
	uint64_t tsc_timestamp;
	uint64_t system_time;
	uint32_t tsc_to_system_mul;
	int8_t tsc_shift;
	uint8_t flags;
	uint8_t pad[2];
} __attribute__((packed));

#endif
