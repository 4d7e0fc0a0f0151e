/*
 * virtio_mmio_rng: a virtio-rng device on virtio-mmio at 0xfeb00000 (pc
 * machine, interrupt on IOAPIC GSI 16, level), driven as section 3.1.1 of
 * virtio 1.2 says, plus the rule breaks a driver can make.
 *
 * SYNC(1, MagicValue, Version, DeviceID, VendorID, QueueNumMax of queue 0 |
 *      that of queue 1 << 32, SHMLenLow, 8-bit read of MagicValue)
 * SYNC(2, Status after FEATURES_OK without VERSION_1, Status after a reset,
 *      Status after a notify before any set-up, DeviceFeatures bits 0-31,
 *      DeviceFeatures bits 32-63, window 2 of DeviceFeatures)
 * SYNC(3, accepted features, QueueReady after QueueNum 3, QueueReady after
 *      QueueNum 8, Status after DRIVER_OK, QueueReady of queue 1 (never set
 *      up), QueueReady of queue 0 after writing 0 to it (and a new
 *      QueueDescLow) past DRIVER_OK)
 * SYNC(4, interrupts, InterruptStatus bits the handler saw, bytes written
 *      1 | bytes written 2 << 32, the two reads differ, used ids, avail_event,
 *      nonzero bytes in read 1)
 * SYNC(5, Status after a looping chain, InterruptStatus bits seen,
 *      interrupts, Status after a reset, bytes of a read after set-up again,
 *      interrupts)
 * SYNC(6, interrupts that found InterruptStatus 0)
 */
#include "virtio.h"

#define VEC 0x50
#define QSIZE 8
#define BASE ((uintptr_t)PC_VIRTIO_MMIO_BASE)
#define WANT ((1ull << VIRTIO_F_VERSION_1) | (1ull << VIRTIO_F_EVENT_IDX))

static uint8_t ring_mem[VQ_BYTES(QSIZE)] __attribute__((aligned(4096)));
static uint8_t buf1[32], buf2[32], buf3[32];
static struct vq q;
static volatile uint64_t irqs, isr_bits, spurious;

/* counts the interrupts that found InterruptStatus set; one that finds it 0
 * (the kvm_pvm host delivers a level-triggered interrupt once more after the
 * first exit that follows its EOI, though the line is low) is spurious, as
 * Linux's vm_interrupt() answers IRQ_NONE to it */
static void isr(struct pykvm_intr_frame *f)
{
	uint32_t s = vmmio_ack_interrupt(BASE);

	(void)f;
	if (s)
		irqs++;
	else
		spurious++;
	isr_bits |= s;
	lapic_write(LAPIC_EOI, 0);
}

static void wait_irq(uint64_t before)
{
	int i;

	for (i = 0; i < 100000 && irqs == before; i++)
		__asm__ volatile("pause");
}

/* one random read of n bytes into b; returns the used length, *id the head */
static uint32_t rng_read(uint8_t *b, uint32_t n, int *id)
{
	struct vq_buf vb = { (uintptr_t)b, n, 1 };
	uint16_t old = q.avail_idx;
	uint64_t before = irqs;
	uint32_t len = 0;

	vq_want_interrupt(&q, 1);
	vq_add(&q, &vb, 1);
	vq_kick(&q, old);
	wait_irq(before);
	*id = vq_get_used(&q, &len);
	return len;
}

static int setup(void)
{
	if (!vmmio_negotiate(BASE, WANT))
		return 0;
	if (vmmio_setup_queue(BASE, 0, &q, ring_mem, QSIZE, 1) != 1)
		return 0;
	vmmio_driver_ok(BASE);
	return 1;
}

