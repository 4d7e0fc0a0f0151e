/*
 * The raw-C contender of `pykvm bench` (rawbench.c), built as its own module pykvm._rawbench by
 * csrc/build_rawbench.py: nothing here is part of pykvm's run loop (pykvm._native).
 */
#ifndef PYKVM_RAWBENCH_H
#define PYKVM_RAWBENCH_H

#include <stdint.h>

/* Which exit each guest loop makes (and pykvm_raw_exit_loop() serves). */
#define PYKVM_RAW_IO_OUT 1
#define PYKVM_RAW_IO_IN 2
#define PYKVM_RAW_MMIO_WRITE 3
#define PYKVM_RAW_MMIO_READ 4
#define PYKVM_RAW_HLT 5

int pykvm_raw_exit_loop(const char *dev, int kind, uint64_t n, const uint8_t *code,
                        uint32_t code_len, uint64_t ram_size, int64_t *out);
int pykvm_raw_lifecycle(const char *dev, uint32_t count, const uint8_t *code,
                        uint32_t code_len, uint64_t ram_size, int64_t *out);
void *pykvm_raw_vms_create(const char *dev, uint32_t count, uint64_t ram_size,
                           const uint8_t *image, const uint8_t *pages);
void pykvm_raw_vms_destroy(void *handle, uint32_t count);
int pykvm_resident_pages(uint64_t addr, uint64_t size, uint8_t *bitmap);
/* Reset (pykvm bench's reset comparison): see rawbench.c. ns: one wall-clock figure per
 * iteration; out[0] pages copied back in all, out[1] ioctls per reset, out[2] iterations. */
#define PYKVM_RAW_RESET_LOG 0
#define PYKVM_RAW_RESET_LOG_MANUAL 1
#define PYKVM_RAW_RESET_RING 2
int pykvm_raw_reset(const char *dev, int mode, const uint8_t *code, uint32_t code_len,
                    uint64_t ram_size, const uint32_t *msrs, uint32_t nmsrs, uint32_t n,
                    int64_t *ns, int64_t *out);
int pykvm_raw_recreate(const char *dev, const uint8_t *code, uint32_t code_len,
                       uint64_t ram_size, uint32_t n, int64_t *ns);

#endif
