/*
 * kvmclock_pause: enables kvmclock (MSR_KVM_SYSTEM_TIME_NEW, 0x4b564d01) on a pvclock area of its
 * own and counts, forever, the times it finds PVCLOCK_GUEST_STOPPED (flags bit 1) set there,
 * clearing the bit as Linux's kvm_check_and_clear_guest_paused() does: the guest side of
 * KVM_KVMCLOCK_CTRL, which Machine.pause() issues (tests/hw/test_pause_kvmclock.py).
 *
 * SYNC(1, &stops, &loops, wrmsr vector (0: accepted), flags at the start)
 * then no more exits: `loops` counts up, `stops` counts the notices seen.
 */
#include "pvclock.h"

static volatile struct pvclock_vcpu_time_info clk __attribute__((aligned(64)));
static volatile uint64_t stops, loops;

void guest_main(void)
{
	uint8_t vec = wrmsr_safe(MSR_KVM_SYSTEM_TIME_NEW, (uint64_t)&clk | KVM_MSR_ENABLED);

	GUEST_SYNC(1, (uint64_t)&stops, (uint64_t)&loops, vec, clk.flags);
	for (;;) {
		if (clk.flags & PVCLOCK_GUEST_STOPPED) {
			clk.flags &= ~PVCLOCK_GUEST_STOPPED;
			stops++;
		}
		loops++;
	}
}
