/*
 * RISC-V guest helpers: SBI calls, the debug console, the tiny FDT reader.
 * SBI numbers are from the RISC-V SBI specification.
 */
#ifndef PYKVM_RISCV_H
#define PYKVM_RISCV_H

#include <stdint.h>
#include <stddef.h>

#define SBI_EXT_BASE 0x10UL
#define SBI_EXT_DBCN 0x4442434EUL
#define SBI_EXT_SRST 0x53525354UL
#define SBI_EXT_SUSP 0x53555350UL

#define SBI_DBCN_WRITE      0
#define SBI_DBCN_READ       1
#define SBI_DBCN_WRITE_BYTE 2

#define SBI_SRST_RESET          0
#define SBI_SRST_TYPE_SHUTDOWN  0
#define SBI_SRST_REASON_NONE    0

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

/* Entry points */
void guest_main(unsigned long hartid, void *dtb);
void guest_resume(unsigned long hartid, unsigned long opaque);
extern char pykvm_resume_entry[];

#endif /* PYKVM_RISCV_H */
