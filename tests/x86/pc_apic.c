/*
 * pc_apic: the IOAPIC and local APIC versions as the guest reads them, the
 * RAM size fw_cfg reports, and a write/read at an address of the host's
 * choosing (RAM above 4 GiB in big guests).
 *
 * params[0] = address to write and read back (0: none)
 * SYNC(1, IOAPIC version register, local APIC version register, fw_cfg RAM
 *      size, value read back at params[0], IOAPIC id register)
 */
#include "pc.h"

void guest_main(void)
{
	uint64_t back = 0;

	if (pykvm_params[0]) {
		volatile uint64_t *p = (volatile uint64_t *)(uintptr_t)pykvm_params[0];

		*p = 0x5ca1ab1e0ddba11ull;
		back = *p;
	}
	GUEST_SYNC(1, ioapic_read(1), lapic_read(LAPIC_VERSION),
		   fw_cfg_read(FW_CFG_RAM_SIZE, 8), back, ioapic_read(0));
}
