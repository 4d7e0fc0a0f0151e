/*
 * pykvm native helper: a thin ioctl wrapper and the hot vCPU run loop.
 *
 * The struct below is shared with Python (the same text is given to cffi's cdef by
 * csrc/build_native.py), so keep it plain: fixed-width fields, no bitfields.
 */
#ifndef PYKVM_NATIVE_H
#define PYKVM_NATIVE_H

#include <stdint.h>

/* Why pykvm_loop_run() returned. */
#define PYKVM_STOP_EXIT          1  /* an exit Python must see; kvm_run holds it */
#define PYKVM_STOP_DEBUG_EXIT    2  /* the guest wrote to the exit port */
#define PYKVM_STOP_DEADLINE      3  /* the deadline passed */
#define PYKVM_STOP_BUDGET        4  /* the exit budget is used up */
#define PYKVM_STOP_KICK          5  /* pykvm_loop_kick() was called */
#define PYKVM_STOP_CONSOLE_FULL  6  /* console bytes to drain (buffer full, or flush time) */
#define PYKVM_STOP_SIGNAL        7  /* KVM_RUN was interrupted by someone else's signal */
#define PYKVM_STOP_MMIO_LOG_FULL 8  /* the coalesced-MMIO log is full: drain it and call again */
#define PYKVM_STOP_BAD_EXIT      9  /* kvm_run described an I/O outside the shared page */
#define PYKVM_STOP_CALLBACK     10  /* a Python exit handler asked to stop (or raised) */

/* pykvm_py_call() results: resume the guest, stop with this exit, stop (Python says why). */
#define PYKVM_CB_RESUME 0
#define PYKVM_CB_STOP_EXIT 1
#define PYKVM_CB_STOP 2

#define PYKVM_MAX_EXIT_REASON 64
#define PYKVM_MAX_RAM 4
#define PYKVM_MAX_GUARD 4

/* A guest RAM region the loop may read (SBI debug console writes). */
struct pykvm_ram {
    uint64_t gpa;
    uint64_t host;
    uint64_t size;
};

/* A guest-physical range [gpa, gpa + size). */
struct pykvm_range {
    uint64_t gpa;
    uint64_t size;
};

struct pykvm_mmio_record {
    uint64_t phys_addr;
    uint32_t len;
    uint32_t pio;
    uint8_t data[8];
};

struct pykvm_loop {
    /* set up by Python */
    int32_t vcpu_fd;
    uint32_t run_size;               /* bytes mapped at `run` (KVM_GET_VCPU_MMAP_SIZE) */
    uint64_t run;                    /* address of the mmapped struct kvm_run */
    uint64_t ring;                   /* address of the coalesced-MMIO ring page, or 0 */
    uint32_t ring_entries;           /* entries the ring holds */
    uint32_t page_size;

    uint64_t console;                /* address of the console buffer */
    uint32_t console_cap;
    uint32_t console_len;            /* bytes in the buffer; Python drains and resets it */
    int64_t console_flush_ns;        /* return to Python when bytes waited this long (0 = never) */
    int64_t console_since_ns;        /* when the oldest undrained byte arrived */

    uint16_t serial_base;            /* 16550 base port (0x3f8), 0 = none */
    uint16_t debugcon_port;          /* 0xe9, 0 = none */
    uint16_t exit_port;              /* first isa-debug-exit port (0xf4), 0 = none */
    uint16_t sbi_console;            /* serve SBI DBCN write / write_byte in C (RISC-V) */
    uint8_t uart[8];                 /* 16550 register file (the port UART and the MMIO one) */
    uint8_t uart_dll, uart_dlm;
    uint8_t exit_port_size;          /* isa-debug-exit ports: [exit_port, exit_port + size) */
    uint8_t uart_irq;                /* GSI the UART interrupt drives (KVM_IRQ_LINE), 0 = none */
    uint8_t uart_thre;               /* THR-empty interrupt pending (IIR 0x02 while IER.THRI) */
    uint8_t uart_irq_level;          /* the level last driven on uart_irq */
    uint8_t _pad1[2];
    uint64_t uart_mmio_base;         /* ns16550a as MMIO (RISC-V virt: 0x10000000), 0 = none */
    uint32_t uart_mmio_shift;        /* register stride: reg N at base + (N << shift) */
    int32_t uart_irq_fd;             /* VM fd for the UART's KVM_IRQ_LINE (with uart_irq) */

