/*
 * virtio_vsock: a polling virtio-vsock driver on the pc machine (virtio 1.2 section 5.10), on
 * virtio-pci (the first function with id 0x1053/0x1af4) or, when there is none, on the
 * virtio-mmio window at 0xfeb00000. Interrupts stay off; the driver polls the used rings.
 * Eight receive buffers of RXBUF bytes wait in the rx queue, one 8-byte buffer in the event
 * queue. The host either builds packets itself (it writes a header and payload into tx_buf and
 * reads what arrived from rx_buf; both addresses are reported at stage 1) or lets the guest
 * serve a stream port on its own (SERVE: an echo server). Commands in pykvm_params[0]:
 *
 * SYNC(1, transport (1 PCI, 2 MMIO), accepted features, guest_cid, device status,
 *      tx_buf | rx_buf << 32)
 *   1 SEND len=params[1]: tx_buf[0..44) as the header, tx_buf[44..len) as the payload
 *     (a second descriptor); the device's thread returns the chain once it took the packet:
 *     waited for (LONG_WAIT TSC cycles at most, or until the device needs a reset),
 *     SYNC(n, used length, device status)
 *   2 RECV wait=params[1]: wait for a packet, params[1] * 10^9 TSC cycles (0: 8, about 2-4 s,
 *     for a check that none comes; one that expects a packet asks for about a minute, since the
 *     device answers from its host thread, as late as a loaded host schedules it); copied to
 *     rx_buf, SYNC(n, used length (0: none), device status)
 *   3 BADTX addr=params[1] len=params[2]: a chain whose only buffer is at addr, waited for as
 *     SEND's, SYNC(n, device status)
 *   4 SERVE port=params[1]: an echo server on stream port `port`: OP_REQUEST to it gets
 *     OP_RESPONSE, every OP_RW is sent back as it came (its own OP_RW, buf_alloc 64 KiB and
 *     the bytes consumed as fwd_cnt), OP_SHUTDOWN gets OP_RST and ends it, as does OP_RST or
 *     LONG_WAIT cycles without a packet (a failure's bound). SYNC(n, packets seen, bytes
 *     echoed, connections accepted, last op, host port, device status)
 *   0 DONE
 */
#include "virtio_poll.h"

#define QSIZE 16
#define NRX 8
#define RXBUF 4352
#define HDR 44
/* TSC cycles the driver waits for an answer it expects: about a minute (57 s at 2.8 GHz, 40 s
 * at 4 GHz), a bound on a failure only */
#define LONG_WAIT 160000000000ull
#define SLICE 100000000ull		/* between looks at the device status while sending */
#define NEEDS_RESET 64
#define ID_VSOCK 19
#define WANT ((1ull << VIRTIO_F_VERSION_1) | (1ull << VIRTIO_F_EVENT_IDX) | 1ull)

#define OP_REQUEST 1
#define OP_RESPONSE 2
#define OP_RST 3
#define OP_SHUTDOWN 4
#define OP_RW 5

struct vhdr {
	uint64_t src_cid, dst_cid;
	uint32_t src_port, dst_port, len;
	uint16_t type, op;
	uint32_t flags, buf_alloc, fwd_cnt;
} __attribute__((packed));

static uint8_t rx_ring[VQ_BYTES(QSIZE)] __attribute__((aligned(4096)));
static uint8_t tx_ring[VQ_BYTES(QSIZE)] __attribute__((aligned(4096)));
static uint8_t ev_ring[VQ_BYTES(QSIZE)] __attribute__((aligned(4096)));
static uint8_t rx_bufs[NRX][RXBUF] __attribute__((aligned(64)));
static uint8_t tx_buf[70000] __attribute__((aligned(64)));
static uint8_t rx_buf[RXBUF] __attribute__((aligned(64)));
static uint8_t ev_buf[8];
static struct vhdr reply;
static struct vq rxq, txq, evq;
static struct vq *const queues[] = { &rxq, &txq, &evq };
static void *const rings[] = { rx_ring, tx_ring, ev_ring };

static uint32_t cfg32(unsigned off)
{
	return *(volatile uint32_t *)vpoll_cfg(off);
}

