"""Arch-independent KVM ABI facts: struct declarations (cffi cdef text) and constants.

Everything here is written from the KVM userspace API description (Documentation/virt/kvm/api.rst
and the uAPI's documented layouts). Struct text is kept as C declarations so that cffi computes the
layout; ``tests/unit/test_abi_proof.py`` compares every offset, size, constant and ioctl number with
the kernel headers installed on the machine.
"""

# Layouts shared by every architecture. Arch modules add kvm_regs & co. and the union members of
# kvm_run that use ``unsigned long`` (the RISC-V exits) are fixed-width on every 64-bit arch we run.
CDEF = r"""
struct kvm_userspace_memory_region {
    uint32_t slot;
    uint32_t flags;
    uint64_t guest_phys_addr;
    uint64_t memory_size;
    uint64_t userspace_addr;
};

struct kvm_userspace_memory_region2 {
    uint32_t slot;
    uint32_t flags;
    uint64_t guest_phys_addr;
    uint64_t memory_size;
    uint64_t userspace_addr;
    uint64_t guest_memfd_offset;
    uint32_t guest_memfd;
    uint32_t pad1;
    uint64_t pad2[14];
};

/* KVM_CREATE_GUEST_MEMFD (api.rst 4.142): size in bytes, flags, reserved zero. */
struct kvm_create_guest_memfd {
    uint64_t size;
    uint64_t flags;
    uint64_t reserved[6];
};

/* KVM_SET_MEMORY_ATTRIBUTES (api.rst 4.141): a page-aligned
 * guest-physical range and the attributes (KVM_MEMORY_ATTRIBUTE_*) it takes. */
struct kvm_memory_attributes {
    uint64_t address;
    uint64_t size;
    uint64_t attributes;
    uint64_t flags;
};

/* One entry of a vCPU's dirty ring (KVM_CAP_DIRTY_LOG_RING, api.rst 8.29): flags KVM_DIRTY_GFN_F_*, slot
 * (address space << 16 | slot id), offset (the page's index within the slot). */
struct kvm_dirty_gfn {
    uint32_t flags;
    uint32_t slot;
    uint64_t offset;
};

struct kvm_irq_level {
    union {
        uint32_t irq;
        int32_t status;
    };
    uint32_t level;
};

struct kvm_dirty_log {
    uint32_t slot;
    uint32_t padding1;
    union {
        void *dirty_bitmap;
        uint64_t padding2;
    };
};

struct kvm_clear_dirty_log {
    uint32_t slot;
    uint32_t num_pages;
    uint64_t first_page;
    union {
        void *dirty_bitmap;
        uint64_t padding2;
    };
};

struct kvm_pit_config {
    uint32_t flags;
    uint32_t pad[15];
};

struct kvm_irq_routing_irqchip {
    uint32_t irqchip;
    uint32_t pin;
};

struct kvm_irq_routing_msi {
    uint32_t address_lo;
    uint32_t address_hi;
    uint32_t data;
    union {
        uint32_t pad;
        uint32_t devid;
    };
};

struct kvm_irq_routing_entry {
    uint32_t gsi;
    uint32_t type;
    uint32_t flags;
    uint32_t pad;
    union {
        struct kvm_irq_routing_irqchip irqchip;
        struct kvm_irq_routing_msi msi;
        uint32_t pad[8];
    } u;
};

struct kvm_irq_routing {
    uint32_t nr;
    uint32_t flags;
    struct kvm_irq_routing_entry entries[];
};

struct kvm_ioeventfd {
    uint64_t datamatch;
    uint64_t addr;
    uint32_t len;
    int32_t fd;
    uint32_t flags;
    uint8_t pad[36];
};

struct kvm_irqfd {
    uint32_t fd;
    uint32_t gsi;
    uint32_t flags;
    uint32_t resamplefd;
    uint8_t pad[16];
};

struct kvm_msi {
    uint32_t address_lo;
    uint32_t address_hi;
    uint32_t data;
    uint32_t flags;
    uint32_t devid;
    uint8_t pad[12];
};

struct kvm_coalesced_mmio_zone {
    uint64_t addr;
    uint32_t size;
    union {
        uint32_t pad;
        uint32_t pio;
    };
};

struct kvm_coalesced_mmio {
    uint64_t phys_addr;
    uint32_t len;
    union {
        uint32_t pad;
        uint32_t pio;
    };
    uint8_t data[8];
};

struct kvm_coalesced_mmio_ring {
    uint32_t first;
    uint32_t last;
    struct kvm_coalesced_mmio coalesced_mmio[];
};

struct kvm_mp_state {
    uint32_t mp_state;
};

struct kvm_one_reg {
    uint64_t id;
    uint64_t addr;
};

struct kvm_reg_list {
    uint64_t n;
    uint64_t reg[];
};

struct kvm_enable_cap {
    uint32_t cap;
    uint32_t flags;
    uint64_t args[4];
    uint8_t pad[64];
};

struct kvm_signal_mask {
    uint32_t len;
    uint8_t sigset[];
};

struct kvm_interrupt {
    uint32_t irq;
};

struct kvm_translation {
    uint64_t linear_address;
    uint64_t physical_address;
    uint8_t valid;
    uint8_t writeable;
    uint8_t usermode;
    uint8_t pad[5];
};

struct kvm_stats_header {
    uint32_t flags;
    uint32_t name_size;
    uint32_t num_desc;
    uint32_t id_offset;
    uint32_t desc_offset;
    uint32_t data_offset;
};

struct kvm_stats_desc {
    uint32_t flags;
    int16_t exponent;
    uint16_t size;
    uint32_t offset;
    uint32_t bucket_size;
    char name[];
};

struct kvm_device_attr {
    uint32_t flags;
    uint32_t group;
    uint64_t attr;
    uint64_t addr;
};

struct kvm_create_device {
    uint32_t type;
    uint32_t fd;
    uint32_t flags;
};

struct kvm_clock_data {
    uint64_t clock;
    uint32_t flags;
    uint32_t pad0;
    uint64_t realtime;
    uint64_t host_tsc;
    uint32_t pad[4];
};
"""

