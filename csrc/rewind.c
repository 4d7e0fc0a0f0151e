/*
 * Dirty-page copy-back: the hot part of Machine.reset() (pykvm/rewind.py).
 *
 * A baseline of one RAM slot is kept sparse: a bitmap with one bit per page that held any
 * non-zero byte when the baseline was taken, a rank table (set bits in the bitmap's words
 * before each word) and a store holding those pages one after the other. A page whose bit is
 * clear was all zeros. On reset, KVM's dirty bitmap of the slot (KVM_GET_DIRTY_LOG, and with
 * KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 KVM_CLEAR_DIRTY_LOG of exactly those pages) names the pages
 * the guest wrote; each is copied back from the store, or zeroed. Every page index is checked
 * against the slot's size and every store index against the store's size, so a bitmap with
 * stray bits cannot make this touch memory outside the slot or the store.
 *
 * Before the pages, each vCPU's pending exit is completed (KVM_RUN with immediate_exit); after
 * them, the vCPU and VM state is put back by a list of ioctls the caller prepared (fd,
 * request, argument), issued in order in the same call: one crossing from Python for the
 * whole reset.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <sys/ioctl.h>
#include <unistd.h>
#include <linux/kvm.h>

#include "pykvm_native.h"

#define PM_PRESENT (1ULL << 63)
#define PM_SWAPPED (1ULL << 62)
#define PM_CHUNK 512                     /* pagemap entries read at a time */

static uint64_t slot_pages(const struct pykvm_rewind_slot *s)
{
    return s->page_size ? s->size / s->page_size : 0;
}

static int page_is_zero(const uint8_t *p, uint32_t n)
{
    const uint64_t *w = (const uint64_t *)p;
    uint32_t i;
    uint64_t acc = 0;

    for (i = 0; i < n / 8; i += 8) {
        acc = w[i] | w[i + 1] | w[i + 2] | w[i + 3] | w[i + 4] | w[i + 5] | w[i + 6] | w[i + 7];
        if (acc)
            return 0;
    }
    return 1;
}

/* Mark page `p` of the slot non-zero if it is. */
static void scan_page(struct pykvm_rewind_slot *s, uint64_t p)
{
    uint64_t *bits = (uint64_t *)(uintptr_t)s->nonzero;
    const uint8_t *page = (const uint8_t *)(uintptr_t)(s->host + p * s->page_size);

    if (!page_is_zero(page, s->page_size))
        bits[p / 64] |= 1ULL << (p % 64);
}

int64_t pykvm_rewind_scan(struct pykvm_rewind_slot *s, int pagemap_fd, int memfd)
{
    uint64_t *bits = (uint64_t *)(uintptr_t)s->nonzero;
    uint32_t *rank = (uint32_t *)(uintptr_t)s->rank;
    uint64_t npages = slot_pages(s), words = (npages + 63) / 64, p, w, total = 0;

    if (!npages || s->page_size % 64 || s->size % s->page_size)
        return -EINVAL;
    memset(bits, 0, words * 8);
    if (memfd >= 0) {
        /* a shared slot: only the memfd's data ranges can hold non-zero bytes (shmem keeps
         * holes for pages never written, SEEK_DATA finds what is not a hole) */
        off_t at = 0, end;
        while ((uint64_t)at < s->size) {
            at = lseek(memfd, at, SEEK_DATA);
            if (at < 0)
                break;                       /* ENXIO: no data past `at` */
            end = lseek(memfd, at, SEEK_HOLE);
            if (end < 0 || (uint64_t)end > s->size)
                end = (off_t)s->size;
            for (p = (uint64_t)at / s->page_size; p * s->page_size < (uint64_t)end; p++)
                scan_page(s, p);
            at = end;
        }
    } else if (pagemap_fd >= 0) {
        /* a private anonymous slot: a page neither present nor swapped was never written
         * and reads as zeros; reading it would only map the zero page for nothing */
        uint64_t ent[PM_CHUNK], first = s->host / s->page_size;
        for (p = 0; p < npages; p += PM_CHUNK) {
            uint64_t k, n = npages - p < PM_CHUNK ? npages - p : PM_CHUNK;
            ssize_t got = pread(pagemap_fd, ent, n * 8, (off_t)((first + p) * 8));
            if (got != (ssize_t)(n * 8)) {
                for (k = 0; k < n; k++)      /* unreadable: look at every page */
                    scan_page(s, p + k);
                continue;
            }
            for (k = 0; k < n; k++)
                if (ent[k] & (PM_PRESENT | PM_SWAPPED))
                    scan_page(s, p + k);
        }
    } else {
        for (p = 0; p < npages; p++)
            scan_page(s, p);
    }
    for (w = 0; w < words; w++) {
        rank[w] = (uint32_t)total;
        total += (uint64_t)__builtin_popcountll(bits[w]);
    }
    return (int64_t)total;
}

