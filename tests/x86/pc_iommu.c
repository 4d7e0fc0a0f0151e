/*
 * pc_iommu: QEMU's edu PCI device behind a VT-d IOMMU (pykvm run --pc-device
 * edu --pc-device intel-iommu): BAR sizing, the edu registers, DMA without
 * and with DMA remapping, a DMA fault, MSIs with and without interrupt
 * remapping, and INTx through the IOAPIC.
 *
 * SYNC(1, devfn, BAR 0, BAR size mask, id, liveness, 5!)
 * SYNC(2, words DMA'd RAM -> device -> RAM without the IOMMU, VT-d version)
 * SYNC(3, word at the remapped page after DMA to IOVA 0x200000, FSTS after a
 *      DMA to an unmapped IOVA, word at an unrelated page (untouched))
 * SYNC(4, compatibility MSI interrupts (vector 0x62), remapped MSI interrupts
 *      (IRTE vector 0x61), INTx interrupts (vector 0x63))
 */
#include "pc.h"

#define EDU_ID 0x00
#define EDU_ALIVE 0x04
#define EDU_FACT 0x08
#define EDU_INTR_RAISE 0x60
#define EDU_INTR_ACK 0x64
#define EDU_DMA_SRC 0x80
#define EDU_DMA_DST 0x88
#define EDU_DMA_CNT 0x90
#define EDU_DMA_CMD 0x98
#define VTD 0xfed90000u

static uint8_t pages[10][4096] __attribute__((aligned(4096)));
static volatile uint64_t hits[256];
static uintptr_t bar;

static void isr(struct pykvm_intr_frame *f)
{
	hits[f->vector]++;
	*(volatile uint32_t *)(bar + EDU_INTR_ACK) = 0xffffffff;
	lapic_write(LAPIC_EOI, 0);
}

static void edu_w32(unsigned r, uint32_t v) { *(volatile uint32_t *)(bar + r) = v; }
static uint32_t edu_r32(unsigned r) { return *(volatile uint32_t *)(bar + r); }
static void edu_w64(unsigned r, uint64_t v) { *(volatile uint64_t *)(bar + r) = v; }

static void dma(uint64_t src, uint64_t dst, uint32_t n, int from_dev)
{
	edu_w64(EDU_DMA_SRC, src);
	edu_w64(EDU_DMA_DST, dst);
	edu_w64(EDU_DMA_CNT, n);
	edu_w32(EDU_DMA_CMD, 1 | (from_dev ? 2 : 0));
	while (edu_r32(EDU_DMA_CMD) & 1)
		;
}

static void vtd_w32(unsigned r, uint32_t v) { mmio_write32(VTD + r, v); }
static uint32_t vtd_r32(unsigned r) { return mmio_read32(VTD + r); }
static void vtd_w64(unsigned r, uint64_t v) { *(volatile uint64_t *)(uintptr_t)(VTD + r) = v; }

static void vtd_cmd(uint32_t bit)
{
	vtd_w32(0x18, vtd_r32(0x1c) | bit);
}

static uint64_t wait_hits(int v, uint64_t n)
{
	uint64_t i;

	for (i = 0; i < 10000000 && hits[v] < n; i++)
		__asm__ volatile("pause");
	return hits[v];
}

