/*
 * virtio-blk's request queue served off the GIL (issue 19): one worker thread per queue waits on
 * the queue's ioeventfd (KVM_IOEVENTFD on the virtio-pci notify address), takes the chains the
 * driver made available with the checks of pykvm/devices/virtio/queue.py, does the request with
 * preadv/pwritev/fdatasync/fallocate straight on the host views of guest RAM (as blk.py does),
 * returns the chain through the used ring and signals the queue's MSI-X vector with
 * KVM_SIGNAL_MSI while Python says the vector may be used directly. Everything else goes back to
 * Python through pykvm_blk_wait_events(): an interrupt Python must send itself (a masked vector,
 * no MSI-X, an IOMMU in the way) and a ring that broke a rule (Python sets
 * DEVICE_NEEDS_RESET). The ring logic mirrors queue.py line for line; see there for the rules.
 *
 * Lifetime: pykvm_blk_start() -> worker runs -> pykvm_blk_stop() (joins it, deassigns the
 * ioeventfd; no access to guest memory after it returns) -> the events thread sees
 * PYKVM_BLK_EV_QUIT and calls pykvm_blk_free().
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/uio.h>
#include <unistd.h>
#include <linux/kvm.h>

#include "pykvm_native.h"

#define DESC_F_NEXT 1
#define DESC_F_WRITE 2
#define DESC_F_INDIRECT 4
#define AVAIL_F_NO_INTERRUPT 1
#define USED_F_NO_NOTIFY 1
#define F_FLUSH 9
#define F_DISCARD 13
#define F_WRITE_ZEROES 14
#define T_IN 0
#define T_OUT 1
#define T_FLUSH 4
#define T_GET_ID 8
#define T_DISCARD 11
#define T_WRITE_ZEROES 13
#define S_OK 0
#define S_IOERR 1
#define S_UNSUPP 2
#define SECTOR 512u
#define MAX_RANGE_SECTORS ((1u << 30) / SECTOR)
#define MAX_RANGE_SEGS 32u
#define IOVMAX 1024

struct seg { uint64_t gpa; uint32_t len; };

struct blk {
	struct pykvm_blk_cfg c;
	int notify_fd, event_fd;
	int stopping;                    /* set before the stop's write to notify_fd */
	int ioeventfd_len;               /* the length it was registered with */
	pthread_t thread;
	int running;
	pthread_mutex_t lock;            /* msi, events */
	uint64_t msi_addr;
	uint32_t msi_data;
	int msi_direct;
	uint32_t events;                 /* PYKVM_BLK_EV_* waiting for Python */
	int stopped;
	/* queue state (the worker's alone while it runs) */
	uint16_t last_avail, used_idx, signalled;
	int notify_on;
	int broken;
	char why[160];
	struct seg *rd, *wr;             /* a chain's buffers */
	uint32_t nrd, nwr, cap;
	uint64_t rd_len, wr_len;
	struct iovec *iov;
	uint32_t iov_cap;
	uint64_t requests, direct_msis, python_irqs, direct_lines;
};

/* ---- guest memory ---------------------------------------------------------------------- */
static uint8_t *host_of(struct blk *b, uint64_t gpa, uint64_t *room)
{
	uint32_t i;

	for (i = 0; i < b->c.nslots; i++) {
		const struct pykvm_blk_slot *s = &b->c.slots[i];

		if (gpa >= s->gpa && gpa - s->gpa < s->size) {
			*room = s->size - (gpa - s->gpa);
			return (uint8_t *)(uintptr_t)(s->hva + (gpa - s->gpa));
		}
	}
	return NULL;
}

static int in_ram(struct blk *b, uint64_t gpa, uint64_t n)
{
	uint64_t room;

	if (gpa + n < gpa)
		return 0;
	while (n) {
		if (!host_of(b, gpa, &room))
			return 0;
		if (room >= n)
			return 1;
		gpa += room;
		n -= room;
	}
	return 1;
}

static int mem_copy(struct blk *b, uint64_t gpa, void *buf, uint64_t n, int to_guest)
{
	uint8_t *p = buf;
	uint64_t room;

	while (n) {
		uint8_t *h = host_of(b, gpa, &room);
		uint64_t k;

		if (!h)
			return -1;
		k = room < n ? room : n;
		if (to_guest)
			memcpy(h, p, k);
		else
			memcpy(p, h, k);
		p += k;
		gpa += k;
		n -= k;
	}
	return 0;
}

