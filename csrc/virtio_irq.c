/*
 * A virtio-mmio transport's interrupt state in C (virtio 1.2 section 4.2.2: InterruptStatus,
 * InterruptACK; section 4.2.3.4: one level-triggered line). The handle is shared by three
 * kinds of thread:
 *
 *  - vCPU threads in the C run loop (runloop.c: serve_vmmio_irq), which answer a 32-bit read of
 *    InterruptStatus and take a 32-bit write of InterruptACK without returning to Python;
 *  - a device's C worker (virtio_blk.c), which sets the used-buffer bit and raises the line;
 *  - Python (pykvm/devices/virtio/mmio.py), for configuration changes, DEVICE_NEEDS_RESET,
 *    the Python devices' used-buffer interrupts, the registers read through the bus, and reset.
 *
 * One mutex orders every change of the status and of the line, so the line is high exactly
 * while the status is not 0 and KVM sees the levels in the order the status took them.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <linux/kvm.h>

#include "pykvm_native.h"

struct vmmio_irq {
	uint64_t base;                   /* must stay first: the run loop reads it through vmmio[] */
	pthread_mutex_t lock;
	int32_t vm_fd;
	uint32_t gsi;
	uint32_t status;
	uint32_t level;
	uint64_t raised;
	uint64_t served;
	int32_t last_errno;
};

void *pykvm_vmmio_new(uint64_t base, int32_t vm_fd, uint32_t gsi)
{
	struct vmmio_irq *c = calloc(1, sizeof(*c));

	if (!c)
		return NULL;
	c->base = base;
	c->vm_fd = vm_fd;
	c->gsi = gsi;
	pthread_mutex_init(&c->lock, NULL);
	return c;
}

/* With the lock held: drive the line to what the status says. Returns 0 or the errno of a
 * refused KVM_IRQ_LINE (the VM is closing); the level is then left as it was. */
static int update_line(struct vmmio_irq *c)
{
	struct kvm_irq_level irq;
	uint32_t level = c->status ? 1 : 0;

	if (level == c->level)
		return 0;
	irq.irq = c->gsi;
	irq.level = level;
	while (ioctl(c->vm_fd, KVM_IRQ_LINE, &irq) < 0) {
		if (errno == EINTR)
			continue;
		c->last_errno = errno;
		return errno;
	}
	c->level = level;
	if (level)
		c->raised++;
	return 0;
}

int pykvm_vmmio_signal(void *h, uint32_t bits)
{
	struct vmmio_irq *c = h;
	int r;

	pthread_mutex_lock(&c->lock);
	c->status |= bits & 3;           /* bit 0: used buffers, bit 1: configuration change */
	r = update_line(c);
	pthread_mutex_unlock(&c->lock);
	return r;
}

int pykvm_vmmio_ack(void *h, uint32_t bits)
{
	struct vmmio_irq *c = h;
	int r;

	pthread_mutex_lock(&c->lock);
	c->status &= ~bits;
	r = update_line(c);
	pthread_mutex_unlock(&c->lock);
	return r;
}

void pykvm_vmmio_get(void *h, struct pykvm_vmmio_counts *out)
{
	struct vmmio_irq *c = h;

	pthread_mutex_lock(&c->lock);
	out->status = c->status;
	out->level = c->level;
	out->raised = c->raised;
	out->served = __atomic_load_n(&c->served, __ATOMIC_RELAXED);
	out->last_errno = c->last_errno;
	pthread_mutex_unlock(&c->lock);
}

void pykvm_vmmio_free(void *h)
{
	struct vmmio_irq *c = h;

	if (!c)
		return;
	pthread_mutex_destroy(&c->lock);
	free(c);
}

/* runloop.c's part: a KVM_EXIT_MMIO at one of the loop's windows' InterruptStatus (a 4-byte
 * read) or InterruptACK (a 4-byte write). Returns 1 when served, 0 when the access is not one
 * of those (it goes on to Python, which serves every other register and width). */
int pykvm_vmmio_serve(const uint64_t *handles, uint32_t n, struct kvm_run *run)
{
	uint64_t addr = run->mmio.phys_addr;
	uint32_t i;

	if (run->mmio.len != 4)
		return 0;
	for (i = 0; i < n && i < PYKVM_MAX_VMMIO; i++) {
		struct vmmio_irq *c = (struct vmmio_irq *)(uintptr_t)handles[i];
		uint64_t off;

		if (!c || addr < c->base)
			continue;
		off = addr - c->base;
		if (off == PYKVM_VMMIO_INTERRUPT_STATUS && !run->mmio.is_write) {
			uint32_t v;

			pthread_mutex_lock(&c->lock);
			v = c->status;
			pthread_mutex_unlock(&c->lock);
			memset(run->mmio.data, 0, sizeof(run->mmio.data));
			memcpy(run->mmio.data, &v, 4);       /* little-endian hosts: x86_64, riscv64 */
		} else if (off == PYKVM_VMMIO_INTERRUPT_ACK && run->mmio.is_write) {
			uint32_t v;

			memcpy(&v, run->mmio.data, 4);
			pykvm_vmmio_ack(c, v);
		} else {
			continue;
		}
		__atomic_add_fetch(&c->served, 1, __ATOMIC_RELAXED);
		return 1;
	}
	return 0;
}
