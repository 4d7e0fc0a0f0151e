/*
 * pc_vtd_queue: a guest that hands the VT-d IOMMU (pykvm run --pc-device
 * intel-iommu) its largest invalidation queue, 32768 wait descriptors
 * (IQA.QS 7), each writing its own status word, and learns of completion as
 * VT-d software does (VT-d spec 6.5.2): from the status writes, ICS.IWC and
 * IQH. The IOMMU fetches the queue asynchronously, a bounded batch per IQT
 * write and the rest in the background.
 *
 * SYNC(1, statuses written, IQH, FSTS, ICS, polls) once descriptor 32766's
 *      status is seen after IQT = 32767 (all but the last descriptor)
 * SYNC(2, last status, IQH, ICS) after IQT = 0 (the last one, with IF)
 * SYNC(3, statuses written, IQH, FSTS, polls) after the statuses were
 *      cleared and IQT swept 20 times between 32767 and 0 (the hostile
 *      reproducer), once IQH is back at 0
 */
#include "pc.h"

#define VTD 0xfed90000u
#define FSTS 0x34
#define IQH 0x80
#define IQT 0x88
#define IQA 0x90
#define ICS 0x9c
#define QS 7
#define ENTRIES (256u << QS)
#define ROUNDS 20
#define POLLS 5000000ull

static uint64_t queue[ENTRIES][2] __attribute__((aligned(4096)));
static volatile uint32_t status[ENTRIES];

static void vtd_w32(unsigned r, uint32_t v) { mmio_write32(VTD + r, v); }
static uint32_t vtd_r32(unsigned r) { return mmio_read32(VTD + r); }
static void vtd_w64(unsigned r, uint64_t v) { *(volatile uint64_t *)(uintptr_t)(VTD + r) = v; }
static uint64_t vtd_r64(unsigned r) { return *(volatile uint64_t *)(uintptr_t)(VTD + r); }

static uint32_t written(uint32_t n)
{
	uint32_t i, ok = 0;

	for (i = 0; i < n; i++)
		ok += status[i] == i + 1;
	return ok;
}

void guest_main(void)
{
	uint64_t polls;
	uint32_t i;
	int r;

	for (i = 0; i < ENTRIES; i++) {
		/* wait descriptor: type 5, SW, status data i + 1; IF on the last */
		queue[i][0] = 5 | 1 << 5 | (uint64_t)(i + 1) << 32 |
			      (i == ENTRIES - 1 ? 1 << 4 : 0);
		queue[i][1] = (uintptr_t)&status[i];
		status[i] = 0;
	}
	vtd_w64(IQA, (uintptr_t)queue | QS);
	vtd_w32(0x18, 1u << 26);			/* GCMD.QIE */
	GUEST_ASSERT(vtd_r32(0x1c) & (1u << 26));

	/* 1: all but the last descriptor */
	vtd_w64(IQT, (uint64_t)(ENTRIES - 1) << 4);
	for (polls = 0; polls < POLLS && status[ENTRIES - 2] == 0; polls++)
		__asm__ volatile("pause");
	GUEST_SYNC(1, written(ENTRIES - 1), vtd_r64(IQH), vtd_r32(FSTS),
		   vtd_r32(ICS), polls);

	/* 2: the last one, wrapping the tail to 0 */
	vtd_w64(IQT, 0);
	for (polls = 0; polls < POLLS && status[ENTRIES - 1] == 0; polls++)
		__asm__ volatile("pause");
	GUEST_SYNC(2, status[ENTRIES - 1], vtd_r64(IQH), vtd_r32(ICS));

	/* 3: the reproducer's sweep; IQH only moves forward, so by the time
	 * it is back at 0 every descriptor has been fetched once more */
	for (i = 0; i < ENTRIES; i++)
		status[i] = 0;
	vtd_w32(ICS, 1);				/* W1C IWC */
	for (r = 0; r < ROUNDS; r++) {
		vtd_w64(IQT, (uint64_t)(ENTRIES - 1) << 4);
		vtd_w64(IQT, 0);
	}
	for (polls = 0; polls < POLLS && vtd_r64(IQH) != 0; polls++)
		__asm__ volatile("pause");
	GUEST_SYNC(3, written(ENTRIES), vtd_r64(IQH), vtd_r32(FSTS), polls);
}
