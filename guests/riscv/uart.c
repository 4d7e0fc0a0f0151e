/*
 * A polled ns16550a driver, as kvm-unit-tests and Linux's earlycon use one:
 * the UART from the DTB (/chosen/stdout-path, /soc/serial@...: reg,
 * clock-frequency, compatible), 8N1 at 115200 baud, then register read-backs.
 * SYNC(1, base, clock-frequency, address of stdout-path, address of
 * compatible); SYNC(2, scratch, divisor latch, LCR, IIR, LSR, MSR, MCR);
 * then a line on the UART and one on the SBI debug console.
 */
#include "pykvm_guest.h"
#include "riscv.h"

void guest_main(unsigned long hartid, void *dtb)
{
	const char *path, *compat;
	const void *reg, *clk;
	uint32_t len = 0;
	uint64_t freq;
	uintptr_t base;
	uint8_t scratch, dll, dlm, lcr, iir, lsr, msr, mcr;

	(void)hartid;
	GUEST_ASSERT(fdt_valid(dtb));
	path = fdt_find_node_prop(dtb, "chosen", "stdout-path", NULL);
	reg = fdt_find_node_prop(dtb, "serial@", "reg", &len);
	clk = fdt_find_node_prop(dtb, "serial@", "clock-frequency", NULL);
	compat = fdt_find_node_prop(dtb, "serial@", "compatible", NULL);
	GUEST_ASSERT(path && reg && clk && compat);
	GUEST_ASSERT_EQ(len, 16);
	base = (uintptr_t)fdt_cells(reg, 2);
	freq = fdt_cells(clk, 1);
	GUEST_SYNC(1, base, freq, (uint64_t)(uintptr_t)path, (uint64_t)(uintptr_t)compat);

	uart_init(base, (uint16_t)(freq / (16 * 115200)));
	mmio_write8(base + UART_SCR, 0xa5);
	scratch = mmio_read8(base + UART_SCR);
	mmio_write8(base + UART_LCR, 0x03 | UART_LCR_DLAB);
	dll = mmio_read8(base + UART_THR);
	dlm = mmio_read8(base + UART_IER);
	mmio_write8(base + UART_LCR, 0x03);
	lcr = mmio_read8(base + UART_LCR);
	iir = mmio_read8(base + UART_IIR);
	lsr = mmio_read8(base + UART_LSR);
	msr = mmio_read8(base + UART_MSR);
	mcr = mmio_read8(base + UART_MCR);
	GUEST_SYNC(2, scratch, dll | ((uint64_t)dlm << 8), lcr, iir, lsr, msr, mcr);

	uart_puts(base, "Hello from the ns16550a\n");
	sbi_console_puts("and from the SBI debug console\n");
	GUEST_DONE();
}

/* guests.mk: build uart.bin too, this ELF as a flat Linux Image (see rt/crt0.S) */
#define PYKVM_LINUX_IMAGE 1
