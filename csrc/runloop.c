/*
 * The vCPU run loop. One call runs KVM_RUN until an exit Python must see. The exits it serves
 * itself: console ports (a 16550 at serial_base, the 0xe9 debug port), an ns16550a as MMIO at
 * uart_mmio_base, virtio-mmio InterruptStatus/InterruptACK (virtio_irq.c), the SBI debug console, the exit port, coalesced MMIO drains; it counts every exit, honours a deadline and an exit budget, and stops on a kick.
 *
 * Kicks are race-free: the kicker sets kvm_run.immediate_exit and then signals the vCPU thread.
 * If the signal lands before KVM_RUN, immediate_exit makes KVM_RUN return EINTR at once; if it
 * lands during guest execution the signal forces an exit. The deadline uses a POSIX timer that
 * signals the vCPU thread itself, whose handler sets immediate_exit through a thread-local pointer.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>
#include <linux/kvm.h>

#include "pykvm_native.h"

#ifndef SIGEV_THREAD_ID
#define SIGEV_THREAD_ID 4
#endif
#ifndef sigev_notify_thread_id
#define sigev_notify_thread_id _sigev_un._tid
#endif

#define UART_THR 0
#define UART_IER 1
#define UART_IIR 2
#define UART_LCR 3
#define UART_MCR 4
#define UART_LSR 5
#define UART_MSR 6
#define UART_SCR 7
#define UART_LCR_DLAB 0x80
#define UART_LSR_DR 0x01
#define UART_LSR_OE 0x02
#define UART_LSR_INT_ANY 0x1e            /* OE, PE, FE, BI: receiver line status */
#define UART_LSR_THRE 0x20
#define UART_LSR_TEMT 0x40
#define UART_IER_RDI 0x01
#define UART_IER_THRI 0x02
#define UART_IER_RLSI 0x04
#define UART_IIR_NO_INT 0x01
#define UART_IIR_THRI 0x02
#define UART_IIR_RDI 0x04
#define UART_IIR_RLSI 0x06
#define UART_IIR_CTI 0x0c
#define UART_IIR_FE 0xc0
#define UART_FCR_FE 0x01
#define UART_FCR_RFR 0x02
#define UART_FCR_XFR 0x04
#define UART_MCR_LOOP 0x10
#define UART_RX_FIFO 16

static __thread struct kvm_run *tls_run;
static pthread_once_t sig_once = PTHREAD_ONCE_INIT;
static int kick_sig;

static void kick_handler(int sig, siginfo_t *si, void *uc)
{
    (void)sig; (void)si; (void)uc;
    if (tls_run)
        tls_run->immediate_exit = 1;
}

static void install_handler(void)
{
    struct sigaction sa;

    kick_sig = SIGRTMIN + 3;
    memset(&sa, 0, sizeof(sa));
    sa.sa_sigaction = kick_handler;
    sa.sa_flags = SA_SIGINFO;        /* no SA_RESTART: KVM_RUN must see EINTR */
    sigemptyset(&sa.sa_mask);
    sigaction(kick_sig, &sa, NULL);
}

int pykvm_kick_signal(void)
{
    pthread_once(&sig_once, install_handler);
    return kick_sig;
}

long pykvm_ioctl(int fd, unsigned long request, uint64_t arg)
{
    long r = ioctl(fd, request, (unsigned long)arg);
    return r < 0 ? -errno : r;
}

int64_t pykvm_monotonic_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

/*
 * Replace [addr, addr + size) with fresh anonymous memory in one step (MAP_FIXED), dropping what
 * was mapped there (a vCPU's kvm_run page, guest RAM) while keeping the address range owned by
 * us: a late reader or writer that still holds the address touches harmless zeroes instead of
 * faulting or, worse, someone else's later mapping. The range is unmapped for good when its
 * Python mmap object is released.
 */
int pykvm_retire_mapping(uint64_t addr, uint64_t size)
{
    void *p = mmap((void *)(uintptr_t)addr, size, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED | MAP_NORESERVE, -1, 0);
    return p == MAP_FAILED ? -errno : 0;
}

/* Map `size` bytes of `fd` (a vCPU's kvm_run and the pages after it) read-write and shared.
 * Returns the address, or -errno. Unlike Python's mmap object this keeps no duplicate of the fd,
 * so closing the vCPU fd and retiring the mapping really lets the vCPU go. */
int64_t pykvm_map_shared(int fd, uint64_t size)
{
    void *p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    return p == MAP_FAILED ? -errno : (int64_t)(uintptr_t)p;
}

int pykvm_unmap(uint64_t addr, uint64_t size)
{
    return munmap((void *)(uintptr_t)addr, size) < 0 ? -errno : 0;
}

