"""x86_64 KVM ABI facts: register structs, CPUID/MSR containers, nested state, debug exits."""

ARCH = "x86_64"

CDEF = r"""
struct kvm_irqchip {
    uint32_t chip_id;              /* KVM_IRQCHIP_PIC_MASTER 0, PIC_SLAVE 1, IOAPIC 2 */
    uint32_t pad;
    uint8_t chip[512];             /* union of kvm_pic_state / kvm_ioapic_state, kept opaque */
};

struct kvm_pit_channel_state {
    uint32_t count;
    uint16_t latched_count;
    uint8_t count_latched;
    uint8_t status_latched;
    uint8_t status;
    uint8_t read_state;
    uint8_t write_state;
    uint8_t write_latch;
    uint8_t rw_mode;
    uint8_t mode;
    uint8_t bcd;
    uint8_t gate;
    int64_t count_load_time;
};

struct kvm_pit_state2 {
    struct kvm_pit_channel_state channels[3];
    uint32_t flags;
    uint32_t reserved[9];
};

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

struct kvm_lapic_state {
    char regs[1024];
};

struct kvm_sregs2 {
    struct kvm_segment cs, ds, es, fs, gs, ss;
    struct kvm_segment tr, ldt;
    struct kvm_dtable gdt, idt;
    uint64_t cr0, cr2, cr3, cr4, cr8;
    uint64_t efer;
    uint64_t apic_base;
    uint64_t flags;
    uint64_t pdptrs[4];
};

struct kvm_vcpu_events {
    struct {
        uint8_t injected;
        uint8_t nr;
        uint8_t has_error_code;
        uint8_t pending;
        uint32_t error_code;
    } exception;
    struct {
        uint8_t injected;
        uint8_t nr;
        uint8_t soft;
        uint8_t shadow;
    } interrupt;
    struct {
        uint8_t injected;
        uint8_t pending;
        uint8_t masked;
        uint8_t pad;
    } nmi;
    uint32_t sipi_vector;
    uint32_t flags;
    struct {
        uint8_t smm;
        uint8_t pending;
        uint8_t smm_inside_nmi;
        uint8_t latched_init;
    } smi;
    struct {
        uint8_t pending;
    } triple_fault;
    uint8_t reserved[26];
    uint8_t exception_has_payload;
    uint64_t exception_payload;
};

struct kvm_debugregs {
    uint64_t db[4];
    uint64_t dr6;
    uint64_t dr7;
    uint64_t flags;
    uint64_t reserved[9];
};

struct kvm_xsave {
    uint32_t region[1024];
    uint32_t extra[];
};

struct kvm_xcr {
    uint32_t xcr;
    uint32_t reserved;
    uint64_t value;
};

struct kvm_xcrs {
    uint32_t nr_xcrs;
    uint32_t flags;
    struct kvm_xcr xcrs[16];
    uint64_t padding[16];
};

struct kvm_msr_filter_range {
    uint32_t flags;
    uint32_t nmsrs;
    uint32_t base;
    uint8_t *bitmap;
};

struct kvm_msr_filter {
    uint32_t flags;
    struct kvm_msr_filter_range ranges[16];
};
"""

# Pages of the vCPU mmap after kvm_run: PIO data, then the coalesced-MMIO ring.
PIO_PAGE_OFFSET = 1
COALESCED_MMIO_PAGE_OFFSET = 2
# Each vCPU's dirty ring (KVM_CAP_DIRTY_LOG_RING) is mapped at this page offset of its fd.
DIRTY_LOG_PAGE_OFFSET = 64

# KVM_CREATE_VM types (the bits of KVM_CHECK_EXTENSION(KVM_CAP_VM_TYPES), api.rst 4.2 and 8.41).
VM_TYPES = {"DEFAULT": 0, "SW_PROTECTED": 1, "SEV": 2, "SEV_ES": 3, "SNP": 4, "TDX": 5}

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

# KVM_GET/SET_LAPIC: the local APIC's register page (KVM_APIC_REG_SIZE bytes).
APIC_REG_SIZE = 0x400

# KVM_GET/SET_SREGS2: kvm_sregs2.flags.
SREGS2_FLAGS_PDPTRS_VALID = 1

# KVM_SET_VCPU_EVENTS: kvm_vcpu_events.flags bits naming the fields that are to be set.
VCPUEVENT_VALID = {
    "NMI_PENDING": 0x00000001, "SIPI_VECTOR": 0x00000002, "SHADOW": 0x00000004,
    "SMM": 0x00000008, "PAYLOAD": 0x00000010, "TRIPLE_FAULT": 0x00000020,
}
# kvm_vcpu_events.interrupt.shadow bits.
X86_SHADOW_INT_MOV_SS = 0x01
X86_SHADOW_INT_STI = 0x02

# KVM_GET/SET_XCRS: the most XCRs struct kvm_xcrs holds.
MAX_XCRS = 16

# KVM_X86_SET_MSR_FILTER.
MSR_FILTER_READ = 1 << 0
MSR_FILTER_WRITE = 1 << 1
MSR_FILTER_MAX_RANGES = 16
MSR_FILTER_MAX_BITMAP_SIZE = 0x600          # bytes per range's bitmap
MSR_FILTER_DEFAULT_ALLOW = 0 << 0
MSR_FILTER_DEFAULT_DENY = 1 << 0

# KVM_ENABLE_CAP(KVM_CAP_X86_USER_SPACE_MSR) args[0]: which failed MSR accesses exit to user
# space (KVM_EXIT_X86_RDMSR / KVM_EXIT_X86_WRMSR); also kvm_run.msr.reason.
MSR_EXIT_REASON_INVAL = 1 << 0
MSR_EXIT_REASON_UNKNOWN = 1 << 1
MSR_EXIT_REASON_FILTER = 1 << 2
