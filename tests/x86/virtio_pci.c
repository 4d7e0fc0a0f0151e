/*
 * virtio_pci: virtio-rng at 00:04.0 and virtio-blk at 00:05.0 on the pc machine's PCI bus,
 * found through their virtio capabilities (virtio 1.2 section 4.1.4), driven through the
 * common configuration in BAR 4, completions signalled by MSI-X (one vector per queue).
 *
 * SYNC(1, rng vendor | device << 16, blk vendor | device << 16, capability types found on
 *      the rng function (bit per cfg_type), MSI-X table size of rng, notify_off_multiplier)
 * SYNC(2, rng status after FEATURES_OK, bytes of read 1 | read 2 << 32, the reads differ,
 *      MSIs taken on the rng vector)
 * SYNC(3, blk capacity in sectors, write status, flush status, read status, read back equals
 *      what was written, the first 8 bytes of GET_ID, MSIs taken on the blk vector)
 * SYNC(4, status of a read past the end, status of an unknown request type, blk status)
 */
#include "virtio.h"

#define VEC_RNG 0x51
#define VEC_BLK 0x52
#define QSIZE 8
#define WANT ((1ull << VIRTIO_F_VERSION_1) | (1ull << VIRTIO_F_EVENT_IDX))

struct vpci {
	int dev;
	uintptr_t common, notify, isr, devcfg, msix;
	uint32_t mult, caps;
};

static uint8_t rng_ring[VQ_BYTES(QSIZE)] __attribute__((aligned(4096)));
static uint8_t blk_ring[VQ_BYTES(QSIZE)] __attribute__((aligned(4096)));
static uint8_t r1[32], r2[32], sector_out[512], sector_in[512], idbuf[20];
static struct vq rq, bq;
static volatile uint64_t rng_msis, blk_msis;

static void on_rng(struct pykvm_intr_frame *f) { (void)f; rng_msis++; lapic_write(LAPIC_EOI, 0); }
static void on_blk(struct pykvm_intr_frame *f) { (void)f; blk_msis++; lapic_write(LAPIC_EOI, 0); }

static uint32_t bar(int dev, int n)
{
	return pci_read32(0, dev, 0, 0x10 + 4 * n) & ~0xfu;
}

static void find(struct vpci *p, int dev)
{
	int off = pci_read8(0, dev, 0, 0x34), guard = 0;

	p->dev = dev;
	p->caps = 0;
	pci_write32(0, dev, 0, 0x04, pci_read32(0, dev, 0, 0x04) | 0x06); /* memory, bus master */
	while (off && guard++ < 48) {
		int id = pci_read8(0, dev, 0, off);

		if (id == 0x09) {
			int type = pci_read8(0, dev, 0, off + 3), b = pci_read8(0, dev, 0, off + 4);
			uintptr_t a = bar(dev, b) + pci_read32(0, dev, 0, off + 8);

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

			p->msix = bar(dev, tbl & 7) + (tbl & ~7u);
			/* enable MSI-X (message control bit 15) */
			pci_write32(0, dev, 0, off, pci_read32(0, dev, 0, off) | (1u << 31));
		}
		off = pci_read8(0, dev, 0, off + 1);
	}
}

#define C8(p, o) (*(volatile uint8_t *)((p)->common + (o)))
#define C16(p, o) (*(volatile uint16_t *)((p)->common + (o)))
#define C32(p, o) (*(volatile uint32_t *)((p)->common + (o)))

static uint32_t negotiate(struct vpci *p, uint64_t want)
{
	uint64_t have;

	C8(p, 0x14) = 0;
	C8(p, 0x14) = VIRTIO_STATUS_ACKNOWLEDGE | VIRTIO_STATUS_DRIVER;
	C32(p, 0x00) = 0;
	have = C32(p, 0x04);
	C32(p, 0x00) = 1;
	have |= (uint64_t)C32(p, 0x04) << 32;
	want &= have;
	C32(p, 0x08) = 0;
	C32(p, 0x0c) = (uint32_t)want;
	C32(p, 0x08) = 1;
	C32(p, 0x0c) = (uint32_t)(want >> 32);
	C8(p, 0x14) = VIRTIO_STATUS_ACKNOWLEDGE | VIRTIO_STATUS_DRIVER | VIRTIO_STATUS_FEATURES_OK;
	return C8(p, 0x14);
}

static void vector(struct vpci *p, int entry, int vec)
{
	volatile uint32_t *e = (volatile uint32_t *)(p->msix + 16 * entry);

	e[0] = 0xfee00000u;   /* to APIC 0 */
	e[1] = 0;
	e[2] = vec;
	e[3] = 0;             /* unmasked */
}