int pykvm_loop_kick(struct pykvm_loop *l)
{
    struct kvm_run *run = (struct kvm_run *)(uintptr_t)l->run;
    int tid;

    pykvm_kick_signal();
    l->kick = 1;
    __atomic_store_n(&run->immediate_exit, 1, __ATOMIC_SEQ_CST);
    tid = __atomic_load_n(&l->tid, __ATOMIC_SEQ_CST);
    if (tid)
        syscall(SYS_tgkill, getpid(), tid, kick_sig);
    return 0;
}

/* Append bytes to the console buffer; returns 0 when it had to stop because the buffer is full. */
static int console_put(struct pykvm_loop *l, const uint8_t *p, uint32_t n)
{
    uint8_t *buf = (uint8_t *)(uintptr_t)l->console;
    uint32_t room = l->console_cap - l->console_len;

    if (n > room)
        n = room;
    if (!buf || !n)                    /* no buffer (a UART's state alone), or no room */
        return l->console_len < l->console_cap;
    if (l->console_len == 0)
        l->console_since_ns = pykvm_monotonic_ns();
    memcpy(buf + l->console_len, p, n);
    l->console_len += n;
    return l->console_len < l->console_cap;
}

static uint32_t io_value(const uint8_t *p, uint8_t size)
{
    uint32_t v = 0;
    memcpy(&v, p, size <= 4 ? size : 4);
    return v;
}

/* A 16550 whose transmitter is always empty (output is instant), as Linux's 8250 driver sees it:
 *  - host input (pykvm_uart_input, the machine's console input): bytes wait in a ring of the
 *    owner's (uart_in, e.g. 4 KiB) and move into the receiver as it has room: the FIFO up to
 *    16 bytes (FIFOs on) or RBR when LSR.DR is clear (FIFOs off), at once and again after each
 *    RBR read, so a guest that reads RBR while LSR.DR is set gets every byte, in order, and
 *    host input never overruns the receiver (the ring, not the guest, tells the host to wait).
 *    None moves in while in loopback, where the receiver hears the transmitter only;
 *  - THR-empty interrupt: pending after a THR write and when IER.THRI is turned on; an IIR read
 *    that reports it (0x02) clears it; with uart_irq set, the UART's interrupt output
 *    (IER.THRI and pending) drives that GSI through KVM_IRQ_LINE (x86 COM1: IRQ 4 on the
 *    in-kernel irqchip); without one, IIR still tells a polling driver (RISC-V: no PLIC) to send;
 *  - loopback (MCR bit 4): MSR mirrors MCR (DTR->DSR, RTS->CTS, OUT1->RI, OUT2->DCD), as the
 *    8250 probe checks, and each THR byte goes to the receiver instead of the console: RBR
 *    returns it and LSR.DR is set; FIFOs off, a byte arriving while DR is set overwrites RBR
 *    and sets LSR.OE; FIFOs on (FCR bit 0), bytes queue in a 16-byte FIFO and one arriving
 *    when it is full is lost and sets LSR.OE; reading LSR clears OE (16550 data sheet, QEMU's
 *    serial.c). IIR reports, by priority, receiver line status (IER.ELSI and OE), received
 *    data (IER.ERBFI and DR: 0x04 at the FIFO trigger level, below it the character timeout
 *    0x0c at once, since the transmitter is instant), then THR empty; with FIFOs on its bits
 *    7:6 are set. FCR: enabling or disabling the FIFOs clears them, bit 1 clears the receive
 *    FIFO, bit 2 the transmit one (THR-empty pending again);
 *  - one UART per machine: a loop whose uart_owner is set uses the state of that struct (a
 *    pykvm.runloop.UartGroup's, which belongs to no loop), under its uart_lock (vCPUs access
 *    it from their own threads), and with the owner's uart_out its output goes to one buffer
 *    in the order the vCPUs wrote it. Python reaches the same state through
 *    pykvm_uart_access() (pykvm.devices.uart16550.Uart16550): there is no second model. */
static struct pykvm_loop *uart_lock(struct pykvm_loop *l)
{
    struct pykvm_loop *u = l->uart_owner ? (struct pykvm_loop *)(uintptr_t)l->uart_owner : l;

    while (__atomic_exchange_n(&u->uart_lock, 1, __ATOMIC_ACQUIRE))
        sched_yield();
    return u;
}

static void uart_unlock(struct pykvm_loop *u)
{
    __atomic_store_n(&u->uart_lock, 0, __ATOMIC_RELEASE);
}

