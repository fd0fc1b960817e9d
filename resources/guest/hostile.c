/*
 * hostile.c - hostile=<mode>: the guest abuses the async PF ABI on purpose,
 * so that the VMM's tests can show apfvm survives such a guest (it keeps
 * working, or stops with a clear error; it never hangs). Each mode hooks
 * one place of the normal guest side (apf.c) and counts what it did; the
 * `apfvm-ref: hostile {...}` line reports it. Without the word nothing here
 * runs.
 */
#include "guest.h"

struct hostile hostile = {
	.toggles = 10000,
	.toggle_burst = 100,
	.spin_ms = 2000,
};

static u64 apf_en_readback;	/* MSR_KVM_ASYNC_PF_EN read back on the BSP (apf-outside-ram) */

static const char *const mode_names[] = {
	[HOSTILE_NONE] = "none",
	[HOSTILE_APF_OUTSIDE_RAM] = "apf-outside-ram",
	[HOSTILE_NO_ACK] = "no-ack",
	[HOSTILE_NO_EOI] = "no-eoi",
	[HOSTILE_TOGGLE] = "toggle",
	[HOSTILE_CLI_SPIN] = "cli-spin",
	[HOSTILE_MSR_SCRIPT] = "msr-script",
};

static int hex_digit(char ch)
{
	if (ch >= '0' && ch <= '9')
		return ch - '0';
	if (ch >= 'a' && ch <= 'f')
		return ch - 'a' + 10;
	if (ch >= 'A' && ch <= 'F')
		return ch - 'A' + 10;
	return -1;
}

/* msr_ops=: MSR_OP_HEX hex digits per write: the kind byte, then the 64-bit value. */
#define MSR_OP_HEX	18

static bool parse_msr_ops(const char *s, size_t len)
{
	if (len % MSR_OP_HEX || len / MSR_OP_HEX > MAX_MSR_OPS)
		return false;
	for (size_t i = 0; i < len; i++) {
		if (hex_digit(s[i]) < 0)
			return false;
	}
	hostile.msr_nops = (u32)(len / MSR_OP_HEX);
	for (u32 op = 0; op < hostile.msr_nops; op++) {
		const char *p = s + (size_t)op * MSR_OP_HEX;
		u64 v = 0;

		hostile.msr_ops[op].kind = (u8)(hex_digit(p[0]) << 4 | hex_digit(p[1]));
		for (int i = 2; i < MSR_OP_HEX; i++)
			v = v << 4 | (u64)hex_digit(p[i]);
		hostile.msr_ops[op].val = v;
	}
	return true;
}

/* hostile=<mode> and its parameters; false if the word is not one of ours. */
bool hostile_parse_word(const char *w, size_t len)
{
	static const struct {
		const char *name;
		u32 *val;
	} nums[] = {
		{ "toggles=", &hostile.toggles },
		{ "toggle_burst=", &hostile.toggle_burst },
		{ "spin_ms=", &hostile.spin_ms },
	};

	if (str_has_prefix(w, len, "hostile=")) {
		for (u32 m = 1; m < ARRAY_SIZE(mode_names); m++) {
			if (str_equal(w + 8, len - 8, mode_names[m])) {
				hostile.mode = m;
				return true;
			}
		}
		fail(EXIT_BAD_BOOT, "unknown hostile= mode in the command line");
	}
	for (size_t i = 0; i < ARRAY_SIZE(nums); i++) {
		size_t n = strlen(nums[i].name);
		if (str_has_prefix(w, len, nums[i].name)) {
			if (!parse_u32(w + n, len - n, nums[i].val))
				fail(EXIT_BAD_BOOT, "bad %s value in the command line", nums[i].name);
			return true;
		}
	}
	if (str_equal(w, len, "msr_refused=keep")) {
		hostile.msr_keep_refused = true;
		return true;
	}
	if (str_has_prefix(w, len, "msr_ops=")) {
		if (!parse_msr_ops(w + 8, len - 8))
			fail(EXIT_BAD_BOOT, "bad msr_ops= value in the command line (groups of %u "
			     "hex digits, at most %u)", MSR_OP_HEX, MAX_MSR_OPS);
		return true;
	}
	return false;
}

/*
 * apf-outside-ram, instead of enabling async PF: values KVM must refuse or
 * cope with. The last one (an area far beyond RAM) stays: KVM may keep it as
 * the MSR's value even when it raised #GP. The CPU then counts as without
 * async PF (the area is not ours, so nothing to read or acknowledge).
 */
