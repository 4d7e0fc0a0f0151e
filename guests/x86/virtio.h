/*
 * Guest-side virtio helpers for the tiny test guests (OASIS virtio 1.2):
 * the split virtqueue layout (section 2.7) and a minimal driver for it, and
 * the virtio-mmio transport (section 4.2.2, version 2): discovery, feature
 * negotiation, queue set-up.  Transport-independent parts (struct vq) take a
 * notify address and width so a virtio-pci guest can use them as well.
 *
 * Guest RAM is identity-mapped (GPA == virtual address), so a pointer is the
 * address the device is given.  Header-only; static functions.
 *
 * The driver keeps it simple: descriptors are handed out in order, modulo
 * the queue size, so at most `size` descriptors may be outstanding at once
 * (the tests submit a chain and wait for it).
 */
#ifndef PYKVM_VIRTIO_H
#define PYKVM_VIRTIO_H

#include "pc.h"

/* ---- constants ------------------------------------------------------------ */
#define VIRTIO_STATUS_ACKNOWLEDGE 1
#define VIRTIO_STATUS_DRIVER 2
#define VIRTIO_STATUS_DRIVER_OK 4
#define VIRTIO_STATUS_FEATURES_OK 8
#define VIRTIO_STATUS_NEEDS_RESET 64
#define VIRTIO_STATUS_FAILED 128

#define VIRTIO_F_INDIRECT_DESC 28
#define VIRTIO_F_EVENT_IDX 29
#define VIRTIO_F_VERSION_1 32

#define VIRTIO_INT_VRING 1
#define VIRTIO_INT_CONFIG 2

#define VIRTIO_ID_BLOCK 2
#define VIRTIO_ID_CONSOLE 3
#define VIRTIO_ID_RNG 4

#define VRING_DESC_F_NEXT 1
#define VRING_DESC_F_WRITE 2
#define VRING_DESC_F_INDIRECT 4
#define VRING_AVAIL_F_NO_INTERRUPT 1
#define VRING_USED_F_NO_NOTIFY 1

/* virtio-mmio registers (section 4.2.2, table 4.1) */
#define VIRTIO_MMIO_MAGIC 0x74726976u /* "virt" */
#define VMMIO_MAGIC_VALUE 0x000
#define VMMIO_VERSION 0x004
#define VMMIO_DEVICE_ID 0x008
#define VMMIO_VENDOR_ID 0x00c
#define VMMIO_DEVICE_FEATURES 0x010
#define VMMIO_DEVICE_FEATURES_SEL 0x014
#define VMMIO_DRIVER_FEATURES 0x020
#define VMMIO_DRIVER_FEATURES_SEL 0x024
#define VMMIO_QUEUE_SEL 0x030
#define VMMIO_QUEUE_NUM_MAX 0x034
#define VMMIO_QUEUE_NUM 0x038
#define VMMIO_QUEUE_READY 0x044
#define VMMIO_QUEUE_NOTIFY 0x050
#define VMMIO_INTERRUPT_STATUS 0x060
#define VMMIO_INTERRUPT_ACK 0x064
#define VMMIO_STATUS 0x070
#define VMMIO_QUEUE_DESC_LOW 0x080
#define VMMIO_QUEUE_DESC_HIGH 0x084
#define VMMIO_QUEUE_DRIVER_LOW 0x090
#define VMMIO_QUEUE_DRIVER_HIGH 0x094
#define VMMIO_QUEUE_DEVICE_LOW 0x0a0
#define VMMIO_QUEUE_DEVICE_HIGH 0x0a4
#define VMMIO_SHM_SEL 0x0ac
#define VMMIO_SHM_LEN_LOW 0x0b0
#define VMMIO_CONFIG_GENERATION 0x0fc
#define VMMIO_CONFIG 0x100

/* where the pc machine puts virtio-mmio device i (QEMU microvm's layout) */
#define PC_VIRTIO_MMIO_BASE 0xfeb00000u
#define PC_VIRTIO_MMIO_SIZE 0x200u
#define PC_VIRTIO_MMIO_GSI 16

static inline void virtio_mb(void)
{
	__asm__ volatile("mfence" ::: "memory");
}

static inline void virtio_wmb(void)
{
	__asm__ volatile("" ::: "memory"); /* x86 keeps stores in order */
}

/* ---- the split virtqueue (section 2.7) --------------------------------------- */
struct vring_desc {
	uint64_t addr;
	uint32_t len;
	uint16_t flags;
	uint16_t next;
};

struct vring_used_elem {
	uint32_t id;
	uint32_t len;
};

