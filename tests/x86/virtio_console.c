/*
 * virtio_console: a virtio console (virtio 1.2 section 5.3) on the pc machine's PCI bus, found
 * by its id. The guest writes a greeting on the transmitq, then echoes what arrives on the
 * receiveq, upper-cased, until it has seen a newline.
 *
 * SYNC(1, FEATURES_OK status, bytes received, MSIs on the receive vector,
 *      MSIs on the transmit vector)
 */
#include "virtio.h"

#define VEC_RX 0x53
#define VEC_TX 0x54
#define QSIZE 8
#define WANT ((1ull << VIRTIO_F_VERSION_1) | (1ull << VIRTIO_F_EVENT_IDX))

static uint8_t rx_ring[VQ_BYTES(QSIZE)] __attribute__((aligned(4096)));
static uint8_t tx_ring[VQ_BYTES(QSIZE)] __attribute__((aligned(4096)));
static uint8_t rxbuf[64], txbuf[64];
static struct vq rxq, txq;
static volatile uint64_t rx_msis, tx_msis;

static void on_rx(struct pykvm_intr_frame *f) { (void)f; rx_msis++; lapic_write(LAPIC_EOI, 0); }
static void on_tx(struct pykvm_intr_frame *f) { (void)f; tx_msis++; lapic_write(LAPIC_EOI, 0); }

static void send(const uint8_t *s, uint32_t n)
{
	struct vq_buf b = { (uintptr_t)txbuf, n, 0 };
	uint32_t i;

	for (i = 0; i < n && i < sizeof(txbuf); i++)
		txbuf[i] = s[i];
	virtio_submit(&txq, &b, 1, &tx_msis);
}

void guest_main(void)
{
	static const uint8_t hello[] = "hello from virtio-console\n";
	struct vpci con;
	uint32_t st, got = 0, n, i;
	int slot = vpci_slot_of(0x10431af4), done = 0;

	if (slot < 0)
		GUEST_SYNC(1, 0, 0, 0, 0);
	vpci_find(&con, slot);
	pykvm_set_handler(VEC_RX, on_rx);
	pykvm_set_handler(VEC_TX, on_tx);
	pc_interrupts_via_ioapic();
	sti();
	vpci_vector(&con, 0, VEC_RX);
	vpci_vector(&con, 1, VEC_TX);
	st = vpci_negotiate(&con, WANT);
	vpci_queue(&con, &rxq, 0, rx_ring, QSIZE, 0);
	vpci_queue(&con, &txq, 1, tx_ring, QSIZE, 1);
	vpci_driver_ok(&con);
	send(hello, sizeof(hello) - 1);
	while (!done && got < 1024) {
		struct vq_buf b = { (uintptr_t)rxbuf, sizeof(rxbuf), 1 };

		n = virtio_submit(&rxq, &b, 1, &rx_msis);
		if (!n)
			break;
		for (i = 0; i < n; i++) {
			if (rxbuf[i] >= 'a' && rxbuf[i] <= 'z')
				rxbuf[i] -= 32;
			done |= rxbuf[i] == '\n';
		}
		got += n;
		send(rxbuf, n);
	}
	cli();
	GUEST_SYNC(1, st, got, rx_msis, tx_msis);
}
