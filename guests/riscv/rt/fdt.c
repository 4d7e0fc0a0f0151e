/*
 * Just enough of a flattened-devicetree reader to find a property by name:
 * walk the structure block token by token (all fields are big-endian and
 * 4-byte aligned) and compare property names through the strings block.
 */
#include "pykvm_guest.h"
#include "riscv.h"

#define FDT_MAGIC      0xd00dfeedU
#define FDT_BEGIN_NODE 1U
#define FDT_END_NODE   2U
#define FDT_PROP       3U
#define FDT_NOP        4U
#define FDT_END        9U

static uint32_t be32(const void *p)
{
	const uint8_t *b = p;

	return ((uint32_t)b[0] << 24) | ((uint32_t)b[1] << 16) |
	       ((uint32_t)b[2] << 8) | (uint32_t)b[3];
}

static int streq(const char *a, const char *b)
{
	while (*a && *a == *b) {
		a++;
		b++;
	}
	return *a == *b;
}

int fdt_valid(const void *dtb)
{
	return dtb && ((uintptr_t)dtb & 3) == 0 && be32(dtb) == FDT_MAGIC &&
	       be32((const uint8_t *)dtb + 20) >= 16;	/* version */
}

const void *fdt_find_prop(const void *dtb, const char *name, uint32_t *len)
{
	const uint8_t *base = dtb;
	const uint8_t *p, *end;
	const char *strings;

	if (!fdt_valid(dtb))
		return NULL;
	p = base + be32(base + 8);			/* off_dt_struct */
	end = p + be32(base + 36);			/* size_dt_struct */
	strings = (const char *)base + be32(base + 12);	/* off_dt_strings */

	while (p + 4 <= end) {
		uint32_t tok = be32(p);

		p += 4;
		switch (tok) {
		case FDT_BEGIN_NODE:
			while (p < end && *p)
				p++;
			p = (const uint8_t *)(((uintptr_t)p + 1 + 3) & ~(uintptr_t)3);
			break;
		case FDT_PROP: {
			uint32_t plen = be32(p);
			uint32_t nameoff = be32(p + 4);

			p += 8;
			if (streq(strings + nameoff, name)) {
				if (len)
					*len = plen;
				return p;
			}
			p += (plen + 3) & ~3U;
			break;
		}
		case FDT_END_NODE:
		case FDT_NOP:
			break;
		default:	/* FDT_END or garbage */
			return NULL;
		}
	}
	return NULL;
}

static int starts_with(const char *s, const char *prefix)
{
	while (*prefix && *s == *prefix) {
		s++;
		prefix++;
	}
	return *prefix == '\0';
}

const void *fdt_find_node_prop(const void *dtb, const char *node, const char *name,
			       uint32_t *len)
{
	const uint8_t *base = dtb;
	const uint8_t *p, *end;
	const char *strings;
	int depth = 0, in_node = 0;

	if (!fdt_valid(dtb))
		return NULL;
	p = base + be32(base + 8);
	end = p + be32(base + 36);
	strings = (const char *)base + be32(base + 12);

	while (p + 4 <= end) {
		uint32_t tok = be32(p);

		p += 4;
		switch (tok) {
		case FDT_BEGIN_NODE:
			depth++;
			if (!in_node && starts_with((const char *)p, node))
				in_node = depth;
			while (p < end && *p)
				p++;
			p = (const uint8_t *)(((uintptr_t)p + 1 + 3) & ~(uintptr_t)3);
			break;
		case FDT_PROP: {
			uint32_t plen = be32(p);
			uint32_t nameoff = be32(p + 4);

			p += 8;
			if (in_node == depth && streq(strings + nameoff, name)) {
				if (len)
					*len = plen;
				return p;
			}
			p += (plen + 3) & ~3U;
			break;
		}
		case FDT_END_NODE:
			if (in_node == depth)
				return NULL;	/* the node has no such property */
			depth--;
			break;
		case FDT_NOP:
			break;
		default:
			return NULL;
		}
	}
	return NULL;
}

uint64_t fdt_cells(const void *p, uint32_t cells)
{
	const uint8_t *b = p;
	uint64_t v = be32(b);

	if (cells == 2)
		v = (v << 32) | be32(b + 4);
	return v;
}
