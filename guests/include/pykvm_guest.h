/*
 * pykvm guest-side API.
 *
 * A test guest talks to the pykvm host through "reports": it fills in a
 * struct pykvm_report somewhere in its own RAM and hands the address of that
 * struct to the host through an architecture specific doorbell (see
 * docs/guest-abi.md).  Everything in here is freestanding: no libc, no
 * floating point, no 64-bit division (32-bit and 16-bit x86 builds have no
 * libgcc to fall back on).
 *
 * Arch hooks defined below, per architecture:
 *   pykvm_report_send(r)   hand a report to the host
 *   pykvm_arch_stop()      park the CPU for good (after DONE / a failure)
 */
#ifndef PYKVM_GUEST_H
#define PYKVM_GUEST_H

#include <stdint.h>
#include <stddef.h>
#include <stdarg.h>

#ifdef __cplusplus
extern "C" {
#endif

/* ------------------------------------------------------------------ */
/* The report structure and command numbers (fixed by the guest ABI). */

#define PYKVM_REPORT_MAX_ARGS 8

enum {
	PYKVM_CMD_SYNC          = 1,
	PYKVM_CMD_ASSERT_FAILED = 2,
	PYKVM_CMD_DONE          = 3,
	PYKVM_CMD_PRINT         = 4,
	PYKVM_CMD_EXCEPTION     = 5,	/* x86 */
	PYKVM_CMD_TRAP          = 6,	/* RISC-V */
};

/* args[3] of an ASSERT_FAILED report */
#define PYKVM_ASSERT_HAS_VALUES 1ULL

struct pykvm_report {
	uint64_t cmd;
	uint64_t nargs;
	uint64_t args[PYKVM_REPORT_MAX_ARGS];
} __attribute__((aligned(8)));

_Static_assert(sizeof(struct pykvm_report) == 80, "report layout");

/* x86 platform ports */
#define PYKVM_REPORT_PORT   0x1000
#define PYKVM_DEBUGCON_PORT 0xe9
#define PYKVM_EXIT_PORT     0xf4
#define PYKVM_COM1          0x3f8

/* RISC-V report call */
#define PYKVM_SBI_EXT_REPORT 0x08504B56UL

/*
 * Parameters the host may poke into guest memory before the run (or while
 * the guest is stopped at a SYNC).  The runtime defines the array in the
 * ".pykvm_params" section; the host finds it through the ELF symbol table.
 */
#define PYKVM_NPARAMS 16
extern volatile uint64_t pykvm_params[PYKVM_NPARAMS];

/* ------------------------------------------------------------------ */
/* Architecture hooks                                                  */

#if defined(__x86_64__) || defined(__i386__)

static inline void outb(uint16_t port, uint8_t v)
{
	__asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port) : "memory");
}

static inline void outw(uint16_t port, uint16_t v)
{
	__asm__ volatile("outw %0, %1" : : "a"(v), "Nd"(port) : "memory");
}

static inline void outl(uint16_t port, uint32_t v)
{
	__asm__ volatile("outl %0, %1" : : "a"(v), "Nd"(port) : "memory");
}

static inline uint8_t inb(uint16_t port)
{
	uint8_t v;
	__asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port) : "memory");
	return v;
}

static inline uint16_t inw(uint16_t port)
{
	uint16_t v;
	__asm__ volatile("inw %1, %0" : "=a"(v) : "Nd"(port) : "memory");
	return v;
}

static inline uint32_t inl(uint16_t port)
{
	uint32_t v;
	__asm__ volatile("inl %1, %0" : "=a"(v) : "Nd"(port) : "memory");
	return v;
}

static inline uint64_t rdmsr(uint32_t msr)
{
	uint32_t lo, hi;
	__asm__ volatile("rdmsr" : "=a"(lo), "=d"(hi) : "c"(msr));
	return ((uint64_t)hi << 32) | lo;
}

static inline void wrmsr(uint32_t msr, uint64_t v)
{
	__asm__ volatile("wrmsr"
			 : : "c"(msr), "a"((uint32_t)v), "d"((uint32_t)(v >> 32))
			 : "memory");
}

struct pykvm_cpuid {
	uint32_t eax, ebx, ecx, edx;
};

static inline struct pykvm_cpuid cpuid_count(uint32_t leaf, uint32_t subleaf)
{
	struct pykvm_cpuid r;
	__asm__ volatile("cpuid"
			 : "=a"(r.eax), "=b"(r.ebx), "=c"(r.ecx), "=d"(r.edx)
			 : "a"(leaf), "c"(subleaf));
	return r;
}

