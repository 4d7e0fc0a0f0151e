/*
 * pc_lowmem: pc_multiboot linked at 0x8000 (below 1 MiB, where pykvm keeps
 * its boot structures by default) and big enough to cover them: the loader
 * must put the multiboot information, the GDT and the boot stack elsewhere.
 * Its entry is pc_multiboot.c's guest_main32 (a multiboot guest), and
 * PYKVM_LINK_LOW links it with rt32/link_low.ld (see pykvm/guestbuild.py).
 */
#define PYKVM_LINK_LOW 1
#define PC_PAD 0x30000
#include "pc_multiboot.c"