/* IIR as the interrupt sources now stand (QEMU's serial_update_irq priorities). */
static uint8_t uart_iir(const struct pykvm_loop *l)
{
    static const uint8_t trigger[4] = { 1, 4, 8, 14 };
    uint8_t ier = l->uart[UART_IER], fe = l->uart_fcr & UART_FCR_FE;
    uint8_t id = UART_IIR_NO_INT;

    if ((ier & UART_IER_RLSI) && (l->uart_lsr & UART_LSR_INT_ANY))
        id = UART_IIR_RLSI;
    else if ((ier & UART_IER_RDI) && (l->uart_lsr & UART_LSR_DR))
        id = fe && l->uart_rx_count < trigger[l->uart_fcr >> 6] ? UART_IIR_CTI : UART_IIR_RDI;
    else if ((ier & UART_IER_THRI) && l->uart_thre)
        id = UART_IIR_THRI;
    return (uint8_t)(id | (fe ? UART_IIR_FE : 0));
}

static void uart_update_irq(struct pykvm_loop *l)
{
    uint8_t level = !(uart_iir(l) & UART_IIR_NO_INT);
    struct kvm_irq_level irq;

    if (!l->uart_irq || level == l->uart_irq_level)
        return;
    l->uart_irq_level = level;
    irq.irq = l->uart_irq;
    irq.level = level;
    ioctl(l->uart_irq_fd, KVM_IRQ_LINE, &irq);
}

/* A byte reaches the receiver (loopback, or host input with room for it). */
static void uart_receive(struct pykvm_loop *l, uint8_t v)
{
    if (l->uart_fcr & UART_FCR_FE) {
        if (l->uart_rx_count >= UART_RX_FIFO) {
            l->uart_lsr |= UART_LSR_OE;
        } else {
            l->uart_rx[(l->uart_rx_head + l->uart_rx_count) % UART_RX_FIFO] = v;
            l->uart_rx_count++;
        }
    } else {
        if (l->uart_lsr & UART_LSR_DR)
            l->uart_lsr |= UART_LSR_OE;
        l->uart_rbr = v;
    }
    l->uart_lsr |= UART_LSR_DR;
}

/* Move waiting host input into the receiver while it has room (see above); under the lock. */
static void uart_fill(struct pykvm_loop *l)
{
    const uint8_t *ring = (const uint8_t *)(uintptr_t)l->uart_in;
    uint32_t cap = l->uart_in_cap;

    if (!ring || !cap || !l->uart_in_len || (l->uart[UART_MCR] & UART_MCR_LOOP))
        return;
    if (l->uart_in_len > cap)            /* the ring's fields are ours alone: stay in bounds */
        l->uart_in_len = cap;
    while (l->uart_in_len) {
        if (l->uart_fcr & UART_FCR_FE ? l->uart_rx_count >= UART_RX_FIFO
                                      : (l->uart_lsr & UART_LSR_DR) != 0)
            break;
        uart_receive(l, ring[l->uart_in_head % cap]);
        l->uart_in_head = (l->uart_in_head % cap + 1) % cap;
        l->uart_in_len--;
        l->uart_in_delivered++;
    }
}

static uint8_t uart_read_locked(struct pykvm_loop *l, unsigned reg)
{
    uint8_t mcr = l->uart[UART_MCR], v;

    if ((l->uart[UART_LCR] & UART_LCR_DLAB) && reg <= 1)
        return reg == 0 ? l->uart_dll : l->uart_dlm;
    switch (reg) {
    case UART_THR:                                 /* RBR */
        if (l->uart_fcr & UART_FCR_FE) {
            v = 0;
            if (l->uart_rx_count) {
                v = l->uart_rx[l->uart_rx_head % UART_RX_FIFO];
                l->uart_rx_head = (uint8_t)((l->uart_rx_head + 1) % UART_RX_FIFO);
                l->uart_rx_count--;
            }
            if (!l->uart_rx_count)
                l->uart_lsr &= (uint8_t)~UART_LSR_DR;
        } else {
            v = l->uart_rbr;
            l->uart_lsr &= (uint8_t)~UART_LSR_DR;
        }
        uart_fill(l);                              /* the next host byte takes its place */
        uart_update_irq(l);
        return v;
    case UART_IIR:
        v = uart_iir(l);
        if ((v & 0x0f) == UART_IIR_THRI) {
            l->uart_thre = 0;
            uart_update_irq(l);
        }
        return v;
    case UART_LSR:
        v = (uint8_t)(l->uart_lsr | UART_LSR_THRE | UART_LSR_TEMT);
        if (l->uart_lsr & UART_LSR_INT_ANY) {
            l->uart_lsr &= (uint8_t)~UART_LSR_INT_ANY;  /* OE clears when read */
            uart_update_irq(l);
        }
        return v;
    case UART_MSR:
        if (mcr & UART_MCR_LOOP)
            return (uint8_t)(((mcr & 1) << 5) | ((mcr & 2) << 3) | ((mcr & 4) << 4) | ((mcr & 8) << 4));
        return 0xb0;                               /* DCD, DSR, CTS */
    default: return l->uart[reg];
    }
}

