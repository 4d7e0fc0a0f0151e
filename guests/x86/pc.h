/*
 * Helpers for guests of the PC machine (docs/guest-abi.md, "The PC machine"):
 * fw_cfg, PCI configuration mechanism #1, CMOS RTC, ACPI tables, the local
 * APIC and IOAPIC.  Header-only; every guest that includes it gets its own
 * copy of the (static) functions it uses.
 */
#ifndef PYKVM_PC_H
#define PYKVM_PC_H

#include "pykvm_guest.h"

/* ---- fw_cfg (ports 0x510/0x511) ---------------------------------------- */
#define FW_CFG_SIGNATURE 0x00
#define FW_CFG_ID 0x01
#define FW_CFG_RAM_SIZE 0x03
#define FW_CFG_NB_CPUS 0x05
#define FW_CFG_MAX_CPUS 0x0f

static inline void fw_cfg_select(uint16_t key)
{
	outw(0x510, key);
}

static inline uint64_t fw_cfg_read(uint16_t key, int bytes)
{
	uint64_t v = 0;
	int i;

	fw_cfg_select(key);
	for (i = 0; i < bytes; i++)
		v |= (uint64_t)inb(0x511) << (8 * i);
	return v;
}

/* ---- PCI configuration mechanism #1 ------------------------------------ */
static inline uint32_t pci_addr(int bus, int dev, int fn, int reg)
{
	return 0x80000000u | (uint32_t)bus << 16 | (uint32_t)dev << 11 |
	       (uint32_t)fn << 8 | (reg & 0xfc);
}

static inline uint32_t pci_read32(int bus, int dev, int fn, int reg)
{
	outl(0xcf8, pci_addr(bus, dev, fn, reg));
	return inl(0xcfc);
}

static inline uint16_t pci_read16(int bus, int dev, int fn, int reg)
{
	outl(0xcf8, pci_addr(bus, dev, fn, reg));
	return inw(0xcfc + (reg & 2));
}

static inline uint8_t pci_read8(int bus, int dev, int fn, int reg)
{
	outl(0xcf8, pci_addr(bus, dev, fn, reg));
	return inb(0xcfc + (reg & 3));
}

static inline void pci_write8(int bus, int dev, int fn, int reg, uint8_t v)
{
	outl(0xcf8, pci_addr(bus, dev, fn, reg));
	outb(0xcfc + (reg & 3), v);
}

static inline void pci_write32(int bus, int dev, int fn, int reg, uint32_t v)
{
	outl(0xcf8, pci_addr(bus, dev, fn, reg));
	outl(0xcfc, v);
}

/* ---- CMOS RTC (ports 0x70/0x71) ---------------------------------------- */
#define RTC_SECONDS 0x00
#define RTC_SECONDS_ALARM 0x01
#define RTC_MINUTES 0x02
#define RTC_MINUTES_ALARM 0x03
#define RTC_HOURS 0x04
#define RTC_HOURS_ALARM 0x05
#define RTC_DAY_OF_MONTH 0x07
#define RTC_MONTH 0x08
#define RTC_YEAR 0x09
#define RTC_REG_A 0x0a
#define RTC_REG_B 0x0b
#define RTC_REG_C 0x0c
#define RTC_REG_D 0x0d
#define RTC_CENTURY 0x32
#define RTC_A_UIP 0x80
#define RTC_B_SET 0x80
#define RTC_B_PIE 0x40
#define RTC_B_AIE 0x20
#define RTC_B_UIE 0x10
#define RTC_B_DM 0x04
#define RTC_B_24H 0x02
#define RTC_C_IRQF 0x80
#define RTC_C_AF 0x20
#define RTC_C_UF 0x10

static inline uint8_t cmos_read(uint8_t reg)
{
	outb(0x70, reg);
	return inb(0x71);
}

static inline void cmos_write(uint8_t reg, uint8_t v)
{
	outb(0x70, reg);
	outb(0x71, v);
}

static inline unsigned from_bcd(uint8_t v)
{
	return (v >> 4) * 10 + (v & 0xf);
}

static inline uint8_t to_bcd(unsigned v)
{
	return (uint8_t)(((v / 10) << 4) | (v % 10));
}

/* wait for the next RTC update: UIP rises, then falls */
static inline void rtc_wait_update(void)
{
	while (!(cmos_read(RTC_REG_A) & RTC_A_UIP))
		;
	while (cmos_read(RTC_REG_A) & RTC_A_UIP)
		;
}

