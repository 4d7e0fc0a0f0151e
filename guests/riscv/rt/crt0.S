/*
 * RISC-V S-mode runtime entry.
 *
 * Entered in S-mode with paging off, a0 = hart id, a1 = DTB address (the
 * Linux boot convention).  Sets up a per-hart stack (up to 4 harts), the trap
 * vector, then calls guest_main(hartid, dtb) and reports DONE.
 *
 * The image starts with a Linux Image header (Documentation/arch/riscv/
 * boot-image-header.rst): the first instruction jumps over it, so the ELF
 * boots from _start as before, and `objcopy -O binary` of the ELF is an Image
 * that any Linux boot loader (QEMU -kernel, pykvm run) places at RAM base +
 * text_offset (0x200000: where link.ld puts _start) and enters at its start.
 *
 * pykvm_resume_entry is where an SBI system suspend comes back: KVM resets
 * the hart with pc = resume address, a0 = hart id, a1 = opaque and every
 * other GPR zero, so the stack and trap vector are set up again from scratch
 * (stvec and sscratch are reset too); it then calls
 * guest_resume(hartid, opaque), which the guest may define.
 */
	.file "crt0.S"
	.equ STACK_SHIFT, 14		/* 16 KiB per hart */
	.equ TRAP_STACK_SHIFT, 12	/* 4 KiB per hart */
	.equ MAX_HARTS, 4

	.section .text.start, "ax"
	.globl _start
	.type _start, @function
/*
 * What both entries do for hart a0: gp, interrupts off, the hart's stack, the trap vector.
 * Harts we have no stack for are parked.
 */
	.macro hart_setup
	.option push
	.option norelax
	la	gp, __global_pointer$
	.option pop
	li	t0, MAX_HARTS
	bgeu	a0, t0, .Lpark
	csrw	sie, zero
	csrw	sscratch, a0		/* trap handler finds the hart id here */
	la	sp, __stacks_top
	slli	t0, a0, STACK_SHIFT
	sub	sp, sp, t0
	la	t0, pykvm_trap_entry
	csrw	stvec, t0
	.endm

_start:
	j	.Lentry
	.balign	8
	.dword	0x200000		/* text_offset: _start - RAM base (link.ld) */
	.dword	_end - _start		/* image_size, .bss and stacks included */
	.dword	0			/* flags */
	.word	(0 << 16) | 2		/* header version 0.2 */
	.word	0			/* res1 */
	.dword	0			/* res2 */
	.ascii	"RISCV\0\0\0"		/* magic (deprecated) */
	.ascii	"RSC\x05"		/* magic2 */
	.word	0			/* res3 */
.Lentry:
	hart_setup
	/* hart 0 clears .bss (fresh guest RAM is zero anyway) */
	bnez	a0, 2f
	la	t0, __bss_start
	la	t1, __bss_end
1:	bgeu	t0, t1, 2f
	sd	zero, 0(t0)
	addi	t0, t0, 8
	j	1b
2:	mv	tp, a0
	call	guest_main
	call	pykvm_done
.Lpark:
	wfi
	j	.Lpark
	.size _start, . - _start

	.globl pykvm_resume_entry
	.type pykvm_resume_entry, @function
	.balign 4
pykvm_resume_entry:
	hart_setup
	mv	tp, a0
	call	guest_resume
	call	pykvm_done
	j	.Lpark
	.size pykvm_resume_entry, . - pykvm_resume_entry

/*
 * Trap vector (direct mode, so 4-byte aligned).  Every trap is fatal for a
 * test guest: switch to this hart's trap stack and report TRAP.
 */
	.globl pykvm_trap_entry
	.type pykvm_trap_entry, @function
	.balign 4
pykvm_trap_entry:
	csrr	t0, sscratch
	li	t1, MAX_HARTS
	bltu	t0, t1, 3f
	li	t0, 0
3:	la	sp, __trap_stacks_top
	slli	t0, t0, TRAP_STACK_SHIFT
	sub	sp, sp, t0
	csrr	a0, scause
	csrr	a1, sepc
	csrr	a2, stval
	call	pykvm_riscv_trap
	j	.Lpark
	.size pykvm_trap_entry, . - pykvm_trap_entry

	.section .note.GNU-stack, "", @progbits