void guest_main(void)
{
	int devfn;
	uint32_t size, *a = (uint32_t *)pages[0], *b = (uint32_t *)pages[1];
	uint32_t *c = (uint32_t *)pages[2], *u = (uint32_t *)pages[7];
	uint64_t *root = (uint64_t *)pages[3], *ctx = (uint64_t *)pages[4];
	uint64_t *l3 = (uint64_t *)pages[5], *irte = (uint64_t *)pages[6];
	uint64_t *l2, *l1;
	uint8_t msi;
	int i, same = 0;

	for (devfn = 0; devfn < 256; devfn++)
		if (pci_read32(0, devfn >> 3, devfn & 7, 0) == 0x11e81234)
			break;
	GUEST_ASSERT(devfn < 256);
	bar = pci_read32(0, devfn >> 3, devfn & 7, 0x10) & ~0xfu;
	pci_write32(0, devfn >> 3, devfn & 7, 0x10, 0xffffffff);
	size = pci_read32(0, devfn >> 3, devfn & 7, 0x10);
	pci_write32(0, devfn >> 3, devfn & 7, 0x10, (uint32_t)bar);
	pci_write32(0, devfn >> 3, devfn & 7, 0x04, 0x06);	/* memory, bus master */
	edu_w32(EDU_ALIVE, 0x12345678);
	edu_w32(EDU_FACT, 5);
	GUEST_SYNC(1, devfn, bar, size, edu_r32(EDU_ID), edu_r32(EDU_ALIVE), edu_r32(EDU_FACT));

	/* DMA, no translation: a -> device buffer -> b */
	for (i = 0; i < 16; i++)
		a[i] = 0xa5a50000u + i;
	dma((uintptr_t)a, 0x40000, 64, 0);
	dma(0x40000, (uintptr_t)b, 64, 1);
	for (i = 0; i < 16; i++)
		same += b[i] == a[i];
	GUEST_SYNC(2, same, vtd_r32(0));

	/* DMA remapping: IOVA 0x200000 -> page c for devfn, 3-level tables */
	l2 = (uint64_t *)pages[8];
	l1 = (uint64_t *)pages[9];
	root[0] = (uintptr_t)ctx | 1;
	ctx[devfn * 2] = (uintptr_t)l3 | 1;		/* present, TT 0 */
	ctx[devfn * 2 + 1] = 1;				/* AW: 39-bit */
	l3[0] = ((uintptr_t)l2) | 3;
	l2[1] = ((uintptr_t)l1) | 3;			/* 0x200000 is l2 index 1 */
	l1[0] = (uintptr_t)c | 3;
	vtd_w64(0x20, (uintptr_t)root);
	vtd_cmd(1u << 30);				/* SRTP */
	vtd_cmd(1u << 31);				/* TE */
	u[0] = 0x11111111;
	dma(0x40000, 0x200000, 4, 1);
	dma(0x40000, 0x400000, 4, 1);			/* not mapped: a fault */
	GUEST_SYNC(3, c[0], vtd_r32(0x34), u[0]);

	/* interrupts */
	pykvm_set_handler(0x61, isr);
	pykvm_set_handler(0x62, isr);
	pykvm_set_handler(0x63, isr);
	pc_interrupts_via_ioapic();
	sti();
	msi = 0x40;
	pci_write32(0, devfn >> 3, devfn & 7, msi + 4, 0xfee00000);	/* compatibility */
	pci_write32(0, devfn >> 3, devfn & 7, msi + 8, 0);
	pci_write32(0, devfn >> 3, devfn & 7, msi + 12, 0x62);
	pci_write8(0, devfn >> 3, devfn & 7, msi + 2, 1);		/* MSI enable */
	edu_w32(EDU_INTR_RAISE, 1);
	wait_hits(0x62, 1);

	irte[2 * 5] = 1 | (0x61ull << 16);		/* present, fixed, vector 0x61, APIC 0 */
	irte[2 * 5 + 1] = 0;
	vtd_w64(0xb8, (uintptr_t)irte | 3);		/* IRTA: 16 entries */
	vtd_cmd(1u << 24);				/* SIRTP */
	vtd_cmd(1u << 25);				/* IRE */
	pci_write32(0, devfn >> 3, devfn & 7, msi + 4, 0xfee00000 | 1 << 4 | 5 << 5);
	edu_w32(EDU_INTR_RAISE, 1);
	wait_hits(0x61, 1);

	pci_write8(0, devfn >> 3, devfn & 7, msi + 2, 0);		/* INTx again */
	ioapic_route(pci_read8(0, devfn >> 3, devfn & 7, 0x3c), 0x63, 0);
	edu_w32(EDU_INTR_RAISE, 1);
	wait_hits(0x63, 1);
	cli();
	GUEST_SYNC(4, hits[0x62], hits[0x61], hits[0x63]);
}