static uint8_t uart_read(struct pykvm_loop *l, unsigned reg)
{
    struct pykvm_loop *u = uart_lock(l);
    uint8_t v = uart_read_locked(u, reg);

    uart_unlock(u);
    return v;
}

/* A write of v to register reg; returns 0 when THR output found the console buffer full. The
 * state is the shared UART's (u), the output goes to this vCPU's console buffer (l). */
static int uart_write(struct pykvm_loop *l, unsigned reg, uint8_t v)
{
    struct pykvm_loop *u = uart_lock(l);
    int room = 1;

    if ((u->uart[UART_LCR] & UART_LCR_DLAB) && reg <= 1) {
        if (reg == 0) u->uart_dll = v; else u->uart_dlm = v;
    } else if (reg == UART_THR) {
        if (u->uart[UART_MCR] & UART_MCR_LOOP) {
            uart_receive(u, v);        /* looped back to the receiver: not output */
        } else if (u->uart_out) {
            /* One buffer for all vCPUs: bytes written in turn by different vCPUs keep their
             * order. This vCPU returns to Python to drain it when it is nearly full or its
             * oldest byte has waited console_flush_ns. */
            uint8_t *out = (uint8_t *)(uintptr_t)u->uart_out;
            int64_t now = pykvm_monotonic_ns();

            if (u->uart_out_len < u->uart_out_cap) {
                if (!u->uart_out_len)
                    u->uart_out_since_ns = now;
                out[u->uart_out_len++] = v;
            } else {
                u->uart_out_dropped++;
            }
            if (u->uart_out_len + 64 >= u->uart_out_cap ||
                (l->console_flush_ns && now - u->uart_out_since_ns >= l->console_flush_ns))
                room = 0;
        } else {
            room = console_put(l, &v, 1);
        }
        u->uart_thre = 1;
    } else if (reg == UART_IER) {
        if ((v ^ u->uart[UART_IER]) & UART_IER_THRI)
            u->uart_thre = (v & UART_IER_THRI) ? 1 : 0;
        u->uart[UART_IER] = v & 0x0f;
    } else if (reg == UART_IIR) {                  /* FCR */
        if ((v ^ u->uart_fcr) & UART_FCR_FE)
            v |= UART_FCR_RFR | UART_FCR_XFR;      /* FIFOs flushed when enabled or disabled */
        if (v & UART_FCR_RFR) {
            u->uart_lsr &= (uint8_t)~UART_LSR_DR;
            u->uart_rx_head = u->uart_rx_count = 0;
        }
        if (v & UART_FCR_XFR)
            u->uart_thre = 1;
        u->uart_fcr = v & 0xc9;
    } else if (reg == UART_MCR) {
        u->uart[UART_MCR] = v & 0x1f;
    } else if (reg != UART_LSR && reg != UART_MSR) {
        u->uart[reg] = v;          /* LCR, SCR read back */
    }
    uart_fill(u);                  /* after a FIFO flush or the end of loopback */
    uart_update_irq(u);
    uart_unlock(u);
    return room;
}

/* Move up to cap bytes of the shared UART output of l's UART (its owner's) to dst, in order;
 * returns how many. Any thread may call it: it takes the UART lock. */
uint32_t pykvm_uart_take(struct pykvm_loop *l, uint8_t *dst, uint32_t cap)
{
    struct pykvm_loop *u = uart_lock(l);
    uint8_t *out = (uint8_t *)(uintptr_t)u->uart_out;
    uint32_t n = 0;

    if (out) {
        n = u->uart_out_len < cap ? u->uart_out_len : cap;
        memcpy(dst, out, n);
        memmove(out, out + n, u->uart_out_len - n);
        u->uart_out_len -= n;
        if (u->uart_out_len)
            u->uart_out_since_ns = pykvm_monotonic_ns();
    }
    uart_unlock(u);
    return n;
}

/* One register access to the 16550 whose state l holds (or, with l->uart_owner, the shared
 * one): reg 0-7 (RBR/THR/DLL, IER/DLM, IIR/FCR, LCR, MCR, LSR, MSR, SCR; higher numbers are
 * taken mod 8). A read returns the register's value, with the side effects of reading it (RBR
 * pops the receiver, IIR acknowledges THR empty, LSR clears OE). A write returns 1, or 0 when
 * its THR byte left the output buffer in need of draining (nearly full, or its oldest byte has
 * waited l->console_flush_ns). Takes the UART lock: any thread may call it. This is the same
 * code the C loop serves port and MMIO accesses with, for Python (pykvm.devices.uart16550). */
uint8_t pykvm_uart_access(struct pykvm_loop *l, unsigned reg, int is_write, uint8_t value)
{
    reg &= 7;
    if (is_write)
        return (uint8_t)uart_write(l, reg, value);
    return uart_read(l, reg);
}

