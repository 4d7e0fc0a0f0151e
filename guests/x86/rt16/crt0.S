/*
 * 16-bit real-mode runtime for flat binaries.  The C code is built with
 * gcc -m16 (32-bit code with operand/address size prefixes), so it assumes
 * flat segments: we load DS = ES = SS = 0 and far-jump to CS = 0 so that
 * every pointer is a linear address.  The image must stay below 64 KiB.
 */
	.section .text.start, "ax"
	.code16
	.globl _start
	.type _start, @function
_start:
	cli
	cld
	ljmpw $0, $1f		/* normalise CS:IP (e.g. 0x0800:0000 -> 0000:8000) */
1:	xorw %ax, %ax
	movw %ax, %ds
	movw %ax, %es
	movw %ax, %fs
	movw %ax, %gs
	movw %ax, %ss
	movl $PYKVM_RM_STACK_TOP, %esp
	xorl %ebp, %ebp
	calll guest_main16
	calll pykvm_done
2:	cli
	hlt
	jmp 2b
	.size _start, . - _start

	.section .note.GNU-stack, "", @progbits
