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
};

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

/* From the page-not-present path, IF=0, right after the current task was parked. */
void hostile_parked(struct cpu *c)
{
	if (hostile.mode == HOSTILE_TOGGLE)
		toggle_burst(c);
	else if (hostile.mode == HOSTILE_CLI_SPIN)
		cli_spin(c);
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
	}
	kprintf("apfvm-ref: hostile {\"mode\":\"%s\",\"wrmsr_tried\":%lu,\"wrmsr_gp\":%lu,"
		"\"apf_en_readback\":%lu,\"acks_skipped\":%lu,\"eois_skipped\":%lu,"
		"\"toggles\":%lu,\"spins\":%lu,\"spin_ms\":%lu,\"parked_during_spin\":%lu,"
		"\"others_completed_during_spin\":%lu}\n",
		mode_names[hostile.mode], t.wrmsr_tried, t.wrmsr_gp, apf_en_readback,
		t.acks_skipped, t.eois_skipped, t.toggles, t.spins, t.spin_cycles / tsc_khz,
		t.parked_during_spin, t.others_completed_during_spin);
}
