/*
 * pc_testdev: QEMU's pc-testdev as kvm-unit-tests uses it.
 *
 * SYNC(1, 32-bit scratch read back, 8-bit reads of 0xe0..0xe3 packed,
 *      16-bit read at 0xe2, byte-port 0xe8..0xeb view, last byte of a
 *      rep outsb, rep insb result)
 * SYNC(2, iomem u32 read back, iomem u64 read back, iomem byte at +0x1001)
 * SYNC(3, interrupts after toggling ISA IRQ 14 (edge), vector seen)
 */
#include "pc.h"

#define VEC 0x76

static volatile uint64_t hits, last_vec;

static void isr(struct pykvm_intr_frame *f)
{
	hits++;
	last_vec = f->vector;
	lapic_write(LAPIC_EOI, 0);
}

void guest_main(void)
{
	static const char str[] = "abcdefgh";
	uint8_t in[4] = {0};
	volatile uint8_t *io = (volatile uint8_t *)0xff000000u;
	uint32_t packed = 0, bytes = 0, wide;
	uint64_t q;
	int i;

	outl(0xe0, 0x11223344);
	wide = inl(0xe0);
	for (i = 0; i < 4; i++)
		packed |= (uint32_t)inb(0xe0 + i) << (8 * i);
	for (i = 0; i < 4; i++)
		bytes |= (uint32_t)inb(0xe8 + i) << (8 * i);
	{
		uint16_t hi = inw(0xe2);
		uint8_t last;

		__asm__ volatile("cld; rep outsb" : "+S"((const char *){str}), "+c"((long){8})
				 : "d"((uint16_t)0xe0) : "memory");
		last = inb(0xe0);
		outb(0xe0, 0x5a);
		__asm__ volatile("cld; rep insb" : "+D"((uint8_t *){in}), "+c"((long){4})
				 : "d"((uint16_t)0xe0) : "memory");
		GUEST_SYNC(1, wide, packed, hi, bytes, last,
			   in[0] | in[1] << 8 | in[2] << 16 | (uint32_t)in[3] << 24);
	}

	*(volatile uint32_t *)(io + 0x100) = 0xcafef00d;
	*(volatile uint64_t *)(io + 0x200) = 0x0123456789abcdefull;
	io[0x1001] = 0x77;
	q = *(volatile uint64_t *)(io + 0x200);
	GUEST_SYNC(2, *(volatile uint32_t *)(io + 0x100), q, io[0x1001]);

	pykvm_set_handler(VEC, isr);
	pc_interrupts_via_ioapic();
	ioapic_route(14, VEC, 0);
	sti();
	outb(0x2000 + 14, 1);
	outb(0x2000 + 14, 0);
	for (i = 0; i < 1000000 && !hits; i++)
		__asm__ volatile("pause");
	cli();
	GUEST_SYNC(3, hits, last_vec);
}