/* u16 ring words: aligned (the rings are), so one access where the slot holds both bytes */
static int rd16(struct blk *b, uint64_t gpa, uint16_t *v)
{
	uint64_t room;
	uint8_t *h = host_of(b, gpa, &room);

	if (h && room >= 2 && !(gpa & 1)) {
		*v = __atomic_load_n((uint16_t *)h, __ATOMIC_ACQUIRE);
		return 0;
	}
	return mem_copy(b, gpa, v, 2, 0);
}

static int wr16(struct blk *b, uint64_t gpa, uint16_t v)
{
	uint64_t room;
	uint8_t *h = host_of(b, gpa, &room);

	if (h && room >= 2 && !(gpa & 1)) {
		__atomic_store_n((uint16_t *)h, v, __ATOMIC_RELEASE);
		return 0;
	}
	return mem_copy(b, gpa, &v, 2, 1);
}

static void mb(void)
{
	__atomic_thread_fence(__ATOMIC_SEQ_CST);
}

/* ---- the split virtqueue (queue.py) ------------------------------------------------------ */
__attribute__((format(printf, 2, 3)))
static int fail(struct blk *b, const char *fmt, ...)
{
	va_list ap;
	int n = snprintf(b->why, sizeof(b->why), "queue 0: ");

	va_start(ap, fmt);
	vsnprintf(b->why + n, sizeof(b->why) - (size_t)n, fmt, ap);
	va_end(ap);
	b->broken = 1;
	return -1;
}

static int pending(struct blk *b, uint32_t *n)
{
	uint16_t idx;

	if (rd16(b, b->c.avail + 2, &idx))
		return fail(b, "available ring: not in guest RAM");
	*n = (uint16_t)(idx - b->last_avail);
	if (*n > b->c.qsize)
		return fail(b, "available index %u is %u entries ahead of %u, more than the queue "
			    "size %u", idx, *n, b->last_avail, b->c.qsize);
	return 0;
}

static int publish_avail_event(struct blk *b)
{
	if (wr16(b, b->c.used + 4 + 8ull * b->c.qsize, b->last_avail))
		return fail(b, "used ring: not in guest RAM");
	return 0;
}

static int add_seg(struct blk *b, int write, uint64_t gpa, uint32_t len)
{
	struct seg **v = write ? &b->wr : &b->rd;
	uint32_t *n = write ? &b->nwr : &b->nrd;

	(*v)[*n].gpa = gpa;
	(*v)[*n].len = len;
	(*n)++;
	return 0;
}

static int walk(struct blk *b, uint16_t head)
{
	uint32_t size = b->c.qsize, walked = 0, count = size, i = head;
	uint64_t table = b->c.desc, total = 0;
	int in_indirect = 0;

	b->nrd = b->nwr = 0;
	b->rd_len = b->wr_len = 0;
	if (head >= size)
		return fail(b, "available ring entry names descriptor %u, past the table of %u",
			    head, size);
	for (;;) {
		struct { uint64_t addr; uint32_t len; uint16_t flags, next; } d;

		if (++walked > size)
			return fail(b, "chain at %u is longer than the queue size %u (a loop?)", head,
				    size);
		if (mem_copy(b, table + 16ull * i, &d, 16, 0))
			return fail(b, "descriptor table: not in guest RAM");
		if (d.flags & DESC_F_INDIRECT) {
			if (in_indirect)
				return fail(b, "chain at %u: an indirect table inside an indirect table",
					    head);
			if (!b->c.indirect)
				return fail(b, "chain at %u: an indirect descriptor without "
					    "VIRTIO_F_INDIRECT_DESC", head);
			if (d.flags & DESC_F_NEXT)
				return fail(b, "chain at %u: INDIRECT together with NEXT", head);
			if (d.len == 0 || d.len % 16)
				return fail(b, "chain at %u: indirect table of %u bytes (not a positive "
					    "multiple of 16)", head, d.len);
			if (d.len / 16 > size)
				return fail(b, "chain at %u: indirect table of %u descriptors, more than "
					    "the queue size %u", head, d.len / 16, size);
			if (!in_ram(b, d.addr, d.len))
				return fail(b, "chain at %u: indirect table %#llx+%#x is not in guest RAM",
					    head, (unsigned long long)d.addr, d.len);
			table = d.addr;
			count = d.len / 16;
			i = 0;
			in_indirect = 1;
			walked--;
			continue;
		}
		if (d.len) {
			if (!in_ram(b, d.addr, d.len))
				return fail(b, "chain at %u: buffer %#llx+%#x is not in guest RAM", head,
					    (unsigned long long)d.addr, d.len);
			total += d.len;
			if (total > 0xFFFFFFFFull)
				return fail(b, "chain at %u: buffer lengths sum past 32 bits", head);
			if (d.flags & DESC_F_WRITE) {
				add_seg(b, 1, d.addr, d.len);
				b->wr_len += d.len;
			} else if (b->nwr) {
				return fail(b, "chain at %u: a device-readable buffer after a "
					    "device-writable one", head);
			} else {
				add_seg(b, 0, d.addr, d.len);
				b->rd_len += d.len;
			}
		} else if (!(d.flags & DESC_F_WRITE) && b->nwr) {
			return fail(b, "chain at %u: a device-readable buffer after a device-writable "
				    "one", head);
		}
		if (!(d.flags & DESC_F_NEXT))
			break;
		if (d.next >= count)
			return fail(b, "chain at %u: next %u is past the %s of %u", head, d.next,
				    in_indirect ? "indirect table" : "descriptor table", count);
		i = d.next;
	}
	return 0;
}