static inline struct pykvm_cpuid cpuid(uint32_t leaf)
{
	return cpuid_count(leaf, 0);
}

static inline void cli(void) { __asm__ volatile("cli" ::: "memory"); }
static inline void sti(void) { __asm__ volatile("sti" ::: "memory"); }
static inline void hlt(void) { __asm__ volatile("hlt" ::: "memory"); }
/* sti's one-instruction shadow makes "sti; hlt" race free */
static inline void sti_hlt(void) { __asm__ volatile("sti; hlt" ::: "memory"); }

static inline unsigned long read_cr0(void)
{
	unsigned long v;
	__asm__ volatile("mov %%cr0, %0" : "=r"(v));
	return v;
}

static inline unsigned long read_cr4(void)
{
	unsigned long v;
	__asm__ volatile("mov %%cr4, %0" : "=r"(v));
	return v;
}

/* COM1, polled.  The pykvm 16550 always reports THR empty. */
#define PYKVM_COM1_LSR (PYKVM_COM1 + 5)
#define PYKVM_LSR_THRE 0x20

static inline void com1_putc(char c)
{
	while (!(inb(PYKVM_COM1_LSR) & PYKVM_LSR_THRE))
		;
	outb(PYKVM_COM1, (uint8_t)c);
}

static inline void com1_puts(const char *s)
{
	while (*s) {
		if (*s == '\n')
			com1_putc('\r');
		com1_putc(*s++);
	}
}

/* isa-debug-exit: the run ends with status (v << 1) | 1 */
static inline void pykvm_debug_exit(uint32_t v)
{
	outl(PYKVM_EXIT_PORT, v);
}

static inline void pykvm_report_send(struct pykvm_report *r)
{
	/* 32-bit out; the value is the report's (guest-physical) address.  In
	 * 16-bit builds (gcc -m16) the assembler adds the operand-size prefix
	 * and, with DS = 0, the pointer is the linear address. */
	__asm__ volatile("outl %0, %1"
			 : : "a"((uint32_t)(uintptr_t)r), "Nd"((uint16_t)PYKVM_REPORT_PORT)
			 : "memory");
}

static inline __attribute__((noreturn)) void pykvm_arch_stop(void)
{
	for (;;)
		__asm__ volatile("cli; hlt" ::: "memory");
}

#elif defined(__riscv)

static inline void pykvm_report_send(struct pykvm_report *r)
{
	register unsigned long a0 __asm__("a0") = (unsigned long)r;
	register unsigned long a1 __asm__("a1") = 0;
	register unsigned long a6 __asm__("a6") = 0;
	register unsigned long a7 __asm__("a7") = PYKVM_SBI_EXT_REPORT;

	__asm__ volatile("ecall"
			 : "+r"(a0), "+r"(a1)
			 : "r"(a6), "r"(a7)
			 : "memory");
}

static inline __attribute__((noreturn)) void pykvm_arch_stop(void)
{
	for (;;)
		__asm__ volatile("wfi" ::: "memory");
}

#else
#error "pykvm_guest.h: unsupported architecture"
#endif

/* ------------------------------------------------------------------ */
/* Report API (guests/common/report.c, guests/common/printf.c)         */

void pykvm_report(uint64_t cmd, uint64_t nargs, const uint64_t *args);
void pykvm_sync(uint64_t nargs, const uint64_t *args);
__attribute__((noreturn)) void pykvm_done(void);
__attribute__((noreturn)) void pykvm_assert_failed(const char *expr, const char *file,
						   uint64_t line, uint64_t flags,
						   uint64_t left, uint64_t right,
						   const char *fmt, ...);
void pykvm_print(const char *text, size_t len);
int pykvm_printf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

int pykvm_vsnprintf(char *buf, size_t size, const char *fmt, va_list ap);
int pykvm_snprintf(char *buf, size_t size, const char *fmt, ...)
	__attribute__((format(printf, 3, 4)));
size_t pykvm_strlen(const char *s);

/* GUEST_SYNC(stage, v1, ..., v7): every argument is converted to uint64_t. */
#define GUEST_SYNC(...)                                                      \
	do {                                                                 \
		const uint64_t __pykvm_a[] = { __VA_ARGS__ };                \
		_Static_assert(sizeof(__pykvm_a) / sizeof(__pykvm_a[0]) <=   \
				       PYKVM_REPORT_MAX_ARGS,                \
			       "GUEST_SYNC takes at most 8 values");         \
		pykvm_sync(sizeof(__pykvm_a) / sizeof(__pykvm_a[0]),         \
			   __pykvm_a);                                       \
	} while (0)

