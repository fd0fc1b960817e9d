/*
 * mptable.c - find and validate the Intel MultiProcessor Specification 1.4
 * table the VMM writes, and extract the enabled processors.
 *
 * This is a test of the VMM's table, so it is strict: both checksums (and
 * the extended table's, if any), known entry types only, entry_count and
 * base table length must agree exactly, exactly one enabled BSP, unique
 * APIC ids.
 * Any problem ends the VM with EXIT_BAD_MPTABLE.
 */
#include "guest.h"

#define MP_ENTRY_PROCESSOR	0
#define MP_ENTRY_BUS		1
#define MP_ENTRY_IOAPIC		2
#define MP_ENTRY_IO_INTR	3
#define MP_ENTRY_LOCAL_INTR	4

#define MP_CPU_ENABLED		0x01
#define MP_CPU_BSP		0x02

struct mp_floating_pointer {
	char signature[4];	/* "_MP_" */
	u32 config_paddr;	/* MP configuration table; 0 = default config */
	u8 length;		/* in 16-byte units (1) */
	u8 spec_rev;		/* 4 = version 1.4 */
	u8 checksum;		/* all bytes sum to 0 */
	u8 feature[5];		/* feature[0] != 0: a default config, no table */
} __packed;

struct mp_config_table {
	char signature[4];	/* "PCMP" */
	u16 base_length;	/* header + base entries, in bytes */
	u8 spec_rev;
	u8 checksum;		/* base_length bytes sum to 0 */
	char oem_id[8];
	char product_id[12];
	u32 oem_table_paddr;
	u16 oem_table_size;
	u16 entry_count;
	u32 lapic_paddr;
	u16 ext_length;		/* extended entries, right after the base table */
	u8 ext_checksum;	/* ext bytes + ext_checksum sum to 0 */
	u8 reserved;
} __packed;

struct mp_processor {
	u8 type;		/* MP_ENTRY_PROCESSOR */
	u8 lapic_id;
	u8 lapic_version;
	u8 flags;		/* MP_CPU_* */
	u32 signature;
	u32 features;
	u32 reserved[2];
} __packed;

_Static_assert(sizeof(struct mp_floating_pointer) == 16, "MP floating pointer size");
_Static_assert(sizeof(struct mp_config_table) == 44, "MP config table header size");
_Static_assert(sizeof(struct mp_processor) == 20, "MP processor entry size");

/* Where the VMM may put the floating pointer (EBDA top and BIOS ROM area). */
static const struct {
	u64 start, end;
} scan_ranges[] = {
	{ 0x9fc00, 0xa0000 },
	{ 0xf0000, 0x100000 },
};

static u8 sum_bytes(const void *p, size_t len)
{
	const u8 *b = p;
	u8 sum = 0;

	while (len--)
		sum += *b++;
	return sum;
}

/* Returns the first valid floating pointer; *bad_seen tells if an invalid one was skipped. */
static const struct mp_floating_pointer *find_floating_pointer(bool *bad_seen)
{
	for (size_t r = 0; r < ARRAY_SIZE(scan_ranges); r++) {
		for (u64 pa = scan_ranges[r].start; pa + 16 <= scan_ranges[r].end; pa += 16) {
			const struct mp_floating_pointer *fp = phys_to_virt(pa);

			if (memcmp(fp->signature, "_MP_", 4) != 0)
				continue;
			if (fp->length == 0 || sum_bytes(fp, fp->length * 16u) != 0) {
				kprintf("apfvm-ref: mptable: bad floating pointer at 0x%lx\n", pa);
				*bad_seen = true;
				continue;
			}
			return fp;
		}
	}
	return NULL;
}

static size_t entry_size(u8 type)
{
	switch (type) {
	case MP_ENTRY_PROCESSOR:
		return sizeof(struct mp_processor);
	case MP_ENTRY_BUS:
	case MP_ENTRY_IOAPIC:
	case MP_ENTRY_IO_INTR:
	case MP_ENTRY_LOCAL_INTR:
		return 8;
	default:
		return 0;	/* unknown: its size (and so the rest of the table) is unknown */
	}
}