/* 1: a chain was taken (its head in *head), 0: none, -1: broken */
static int pop(struct blk *b, uint16_t *head)
{
	uint32_t n;

	if (pending(b, &n))
		return -1;
	if (n == 0) {
		if (!(b->c.event_idx && b->notify_on))
			return 0;
		if (publish_avail_event(b))
			return -1;
		mb();
		if (pending(b, &n))
			return -1;
		if (n == 0)
			return 0;
	}
	if (rd16(b, b->c.avail + 4 + 2ull * (b->last_avail % b->c.qsize), head))
		return fail(b, "available ring: not in guest RAM");
	if (walk(b, *head))
		return -1;
	b->last_avail++;
	if (b->c.event_idx && b->notify_on && publish_avail_event(b))
		return -1;
	return 1;
}

static int push(struct blk *b, uint16_t head, uint64_t written)
{
	uint32_t e[2];

	if (written > b->wr_len)
		written = b->wr_len;
	e[0] = head;
	e[1] = (uint32_t)written;
	if (mem_copy(b, b->c.used + 4 + 8ull * (b->used_idx % b->c.qsize), e, 8, 1))
		return fail(b, "used ring: not in guest RAM");
	b->used_idx++;
	if (wr16(b, b->c.used + 2, b->used_idx))       /* release: the element first */
		return fail(b, "used ring: not in guest RAM");
	return 0;
}

static int set_notification(struct blk *b, int on)
{
	b->notify_on = on;
	if (b->c.event_idx) {
		if (on && publish_avail_event(b))
			return -1;
	} else {
		uint16_t f;

		if (rd16(b, b->c.used, &f))
			return fail(b, "used ring: not in guest RAM");
		f = on ? (uint16_t)(f & ~USED_F_NO_NOTIFY) : (uint16_t)(f | USED_F_NO_NOTIFY);
		if (wr16(b, b->c.used, f))
			return fail(b, "used ring: not in guest RAM");
	}
	if (on)
		mb();
	return 0;
}

/* 1: interrupt, 0: not, -1: broken */
static int needs_interrupt(struct blk *b)
{
	uint16_t old = b->signalled, nw = b->used_idx, v;

	b->signalled = nw;
	if (old == nw)
		return 0;
	mb();
	if (b->c.event_idx) {
		if (rd16(b, b->c.avail + 4 + 2ull * b->c.qsize, &v))
			return fail(b, "available ring: not in guest RAM");
		return (uint16_t)(nw - v - 1) < (uint16_t)(nw - old);
	}
	if (rd16(b, b->c.avail, &v))
		return fail(b, "available ring: not in guest RAM");
	return !(v & AVAIL_F_NO_INTERRUPT);
}

/* ---- requests (blk.py) ---------------------------------------------------------------- */
static int range_ok(struct blk *b, uint64_t sector, uint64_t nbytes)
{
	uint64_t bs = b->c.block_size;

	return nbytes % bs == 0 && sector % (bs / SECTOR) == 0 && sector <= b->c.capacity &&
	       nbytes / SECTOR <= b->c.capacity - sector;
}

