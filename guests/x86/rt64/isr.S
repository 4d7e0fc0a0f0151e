/*
 * 256 interrupt entry stubs, 16 bytes apart (the IDT builder relies on the
 * spacing).  Each stub makes the stack look the same for every vector:
 * an error code (a dummy 0 when the CPU pushes none) and the vector number,
 * then jumps to the common path, which saves the general registers as a
 * struct pykvm_intr_frame and calls pykvm_isr_dispatch(frame).
 */
	.section .text, "ax"
	.code64

	.balign 16
	.globl pykvm_isr_stubs
pykvm_isr_stubs:
	.set vec, 0
	.rept 256
	.balign 16
	/* vectors for which the CPU pushes an error code */
	.if (vec == 8) || (vec == 10) || (vec == 11) || (vec == 12) || (vec == 13) || (vec == 14) || (vec == 17) || (vec == 21) || (vec == 29) || (vec == 30)
	.else
	pushq $0
	.endif
	pushq $vec
	jmp isr_common
	.set vec, vec + 1
	.endr

isr_common:
	pushq %rax
	pushq %rbx
	pushq %rcx
	pushq %rdx
	pushq %rsi
	pushq %rdi
	pushq %rbp
	pushq %r8
	pushq %r9
	pushq %r10
	pushq %r11
	pushq %r12
	pushq %r13
	pushq %r14
	pushq %r15
	cld
	movq %rsp, %rdi
	movq %rsp, %rbx		/* callee saved: remembers the frame */
	andq $-16, %rsp
	call pykvm_isr_dispatch
	movq %rbx, %rsp
	popq %r15
	popq %r14
	popq %r13
	popq %r12
	popq %r11
	popq %r10
	popq %r9
	popq %r8
	popq %rbp
	popq %rdi
	popq %rsi
	popq %rdx
	popq %rcx
	popq %rbx
	popq %rax
	addq $16, %rsp		/* vector and error code */
	iretq

	.section .note.GNU-stack, "", @progbits