void hostile_apf_enable(struct cpu *c)
{
	const u64 on = KVM_ASYNC_PF_ENABLED | KVM_ASYNC_PF_DELIVERY_AS_INT;
	const u64 area = (u64)(uintptr_t)&c->apf;
	const struct {
		const char *what;
		u64 val;
	} bad[] = {
		{ "outside-ram", 0xfff000000ULL | on },
		{ "reserved-bits-5:4", area | 0x30 | on },
		{ "unaligned", (area + 0x24) | on },
		{ "above-maxphyaddr", (1ULL << 52) | area | on },
		{ "outside-ram", 0xfff000000ULL | on },
	};

	for (size_t i = 0; i < ARRAY_SIZE(bad); i++) {
		int gp = wrmsr_safe(MSR_KVM_ASYNC_PF_EN, bad[i].val);

		c->hst.wrmsr_tried++;
		c->hst.wrmsr_gp += (u64)gp;
		kprintf("apfvm-ref: hostile cpu%u wrmsr 0x%x=0x%lx (%s): %s\n", c->index,
			MSR_KVM_ASYNC_PF_EN, bad[i].val, bad[i].what, gp ? "#GP" : "accepted");
	}
	u64 now = rdmsr(MSR_KVM_ASYNC_PF_EN);
	if (c->index == 0)
		apf_en_readback = now;
	kprintf("apfvm-ref: hostile cpu%u MSR_KVM_ASYNC_PF_EN reads 0x%lx\n", c->index, now);
	c->apf_on = 0;
}

/* no-ack / no-eoi: what the page-ready handler does instead of EOI + ACK. */
void hostile_ready_ack(struct cpu *c)
{
	if (hostile.mode == HOSTILE_NO_EOI) {
		/* The vector stays in service: the LAPIC holds back every later page-ready. */
		c->hst.eois_skipped++;
		c->hst.acks_skipped++;
		return;
	}
	apic_eoi();
	if (hostile.mode == HOSTILE_NO_ACK)
		c->hst.acks_skipped++;
	else if (c->apf_on)
		wrmsr(MSR_KVM_ASYNC_PF_ACK, 1);
}

/* toggle: up to toggle_burst disable + enable pairs; KVM drops the parked fault's completion. */
static void toggle_burst(struct cpu *c)
{
	if (hostile.toggles_claimed >= hostile.toggles)
		return;
	u32 first = atomic_fetch_add(&hostile.toggles_claimed, hostile.toggle_burst);
	if (first >= hostile.toggles)
		return;
	u32 n = hostile.toggles - first;
	if (n > hostile.toggle_burst)
		n = hostile.toggle_burst;
	for (u32 i = 0; i < n; i++) {
		apf_disable(c);
		apf_enable(c);	/* queues a wake-all: it wakes the task just parked */
		c->hst.toggles++;
	}
}

static u64 others_completions(struct cpu *c)
{
	u64 n = 0;

	for (u32 i = 0; i < wl.cpus; i++)
		if (&cpus[i] != c)
			n += cpus[i].st.completions;
	return n;
}

/*
 * cli-spin: once per CPU, with a task parked on a pending fault, spin spin_ms
 * with IF=0. CPU i spins at its (1 + 32 i)-th page-not-present, so that the
 * CPUs spin at different times and the others keep faulting meanwhile.
 */
static void cli_spin(struct cpu *c)
{
	if (c->hst.spins || c->st.pfaults != 1 + 32 * (u64)c->index)
		return;
	c->hst.spins = 1;
	c->hst.parked_during_spin = c->nr_parked;
	kprintf("apfvm-ref: hostile cpu%u spinning with IF=0 for %u ms, %u tasks parked\n",
		c->index, hostile.spin_ms, c->nr_parked);
	u64 others = others_completions(c);
	irq_disable();	/* already off in the #PF handler; the point of the mode */
	u64 t0 = rdtsc(), end = t0 + (u64)hostile.spin_ms * tsc_khz;
	while (rdtsc() < end)
		cpu_relax();
	c->hst.spin_cycles = rdtsc() - t0;
	c->hst.others_completed_during_spin = others_completions(c) - others;
}

/* ---- msr-script: the MSR writes a fuzzer chose, done while faults are pending ---- */

/*
 * Areas the script may point MSR_KVM_ASYNC_PF_EN at: 8 KiB per CPU right
 * after the workload's pages, in the region the VMM pages, so that KVM's
 * writes to an area can hit a page the host does not have.
 */
#define MSR_SCRATCH_SIZE	8192
/* Area addresses below this are moved into the scratch areas; the others are kept. */
#define MSR_SCRATCH_LIMIT	0x80000000ULL
#define APF_EN_ADDR_MASK	0x000fffffffffffc0ULL

/* Where the guest looks while async PF is off: KVM never writes it. */
static struct apf_area apf_off_area;

