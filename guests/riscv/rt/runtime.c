/*
 * RISC-V runtime services: the trap report and a default guest_resume.
 */
#include "pykvm_guest.h"
#include "riscv.h"

void pykvm_riscv_trap(uint64_t scause, uint64_t sepc, uint64_t stval)
{
	uint64_t a[3];

	a[0] = scause;
	a[1] = sepc;
	a[2] = stval;
	for (;;) {
		pykvm_report(PYKVM_CMD_TRAP, 3, a);
		pykvm_arch_stop();
	}
}

/* Guests that suspend define their own; reaching this one is a bug. */
__attribute__((weak)) void guest_resume(unsigned long hartid, unsigned long opaque)
{
	GUEST_ASSERT_MSG(0, "resumed on hart %lu (opaque %lx) without guest_resume",
			 hartid, opaque);
}

void sbi_console_write(const char *s, size_t n)
{
	/* DBCN may write fewer bytes than asked: loop until all are out. */
	while (n) {
		struct sbiret r = sbi_ecall(SBI_EXT_DBCN, SBI_DBCN_WRITE, n,
					    (unsigned long)s, 0, 0, 0, 0);
		if (r.error || r.value <= 0)
			return;
		s += r.value;
		n -= (size_t)r.value;
	}
}

void sbi_console_puts(const char *s)
{
	sbi_console_write(s, pykvm_strlen(s));
}

void uart_init(uintptr_t base, uint16_t divisor)
{
	mmio_write8(base + UART_IER, 0);
	mmio_write8(base + UART_LCR, UART_LCR_DLAB);
	mmio_write8(base + UART_THR, divisor & 0xff);	/* DLL */
	mmio_write8(base + UART_IER, divisor >> 8);	/* DLM */
	mmio_write8(base + UART_LCR, 0x03);		/* 8N1 */
	mmio_write8(base + UART_IIR, 0x07);		/* FCR: FIFOs on, cleared */
	mmio_write8(base + UART_MCR, 0x03);		/* DTR, RTS */
}

void uart_putc(uintptr_t base, char c)
{
	while (!(mmio_read8(base + UART_LSR) & UART_LSR_THRE))
		;
	mmio_write8(base + UART_THR, (uint8_t)c);
}

void uart_puts(uintptr_t base, const char *s)
{
	while (*s)
		uart_putc(base, *s++);
}
