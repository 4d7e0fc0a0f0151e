/*
 * 32-bit multiboot (v1) runtime.  The boot loader enters _start in flat
 * protected mode, paging off, with EAX = 0x2BADB002 and EBX = the address
 * of the multiboot information; ESP is undefined, so we bring our own.
 */
#define MB_MAGIC	0x1BADB002
#define MB_FLAGS	0x00000003	/* page-align modules, want memory info */

	.section .multiboot, "a"
	.balign 4
	.globl pykvm_multiboot_header
pykvm_multiboot_header:
	.long MB_MAGIC
	.long MB_FLAGS
	.long -(MB_MAGIC + MB_FLAGS)

	.section .text.start, "ax"
	.code32
	.globl _start
	.type _start, @function
_start:
	cli
	cld
	movl $boot_stack_top, %esp
	xorl %ebp, %ebp
	pushl %ebx		/* info */
	pushl %eax		/* magic */
	call guest_main32
	call pykvm_done
1:	cli
	hlt
	jmp 1b
	.size _start, . - _start

	.section .bss
	.balign 16
boot_stack:
	.skip 8192
boot_stack_top:

	.section .note.GNU-stack, "", @progbits
