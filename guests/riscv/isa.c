/*
 * Finds "riscv,isa" in the devicetree the VMM passed in a1 and reports it:
 * GUEST_PRINTF of the string, then SYNC(1, address of the string, length).
 */
#include "pykvm_guest.h"
#include "riscv.h"

void guest_main(unsigned long hartid, void *dtb)
{
	const char *isa;
	uint32_t len = 0;

	GUEST_ASSERT_MSG(fdt_valid(dtb), "no valid DTB at %p on hart %lu", dtb, hartid);
	isa = fdt_find_prop(dtb, "riscv,isa", &len);
	GUEST_ASSERT_MSG(isa != NULL, "riscv,isa not found in the DTB at %p", dtb);
	GUEST_PRINTF("riscv,isa = %s\n", isa);
	GUEST_SYNC(1, (uint64_t)(uintptr_t)isa, pykvm_strlen(isa));
	GUEST_DONE();
}
