/*
 * Report API: builds a struct pykvm_report on the caller's stack and hands
 * it to the host through the arch hook.  Reports live on the stack so that
 * several vCPUs can report at the same time.
 */
#include "pykvm_guest.h"

void pykvm_report(uint64_t cmd, uint64_t nargs, const uint64_t *args)
{
	struct pykvm_report r;
	uint64_t i;

	if (nargs > PYKVM_REPORT_MAX_ARGS)
		nargs = PYKVM_REPORT_MAX_ARGS;
	r.cmd = cmd;
	r.nargs = nargs;
	for (i = 0; i < PYKVM_REPORT_MAX_ARGS; i++)
		r.args[i] = i < nargs ? args[i] : 0;
	pykvm_report_send(&r);
}

void pykvm_sync(uint64_t nargs, const uint64_t *args)
{
	pykvm_report(PYKVM_CMD_SYNC, nargs, args);
}

void pykvm_done(void)
{
	/* A host that resumes after DONE gets DONE again. */
	for (;;) {
		pykvm_report(PYKVM_CMD_DONE, 0, NULL);
		pykvm_arch_stop();
	}
}

void pykvm_print(const char *text, size_t len)
{
	uint64_t a[2];

	a[0] = (uint64_t)(uintptr_t)text;
	a[1] = len;
	pykvm_report(PYKVM_CMD_PRINT, 2, a);
}

int pykvm_printf(const char *fmt, ...)
{
	char buf[256];
	va_list ap;
	int n;

	va_start(ap, fmt);
	n = pykvm_vsnprintf(buf, sizeof(buf), fmt, ap);
	va_end(ap);
	pykvm_print(buf, pykvm_strlen(buf));
	return n;
}

void pykvm_assert_failed(const char *expr, const char *file, uint64_t line,
			 uint64_t flags, uint64_t left, uint64_t right,
			 const char *fmt, ...)
{
	char msg[192];
	uint64_t a[7];

	a[0] = (uint64_t)(uintptr_t)expr;
	a[1] = (uint64_t)(uintptr_t)file;
	a[2] = line;
	a[3] = flags;
	a[4] = left;
	a[5] = right;
	a[6] = 0;
	if (fmt) {
		va_list ap;

		va_start(ap, fmt);
		pykvm_vsnprintf(msg, sizeof(msg), fmt, ap);
		va_end(ap);
		a[6] = (uint64_t)(uintptr_t)msg;
	}
	for (;;) {
		pykvm_report(PYKVM_CMD_ASSERT_FAILED, 7, a);
		pykvm_arch_stop();
	}
}
