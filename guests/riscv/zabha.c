/*
 * If the DTB's riscv,isa lists Zabha, does a byte-wide amoadd.b (encoded with
 * .insn, so the toolchain need not know Zabha) and reports
 * SYNC(1, 1, old value, new value); otherwise SYNC(1, 0).
 */
#include "pykvm_guest.h"
#include "riscv.h"

static volatile uint8_t cell[8] = { 0x7f, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77 };

static int has_ext(const char *isa, const char *ext)
{
	const char *p = isa;
	size_t n = pykvm_strlen(ext);

	while (*p) {
		if (*p == '_') {
			size_t i = 0;

			p++;
			while (i < n && p[i] == ext[i])
				i++;
			if (i == n && (p[n] == '_' || p[n] == '\0'))
				return 1;
			continue;
		}
		p++;
	}
	return 0;
}

void guest_main(unsigned long hartid, void *dtb)
{
	const char *isa;
	unsigned long old;

	(void)hartid;
	isa = fdt_valid(dtb) ? fdt_find_prop(dtb, "riscv,isa", NULL) : NULL;
	GUEST_ASSERT(isa != NULL);
	if (!has_ext(isa, "zabha")) {
		GUEST_SYNC(1, 0);
		GUEST_DONE();
	}
	/* amoadd.b old, inc, (cell): AMO opcode 0x2f, funct3 0 (byte),
	 * funct5 0 (add), aq = rl = 0 */
	{
		register unsigned long rs1 __asm__("a0") = (unsigned long)&cell[0];
		register unsigned long rs2 __asm__("a1") = 2;
		register unsigned long rd __asm__("a2");

		__asm__ volatile(".insn r 0x2f, 0, 0, %0, %1, %2"
				 : "=r"(rd) : "r"(rs1), "r"(rs2) : "memory");
		old = rd;
	}
	GUEST_SYNC(1, 1, old & 0xff, cell[0], cell[1]);
	GUEST_DONE();
}
