"""riscv64 KVM ABI facts: the structs behind ONE_REG CORE/CONFIG/CSR/TIMER ids and debug exits.

RISC-V has no KVM_GET_REGS; every register goes through ONE_REG, whose ids for the CONFIG, CORE,
CSR and TIMER types are the ``unsigned long`` index of a field in these structs.
"""

ARCH = "riscv64"

CDEF = r"""
/* The kernel's riscv kvm_debug_exit_arch and kvm_guest_debug_arch are empty structs (size 0 in
 * GNU C), which cffi cannot size as C does. kvm_debug_exit_arch appears only inside kvm_run's
 * 256-byte exit union, where one placeholder byte moves no offset; kvm_guest_debug leaves its
 * empty arch member out, so its size (8, which KVM_SET_GUEST_DEBUG's number encodes) is the
 * kernel's. */
struct kvm_debug_exit_arch {
    uint8_t _none;
};

struct kvm_guest_debug {
    uint32_t control;
    uint32_t pad;
};

struct kvm_riscv_config {
    unsigned long isa;
    unsigned long zicbom_block_size;
    unsigned long mvendorid;
    unsigned long marchid;
    unsigned long mimpid;
    unsigned long zicboz_block_size;
    unsigned long satp_mode;
    unsigned long zicbop_block_size;
};

struct user_regs_struct {
    unsigned long pc, ra, sp, gp, tp, t0, t1, t2, s0, s1, a0, a1, a2, a3, a4, a5, a6, a7;
    unsigned long s2, s3, s4, s5, s6, s7, s8, s9, s10, s11, t3, t4, t5, t6;
};

struct kvm_riscv_core {
    struct user_regs_struct regs;
    unsigned long mode;
};

struct kvm_riscv_csr {
    unsigned long sstatus, sie, stvec, sscratch, sepc, scause, stval, sip, satp, scounteren;
    unsigned long senvcfg;
};

struct kvm_riscv_aia_csr {
    unsigned long siselect, iprio1, iprio2, sieh, siph, iprio1h, iprio2h;
};

struct kvm_riscv_smstateen_csr {
    unsigned long sstateen0;
};

struct kvm_riscv_timer {
    uint64_t frequency;
    uint64_t time;
    uint64_t compare;
    uint64_t state;
};
"""

# The coalesced-MMIO ring page follows kvm_run in the vCPU mmap.
COALESCED_MMIO_PAGE_OFFSET = 1
# Where a vCPU's dirty ring would be mapped (in pages of the vCPU fd). Every architecture whose
# uAPI defines KVM_DIRTY_LOG_PAGE_OFFSET uses 64; the riscv uAPI of 6.12 does not define it (its
# KVM offers no KVM_CAP_DIRTY_LOG_RING*), so pykvm only uses it where KVM offers the capability.
DIRTY_LOG_PAGE_OFFSET = 64

# KVM_CREATE_VM types: RISC-V has only the default one.
VM_TYPES = {"DEFAULT": 0}

# struct kvm_interrupt.irq values for KVM_INTERRUPT on RISC-V: raise or lower the vCPU's
# VS-level external interrupt (arch/riscv/include/uapi/asm/kvm.h; api.rst 4.16).
KVM_INTERRUPT_SET = 0xFFFFFFFF          # -1U
KVM_INTERRUPT_UNSET = 0xFFFFFFFE        # -2U

# The in-kernel AIA irqchip (APLIC + per-hart IMSIC), a KVM_CREATE_DEVICE device: facts from the
# kernel's include/uapi/linux/kvm.h (enum kvm_device_type) and
# arch/riscv/include/uapi/asm/kvm.h ("Device Control API: RISC-V AIA"). Every CONFIG attribute
# is a u32; ADDR attributes are u64 guest-physical addresses; CTRL_INIT takes no value.
KVM_DEV_TYPE_RISCV_AIA = 11
KVM_CREATE_DEVICE_TEST = 1                 # kvm_create_device.flags: only ask whether it exists

KVM_DEV_RISCV_APLIC_ALIGN = 0x1000
KVM_DEV_RISCV_APLIC_SIZE = 0x4000
KVM_DEV_RISCV_APLIC_MAX_HARTS = 0x4000
KVM_DEV_RISCV_IMSIC_ALIGN = 0x1000
KVM_DEV_RISCV_IMSIC_SIZE = 0x1000          # one interrupt file (page) per hart and guest

KVM_DEV_RISCV_AIA_GRP_CONFIG = 0
KVM_DEV_RISCV_AIA_CONFIG_MODE = 0
KVM_DEV_RISCV_AIA_CONFIG_IDS = 1
KVM_DEV_RISCV_AIA_CONFIG_SRCS = 2
KVM_DEV_RISCV_AIA_CONFIG_GROUP_BITS = 3
KVM_DEV_RISCV_AIA_CONFIG_GROUP_SHIFT = 4
KVM_DEV_RISCV_AIA_CONFIG_HART_BITS = 5
KVM_DEV_RISCV_AIA_CONFIG_GUEST_BITS = 6

# CONFIG_MODE values: trap-and-emulate the IMSIC, IMSIC guest interrupt files, or the files where
# the host has them and emulation elsewhere
KVM_DEV_RISCV_AIA_MODE_EMUL = 0
KVM_DEV_RISCV_AIA_MODE_HWACCEL = 1
KVM_DEV_RISCV_AIA_MODE_AUTO = 2

KVM_DEV_RISCV_AIA_IDS_MIN = 63             # CONFIG_IDS: 63, 127, ... (a multiple of 64, less 1)
KVM_DEV_RISCV_AIA_IDS_MAX = 2048
KVM_DEV_RISCV_AIA_SRCS_MAX = 1024
KVM_DEV_RISCV_AIA_GROUP_BITS_MAX = 8
KVM_DEV_RISCV_AIA_GROUP_SHIFT_MIN = 24
KVM_DEV_RISCV_AIA_GROUP_SHIFT_MAX = 56
KVM_DEV_RISCV_AIA_HART_BITS_MAX = 16
KVM_DEV_RISCV_AIA_GUEST_BITS_MAX = 8

KVM_DEV_RISCV_AIA_GRP_ADDR = 1
KVM_DEV_RISCV_AIA_ADDR_APLIC = 0


def KVM_DEV_RISCV_AIA_ADDR_IMSIC(vcpu: int) -> int:
    """The ADDR attribute of vCPU ``vcpu``'s IMSIC (its S-level interrupt file)."""
    return 1 + vcpu


KVM_DEV_RISCV_AIA_ADDR_MAX = 1 + KVM_DEV_RISCV_APLIC_MAX_HARTS

KVM_DEV_RISCV_AIA_GRP_CTRL = 2
KVM_DEV_RISCV_AIA_CTRL_INIT = 0

KVM_DEV_RISCV_AIA_GRP_APLIC = 3
KVM_DEV_RISCV_AIA_GRP_IMSIC = 4
