/*
 * pc_s3: ACPI S3 sleep through PM1a_CNT and resume at the FACS firmware
 * waking vector (real mode), as an OS does it.
 *
 * params[0] = 1: arm an RTC alarm (any second) and PM1 RTC_EN first, so that
 * the RTC wakes the machine.
 *
 * SYNC(1, FACS address, waking vector read back, PM1a_CNT port, PM1a_EVT
 *      port, RTC alarm armed)
 * -- sleep: write SLP_TYP 1 | SLP_EN (0x2400) to PM1a_CNT --
 * the resume code (copied to 0x8000, in real mode) reports SYNC(2, PM1_STS,
 * CS, machine status word, 0x53335353) through a report prepared at 0x8800,
 * then writes 0x53 to isa-debug-exit.
 */
#include "pc.h"

#define RESUME_ADDR 0x8000u
#define REPORT_ADDR 0x8800u

extern char s3_resume_start[], s3_resume_end[];

__asm__(
	".pushsection .text\n"
	".code16\n"
	".globl s3_resume_start\n"
	"s3_resume_start:\n"
	"	cli\n"
	"	xorw %ax, %ax\n"
	"	movw %ax, %ds\n"
	"	movw $0x600, %dx\n"		/* patched: PM1a_EVT */
	"pm1_port = . - 2\n"
	"	inw %dx, %ax\n"
	"	movw %ax, 0x8818\n"		/* args[1] = PM1_STS */
	"	movw %cs, %ax\n"
	"	movw %ax, 0x8820\n"		/* args[2] = CS */
	"	smsw %ax\n"
	"	movw %ax, 0x8828\n"		/* args[3] = MSW */
	"	movl $0x8800, %eax\n"
	"	movw $0x1000, %dx\n"
	"	outl %eax, %dx\n"		/* SYNC report */
	"	movb $0x53, %al\n"
	"	outb %al, $0xf4\n"		/* isa-debug-exit */
	"1:	hlt\n"
	"	jmp 1b\n"
	".globl s3_resume_end\n"
	"s3_resume_end:\n"
	".code64\n"
	".popsection\n");

struct report {
	uint64_t cmd, nargs, args[8];
};

void guest_main(void)
{
	struct acpi_header *fadt = acpi_find("FACP");
	volatile uint8_t *dst = (volatile uint8_t *)(uintptr_t)RESUME_ADDR;
	volatile struct report *rep = (volatile struct report *)(uintptr_t)REPORT_ADDR;
	uint32_t *facs;
	uint16_t evt, cnt;
	unsigned i, n = (unsigned)(s3_resume_end - s3_resume_start);
	int alarm = pykvm_params[0] == 1;

	GUEST_ASSERT(fadt != NULL);
	facs = (uint32_t *)(uintptr_t)rd32(fadt, 36);
	evt = (uint16_t)rd32(fadt, 56);
	cnt = (uint16_t)rd32(fadt, 64);
	for (i = 0; i < n; i++)
		dst[i] = (uint8_t)s3_resume_start[i];
	/* the port the resume code reads: after "movw $imm16, %dx" (0xba imm16) */
	for (i = 0; i + 2 < n; i++) {
		if (dst[i] == 0xba && dst[i + 1] == 0x00 && dst[i + 2] == 0x06) {
			dst[i + 1] = (uint8_t)evt;
			dst[i + 2] = (uint8_t)(evt >> 8);
			break;
		}
	}
	rep->cmd = 1;				/* SYNC */
	rep->nargs = 5;
	for (i = 0; i < 8; i++)
		rep->args[i] = 0;
	rep->args[0] = 2;
	rep->args[4] = 0x53335353;

	facs[3] = RESUME_ADDR;			/* Firmware_Waking_Vector */
	if (alarm) {
		outw(evt + 2, 0x0400);		/* PM1_EN.RTC_EN */
		cmos_write(RTC_SECONDS_ALARM, 0xc0);
		cmos_write(RTC_MINUTES_ALARM, 0xc0);
		cmos_write(RTC_HOURS_ALARM, 0xc0);
		cmos_read(RTC_REG_C);
		cmos_write(RTC_REG_B, cmos_read(RTC_REG_B) | RTC_B_AIE);
	}
	GUEST_SYNC(1, (uintptr_t)facs, facs[3], cnt, evt, alarm);
	outw(evt, 0xffff);			/* clear PM1 status */
	outw(cnt, 0x2400);			/* SLP_TYP = 1 (S3), SLP_EN */
	for (;;)
		GUEST_ASSERT_MSG(0, "still running after the S3 write");
}
