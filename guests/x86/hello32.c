/*
 * hello32: a multiboot v1 guest.  Greets on COM1, prints the command line,
 * mem_upper and the boot loader name from the multiboot information, then
 * ends the run through isa-debug-exit (port 0xf4) with the value given as
 * "exit=N" on the command line (default 0; the VMM's exit status is then
 * (N << 1) | 1).  A bad boot magic exits with 0x7f.
 */
#include "pykvm_guest.h"

#define MB_BOOT_MAGIC 0x2BADB002
#define MBI_MEM (1u << 0)
#define MBI_CMDLINE (1u << 2)
#define MBI_MMAP (1u << 6)
#define MBI_LOADER_NAME (1u << 9)

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

static void say(const char *fmt, ...)
{
	char buf[160];
	va_list ap;

	va_start(ap, fmt);
	pykvm_vsnprintf(buf, sizeof(buf), fmt, ap);
	va_end(ap);
	com1_puts(buf);
}

/* value of "exit=N" (decimal or 0x hex) in the command line, else 0 */
static uint32_t exit_value(const char *s)
{
	for (; *s; s++) {
		uint32_t v = 0, base = 10;

		if ((s[0] != 'e' || s[1] != 'x' || s[2] != 'i' || s[3] != 't' || s[4] != '='))
			continue;
		s += 5;
		if (s[0] == '0' && (s[1] == 'x' || s[1] == 'X')) {
			base = 16;
			s += 2;
		}
		for (;; s++) {
			uint32_t d;

			if (*s >= '0' && *s <= '9')
				d = *s - '0';
			else if (base == 16 && *s >= 'a' && *s <= 'f')
				d = *s - 'a' + 10;
			else if (base == 16 && *s >= 'A' && *s <= 'F')
				d = *s - 'A' + 10;
			else
				break;
			v = v * base + d;
		}
		return v;
	}
	return 0;
}

void guest_main32(uint32_t magic, struct mb_info *mbi)
{
	const char *cmdline = "";

	com1_puts("Hello from pykvm guest! (32-bit multiboot)\n");
	if (magic != MB_BOOT_MAGIC) {
		say("bad multiboot magic 0x%x\n", magic);
		pykvm_debug_exit(0x7f);
		return;
	}
	if (mbi->flags & MBI_CMDLINE)
		cmdline = (const char *)(uintptr_t)mbi->cmdline;
	say("cmdline: %s\n", cmdline);
	if (mbi->flags & MBI_MEM)
		say("mem_lower: %u KiB, mem_upper: %u KiB\n", mbi->mem_lower,
		    mbi->mem_upper);
	if (mbi->flags & MBI_LOADER_NAME)
		say("boot loader: %s\n", (const char *)(uintptr_t)mbi->boot_loader_name);
	pykvm_debug_exit(exit_value(cmdline));
}