/* Bytes a queue of `size` entries needs from a 4 KiB-aligned area: the
 * descriptor table, the available ring (with used_event) and, from the next
 * 4 KiB boundary, the used ring (with avail_event). */
#define VQ_AVAIL_OFF(size) (16u * (size))
#define VQ_USED_OFF(size) ((VQ_AVAIL_OFF(size) + 6u + 2u * (size) + 4095u) & ~4095u)
#define VQ_BYTES(size) (VQ_USED_OFF(size) + 6u + 8u * (size))

struct vq {
	volatile struct vring_desc *desc;
	volatile uint16_t *avail;  /* flags, idx, ring[size], used_event */
	volatile uint16_t *used;   /* flags, idx, then elems; avail_event after */
	unsigned size;
	unsigned index;            /* the queue number */
	uint16_t avail_idx;        /* next avail entry (shadow of avail->idx) */
	uint16_t last_used;        /* next used entry to take */
	uint16_t next_desc;        /* next descriptor to hand out */
	int event_idx;             /* VIRTIO_F_EVENT_IDX negotiated */
	uintptr_t notify_addr;     /* where a notification is written */
	int notify_width;          /* 2 (PCI) or 4 (MMIO) bytes */
	uint32_t notify_value;
	unsigned kicks, kicks_suppressed;
};

static inline volatile struct vring_used_elem *vq_used_elem(struct vq *q, unsigned i)
{
	return (volatile struct vring_used_elem *)(q->used + 2) + (i % q->size);
}

static inline volatile uint16_t *vq_used_event(struct vq *q)
{
	return &q->avail[2 + q->size];
}

static inline volatile uint16_t *vq_avail_event(struct vq *q)
{
	return (volatile uint16_t *)((volatile uint8_t *)q->used + 4 + 8 * q->size);
}

/* Lay a queue of `size` entries (a power of 2) out in `mem` (4 KiB aligned,
 * VQ_BYTES(size) bytes) and zero it. */
static inline void vq_init(struct vq *q, void *mem, unsigned index, unsigned size, int event_idx)
{
	volatile uint8_t *m = mem;
	unsigned i;

	for (i = 0; i < VQ_BYTES(size); i++)
		m[i] = 0;
	q->desc = (volatile struct vring_desc *)m;
	q->avail = (volatile uint16_t *)(m + VQ_AVAIL_OFF(size));
	q->used = (volatile uint16_t *)(m + VQ_USED_OFF(size));
	q->size = size;
	q->index = index;
	q->avail_idx = q->last_used = q->next_desc = 0;
	q->event_idx = event_idx;
	q->notify_addr = 0;
	q->notify_width = 4;
	q->notify_value = index;
	q->kicks = q->kicks_suppressed = 0;
}

struct vq_buf {
	uint64_t addr;
	uint32_t len;
	int write;                 /* device-writable */
};

/* Write a chain of n descriptors (readable ones first) and make it available;
 * returns its head.  Does not notify. */
static inline uint16_t vq_add(struct vq *q, const struct vq_buf *bufs, unsigned n)
{
	uint16_t head = q->next_desc, i = head;
	unsigned k;

	for (k = 0; k < n; k++) {
		uint16_t next = (uint16_t)((i + 1) % q->size);

		q->desc[i].addr = bufs[k].addr;
		q->desc[i].len = bufs[k].len;
		q->desc[i].flags = (bufs[k].write ? VRING_DESC_F_WRITE : 0) |
				   (k + 1 < n ? VRING_DESC_F_NEXT : 0);
		q->desc[i].next = next;
		i = next;
	}
	q->next_desc = i;
	q->avail[2 + q->avail_idx % q->size] = head;
	virtio_wmb();
	q->avail_idx++;
	q->avail[1] = q->avail_idx;
	return head;
}

/* Make a prepared head available (descriptors written by the caller). */
static inline void vq_add_head(struct vq *q, uint16_t head)
{
	q->avail[2 + q->avail_idx % q->size] = head;
	virtio_wmb();
	q->avail_idx++;
	q->avail[1] = q->avail_idx;
}

static inline void vq_notify_now(struct vq *q)
{
	q->kicks++;
	if (q->notify_width == 2)
		*(volatile uint16_t *)q->notify_addr = (uint16_t)q->notify_value;
	else
		*(volatile uint32_t *)q->notify_addr = q->notify_value;
}

/* Notify the device unless it asked not to be (section 2.7.13.4: the
 * avail_event with VIRTIO_F_EVENT_IDX, else VRING_USED_F_NO_NOTIFY).
 * `old` is avail_idx before the chains just added. */
