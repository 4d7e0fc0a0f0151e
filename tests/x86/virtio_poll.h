/*
 * virtio_poll.h: the shared part of the polling test drivers on the pc machine (virtio_net.c,
 * virtio_vsock.c): find the device on virtio-pci (the first function with the modern id
 * 0x1040 + type, vendor 0x1af4) or, when there is none, on the virtio-mmio window at
 * 0xfeb00000; negotiate; lay the queues out; DRIVER_OK. Interrupts stay off: no MSI-X vector
 * is assigned and the driver polls the used rings.
 */
#ifndef PYKVM_TEST_VIRTIO_POLL_H
#define PYKVM_TEST_VIRTIO_POLL_H

#include "virtio.h"

#define MMIO ((uintptr_t)PC_VIRTIO_MMIO_BASE)

static struct vpci pci;
static int on_pci;

/* Set up the device of virtio type `type` and its queues 0..n-1 (qs[i] laid out in rings[i],
 * `size` entries); the features accepted. A device that refuses the features, or a queue it
 * cannot take, fails a GUEST_ASSERT. */
static inline uint64_t vpoll_start(unsigned type, uint64_t want, struct vq *const *qs,
				   void *const *rings, unsigned n, unsigned size)
{
	int slot = vpci_slot_of((0x1040u + type) << 16 | 0x1af4u);
	uint64_t feat;
	unsigned i;

	on_pci = slot >= 0;
	if (on_pci) {
		vpci_find(&pci, slot);
		GUEST_ASSERT(vpci_negotiate(&pci, want) & VIRTIO_STATUS_FEATURES_OK);
		VPCI_C32(&pci, 0x08) = 0;
		feat = VPCI_C32(&pci, 0x0c);
		VPCI_C32(&pci, 0x08) = 1;
		feat |= (uint64_t)VPCI_C32(&pci, 0x0c) << 32;
		for (i = 0; i < n; i++)
			vpci_queue(&pci, qs[i], i, rings[i], size, 0xffff);
		vpci_driver_ok(&pci);
	} else {
		GUEST_ASSERT(vmmio_probe(MMIO) == type);
		feat = vmmio_negotiate(MMIO, want);
		GUEST_ASSERT(feat);
		for (i = 0; i < n; i++)
			GUEST_ASSERT(vmmio_setup_queue(MMIO, i, qs[i], rings[i], size, 1) == 1);
		vmmio_driver_ok(MMIO);
	}
	return feat;
}

/* The device configuration space at byte `off` (read it through a volatile pointer). */
static inline uintptr_t vpoll_cfg(unsigned off)
{
	return on_pci ? pci.devcfg + off : MMIO + VMMIO_CONFIG + off;
}

static inline uint32_t dev_status(void)
{
	return on_pci ? VPCI_C8(&pci, 0x14) : vmmio_read(MMIO, VMMIO_STATUS);
}

/* Make one device-writable buffer of `len` bytes at `addr` available in q and notify. */
static inline void post(struct vq *q, uint64_t addr, uint32_t len)
{
	struct vq_buf b = { addr, len, 1 };
	uint16_t old = q->avail_idx;

	vq_add(q, &b, 1);
	vq_kick(q, old);
}

/* wait for a used element of q for about `cycles` TSC cycles; its head or -1 */
static inline int wait_used(struct vq *q, uint32_t *len, uint64_t cycles)
{
	uint64_t t0 = rdtsc();

	while (!vq_has_used(q)) {
		if (rdtsc() - t0 > cycles)
			return -1;
		__asm__ volatile("pause");
	}
	return vq_get_used(q, len);
}

#endif /* PYKVM_TEST_VIRTIO_POLL_H */
