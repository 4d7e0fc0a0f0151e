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
