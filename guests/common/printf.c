/*
 * A small vsnprintf for guests.
 *
 * Conversions: %s %c %d %i %u %x %X %p %%, length modifiers l, ll, z (and h,
 * hh, accepted and honoured by truncation), flags '-' and '0', a decimal
 * field width.  No floating point, and no 64-bit division: 32-bit builds
 * have no libgcc, so numbers are converted with a shift-and-subtract loop.
 */
#include "pykvm_guest.h"

size_t pykvm_strlen(const char *s)
{
	size_t n = 0;

	while (s[n])
		n++;
	return n;
}

struct out {
	char *buf;
	size_t size;
	size_t pos;	/* characters produced so far, even past the end */
};

static void put(struct out *o, char c)
{
	if (o->pos + 1 < o->size)
		o->buf[o->pos] = c;
	o->pos++;
}

/* v / base, remainder in *rem; base is 10 or 16 */
static uint64_t divmod(uint64_t v, unsigned int base, unsigned int *rem)
{
	if (base == 16) {
		*rem = (unsigned int)(v & 0xf);
		return v >> 4;
	}
#if UINTPTR_MAX > 0xffffffffUL && !defined(PYKVM_PRINTF_SOFT_DIV)
	*rem = (unsigned int)(v % base);
	return v / base;
#else
	{
		uint64_t q = 0;
		uint32_t r = 0;
		int i;

		for (i = 63; i >= 0; i--) {
			r = (r << 1) | (uint32_t)((v >> i) & 1);
			if (r >= base) {
				r -= base;
				q |= 1ULL << i;
			}
		}
		*rem = r;
		return q;
	}
#endif
}

static void put_padded(struct out *o, const char *s, size_t len, int width,
		       int left, char pad)
{
	int fill = width > (int)len ? width - (int)len : 0;

	/* zero padding goes after a sign */
	if (!left && pad == '0' && len && *s == '-') {
		put(o, *s++);
		len--;
	}
	if (!left)
		while (fill-- > 0)
			put(o, pad);
	while (len--)
		put(o, *s++);
	if (left)
		while (fill-- > 0)
			put(o, ' ');
}

static void put_number(struct out *o, uint64_t v, int neg, unsigned int base,
		       int upper, int width, int left, char pad)
{
	const char *digits = upper ? "0123456789ABCDEF" : "0123456789abcdef";
	char tmp[24];
	int n = sizeof(tmp);
	unsigned int d;

	do {
		v = divmod(v, base, &d);
		tmp[--n] = digits[d];
	} while (v);
	if (neg)
		tmp[--n] = '-';
	put_padded(o, tmp + n, sizeof(tmp) - n, width, left, pad);
}

int pykvm_vsnprintf(char *buf, size_t size, const char *fmt, va_list ap)
{
	struct out o = { buf, size, 0 };

	while (*fmt) {
		int left = 0, width = 0, lng = 0, sz = 0;
		char pad = ' ';
		char c = *fmt++;

		if (c != '%') {
			put(&o, c);
			continue;
		}
		/* flags */
		for (;; fmt++) {
			if (*fmt == '-')
				left = 1;
			else if (*fmt == '0')
				pad = '0';
			else
				break;
		}
		while (*fmt >= '0' && *fmt <= '9')
			width = width * 10 + (*fmt++ - '0');
		/* length */
		for (;; fmt++) {
			if (*fmt == 'l')
				lng++;
			else if (*fmt == 'z')
				lng = sizeof(size_t) == 8 ? 2 : 0;
			else if (*fmt == 'h')
				sz--;
			else
				break;
		}
		c = *fmt;
		if (!c)
			break;
		fmt++;
		switch (c) {
		case 'd':
		case 'i': {
			int64_t v;

			if (lng >= 2)
				v = va_arg(ap, long long);
			else if (lng == 1)
				v = va_arg(ap, long);
			else
				v = va_arg(ap, int);
			if (sz == -1)
				v = (short)v;
			else if (sz <= -2)
				v = (signed char)v;
			put_number(&o, v < 0 ? (uint64_t)0 - (uint64_t)v : (uint64_t)v,
				   v < 0, 10, 0, width, left, pad);
			break;
		}
		case 'u':
		case 'x':
		case 'X': {
			uint64_t v;

			if (lng >= 2)
				v = va_arg(ap, unsigned long long);
			else if (lng == 1)
				v = va_arg(ap, unsigned long);
			else
				v = va_arg(ap, unsigned int);
			if (sz == -1)
				v = (uint16_t)v;
			else if (sz <= -2)
				v = (uint8_t)v;
			put_number(&o, v, 0, c == 'u' ? 10 : 16, c == 'X', width,
				   left, pad);
			break;
		}
		case 'p':
			put(&o, '0');
			put(&o, 'x');
			put_number(&o, (uint64_t)(uintptr_t)va_arg(ap, void *), 0, 16,
				   0, width, left, pad);
			break;
		case 'c': {
			char ch = (char)va_arg(ap, int);

			put_padded(&o, &ch, 1, width, left, ' ');
			break;
		}
		case 's': {
			const char *s = va_arg(ap, const char *);

			if (!s)
				s = "(null)";
			put_padded(&o, s, pykvm_strlen(s), width, left, ' ');
			break;
		}
		case '%':
			put(&o, '%');
			break;
		default:	/* unknown: echo it */
			put(&o, '%');
			put(&o, c);
			break;
		}
	}
	if (size)
		buf[o.pos < size ? o.pos : size - 1] = '\0';
	return (int)o.pos;
}

int pykvm_snprintf(char *buf, size_t size, const char *fmt, ...)
{
	va_list ap;
	int n;

	va_start(ap, fmt);
	n = pykvm_vsnprintf(buf, size, fmt, ap);
	va_end(ap);
	return n;
}