bool hostile_lenient_tokens(void)
{
	/*
	 * Refused writes leave completions KVM delivers only after a later
	 * enable, for tasks the guest already woke itself: such tokens are
	 * stale, not lost. Data and liveness are still checked.
	 */
	return hostile.mode == HOSTILE_MSR_SCRIPT;
}

static int msr_write(struct cpu *c, u32 msr, u64 val)
{
	int gp = wrmsr_safe(msr, val);

	c->hst.msr_gp += (u64)gp;
	return gp;
}

/* A token no page-ready carries: the guest holds the slot with it. */
#define APF_SLOT_HELD		0xfffffffeu

/*
 * MSR_KVM_ASYNC_PF_INT. A vector >= 32 becomes one of the guest's two
 * page-ready vectors (an interrupt on a vector without a gate would only end
 * the guest); lower ones, and the reserved bits 63:8, are written as they
 * are. KVM takes a vector < 32; it is put back at once, and the slot is held
 * meanwhile (KVM delivers page-ready only into a slot that reads 0): the
 * LAPIC drops vectors < 16, and one such page-ready leaves its token in the
 * slot for good, which stops every later one on this CPU; 16-31 would land
 * on an exception gate.
 */
static void msr_write_int(struct cpu *c, u64 val)
{
	u64 v = val;

	if ((val & 0xff) >= NUM_EXCEPTIONS)
		v = (val & ~0xffULL) | ((val & 1) ? VEC_APF_READY_ALT : VEC_APF_READY);
	c->apf_dirty = 1;
	if (v >> 8 || (v & 0xff) >= NUM_EXCEPTIONS) {
		if (!msr_write(c, MSR_KVM_ASYNC_PF_INT, v) && !(v >> 8))
			c->apf_vector = (u32)(v & 0xff);
		return;
	}
	volatile u32 *slot = &c->apf_area->token;
	bool held = atomic_cmpxchg(slot, 0, APF_SLOT_HELD) == 0;	/* else KVM's token holds it */
	if (!msr_write(c, MSR_KVM_ASYNC_PF_INT, v)) {
		wrmsr(MSR_KVM_ASYNC_PF_INT, c->apf_vector);
		c->hst.int_reverted++;
	}
	if (held) {
		store_release(slot, 0);
		if (c->apf_on)
			wrmsr(MSR_KVM_ASYNC_PF_ACK, 1);	/* KVM looks at its queue again */
	}
}

/*
 * MSR_KVM_ASYNC_PF_EN. The flag and reserved bits (5:0, but SEND_ALWAYS,
 * which this guest cannot take in kernel mode, like Linux) and the bits
 * above MAXPHYADDR are written as they are; an area below 2 GiB (guest RAM
 * here) is moved into this CPU's scratch areas, one above stays (outside RAM).
 */
static void msr_write_en(struct cpu *c, u64 val)
{
	const u64 on = KVM_ASYNC_PF_ENABLED | KVM_ASYNC_PF_DELIVERY_AS_INT;
	u64 addr = val & APF_EN_ADDR_MASK;
	u64 v = val & ~(u64)KVM_ASYNC_PF_SEND_ALWAYS;
	struct apf_area *area = NULL;

	if (addr < MSR_SCRATCH_LIMIT) {
		u64 base = REGION_BASE + (u64)wl.pages * PAGE_SIZE +
			   (u64)c->index * MSR_SCRATCH_SIZE;
		area = phys_to_virt(base + addr % MSR_SCRATCH_SIZE);
		v = (v & ~APF_EN_ADDR_MASK) | (u64)(uintptr_t)area;
	}
	/*
	 * KVM delivers page-ready only into a slot that reads 0, and a token it
	 * wrote into the area being left will not be read (its task is woken by
	 * the wake-all below, or by us): both areas start clean, as in
	 * apf_enable() and apf_disable(). The values are hostile, the
	 * bookkeeping is not.
	 */
	struct apf_area *old = c->apf_area;
	old->flags = 0;
	old->token = 0;
	if (area) {
		area->flags = 0;
		area->token = 0;
	}
	c->apf_dirty = 1;
	int gp = msr_write(c, MSR_KVM_ASYNC_PF_EN, v);
	if (!gp && (v & on) == on && area) {
		/* KVM queues a wake-all: it wakes every task parked here. */
		c->apf_area = area;
		c->apf_on = 1;
		return;
	}
	/*
	 * Refused, or enabled on an area outside what we know: turn async PF off
	 * (EN = 0 is always taken), so that KVM's state is known again. A write
	 * refused for its reserved bits leaves the old set-up working; one
	 * refused for its area leaves the MSR "enabled" on an area KVM cannot
	 * write, and then its completions can never be delivered: a later fault
	 * on such a page makes KVM retry it forever inside KVM_RUN
	 * (kvm_async_pf_repeated_fault), a livelock of this vCPU. EN = 0 drops
	 * the completions and KVM's record of the pending pages.
	 */
	if ((gp && !hostile.msr_keep_refused) || (!gp && (v & on) == on))
		wrmsr(MSR_KVM_ASYNC_PF_EN, 0);
	/* Off now: wake what is parked here, as Linux does; the tasks touch their pages again. */
	c->apf_area = &apf_off_area;
	c->apf_on = 0;
	c->hst.self_wakes += apf_wake_all_parked(c);
}

