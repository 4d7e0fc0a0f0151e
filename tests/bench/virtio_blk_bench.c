/*
 * virtio_blk_bench: N 4 KiB virtio-blk requests at queue depth D, for measuring the host's
 * CPU per request; the same multiboot ELF runs on pykvm's pc machine and under
 * `qemu-system-x86_64 -accel kvm -machine pc -kernel` (SeaBIOS assigns the BARs; the guest
 * finds the device by its id and reads where the BARs are).
 *
 * Command line (multiboot): "n=N d=D op=r|w" (defaults n=1000 d=1 op=r). Requests go to
 * consecutive 4 KiB blocks, wrapping at the disk's capacity. Completions arrive as the MSI-X
 * vector of queue 0; between them the vCPU halts (no spinning, so the host CPU measured is
 * the device's and the exits', not a polling guest's).
 *
 * Interrupts stay off except while waiting (wait_irq).
 *
 * Ends through isa-debug-exit (port 0xf4): code 0 (exit status 1) when every request
 * completed with status OK, else 2 no device, 3 BAR above 4 GiB, 4 FEATURES_OK refused,
 * 5 a request failed, 6 a completion named an unknown request.
 */
#include "virtio.h"

#define VEC_BLK 0x52
#define QSIZE 128
#define MAXD 32
#define BLOCK 4096
#define VIRTIO_BLK_F_FLUSH 9

struct blk_req { uint32_t type, reserved; uint64_t sector; };

static uint8_t ring[VQ_BYTES(QSIZE)] __attribute__((aligned(4096)));
static uint8_t data[MAXD][BLOCK] __attribute__((aligned(4096)));
static struct blk_req hdrs[MAXD];
static volatile uint8_t stats[MAXD];
static struct vq q;
static volatile uint32_t irqs;

/* ---- a 32-bit IDT. Interrupts are taken only inside wait_irq's "sti; hlt", and the
 * handlers leave through wait_irq's end without IRET (this host's KVM cannot emulate a 32-bit
 * IRET): they drop the CPU's frame and jump back with IF clear, as the gate left it. ---- */
struct gate { uint16_t off_lo, sel; uint8_t zero, type; uint16_t off_hi; } __attribute__((packed));
static struct gate idt[256] __attribute__((aligned(8)));
void isr_ignore(void);
void isr_blk(void);
void wait_irq(void);
__asm__(".text\n"
	"wait_irq: sti\n"
	"  hlt\n"
	"  cli\n"
	"wait_back: ret\n"
	"isr_ignore: addl $12, %esp\n"
	"  jmp wait_back\n"
	"isr_blk: addl $12, %esp\n"
	"  incl irqs\n"
	"  movl $0, 0xfee000b0\n"
	"  jmp wait_back\n");

static void set_gate(int v, void (*fn)(void))
{
	uint32_t a = (uint32_t)(uintptr_t)fn;
	uint16_t cs;

	__asm__ volatile("mov %%cs, %0" : "=r"(cs));
	idt[v].off_lo = (uint16_t)a;
	idt[v].sel = cs;
	idt[v].zero = 0;
	idt[v].type = 0x8e;
	idt[v].off_hi = (uint16_t)(a >> 16);
}

static void idt_load(void)
{
	struct { uint16_t limit; uint32_t base; } __attribute__((packed)) d = {
		sizeof(idt) - 1, (uint32_t)(uintptr_t)idt };
	int v;

	for (v = 0; v < 256; v++)
		set_gate(v, isr_ignore);
	set_gate(VEC_BLK, isr_blk);
	__asm__ volatile("lidt %0" : : "m"(d));
}

struct mb_info { uint32_t flags, mem_lower, mem_upper, boot_device, cmdline; };

static uint32_t arg(const char *s, char key, uint32_t dflt)
{
	for (; s && *s; s++) {
		if (s[0] == key && s[1] == '=' && (s[2] >= '0' && s[2] <= '9')) {
			uint32_t v = 0;

			for (s += 2; *s >= '0' && *s <= '9'; s++)
				v = v * 10 + (uint32_t)(*s - '0');
			return v;
		}
		if (s[0] == key && s[1] == '=')
			return (uint32_t)(uint8_t)s[2];
	}
	return dflt;
}