    uint32_t nram;                   /* valid entries in ram[] */
    uint32_t _pad2;
    struct pykvm_ram ram[4];

    uint64_t mmio_log;               /* address of an array of struct pykvm_mmio_record */
    uint32_t mmio_log_cap;
    uint32_t mmio_log_len;

    int64_t budget;                  /* exits left, counted down here across calls; < 0 = no cap.
                                        Python sets it once per RunLoop.run(). */
    int64_t deadline_ns;             /* CLOCK_MONOTONIC, absolute; 0 = none */

    /* results */
    uint32_t exit_value;             /* value written to the exit port */
    int32_t last_errno;              /* errno of a failed KVM_RUN */
    uint64_t exits_total;
    uint64_t counts[64];             /* exits by kvm_run.exit_reason (>= 63 are summed in 63) */
    uint64_t handled_in_c;           /* exits served without returning to Python */

    /* kick machinery */
    volatile int32_t kick;
    volatile int32_t tid;            /* kernel thread id while running, 0 otherwise */

    /* Exits the loop does not serve itself, by reason (bit N: exit reason N < 64): those in
     * resume_mask are counted and resumed in C (e.g. HLT without an in-kernel irqchip); those
     * in callback_mask go to their Python handler through pykvm_py_call() without leaving the
     * loop (no teardown, no new KVM_RUN setup); any other returns PYKVM_STOP_EXIT. */
    uint64_t resume_mask;
    uint64_t callback_mask;
    uint32_t _pad4;
    int32_t uart_lock;               /* guards this loop's UART state when others share it */
    uint64_t handled_in_py;          /* exits a Python handler resumed from inside the loop */
    uint64_t py_ctx;                 /* set by run_handlers() (csrc/pyexit.c) for its call: the
                                        handlers the loop may call; 0 = none (exits in
                                        callback_mask are returned as PYKVM_STOP_EXIT) */
    uint64_t uart_owner;             /* address of the struct whose UART state (uart[],
                                        uart_dll, uart_dlm, uart_thre, uart_irq*, uart_out*,
                                        the receiver) this loop uses: a UartGroup's, one UART
                                        for all vCPUs of a machine; 0 = its own */
    uint64_t uart_out;               /* the owner's: a UART output buffer all its loops write
                                        in order (drained by pykvm_uart_take); 0 = THR bytes go
                                        to this struct's console buffer */
    uint32_t uart_out_cap;
    uint32_t uart_out_len;
    int64_t uart_out_since_ns;       /* when its oldest byte arrived */
    uint64_t uart_out_dropped;       /* bytes that found it full */
    /* the 16550's receiver (fed by loopback, MCR bit 4, and by host input through uart_in):
     * the owner's, like uart[] */
    uint8_t uart_rbr;                /* receiver buffer register (FIFOs off) */
    uint8_t uart_lsr;                /* LSR bits DR (0) and OE (1); THRE and TEMT read set */
    uint8_t uart_fcr;                /* FCR as kept: FIFO enable (0), DMA mode (3), trigger (7:6) */
    uint8_t uart_rx_head;            /* receive FIFO: index of its oldest byte */
    uint8_t uart_rx_count;           /* receive FIFO: bytes held (0-16) */
    uint8_t _pad3[3];
    uint8_t uart_rx[16];             /* receive FIFO */
    /* host input (pykvm_uart_input): the owner's ring of bytes that wait for room in the
     * receiver; they move in as the guest reads RBR (none while in loopback) */
    uint64_t uart_in;                /* address of the ring, 0 = the UART takes no host input */
    uint32_t uart_in_cap;            /* the ring's size in bytes */
    uint32_t uart_in_head;           /* index of its oldest byte */
    uint32_t uart_in_len;            /* bytes it holds */
    uint32_t _pad6;
    uint64_t uart_in_delivered;      /* bytes moved from the ring into the receiver */

    /* Exits never given to a handler (callback_mask), returned instead (PYKVM_STOP_EXIT) so that
     * the caller sees them first: I/O on report_port (pykvm's x86 guest-report port; 0 = none),
     * SBI calls of extension report_sbi_eid (RISC-V; 0 = none), MMIO inside a guarded RAM range
     * (KVM exits for guest RAM only when the host could not back the page). */
    uint16_t report_port;
    uint16_t nguard;                 /* valid entries in guard[] */
    uint32_t report_sbi_eid;
    struct pykvm_range guard[4];      /* PYKVM_MAX_GUARD */