/* Host input for l's UART (its owner's): append up to n bytes of buf to the input ring and
 * move what the receiver has room for into it, raising the received-data interrupt as IER
 * asks (through uart_irq, KVM_IRQ_LINE: a vCPU halted with interrupts on wakes up). Returns
 * the bytes accepted: fewer than n (maybe 0) when the ring is full, never blocking; 0 when the
 * UART has no ring (uart_in). Takes the UART lock: any thread may call it while vCPUs run. */
uint32_t pykvm_uart_input(struct pykvm_loop *l, const uint8_t *buf, uint32_t n)
{
    struct pykvm_loop *u = uart_lock(l);
    uint8_t *ring = (uint8_t *)(uintptr_t)u->uart_in;
    uint32_t cap = u->uart_in_cap, tail, first;

    if (!ring || !cap || !buf) {
        uart_unlock(u);
        return 0;
    }
    if (u->uart_in_len > cap)
        u->uart_in_len = cap;
    if (n > cap - u->uart_in_len)
        n = cap - u->uart_in_len;
    tail = (u->uart_in_head % cap + u->uart_in_len) % cap;
    first = n < cap - tail ? n : cap - tail;       /* up to the ring's end, then from 0 */
    memcpy(ring + tail, buf, first);
    memcpy(ring, buf + first, n - first);
    u->uart_in_len += n;
    uart_fill(u);
    uart_update_irq(u);
    uart_unlock(u);
    return n;
}

/* ---- ns16550a as MMIO (RISC-V virt) -----------------------------------------------------
 * The same register file as the port UART above, at uart_mmio_base with a stride of
 * 1 << uart_mmio_shift bytes. An access of any width hits the register at its address: a write
 * uses its low byte, a read returns the register in the low byte and zeroes above. Addresses
 * between registers (with a stride > 1) or past the eighth register are not ours. */
enum mmio_result { MMIO_NOT_OURS, MMIO_DONE, MMIO_STOP_CONSOLE_FULL };

static enum mmio_result serve_uart_mmio(struct pykvm_loop *l, struct kvm_run *run)
{
    uint64_t base = l->uart_mmio_base, addr = run->mmio.phys_addr, off;
    uint32_t shift = l->uart_mmio_shift, len = run->mmio.len;
    unsigned reg;

    if (!base || addr < base || shift > 2 || len == 0 || len > 8)
        return MMIO_NOT_OURS;
    off = addr - base;
    if (off >= (8ULL << shift) || (off & ((1ULL << shift) - 1)))
        return MMIO_NOT_OURS;
    reg = (unsigned)(off >> shift);
    if (run->mmio.is_write)
        return uart_write(l, reg, run->mmio.data[0]) ? MMIO_DONE : MMIO_STOP_CONSOLE_FULL;
    memset(run->mmio.data, 0, sizeof(run->mmio.data));
    run->mmio.data[0] = uart_read(l, reg);
    return MMIO_DONE;
}
/* ---- end of the MMIO UART ---------------------------------------------------------------- */

/* virtio-mmio InterruptStatus reads and InterruptACK writes (csrc/virtio_irq.c): 1 = served. */
int pykvm_vmmio_serve(const uint64_t *handles, uint32_t n, struct kvm_run *run);

#define SBI_EXT_DBCN 0x4442434EUL
#define SBI_DBCN_WRITE 0
#define SBI_DBCN_WRITE_BYTE 2
#define SBI_SUCCESS 0
#define SBI_ERR_INVALID_PARAM (-3L)

/* Host pointer for guest range [gpa, gpa + n) if it lies inside one known RAM region. */
static const uint8_t *guest_range(const struct pykvm_loop *l, uint64_t gpa, uint64_t n)
{
    uint32_t i;

    for (i = 0; i < l->nram && i < PYKVM_MAX_RAM; i++) {
        const struct pykvm_ram *r = &l->ram[i];
        if (gpa >= r->gpa && gpa - r->gpa <= r->size && n <= r->size - (gpa - r->gpa))
            return (const uint8_t *)(uintptr_t)(r->host + (gpa - r->gpa));
    }
    return NULL;
}

enum sbi_result { SBI_NOT_OURS, SBI_DONE, SBI_DONE_CONSOLE_FULL };

/* The SBI debug console (RISC-V): write and write_byte are served here; everything else, and
 * writes from memory the loop does not know, go to Python. */
static enum sbi_result serve_sbi(struct pykvm_loop *l, struct kvm_run *run)
{
    unsigned long fid = run->riscv_sbi.function_id;

