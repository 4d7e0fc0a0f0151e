/* gdb_target: the gdb stub's RISC-V test guest: Sv39, gdb_tick() five times, then DONE.
 * For gdb against `pykvm run --gdb` (tests/riscv/test_gdb_riscv.py, docs/gdb.md).
 *
 * It turns on Sv39 paging (1 GiB identity pages for the first 4 GiB, and an alias of RAM at
 * GVA GDB_ALIAS, so that gdb's GVAs go through the guest's own page tables), calls
 * gdb_tick(1..GDB_ROUNDS) which adds its argument to the global `counter`, then prints
 * `counter`, `poke` and `buffer` (which gdb may change on the way) and reports DONE.  Before
 * and after the loop it runs an ebreak and a c.ebreak of its own, which must reach its own
 * trap handler whether or not a debugger is attached and has breakpoints planted.  Built
 * with full debug info (guests.mk). */
#include "pykvm_guest.h"
#include "riscv.h"

#define GDB_ROUNDS 5
#define GDB_ALIAS 0x3fc0000000UL	/* Sv39 VPN[2] = 255 -> GPA 0x80000000 */
#define PTE_LEAF_RWX 0xcfUL		/* V R W X A D */

volatile unsigned long counter;		/* gdb reads it */
volatile unsigned long poke;		/* gdb writes it */
volatile char buffer[16] = "untouched";	/* gdb writes it through the alias */
volatile unsigned long own_breaks;	/* the guest's own ebreaks its handler saw */
volatile unsigned long own_cause;

static uint64_t root_table[512] __attribute__((aligned(4096)));

void own_trap(void);
/* The guest's own breakpoint handler: skip the (c.)ebreak, count it, keep scause. */
__asm__(".text\n.balign 4\n.globl own_trap\nown_trap:\n"
	"	csrr t0, sepc\n"
	"	lhu t1, 0(t0)\n"
	"	andi t1, t1, 3\n"
	"	addi t0, t0, 2\n"
	"	li t2, 3\n"
	"	bne t1, t2, 1f\n"
	"	addi t0, t0, 2\n"
	"1:	csrw sepc, t0\n"
	"	csrr t1, scause\n"
	"	la t2, own_cause\n"
	"	sd t1, 0(t2)\n"
	"	la t2, own_breaks\n"
	"	ld t1, 0(t2)\n"
	"	addi t1, t1, 1\n"
	"	sd t1, 0(t2)\n"
	"	sret\n");

static void enable_sv39(void)
{
	for (unsigned long g = 0; g < 4; g++)
		root_table[g] = ((g << 30) >> 12) << 10 | PTE_LEAF_RWX;
	root_table[(GDB_ALIAS >> 30) & 0x1ff] = (0x80000000UL >> 12) << 10 | PTE_LEAF_RWX;
	unsigned long satp = (8UL << 60) | ((uintptr_t)root_table >> 12);
	__asm__ volatile("sfence.vma\n csrw satp, %0\n sfence.vma" : : "r"(satp) : "memory");
}

static void own_ebreaks(void)
{
	unsigned long old;
	__asm__ volatile("csrr %0, stvec" : "=r"(old));
	__asm__ volatile("csrw stvec, %0\n"
			 ".option push\n.option norvc\n ebreak\n.option pop\n"
			 "c.ebreak\n"
			 "csrw stvec, %1"
			 : : "r"(own_trap), "r"(old) : "t0", "t1", "t2", "memory");
}

__attribute__((noinline)) unsigned long gdb_tick(unsigned long n)
{
	counter += n;
	return counter;
}

void guest_main(unsigned long hartid, void *dtb)
{
	(void)hartid;
	(void)dtb;
	enable_sv39();
	own_ebreaks();		/* under gdb: while gdb's breakpoint at gdb_tick is planted */
	for (unsigned long i = 1; i <= GDB_ROUNDS; i++)
		gdb_tick(i);
	GUEST_PRINTF("gdb_target: counter=%lu poke=%lu buffer=%s\n", counter, poke,
		     (const char *)buffer);
	own_ebreaks();
	GUEST_PRINTF("gdb_target: own_breaks=%lu scause=%lu\n", own_breaks, own_cause);
	GUEST_ASSERT_EQ(own_breaks, 4);
	GUEST_ASSERT_EQ(own_cause, 3);
	GUEST_DONE();
}