/* iovecs over n bytes of segs from byte skip on; -1 if a byte is not RAM */
static int build_iov(struct blk *b, const struct seg *segs, uint32_t nsegs, uint64_t skip,
		     uint64_t n, uint32_t *niov)
{
	uint32_t i, k = 0;

	for (i = 0; i < nsegs && n; i++) {
		uint64_t gpa = segs[i].gpa, len = segs[i].len;

		if (skip >= len) {
			skip -= len;
			continue;
		}
		gpa += skip;
		len -= skip;
		skip = 0;
		if (len > n)
			len = n;
		n -= len;
		while (len) {
			uint64_t room, t;
			uint8_t *h = host_of(b, gpa, &room);

			if (!h)
				return -1;
			if (k == b->iov_cap) {
				uint32_t cap = b->iov_cap ? 2 * b->iov_cap : 64;
				struct iovec *v = realloc(b->iov, cap * sizeof(*v));

				if (!v)
					return -1;
				b->iov = v;
				b->iov_cap = cap;
			}
			t = room < len ? room : len;
			b->iov[k].iov_base = h;
			b->iov[k].iov_len = t;
			k++;
			gpa += t;
			len -= t;
		}
	}
	*niov = k;
	return 0;
}

/* every byte of iov at off; 0 or -1 (errno set) */
static int vectored(struct blk *b, int write, uint32_t niov, uint64_t off)
{
	struct iovec *v = b->iov;

	while (niov) {
		ssize_t done = write ? pwritev(b->c.image_fd, v, niov < IOVMAX ? (int)niov : IOVMAX,
					       (off_t)off)
				     : preadv(b->c.image_fd, v, niov < IOVMAX ? (int)niov : IOVMAX,
					      (off_t)off);
		if (done < 0 && errno == EINTR)
			continue;
		if (done <= 0) {
			if (done == 0)
				errno = EIO;
			return -1;
		}
		off += (uint64_t)done;
		while (niov && (uint64_t)done >= v->iov_len) {
			done -= (ssize_t)v->iov_len;
			v++;
			niov--;
		}
		if (done) {
			v->iov_base = (uint8_t *)v->iov_base + done;
			v->iov_len -= (size_t)done;
		}
	}
	return 0;
}

static int write_through(struct blk *b)
{
	if (!(b->c.features >> F_FLUSH & 1))
		return fdatasync(b->c.image_fd);
	return 0;
}

static int zero_range(struct blk *b, uint64_t off, uint64_t n, int unmap)
{
	static const uint8_t zeros[65536];
	int modes[2], nm = 0, i;

	if (unmap && b->c.may_unmap)
		modes[nm++] = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE;
	modes[nm++] = FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE;
	for (i = 0; i < nm; i++) {
		if (fallocate(b->c.image_fd, modes[i], (off_t)off, (off_t)n) == 0)
			return 0;
		if (errno != EOPNOTSUPP && errno != ENOSYS && errno != EINVAL && errno != ENODEV)
			return -1;
	}
	while (n) {
		size_t k = n < sizeof(zeros) ? (size_t)n : sizeof(zeros);
		ssize_t done = pwrite(b->c.image_fd, zeros, k, (off_t)off);

		if (done < 0 && errno == EINTR)
			continue;
		if (done <= 0)
			return -1;
		off += (uint64_t)done;
		n -= (uint64_t)done;
	}
	return 0;
}