#define GUEST_DONE() pykvm_done()

#define GUEST_PRINTF(...) pykvm_printf(__VA_ARGS__)

#define GUEST_ASSERT(cond)                                                   \
	do {                                                                 \
		if (!(cond))                                                 \
			pykvm_assert_failed(#cond, __FILE__, __LINE__, 0, 0, 0, \
					    NULL);                           \
	} while (0)

/* GUEST_ASSERT_MSG(cond, fmt, ...): with a formatted message (args[6]) */
#define GUEST_ASSERT_MSG(cond, ...)                                          \
	do {                                                                 \
		if (!(cond))                                                 \
			pykvm_assert_failed(#cond, __FILE__, __LINE__, 0, 0, 0, \
					    __VA_ARGS__);                    \
	} while (0)

#define __PYKVM_ASSERT_CMP(a, b, op)                                         \
	do {                                                                 \
		uint64_t __pykvm_l = (uint64_t)(a);                          \
		uint64_t __pykvm_r = (uint64_t)(b);                          \
		if (!(__pykvm_l op __pykvm_r))                               \
			pykvm_assert_failed(#a " " #op " " #b, __FILE__,     \
					    __LINE__,                        \
					    PYKVM_ASSERT_HAS_VALUES,         \
					    __pykvm_l, __pykvm_r, NULL);     \
	} while (0)

#define GUEST_ASSERT_EQ(a, b) __PYKVM_ASSERT_CMP(a, b, ==)
#define GUEST_ASSERT_NE(a, b) __PYKVM_ASSERT_CMP(a, b, !=)

/* ------------------------------------------------------------------ */
/* x86 runtime services (guests/x86/runtime64.c)                       */

#if defined(__x86_64__)
/* Register image built by the IDT stubs; handlers may modify it (the
 * saved GPRs and the hardware frame are restored on return). */
struct pykvm_intr_frame {
	uint64_t r15, r14, r13, r12, r11, r10, r9, r8;
	uint64_t rbp, rdi, rsi, rdx, rcx, rbx, rax;
	uint64_t vector, error_code;
	uint64_t rip, cs, rflags, rsp, ss;	/* pushed by the CPU */
};

typedef void (*pykvm_intr_handler_t)(struct pykvm_intr_frame *frame);

/*
 * What happens on an exception or interrupt, in this order:
 *
 *   1. a fixup: the RIP lies inside an asm_safe() sequence (below): the
 *      sequence is abandoned, execution resumes just after it, and asm_safe()
 *      returns the vector (the error code is there too, asm_safe_ec());
 *   2. the vector's handler, if the test installed one with
 *      pykvm_set_handler(): it may change the frame (e.g. step frame->rip
 *      past the faulting instruction) and returns to the interrupted code;
 *   3. otherwise an EXCEPTION report (vector, error code, RIP, CR2) to the
 *      host, which names the guest's function and file:line, and the vCPU
 *      stops.
 *
 * So fixups and handlers compose: a handler never sees a fault that an
 * asm_safe() sequence expects, and a vector without a handler outside such
 * a sequence is still reported.  Handlers run with interrupts off (the IDT
 * holds interrupt gates) on the interrupted code's stack.
 */

/* Route one vector to a C handler instead of the default "report an
 * EXCEPTION and stop"; pass NULL to restore the default. */
void pykvm_set_handler(unsigned int vector, pykvm_intr_handler_t fn);
/* Install (and load) the runtime's IDT; _start already does this. */
void pykvm_idt_install(void);

/*
 * Exception fixups, as the kernel selftests' KVM_ASM_SAFE.
 *
 * PYKVM_ASM_SAFE(insn) wraps an instruction sequence (a string of one or
 * more instructions): an exception raised by any instruction of it (or, for
 * the trap-type vectors #DB, #BP and #OF, just after its last one) is caught
 * by the IDT path, which resumes execution after the sequence with the
 * vector in R9 and the error code in R10 (0 when the CPU pushes none).  The
 * sequence's address range is recorded in the .pykvm_extable section; the
 * dispatcher looks the faulting RIP up there before any handler.  Without an
 * exception R9 and R10 are 0.  R9 and R10 are clobbered, so the sequence must
 * not use them.  Vector 0 (#DE) is indistinguishable from "no exception".
 *
 * Use it through asm_safe()/asm_safe_ec(), or in an asm statement of your
 * own with PYKVM_ASM_SAFE_OUTPUTS and PYKVM_ASM_SAFE_CLOBBERS, e.g.
 *
 *	uint64_t vec, ec;
 *	__asm__ volatile(PYKVM_ASM_SAFE("mov %[v], %%cr4")
 *			 : PYKVM_ASM_SAFE_OUTPUTS(vec, ec)
 *			 : [v] "r"(bad_cr4)
 *			 : PYKVM_ASM_SAFE_CLOBBERS);
 */
