/*
 * The raw-C contender of `pykvm bench`: what a hand-written C VMM does with bare ioctls on the
 * kernel's own <linux/kvm.h>, using nothing of pykvm (not its ABI, ioctl wrapper or run loop).
 * Built as its own extension, pykvm._rawbench (csrc/build_rawbench.py), so that the benchmark
 * can call it in the same process, alternating with pykvm's contenders; pykvm._native (the run
 * loop) holds none of it.
 *
 * Guests are real-mode code at 0x1000 (CS = 0), RAM from GPA 0. The timed functions store
 * out[0] = wall-clock nanoseconds (CLOCK_MONOTONIC), out[1] = this thread's CPU nanoseconds
 * (CLOCK_THREAD_CPUTIME_ID: what the work cost, whatever else the machine runs), out[2] = a
 * checksum of the data served, and return 0 or a negative errno (-EPROTO on an unexpected exit,
 * whose reason is then in out[2]).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>
#include <linux/kvm.h>

#include "rawbench.h"

#define CODE_GPA 0x1000

struct raw_vm {
    int vm, vcpu;
    uint8_t *ram;
    uint64_t ram_size;
    struct kvm_run *run;
    int run_size;
    struct kvm_dirty_gfn *ring;      /* the vCPU's dirty ring (raw_create's ring_bytes), or NULL */
    uint32_t ring_n, ring_idx;       /* its entries, and the next one to harvest */
};