static int ranges(struct blk *b, uint32_t rtype, uint64_t nbytes)
{
	struct { uint64_t sector; uint32_t count, flags; } s[MAX_RANGE_SEGS];
	uint32_t n, i;

	if (!(b->c.features >> (rtype == T_DISCARD ? F_DISCARD : F_WRITE_ZEROES) & 1))
		return S_UNSUPP;
	if (b->c.readonly)
		return S_IOERR;
	if (nbytes == 0 || nbytes % 16 || nbytes / 16 > MAX_RANGE_SEGS)
		return S_IOERR;
	n = (uint32_t)(nbytes / 16);
	for (i = 0; i < n; i++) {       /* the readable part from byte 16 on */
		uint32_t niov, k;
		uint8_t *dst = (uint8_t *)&s[i];

		if (build_iov(b, b->rd, b->nrd, 16 + 16ull * i, 16, &niov))
			return -2;
		for (k = 0; k < niov; k++) {
			memcpy(dst, b->iov[k].iov_base, b->iov[k].iov_len);
			dst += b->iov[k].iov_len;
		}
	}
	for (i = 0; i < n; i++)
		if (s[i].flags & ~1u || (rtype == T_DISCARD && s[i].flags & 1))
			return S_UNSUPP;
	for (i = 0; i < n; i++)
		if (s[i].count > MAX_RANGE_SECTORS || !range_ok(b, s[i].sector,
								 (uint64_t)s[i].count * SECTOR))
			return S_IOERR;
	for (i = 0; i < n; i++) {
		uint64_t off = s[i].sector * SECTOR, len = (uint64_t)s[i].count * SECTOR;

		if (!len)
			continue;
		if (rtype == T_DISCARD)
			(void)fallocate(b->c.image_fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
					(off_t)off, (off_t)len);
		else if (zero_range(b, off, len, s[i].flags & 1))
			return S_IOERR;
	}
	return write_through(b) ? S_IOERR : S_OK;
}

/* the status and the data bytes written; -2 in *status: guest RAM gone (broken) */
static int request(struct blk *b, uint64_t data_in, uint64_t *data)
{
	struct { uint32_t type, reserved; uint64_t sector; } h;
	uint64_t data_out;
	uint32_t niov, k;

	*data = 0;
	if (b->rd_len < 16 || b->c.image_fd < 0)
		return S_IOERR;
	if (build_iov(b, b->rd, b->nrd, 0, 16, &niov))
		return -2;
	{
		uint8_t *dst = (uint8_t *)&h;

		for (k = 0; k < niov; k++) {
			memcpy(dst, b->iov[k].iov_base, b->iov[k].iov_len);
			dst += b->iov[k].iov_len;
		}
	}
	data_out = b->rd_len - 16;
	switch (h.type) {
	case T_IN:
		if (data_out || !range_ok(b, h.sector, data_in))
			return S_IOERR;
		if (build_iov(b, b->wr, b->nwr, 0, data_in, &niov))
			return -2;
		if (vectored(b, 0, niov, h.sector * SECTOR))
			return S_IOERR;
		*data = data_in;
		return S_OK;
	case T_OUT:
		if (b->c.readonly || data_in || !range_ok(b, h.sector, data_out))
			return S_IOERR;
		if (build_iov(b, b->rd, b->nrd, 16, data_out, &niov))
			return -2;
		if (vectored(b, 1, niov, h.sector * SECTOR) || write_through(b))
			return S_IOERR;
		return S_OK;
	case T_FLUSH:
		return fdatasync(b->c.image_fd) ? S_IOERR : S_OK;
	case T_GET_ID: {
		uint64_t n = data_in < 20 ? data_in : 20, done = 0;
		uint32_t i;

		for (i = 0; i < b->nwr && done < n; i++) {
			uint64_t t = b->wr[i].len < n - done ? b->wr[i].len : n - done;

			if (mem_copy(b, b->wr[i].gpa, b->c.serial + done, t, 1))
				return -2;
			done += t;
		}
		*data = done;
		return S_OK;
	}
	case T_DISCARD:
	case T_WRITE_ZEROES:
		return ranges(b, h.type, data_out);
	}
	return S_UNSUPP;
}

/* serve one chain; the bytes written into its writable part, -1 when broken */
static int64_t serve(struct blk *b, uint16_t head)
{
	uint64_t data, at;
	uint8_t status;
	int st;
	uint32_t i;

	b->requests++;
	if (b->wr_len < 1)
		return 0;
	st = request(b, b->wr_len - 1, &data);
	if (st == -2)
		return fail(b, "request %u: a buffer is not in guest RAM", head);
	status = (uint8_t)st;
	at = b->wr_len - 1;             /* the last writable byte */
	for (i = 0; i < b->nwr; i++) {
		if (at < b->wr[i].len) {
			if (mem_copy(b, b->wr[i].gpa + at, &status, 1, 1))
				return fail(b, "request %u: a buffer is not in guest RAM", head);
			break;
		}
		at -= b->wr[i].len;
	}
	return (int64_t)data + 1;
}