static inline void vq_kick(struct vq *q, uint16_t old)
{
	int need;

	virtio_mb(); /* avail idx visible before the device's words are read */
	if (q->event_idx) {
		uint16_t ev = *vq_avail_event(q), nw = q->avail_idx;

		need = (uint16_t)(nw - ev - 1) < (uint16_t)(nw - old);
	} else {
		need = !(q->used[0] & VRING_USED_F_NO_NOTIFY);
	}
	if (need)
		vq_notify_now(q);
	else
		q->kicks_suppressed++;
}

/* Ask for an interrupt at the next used buffer (used_event = last_used)
 * or none (VRING_AVAIL_F_NO_INTERRUPT, without EVENT_IDX only). */
static inline void vq_want_interrupt(struct vq *q, int want)
{
	if (q->event_idx)
		*vq_used_event(q) = want ? q->last_used : (uint16_t)(q->last_used - 1);
	else
		q->avail[0] = want ? 0 : VRING_AVAIL_F_NO_INTERRUPT;
	virtio_mb();
}

static inline int vq_has_used(struct vq *q)
{
	return q->used[1] != q->last_used;
}

/* Take the next used element: its id (head), and bytes written in *len.
 * Returns -1 when there is none. */
static inline int vq_get_used(struct vq *q, uint32_t *len)
{
	volatile struct vring_used_elem *e;

	if (!vq_has_used(q))
		return -1;
	__asm__ volatile("" ::: "memory"); /* the element after the index */
	e = vq_used_elem(q, q->last_used);
	if (len)
		*len = e->len;
	q->last_used++;
	return (int)e->id;
}

/* ---- virtio-mmio (section 4.2.2) -------------------------------------------- */
static inline uint32_t vmmio_read(uintptr_t base, unsigned reg)
{
	return *(volatile uint32_t *)(base + reg);
}

static inline void vmmio_write(uintptr_t base, unsigned reg, uint32_t v)
{
	*(volatile uint32_t *)(base + reg) = v;
}

/* The device id at `base` when a version-2 device answers there, else 0
 * (0 is also what an empty window, "no device", reports). */
static inline uint32_t vmmio_probe(uintptr_t base)
{
	if (vmmio_read(base, VMMIO_MAGIC_VALUE) != VIRTIO_MMIO_MAGIC ||
	    vmmio_read(base, VMMIO_VERSION) != 2)
		return 0;
	return vmmio_read(base, VMMIO_DEVICE_ID);
}

static inline uint64_t vmmio_device_features(uintptr_t base)
{
	uint64_t f;

	vmmio_write(base, VMMIO_DEVICE_FEATURES_SEL, 1);
	f = (uint64_t)vmmio_read(base, VMMIO_DEVICE_FEATURES) << 32;
	vmmio_write(base, VMMIO_DEVICE_FEATURES_SEL, 0);
	return f | vmmio_read(base, VMMIO_DEVICE_FEATURES);
}

static inline void vmmio_driver_features(uintptr_t base, uint64_t f)
{
	vmmio_write(base, VMMIO_DRIVER_FEATURES_SEL, 1);
	vmmio_write(base, VMMIO_DRIVER_FEATURES, (uint32_t)(f >> 32));
	vmmio_write(base, VMMIO_DRIVER_FEATURES_SEL, 0);
	vmmio_write(base, VMMIO_DRIVER_FEATURES, (uint32_t)f);
}

/* Section 3.1.1 steps 1-6: reset, ACKNOWLEDGE, DRIVER, accept the offered
 * features among `want`, FEATURES_OK.  Returns the accepted features, or 0
 * when the device did not keep FEATURES_OK (then FAILED is set). */
static inline uint64_t vmmio_negotiate(uintptr_t base, uint64_t want)
{
	uint64_t f;

	vmmio_write(base, VMMIO_STATUS, 0);
	vmmio_write(base, VMMIO_STATUS, VIRTIO_STATUS_ACKNOWLEDGE);
	vmmio_write(base, VMMIO_STATUS, VIRTIO_STATUS_ACKNOWLEDGE | VIRTIO_STATUS_DRIVER);
	f = vmmio_device_features(base) & want;
	vmmio_driver_features(base, f);
	vmmio_write(base, VMMIO_STATUS, VIRTIO_STATUS_ACKNOWLEDGE | VIRTIO_STATUS_DRIVER |
					 VIRTIO_STATUS_FEATURES_OK);
	if (!(vmmio_read(base, VMMIO_STATUS) & VIRTIO_STATUS_FEATURES_OK)) {
		vmmio_write(base, VMMIO_STATUS, vmmio_read(base, VMMIO_STATUS) |
						 VIRTIO_STATUS_FAILED);
		return 0;
	}
	return f;
}

