# RISC-V guests, as a make fragment.
#
# Included by guests/Makefile when riscv64-linux-gnu-gcc is on PATH (there it
# uses that Makefile's OUT, SRCDIR, GUEST_INCLUDE, COMMON_SRCS and Q, and
# appends its images to GUEST_TARGETS), and by guests/riscv/Makefile for a
# standalone build:  make -C guests/riscv OUT=<dir>
#
# Output: $(OUT)/riscv/<name>.elf for every riscv/<name>.c (a new guest needs
# no line here), and for a source with a `#define PYKVM_LINUX_IMAGE` line also
# <name>.bin: the ELF as a flat Linux Image (the runtime starts with an Image
# header), which pykvm prefers when both exist.  The phony target
# riscv-guests builds them all.

RISCV_DIR := $(patsubst %/,%,$(dir $(abspath $(lastword $(MAKEFILE_LIST)))))
SRCDIR ?= $(patsubst %/,%,$(dir $(RISCV_DIR)))
OUT ?= $(SRCDIR)/out
GUEST_INCLUDE ?= $(SRCDIR)/include
COMMON_SRCS ?= $(SRCDIR)/common/report.c $(SRCDIR)/common/printf.c \
	$(SRCDIR)/common/string.c $(SRCDIR)/common/params.c
RISCV_CC ?= riscv64-linux-gnu-gcc
RISCV_OBJCOPY ?= $(patsubst %gcc,%objcopy,$(RISCV_CC))

RISCV_CFLAGS := -std=gnu11 -march=rv64imac_zicsr_zifencei -mabi=lp64 -mcmodel=medany \
	-ffreestanding -fno-builtin -nostdlib -static -fno-pic -fno-pie \
	-fno-stack-protector -fno-asynchronous-unwind-tables -fno-unwind-tables \
	-fno-common -fno-tree-loop-distribute-patterns \
	-Os -g1 -Wall -Wextra -Werror=implicit-function-declaration \
	-fdebug-prefix-map=$(SRCDIR)=. -ffile-prefix-map=$(SRCDIR)/= -I$(GUEST_INCLUDE) -I$(RISCV_DIR)/rt
RISCV_LDFLAGS := -nostdlib -static -no-pie -Wl,--build-id=none \
	-Wl,-z,max-page-size=0x1000 -Wl,-T,$(RISCV_DIR)/rt/link.ld
ifneq ($(shell $(RISCV_CC) -Wl,--help 2>/dev/null | grep -c no-warn-rwx-segments),0)
RISCV_LDFLAGS += -Wl,--no-warn-rwx-segments
endif

RISCV_SRCS := $(sort $(wildcard $(RISCV_DIR)/*.c))
RISCV_HASH := \#
RISCV_GUESTS := $(sort $(basename $(notdir $(RISCV_SRCS))))
RISCV_IMAGE_GUESTS := $(sort $(basename $(notdir $(shell grep -lE \
	'^[[:space:]]*$(RISCV_HASH)[[:space:]]*define[[:space:]]+PYKVM_LINUX_IMAGE\b' $(RISCV_SRCS) /dev/null))))
RISCV_RT_SRCS := $(RISCV_DIR)/rt/crt0.S $(RISCV_DIR)/rt/runtime.c $(RISCV_DIR)/rt/fdt.c \
	$(COMMON_SRCS)
RISCV_DEPS := $(RISCV_RT_SRCS) $(RISCV_DIR)/rt/link.ld $(RISCV_DIR)/rt/riscv.h \
	$(GUEST_INCLUDE)/pykvm_guest.h $(RISCV_DIR)/guests.mk
RISCV_TARGETS := $(RISCV_GUESTS:%=$(OUT)/riscv/%.elf) $(RISCV_IMAGE_GUESTS:%=$(OUT)/riscv/%.bin)
GUEST_TARGETS += $(RISCV_TARGETS)

.PHONY: riscv-guests riscv-clean
riscv-guests: $(RISCV_TARGETS)

$(OUT)/riscv/%.elf: $(RISCV_DIR)/%.c $(RISCV_DEPS)
	@mkdir -p $(@D)
	@$(if $(Q),echo "  RV64    riscv/$*.elf")
	$(Q)$(RISCV_CC) $(RISCV_CFLAGS) $(RISCV_LDFLAGS) -o $@ $(RISCV_RT_SRCS) $<

# gdb reads gdb_target's globals by type and steps it by line (tests/riscv/test_gdb_riscv.py)
$(OUT)/riscv/gdb_target.elf: RISCV_CFLAGS += -g

$(OUT)/riscv/%.bin: $(OUT)/riscv/%.elf
	@$(if $(Q),echo "  IMAGE   riscv/$*.bin")
	$(Q)$(RISCV_OBJCOPY) -O binary $< $@

riscv-clean:
	rm -rf $(OUT)/riscv