static void queue(struct vpci *p, struct vq *q, void *mem, int msix_entry)
{
	uintptr_t m = (uintptr_t)mem;

	vq_init(q, mem, 0, QSIZE, 1);
	C16(p, 0x16) = 0;
	C16(p, 0x18) = QSIZE;
	C32(p, 0x20) = (uint32_t)m;
	C32(p, 0x24) = 0;
	C32(p, 0x28) = (uint32_t)(m + VQ_AVAIL_OFF(QSIZE));
	C32(p, 0x2c) = 0;
	C32(p, 0x30) = (uint32_t)(m + VQ_USED_OFF(QSIZE));
	C32(p, 0x34) = 0;
	C16(p, 0x1a) = msix_entry;
	q->notify_addr = p->notify + C16(p, 0x1e) * p->mult;
	q->notify_width = 2;
	q->notify_value = 0;
	C16(p, 0x1c) = 1;
	C8(p, 0x14) = C8(p, 0x14) | VIRTIO_STATUS_DRIVER_OK;
}

static void wait(volatile uint64_t *count, uint64_t before)
{
	int i;

	for (i = 0; i < 200000 && *count == before; i++)
		__asm__ volatile("pause");
}

static uint32_t submit(struct vq *q, struct vq_buf *b, int n, volatile uint64_t *count)
{
	uint16_t old = q->avail_idx;
	uint64_t before = *count;
	uint32_t len = 0;

	vq_want_interrupt(q, 1);
	vq_add(q, b, n);
	vq_kick(q, old);
	wait(count, before);
	vq_get_used(q, &len);
	return len;
}

struct blk_req { uint32_t type, reserved; uint64_t sector; };
static struct blk_req hdr;
static volatile uint8_t status;

static uint8_t blk(uint32_t type, uint64_t sector, void *data, uint32_t len, int write)
{
	struct vq_buf b[3] = {
		{ (uintptr_t)&hdr, sizeof(hdr), 0 },
		{ (uintptr_t)data, len, write },
		{ (uintptr_t)&status, 1, 1 },
	};

	hdr.type = type;
	hdr.sector = sector;
	status = 0xee;
	if (len)
		submit(&bq, b, 3, &blk_msis);
	else {
		b[1] = b[2];
		submit(&bq, b, 2, &blk_msis);
	}
	return status;
}

void guest_main(void)
{
	struct vpci rng, dsk;
	uint32_t st, l1, l2, i, differ = 0, same = 1;
	uint8_t ws, fs, rs, past, unknown;
	uint64_t id8 = 0;

	find(&rng, 4);
	find(&dsk, 5);
	GUEST_SYNC(1, pci_read32(0, 4, 0, 0), pci_read32(0, 5, 0, 0), rng.caps,
		   ((pci_read32(0, 4, 0, 0x98) >> 16) & 0x7ff) + 1, rng.mult);

	pykvm_set_handler(VEC_RNG, on_rng);
	pykvm_set_handler(VEC_BLK, on_blk);
	pc_interrupts_via_ioapic();
	sti();
	vector(&rng, 0, VEC_RNG);
	st = negotiate(&rng, WANT);
	queue(&rng, &rq, rng_ring, 0);
	{
		struct vq_buf b1 = { (uintptr_t)r1, sizeof(r1), 1 }, b2 = { (uintptr_t)r2, sizeof(r2), 1 };

		l1 = submit(&rq, &b1, 1, &rng_msis);
		l2 = submit(&rq, &b2, 1, &rng_msis);
	}
	for (i = 0; i < sizeof(r1); i++)
		differ |= r1[i] != r2[i];
	GUEST_SYNC(2, st, l1 | (uint64_t)l2 << 32, differ, rng_msis);

	vector(&dsk, 0, VEC_BLK);
	negotiate(&dsk, WANT | (1ull << 9) | (1ull << 6));       /* FLUSH, BLK_SIZE */
	queue(&dsk, &bq, blk_ring, 0);
	for (i = 0; i < sizeof(sector_out); i++)
		sector_out[i] = (uint8_t)(i * 7 + 3);
	ws = blk(1, 1, sector_out, 512, 0);                        /* OUT */
	fs = blk(4, 0, 0, 0, 0);                                   /* FLUSH */
	rs = blk(0, 1, sector_in, 512, 1);                         /* IN */
	for (i = 0; i < sizeof(sector_in); i++)
		same &= sector_in[i] == sector_out[i];
	blk(8, 0, idbuf, sizeof(idbuf), 1);                        /* GET_ID */
	for (i = 0; i < 8; i++)
		id8 |= (uint64_t)idbuf[i] << (8 * i);
	GUEST_SYNC(3, *(volatile uint64_t *)dsk.devcfg, ws, fs, rs, same, id8, blk_msis);

	past = blk(0, *(volatile uint64_t *)dsk.devcfg, sector_in, 512, 1);
	unknown = blk(0x77, 0, sector_in, 512, 1);
	cli();
	GUEST_SYNC(4, past, unknown, C8(&dsk, 0x14));
}