    /* virtio-mmio windows whose InterruptStatus (base + 0x060, 32-bit reads) and InterruptACK
     * (base + 0x064, 32-bit writes) this loop serves itself (csrc/virtio_irq.c): addresses of
     * the transports' pykvm_vmmio_irq handles; other accesses to those windows go to Python */
    uint32_t nvmmio;                 /* valid entries in vmmio[] */
    uint32_t _pad7;
    uint64_t vmmio[16];              /* PYKVM_MAX_VMMIO */
};

long pykvm_ioctl(int fd, unsigned long request, uint64_t arg);
int pykvm_loop_run(struct pykvm_loop *l);
int pykvm_loop_kick(struct pykvm_loop *l);
int64_t pykvm_monotonic_ns(void);
int pykvm_retire_mapping(uint64_t addr, uint64_t size);
int64_t pykvm_map_shared(int fd, uint64_t size);
int pykvm_unmap(uint64_t addr, uint64_t size);
int pykvm_kick_signal(void);
uint32_t pykvm_uart_take(struct pykvm_loop *l, uint8_t *dst, uint32_t cap);
uint8_t pykvm_uart_access(struct pykvm_loop *l, unsigned reg, int is_write, uint8_t value);
uint32_t pykvm_uart_input(struct pykvm_loop *l, const uint8_t *buf, uint32_t n);

/* csrc/virtio_irq.c: a virtio-mmio transport's InterruptStatus and its level-triggered line
 * (KVM_IRQ_LINE), one handle per transport, shared by the C run loops (which serve
 * InterruptStatus reads and InterruptACK writes without leaving C), a device's C worker (which
 * raises used-buffer interrupts itself) and Python (every other cause, and reset). The line is
 * high exactly while InterruptStatus is not 0 (virtio 1.2 section 4.2.3.4). */
#define PYKVM_MAX_VMMIO 16
#define PYKVM_VMMIO_INTERRUPT_STATUS 0x60
#define PYKVM_VMMIO_INTERRUPT_ACK 0x64
struct pykvm_vmmio_counts {
    uint32_t status;                 /* InterruptStatus now */
    uint32_t level;                  /* the line's level now */
    uint64_t raised;                 /* times the line went high */
    uint64_t served;                 /* register accesses the C run loops served */
    int32_t last_errno;              /* errno of the last KVM_IRQ_LINE the VM refused, 0 = none */
    uint32_t _pad;
};
void *pykvm_vmmio_new(uint64_t base, int32_t vm_fd, uint32_t gsi);
int pykvm_vmmio_signal(void *h, uint32_t bits);
int pykvm_vmmio_ack(void *h, uint32_t bits);
void pykvm_vmmio_get(void *h, struct pykvm_vmmio_counts *out);
void pykvm_vmmio_free(void *h);

/* csrc/virtio_blk.c: virtio-blk's request queue served by a worker thread, off the GIL (see
 * there and pykvm/devices/virtio/fastpath.py). */
#define PYKVM_BLK_MAX_SLOTS 16
#define PYKVM_BLK_EV_IRQ 1               /* an interrupt Python must send itself */
#define PYKVM_BLK_EV_BROKEN 2            /* the ring broke a rule: DEVICE_NEEDS_RESET */
#define PYKVM_BLK_EV_QUIT 4              /* the worker was stopped: free the handle */

struct pykvm_blk_slot {
    uint64_t gpa;
    uint64_t size;
    uint64_t hva;
};

struct pykvm_blk_cfg {
    int32_t vm_fd;
    int32_t image_fd;
    uint32_t readonly;
    uint32_t block_size;             /* bytes, a power of 2 from 512 */
    uint64_t capacity;               /* 512-byte sectors */
    uint64_t features;               /* negotiated */
    uint64_t notify_gpa;             /* where the driver's notification write lands */
    uint32_t qsize;
    uint32_t event_idx;
    uint32_t indirect;
    uint32_t may_unmap;
    uint64_t desc;
    uint64_t avail;
    uint64_t used;
    uint16_t last_avail;             /* the queue's state when the worker takes it over */
    uint16_t used_idx;
    uint16_t signalled;
    uint16_t notify_on;
    uint8_t serial[20];              /* GET_ID, NUL-padded */
    uint32_t nslots;
    struct pykvm_blk_slot slots[16]; /* PYKVM_BLK_MAX_SLOTS: guest RAM */
    uint64_t vmmio_irq;              /* a virtio-mmio transport's pykvm_vmmio_irq handle: the
                                        worker raises its interrupts through it; 0 = MSI or
                                        Python (pykvm_blk_set_msi) */
};