/* Index in the store of non-zero page `p`, or -1 for a page that was zero at baseline. */
static int64_t store_index(const struct pykvm_rewind_slot *s, uint64_t p)
{
    const uint64_t *bits = (const uint64_t *)(uintptr_t)s->nonzero;
    const uint32_t *rank = (const uint32_t *)(uintptr_t)s->rank;
    uint64_t w = bits[p / 64], bit = 1ULL << (p % 64);

    if (!(w & bit))
        return -1;
    return (int64_t)rank[p / 64] + __builtin_popcountll(w & (bit - 1));
}

int64_t pykvm_rewind_capture(struct pykvm_rewind_slot *s)
{
    const uint64_t *bits = (const uint64_t *)(uintptr_t)s->nonzero;
    uint64_t npages = slot_pages(s), words = (npages + 63) / 64, w, k = 0;

    for (w = 0; w < words; w++) {
        uint64_t b = bits[w];
        while (b) {
            uint64_t p = w * 64 + (uint64_t)__builtin_ctzll(b);
            b &= b - 1;
            if (p >= npages || k >= s->store_pages)
                return -ERANGE;
            memcpy((void *)(uintptr_t)(s->store + k * s->page_size),
                   (const void *)(uintptr_t)(s->host + p * s->page_size), s->page_size);
            k++;
        }
    }
    return (int64_t)k;
}

/* Put page `p` (< the slot's pages) back: from the store, or zeros. 0, or -ERANGE. */
static int copy_page(const struct pykvm_rewind_slot *s, uint64_t p)
{
    void *dst = (void *)(uintptr_t)(s->host + p * s->page_size);
    int64_t i = store_index(s, p);

    if (i < 0)
        memset(dst, 0, s->page_size);
    else if ((uint64_t)i < s->store_pages)
        memcpy(dst, (const void *)(uintptr_t)(s->store + (uint64_t)i * s->page_size),
               s->page_size);
    else
        return -ERANGE;
    return 0;
}

int64_t pykvm_rewind_restore(const struct pykvm_rewind_slot *s, const uint64_t *dirty)
{
    uint64_t npages = slot_pages(s), words = (npages + 63) / 64, w, n = 0;

    for (w = 0; w < words; w++) {
        uint64_t b = dirty[w];
        while (b) {
            uint64_t p = w * 64 + (uint64_t)__builtin_ctzll(b);
            b &= b - 1;
            if (p >= npages)
                break;                       /* bits past the slot's end: none are pages */
            if (copy_page(s, p) < 0)
                return -ERANGE;
            n++;
        }
    }
    return (int64_t)n;
}

/* Harvest every ring: each dirty entry is marked for KVM_RESET_DIRTY_RINGS and, with
 * `slots`, its page is put back (an entry naming another address space, a slot not in
 * `slots` or a page past its end is skipped). Entries are read and released with acquire and
 * release ordering (KVM_CAP_DIRTY_LOG_RING_ACQ_REL). Returns the entries harvested, or
 * -ERANGE; `*copied` counts the pages put back. */
