/*
 * pit_first: the guest's first access to the PIT, in each instruction form, reaches KVM's i8254
 * (which the pc machine creates at that access and makes the vCPU execute it again).
 *
 * params[0] = form of the first access:
 *   0 inb $0x61    1 inb %dx (0x61)    2 inw $0x61    3 inw %dx (0x61)
 *   4 outb $0x43 (control word 0xb0)   5 outb %dx (0x43, control word 0xb0)
 * An IN starts with RAX = SENTINEL, so the host sees which bits the access replaced.
 * Then: channel 2 as lo/hi byte, mode 0 (control word 0xb0 unless the first access wrote it),
 * count 0x1234, its status by read-back, its count latched.
 *
 * SYNC(1, RAX after the first IN (0 for an OUT), channel 2 status, latched count)
 */
#include "pykvm_guest.h"

#define SENTINEL 0x5a5a5a5a5a5a5a5aull
#define PIT_CH2 0x42
#define PIT_MODE 0x43

void guest_main(void)
{
	uint64_t form = pykvm_params[0];
	uint64_t rax = SENTINEL;
	uint8_t status, lo, hi;

	switch (form) {
	case 0:
		__asm__ volatile("inb $0x61, %%al" : "+a"(rax) : : "memory");
		break;
	case 1:
		__asm__ volatile("inb %%dx, %%al" : "+a"(rax) : "d"(0x61) : "memory");
		break;
	case 2:
		__asm__ volatile("inw $0x61, %%ax" : "+a"(rax) : : "memory");
		break;
	case 3:
		__asm__ volatile("inw %%dx, %%ax" : "+a"(rax) : "d"(0x61) : "memory");
		break;
	case 4:
		__asm__ volatile("outb %%al, $0x43" : : "a"(0xb0) : "memory");
		break;
	case 5:
		__asm__ volatile("outb %%al, %%dx" : : "a"(0xb0), "d"(PIT_MODE) : "memory");
		break;
	}
	if (form < 4)
		outb(PIT_MODE, 0xb0);
	else
		rax = 0;
	outb(PIT_CH2, 0x34);
	outb(PIT_CH2, 0x12);
	outb(PIT_MODE, 0xe8);		/* read-back: status (not count) of channel 2 */
	status = inb(PIT_CH2);
	outb(PIT_MODE, 0x80);		/* counter latch, channel 2 */
	lo = inb(PIT_CH2);
	hi = inb(PIT_CH2);
	GUEST_SYNC(1, rax, status, ((uint32_t)hi << 8) | lo);
}