# The kvm_run exit union. The arch module supplies `struct kvm_debug_exit_arch` and
# `struct kvm_sync_regs`-sized padding is common (2048 bytes). The members whose struct holds an
# anonymous union have a struct name of ours (kvm_run_*; the kernel's are unnamed): compiled
# into pykvm._native, cffi can take such a layout from the C compiler only through a name.
KVM_RUN_CDEF = r"""
struct kvm_run {
    uint8_t request_interrupt_window;
    uint8_t immediate_exit;
    uint8_t padding1[6];
    uint32_t exit_reason;
    uint8_t ready_for_interrupt_injection;
    uint8_t if_flag;
    uint16_t flags;
    uint64_t cr8;
    uint64_t apic_base;
    union {
        struct { uint64_t hardware_exit_reason; } hw;
        struct { uint64_t hardware_entry_failure_reason; uint32_t cpu; } fail_entry;
        struct { uint32_t exception; uint32_t error_code; } ex;
        struct {
            uint8_t direction;
            uint8_t size;
            uint16_t port;
            uint32_t count;
            uint64_t data_offset;
        } io;
        struct { struct kvm_debug_exit_arch arch; } debug;
        struct {
            uint64_t phys_addr;
            uint8_t data[8];
            uint32_t len;
            uint8_t is_write;
        } mmio;
        struct kvm_run_hypercall {
            uint64_t nr;
            uint64_t args[6];
            uint64_t ret;
            union {
                uint32_t longmode;
                uint64_t flags;
            };
        } hypercall;
        struct { uint64_t rip; uint32_t is_write; uint32_t pad; } tpr_access;
        struct { uint32_t suberror; uint32_t ndata; uint64_t data[16]; } internal;
        struct {
            uint32_t suberror;
            uint32_t ndata;
            uint64_t flags;
            uint8_t insn_size;
            uint8_t insn_bytes[15];
        } emulation_failure;
        struct kvm_run_system_event {
            uint32_t type;
            uint32_t ndata;
            union {
                uint64_t flags;
                uint64_t data[16];
            };
        } system_event;
        struct { uint8_t vector; } eoi;
        struct {
            uint8_t error;
            uint8_t pad[7];
            uint32_t reason;
            uint32_t index;
            uint64_t data;
        } msr;
        struct {
            unsigned long extension_id;
            unsigned long function_id;
            unsigned long args[6];
            unsigned long ret[2];
        } riscv_sbi;
        struct {
            unsigned long csr_num;
            unsigned long new_value;
            unsigned long write_mask;
            unsigned long ret_value;
        } riscv_csr;
        struct { uint32_t flags; } notify;
        struct { uint64_t flags; uint64_t gpa; uint64_t size; } memory_fault;
        char padding[256];
    };
    uint64_t kvm_valid_regs;
    uint64_t kvm_dirty_regs;
    union {
        char padding[2048];
    } s;
};
"""