    if (!l->sbi_console || run->riscv_sbi.extension_id != SBI_EXT_DBCN)
        return SBI_NOT_OURS;
    if (fid == SBI_DBCN_WRITE) {
        uint64_t n = run->riscv_sbi.args[0];
        uint64_t lo = run->riscv_sbi.args[1], hi = run->riscv_sbi.args[2];
        uint32_t room = l->console_cap - l->console_len;
        const uint8_t *p;

        if (hi)
            return SBI_NOT_OURS;
        if (n > room)
            n = room;               /* a short write: the SBI spec lets the guest retry */
        p = guest_range(l, lo, n);
        if (!p)
            return SBI_NOT_OURS;
        console_put(l, p, (uint32_t)n);
        run->riscv_sbi.ret[0] = SBI_SUCCESS;
        run->riscv_sbi.ret[1] = n;
        return l->console_len < l->console_cap ? SBI_DONE : SBI_DONE_CONSOLE_FULL;
    }
    if (fid == SBI_DBCN_WRITE_BYTE) {
        uint8_t b = (uint8_t)run->riscv_sbi.args[0];
        if (l->console_len >= l->console_cap)
            return SBI_NOT_OURS;
        console_put(l, &b, 1);
        run->riscv_sbi.ret[0] = SBI_SUCCESS;
        run->riscv_sbi.ret[1] = 0;
        return SBI_DONE;
    }
    return SBI_NOT_OURS;
}

enum io_result { IO_NOT_OURS, IO_DONE, IO_STOP_DEBUG_EXIT, IO_STOP_CONSOLE_FULL };

static enum io_result serve_io(struct pykvm_loop *l, struct kvm_run *run, uint8_t *data)
{
    uint16_t port = run->io.port;
    uint8_t size = run->io.size;
    uint32_t count = run->io.count;
    int out = run->io.direction == KVM_EXIT_IO_OUT;
    uint32_t i;

    if (l->exit_port && port >= l->exit_port && port - l->exit_port < l->exit_port_size) {
        if (!out) {
            memset(data, 0, (size_t)size * count);
            return IO_DONE;
        }
        l->exit_value = io_value(data, size);
        return IO_STOP_DEBUG_EXIT;
    }
    if (l->debugcon_port && port == l->debugcon_port) {
        if (!out) {
            memset(data, 0xe9, (size_t)size * count);   /* Bochs: reads return 0xe9 */
            return IO_DONE;
        }
        for (i = 0; i < count; i++)
            if (!console_put(l, data + (size_t)i * size, 1))
                return IO_STOP_CONSOLE_FULL;
        return IO_DONE;
    }
    if (l->serial_base && port >= l->serial_base && port < l->serial_base + 8) {
        /* QEMU's serial_io_ops: 1-byte registers; a wider access is one access per byte at
         * consecutive registers, the register number taken mod 8 (serial_ioport_*: addr & 7) */
        unsigned reg = port - l->serial_base, j;
        int full = 0;
        for (i = 0; i < count; i++) {
            uint8_t *p = data + (size_t)i * size;
            for (j = 0; j < size; j++) {
                if (out) {
                    if (!uart_write(l, (reg + j) & 7, p[j]))
                        full = 1;
                } else {
                    p[j] = uart_read(l, (reg + j) & 7);
                }
            }
        }
        return full ? IO_STOP_CONSOLE_FULL : IO_DONE;
    }
    return IO_NOT_OURS;
}

/* Move coalesced-MMIO ring entries into the log. Returns 0 if the log filled up. */
static int drain_ring(struct pykvm_loop *l)
{
    struct kvm_coalesced_mmio_ring *ring = (void *)(uintptr_t)l->ring;
    struct pykvm_mmio_record *log = (void *)(uintptr_t)l->mmio_log;
    uint32_t first, last, max = l->ring_entries;

    if (!ring || !max)
        return 1;
    first = __atomic_load_n(&ring->first, __ATOMIC_ACQUIRE);
    last = __atomic_load_n(&ring->last, __ATOMIC_ACQUIRE);
    if (first >= max || last >= max)   /* the ring is shared with the kernel: stay in bounds */
        return 1;
    while (first != last) {
        struct kvm_coalesced_mmio *e = &ring->coalesced_mmio[first];
        if (l->mmio_log_len >= l->mmio_log_cap)
            return 0;
        if (log) {
            struct pykvm_mmio_record *r = &log[l->mmio_log_len];
            r->phys_addr = e->phys_addr;
            r->len = e->len > 8 ? 8 : e->len;
#ifdef KVM_CAP_COALESCED_PIO
            r->pio = e->pio;
#else
            r->pio = 0;
#endif
            memcpy(r->data, e->data, 8);
        }
        l->mmio_log_len++;
        first = (first + 1) % max;
        __atomic_store_n(&ring->first, first, __ATOMIC_RELEASE);
    }
    return 1;
}

