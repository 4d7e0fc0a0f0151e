/*
 * pc_fwcfg: reads QEMU's fw_cfg through the legacy ports (0x510 selector,
 * 0x511 data) as firmware and test kernels do.
 *
 * SYNC(1, signature, id, ram_size, nb_cpus, max_cpus)
 * SYNC(2, unknown key's first 8 bytes, bytes past the end of the signature,
 *      signature read again after re-selecting it, 16-bit data port read)
 */
#include "pc.h"

void guest_main(void)
{
	uint64_t sig = fw_cfg_read(FW_CFG_SIGNATURE, 4);
	uint64_t id = fw_cfg_read(FW_CFG_ID, 4);
	uint64_t ram = fw_cfg_read(FW_CFG_RAM_SIZE, 8);
	uint64_t cpus = fw_cfg_read(FW_CFG_NB_CPUS, 2);
	uint64_t max = fw_cfg_read(FW_CFG_MAX_CPUS, 2);
	uint64_t unknown, past = 0, again, wide;
	int i;

	GUEST_SYNC(1, sig, id, ram, cpus, max);

	unknown = fw_cfg_read(0x1234, 8);
	fw_cfg_select(FW_CFG_SIGNATURE);
	for (i = 0; i < 4; i++)
		inb(0x511);
	for (i = 0; i < 4; i++)			/* past the end: zeros */
		past |= (uint64_t)inb(0x511) << (8 * i);
	inb(0x511);
	again = fw_cfg_read(FW_CFG_SIGNATURE, 4);	/* selecting rewinds */
	fw_cfg_select(FW_CFG_SIGNATURE);
	wide = inw(0x511);			/* not valid (QEMU 7.2): 0 */
	GUEST_SYNC(2, unknown, past, again, wide);
}