KVMIO = 0xAE

# Exit reasons (kvm_run.exit_reason), in ABI order.
EXIT_REASONS = {
    "UNKNOWN": 0, "EXCEPTION": 1, "IO": 2, "HYPERCALL": 3, "DEBUG": 4, "HLT": 5, "MMIO": 6,
    "IRQ_WINDOW_OPEN": 7, "SHUTDOWN": 8, "FAIL_ENTRY": 9, "INTR": 10, "SET_TPR": 11,
    "TPR_ACCESS": 12, "S390_SIEIC": 13, "S390_RESET": 14, "DCR": 15, "NMI": 16,
    "INTERNAL_ERROR": 17, "OSI": 18, "PAPR_HCALL": 19, "S390_UCONTROL": 20, "WATCHDOG": 21,
    "S390_TSCH": 22, "EPR": 23, "SYSTEM_EVENT": 24, "S390_STSI": 25, "IOAPIC_EOI": 26,
    "HYPERV": 27, "ARM_NISV": 28, "X86_RDMSR": 29, "X86_WRMSR": 30, "DIRTY_RING_FULL": 31,
    "AP_RESET_HOLD": 32, "X86_BUS_LOCK": 33, "XEN": 34, "RISCV_SBI": 35, "RISCV_CSR": 36,
    "NOTIFY": 37, "LOONGARCH_IOCSR": 38, "MEMORY_FAULT": 39, "TDX": 40, "ARM_SEA": 41,
}
EXIT_NAMES = {v: k for k, v in EXIT_REASONS.items()}

KVM_EXIT_IO_IN = 0
KVM_EXIT_IO_OUT = 1

# KVM_EXIT_INTERNAL_ERROR sub-errors.
INTERNAL_ERROR_SUBERRORS = {
    "EMULATION": 1, "SIMUL_EX": 2, "DELIVERY_EV": 3, "UNEXPECTED_EXIT_REASON": 4,
}

# KVM_EXIT_SYSTEM_EVENT types.
SYSTEM_EVENTS = {
    "SHUTDOWN": 1, "RESET": 2, "CRASH": 3, "WAKEUP": 4, "SUSPEND": 5, "SEV_TERM": 6,
    "TDX_FATAL": 7,
}

# kvm_run.flags bits (x86 defines both; other arches leave them 0).
RUN_FLAGS = {"X86_SMM": 1 << 0, "X86_BUS_LOCK": 1 << 1, "X86_GUEST_MODE": 1 << 2}

# Memory slot flags.
MEM_LOG_DIRTY_PAGES = 1 << 0
MEM_READONLY = 1 << 1
MEM_GUEST_MEMFD = 1 << 2

# struct kvm_dirty_gfn.flags: KVM sets DIRTY when it logs the page; user space sets RESET once it
# has harvested the entry (then KVM_RESET_DIRTY_RINGS re-protects the page and frees the entry).
DIRTY_GFN_F_DIRTY = 1 << 0
DIRTY_GFN_F_RESET = 1 << 1
DIRTY_GFN_F_MASK = 0x3

# KVM_SET_MEMORY_ATTRIBUTES attributes: the range is private (backed by the slot's guest_memfd).
MEMORY_ATTRIBUTE_PRIVATE = 1 << 3

# KVM_ENABLE_CAP(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2) args[0] bits: KVM_GET_DIRTY_LOG no longer
# clears (and write-protects) what it reports, KVM_CLEAR_DIRTY_LOG does; new slots start with
# every page dirty.
DIRTY_LOG_MANUAL_PROTECT_ENABLE = 1 << 0
DIRTY_LOG_INITIALLY_SET = 1 << 1

# ioeventfd / irqfd flags.
IOEVENTFD_FLAG_DATAMATCH = 1 << 0
IOEVENTFD_FLAG_PIO = 1 << 1
IOEVENTFD_FLAG_DEASSIGN = 1 << 2
IRQFD_FLAG_DEASSIGN = 1 << 0
IRQFD_FLAG_RESAMPLE = 1 << 1

PIT_SPEAKER_DUMMY = 1

# struct kvm_clock_data flags (KVM_GET_CLOCK / KVM_SET_CLOCK, api.rst 4.55/4.56): the clock is
# the same on every vCPU (TSC_STABLE); ``realtime`` is valid / to be honoured (REALTIME);
# ``host_tsc`` is valid (HOST_TSC).
CLOCK_TSC_STABLE = 1 << 1
CLOCK_REALTIME = 1 << 2
CLOCK_HOST_TSC = 1 << 3

