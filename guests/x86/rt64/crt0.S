/*
 * 64-bit runtime entry.  The VMM enters here in long mode with paging on,
 * memory identity mapped, interrupts off and RSP at the top of this vCPU's
 * own stack page (every vCPU of a multi-vCPU guest starts here).
 */
	.section .text.start, "ax"
	.code64
	.globl _start
	.type _start, @function
_start:
	cld
	xorl %ebp, %ebp
	andq $-16, %rsp
	call pykvm_idt_install
	call guest_main
	call pykvm_done
1:	cli
	hlt
	jmp 1b
	.size _start, . - _start

	.section .note.GNU-stack, "", @progbits