#define PYKVM_ASM_SAFE(insn)                                                 \
	"xorl %%r9d, %%r9d\n\t"                                            \
	"xorl %%r10d, %%r10d\n\t"                                          \
	"661:\n\t"                                                         \
	insn "\n\t"                                                        \
	"662:\n\t"                                                         \
	".pushsection .pykvm_extable, \"a\"\n\t"                         \
	".balign 8\n\t"                                                    \
	".quad 661b, 662b\n\t"                                             \
	".popsection\n\t"                                                  \
	"movq %%r9, %[__pykvm_vec]\n\t"                                    \
	"movq %%r10, %[__pykvm_ec]\n\t"

#define PYKVM_ASM_SAFE_OUTPUTS(vector, error_code)                           \
	[__pykvm_vec] "=r"(vector), [__pykvm_ec] "=r"(error_code)

#define PYKVM_ASM_SAFE_CLOBBERS "r9", "r10", "cc", "memory"

/* One entry of .pykvm_extable: the sequence's [start, end) addresses. */
struct pykvm_extable_entry {
	uint64_t start, end;
};

/*
 * asm_safe(insn, inputs...): run the instruction sequence ``insn`` (an asm
 * template; inputs are asm input operands, named or numbered from 2) and
 * return the vector it raised, 0 if none: asm_safe("ud2") == 6.
 * asm_safe_ec(insn, &error_code, inputs...) also stores the error code.
 */
#define asm_safe_ec(insn, ec_ptr, ...)                                       \
	({                                                                   \
		uint64_t __pykvm_v, __pykvm_e;                               \
		__asm__ volatile(PYKVM_ASM_SAFE(insn)                        \
				 : PYKVM_ASM_SAFE_OUTPUTS(__pykvm_v, __pykvm_e) \
				 : __VA_ARGS__                               \
				 : PYKVM_ASM_SAFE_CLOBBERS);                 \
		*(ec_ptr) = __pykvm_e;                                       \
		(uint8_t)__pykvm_v;                                          \
	})

#define asm_safe(insn, ...)                                                  \
	({                                                                   \
		uint64_t __pykvm_ign;                                        \
		asm_safe_ec(insn, &__pykvm_ign, ##__VA_ARGS__);              \
	})

/* rdmsr/wrmsr that return the vector (13 for #GP: no such MSR, or a value
 * it refuses) instead of stopping the guest; 0 on success.  rdmsr_safe
 * stores the value read (0 after a fault). */
static inline uint8_t rdmsr_safe(uint32_t msr, uint64_t *val)
{
	uint64_t vec, ec;
	uint32_t lo = 0, hi = 0;

	__asm__ volatile(PYKVM_ASM_SAFE("rdmsr")
			 : "+a"(lo), "+d"(hi), PYKVM_ASM_SAFE_OUTPUTS(vec, ec)
			 : "c"(msr)
			 : PYKVM_ASM_SAFE_CLOBBERS);
	(void)ec;
	*val = ((uint64_t)hi << 32) | lo;
	return (uint8_t)vec;
}

static inline uint8_t wrmsr_safe(uint32_t msr, uint64_t val)
{
	uint64_t vec, ec;

	__asm__ volatile(PYKVM_ASM_SAFE("wrmsr")
			 : PYKVM_ASM_SAFE_OUTPUTS(vec, ec)
			 : "c"(msr), "a"((uint32_t)val), "d"((uint32_t)(val >> 32))
			 : PYKVM_ASM_SAFE_CLOBBERS);
	(void)ec;
	return (uint8_t)vec;
}
#endif

/* Entry point provided by each 64-bit x86 guest (the 32-bit multiboot
 * runtime calls guest_main32(magic, info) instead). */
#if defined(__x86_64__)
void guest_main(void);
#endif

#ifdef __cplusplus
}
#endif

#endif /* PYKVM_GUEST_H */