static void post(struct blk *b, uint32_t ev)
{
	uint64_t one = 1;

	pthread_mutex_lock(&b->lock);
	b->events |= ev;
	pthread_mutex_unlock(&b->lock);
	while (write(b->event_fd, &one, 8) < 0 && errno == EINTR)
		;
}

static void interrupt(struct blk *b)
{
	struct kvm_msi m;
	int direct;

	if (b->c.vmmio_irq) {            /* virtio-mmio: InterruptStatus and the line, in C */
		pykvm_vmmio_signal((void *)(uintptr_t)b->c.vmmio_irq, 1);
		b->direct_lines++;
		return;
	}
	memset(&m, 0, sizeof(m));
	pthread_mutex_lock(&b->lock);
	direct = b->msi_direct;
	m.address_lo = (uint32_t)b->msi_addr;
	m.address_hi = (uint32_t)(b->msi_addr >> 32);
	m.data = b->msi_data;
	pthread_mutex_unlock(&b->lock);
	/* KVM answers 0 (no APIC took it) or 1; an error (EINVAL: bits KVM reserves) drops it, as
	 * pc.py's _signal_msi does */
	if (direct) {
		if (ioctl(b->c.vm_fd, KVM_SIGNAL_MSI, &m) >= 0 || errno != EINTR) {
			b->direct_msis++;
			return;
		}
	}
	b->python_irqs++;
	post(b, PYKVM_BLK_EV_IRQ);
}

/* blk.py's VirtioBlk.notify */
static void process(struct blk *b)
{
	uint16_t head;
	int pushed = 0, r;
	int64_t w;

	if (b->broken)
		return;
	for (;;) {
		if (set_notification(b, 0))
			goto broken;
		while ((r = pop(b, &head)) == 1) {
			if ((w = serve(b, head)) < 0 || push(b, head, (uint64_t)w))
				goto broken;
			pushed = 1;
		}
		if (r < 0 || set_notification(b, 1))
			goto broken;
		r = pop(b, &head);
		if (r < 0)
			goto broken;
		if (r == 0)
			break;
		if ((w = serve(b, head)) < 0 || push(b, head, (uint64_t)w))
			goto broken;
		pushed = 1;
	}
	if (pushed) {
		r = needs_interrupt(b);
		if (r < 0)
			goto broken;
		if (r)
			interrupt(b);
	}
	return;
broken:
	post(b, PYKVM_BLK_EV_BROKEN);
}

/* The worker sleeps in a blocking read of the notification eventfd: the driver's notification
 * (KVM_IOEVENTFD), a kick and the stop request (stopping set first) all write it, so each
 * request costs one syscall less than poll() + read() would. */
static void *worker(void *arg)
{
	struct blk *b = arg;
	uint64_t v;

	process(b);                        /* what was made available before the worker began */
	for (;;) {
		ssize_t r = read(b->notify_fd, &v, 8);

		if (__atomic_load_n(&b->stopping, __ATOMIC_ACQUIRE))
			break;
		if (r < 0) {
			if (errno == EINTR || errno == EAGAIN)
				continue;
			break;
		}
		process(b);
	}
	return NULL;
}

/* ---- the interface ---------------------------------------------------------------------- */
static int ioeventfd(struct blk *b, int assign)
{
	struct kvm_ioeventfd e;

	memset(&e, 0, sizeof(e));
	e.addr = b->c.notify_gpa;
	e.len = (uint32_t)b->ioeventfd_len;
	e.fd = b->notify_fd;
	e.flags = assign ? 0 : KVM_IOEVENTFD_FLAG_DEASSIGN;
	return ioctl(b->c.vm_fd, KVM_IOEVENTFD, &e);
}