void mptable_parse(struct mp_cpus *out)
{
	bool bad_seen = false;
	const struct mp_floating_pointer *fp = find_floating_pointer(&bad_seen);

	if (!fp) {
		if (bad_seen)
			fail(EXIT_BAD_MPTABLE, "mptable: bad floating pointer checksum");
		fail(EXIT_BAD_MPTABLE, "mptable: no floating pointer found");
	}
	if (fp->feature[0] != 0 || fp->config_paddr == 0)
		fail(EXIT_BAD_MPTABLE, "mptable: no configuration table (default config %u)",
		     fp->feature[0]);

	const struct mp_config_table *ct = phys_to_virt(fp->config_paddr);

	if (memcmp(ct->signature, "PCMP", 4) != 0)
		fail(EXIT_BAD_MPTABLE, "mptable: bad config table signature at 0x%x",
		     fp->config_paddr);
	if (ct->base_length < sizeof(*ct))
		fail(EXIT_BAD_MPTABLE, "mptable: config table too short (%u)", ct->base_length);
	if (sum_bytes(ct, ct->base_length) != 0)
		fail(EXIT_BAD_MPTABLE, "mptable: bad config table checksum");
	if (ct->ext_length &&
	    (u8)(sum_bytes((const u8 *)ct + ct->base_length, ct->ext_length) + ct->ext_checksum) != 0)
		fail(EXIT_BAD_MPTABLE, "mptable: bad extended table checksum");

	/*
	 * Walk the base entries by length, as Linux does, and require entry_count
	 * to agree (other OSes, e.g. FreeBSD, walk by entry_count instead).
	 * Collect the enabled CPUs, the BSP first.
	 */
	const u8 *p = (const u8 *)(ct + 1);
	const u8 *end = (const u8 *)ct + ct->base_length;
	u32 nentries = 0, naps = 0, nbsp = 0, bsp_id = 0;
	u32 ap_ids[MAX_CPUS];

	for (; p < end; nentries++) {
		size_t size = entry_size(*p);

		if (size == 0 || size > (size_t)(end - p))
			fail(EXIT_BAD_MPTABLE, "mptable: bad entry %u (type %u, %u bytes left)",
			     nentries, *p, (unsigned)(end - p));
		if (*p == MP_ENTRY_PROCESSOR) {
			const struct mp_processor *cpu = (const void *)p;

			if (cpu->flags & MP_CPU_BSP) {
				if (!(cpu->flags & MP_CPU_ENABLED))
					fail(EXIT_BAD_MPTABLE, "mptable: BSP entry not enabled");
				nbsp++;
				bsp_id = cpu->lapic_id;
			} else if (cpu->flags & MP_CPU_ENABLED) {
				if (naps + 1 >= MAX_CPUS)
					fail(EXIT_BAD_MPTABLE, "mptable: more than %u cpus",
					     MAX_CPUS);
				ap_ids[naps++] = cpu->lapic_id;
			}
		}
		p += size;
	}
	if (nentries != ct->entry_count)
		fail(EXIT_BAD_MPTABLE, "mptable: entry count is %u but the table holds %u entries",
		     ct->entry_count, nentries);
	if (nbsp != 1)
		fail(EXIT_BAD_MPTABLE, "mptable: %u BSP entries", nbsp);

	out->count = naps + 1;
	out->apic_id[0] = bsp_id;
	memcpy(&out->apic_id[1], ap_ids, naps * sizeof(ap_ids[0]));

	/* APIC ids are how CPUs are addressed: they must be unique. */
	for (u32 i = 0; i < out->count; i++) {
		for (u32 j = i + 1; j < out->count; j++) {
			if (out->apic_id[i] == out->apic_id[j])
				fail(EXIT_BAD_MPTABLE, "mptable: apic id %u listed twice",
				     out->apic_id[i]);
		}
	}
}
