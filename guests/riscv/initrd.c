/*
 * Reads the initrd the VMM loaded: /chosen/linux,initrd-start and -end from
 * the DTB, then an FNV-1a 64 hash of the bytes between them.
 * SYNC(1, start, end, hash, _end, DTB address); then writes the initrd's first
 * line (up to 64 bytes) to the UART the DTB names.
 */
#include "pykvm_guest.h"
#include "riscv.h"

extern char _end[];

void guest_main(unsigned long hartid, void *dtb)
{
	const void *ps, *pe, *reg;
	uint32_t ls = 0, le = 0;
	uint64_t start, end, hash = 0xcbf29ce484222325ULL;
	const uint8_t *p;
	uintptr_t uart;
	int i;

	(void)hartid;
	GUEST_ASSERT(fdt_valid(dtb));
	ps = fdt_find_node_prop(dtb, "chosen", "linux,initrd-start", &ls);
	pe = fdt_find_node_prop(dtb, "chosen", "linux,initrd-end", &le);
	GUEST_ASSERT_MSG(ps && pe, "no linux,initrd-start/-end in /chosen");
	GUEST_ASSERT(ls == 4 || ls == 8);
	GUEST_ASSERT(le == 4 || le == 8);
	start = fdt_cells(ps, ls / 4);
	end = fdt_cells(pe, le / 4);
	GUEST_ASSERT(start <= end);
	for (p = (const uint8_t *)(uintptr_t)start; p < (const uint8_t *)(uintptr_t)end; p++) {
		hash ^= *p;
		hash *= 0x100000001b3ULL;
	}
	GUEST_SYNC(1, start, end, hash, (uint64_t)(uintptr_t)_end, (uint64_t)(uintptr_t)dtb);

	reg = fdt_find_node_prop(dtb, "serial@", "reg", NULL);
	GUEST_ASSERT(reg != NULL);
	uart = (uintptr_t)fdt_cells(reg, 2);
	p = (const uint8_t *)(uintptr_t)start;
	for (i = 0; i < 64 && p + i < (const uint8_t *)(uintptr_t)end; i++) {
		uart_putc(uart, (char)p[i]);
		if (p[i] == '\n')
			break;
	}
	GUEST_DONE();
}

/* guests.mk: build initrd.bin too, this ELF as a flat Linux Image (see rt/crt0.S) */
#define PYKVM_LINUX_IMAGE 1