void *pykvm_blk_start(const struct pykvm_blk_cfg *cfg, char *err, uint32_t errlen)
{
	struct blk *b = calloc(1, sizeof(*b));
	int e;

	if (!b) {
		snprintf(err, errlen, "out of memory");
		return NULL;
	}
	b->c = *cfg;
	if (b->c.nslots > PYKVM_BLK_MAX_SLOTS || !b->c.qsize || b->c.qsize > 32768 ||
	    b->c.qsize & (b->c.qsize - 1) || b->c.block_size < SECTOR) {
		snprintf(err, errlen, "bad configuration");
		free(b);
		return NULL;
	}
	b->last_avail = cfg->last_avail;
	b->used_idx = cfg->used_idx;
	b->signalled = cfg->signalled;
	b->notify_on = cfg->notify_on;
	b->cap = b->c.qsize;
	b->rd = calloc(b->cap, sizeof(*b->rd));
	b->wr = calloc(b->cap, sizeof(*b->wr));
	pthread_mutex_init(&b->lock, NULL);
	b->notify_fd = eventfd(0, EFD_CLOEXEC);          /* blocking: the worker sleeps in read */
	b->event_fd = eventfd(0, EFD_CLOEXEC);
	if (!b->rd || !b->wr || b->notify_fd < 0 || b->event_fd < 0) {
		snprintf(err, errlen, "%s", strerror(errno ? errno : ENOMEM));
		goto out;
	}
	b->ioeventfd_len = 0;              /* any width (KVM_CAP_IOEVENTFD_ANY_LENGTH) */
	if (ioeventfd(b, 1)) {
		b->ioeventfd_len = 2;          /* the width virtio-pci drivers use */
		if (ioeventfd(b, 1)) {
			snprintf(err, errlen, "KVM_IOEVENTFD at %#llx: %s",
				 (unsigned long long)b->c.notify_gpa, strerror(errno));
			goto out;
		}
	}
	e = pthread_create(&b->thread, NULL, worker, b);
	if (e) {
		snprintf(err, errlen, "pthread_create: %s", strerror(e));
		ioeventfd(b, 0);
		goto out;
	}
	b->running = 1;
	return b;
out:
	if (b->notify_fd >= 0)
		close(b->notify_fd);
	if (b->event_fd >= 0)
		close(b->event_fd);
	pthread_mutex_destroy(&b->lock);
	free(b->rd);
	free(b->wr);
	free(b);
	return NULL;
}

void pykvm_blk_set_msi(void *h, uint64_t address, uint32_t data, int direct)
{
	struct blk *b = h;

	pthread_mutex_lock(&b->lock);
	b->msi_addr = address;
	b->msi_data = data;
	b->msi_direct = direct;
	pthread_mutex_unlock(&b->lock);
}

void pykvm_blk_kick(void *h)
{
	struct blk *b = h;
	uint64_t one = 1;

	while (write(b->notify_fd, &one, 8) < 0 && errno == EINTR)
		;
}

void pykvm_blk_stop(void *h, struct pykvm_blk_state *out)
{
	struct blk *b = h;
	uint64_t one = 1;

	if (b->running) {
		__atomic_store_n(&b->stopping, 1, __ATOMIC_RELEASE);
		while (write(b->notify_fd, &one, 8) < 0 && errno == EINTR)
			;
		pthread_join(b->thread, NULL);
		ioeventfd(b, 0);
		b->running = 0;
	}
	out->last_avail = b->last_avail;
	out->used_idx = b->used_idx;
	out->signalled = b->signalled;
	out->notify_on = (uint16_t)b->notify_on;
	out->broken = (uint32_t)b->broken;
	out->requests = b->requests;
	out->direct_msis = b->direct_msis;
	out->python_irqs = b->python_irqs;
	out->direct_lines = b->direct_lines;
	memcpy(out->why, b->why, sizeof(out->why));
	pthread_mutex_lock(&b->lock);
	b->stopped = 1;
	pthread_mutex_unlock(&b->lock);
	while (write(b->event_fd, &one, 8) < 0 && errno == EINTR)
		;
}

uint32_t pykvm_blk_wait_events(void *h)
{
	struct blk *b = h;
	struct pollfd p = { b->event_fd, POLLIN, 0 };
	uint64_t v;
	uint32_t ev;

	for (;;) {
		pthread_mutex_lock(&b->lock);
		ev = b->events | (b->stopped ? PYKVM_BLK_EV_QUIT : 0);
		b->events = 0;
		pthread_mutex_unlock(&b->lock);
		if (ev)
			return ev;
		if (poll(&p, 1, -1) > 0)
			(void)!read(b->event_fd, &v, 8);
	}
}

void pykvm_blk_free(void *h)
{
	struct blk *b = h;

	if (!b || b->running)
		return;
	close(b->notify_fd);
	close(b->event_fd);
	pthread_mutex_destroy(&b->lock);
	free(b->rd);
	free(b->wr);
	free(b->iov);
	free(b);
}
