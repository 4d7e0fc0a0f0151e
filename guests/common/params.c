/*
 * Host-supplied parameters.  The host looks up the symbol "pykvm_params" in
 * the guest's ELF symbol table and writes values there before the run, or
 * while the guest is stopped at a SYNC.  It is initialised (PROGBITS) so
 * that it is part of the loaded image and always present in the file.
 */
#include "pykvm_guest.h"

volatile uint64_t pykvm_params[PYKVM_NPARAMS]
	__attribute__((section(".pykvm_params"), aligned(64), used)) = { 0 };
