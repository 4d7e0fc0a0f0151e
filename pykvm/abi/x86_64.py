"""x86_64 KVM ABI facts: register structs, CPUID/MSR containers, nested state, debug exits."""

ARCH = "x86_64"

CDEF = r"""
struct kvm_reinject_control {
    uint8_t pit_reinject;
    uint8_t reserved[31];
};

struct kvm_debug_exit_arch {
    uint32_t exception;
    uint32_t pad;
    uint64_t pc;
    uint64_t dr6;
    uint64_t dr7;
};

struct kvm_guest_debug_arch {
    uint64_t debugreg[8];
};

struct kvm_guest_debug {
    uint32_t control;
    uint32_t pad;
    struct kvm_guest_debug_arch arch;
};

struct kvm_regs {
    uint64_t rax, rbx, rcx, rdx;
    uint64_t rsi, rdi, rsp, rbp;
    uint64_t r8, r9, r10, r11;
    uint64_t r12, r13, r14, r15;
    uint64_t rip, rflags;
};

struct kvm_segment {
    uint64_t base;
    uint32_t limit;
    uint16_t selector;
    uint8_t type;
    uint8_t present, dpl, db, s, l, g, avl;
    uint8_t unusable;
    uint8_t padding;
};

struct kvm_dtable {
    uint64_t base;
    uint16_t limit;
    uint16_t padding[3];
};

struct kvm_sregs {
    struct kvm_segment cs, ds, es, fs, gs, ss;
    struct kvm_segment tr, ldt;
    struct kvm_dtable gdt, idt;
    uint64_t cr0, cr2, cr3, cr4, cr8;
    uint64_t efer;
    uint64_t apic_base;
    uint64_t interrupt_bitmap[4];
};

struct kvm_fpu {
    uint8_t fpr[8][16];
    uint16_t fcw;
    uint16_t fsw;
    uint8_t ftwx;
    uint8_t pad1;
    uint16_t last_opcode;
    uint64_t last_ip;
    uint64_t last_dp;
    uint8_t xmm[16][16];
    uint32_t mxcsr;
    uint32_t pad2;
};

struct kvm_msr_entry {
    uint32_t index;
    uint32_t reserved;
    uint64_t data;
};

struct kvm_msrs {
    uint32_t nmsrs;
    uint32_t pad;
    struct kvm_msr_entry entries[];
};

struct kvm_msr_list {
    uint32_t nmsrs;
    uint32_t indices[];
};

struct kvm_cpuid_entry2 {
    uint32_t function;
    uint32_t index;
    uint32_t flags;
    uint32_t eax;
    uint32_t ebx;
    uint32_t ecx;
    uint32_t edx;
    uint32_t padding[3];
};

struct kvm_cpuid2 {
    uint32_t nent;
    uint32_t padding;
    struct kvm_cpuid_entry2 entries[];
};

struct kvm_vmx_nested_state_hdr {
    uint64_t vmxon_pa;
    uint64_t vmcs12_pa;
    struct {
        uint16_t flags;
    } smm;
    uint16_t pad;
    uint32_t flags;
    uint64_t preemption_timer_deadline;
};

struct kvm_svm_nested_state_hdr {
    uint64_t vmcb_pa;
};

struct kvm_vmx_nested_state_data {
    uint8_t vmcs12[4096];
    uint8_t shadow_vmcs12[4096];
};

struct kvm_svm_nested_state_data {
    uint8_t vmcb12[4096];
};

struct kvm_nested_state {
    uint16_t flags;
    uint16_t format;
    uint32_t size;
    union {
        struct kvm_vmx_nested_state_hdr vmx;
        struct kvm_svm_nested_state_hdr svm;
        uint8_t pad[120];
    } hdr;
    /* followed by `size - 128` bytes of data: struct kvm_vmx_nested_state_data (vmcs12 and
       shadow vmcs12) or struct kvm_svm_nested_state_data (vmcb12) */
};
"""

# Pages of the vCPU mmap after kvm_run: PIO data, then the coalesced-MMIO ring.
PIO_PAGE_OFFSET = 1
COALESCED_MMIO_PAGE_OFFSET = 2

# The ONE_REG arch prefix for this architecture and the x86 register types (Linux 6.18+).
REG_TYPE_MSR = 2
REG_TYPE_KVM = 3
KVM_REG_GUEST_SSP = 0

# Nested state.
NESTED_STATE_FORMATS = {"VMX": 0, "SVM": 1}
NESTED_STATE_FLAGS = {
    "GUEST_MODE": 0x00000001, "RUN_PENDING": 0x00000002, "EVMCS": 0x00000004,
    "MTF_PENDING": 0x00000008, "GIF_SET": 0x00000100,
}
NESTED_VMX_SMM_FLAGS = {"GUEST_MODE": 0x00000001, "VMXON": 0x00000002}
NESTED_VMX_FLAGS = {"PREEMPTION_TIMER_DEADLINE": 0x00000001}
NESTED_STATE_VMX_VMCS_SIZE = 0x1000
NESTED_STATE_SVM_VMCB_SIZE = 0x1000

# kvm_cpuid_entry2.flags
CPUID_FLAG_SIGNIFCANT_INDEX = 1 << 0

# Guest debug: x86-only control bits.
GUESTDBG_USE_SW_BP = 0x00010000
GUESTDBG_USE_HW_BP = 0x00020000
GUESTDBG_INJECT_DB = 0x00040000
GUESTDBG_INJECT_BP = 0x00080000