struct pykvm_blk_state {
    uint16_t last_avail;
    uint16_t used_idx;
    uint16_t signalled;
    uint16_t notify_on;
    uint32_t broken;
    uint32_t _pad;
    uint64_t requests;
    uint64_t direct_msis;
    uint64_t python_irqs;
    uint64_t direct_lines;           /* interrupts raised through cfg.vmmio_irq */
    char why[160];
};

void *pykvm_blk_start(const struct pykvm_blk_cfg *cfg, char *err, uint32_t errlen);
void pykvm_blk_set_msi(void *h, uint64_t address, uint32_t data, int direct);
void pykvm_blk_kick(void *h);
void pykvm_blk_stop(void *h, struct pykvm_blk_state *out);
uint32_t pykvm_blk_wait_events(void *h);
void pykvm_blk_free(void *h);

/* csrc/rewind.c: dirty-page copy-back for Machine.reset() (pykvm/rewind.py). One RAM slot's
 * sparse baseline: nonzero (a bitmap, one bit per page that held a non-zero byte), rank (per
 * bitmap word, the set bits of the words before it), store (those pages one after the other,
 * store_pages of them); dirty: a bitmap KVM_GET_DIRTY_LOG fills (words of 64 pages). Addresses are host virtual. */
struct pykvm_rewind_slot {
    uint64_t host;                   /* the slot's live mapping */
    uint64_t size;                   /* bytes, a multiple of page_size */
    uint64_t nonzero;
    uint64_t rank;
    uint64_t store;
    uint64_t store_pages;
    uint64_t dirty;
    uint64_t extra;                  /* a bitmap of pages the host wrote, 0 = none: restored
                                        with the dirty pages, then cleared (and this set to 0) */
    uint32_t slot;                   /* KVM's slot number */
    uint32_t page_size;
};
/* One ioctl of the state put back after the pages: ioctl(fd, request, arg), which must
 * return `expect` (>= 0), or any non-negative value (expect < 0). With flags
 * PYKVM_REWIND_COMPLETE (fd: a vCPU, arg: its kvm_run's address, request: KVM_RUN): when
 * the vCPU's last exit is one KVM completes on the next KVM_RUN (I/O, MMIO, ...), one KVM_RUN
 * with immediate_exit set completes it (EINTR is its success); otherwise nothing is issued.
 * Such entries come before the pages and the others, whatever their place in the list. */
#define PYKVM_REWIND_COMPLETE 1
struct pykvm_rewind_ioctl {
    int32_t fd;
    uint32_t flags;
    uint64_t request;
    uint64_t arg;
    int64_t expect;
};
/* One vCPU's dirty ring (KVM_CAP_DIRTY_LOG_RING): the address of its struct kvm_dirty_gfn
 * array, its entries (a power of two) and the free-running index of the next entry to harvest
 * (advanced by the calls below). */
struct pykvm_rewind_ring {
    uint64_t gfns;
    uint32_t entries;
    uint32_t _pad;
    uint64_t next;
};
int64_t pykvm_rewind_scan(struct pykvm_rewind_slot *s, int pagemap_fd, int memfd);
int64_t pykvm_rewind_capture(struct pykvm_rewind_slot *s);
int64_t pykvm_rewind_restore(const struct pykvm_rewind_slot *s, const uint64_t *dirty);
int64_t pykvm_rewind_reset(int vm_fd, struct pykvm_rewind_slot *slots, uint32_t nslots,
                           int manual, struct pykvm_rewind_ring *rings, uint32_t nrings,
                           const struct pykvm_rewind_ioctl *put, uint32_t nput,
                           int32_t *out_failed);
int64_t pykvm_rewind_ring_drop(int vm_fd, struct pykvm_rewind_ring *rings, uint32_t nrings);

/* csrc/pyexit.c: adds run_handlers() to the pykvm._native module (once, at import; 0 or -1). */
int pykvm_pyapi_install(void);
/* csrc/pyexit.c, for the loop only (not given to cffi): runs the Python exit handler of `reason`
 * with the GIL taken back (info, a, b: the exit's fields, see py_exit() in runloop.c); returns a
 * PYKVM_CB_* value. */
int pykvm_py_call(struct pykvm_loop *l, uint32_t reason, uint32_t info, uint64_t a, uint64_t b);

#endif