/* header at hdr, payload of n bytes at data (n may be 0): one chain, waited for */
static uint32_t send_pkt(uint64_t hdr, uint32_t hlen, uint64_t data, uint32_t n)
{
	struct vq_buf b[2] = { { hdr, hlen, 0 }, { data, n, 0 } };
	uint16_t old = txq.avail_idx;
	uint32_t used = 0;
	uint64_t t0;

	vq_add(&txq, b, n ? 2 : 1);
	vq_kick(&txq, old);
	for (t0 = rdtsc();;) {
		if (wait_used(&txq, &used, SLICE) >= 0 || (dev_status() & NEEDS_RESET) ||
		    rdtsc() - t0 > LONG_WAIT)
			return used;
	}
}

static void answer(const struct vhdr *h, uint16_t op, uint32_t len, uint32_t fwd)
{
	reply.src_cid = h->dst_cid;
	reply.dst_cid = h->src_cid;
	reply.src_port = h->dst_port;
	reply.dst_port = h->src_port;
	reply.len = len;
	reply.type = 1;
	reply.op = op;
	reply.flags = 0;
	reply.buf_alloc = 65536;
	reply.fwd_cnt = fwd;
	send_pkt((uintptr_t)&reply, HDR, (uintptr_t)(h + 1), len);
}

static void serve(int stage, uint32_t port)
{
	uint64_t seen = 0, echoed = 0, accepted = 0, last = 0, host_port = 0;
	uint32_t fwd = 0, used;

	for (;;) {
		int head = wait_used(&rxq, &used, LONG_WAIT);
		struct vhdr *h;

		if (head < 0)
			break;
		h = (struct vhdr *)(uintptr_t)rxq.desc[head].addr;
		seen++;
		last = h->op;
		if (used >= HDR && h->dst_port == port) {
			if (h->op == OP_REQUEST) {
				accepted++;
				host_port = h->src_port;
				answer(h, OP_RESPONSE, 0, fwd);
			} else if (h->op == OP_RW && h->len <= used - HDR) {
				fwd += h->len;
				answer(h, OP_RW, h->len, fwd);
				echoed += h->len;
			} else if (h->op == OP_SHUTDOWN) {
				answer(h, OP_RST, 0, fwd);
				post(&rxq, (uintptr_t)h, RXBUF);
				break;
			} else if (h->op == OP_RST) {
				post(&rxq, (uintptr_t)h, RXBUF);
				break;
			}
		}
		post(&rxq, (uintptr_t)h, RXBUF);
	}
	GUEST_SYNC(stage, seen, echoed, accepted, last, host_port, dev_status());
}

void guest_main(void)
{
	int stage, i;
	uint64_t feat, cid;

	cli();
	feat = vpoll_start(ID_VSOCK, WANT, queues, rings, 3, QSIZE);
	cid = cfg32(0) | (uint64_t)cfg32(4) << 32;
	for (i = 0; i < NRX; i++)
		post(&rxq, (uintptr_t)rx_bufs[i], RXBUF);
	post(&evq, (uintptr_t)ev_buf, sizeof(ev_buf));
	GUEST_SYNC(1, on_pci ? 1 : 2, feat, cid, dev_status(),
		   (uintptr_t)tx_buf | (uint64_t)(uintptr_t)rx_buf << 32);

	for (stage = 2;; stage++) {
		uint64_t cmd = pykvm_params[0], a = pykvm_params[1], b = pykvm_params[2];
		uint32_t used = 0;

		if (cmd == 1) {
			used = send_pkt((uintptr_t)tx_buf, a < HDR ? (uint32_t)a : HDR,
					(uintptr_t)tx_buf + HDR, a > HDR ? (uint32_t)(a - HDR) : 0);
			GUEST_SYNC(stage, used, dev_status());
		} else if (cmd == 2) {
			int head = wait_used(&rxq, &used, (a ? a : 8) * 1000000000ull);

			if (head >= 0) {
				uint8_t *p = (uint8_t *)(uintptr_t)rxq.desc[head].addr;

				for (i = 0; i < (int)used && i < RXBUF; i++)
					rx_buf[i] = p[i];
				post(&rxq, (uintptr_t)p, RXBUF);
			} else {
				used = 0;
			}
			GUEST_SYNC(stage, used, dev_status());
		} else if (cmd == 3) {
			send_pkt(a, (uint32_t)b, 0, 0);
			GUEST_SYNC(stage, dev_status());
		} else if (cmd == 4) {
			serve(stage, (uint32_t)a);
		} else {
			break;
		}
	}
}
