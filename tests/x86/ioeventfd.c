/*
 * ioeventfd: one port write and/or one MMIO write.
 *
 * params[0] = port (0: 0x6000; ~0: no port write)
 * params[1] = MMIO address (0: no MMIO write)
 * params[2] = value (0: 0x42)
 * params[3] = access width in bytes, 1/2/4 (and 8 for MMIO) (0: 4)
 * SYNC(1, port, value) after the port write
 * SYNC(2, addr, value) after the MMIO write
 */
#include "pykvm_guest.h"

void guest_main(void)
{
	uint64_t port = pykvm_params[0] ? pykvm_params[0] : 0x6000;
	uint64_t addr = pykvm_params[1];
	uint64_t val = pykvm_params[2] ? pykvm_params[2] : 0x42;
	uint64_t width = pykvm_params[3] ? pykvm_params[3] : 4;

	if (port != ~0ULL) {
		if (width == 1)
			outb((uint16_t)port, (uint8_t)val);
		else if (width == 2)
			outw((uint16_t)port, (uint16_t)val);
		else
			outl((uint16_t)port, (uint32_t)val);
		GUEST_SYNC(1, port, val);
	}
	if (addr) {
		if (width == 1)
			*(volatile uint8_t *)(uintptr_t)addr = (uint8_t)val;
		else if (width == 2)
			*(volatile uint16_t *)(uintptr_t)addr = (uint16_t)val;
		else if (width == 8)
			*(volatile uint64_t *)(uintptr_t)addr = val;
		else
			*(volatile uint32_t *)(uintptr_t)addr = (uint32_t)val;
		GUEST_SYNC(2, addr, val);
	}
}
