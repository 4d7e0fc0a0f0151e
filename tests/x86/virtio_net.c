/*
 * virtio_net: a polling virtio-net driver on the pc machine (virtio 1.2 section 5.1), on
 * virtio-pci (the first function with id 0x1041/0x1af4) or, when there is none, on the
 * virtio-mmio window at 0xfeb00000. The host builds the frames: it writes one into tx_buf and
 * reads what arrived from rx_buf (both addresses are reported at stage 1), and says what to do
 * next in pykvm_params[0] before each sync. Interrupts stay off; the driver polls the used
 * rings (no MSI-X vector is assigned, the IOAPIC pin is never unmasked).
 *
 * SYNC(1, transport (1 PCI, 2 MMIO), accepted features, MAC (6 bytes, little-endian u64),
 *      config status, config mtu, device status, tx_buf | rx_buf << 32)
 * then per command (params[0]):
 *   1 SEND len=params[1]: tx_buf[0..len) goes as header + frame (two descriptors); the device's
 *     thread returns the chain when it has sent or dropped it: waited for (SEND_WAIT TSC
 *     cycles at most, or until the device needs a reset), SYNC(n, used length, device status)
 *   2 RECV type=params[1] (an ethertype, 0: any): wait (RECV_WAIT TSC cycles, about a minute:
 *     every RECV expects a frame, so this only bounds a failure, whatever the host's load) for a
 *     frame of that type (others are counted and skipped); copied to rx_buf without the virtio
 *     header
 *     SYNC(n, frame length (0: none came), used length, frames skipped, device status,
 *          header bytes 0-7, header bytes 8-11)
 *   3 BADTX addr=params[1] len=params[2]: a chain whose frame buffer is at addr, waited for as
 *     SEND's, SYNC(n, device status)
 *   4 CONFIG: SYNC(n, config status, device status, mtu)
 *   0 DONE
 */
#include "virtio_poll.h"

#define QSIZE 16
#define NRX 8
#define RXBUF 2048
#define HDR 12
/* How long the driver waits for the device (TSC cycles). The device answers from its own
 * host thread, as late as a loaded host schedules it; every wait here expects an answer, so
 * these bound a failure only: about a minute (57 s at 2.8 GHz, 40 s at 4 GHz). */
#define RECV_WAIT 160000000000ull
#define SEND_WAIT 160000000000ull
#define SLICE 100000000ull		/* between looks at the device status while sending */
#define NEEDS_RESET 64
#define WANT ((1ull << VIRTIO_F_VERSION_1) | (1ull << VIRTIO_F_EVENT_IDX) | (1ull << 3) | \
	      (1ull << 5) | (1ull << 16))

static uint8_t rx_ring[VQ_BYTES(QSIZE)] __attribute__((aligned(4096)));
static uint8_t tx_ring[VQ_BYTES(QSIZE)] __attribute__((aligned(4096)));
static uint8_t rx_bufs[NRX][RXBUF] __attribute__((aligned(64)));
static uint8_t tx_buf[70000] __attribute__((aligned(64)));
static uint8_t rx_buf[RXBUF] __attribute__((aligned(64)));
static uint8_t tx_hdr[HDR];
static struct vq rxq, txq;
static struct vq *const queues[] = { &rxq, &txq };
static void *const rings[] = { rx_ring, tx_ring };

static uint8_t cfg8(unsigned off)
{
	return *(volatile uint8_t *)vpoll_cfg(off);
}

static uint16_t cfg16(unsigned off)
{
	return *(volatile uint16_t *)vpoll_cfg(off);
}

static void post_rx(uint64_t addr)
{
	post(&rxq, addr, RXBUF);
}

static uint64_t send_chain(uint64_t addr, uint32_t len, uint32_t *used)
{
	struct vq_buf b[2] = { { (uintptr_t)tx_hdr, HDR, 0 }, { addr, len, 0 } };
	uint16_t old = txq.avail_idx;
	uint64_t t0;

	vq_add(&txq, b, 2);
	vq_kick(&txq, old);
	for (t0 = rdtsc();;) {
		int head = wait_used(&txq, used, SLICE);

		if (head >= 0 || (dev_status() & NEEDS_RESET) || rdtsc() - t0 > SEND_WAIT)
			return head;
	}
}

void guest_main(void)
{
	int stage, i;
	uint64_t feat, mac = 0;

	cli();
	feat = vpoll_start(1, WANT, queues, rings, 2, QSIZE);
	for (i = 0; i < 6; i++)
		mac |= (uint64_t)cfg8(i) << (8 * i);
	for (i = 0; i < NRX; i++)
		post_rx((uintptr_t)rx_bufs[i]);
	GUEST_SYNC(1, on_pci ? 1 : 2, feat, mac, cfg16(6), cfg16(10), dev_status(),
		   (uintptr_t)tx_buf | (uint64_t)(uintptr_t)rx_buf << 32);

	for (stage = 2;; stage++) {
		uint64_t cmd = pykvm_params[0], a = pykvm_params[1], b = pykvm_params[2];
		uint32_t used = 0;

		if (cmd == 1) {
			send_chain((uintptr_t)tx_buf, (uint32_t)a, &used);
			GUEST_SYNC(stage, used, dev_status());
		} else if (cmd == 2) {
			uint64_t skipped = 0, flen = 0, h0 = 0, h1 = 0;
			uint64_t t0 = rdtsc();

			while (rdtsc() - t0 < RECV_WAIT) {
				int head = wait_used(&rxq, &used, RECV_WAIT - (rdtsc() - t0));
				uint8_t *p;
				unsigned type;

				if (head < 0)
					break;
				p = (uint8_t *)(uintptr_t)rxq.desc[head].addr;
				type = used >= HDR + 14 ? (unsigned)p[HDR + 12] << 8 | p[HDR + 13] : 0;
				if (used >= HDR + 14 && (!a || type == a)) {
					flen = used - HDR;
					for (i = 0; i < 8; i++)
						h0 |= (uint64_t)p[i] << (8 * i);
					for (i = 0; i < 4; i++)
						h1 |= (uint64_t)p[8 + i] << (8 * i);
					for (i = 0; i < (int)flen && i < RXBUF; i++)
						rx_buf[i] = p[HDR + i];
					post_rx((uintptr_t)p);
					break;
				}
				skipped++;
				post_rx((uintptr_t)p);
			}
			GUEST_SYNC(stage, flen, used, skipped, dev_status(), h0, h1);
		} else if (cmd == 3) {
			send_chain(a, (uint32_t)b, &used);
			GUEST_SYNC(stage, dev_status());
		} else if (cmd == 4) {
			GUEST_SYNC(stage, cfg16(6), dev_status(), cfg16(10));
		} else {
			break;
		}
	}
}
