/*
 * pc_lowmem: pc_multiboot linked at 0x8000 (below 1 MiB, where pykvm keeps
 * its boot structures by default) and big enough to cover them: the loader
 * must put the multiboot information, the GDT and the boot stack elsewhere.
 */
#define PC_PAD 0x30000
#include "pc_multiboot.c"
