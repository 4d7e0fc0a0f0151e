/*
 * pc_vtd_faults: a guest that programs the VT-d IOMMU (pykvm run --pc-device
 * edu --pc-device intel-iommu) with addresses outside RAM and checks that the
 * IOMMU reports them as the VT-d spec says while the guest runs on.
 *
 * SYNC(1, FSTS, IQH, fault events) after an invalidation queue at the LAPIC
 *      page (a descriptor fetch error: FSTS.IQE)
 * SYNC(2, FSTS, fault record high dword, fault record low quadword, fault
 *      events, edu DMA command) after a DMA with the root table past RAM
 *      (fault reason 8)
 * SYNC(3, FSTS, second record high dword, its fault info, fault events,
 *      remapped MSIs seen) after an MSI through an IRT at 2^64 - 4096
 *      (reason 0x23, the interrupt blocked)
 * SYNC(4, VER, CAP low, CAP high, GSTS, FSTS) after byte, word and unaligned
 *      writes of all-ones over the read-only registers
 */
#include "pc.h"

#define VTD 0xfed90000u
#define FSTS 0x34
#define FECTL 0x38
#define FEDATA 0x3c
#define FEADDR 0x40
#define IQH 0x80
#define IQT 0x88
#define IQA 0x90
#define IRTA 0xb8
#define FRCD 0x220
#define FAULT_VECTOR 0x70
#define MSI_VECTOR 0x61

static volatile uint64_t hits[256];
static uintptr_t bar;

static void isr(struct pykvm_intr_frame *f)
{
	hits[f->vector]++;
	lapic_write(LAPIC_EOI, 0);
}

static void vtd_w32(unsigned r, uint32_t v) { mmio_write32(VTD + r, v); }
static uint32_t vtd_r32(unsigned r) { return mmio_read32(VTD + r); }
static void vtd_w64(unsigned r, uint64_t v) { *(volatile uint64_t *)(uintptr_t)(VTD + r) = v; }
static uint64_t vtd_r64(unsigned r) { return *(volatile uint64_t *)(uintptr_t)(VTD + r); }

static void vtd_cmd(uint32_t bit)
{
	vtd_w32(0x18, (vtd_r32(0x1c) & 0x96ffffffu) | bit);
}

static void edu_w32(unsigned r, uint32_t v) { *(volatile uint32_t *)(bar + r) = v; }
static uint32_t edu_r32(unsigned r) { return *(volatile uint32_t *)(bar + r); }
static void edu_w64(unsigned r, uint64_t v) { *(volatile uint64_t *)(bar + r) = v; }

static void wait_hits(int v, uint64_t n)
{
	uint64_t i;

	for (i = 0; i < 200000 && hits[v] < n; i++)
		__asm__ volatile("pause");
}

void guest_main(void)
{
	int devfn;
	volatile uint8_t *b;

	for (devfn = 0; devfn < 256; devfn++)
		if (pci_read32(0, devfn >> 3, devfn & 7, 0) == 0x11e81234)
			break;
	GUEST_ASSERT(devfn < 256);
	bar = pci_read32(0, devfn >> 3, devfn & 7, 0x10) & ~0xfu;
	pci_write32(0, devfn >> 3, devfn & 7, 0x04, 0x06);	/* memory, bus master */

	pykvm_set_handler(FAULT_VECTOR, isr);
	pykvm_set_handler(MSI_VECTOR, isr);
	pc_interrupts_via_ioapic();
	sti();
	vtd_w32(FEDATA, FAULT_VECTOR);
	vtd_w32(FEADDR, 0xfee00000);
	vtd_w32(FECTL, 0);				/* unmask fault events */

	/* 1: the invalidation queue on the LAPIC page */
	vtd_w64(IQA, 0xfee00000);
	vtd_cmd(1u << 26);				/* QIE */
	vtd_w64(IQT, 1 << 4);
	wait_hits(FAULT_VECTOR, 1);
	GUEST_SYNC(1, vtd_r32(FSTS), vtd_r64(IQH), hits[FAULT_VECTOR]);
	vtd_w32(FSTS, 1u << 4);				/* W1C IQE */

	/* 2: DMA with the root table past the end of RAM */
	vtd_w64(0x20, 0x3ff000000ull);
	vtd_cmd(1u << 30);				/* SRTP */
	vtd_cmd(1u << 31);				/* TE */
	edu_w64(0x80, 0x40000);
	edu_w64(0x88, 0x5000);
	edu_w64(0x90, 4);
	edu_w32(0x98, 1 | 2);				/* device -> RAM */
	while (edu_r32(0x98) & 1)
		;
	wait_hits(FAULT_VECTOR, 2);
	GUEST_SYNC(2, vtd_r32(FSTS), vtd_r32(FRCD + 12), vtd_r64(FRCD),
		   hits[FAULT_VECTOR], edu_r32(0x98));

	/* 3: a remappable MSI through an IRT at 2^64 - 4096 */
	vtd_w64(IRTA, 0xfffffffffffff000ull | 7);
	vtd_cmd(1u << 24);				/* SIRTP */
	vtd_cmd(1u << 25);				/* IRE */
	pci_write32(0, devfn >> 3, devfn & 7, 0x44, 0xfee00000 | 1 << 4 | 9 << 5);
	pci_write32(0, devfn >> 3, devfn & 7, 0x48, 0);
	pci_write32(0, devfn >> 3, devfn & 7, 0x4c, MSI_VECTOR);
	pci_write8(0, devfn >> 3, devfn & 7, 0x42, 1);	/* MSI enable */
	edu_w32(0x60, 1);
	wait_hits(MSI_VECTOR, 1);
	GUEST_SYNC(3, vtd_r32(FSTS), vtd_r32(FRCD + 16 + 12), vtd_r64(FRCD + 16),
		   hits[FAULT_VECTOR], hits[MSI_VECTOR]);

	/* 4: narrow and unaligned writes never change read-only registers */
	b = (volatile uint8_t *)(uintptr_t)VTD;
	b[0x00] = 0xff;
	b[0x08] = 0xff;
	b[0x0b] = 0xff;
	b[0x1c] = 0xff;
	b[0x1f] = 0xff;
	*(volatile uint16_t *)(b + 0x1e) = 0xffff;
	*(volatile uint32_t *)(b + 0x1a) = 0xffffffff;
	*(volatile uint64_t *)(b + 0x1c) = ~0ull;
	vtd_w32(FRCD + 12, 1u << 31);			/* W1C both records */
	vtd_w32(FRCD + 16 + 12, 1u << 31);
	GUEST_SYNC(4, vtd_r32(0), vtd_r32(0x08), vtd_r32(0x0c), vtd_r32(0x1c),
		   vtd_r32(FSTS));
	cli();
}
