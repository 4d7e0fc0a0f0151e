/*
 * Guest-side SVM (AMD-V) helpers for L1 hypervisor test guests.
 *
 * An L1 test guest (64-bit runtime, identity mapped, so a pointer is also
 * the guest-physical address) uses these to enable SVM, build a VMCB for a
 * small L2 function and run it:
 *
 *	svm_init();                           CPUID check, EFER.SVME, VM_HSAVE_PA
 *	struct vmcb *v = svm_vmcb_setup(l2_entry, l2_stack_top);
 *	uint64_t code = svm_run(v);           VMRUN ... #VMEXIT, returns EXITCODE
 *	svm_skip(v, 3);                       step L2 over a VMMCALL (no NRIPS)
 *
 * The control area intercepts VMRUN (architecturally required), VMMCALL,
 * HLT, SHUTDOWN and port I/O through an all-clear I/O permission map (use
 * svm_intercept_port() to send a port to L1); nested paging is off, so L2
 * runs on the CR3 it is given (by default L1's).  L2 shares L1's GDT and
 * IDT: an exception in L2 is reported to the host by the runtime's default
 * handler.
 *
 * Several L2 guests, several vCPUs (the TLB tests, guests/x86/svm_tlb*.c):
 * each vCPU enables SVM with its own host save page (svm_enable()), each L2
 * has a VMCB (svm_vmcb_init()) and a register block of its own
 * (svm_run_gprs()), and may run in an address space of its own
 * (struct svm_l2_space): L1's identity map plus a window of 4 KiB pages at
 * SVM_L2_WINDOW whose mappings L1 changes between runs.  The svm_l2_*
 * functions are L2 code for those tests: small loops that read the window
 * and VMMCALL, taking their arguments in L2's registers.
 *
 * The helpers' code lives in svm.c, which a guest includes once (the guest
 * Makefile links one object per guest).  Offsets and bit numbers follow the
 * AMD APM vol. 2, appendix B.
 */
#ifndef PYKVM_SVM_H
#define PYKVM_SVM_H

#include "pykvm_guest.h"

/* MSRs and bits */
#define MSR_EFER		0xc0000080u
#define MSR_VM_CR		0xc0010114u
#define MSR_VM_HSAVE_PA		0xc0010117u
#define EFER_SVME		(1ull << 12)
#define CPUID_80000001_ECX_SVM	(1u << 2)

/* intercept word 3 (control area offset 0x00c) */
#define SVM_INTERCEPT_HLT	(1u << 24)
#define SVM_INTERCEPT_INVLPG	(1u << 25)
#define SVM_INTERCEPT_INVLPGA	(1u << 26)
#define SVM_INTERCEPT_IOIO_PROT	(1u << 27)
#define SVM_INTERCEPT_MSR_PROT	(1u << 28)
#define SVM_INTERCEPT_SHUTDOWN	(1u << 31)
/* intercept word 4 (control area offset 0x010) */
#define SVM_INTERCEPT_VMRUN	(1u << 0)
#define SVM_INTERCEPT_VMMCALL	(1u << 1)

/* TLB_CONTROL values (APM vol. 2, 15.16.1 "TLB Flush"; 3 and 7 need
 * FlushByAsid, CPUID 0x8000000a EDX[6]) */
#define SVM_TLB_DO_NOTHING	0
#define SVM_TLB_FLUSH_ALL	1	/* every ASID's entries */
#define SVM_TLB_FLUSH_ASID	3	/* this guest's ASID, global entries too */
#define SVM_TLB_FLUSH_ASID_LOCAL 7	/* this guest's ASID, non-global entries */
#define CPUID_8000000A_EDX_FLUSHBYASID (1u << 6)

/* CR4.PGE: global pages (a PTE's G bit counts only with it) */
#define X86_CR4_PGE		(1ull << 7)

/* #VMEXIT codes */
#define SVM_EXIT_CPUID		0x072
#define SVM_EXIT_HLT		0x078
#define SVM_EXIT_INVLPGA	0x07a
#define SVM_EXIT_IOIO		0x07b
#define SVM_EXIT_MSR		0x07c
#define SVM_EXIT_SHUTDOWN	0x07f
#define SVM_EXIT_VMRUN		0x080
#define SVM_EXIT_VMMCALL	0x081
#define SVM_EXIT_NPF		0x400
#define SVM_EXIT_INVALID	((uint64_t)-1)