static int arm_deadline(struct pykvm_loop *l, timer_t *timer)
{
    struct sigevent sev;
    struct itimerspec its;

    memset(&sev, 0, sizeof(sev));
    sev.sigev_notify = SIGEV_THREAD_ID;
    sev.sigev_signo = kick_sig;
    sev.sigev_notify_thread_id = l->tid;
    if (timer_create(CLOCK_MONOTONIC, &sev, timer) < 0)
        return -errno;
    memset(&its, 0, sizeof(its));
    its.it_value.tv_sec = l->deadline_ns / 1000000000LL;
    its.it_value.tv_nsec = l->deadline_ns % 1000000000LL;
    /* Re-fire every millisecond after the deadline in case one signal lands outside KVM_RUN. */
    its.it_interval.tv_nsec = 1000000;
    if (timer_settime(*timer, TIMER_ABSTIME, &its, NULL) < 0) {
        int e = errno;
        timer_delete(*timer);
        return -e;
    }
    return 0;
}

static int run_loop(struct pykvm_loop *l, struct kvm_run *run)
{
    for (;;) {
        uint32_t reason;
        int r;

        if (l->kick)
            return PYKVM_STOP_KICK;
        if (l->deadline_ns && pykvm_monotonic_ns() >= l->deadline_ns)
            return PYKVM_STOP_DEADLINE;

        r = ioctl(l->vcpu_fd, KVM_RUN, 0);
        if (r < 0) {
            int e = errno;
            if (e == EINTR || e == EAGAIN) {
                __atomic_store_n(&run->immediate_exit, 0, __ATOMIC_SEQ_CST);
                if (l->kick)
                    return PYKVM_STOP_KICK;
                if (l->deadline_ns && pykvm_monotonic_ns() >= l->deadline_ns)
                    return PYKVM_STOP_DEADLINE;
                return PYKVM_STOP_SIGNAL;
            }
            l->last_errno = e;
            return -e;
        }

        reason = run->exit_reason;
        l->exits_total++;
        l->counts[reason < PYKVM_MAX_EXIT_REASON ? reason : PYKVM_MAX_EXIT_REASON - 1]++;
        if (l->budget > 0)
            l->budget--;                /* every exit counts, whoever handles it */

        if (!drain_ring(l))
            return l->budget == 0 ? PYKVM_STOP_BUDGET : PYKVM_STOP_MMIO_LOG_FULL;

        if (reason == KVM_EXIT_IO) {
            uint64_t off = run->io.data_offset;
            uint64_t len = (uint64_t)run->io.size * run->io.count;
            enum io_result res;

            if (run->io.size == 0 || run->io.size > 8 || off < sizeof(*run) ||
                off > l->run_size || len > l->run_size - off)
                return PYKVM_STOP_BAD_EXIT;
            res = serve_io(l, run, (uint8_t *)run + off);
            if (res == IO_STOP_DEBUG_EXIT) {
                l->handled_in_c++;
                return PYKVM_STOP_DEBUG_EXIT;
            }
            if (res == IO_NOT_OURS)
                return PYKVM_STOP_EXIT;
            l->handled_in_c++;
            if (l->budget == 0)
                return PYKVM_STOP_BUDGET;   /* Python drains the console on every return */
            if (res == IO_STOP_CONSOLE_FULL)
                return PYKVM_STOP_CONSOLE_FULL;
            /* Let Python stream console output that has waited long enough. */
            if (l->console_len && l->console_flush_ns &&
                pykvm_monotonic_ns() - l->console_since_ns >= l->console_flush_ns)
                return PYKVM_STOP_CONSOLE_FULL;
        } else if (reason == KVM_EXIT_MMIO && (l->uart_mmio_base || l->nvmmio)) {
            enum mmio_result res = MMIO_NOT_OURS;
            if (l->nvmmio && pykvm_vmmio_serve(l->vmmio, l->nvmmio, run))
                res = MMIO_DONE;
            if (res == MMIO_NOT_OURS)
                res = serve_uart_mmio(l, run);
            if (res == MMIO_NOT_OURS)
                return PYKVM_STOP_EXIT;
            l->handled_in_c++;
            if (l->budget == 0)
                return PYKVM_STOP_BUDGET;
            if (res == MMIO_STOP_CONSOLE_FULL ||
                (l->console_len && l->console_flush_ns &&
                 pykvm_monotonic_ns() - l->console_since_ns >= l->console_flush_ns))
                return PYKVM_STOP_CONSOLE_FULL;
        } else if (reason == KVM_EXIT_RISCV_SBI) {
            enum sbi_result res = serve_sbi(l, run);
            if (res == SBI_NOT_OURS)
                return PYKVM_STOP_EXIT;
            l->handled_in_c++;
            if (l->budget == 0)
                return PYKVM_STOP_BUDGET;
            if (res == SBI_DONE_CONSOLE_FULL ||
                (l->console_len && l->console_flush_ns &&
                 pykvm_monotonic_ns() - l->console_since_ns >= l->console_flush_ns))
                return PYKVM_STOP_CONSOLE_FULL;
        } else if (reason == KVM_EXIT_INTR) {
            l->handled_in_c++;          /* a pending signal of ours: checked at the loop top */
            if (l->budget == 0)
                return PYKVM_STOP_BUDGET;
        } else {
            return PYKVM_STOP_EXIT;
        }
    }
}