void guest_main(void)
{
	uint32_t st_nov1, st_reset, st_notify, f_lo, f_hi, f_win2;
	uint32_t ready_bad, ready_good, st_ok, ready_q1;
	uint32_t len1, len2, differ = 0, nonzero = 0, i;
	uint64_t accepted, irq_before, qmax;
	int id1, id2, id3;

	/* 1: discovery */
	vmmio_write(BASE, VMMIO_QUEUE_SEL, 0);
	qmax = vmmio_read(BASE, VMMIO_QUEUE_NUM_MAX);
	vmmio_write(BASE, VMMIO_QUEUE_SEL, 1);
	qmax |= (uint64_t)vmmio_read(BASE, VMMIO_QUEUE_NUM_MAX) << 32;
	GUEST_SYNC(1, vmmio_read(BASE, VMMIO_MAGIC_VALUE), vmmio_read(BASE, VMMIO_VERSION),
		   vmmio_read(BASE, VMMIO_DEVICE_ID), vmmio_read(BASE, VMMIO_VENDOR_ID),
		   qmax,
		   vmmio_read(BASE, VMMIO_SHM_LEN_LOW), *(volatile uint8_t *)BASE);

	/* 2: negotiation out of order */
	vmmio_write(BASE, VMMIO_STATUS, VIRTIO_STATUS_ACKNOWLEDGE | VIRTIO_STATUS_DRIVER);
	vmmio_driver_features(BASE, 1ull << VIRTIO_F_EVENT_IDX);    /* no VERSION_1 */
	vmmio_write(BASE, VMMIO_STATUS, VIRTIO_STATUS_ACKNOWLEDGE | VIRTIO_STATUS_DRIVER |
					 VIRTIO_STATUS_FEATURES_OK);
	st_nov1 = vmmio_read(BASE, VMMIO_STATUS);
	vmmio_write(BASE, VMMIO_STATUS, 0);
	st_reset = vmmio_read(BASE, VMMIO_STATUS);
	vmmio_write(BASE, VMMIO_QUEUE_NOTIFY, 0);                   /* nothing set up */
	vmmio_write(BASE, VMMIO_QUEUE_NOTIFY, 5);
	st_notify = vmmio_read(BASE, VMMIO_STATUS);
	vmmio_write(BASE, VMMIO_DEVICE_FEATURES_SEL, 0);
	f_lo = vmmio_read(BASE, VMMIO_DEVICE_FEATURES);
	vmmio_write(BASE, VMMIO_DEVICE_FEATURES_SEL, 1);
	f_hi = vmmio_read(BASE, VMMIO_DEVICE_FEATURES);
	vmmio_write(BASE, VMMIO_DEVICE_FEATURES_SEL, 2);
	f_win2 = vmmio_read(BASE, VMMIO_DEVICE_FEATURES);
	GUEST_SYNC(2, st_nov1, st_reset, st_notify, f_lo, f_hi, f_win2);

	/* 3: the proper set-up, with rule breaks on the way */
	accepted = vmmio_negotiate(BASE, WANT);
	vmmio_driver_features(BASE, 0);       /* after FEATURES_OK: ignored */
	vmmio_write(BASE, VMMIO_QUEUE_SEL, 0);
	vmmio_write(BASE, VMMIO_QUEUE_NUM, 3);  /* not a power of 2 */
	vmmio_write(BASE, VMMIO_QUEUE_READY, 1);
	ready_bad = vmmio_read(BASE, VMMIO_QUEUE_READY);
	ready_good = vmmio_setup_queue(BASE, 0, &q, ring_mem, QSIZE, 1);
	pykvm_set_handler(VEC, isr);
	pc_interrupts_via_ioapic();
	ioapic_route(PC_VIRTIO_MMIO_GSI, VEC, 1);
	sti();
	vmmio_driver_ok(BASE);
	st_ok = vmmio_read(BASE, VMMIO_STATUS);
	vmmio_write(BASE, VMMIO_QUEUE_SEL, 1);
	ready_q1 = vmmio_read(BASE, VMMIO_QUEUE_READY);
	vmmio_write(BASE, VMMIO_QUEUE_SEL, 0);
	vmmio_write(BASE, VMMIO_QUEUE_DESC_LOW, 0x12345000);  /* after DRIVER_OK: ignored */
	vmmio_write(BASE, VMMIO_QUEUE_READY, 0);               /* likewise */
	GUEST_SYNC(3, accepted, ready_bad, ready_good, st_ok, ready_q1,
		   vmmio_read(BASE, VMMIO_QUEUE_READY));

	/* 4: two random reads, each completed by an interrupt */
	len1 = rng_read(buf1, sizeof(buf1), &id1);
	len2 = rng_read(buf2, sizeof(buf2), &id2);
	for (i = 0; i < sizeof(buf1); i++) {
		differ |= buf1[i] != buf2[i];
		nonzero += buf1[i] != 0;
	}
	GUEST_SYNC(4, irqs, isr_bits, len1 | (uint64_t)len2 << 32, differ, (uint64_t)id1 << 8 | (uint64_t)id2,
		   *vq_avail_event(&q), nonzero);

	/* 5: a chain that loops: the device marks itself broken, the VM runs on */
	isr_bits = 0;
	irq_before = irqs;
	vmmio_write(BASE, VMMIO_QUEUE_NOTIFY, 7);                   /* no such queue */
	q.desc[5].addr = (uintptr_t)buf3;
	q.desc[5].len = sizeof(buf3);
	q.desc[5].flags = VRING_DESC_F_WRITE | VRING_DESC_F_NEXT;
	q.desc[5].next = 6;
	q.desc[6] = q.desc[5];
	q.desc[6].next = 5;
	{
		uint16_t old = q.avail_idx;

		vq_add_head(&q, 5);
		vq_kick(&q, old);
	}
	wait_irq(irq_before);
	{
		uint32_t st_broken = vmmio_read(BASE, VMMIO_STATUS), bits = isr_bits;
		uint64_t n_irq = irqs - irq_before, len3 = 0;
		uint32_t st_after_reset;

		vmmio_write(BASE, VMMIO_STATUS, 0);
		st_after_reset = vmmio_read(BASE, VMMIO_STATUS);
		if (setup())
			len3 = rng_read(buf3, sizeof(buf3), &id3);
		GUEST_SYNC(5, st_broken, bits, n_irq, st_after_reset, len3, irqs - irq_before);
	}
	cli();
	GUEST_SYNC(6, spurious);
}