/* EXITINFO1 of an IOIO exit */
#define SVM_IOIO_IN		(1u << 0)
#define SVM_IOIO_PORT(info1)	((uint16_t)((info1) >> 16))

#define SVM_IOPM_SIZE		(3 * 4096)
#define SVM_MSRPM_SIZE		(2 * 4096)

struct vmcb_seg {
	uint16_t selector;
	uint16_t attrib;	/* descriptor bits 40-47 and 52-55, packed */
	uint32_t limit;
	uint64_t base;
} __attribute__((packed));

struct vmcb_control {
	uint32_t intercept_cr;		/* 0x000: reads 15:0, writes 31:16 */
	uint32_t intercept_dr;		/* 0x004 */
	uint32_t intercept_exceptions;	/* 0x008 */
	uint32_t intercept_word3;	/* 0x00c */
	uint32_t intercept_word4;	/* 0x010 */
	uint32_t intercept_word5;	/* 0x014 */
	uint8_t reserved_018[0x03c - 0x018];
	uint16_t pause_filter_thresh;	/* 0x03c */
	uint16_t pause_filter_count;	/* 0x03e */
	uint64_t iopm_base_pa;		/* 0x040 */
	uint64_t msrpm_base_pa;		/* 0x048 */
	uint64_t tsc_offset;		/* 0x050 */
	uint32_t asid;			/* 0x058 */
	uint8_t tlb_ctl;		/* 0x05c */
	uint8_t reserved_05d[3];
	uint32_t int_ctl;		/* 0x060 */
	uint32_t int_vector;		/* 0x064 */
	uint32_t int_state;		/* 0x068 */
	uint32_t reserved_06c;
	uint64_t exit_code;		/* 0x070 */
	uint64_t exit_info_1;		/* 0x078 */
	uint64_t exit_info_2;		/* 0x080 */
	uint32_t exit_int_info;		/* 0x088 */
	uint32_t exit_int_info_err;	/* 0x08c */
	uint64_t nested_ctl;		/* 0x090: bit 0 NP_ENABLE */
	uint64_t avic_vapic_bar;	/* 0x098 */
	uint64_t ghcb_gpa;		/* 0x0a0 */
	uint32_t event_inj;		/* 0x0a8 */
	uint32_t event_inj_err;		/* 0x0ac */
	uint64_t nested_cr3;		/* 0x0b0 */
	uint64_t virt_ext;		/* 0x0b8 */
	uint32_t clean;			/* 0x0c0 */
	uint32_t reserved_0c4;
	uint64_t next_rip;		/* 0x0c8 (NRIPS only) */
	uint8_t insn_len;		/* 0x0d0 */
	uint8_t insn_bytes[15];
	uint8_t reserved_0e0[0x400 - 0x0e0];
} __attribute__((packed));

struct vmcb_save {			/* offsets from the start of the VMCB */
	struct vmcb_seg es;		/* 0x400 */
	struct vmcb_seg cs;		/* 0x410 */
	struct vmcb_seg ss;		/* 0x420 */
	struct vmcb_seg ds;		/* 0x430 */
	struct vmcb_seg fs;		/* 0x440 */
	struct vmcb_seg gs;		/* 0x450 */
	struct vmcb_seg gdtr;		/* 0x460 */
	struct vmcb_seg ldtr;		/* 0x470 */
	struct vmcb_seg idtr;		/* 0x480 */
	struct vmcb_seg tr;		/* 0x490 */
	uint8_t reserved_4a0[0x4cb - 0x4a0];
	uint8_t cpl;			/* 0x4cb */
	uint32_t reserved_4cc;
	uint64_t efer;			/* 0x4d0 */
	uint8_t reserved_4d8[0x548 - 0x4d8];
	uint64_t cr4;			/* 0x548 */
	uint64_t cr3;			/* 0x550 */
	uint64_t cr0;			/* 0x558 */
	uint64_t dr7;			/* 0x560 */
	uint64_t dr6;			/* 0x568 */
	uint64_t rflags;		/* 0x570 */
	uint64_t rip;			/* 0x578 */
	uint8_t reserved_580[0x5d8 - 0x580];
	uint64_t rsp;			/* 0x5d8 */
	uint8_t reserved_5e0[0x5f8 - 0x5e0];
	uint64_t rax;			/* 0x5f8 */
	uint64_t star;			/* 0x600 */
	uint64_t lstar;			/* 0x608 */
	uint64_t cstar;			/* 0x610 */
	uint64_t sfmask;		/* 0x618 */
	uint64_t kernel_gs_base;	/* 0x620 */
	uint64_t sysenter_cs;		/* 0x628 */
	uint64_t sysenter_esp;		/* 0x630 */
	uint64_t sysenter_eip;		/* 0x638 */
	uint64_t cr2;			/* 0x640 */
	uint8_t reserved_648[0x668 - 0x648];
	uint64_t g_pat;			/* 0x668 */
	uint8_t reserved_670[0x1000 - 0x670];
} __attribute__((packed));

