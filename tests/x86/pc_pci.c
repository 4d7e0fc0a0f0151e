/*
 * pc_pci: PCI configuration mechanism #1 (0xcf8/0xcfc) on the PC machine.
 *
 * SYNC(1, 00:00.0 id, 00:00.0 class/rev, 00:00.0 header type, 00:01.0 id,
 *      00:01.0 header type, 00:01.3 id, 00:01.3 PMBA)
 * SYNC(2, absent 00:05.0 id, bus 1 id, enable bit clear, 16-bit read of the
 *      device id at 0xcfe, 8-bit read of the class code at 0xcff)
 * SYNC(3, interrupt line after writing 0x5a, vendor id after writing 0,
 *      0xcf8 read back, absent function after a write)
 */
#include "pc.h"

void guest_main(void)
{
	uint32_t disabled, addr;

	GUEST_SYNC(1, pci_read32(0, 0, 0, 0), pci_read32(0, 0, 0, 8),
		   pci_read8(0, 0, 0, 0x0e), pci_read32(0, 1, 0, 0),
		   pci_read8(0, 1, 0, 0x0e), pci_read32(0, 1, 3, 0),
		   pci_read32(0, 1, 3, 0x40));

	outl(0xcf8, pci_addr(0, 0, 0, 0) & ~0x80000000u);
	disabled = inl(0xcfc);
	GUEST_SYNC(2, pci_read32(0, 5, 0, 0), pci_read32(1, 0, 0, 0), disabled,
		   pci_read16(0, 0, 0, 2), pci_read8(0, 0, 0, 0x0b));

	pci_write8(0, 0, 0, 0x3c, 0x5a);
	pci_write32(0, 0, 0, 0, 0);
	pci_write32(0, 5, 0, 0x3c, 0x12345678);
	outl(0xcf8, pci_addr(0, 1, 3, 0x40));
	addr = inl(0xcf8);
	GUEST_SYNC(3, pci_read8(0, 0, 0, 0x3c), pci_read32(0, 0, 0, 0), addr,
		   pci_read32(0, 5, 0, 0x3c));
}