/* ---- memory-mapped registers ------------------------------------------- */
static inline uint32_t mmio_read32(uintptr_t addr)
{
	return *(volatile uint32_t *)addr;
}

static inline void mmio_write32(uintptr_t addr, uint32_t v)
{
	*(volatile uint32_t *)addr = v;
}

#define LAPIC_BASE 0xfee00000u
#define LAPIC_ID 0x20
#define LAPIC_VERSION 0x30
#define LAPIC_EOI 0xb0
#define LAPIC_SVR 0xf0
#define LAPIC_ICR_LO 0x300
#define LAPIC_ICR_HI 0x310
#define IOAPIC_BASE 0xfec00000u

static inline uint32_t lapic_read(unsigned reg)
{
	return mmio_read32(LAPIC_BASE + reg);
}

static inline void lapic_write(unsigned reg, uint32_t v)
{
	mmio_write32(LAPIC_BASE + reg, v);
}

static inline uint32_t ioapic_read(unsigned reg)
{
	mmio_write32(IOAPIC_BASE, reg);
	return mmio_read32(IOAPIC_BASE + 0x10);
}

static inline void ioapic_write(unsigned reg, uint32_t v)
{
	mmio_write32(IOAPIC_BASE, reg);
	mmio_write32(IOAPIC_BASE + 0x10, v);
}

/* route IOAPIC pin to vector on APIC 0: edge (level = 0) or level (1), active high */
static inline void ioapic_route(unsigned pin, unsigned vector, int level)
{
	ioapic_write(0x11 + 2 * pin, 0);
	ioapic_write(0x10 + 2 * pin, vector | (level ? 1u << 15 : 0));
}

/* the local APIC on, the 8259s masked (interrupts come through the IOAPIC) */
static inline void pc_interrupts_via_ioapic(void)
{
	outb(0x21, 0xff);
	outb(0xa1, 0xff);
	lapic_write(LAPIC_SVR, 0x1ff);
}

/* ---- ACPI ----------------------------------------------------------------- */
struct acpi_header {
	char signature[4];
	uint32_t length;
	uint8_t revision;
	uint8_t checksum;
	char oem_id[6];
	char oem_table_id[8];
	uint32_t oem_revision;
	uint32_t creator_id;
	uint32_t creator_revision;
} __attribute__((packed));

struct acpi_rsdp {
	char signature[8];
	uint8_t checksum;
	char oem_id[6];
	uint8_t revision;
	uint32_t rsdt;
	uint32_t length;
	uint64_t xsdt;
	uint8_t ext_checksum;
	uint8_t reserved[3];
} __attribute__((packed));

static inline uint8_t acpi_sum(const void *p, uint32_t n)
{
	const uint8_t *b = p;
	uint8_t s = 0;

	while (n--)
		s += *b++;
	return s;
}

static inline int sig_eq(const char *a, const char *b, int n)
{
	int i;

	for (i = 0; i < n; i++)
		if (a[i] != b[i])
			return 0;
	return 1;
}

/* the RSDP: "RSD PTR " on a 16-byte boundary in 0xe0000-0xfffff */
static inline struct acpi_rsdp *acpi_find_rsdp(void)
{
	uintptr_t a;

	for (a = 0xe0000; a < 0x100000; a += 16)
		if (sig_eq((const char *)a, "RSD PTR ", 8))
			return (struct acpi_rsdp *)a;
	return NULL;
}

/* a table by signature, through the RSDT */
static inline struct acpi_header *acpi_find(const char *sig)
{
	struct acpi_rsdp *rsdp = acpi_find_rsdp();
	struct acpi_header *rsdt;
	uint32_t i, n;

	if (!rsdp)
		return NULL;
	rsdt = (struct acpi_header *)(uintptr_t)rsdp->rsdt;
	n = (rsdt->length - sizeof(*rsdt)) / 4;
	for (i = 0; i < n; i++) {
		uint32_t a = ((uint32_t *)(rsdt + 1))[i];
		struct acpi_header *t = (struct acpi_header *)(uintptr_t)a;

		if (sig_eq(t->signature, sig, 4))
			return t;
	}
	return NULL;
}

static inline uint32_t rd32(const void *base, unsigned off)
{
	return *(const volatile uint32_t *)((const uint8_t *)base + off);
}

static inline uint16_t rd16(const void *base, unsigned off)
{
	return *(const volatile uint16_t *)((const uint8_t *)base + off);
}

static inline uint64_t rdtsc(void)
{
	uint32_t lo, hi;

	__asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
	return ((uint64_t)hi << 32) | lo;
}

#endif /* PYKVM_PC_H */