/* The next write of the script, whichever CPU gets there first (IF=0). */
static void msr_step(struct cpu *c)
{
	if (hostile.msr_next >= hostile.msr_nops)
		return;
	u32 i = atomic_fetch_add(&hostile.msr_next, 1);
	if (i >= hostile.msr_nops)
		return;
	const struct msr_op *op = &hostile.msr_ops[i];

	c->hst.msr_writes++;
	switch (op->kind % 3) {
	case 0:
		msr_write_int(c, op->val);
		break;
	case 1:
		msr_write_en(c, op->val);
		break;
	default:
		msr_write(c, MSR_KVM_ASYNC_PF_ACK, op->val);
		break;
	}
}

/* From the page-not-present path, IF=0, right after the current task was parked. */
void hostile_parked(struct cpu *c)
{
	if (hostile.mode == HOSTILE_TOGGLE)
		toggle_burst(c);
	else if (hostile.mode == HOSTILE_CLI_SPIN)
		cli_spin(c);
	else if (hostile.mode == HOSTILE_MSR_SCRIPT)
		msr_step(c);
}

/* From a task's yield system call (IF=0): the script goes on while async PF is off too. */
void hostile_yield(struct cpu *c)
{
	if (hostile.mode == HOSTILE_MSR_SCRIPT)
		msr_step(c);
}

/*
 * From the idle loop (IF=0), with nothing to run: if the script left this
 * CPU's async PF set-up changed while tasks are parked, set it up properly
 * again; KVM's wake-all then wakes them. Without this a CPU whose parked
 * tasks' completions were dropped would wait forever.
 */
void hostile_idle(struct cpu *c)
{
	if (hostile.mode != HOSTILE_MSR_SCRIPT || !c->apf_dirty || !c->nr_parked || !wl.apf)
		return;
	apf_enable(c);
	c->hst.restores++;
}

/* `apfvm-ref: hostile {json}`, before the result line. */
void hostile_report(u32 ncpus)
{
	struct hostile_stats t = { 0 };

	for (u32 i = 0; i < ncpus; i++) {
		struct hostile_stats *s = &cpus[i].hst;

		t.wrmsr_tried += s->wrmsr_tried;
		t.wrmsr_gp += s->wrmsr_gp;
		t.acks_skipped += s->acks_skipped;
		t.eois_skipped += s->eois_skipped;
		t.toggles += s->toggles;
		t.spins += s->spins;
		t.spin_cycles += s->spin_cycles;
		t.parked_during_spin += s->parked_during_spin;
		t.others_completed_during_spin += s->others_completed_during_spin;
		t.msr_writes += s->msr_writes;
		t.msr_gp += s->msr_gp;
		t.int_reverted += s->int_reverted;
		t.self_wakes += s->self_wakes;
		t.restores += s->restores;
		t.dummies_dropped += s->dummies_dropped;
	}
	kprintf("apfvm-ref: hostile {\"mode\":\"%s\",\"wrmsr_tried\":%lu,\"wrmsr_gp\":%lu,"
		"\"apf_en_readback\":%lu,\"acks_skipped\":%lu,\"eois_skipped\":%lu,"
		"\"toggles\":%lu,\"spins\":%lu,\"spin_ms\":%lu,\"parked_during_spin\":%lu,"
		"\"others_completed_during_spin\":%lu,\"msr_ops\":%u,\"msr_writes\":%lu,"
		"\"msr_gp\":%lu,\"int_reverted\":%lu,\"self_wakes\":%lu,\"restores\":%lu,"
		"\"dummies_dropped\":%lu}\n",
		mode_names[hostile.mode], t.wrmsr_tried, t.wrmsr_gp, apf_en_readback,
		t.acks_skipped, t.eois_skipped, t.toggles, t.spins, t.spin_cycles / tsc_khz,
		t.parked_during_spin, t.others_completed_during_spin, hostile.msr_nops,
		t.msr_writes, t.msr_gp, t.int_reverted, t.self_wakes, t.restores,
		t.dummies_dropped);
}