struct vmcb {
	struct vmcb_control control;
	struct vmcb_save save;
} __attribute__((packed, aligned(4096)));

_Static_assert(sizeof(struct vmcb) == 4096, "VMCB is one page");
_Static_assert(offsetof(struct vmcb, control.iopm_base_pa) == 0x040, "iopm_base_pa");
_Static_assert(offsetof(struct vmcb, control.asid) == 0x058, "asid");
_Static_assert(offsetof(struct vmcb, control.exit_code) == 0x070, "exit_code");
_Static_assert(offsetof(struct vmcb, control.nested_ctl) == 0x090, "nested_ctl");
_Static_assert(offsetof(struct vmcb, control.clean) == 0x0c0, "clean");
_Static_assert(offsetof(struct vmcb, save.cpl) == 0x4cb, "cpl");
_Static_assert(offsetof(struct vmcb, save.efer) == 0x4d0, "efer");
_Static_assert(offsetof(struct vmcb, save.cr4) == 0x548, "cr4");
_Static_assert(offsetof(struct vmcb, save.rip) == 0x578, "rip");
_Static_assert(offsetof(struct vmcb, save.rsp) == 0x5d8, "rsp");
_Static_assert(offsetof(struct vmcb, save.rax) == 0x5f8, "rax");
_Static_assert(offsetof(struct vmcb, save.g_pat) == 0x668, "g_pat");

/* L2's general purpose registers other than RAX/RSP (those live in the
 * VMCB): loaded before VMRUN, stored after #VMEXIT by svm_run(). */
struct svm_gprs {
	uint64_t rbx, rcx, rdx, rsi, rdi, rbp;
	uint64_t r8, r9, r10, r11, r12, r13, r14, r15;
};

extern struct svm_gprs svm_l2_gprs;

/* CPUID 0x80000001 ECX[2] */
int svm_supported(void);
/* Assert SVM support, set EFER.SVME and VM_HSAVE_PA (the runtime's page). */
void svm_init(void);
/* The runtime's VMCB, prepared for L2 at `rip` with stack top `rsp`: L1's
 * segments, descriptor tables, control registers and EFER; RFLAGS = 2;
 * ASID 1; the intercepts above. */
struct vmcb *svm_vmcb_setup(void (*rip)(void), void *rsp);
/* Route port I/O to `port` to L1 (#VMEXIT IOIO) instead of L0. */
void svm_intercept_port(uint16_t port);
/* VMRUN (inside CLGI/STGI) with L2's GPRs; returns the #VMEXIT code. */
uint64_t svm_run(struct vmcb *vmcb);
/* Advance L2's RIP past an instruction of `len` bytes (the lab's KVM offers
 * no NRIPS, so next_rip is not used). */
void svm_skip(struct vmcb *vmcb, unsigned int len);
/* A short name for an exit code ("VMMCALL", "HLT", ...) or "?" */
const char *svm_exit_name(uint64_t code);

/* -- several vCPUs, several L2 guests --------------------------------------- */

/* Assert SVM support, set EFER.SVME and VM_HSAVE_PA = `hsave` (a 4 KiB
 * page of this vCPU's own). */
void svm_enable(void *hsave);
/* svm_vmcb_setup() on a VMCB of the caller's (4 KiB aligned). */
void svm_vmcb_init(struct vmcb *vmcb, void (*rip)(void), void *rsp);
/* svm_run() with L2's GPRs in `gprs` instead of svm_l2_gprs. */
uint64_t svm_run_gprs(struct vmcb *vmcb, struct svm_gprs *gprs);