# GSI routing entry types (KVM_SET_GSI_ROUTING) and in-kernel irqchip numbers.
IRQ_ROUTING_IRQCHIP = 1
IRQ_ROUTING_MSI = 2
IRQCHIP_PIC_MASTER = 0
IRQCHIP_PIC_SLAVE = 1
IRQCHIP_IOAPIC = 2

# MP states.
MP_STATES = {
    "RUNNABLE": 0, "UNINITIALIZED": 1, "INIT_RECEIVED": 2, "HALTED": 3, "SIPI_RECEIVED": 4,
    "STOPPED": 5, "CHECK_STOP": 6, "OPERATING": 7, "LOAD": 8, "AP_RESET_HOLD": 9,
    "SUSPENDED": 10,
}

# Guest debug control bits (arch-independent part).
GUESTDBG_ENABLE = 0x00000001
GUESTDBG_SINGLESTEP = 0x00000002


# Binary stats descriptor flags.
STATS_TYPE_SHIFT = 0
STATS_TYPE_MASK = 0xF << STATS_TYPE_SHIFT
STATS_TYPES = {"CUMULATIVE": 0, "INSTANT": 1, "PEAK": 2, "LINEAR_HIST": 3, "LOG_HIST": 4}
STATS_UNIT_SHIFT = 4
STATS_UNIT_MASK = 0xF << STATS_UNIT_SHIFT
STATS_UNITS = {"NONE": 0 << 4, "BYTES": 1 << 4, "SECONDS": 2 << 4, "CYCLES": 3 << 4, "BOOLEAN": 4 << 4}
STATS_BASE_SHIFT = 8
STATS_BASE_MASK = 0xF << STATS_BASE_SHIFT

# ONE_REG id encoding.
REG_ARCH_MASK = 0xFF00000000000000
REG_GENERIC = 0x0000000000000000
REG_PPC = 0x1000000000000000
REG_X86 = 0x2000000000000000
REG_IA64 = 0x3000000000000000
REG_ARM = 0x4000000000000000
REG_S390 = 0x5000000000000000
REG_ARM64 = 0x6000000000000000
REG_MIPS = 0x7000000000000000
REG_RISCV = 0x8000000000000000
REG_LOONGARCH = 0x9000000000000000
REG_SIZE_SHIFT = 52
REG_SIZE_MASK = 0x00F0000000000000
REG_SIZES = {
    "U8": 0x0000000000000000, "U16": 0x0010000000000000, "U32": 0x0020000000000000,
    "U64": 0x0030000000000000, "U128": 0x0040000000000000, "U256": 0x0050000000000000,
    "U512": 0x0060000000000000, "U1024": 0x0070000000000000, "U2048": 0x0080000000000000,
}


def reg_size_bytes(reg_id: int) -> int:
    """Size in bytes of the value behind a ONE_REG id (1 << size field)."""
    return 1 << ((reg_id & REG_SIZE_MASK) >> REG_SIZE_SHIFT)