/* Section 4.2.3.2: set queue `index` up with `q` laid out in `mem`
 * (VQ_BYTES(size) bytes, 4 KiB aligned).  Returns QueueReady read back
 * (1: the device took it), 0 when the device has no such queue, or a
 * smaller QueueNumMax. */
static inline int vmmio_setup_queue(uintptr_t base, unsigned index, struct vq *q, void *mem,
				    unsigned size, int event_idx)
{
	uint64_t d, a, u;

	vmmio_write(base, VMMIO_QUEUE_SEL, index);
	if (vmmio_read(base, VMMIO_QUEUE_READY))
		return 0;
	if (vmmio_read(base, VMMIO_QUEUE_NUM_MAX) < size)
		return 0;
	vq_init(q, mem, index, size, event_idx);
	q->notify_addr = base + VMMIO_QUEUE_NOTIFY;
	q->notify_width = 4;
	q->notify_value = index;
	d = (uintptr_t)q->desc;
	a = (uintptr_t)q->avail;
	u = (uintptr_t)q->used;
	vmmio_write(base, VMMIO_QUEUE_NUM, size);
	vmmio_write(base, VMMIO_QUEUE_DESC_LOW, (uint32_t)d);
	vmmio_write(base, VMMIO_QUEUE_DESC_HIGH, (uint32_t)(d >> 32));
	vmmio_write(base, VMMIO_QUEUE_DRIVER_LOW, (uint32_t)a);
	vmmio_write(base, VMMIO_QUEUE_DRIVER_HIGH, (uint32_t)(a >> 32));
	vmmio_write(base, VMMIO_QUEUE_DEVICE_LOW, (uint32_t)u);
	vmmio_write(base, VMMIO_QUEUE_DEVICE_HIGH, (uint32_t)(u >> 32));
	vmmio_write(base, VMMIO_QUEUE_READY, 1);
	return (int)vmmio_read(base, VMMIO_QUEUE_READY);
}

static inline void vmmio_driver_ok(uintptr_t base)
{
	vmmio_write(base, VMMIO_STATUS, vmmio_read(base, VMMIO_STATUS) | VIRTIO_STATUS_DRIVER_OK);
}

/* An interrupt handler's part: read InterruptStatus, acknowledge it (which
 * lowers the level-triggered line) and return what it was. */
static inline uint32_t vmmio_ack_interrupt(uintptr_t base)
{
	uint32_t s = vmmio_read(base, VMMIO_INTERRUPT_STATUS);

	if (s)
		vmmio_write(base, VMMIO_INTERRUPT_ACK, s);
	return s;
}

/* ---- virtio-pci, modern (section 4.1) ---------------------------------------- */
struct vpci {
	int dev;
	uintptr_t common, notify, isr, devcfg, msix;
	uint32_t mult, caps;       /* notify_off_multiplier; bit per cfg_type found */
};

static inline uint32_t vpci_bar(int dev, int n)
{
	return pci_read32(0, dev, 0, 0x10 + 4 * n) & ~0xfu;
}

/* The first function on bus 0 whose vendor/device id dword is `id` (e.g. 0x10421af4 for
 * virtio-blk), or -1. */
static inline int vpci_slot_of(uint32_t id)
{
	int dev;

	for (dev = 0; dev < 32; dev++)
		if (pci_read32(0, dev, 0, 0) == id)
			return dev;
	return -1;
}

/* Walk the capabilities of 00:dev.0: the virtio structures' addresses (section 4.1.4) and
 * the MSI-X table, which it enables; turns on memory decoding and bus mastering. */
static inline void vpci_find(struct vpci *p, int dev)
{
	int off = pci_read8(0, dev, 0, 0x34), guard = 0;

	p->dev = dev;
	p->caps = 0;
	pci_write32(0, dev, 0, 0x04, pci_read32(0, dev, 0, 0x04) | 0x06);
	while (off && guard++ < 48) {
		int id = pci_read8(0, dev, 0, off);

		if (id == 0x09) {
			int type = pci_read8(0, dev, 0, off + 3), b = pci_read8(0, dev, 0, off + 4);
			uintptr_t a = vpci_bar(dev, b) + pci_read32(0, dev, 0, off + 8);

			p->caps |= 1u << type;
			if (type == 1)
				p->common = a;
			else if (type == 2) {
				p->notify = a;
				p->mult = pci_read32(0, dev, 0, off + 16);
			} else if (type == 3)
				p->isr = a;
			else if (type == 4)
				p->devcfg = a;
		} else if (id == 0x11) {
			uint32_t tbl = pci_read32(0, dev, 0, off + 4);

			p->msix = vpci_bar(dev, tbl & 7) + (tbl & ~7u);
			pci_write32(0, dev, 0, off, pci_read32(0, dev, 0, off) | (1u << 31));
		}
		off = pci_read8(0, dev, 0, off + 1);
	}
}

