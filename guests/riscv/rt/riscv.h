/*
 * RISC-V guest helpers: SBI calls, the debug console, the tiny FDT reader.
 * SBI numbers are from the RISC-V SBI specification.
 */
#ifndef PYKVM_RISCV_H
#define PYKVM_RISCV_H

#include <stdint.h>
#include <stddef.h>

#define SBI_EXT_BASE 0x10UL
#define SBI_EXT_TIME 0x54494D45UL
#define SBI_EXT_HSM  0x48534DUL
#define SBI_EXT_DBCN 0x4442434EUL
#define SBI_EXT_SRST 0x53525354UL
#define SBI_EXT_SUSP 0x53555350UL

#define SBI_TIME_SET_TIMER      0
#define SBI_HSM_HART_SUSPEND    3
#define SBI_HSM_SUSPEND_RET_DEFAULT 0

#define SBI_DBCN_WRITE      0
#define SBI_DBCN_READ       1
#define SBI_DBCN_WRITE_BYTE 2

#define SBI_SRST_RESET          0
#define SBI_SRST_TYPE_SHUTDOWN  0
#define SBI_SRST_TYPE_COLD_REBOOT 1
#define SBI_SRST_REASON_NONE    0
#define SBI_SRST_REASON_SYSFAIL 1

#define SBI_SUSP_SYSTEM_SUSPEND 0
#define SBI_SUSP_TO_RAM         0

#define SBI_BASE_PROBE_EXT 3

#define SBI_SUCCESS            0
#define SBI_ERR_NOT_SUPPORTED (-2)

struct sbiret {
	long error;
	long value;
};

static inline struct sbiret sbi_ecall(unsigned long eid, unsigned long fid,
				      unsigned long arg0, unsigned long arg1,
				      unsigned long arg2, unsigned long arg3,
				      unsigned long arg4, unsigned long arg5)
{
	register unsigned long a0 __asm__("a0") = arg0;
	register unsigned long a1 __asm__("a1") = arg1;
	register unsigned long a2 __asm__("a2") = arg2;
	register unsigned long a3 __asm__("a3") = arg3;
	register unsigned long a4 __asm__("a4") = arg4;
	register unsigned long a5 __asm__("a5") = arg5;
	register unsigned long a6 __asm__("a6") = fid;
	register unsigned long a7 __asm__("a7") = eid;
	struct sbiret r;

	__asm__ volatile("ecall"
			 : "+r"(a0), "+r"(a1)
			 : "r"(a2), "r"(a3), "r"(a4), "r"(a5), "r"(a6), "r"(a7)
			 : "memory");
	r.error = (long)a0;
	r.value = (long)a1;
	return r;
}

static inline long sbi_probe_extension(unsigned long eid)
{
	struct sbiret r = sbi_ecall(SBI_EXT_BASE, SBI_BASE_PROBE_EXT, eid, 0, 0, 0, 0, 0);

	return r.error ? 0 : r.value;
}

void sbi_console_write(const char *s, size_t n);
void sbi_console_puts(const char *s);

/* Tiny FDT reader (rt/fdt.c) */
int fdt_valid(const void *dtb);
/* The first property called name anywhere in the tree; its value and length. */
const void *fdt_find_prop(const void *dtb, const char *name, uint32_t *len);
/* Property `name` of the first node whose name starts with `node` ("serial@"). */
const void *fdt_find_node_prop(const void *dtb, const char *node, const char *name,
			       uint32_t *len);
/* A big-endian value of `cells` 32-bit cells (1 or 2), as in reg or initrd-start. */
uint64_t fdt_cells(const void *p, uint32_t cells);

/*
 * A polled ns16550a (rt/runtime.c), as on QEMU's virt machine: registers one
 * byte apart at `base` (0x10000000 there; the DTB's /soc/serial@... says).
 */
#define UART_THR 0
#define UART_IER 1
#define UART_IIR 2	/* reads; FCR on writes */
#define UART_LCR 3
#define UART_MCR 4
#define UART_LSR 5
#define UART_MSR 6
#define UART_SCR 7
#define UART_LCR_DLAB 0x80
#define UART_LSR_THRE 0x20
#define UART_LSR_TEMT 0x40

static inline uint8_t mmio_read8(uintptr_t addr)
{
	return *(volatile uint8_t *)addr;
}

static inline void mmio_write8(uintptr_t addr, uint8_t v)
{
	*(volatile uint8_t *)addr = v;
}

/* 8N1 with divisor `divisor`, FIFOs on, interrupts off. */
void uart_init(uintptr_t base, uint16_t divisor);
void uart_putc(uintptr_t base, char c);
void uart_puts(uintptr_t base, const char *s);

static inline uint64_t rdtime(void)
{
	uint64_t t;

	__asm__ volatile("rdtime %0" : "=r"(t));
	return t;
}

/* Entry points */
void guest_main(unsigned long hartid, void *dtb);
void guest_resume(unsigned long hartid, unsigned long opaque);
extern char pykvm_resume_entry[];

#endif /* PYKVM_RISCV_H */
