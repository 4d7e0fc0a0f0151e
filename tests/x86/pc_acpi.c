/*
 * pc_acpi: walks the ACPI tables from the RSDP as an OS does.
 *
 * SYNC(1, rsdp address, revision, sum of the first 20 bytes, sum of all 36,
 *      rsdt, xsdt, oem id bytes)
 * SYNC(2, i, signature, address, length, byte sum, revision) for each RSDT
 *      entry (i = 0, 1, ...), then SYNC(3, i, ...) for each XSDT entry
 * SYNC(4, FACS address (FADT.firmware_ctrl), X_FIRMWARE_CTRL, DSDT,
 *      X_DSDT, pm1a_evt_blk, pm1a_cnt_blk, pm_tmr_blk)
 * SYNC(5, sci_int, lengths pm1_evt | pm1_cnt << 8 | pm_tmr << 16, flags,
 *      FACS signature, FACS length, DSDT length, DSDT byte sum)
 * SYNC(6, MADT lapic address, flags, local APICs (count), enabled APIC ids
 *      as a bit mask, IOAPIC id, IOAPIC address, IOAPIC GSI base)
 * SYNC(7, k, bus, source irq, gsi, flags) per interrupt source override
 * SYNC(8, local APIC NMI entries, their uid, lint) and the DSDT's \_S3_ bytes
 */
#include "pc.h"

static uint64_t sig64(const char *s)
{
	return (uint64_t)(uint8_t)s[0] | (uint64_t)(uint8_t)s[1] << 8 |
	       (uint64_t)(uint8_t)s[2] << 16 | (uint64_t)(uint8_t)s[3] << 24;
}

void guest_main(void)
{
	struct acpi_rsdp *rsdp = acpi_find_rsdp();
	struct acpi_header *rsdt, *xsdt, *fadt = NULL, *madt = NULL, *facs, *dsdt;
	uint64_t oem = 0;
	uint32_t i, n, off;
	uint64_t lapics = 0, mask = 0, nmis = 0, nmi_uid = 0, nmi_lint = 0;
	uint64_t io_id = ~0ull, io_addr = 0, io_base = 0, s3 = 0;
	uint8_t *aml;
	int k = 0;

	GUEST_ASSERT(rsdp != NULL);
	for (i = 0; i < 6; i++)
		oem |= (uint64_t)(uint8_t)rsdp->oem_id[i] << (8 * i);
	GUEST_SYNC(1, (uintptr_t)rsdp, rsdp->revision, acpi_sum(rsdp, 20),
		   acpi_sum(rsdp, rsdp->length), rsdp->rsdt, rsdp->xsdt, oem);

	rsdt = (struct acpi_header *)(uintptr_t)rsdp->rsdt;
	n = (rsdt->length - sizeof(*rsdt)) / 4;
	GUEST_SYNC(2, 100, sig64(rsdt->signature), (uintptr_t)rsdt, rsdt->length,
		   acpi_sum(rsdt, rsdt->length), rsdt->revision);
	for (i = 0; i < n; i++) {
		struct acpi_header *t =
			(struct acpi_header *)(uintptr_t)((uint32_t *)(rsdt + 1))[i];

		GUEST_SYNC(2, i, sig64(t->signature), (uintptr_t)t, t->length,
			   acpi_sum(t, t->length), t->revision);
		if (sig_eq(t->signature, "FACP", 4))
			fadt = t;
		if (sig_eq(t->signature, "APIC", 4))
			madt = t;
	}
	xsdt = (struct acpi_header *)(uintptr_t)rsdp->xsdt;
	n = (xsdt->length - sizeof(*xsdt)) / 8;
	GUEST_SYNC(3, 100, sig64(xsdt->signature), (uintptr_t)xsdt, xsdt->length,
		   acpi_sum(xsdt, xsdt->length), xsdt->revision);
	for (i = 0; i < n; i++) {
		uint64_t a;
		struct acpi_header *t;

		__builtin_memcpy(&a, (uint8_t *)(xsdt + 1) + 8 * i, 8);
		t = (struct acpi_header *)(uintptr_t)a;
		GUEST_SYNC(3, i, sig64(t->signature), a, t->length,
			   acpi_sum(t, t->length), t->revision);
	}

	GUEST_ASSERT(fadt != NULL && madt != NULL);
	facs = (struct acpi_header *)(uintptr_t)rd32(fadt, 36);
	dsdt = (struct acpi_header *)(uintptr_t)rd32(fadt, 40);
	GUEST_SYNC(4, (uintptr_t)facs, rd32(fadt, 132) | (uint64_t)rd32(fadt, 136) << 32,
		   (uintptr_t)dsdt, rd32(fadt, 140) | (uint64_t)rd32(fadt, 144) << 32,
		   rd32(fadt, 56), rd32(fadt, 64), rd32(fadt, 76));
	GUEST_SYNC(5, rd16(fadt, 46),
		   ((uint8_t *)fadt)[88] | ((uint8_t *)fadt)[89] << 8 | ((uint8_t *)fadt)[91] << 16,
		   rd32(fadt, 112), sig64(facs->signature), rd32(facs, 4), dsdt->length,
		   acpi_sum(dsdt, dsdt->length));

	for (off = 44; off < madt->length;) {
		uint8_t *e = (uint8_t *)madt + off;

		switch (e[0]) {
		case 0:				/* processor local APIC */
			lapics++;
			if (rd32(e, 4) & 1)
				mask |= 1ull << e[3];
			break;
		case 1:				/* IOAPIC */
			io_id = e[2];
			io_addr = rd32(e, 4);
			io_base = rd32(e, 8);
			break;
		case 2:				/* interrupt source override */
			GUEST_SYNC(7, k++, e[2], e[3], rd32(e, 4), rd16(e, 8));
			break;
		case 4:				/* local APIC NMI */
			nmis++;
			nmi_uid = e[2];
			nmi_lint = e[5];
			break;
		}
		GUEST_ASSERT(e[1] >= 2);
		off += e[1];
	}
	GUEST_SYNC(6, rd32(madt, 36), rd32(madt, 40), lapics, mask, io_id, io_addr, io_base);

	/* the DSDT's AML: find NameOp "_S3_" and return the 8 bytes after the name */
	aml = (uint8_t *)(dsdt + 1);
	for (i = 0; i + 12 <= dsdt->length - sizeof(*dsdt); i++) {
		if (aml[i] == 0x08 && sig_eq((char *)aml + i + 1, "_S3_", 4)) {
			__builtin_memcpy(&s3, aml + i + 5, 8);
			break;
		}
	}
	GUEST_SYNC(8, nmis, nmi_uid, nmi_lint, s3);
}