#define VPCI_C8(p, o) (*(volatile uint8_t *)((p)->common + (o)))
#define VPCI_C16(p, o) (*(volatile uint16_t *)((p)->common + (o)))
#define VPCI_C32(p, o) (*(volatile uint32_t *)((p)->common + (o)))

/* Reset, then negotiate the features in `want` the device offers; returns the status read
 * back after FEATURES_OK (bit 3 clear: refused). */
static inline uint32_t vpci_negotiate(struct vpci *p, uint64_t want)
{
	uint64_t have;

	VPCI_C8(p, 0x14) = 0;
	VPCI_C8(p, 0x14) = VIRTIO_STATUS_ACKNOWLEDGE | VIRTIO_STATUS_DRIVER;
	VPCI_C32(p, 0x00) = 0;
	have = VPCI_C32(p, 0x04);
	VPCI_C32(p, 0x00) = 1;
	have |= (uint64_t)VPCI_C32(p, 0x04) << 32;
	want &= have;
	VPCI_C32(p, 0x08) = 0;
	VPCI_C32(p, 0x0c) = (uint32_t)want;
	VPCI_C32(p, 0x08) = 1;
	VPCI_C32(p, 0x0c) = (uint32_t)(want >> 32);
	VPCI_C8(p, 0x14) = VIRTIO_STATUS_ACKNOWLEDGE | VIRTIO_STATUS_DRIVER |
			   VIRTIO_STATUS_FEATURES_OK;
	return VPCI_C8(p, 0x14);
}

/* MSI-X table entry `entry`: interrupt vector `vec` on APIC 0, unmasked. */
static inline void vpci_vector(struct vpci *p, int entry, int vec)
{
	volatile uint32_t *e = (volatile uint32_t *)(p->msix + 16 * entry);

	e[0] = 0xfee00000u;
	e[1] = 0;
	e[2] = vec;
	e[3] = 0;
}

/* Lay queue `index` (`size` entries) out in `mem` and hand it to the device, signalled on
 * MSI-X table entry `msix_entry`. Call before vpci_driver_ok(). */
static inline void vpci_queue(struct vpci *p, struct vq *q, unsigned index, void *mem,
			      unsigned size, int msix_entry)
{
	uintptr_t m = (uintptr_t)mem;

	vq_init(q, mem, index, size, 1);
	VPCI_C16(p, 0x16) = index;
	VPCI_C16(p, 0x18) = size;
	VPCI_C32(p, 0x20) = (uint32_t)m;
	VPCI_C32(p, 0x24) = 0;
	VPCI_C32(p, 0x28) = (uint32_t)(m + VQ_AVAIL_OFF(size));
	VPCI_C32(p, 0x2c) = 0;
	VPCI_C32(p, 0x30) = (uint32_t)(m + VQ_USED_OFF(size));
	VPCI_C32(p, 0x34) = 0;
	VPCI_C16(p, 0x1a) = msix_entry;
	q->notify_addr = p->notify + VPCI_C16(p, 0x1e) * p->mult;
	q->notify_width = 2;
	q->notify_value = index;
	VPCI_C16(p, 0x1c) = 1;
}

static inline void vpci_driver_ok(struct vpci *p)
{
	VPCI_C8(p, 0x14) = VPCI_C8(p, 0x14) | VIRTIO_STATUS_DRIVER_OK;
}

/* Spin until *count moves past `before` (an interrupt handler counts), bounded. */
static inline void virtio_wait(volatile uint64_t *count, uint64_t before)
{
	int i;

	for (i = 0; i < 200000 && *count == before; i++)
		__asm__ volatile("pause");
}

/* Make a chain of n buffers available, notify, wait for the interrupt and take the used
 * element; returns the bytes the device wrote. */
static inline uint32_t virtio_submit(struct vq *q, struct vq_buf *b, int n,
				     volatile uint64_t *count)
{
	uint16_t old = q->avail_idx;
	uint64_t before = *count;
	uint32_t len = 0;

	vq_want_interrupt(q, 1);
	vq_add(q, b, n);
	vq_kick(q, old);
	virtio_wait(count, before);
	vq_get_used(q, &len);
	return len;
}

#endif /* PYKVM_VIRTIO_H */
