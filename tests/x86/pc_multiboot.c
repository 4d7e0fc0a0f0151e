/*
 * pc_multiboot: what a multiboot loader handed over (32-bit, multiboot v1).
 *
 * SYNC(1, EAX magic, EBX (info address), flags, mem_lower, mem_upper,
 *      cmdline address, where this image runs (address of guest_main32))
 * SYNC(2, mods_count, mods_addr, mmap_length, mmap_addr, loader name address,
 *      end of this image (_end))
 * SYNC(3, i, mod_start, mod_end, string address, first 4 bytes, last byte)
 *      per module
 * SYNC(4, i, base, length, type, entry size) per memory map entry
 */
#include "pykvm_guest.h"

struct mb_info {
	uint32_t flags;
	uint32_t mem_lower, mem_upper;
	uint32_t boot_device;
	uint32_t cmdline;
	uint32_t mods_count, mods_addr;
	uint32_t syms[4];
	uint32_t mmap_length, mmap_addr;
	uint32_t drives_length, drives_addr;
	uint32_t config_table;
	uint32_t boot_loader_name;
};

struct mb_module {
	uint32_t start, end, string, reserved;
};

struct mb_mmap {
	uint32_t size;
	uint32_t base_lo, base_hi, len_lo, len_hi;
	uint32_t type;
} __attribute__((packed));

extern char _end[];

#ifdef PC_PAD
/* a big image: it covers where pykvm keeps its boot structures by default */
static volatile uint8_t pad[PC_PAD] __attribute__((used));
#endif

void guest_main32(uint32_t magic, struct mb_info *mbi)
{
	uint32_t i, off;

	GUEST_SYNC(1, magic, (uintptr_t)mbi, mbi->flags, mbi->mem_lower, mbi->mem_upper,
		   mbi->cmdline, (uintptr_t)guest_main32);
	GUEST_SYNC(2, mbi->mods_count, mbi->mods_addr, mbi->mmap_length, mbi->mmap_addr,
		   mbi->boot_loader_name, (uintptr_t)_end);
	for (i = 0; i < mbi->mods_count; i++) {
		struct mb_module *m = (struct mb_module *)(uintptr_t)mbi->mods_addr + i;
		const uint8_t *d = (const uint8_t *)(uintptr_t)m->start;
		uint32_t first = 0, last = 0;

		if (m->end > m->start) {
			first = d[0] | d[1] << 8 | d[2] << 16 | (uint32_t)d[3] << 24;
			last = d[m->end - m->start - 1];
		}
		GUEST_SYNC(3, i, m->start, m->end, m->string, first, last);
	}
	for (i = 0, off = 0; off < mbi->mmap_length; i++) {
		struct mb_mmap *e = (struct mb_mmap *)(uintptr_t)(mbi->mmap_addr + off);

		GUEST_SYNC(4, i, e->base_lo | (uint64_t)e->base_hi << 32,
			   e->len_lo | (uint64_t)e->len_hi << 32, e->type, e->size);
		off += e->size + 4;
	}
}
