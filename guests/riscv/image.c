/*
 * Booted as a Linux Image: image.bin is `objcopy -O binary` of image.elf, whose
 * runtime starts with the Image header (rt/crt0.S).  Reports what the boot
 * protocol promised: SYNC(1, address of _start, hart id, DTB address,
 * header image_size, header magic2, _end), with the DTB checked to be valid.
 */
#include "pykvm_guest.h"
#include "riscv.h"

extern char _start[], _end[];

void guest_main(unsigned long hartid, void *dtb)
{
	const volatile uint8_t *h = (const volatile uint8_t *)_start;
	uint64_t image_size = *(const volatile uint64_t *)(h + 16);
	uint32_t magic2 = *(const volatile uint32_t *)(h + 56);

	GUEST_ASSERT_MSG(fdt_valid(dtb), "no valid DTB at %p", dtb);
	GUEST_SYNC(1, (uint64_t)(uintptr_t)_start, hartid, (uint64_t)(uintptr_t)dtb,
		   image_size, magic2, (uint64_t)(uintptr_t)_end);
	GUEST_DONE();
}

/* guests.mk: build image.bin too, this ELF as a flat Linux Image (see rt/crt0.S) */
#define PYKVM_LINUX_IMAGE 1
