/*
 * pc_fwcfg_qemu: fw_cfg accesses Linux never makes, answered as QEMU's x86 fw_cfg answers them
 * (one 2-port region at 0x510: 8-bit reads are data reads at either port, only a 16-bit write
 * at 0x510 selects; keys with bit 15 use the arch table, bit 14 is ignored for reads).
 *
 * SYNC(1, 8-bit read after an 8-bit write of 3 to 0x510 (still the signature),
 *      8-bit read after a 32-bit write of 3 to 0x510 (still the signature),
 *      8-bit read at 0x510 (data), 16-bit read at 0x510, 32-bit read at 0x510,
 *      16-bit read at 0x511, 8-bit read after a 16-bit write of 3 to 0x511)
 * SYNC(2, key 0x4003 (8 bytes), 0x8003 (8), 0x8002 (4), 0x8004 (2), 0x8000 (4),
 *      0x0040 (4), 0xffff (4))
 */
#include "pc.h"

void guest_main(void)
{
	uint64_t b0, b1, b2, w, l, w511, b3;

	fw_cfg_select(FW_CFG_SIGNATURE);
	inb(0x511);				/* 'Q' */
	outb(0x510, 3);
	b0 = inb(0x511);			/* 'E' */
	outl(0x510, 3);
	b1 = inb(0x511);			/* 'M' */
	b2 = inb(0x510);			/* 'U' */
	fw_cfg_select(FW_CFG_SIGNATURE);
	w = inw(0x510);
	l = inl(0x510);
	w511 = inw(0x511);			/* not valid: 0, no advance */
	outw(0x511, 3);
	b3 = inb(0x511);			/* 'Q' */
	GUEST_SYNC(1, b0, b1, b2, w, l, w511, b3);

	GUEST_SYNC(2, fw_cfg_read(0x4003, 8), fw_cfg_read(0x8003, 8), fw_cfg_read(0x8002, 4),
		   fw_cfg_read(0x8004, 2), fw_cfg_read(0x8000, 4), fw_cfg_read(0x0040, 4),
		   fw_cfg_read(0xffff, 4));
}