/* An L2 address space: the first PML4 slot is L1's (its identity map of
 * the low 512 GiB), the second holds SVM_L2_WINDOW_PAGES pages of 4 KiB at
 * SVM_L2_WINDOW, each mapped with svm_l2_map(). */
#define SVM_L2_WINDOW		(1ull << 39)	/* 512 GiB: PML4 slot 1 */
#define SVM_L2_WINDOW_PAGES	512
#define SVM_PTE_P		(1ull << 0)
#define SVM_PTE_W		(1ull << 1)
#define SVM_PTE_G		(1ull << 8)

struct svm_l2_space {
	uint64_t pml4[512];
	uint64_t pdpt[512];
	uint64_t pd[512];
	uint64_t pt[512];
} __attribute__((aligned(4096)));

/* One L2 guest of the TLB checks: its VMCB, address space, two pages its
 * window maps in turn, stack, registers while L1 runs, and which page is
 * mapped now (`cur`, for the guests that track it). */
struct svm_l2 {
	struct vmcb vmcb;
	struct svm_l2_space space;
	volatile uint64_t page[2][512] __attribute__((aligned(4096)));
	uint8_t stack[4096] __attribute__((aligned(16)));
	struct svm_gprs gprs;
	unsigned int cur;
};

/* Build `s`: PML4 slot 0 copied from L1's CR3, the window's tables empty. */
void svm_l2_space_init(struct svm_l2_space *s);
/* Map window page `slot` to `page` (4 KiB aligned), global if `global`.
 * Only the page table entry changes: nothing is flushed. */
void svm_l2_map(struct svm_l2_space *s, unsigned int slot, const volatile void *page,
		int global);
/* The L2 virtual address of window page `slot`. */
static inline uint64_t svm_l2_va(unsigned int slot)
{
	return SVM_L2_WINDOW + (uint64_t)slot * 4096;
}

/* INVLPGA: invalidate the translation of `va` in ASID `asid` (L1 code). */
static inline void invlpga(uint64_t va, uint32_t asid)
{
	__asm__ volatile("invlpga %%rax, %%ecx" : : "a"(va), "c"(asid) : "memory");
}
/* INVLPGA is 0f 01 df */
#define SVM_INVLPGA_LEN 3

/*
 * L2 code (no stack use, no calls; resumed past the VMMCALL with
 * svm_skip(vmcb, SVM_VMMCALL_LEN) each starts over):
 *
 * svm_l2_load2:         RBX = *(u64 *)RDI; RCX = *(u64 *)RSI; VMMCALL
 * svm_l2_invlpga_load2: if R9 != 0: INVLPGA RAX = RDI, ECX = R8D; then as
 *                       svm_l2_load2 (an INVLPGA #VMEXIT that L1 handles
 *                       resumes past the INVLPGA: svm_skip(SVM_INVLPGA_LEN))
 * svm_l2_load_out_load: RBX = *(u64 *)RDI; OUT of AL = 1 to port DX = R8W;
 *                       RCX = *(u64 *)RDI; VMMCALL
 */
void svm_l2_load2(void);
void svm_l2_invlpga_load2(void);
void svm_l2_load_out_load(void);

static inline uint64_t rdtsc(void)
{
	uint32_t lo, hi;
	__asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
	return ((uint64_t)hi << 32) | lo;
}

static inline void vmmcall(void)
{
	__asm__ volatile("vmmcall" ::: "memory");
}

static inline unsigned long read_cr3(void)
{
	unsigned long v;
	__asm__ volatile("mov %%cr3, %0" : "=r"(v));
	return v;
}

/* VMMCALL is 0f 01 d9 */
#define SVM_VMMCALL_LEN 3
/* HLT is f4 */
#define SVM_HLT_LEN 1

/* Assert an exit code, naming it and L2's RIP if it is not the expected one. */
#define SVM_ASSERT_EXIT(vmcb, code, want)                                      \
	GUEST_ASSERT_MSG((code) == (want),                                     \
			 "#VMEXIT %s (%lx), expected %s (%lx); info1 %lx info2 %lx rip %lx", \
			 svm_exit_name(code), (unsigned long)(code),           \
			 svm_exit_name(want), (unsigned long)(want),           \
			 (unsigned long)(vmcb)->control.exit_info_1,           \
			 (unsigned long)(vmcb)->control.exit_info_2,           \
			 (unsigned long)(vmcb)->save.rip)

#endif /* PYKVM_SVM_H */