# Capabilities (KVM_CHECK_EXTENSION arguments), by name without the KVM_CAP_ prefix.
CAPS = {
    "IRQCHIP": 0, "HLT": 1, "MMU_SHADOW_CACHE_CONTROL": 2, "USER_MEMORY": 3, "SET_TSS_ADDR": 4,
    "VAPIC": 6, "EXT_CPUID": 7, "CLOCKSOURCE": 8, "NR_VCPUS": 9, "NR_MEMSLOTS": 10, "PIT": 11,
    "NOP_IO_DELAY": 12, "PV_MMU": 13, "MP_STATE": 14, "COALESCED_MMIO": 15, "SYNC_MMU": 16,
    "IOMMU": 18, "DESTROY_MEMORY_REGION_WORKS": 21, "USER_NMI": 22, "SET_GUEST_DEBUG": 23,
    "REINJECT_CONTROL": 24, "IRQ_ROUTING": 25, "IRQ_INJECT_STATUS": 26, "ASSIGN_DEV_IRQ": 29,
    "JOIN_MEMORY_REGIONS_WORKS": 30, "MCE": 31, "IRQFD": 32, "PIT2": 33, "SET_BOOT_CPU_ID": 34,
    "PIT_STATE2": 35, "IOEVENTFD": 36, "SET_IDENTITY_MAP_ADDR": 37, "XEN_HVM": 38,
    "ADJUST_CLOCK": 39, "INTERNAL_ERROR_DATA": 40, "VCPU_EVENTS": 41, "S390_PSW": 42,
    "PPC_SEGSTATE": 43, "HYPERV": 44, "HYPERV_VAPIC": 45, "HYPERV_SPIN": 46, "PCI_SEGMENT": 47,
    "PPC_PAIRED_SINGLES": 48, "INTR_SHADOW": 49, "DEBUGREGS": 50, "X86_ROBUST_SINGLESTEP": 51,
    "PPC_OSI": 52, "PPC_UNSET_IRQ": 53, "ENABLE_CAP": 54, "XSAVE": 55, "XCRS": 56,
    "PPC_GET_PVINFO": 57, "PPC_IRQ_LEVEL": 58, "ASYNC_PF": 59, "TSC_CONTROL": 60,
    "GET_TSC_KHZ": 61, "PPC_BOOKE_SREGS": 62, "SPAPR_TCE": 63, "PPC_SMT": 64, "PPC_RMA": 65,
    "MAX_VCPUS": 66, "PPC_HIOR": 67, "PPC_PAPR": 68, "SW_TLB": 69, "ONE_REG": 70,
    "S390_GMAP": 71, "TSC_DEADLINE_TIMER": 72, "S390_UCONTROL": 73, "SYNC_REGS": 74,
    "PCI_2_3": 75, "KVMCLOCK_CTRL": 76, "SIGNAL_MSI": 77, "PPC_GET_SMMU_INFO": 78,
    "S390_COW": 79, "PPC_ALLOC_HTAB": 80, "READONLY_MEM": 81, "IRQFD_RESAMPLE": 82,
    "PPC_BOOKE_WATCHDOG": 83, "PPC_HTAB_FD": 84, "S390_CSS_SUPPORT": 85, "PPC_EPR": 86,
    "ARM_PSCI": 87, "ARM_SET_DEVICE_ADDR": 88, "DEVICE_CTRL": 89, "IRQ_MPIC": 90,
    "PPC_RTAS": 91, "IRQ_XICS": 92, "ARM_EL1_32BIT": 93, "SPAPR_MULTITCE": 94,
    "EXT_EMUL_CPUID": 95, "HYPERV_TIME": 96, "IOAPIC_POLARITY_IGNORED": 97,
    "ENABLE_CAP_VM": 98, "S390_IRQCHIP": 99, "IOEVENTFD_NO_LENGTH": 100, "VM_ATTRIBUTES": 101,
    "ARM_PSCI_0_2": 102, "PPC_FIXUP_HCALL": 103, "PPC_ENABLE_HCALL": 104,
    "CHECK_EXTENSION_VM": 105, "S390_USER_SIGP": 106, "S390_VECTOR_REGISTERS": 107,
    "S390_MEM_OP": 108, "S390_USER_STSI": 109, "S390_SKEYS": 110, "MIPS_FPU": 111,
    "MIPS_MSA": 112, "S390_INJECT_IRQ": 113, "S390_IRQ_STATE": 114, "PPC_HWRNG": 115,
    "DISABLE_QUIRKS": 116, "X86_SMM": 117, "MULTI_ADDRESS_SPACE": 118,
    "GUEST_DEBUG_HW_BPS": 119, "GUEST_DEBUG_HW_WPS": 120, "SPLIT_IRQCHIP": 121,
    "IOEVENTFD_ANY_LENGTH": 122, "HYPERV_SYNIC": 123, "S390_RI": 124, "SPAPR_TCE_64": 125,
    "ARM_PMU_V3": 126, "VCPU_ATTRIBUTES": 127, "MAX_VCPU_ID": 128, "X2APIC_API": 129,
    "S390_USER_INSTR0": 130, "MSI_DEVID": 131, "PPC_HTM": 132, "SPAPR_RESIZE_HPT": 133,
    "PPC_MMU_RADIX": 134, "PPC_MMU_HASH_V3": 135, "IMMEDIATE_EXIT": 136, "MIPS_VZ": 137,
    "MIPS_TE": 138, "MIPS_64BIT": 139, "S390_GS": 140, "S390_AIS": 141, "SPAPR_TCE_VFIO": 142,
    "X86_DISABLE_EXITS": 143, "ARM_USER_IRQ": 144, "S390_CMMA_MIGRATION": 145,
    "PPC_FWNMI": 146, "PPC_SMT_POSSIBLE": 147, "HYPERV_SYNIC2": 148, "HYPERV_VP_INDEX": 149,
    "S390_AIS_MIGRATION": 150, "PPC_GET_CPU_CHAR": 151, "S390_BPB": 152,
    "GET_MSR_FEATURES": 153, "HYPERV_EVENTFD": 154, "HYPERV_TLBFLUSH": 155,
    "S390_HPAGE_1M": 156, "NESTED_STATE": 157, "ARM_INJECT_SERROR_ESR": 158,
    "MSR_PLATFORM_INFO": 159, "PPC_NESTED_HV": 160, "HYPERV_SEND_IPI": 161,
    "COALESCED_PIO": 162, "HYPERV_ENLIGHTENED_VMCS": 163, "EXCEPTION_PAYLOAD": 164,
    "ARM_VM_IPA_SIZE": 165, "MANUAL_DIRTY_LOG_PROTECT": 166, "HYPERV_CPUID": 167,
    "MANUAL_DIRTY_LOG_PROTECT2": 168, "PPC_IRQ_XIVE": 169, "ARM_SVE": 170,
    "ARM_PTRAUTH_ADDRESS": 171, "ARM_PTRAUTH_GENERIC": 172, "PMU_EVENT_FILTER": 173,
    "ARM_IRQ_LINE_LAYOUT_2": 174, "HYPERV_DIRECT_TLBFLUSH": 175, "PPC_GUEST_DEBUG_SSTEP": 176,
    "ARM_NISV_TO_USER": 177, "ARM_INJECT_EXT_DABT": 178, "S390_VCPU_RESETS": 179,
    "S390_PROTECTED": 180, "PPC_SECURE_GUEST": 181, "HALT_POLL": 182, "ASYNC_PF_INT": 183,
    "LAST_CPU": 184, "SMALLER_MAXPHYADDR": 185, "S390_DIAG318": 186, "STEAL_TIME": 187,
    "X86_USER_SPACE_MSR": 188, "X86_MSR_FILTER": 189, "ENFORCE_PV_FEATURE_CPUID": 190,
    "SYS_HYPERV_CPUID": 191, "DIRTY_LOG_RING": 192, "X86_BUS_LOCK_EXIT": 193, "PPC_DAWR1": 194,
    "SET_GUEST_DEBUG2": 195, "SGX_ATTRIBUTE": 196, "VM_COPY_ENC_CONTEXT_FROM": 197,
    "PTP_KVM": 198, "HYPERV_ENFORCE_CPUID": 199, "SREGS2": 200, "EXIT_HYPERCALL": 201,
    "PPC_RPT_INVALIDATE": 202, "BINARY_STATS_FD": 203, "EXIT_ON_EMULATION_FAILURE": 204,
    "ARM_MTE": 205, "VM_MOVE_ENC_CONTEXT_FROM": 206, "VM_GPA_BITS": 207, "XSAVE2": 208,
    "SYS_ATTRIBUTES": 209, "PPC_AIL_MODE_3": 210, "S390_MEM_OP_EXTENSION": 211,
    "PMU_CAPABILITY": 212, "DISABLE_QUIRKS2": 213, "VM_TSC_CONTROL": 214,
    "SYSTEM_EVENT_DATA": 215, "ARM_SYSTEM_SUSPEND": 216, "S390_PROTECTED_DUMP": 217,
    "X86_TRIPLE_FAULT_EVENT": 218, "X86_NOTIFY_VMEXIT": 219, "VM_DISABLE_NX_HUGE_PAGES": 220,
    "S390_ZPCI_OP": 221, "S390_CPU_TOPOLOGY": 222, "DIRTY_LOG_RING_ACQ_REL": 223,
    "S390_PROTECTED_ASYNC_DISABLE": 224, "DIRTY_LOG_RING_WITH_BITMAP": 225,
    "PMU_EVENT_MASKED_EVENTS": 226, "COUNTER_OFFSET": 227, "ARM_EAGER_SPLIT_CHUNK_SIZE": 228,
    "ARM_SUPPORTED_BLOCK_SIZES": 229, "ARM_SUPPORTED_REG_MASK_RANGES": 230,
    "USER_MEMORY2": 231, "MEMORY_FAULT_INFO": 232, "MEMORY_ATTRIBUTES": 233,
    "GUEST_MEMFD": 234, "VM_TYPES": 235, "PRE_FAULT_MEMORY": 236,
    "X86_APIC_BUS_CYCLES_NS": 237, "X86_GUEST_MODE": 238,
}
CAP_NAMES = {v: k for k, v in CAPS.items()}