static void fail(uint32_t code)
{
	pykvm_debug_exit(code);
	for (;;)
		__asm__ volatile("cli; hlt");
}

/* Make request slot s available: block `blk` of the disk, read or write. */
static void submit(unsigned s, uint64_t blk, int write)
{
	volatile struct vring_desc *d = &q.desc[3 * s];

	hdrs[s].type = write ? 1 : 0;
	hdrs[s].reserved = 0;
	hdrs[s].sector = blk * (BLOCK / 512);
	stats[s] = 0xee;
	d[0].addr = (uintptr_t)&hdrs[s];
	d[0].len = sizeof(hdrs[s]);
	d[0].flags = VRING_DESC_F_NEXT;
	d[0].next = (uint16_t)(3 * s + 1);
	d[1].addr = (uintptr_t)data[s];
	d[1].len = BLOCK;
	d[1].flags = VRING_DESC_F_NEXT | (write ? 0 : VRING_DESC_F_WRITE);
	d[1].next = (uint16_t)(3 * s + 2);
	d[2].addr = (uintptr_t)&stats[s];
	d[2].len = 1;
	d[2].flags = VRING_DESC_F_WRITE;
	d[2].next = 0;
	vq_add_head(&q, (uint16_t)(3 * s));
}

void guest_main32(uint32_t magic, struct mb_info *mbi)
{
	const char *cmd = (magic == 0x2badb002 && (mbi->flags & 4)) ?
			  (const char *)(uintptr_t)mbi->cmdline : 0;
	uint32_t n = arg(cmd, 'n', 1000), depth = arg(cmd, 'd', 1);
	int write = arg(cmd, 'o', 'r') == 'w';
	uint32_t submitted = 0, done = 0, inflight = 0, free_mask, s;
	uint32_t capacity_blocks, cap64;
	struct vpci p;
	int slot;

	if (depth < 1)
		depth = 1;
	if (depth > MAXD)
		depth = MAXD;
	free_mask = depth == 32 ? 0xffffffffu : (1u << depth) - 1;
	idt_load();
	pc_interrupts_via_ioapic();                 /* 8259s masked, local APIC on */
	slot = vpci_slot_of(0x10421af4);
	if (slot < 0)
		fail(2);
	if (pci_read32(0, slot, 0, 0x10 + 4 * 4) & 4 && pci_read32(0, slot, 0, 0x10 + 4 * 5))
		fail(3);                            /* a 64-bit BAR 4 placed above 4 GiB */
	vpci_find(&p, slot);
	vpci_vector(&p, 0, VEC_BLK);
	if (!(vpci_negotiate(&p, (1ull << VIRTIO_F_VERSION_1) | (1ull << VIRTIO_F_EVENT_IDX) |
				     (1ull << VIRTIO_BLK_F_FLUSH)) & VIRTIO_STATUS_FEATURES_OK))
		fail(4);
	vpci_queue(&p, &q, 0, ring, QSIZE, 0);
	vpci_driver_ok(&p);
	cap64 = *(volatile uint32_t *)(p.devcfg + 4);       /* capacity, high word */
	capacity_blocks = cap64 ? 0x100000u : *(volatile uint32_t *)p.devcfg / (BLOCK / 512);
	if (capacity_blocks == 0)
		fail(2);
	while (done < n) {
		uint16_t old = q.avail_idx;
		int added = 0;

		while (inflight < depth && submitted < n) {
			s = (uint32_t)__builtin_ctz(free_mask);
			free_mask &= ~(1u << s);
			submit(s, submitted % capacity_blocks, write);
			submitted++;
			inflight++;
			added = 1;
		}
		vq_want_interrupt(&q, 1);
		if (added)
			vq_kick(&q, old);
		while (!vq_has_used(&q))
			wait_irq();
		for (;;) {
			uint32_t len;
			int head = vq_get_used(&q, &len);

			if (head < 0)
				break;
			if (head % 3 || (uint32_t)head / 3 >= depth)
				fail(6);
			s = (uint32_t)head / 3;
			if (stats[s] != 0)
				fail(5);
			free_mask |= 1u << s;
			inflight--;
			done++;
		}
	}
	pykvm_debug_exit(0);
	fail(0);
}