static int64_t clock_ns(clockid_t c)
{
    struct timespec ts;
    clock_gettime(c, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static void raw_destroy(struct raw_vm *v)
{
    if (v->ring && (void *)v->ring != MAP_FAILED)
        munmap(v->ring, (size_t)v->ring_n * sizeof(struct kvm_dirty_gfn));
    v->ring = NULL;
    if (v->run && v->run != MAP_FAILED)
        munmap(v->run, v->run_size);
    if (v->vcpu >= 0)
        close(v->vcpu);
    if (v->ram && v->ram != MAP_FAILED)
        munmap(v->ram, v->ram_size);
    if (v->vm >= 0)
        close(v->vm);
    v->run = NULL;
    v->ram = NULL;
    v->vcpu = v->vm = -1;
}

/* KVM_CREATE_VM, one RAM slot at GPA 0 holding `code` at CODE_GPA (or, with `pages`, the
 * pages a bitmap names copied from `image`), one vCPU with kvm_run mapped, in real mode at
 * CODE_GPA when `boot` is set. */
static int raw_create_ring(struct raw_vm *v, int kvm, uint64_t ram_size, const uint8_t *code,
                           uint32_t code_len, const uint8_t *pages, int boot,
                           uint32_t ring_bytes);

static int raw_create(struct raw_vm *v, int kvm, uint64_t ram_size, const uint8_t *code,
                      uint32_t code_len, const uint8_t *pages, int boot)
{
    return raw_create_ring(v, kvm, ram_size, code, code_len, pages, boot, 0);
}

/* raw_create(), and with ring_bytes a dirty ring of that many bytes per vCPU
 * (KVM_CAP_DIRTY_LOG_RING, enabled before the vCPU; the slot then logs dirty pages). */
static int raw_create_ring(struct raw_vm *v, int kvm, uint64_t ram_size, const uint8_t *code,
                           uint32_t code_len, const uint8_t *pages, int boot,
                           uint32_t ring_bytes)
{
    struct kvm_userspace_memory_region region;
#ifdef __x86_64__
    struct kvm_sregs sregs;
    struct kvm_regs regs;
#endif
    int e;

    memset(v, 0, sizeof(*v));
    v->vm = v->vcpu = -1;
    v->ram_size = ram_size;
    v->vm = ioctl(kvm, KVM_CREATE_VM, 0);
    if (v->vm < 0)
        return -errno;
    v->ram = mmap(NULL, ram_size, PROT_READ | PROT_WRITE,
                  MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (v->ram == MAP_FAILED)
        goto fail;
    if (pages) {                 /* `code` holds the named pages one after the other */
        uint64_t i, k = 0, n = ram_size / 4096;
        for (i = 0; i < n; i++)
            if (pages[i / 8] & (1u << (i % 8)))
                memcpy(v->ram + i * 4096, code + 4096 * k++, 4096);
    } else if (code_len) {
        memcpy(v->ram + CODE_GPA, code, code_len);
    }
    if (ring_bytes) {
        struct kvm_enable_cap cap;
        memset(&cap, 0, sizeof(cap));
        cap.cap = KVM_CAP_DIRTY_LOG_RING;
        cap.args[0] = ring_bytes;
        if (ioctl(v->vm, KVM_ENABLE_CAP, &cap) < 0)
            goto fail;
    }
    memset(&region, 0, sizeof(region));
    region.memory_size = ram_size;
    region.userspace_addr = (uint64_t)(uintptr_t)v->ram;
    region.flags = ring_bytes ? KVM_MEM_LOG_DIRTY_PAGES : 0;
    if (ioctl(v->vm, KVM_SET_USER_MEMORY_REGION, &region) < 0)
        goto fail;
    v->vcpu = ioctl(v->vm, KVM_CREATE_VCPU, 0);
    if (v->vcpu < 0)
        goto fail;
    if (ring_bytes) {
        v->ring_n = ring_bytes / sizeof(struct kvm_dirty_gfn);
        v->ring = mmap(NULL, ring_bytes, PROT_READ | PROT_WRITE, MAP_SHARED, v->vcpu,
                       KVM_DIRTY_LOG_PAGE_OFFSET * 4096);
        if ((void *)v->ring == MAP_FAILED) {
            v->ring = NULL;
            goto fail;
        }
    }
    v->run_size = ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
    if (v->run_size < 0)
        goto fail;
    v->run = mmap(NULL, v->run_size, PROT_READ | PROT_WRITE, MAP_SHARED, v->vcpu, 0);
    if (v->run == MAP_FAILED)
        goto fail;
    if (!boot)
        return 0;
#ifdef __x86_64__
    if (ioctl(v->vcpu, KVM_GET_SREGS, &sregs) < 0)
        goto fail;
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    if (ioctl(v->vcpu, KVM_SET_SREGS, &sregs) < 0)
        goto fail;
    memset(&regs, 0, sizeof(regs));
    regs.rip = CODE_GPA;
    regs.rflags = 2;
    if (ioctl(v->vcpu, KVM_SET_REGS, &regs) < 0)
        goto fail;
    return 0;
#else
    errno = ENOTSUP;              /* the raw contenders boot x86 real-mode code only */
    goto fail;
#endif
fail:
    e = errno;
    raw_destroy(v);
    return -e;
}

/* One exit of `kind`, served as a C VMM would: 0 if it was that exit, else -EPROTO. */
static int serve(struct kvm_run *run, int kind, uint64_t *sum)
{
    uint8_t *data;

    switch (kind) {
    case PYKVM_RAW_IO_OUT:
    case PYKVM_RAW_IO_IN:
        if (run->exit_reason != KVM_EXIT_IO ||
            run->io.direction != (kind == PYKVM_RAW_IO_OUT ? KVM_EXIT_IO_OUT : KVM_EXIT_IO_IN))
            return -EPROTO;
        data = (uint8_t *)run + run->io.data_offset;
        if (kind == PYKVM_RAW_IO_OUT)
            *sum += data[0] + run->io.port;
        else
            data[0] = 0x42;
        return 0;
    case PYKVM_RAW_MMIO_WRITE:
    case PYKVM_RAW_MMIO_READ:
        if (run->exit_reason != KVM_EXIT_MMIO ||
            run->mmio.is_write != (kind == PYKVM_RAW_MMIO_WRITE))
            return -EPROTO;
        if (kind == PYKVM_RAW_MMIO_WRITE)
            *sum += run->mmio.data[0] + run->mmio.phys_addr;
        else
            run->mmio.data[0] = 0x42;
        return 0;
    case PYKVM_RAW_HLT:
        return run->exit_reason == KVM_EXIT_HLT ? 0 : -EPROTO;
    }
    return -EINVAL;
}

int pykvm_raw_exit_loop(const char *dev, int kind, uint64_t n, const uint8_t *code,
                        uint32_t code_len, uint64_t ram_size, int64_t *out)
{
    struct raw_vm v;
    uint64_t i, sum = 0;
    int64_t t0, t1, c0, c1;
    int kvm, r = 0;

    kvm = open(dev, O_RDWR | O_CLOEXEC);
    if (kvm < 0)
        return -errno;
    r = raw_create(&v, kvm, ram_size, code, code_len, NULL, 1);
    close(kvm);
    if (r < 0)
        return r;
    c0 = clock_ns(CLOCK_THREAD_CPUTIME_ID);
    t0 = clock_ns(CLOCK_MONOTONIC);
    for (i = 0; i < n; i++) {
        if (ioctl(v.vcpu, KVM_RUN, 0) < 0) {
            r = -errno;
            break;
        }
        r = serve(v.run, kind, &sum);
        if (r < 0) {
            sum = v.run->exit_reason;
            break;
        }
    }
    t1 = clock_ns(CLOCK_MONOTONIC);
    c1 = clock_ns(CLOCK_THREAD_CPUTIME_ID);
    raw_destroy(&v);
    out[0] = t1 - t0;
    out[1] = c1 - c0;
    out[2] = (int64_t)sum;
    return r;
}

int pykvm_raw_lifecycle(const char *dev, uint32_t count, const uint8_t *code,
                        uint32_t code_len, uint64_t ram_size, int64_t *out)
{
    struct raw_vm v;
    int64_t t0, t1, c0, c1;
    uint32_t i;
    int kvm, r = 0;

    kvm = open(dev, O_RDWR | O_CLOEXEC);
    if (kvm < 0)
        return -errno;
    c0 = clock_ns(CLOCK_THREAD_CPUTIME_ID);
    t0 = clock_ns(CLOCK_MONOTONIC);
    for (i = 0; i < count; i++) {
        r = raw_create(&v, kvm, ram_size, code, code_len, NULL, 1);
        if (r < 0)
            break;
        if (ioctl(v.vcpu, KVM_RUN, 0) < 0)
            r = -errno;
        else if (v.run->exit_reason != KVM_EXIT_HLT)
            r = -EPROTO;
        raw_destroy(&v);
        if (r < 0)
            break;
    }
    t1 = clock_ns(CLOCK_MONOTONIC);
    c1 = clock_ns(CLOCK_THREAD_CPUTIME_ID);
    close(kvm);
    out[0] = t1 - t0;
    out[1] = c1 - c0;
    out[2] = i;
    return r;
}

/* `count` VMs kept alive (for resident-memory measurements): RAM of ram_size whose pages named
 * in the bitmap `pages` hold the bytes of `image` (those pages one after the other), and one
 * vCPU each. Returns a handle
 * for pykvm_raw_vms_destroy(), or NULL (errno set). */
void *pykvm_raw_vms_create(const char *dev, uint32_t count, uint64_t ram_size,
                           const uint8_t *image, const uint8_t *pages)
{
    struct raw_vm *vms = calloc(count ? count : 1, sizeof(*vms));
    uint32_t i;
    int kvm, r = 0;

    if (!vms)
        return NULL;
    kvm = open(dev, O_RDWR | O_CLOEXEC);
    if (kvm < 0) {
        free(vms);
        return NULL;
    }
    for (i = 0; i < count; i++) {
        r = raw_create(&vms[i], kvm, ram_size, image, 0, pages, 0);
        if (r < 0)
            break;
    }
    close(kvm);
    if (r < 0) {
        while (i--)
            raw_destroy(&vms[i]);
        free(vms);
        errno = -r;
        return NULL;
    }
    return vms;
}

void pykvm_raw_vms_destroy(void *handle, uint32_t count)
{
    struct raw_vm *vms = handle;
    uint32_t i;

    for (i = 0; vms && i < count; i++)
        raw_destroy(&vms[i]);
    free(vms);
}

/* mincore(): one bit per page of [addr, addr + size), set where the page is resident. */
int pykvm_resident_pages(uint64_t addr, uint64_t size, uint8_t *bitmap)
{
    uint64_t i, n = (size + 4095) / 4096;
    unsigned char *vec = malloc(n ? n : 1);

    if (!vec)
        return -ENOMEM;
    if (mincore((void *)(uintptr_t)addr, size, vec) < 0) {
        int e = errno;
        free(vec);
        return -e;
    }
    memset(bitmap, 0, (n + 7) / 8);
    for (i = 0; i < n; i++)
        if (vec[i] & 1)
            bitmap[i / 8] |= (uint8_t)(1u << (i % 8));
    free(vec);
    return 0;
}

/* -- reset: return a VM to a baseline, as a hand-written C VMM would -------------------------
 *
 * The VM of raw_create() (real-mode `code` at CODE_GPA) runs until its first exit that is not
 * HLT (the guest ends on an OUT to a port); the baseline is the state before the first run:
 * a copy of all RAM, and the vCPU and VM state pykvm's Machine.reset() loads (the same set, in
 * the same order: pykvm/arch/x86/snapshot.py) — SREGS2 (SREGS without KVM_CAP_SREGS2), REGS,
 * XSAVE (KVM_GET_XSAVE2's size), XCRS, MSRS (the caller's list: the one pykvm saves), DEBUGREGS,
 * VCPU_EVENTS, MP_STATE, then the VM's CLOCK. Dirty logging is on for the slot. Each reset:
 * KVM_RUN with immediate_exit (the OUT exit KVM waits on is completed, as pykvm does), the
 * dirty pages (`mode`: PYKVM_RAW_RESET_LOG, KVM_GET_DIRTY_LOG; PYKVM_RAW_RESET_LOG_MANUAL,
 * with KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, GET then KVM_CLEAR_DIRTY_LOG of those pages;
 * PYKVM_RAW_RESET_RING, a 64 KiB dirty ring harvested, then KVM_RESET_DIRTY_RINGS), copy them
 * back, then the SET ioctls. */
#ifdef __x86_64__
struct raw_state {
    int sregs2;
    struct kvm_sregs2 s2;
    struct kvm_sregs s;
    struct kvm_regs regs;
    struct kvm_xsave *xsave;
    struct kvm_xcrs xcrs;
    struct kvm_msrs *msrs;
    struct kvm_debugregs dbg;
    struct kvm_vcpu_events ev;
    struct kvm_mp_state mp;
    struct kvm_clock_data clock;
};

static int raw_save(struct raw_vm *v, struct raw_state *st, int kvm, const uint32_t *msrs,
                    uint32_t nmsrs)
{
    int xsize = ioctl(kvm, KVM_CHECK_EXTENSION, KVM_CAP_XSAVE2);
    uint32_t i;

    if (xsize < (int)sizeof(struct kvm_xsave))
        xsize = sizeof(struct kvm_xsave);
    st->sregs2 = ioctl(kvm, KVM_CHECK_EXTENSION, KVM_CAP_SREGS2) > 0;
    st->xsave = calloc(1, xsize);
    st->msrs = calloc(1, sizeof(struct kvm_msrs) + nmsrs * sizeof(struct kvm_msr_entry));
    if (!st->xsave || !st->msrs)
        return -ENOMEM;
    if (st->sregs2 ? ioctl(v->vcpu, KVM_GET_SREGS2, &st->s2) : ioctl(v->vcpu, KVM_GET_SREGS, &st->s))
        return -errno;
    if (ioctl(v->vcpu, KVM_GET_REGS, &st->regs) < 0 ||
        ioctl(v->vcpu, KVM_GET_XSAVE2, st->xsave) < 0 ||
        ioctl(v->vcpu, KVM_GET_XCRS, &st->xcrs) < 0)
        return -errno;
    st->msrs->nmsrs = nmsrs;
    for (i = 0; i < nmsrs; i++)
        st->msrs->entries[i].index = msrs[i];
    if (ioctl(v->vcpu, KVM_GET_MSRS, st->msrs) != (int)nmsrs)
        return -EIO;
    if (ioctl(v->vcpu, KVM_GET_DEBUGREGS, &st->dbg) < 0 ||
        ioctl(v->vcpu, KVM_GET_VCPU_EVENTS, &st->ev) < 0 ||
        ioctl(v->vcpu, KVM_GET_MP_STATE, &st->mp) < 0 ||
        ioctl(v->vm, KVM_GET_CLOCK, &st->clock) < 0)
        return -errno;
    st->ev.flags |= KVM_VCPUEVENT_VALID_NMI_PENDING | KVM_VCPUEVENT_VALID_SIPI_VECTOR;
    st->clock.flags = 0;
    return 0;
}

/* Put the state back: 8 vCPU ioctls and the VM's clock. */
static int raw_load(struct raw_vm *v, struct raw_state *st)
{
    if ((st->sregs2 ? ioctl(v->vcpu, KVM_SET_SREGS2, &st->s2) : ioctl(v->vcpu, KVM_SET_SREGS, &st->s)) ||
        ioctl(v->vcpu, KVM_SET_REGS, &st->regs) < 0 ||
        ioctl(v->vcpu, KVM_SET_XSAVE, st->xsave) < 0 ||
        ioctl(v->vcpu, KVM_SET_XCRS, &st->xcrs) < 0)
        return -errno;
    if (ioctl(v->vcpu, KVM_SET_MSRS, st->msrs) != (int)st->msrs->nmsrs)
        return -EIO;
    if (ioctl(v->vcpu, KVM_SET_DEBUGREGS, &st->dbg) < 0 ||
        ioctl(v->vcpu, KVM_SET_VCPU_EVENTS, &st->ev) < 0 ||
        ioctl(v->vcpu, KVM_SET_MP_STATE, &st->mp) < 0 ||
        ioctl(v->vm, KVM_SET_CLOCK, &st->clock) < 0)
        return -errno;
    return 0;
}

/* Run until the first exit that is not HLT; 0 if it is an I/O exit, else -EPROTO. */
static int raw_run_to_io(struct raw_vm *v)
{
    for (;;) {
        if (ioctl(v->vcpu, KVM_RUN, 0) < 0)
            return -errno;
        if (v->run->exit_reason == KVM_EXIT_HLT)
            continue;
        return v->run->exit_reason == KVM_EXIT_IO ? 0 : -EPROTO;
    }
}
#endif

int pykvm_raw_reset(const char *dev, int mode, const uint8_t *code, uint32_t code_len,
                    uint64_t ram_size, const uint32_t *msrs, uint32_t nmsrs, uint32_t n,
                    int64_t *ns, int64_t *out)
{
#ifdef __x86_64__
    struct raw_vm v;
    struct raw_state st;
    struct kvm_userspace_memory_region region;
    struct kvm_dirty_log log;
    uint64_t *bitmap, pages = ram_size / 4096, words = (pages + 63) / 64, copied = 0, w;
    uint8_t *base;
    uint32_t i;
    int kvm, r;

    memset(&st, 0, sizeof(st));
    kvm = open(dev, O_RDWR | O_CLOEXEC);
    if (kvm < 0)
        return -errno;
    r = raw_create_ring(&v, kvm, ram_size, code, code_len, NULL, 1,
                        mode == PYKVM_RAW_RESET_RING ? 1 << 16 : 0);
    if (r < 0) {
        close(kvm);
        return r;
    }
    if (mode == PYKVM_RAW_RESET_LOG_MANUAL) {
        struct kvm_enable_cap cap;
        memset(&cap, 0, sizeof(cap));
        cap.cap = KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2;
        cap.args[0] = KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE;
        if (ioctl(v.vm, KVM_ENABLE_CAP, &cap) < 0) {
            r = -errno;
            raw_destroy(&v);
            close(kvm);
            return r;
        }
    }
    base = malloc(ram_size);
    bitmap = calloc(words ? words : 1, 8);
    if (!base || !bitmap) {
        r = -ENOMEM;
        goto out;
    }
    memset(&region, 0, sizeof(region));
    region.flags = KVM_MEM_LOG_DIRTY_PAGES;
    region.memory_size = ram_size;
    region.userspace_addr = (uint64_t)(uintptr_t)v.ram;
    if (mode != PYKVM_RAW_RESET_RING &&
        ioctl(v.vm, KVM_SET_USER_MEMORY_REGION, &region) < 0) {
        r = -errno;
        goto out;
    }
    r = raw_save(&v, &st, kvm, msrs, nmsrs);
    if (r < 0)
        goto out;
    memcpy(base, v.ram, ram_size);
    memset(&log, 0, sizeof(log));
    log.dirty_bitmap = bitmap;
    if (mode != PYKVM_RAW_RESET_RING &&
        ioctl(v.vm, KVM_GET_DIRTY_LOG, &log) < 0) {     /* start from an empty log */
        r = -errno;
        goto out;
    }
    for (i = 0; i < n; i++) {
        int64_t t0, t1;
        r = raw_run_to_io(&v);
        if (r < 0)
            break;
        t0 = clock_ns(CLOCK_MONOTONIC);
        v.run->immediate_exit = 1;                      /* complete the OUT KVM waits on */
        if (ioctl(v.vcpu, KVM_RUN, 0) == 0 || errno != EINTR) {
            r = -EPROTO;
            break;
        }
        v.run->immediate_exit = 0;
        if (mode == PYKVM_RAW_RESET_RING) {
            /* harvest: each entry KVM marked dirty names a page; mark it for reset */
            memset(bitmap, 0, words * 8);
            while (v.ring[v.ring_idx % v.ring_n].flags & KVM_DIRTY_GFN_F_DIRTY) {
                struct kvm_dirty_gfn *g = &v.ring[v.ring_idx % v.ring_n];
                if (g->slot == 0 && g->offset < pages)
                    bitmap[g->offset / 64] |= 1ULL << (g->offset % 64);
                g->flags = KVM_DIRTY_GFN_F_RESET;
                v.ring_idx++;
            }
            if (ioctl(v.vm, KVM_RESET_DIRTY_RINGS, 0) < 0) {
                r = -errno;
                break;
            }
        } else if (ioctl(v.vm, KVM_GET_DIRTY_LOG, &log) < 0) {
            r = -errno;
            break;
        } else if (mode == PYKVM_RAW_RESET_LOG_MANUAL) {
            struct kvm_clear_dirty_log clear;
            memset(&clear, 0, sizeof(clear));
            clear.num_pages = (uint32_t)pages;
            clear.dirty_bitmap = bitmap;
            if (ioctl(v.vm, KVM_CLEAR_DIRTY_LOG, &clear) < 0) {
                r = -errno;
                break;
            }
        }
        for (w = 0; w < words; w++) {
            uint64_t b = bitmap[w];
            while (b) {
                uint64_t p = w * 64 + (uint64_t)__builtin_ctzll(b);
                b &= b - 1;
                if (p < pages) {
                    memcpy(v.ram + p * 4096, base + p * 4096, 4096);
                    copied++;
                }
            }
        }
        r = raw_load(&v, &st);
        t1 = clock_ns(CLOCK_MONOTONIC);
        if (r < 0)
            break;
        ns[i] = t1 - t0;
    }
    if (r == 0 && memcmp(base, v.ram, ram_size) != 0)
        r = -EIO;                                       /* a reset that lost a page */
    out[0] = (int64_t)copied;
    out[1] = mode == PYKVM_RAW_RESET_LOG_MANUAL ? 12 : 11;   /* ioctls per reset (above) */
    out[2] = i;
out:
    free(base);
    free(bitmap);
    free(st.xsave);
    free(st.msrs);
    raw_destroy(&v);
    close(kvm);
    return r;
#else
    return -ENOTSUP;
#endif
}

/* Destroy the VM and make it again to the same point (raw_create(): VM, slot, code, vCPU,
 * registers), `n` times after running the guest to its exit each time; ns[i]: the wall time
 * of destroy + create. */
int pykvm_raw_recreate(const char *dev, const uint8_t *code, uint32_t code_len,
                       uint64_t ram_size, uint32_t n, int64_t *ns)
{
#ifdef __x86_64__
    struct raw_vm v;
    uint32_t i;
    int kvm, r;

    kvm = open(dev, O_RDWR | O_CLOEXEC);
    if (kvm < 0)
        return -errno;
    r = raw_create(&v, kvm, ram_size, code, code_len, NULL, 1);
    for (i = 0; r == 0 && i < n; i++) {
        int64_t t0, t1;
        r = raw_run_to_io(&v);
        if (r < 0) {
            raw_destroy(&v);
            break;
        }
        t0 = clock_ns(CLOCK_MONOTONIC);
        raw_destroy(&v);
        r = raw_create(&v, kvm, ram_size, code, code_len, NULL, 1);
        t1 = clock_ns(CLOCK_MONOTONIC);
        ns[i] = t1 - t0;
    }
    if (r == 0)
        raw_destroy(&v);
    close(kvm);
    return r;
#else
    return -ENOTSUP;
#endif
}
