/*
 * virtio_pci: virtio-rng and virtio-blk on the pc machine's PCI bus (the first function of
 * each with the virtio vendor id and the modern device id), found through their capabilities (virtio 1.2 section 4.1.4), driven through the
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

static uint8_t rng_ring[VQ_BYTES(QSIZE)] __attribute__((aligned(4096)));
static uint8_t blk_ring[VQ_BYTES(QSIZE)] __attribute__((aligned(4096)));
static uint8_t r1[32], r2[32], sector_out[512], sector_in[512], idbuf[20];
static struct vq rq, bq;
static volatile uint64_t rng_msis, blk_msis;

static void on_rng(struct pykvm_intr_frame *f) { (void)f; rng_msis++; lapic_write(LAPIC_EOI, 0); }
static void on_blk(struct pykvm_intr_frame *f) { (void)f; blk_msis++; lapic_write(LAPIC_EOI, 0); }

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
		virtio_submit(&bq, b, 3, &blk_msis);
	else {
		b[1] = b[2];
		virtio_submit(&bq, b, 2, &blk_msis);
	}
	return status;
}

void guest_main(void)
{
	struct vpci rng, dsk;
	int rslot = vpci_slot_of(0x10441af4), bslot = vpci_slot_of(0x10421af4);
	uint32_t st, l1, l2, i, differ = 0, same = 1;
	uint8_t ws, fs, rs, past, unknown;
	uint64_t id8 = 0;

	if (rslot < 0 || bslot < 0)
		GUEST_SYNC(1, rslot, bslot, 0, 0, 0);
	vpci_find(&rng, rslot);
	vpci_find(&dsk, bslot);
	GUEST_SYNC(1, pci_read32(0, rslot, 0, 0), pci_read32(0, bslot, 0, 0), rng.caps,
		   ((pci_read32(0, rslot, 0, 0x98) >> 16) & 0x7ff) + 1, rng.mult);

	pykvm_set_handler(VEC_RNG, on_rng);
	pykvm_set_handler(VEC_BLK, on_blk);
	pc_interrupts_via_ioapic();
	sti();
	vpci_vector(&rng, 0, VEC_RNG);
	st = vpci_negotiate(&rng, WANT);
	vpci_queue(&rng, &rq, 0, rng_ring, QSIZE, 0);
	vpci_driver_ok(&rng);
	{
		struct vq_buf b1 = { (uintptr_t)r1, sizeof(r1), 1 }, b2 = { (uintptr_t)r2, sizeof(r2), 1 };

		l1 = virtio_submit(&rq, &b1, 1, &rng_msis);
		l2 = virtio_submit(&rq, &b2, 1, &rng_msis);
	}
	for (i = 0; i < sizeof(r1); i++)
		differ |= r1[i] != r2[i];
	GUEST_SYNC(2, st, l1 | (uint64_t)l2 << 32, differ, rng_msis);

	vpci_vector(&dsk, 0, VEC_BLK);
	vpci_negotiate(&dsk, WANT | (1ull << 9) | (1ull << 6));       /* FLUSH, BLK_SIZE */
	vpci_queue(&dsk, &bq, 0, blk_ring, QSIZE, 0);
	vpci_driver_ok(&dsk);
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
	GUEST_SYNC(4, past, unknown, VPCI_C8(&dsk, 0x14));
}