/* Hand an exit to Python with its fields decoded here (so a handler reads plain ints):
 * info: bit 31 = console or MMIO-log bytes wait to be drained; IO: size | direction << 8, MMIO:
 * len | is_write << 8. IO: a = port | count << 16 | data_offset << 32 (run_loop() checked the
 * span), b = the first element; MMIO: a = phys_addr, b = the data (len bytes, little-endian). */
static int py_exit(struct pykvm_loop *l, struct kvm_run *run, uint32_t reason)
{
    uint32_t info = (l->console_len || l->mmio_log_len) ? 0x80000000u : 0;
    uint64_t a = 0, b = 0;

    if (reason == KVM_EXIT_IO) {
        info |= run->io.size | (uint32_t)run->io.direction << 8;
        a = run->io.port | (uint64_t)(run->io.count & 0xffff) << 16 |
            (uint64_t)(run->io.data_offset & 0xffffffffu) << 32;
        b = io_value((uint8_t *)run + run->io.data_offset, run->io.size);
    } else if (reason == KVM_EXIT_MMIO) {
        uint32_t len = run->mmio.len <= 8 ? run->mmio.len : 0;
        info |= len | (uint32_t)(run->mmio.is_write ? 1 : 0) << 8;
        a = run->mmio.phys_addr;
        memcpy(&b, run->mmio.data, len);
    }
    return pykvm_py_call(l, reason, info, a, b);
}

/* Whether an exit in callback_mask may go to its handler: not a guest report, not an MMIO exit
 * in guest RAM (see report_port in pykvm_native.h). */
static int handler_may_serve(const struct pykvm_loop *l, const struct kvm_run *run,
                             uint32_t reason)
{
    uint32_t i;

    if (reason == KVM_EXIT_IO)
        return !l->report_port || run->io.port != l->report_port;
    if (reason == KVM_EXIT_MMIO) {
        for (i = 0; i < l->nguard && i < PYKVM_MAX_GUARD; i++)
            if (run->mmio.phys_addr - l->guard[i].gpa < l->guard[i].size)
                return 0;
        return 1;
    }
    if (reason == KVM_EXIT_RISCV_SBI)
        return !l->report_sbi_eid || run->riscv_sbi.extension_id != l->report_sbi_eid;
    return 1;
}

/* run_loop(), then what it does not serve: exits to count and resume (resume_mask), exits for a
 * Python handler called from here (callback_mask), anything else back to the caller. */
static int run_dispatch(struct pykvm_loop *l, struct kvm_run *run)
{
    for (;;) {
        int r = run_loop(l, run);
        uint32_t reason;

        if (r != PYKVM_STOP_EXIT)
            return r;
        reason = run->exit_reason;
        if (reason >= 64)
            return r;
        if ((l->resume_mask >> reason) & 1) {
            l->handled_in_c++;
        } else if (((l->callback_mask >> reason) & 1) && handler_may_serve(l, run, reason)) {
            int c = py_exit(l, run, reason);
            if (c == PYKVM_CB_STOP_EXIT)
                return PYKVM_STOP_EXIT;
            if (c != PYKVM_CB_RESUME)
                return PYKVM_STOP_CALLBACK;
            l->handled_in_py++;
        } else {
            return r;
        }
        if (l->budget == 0)
            return PYKVM_STOP_BUDGET;
    }
}

int pykvm_loop_run(struct pykvm_loop *l)
{
    struct kvm_run *run = (struct kvm_run *)(uintptr_t)l->run;
    timer_t timer;
    int have_timer = 0;
    int ret;
    sigset_t set;

    pykvm_kick_signal();
    /* Make sure the kick signal can reach this thread. */
    sigemptyset(&set);
    sigaddset(&set, kick_sig);
    pthread_sigmask(SIG_UNBLOCK, &set, NULL);

    tls_run = run;
    __atomic_store_n(&l->tid, (int32_t)syscall(SYS_gettid), __ATOMIC_SEQ_CST);
    l->last_errno = 0;

    if (l->deadline_ns) {
        ret = arm_deadline(l, &timer);
        if (ret < 0) {
            l->last_errno = -ret;
            goto out;
        }
        have_timer = 1;
    }
    ret = run_dispatch(l, run);
    if (ret == PYKVM_STOP_KICK)
        l->kick = 0;
out:
    if (have_timer)
        timer_delete(timer);
    __atomic_store_n(&l->tid, 0, __ATOMIC_SEQ_CST);
    __atomic_store_n(&run->immediate_exit, 0, __ATOMIC_SEQ_CST);
    tls_run = NULL;
    return ret;
}