static int64_t harvest(struct pykvm_rewind_ring *rings, uint32_t nrings,
                       const struct pykvm_rewind_slot *slots, uint32_t nslots,
                       int64_t *copied)
{
    uint32_t r, k;
    int64_t n = 0;

    for (r = 0; r < nrings; r++) {
        struct kvm_dirty_gfn *g = (struct kvm_dirty_gfn *)(uintptr_t)rings[r].gfns;
        uint64_t mask = (uint64_t)rings[r].entries - 1;
        if (!g || !rings[r].entries || (rings[r].entries & mask))
            continue;
        for (;;) {
            struct kvm_dirty_gfn *e = &g[rings[r].next & mask];
            uint32_t flags = __atomic_load_n(&e->flags, __ATOMIC_ACQUIRE);
            uint32_t slot = e->slot;
            uint64_t off = e->offset;
            if (flags != KVM_DIRTY_GFN_F_DIRTY)
                break;
            for (k = 0; k < nslots; k++) {
                const struct pykvm_rewind_slot *s = &slots[k];
                if ((slot >> 16) == 0 && (slot & 0xFFFF) == s->slot) {
                    if (off < slot_pages(s)) {
                        if (copy_page(s, off) < 0)
                            return -ERANGE;
                        (*copied)++;
                    }
                    break;
                }
            }
            __atomic_store_n(&e->flags, KVM_DIRTY_GFN_F_RESET, __ATOMIC_RELEASE);
            rings[r].next++;
            n++;
        }
    }
    return n;
}

int64_t pykvm_rewind_ring_drop(int vm_fd, struct pykvm_rewind_ring *rings, uint32_t nrings)
{
    int64_t copied = 0, n = harvest(rings, nrings, NULL, 0, &copied);

    if (n > 0 && ioctl(vm_fd, KVM_RESET_DIRTY_RINGS, 0) < 0)
        return -errno;
    return n;
}

/* Exits KVM completes on the next KVM_RUN (api.rst, "KVM_RUN"): a state loaded over one
 * would be overwritten by the completion. */
static int pending_exit(uint32_t reason)
{
    switch (reason) {
    case KVM_EXIT_IO:
    case KVM_EXIT_MMIO:
    case KVM_EXIT_HYPERCALL:
#ifdef KVM_EXIT_X86_RDMSR
    case KVM_EXIT_X86_RDMSR:
    case KVM_EXIT_X86_WRMSR:
#endif
#ifdef KVM_EXIT_RISCV_SBI
    case KVM_EXIT_RISCV_SBI:
    case KVM_EXIT_RISCV_CSR:
#endif
        return 1;
    }
    return 0;
}

/* Complete the vCPUs' pending exits (`put` entries flagged PYKVM_REWIND_COMPLETE); then
 * either, with `rings`, harvest the dirty rings putting each page back, and
 * KVM_RESET_DIRTY_RINGS; or fetch the dirty bitmap of every slot (and with `manual`, clear
 * exactly those bits again, which write-protects those pages once more) and copy the pages
 * back; the pages the host wrote (`extra`) too; then issue the other ioctls of `put` in
 * order. Returns the pages copied back, or -errno (-ERANGE: a store index out of range) of the
 * first step that failed, named in out_failed: slot i as i, put ioctl j as nslots + j, the
 * rings' harvest as -1, KVM_RESET_DIRTY_RINGS as -2. */
int64_t pykvm_rewind_reset(int vm_fd, struct pykvm_rewind_slot *slots, uint32_t nslots,
                           int manual, struct pykvm_rewind_ring *rings, uint32_t nrings,
                           const struct pykvm_rewind_ioctl *put, uint32_t nput,
                           int32_t *out_failed)
{
    uint32_t i;
    int64_t total = 0, r;

    for (i = 0; i < nput; i++) {
        struct kvm_run *run = (struct kvm_run *)(uintptr_t)put[i].arg;
        if (!(put[i].flags & PYKVM_REWIND_COMPLETE) || !run || !pending_exit(run->exit_reason))
            continue;
        run->immediate_exit = 1;
        r = ioctl(put[i].fd, (unsigned long)put[i].request, 0);
        run->immediate_exit = 0;
        if (r == 0 || errno != EINTR) {
            *out_failed = (int32_t)(nslots + i);
            return r == 0 ? -EPROTO : -errno;      /* KVM_RUN ran the guest: another exit */
        }
        run->exit_reason = KVM_EXIT_INTR;
    }
    if (rings && nrings) {
        /* the dirty ring: O(pages written), whatever the size of RAM */
        r = harvest(rings, nrings, slots, nslots, &total);
        if (r < 0) {
            *out_failed = -1;
            return r;
        }
        if (r > 0 && ioctl(vm_fd, KVM_RESET_DIRTY_RINGS, 0) < 0) {
            *out_failed = -2;
            return -errno;
        }
        for (i = 0; i < nslots; i++) {
            struct pykvm_rewind_slot *s = &slots[i];
            uint64_t *extra = (uint64_t *)(uintptr_t)s->extra;
            if (!extra)
                continue;
            r = pykvm_rewind_restore(s, extra);
            if (r < 0) {
                *out_failed = (int32_t)i;
                return r;
            }
            total += r;
            memset(extra, 0, (slot_pages(s) + 63) / 64 * 8);
            s->extra = 0;
        }
        goto state;
    }
    for (i = 0; i < nslots; i++) {
        struct pykvm_rewind_slot *s = &slots[i];
        uint64_t *dirty = (uint64_t *)(uintptr_t)s->dirty;
        struct kvm_dirty_log log;

        memset(&log, 0, sizeof(log));
        log.slot = s->slot;
        log.dirty_bitmap = dirty;
        if (ioctl(vm_fd, KVM_GET_DIRTY_LOG, &log) < 0)
            goto fail_slot;
        if (manual) {
            struct kvm_clear_dirty_log clear;
            uint64_t w, words = (slot_pages(s) + 63) / 64, any = 0;
            for (w = 0; w < words && !any; w++)
                any = dirty[w];
            if (any) {
                memset(&clear, 0, sizeof(clear));
                clear.slot = s->slot;
                clear.first_page = 0;
                clear.num_pages = (uint32_t)slot_pages(s);
                clear.dirty_bitmap = dirty;
                if (ioctl(vm_fd, KVM_CLEAR_DIRTY_LOG, &clear) < 0)
                    goto fail_slot;
            }
        }
        if (s->extra) {                  /* pages the host wrote: not in KVM's log */
            uint64_t w, words = (slot_pages(s) + 63) / 64;
            uint64_t *extra = (uint64_t *)(uintptr_t)s->extra;
            for (w = 0; w < words; w++) {
                dirty[w] |= extra[w];
                extra[w] = 0;
            }
            s->extra = 0;
        }
        r = pykvm_rewind_restore(s, dirty);
        if (r < 0) {
            *out_failed = (int32_t)i;
            return r;
        }
        total += r;
        continue;
fail_slot:
        *out_failed = (int32_t)i;
        return -errno;
    }
state:
    for (i = 0; i < nput; i++) {
        if (put[i].flags & PYKVM_REWIND_COMPLETE)
            continue;
        r = ioctl(put[i].fd, (unsigned long)put[i].request, (void *)(uintptr_t)put[i].arg);
        if (r < 0 || (put[i].expect >= 0 && r != put[i].expect)) {
            *out_failed = (int32_t)(nslots + i);
            return r < 0 ? -errno : -EIO;
        }
    }
    *out_failed = -1;
    return total;
}
