/*
 * apf.c - the guest side of KVM's async page faults, as in Linux's
 * arch/x86/kernel/kvm.c, with every token accounted for.
 *
 * Page not present: #PF, error code 0, CR2 = token, area.flags = 1. Park the
 * running task under the token in this CPU's 256-bucket hash and run another
 * one; if a dummy for the token is there (the page-ready came first), consume
 * it and carry on without sleeping.
 *
 * Page ready: interrupt VEC_APF_READY with area.token. Wake the task parked
 * under it, or insert a dummy; 0xffffffff wakes every task parked on this
 * CPU. Then area.token = 0, EOI, ACK.
 *
 * The hash is per CPU (Linux has one global table): KVM queues completions
 * per vCPU, so a token is always completed on the CPU that got its
 * page-not-present, and a CPU that goes offline first wakes everything it
 * has parked. Only this CPU touches its hash, always with IF=0.
 *
 * Guest kernel mode may be emulated at ~1 us per instruction: the two
 * handlers are kept short, and everything rare is out of line.
 */
#include "guest.h"

/* Linux's hash_32(token, 8): tokens are (seq << 12) | vcpu, so mix the high bits in. */
static inline u32 apf_hash(u32 token)
{
	return (token * 0x61c88647u) >> 24;
}

/* CPUID says KVM with async PF delivered as #PF + page-ready interrupt (what Linux requires). */
bool apf_advertised(void)
{
	u32 a, b, c, d;

	cpuid(0x40000000, 0, &a, &b, &c, &d);
	if (b != 0x4b4d564b || c != 0x564b4d56 || d != 0x4d)	/* "KVMKVMKVM\0\0\0" */
		return false;
	cpuid(0x40000001, 0, &a, &b, &c, &d);
	return (a & (1u << KVM_FEATURE_ASYNC_PF)) && (a & (1u << KVM_FEATURE_ASYNC_PF_INT));
}

/* The x2APIC must be software-enabled already (x2apic_enable). */
void apf_enable(struct cpu *c)
{
	if (!c->dummy_free && !c->dummies_live) {
		for (u32 i = 0; i < APF_DUMMY_POOL; i++) {
			c->dummy_pool[i].next = c->dummy_free;
			c->dummy_free = &c->dummy_pool[i];
		}
	}
	c->apf.flags = 0;
	c->apf.token = 0;
	c->apf_area = &c->apf;
	c->apf_vector = VEC_APF_READY;
	c->apf_dirty = 0;
	wrmsr(MSR_KVM_ASYNC_PF_INT, VEC_APF_READY);
	if (unlikely(hostile.mode == HOSTILE_APF_OUTSIDE_RAM)) {
		hostile_apf_enable(c);	/* bad values instead; leaves apf_on 0 */
		return;
	}
	wrmsr(MSR_KVM_ASYNC_PF_EN, (u64)(uintptr_t)&c->apf | KVM_ASYNC_PF_ENABLED |
				      KVM_ASYNC_PF_DELIVERY_AS_INT);
	c->apf_on = 1;
}

/*
 * KVM drops this CPU's pending completions. A token KVM already wrote is
 * dropped too (its task is woken by the caller's wake-all), and the slot
 * must read 0 or KVM never delivers the wake-all after the next enable.
 */
void apf_disable(struct cpu *c)
{
	if (!c->apf_on)
		return;
	wrmsr(MSR_KVM_ASYNC_PF_EN, 0);
	c->apf_on = 0;
	c->apf.token = 0;
	c->apf.flags = 0;
}

/* Every enabling write is followed by a wake-all: wait for it with IF=1. */
bool apf_wait_wakeall(struct cpu *c, u64 before, u64 timeout_us)
{
	u64 deadline = rdtsc() + us_to_tsc(timeout_us);
	bool seen;

	irq_enable();
	while (!(seen = c->st.wakealls > before) && rdtsc() < deadline)
		cpu_relax();
	irq_disable();
	return seen;
}

/* Take a parked task off the parked list and make it ready. */
static inline void unpark(struct cpu *c, struct task *t, u32 token)
{
	u64 dt = rdtsc() - t->park_tsc;

	c->st.parked_cycles += dt;
	if (dt > c->st.max_parked_cycles)
		c->st.max_parked_cycles = dt;
	if (t->pk_prev)
		t->pk_prev->pk_next = t->pk_next;
	else
		c->pk_head = t->pk_next;
	if (t->pk_next)
		t->pk_next->pk_prev = t->pk_prev;
	else
		c->pk_tail = t->pk_prev;
	c->nr_parked--;
	t->done_tokens[t->done_pos++ % DONE_HISTORY] = token;
	runq_add(c, t);
}

/* ---- Page not present ---- */

/* Is a dummy for `token` in this CPU's hash (its page-ready came first)? */
static bool has_dummy(struct cpu *c, u32 token)
{
	for (struct apf_node *n = c->hash[apf_hash(token)]; n; n = n->next)
		if (n->token == token && !n->task)
			return true;
	return false;
}

/*
 * dummy=1: let a fast page-ready overtake the park (completion before
 * pfault). The window closes early once the dummy for this token is there;
 * it may be there already (a host can deliver the page-ready interrupt
 * before the #PF). dummy_us=0 keeps it open until then, so every
 * page-not-present is overtaken by its page-ready whatever the host's
 * timing.
 */
static __attribute__((noinline)) void dummy_window(struct cpu *c, u32 token)
{
	u64 end = rdtsc() + wl.dummy_cycles;

	irq_enable();
	while (!has_dummy(c, token) && (!wl.dummy_cycles || rdtsc() < end)) {
		(void)rdmsr(MSR_X2APIC_ID);	/* an exit: lets KVM inject a pending page-ready */
		cpu_relax();			/* the page-ready handler changes the hash */
	}
	irq_disable();
}

static __attribute__((noinline)) void consume_dummy(struct cpu *c, struct apf_node **pp,
						      struct apf_node *n)
{
	if (n->task)
		fail(EXIT_BAD_TOKENS, "cpu %u: page-not-present token 0x%x is already parked",
		     c->index, n->token);
	*pp = n->next;
	n->next = c->dummy_free;
	c->dummy_free = n;
	c->dummies_live--;
	c->st.dummy_consumed++;
	if (c->offline_req) {
		/* Going offline was asked for while we were not looking: do it now. */
		struct task *t = c->current;
		runq_add(c, t);
		schedule(c, t);
	}
}

static inline void apf_not_present(struct cpu *c, u32 token)
{
	struct task *t = c->current;
	struct apf_node **head, **pp, *n;

	c->st.pfaults++;
	if (unlikely(wl.dummy))
		dummy_window(c, token);
	head = &c->hash[apf_hash(token)];
	for (pp = head; (n = *pp); pp = &n->next) {
		if (n->token == token) {
			consume_dummy(c, pp, n);
			return;
		}
	}
	t->node.token = token;
	t->node.next = *head;
	*head = &t->node;
	t->park_tsc = rdtsc();
	t->pk_next = NULL;
	t->pk_prev = c->pk_tail;
	if (c->pk_tail)
		c->pk_tail->pk_next = t;
	else
		c->pk_head = t;
	c->pk_tail = t;
	u32 parked = c->nr_parked + 1;
	c->nr_parked = parked;
	if (parked > c->st.max_parked)
		c->st.max_parked = parked;
	if (unlikely(hostile.mode))
		hostile_parked(c);
	if (unlikely(wl.snapshot_pfault) && c->st.pfaults == wl.snapshot_pfault &&
	    atomic_cmpxchg(&wl.snapshot_requested, 0, 1) == 0) {
		/* The VMM pauses the VM during this write: the snapshot has this task parked. */
		kprintf("apfvm-ref: snapshot requested with %u parked on cpu%u\n", parked, c->index);
		outl(SNAPSHOT_PORT, 1);
	}
	schedule(c, t);
}

static __attribute__((noinline, noreturn)) void bad_pf(struct kframe *f, struct cpu *c, u32 flags)
{
	if (flags && c) {
		console_lock_emergency();
		kprintf_locked("apfvm-ref: async PF flags=0x%x from %s mode rip=0x%lx cr2=0x%lx\n",
			       flags, (f->cs & 3) ? "user" : "kernel", f->rip, read_cr2());
		console_unlock();
	}
	fatal_exception(f->vector, f->error_code, f->rip, f->cs);
}

/* #PF fast path (entry.S pf_entry). */
void pf_handler(struct kframe *f)
{
	struct cpu *c = this_cpu();

	/* GS base is not set yet this early on an AP: no async PF possible then. */
	if (unlikely((uintptr_t)c - (uintptr_t)cpus >= sizeof(cpus)))
		bad_pf(f, NULL, 0);
	struct apf_area *area = c->apf_area;
	u32 flags = area->flags;
	if (likely(flags == KVM_PV_REASON_PAGE_NOT_PRESENT && (f->cs & 3))) {
		u32 token = (u32)read_cr2();
		area->flags = 0;
		apf_not_present(c, token);
		return;
	}
	/* flags == 0: a real fault. Anything else: KVM broke the protocol. */
	bad_pf(f, c, flags);
}

/* ---- Page ready ---- */

/* Was this token completed before (a task's recent history, or a dummy already there)? */
static bool token_completed_before(u32 token)
{
	for (u32 i = 0; i < nr_tasks; i++) {
		for (u32 j = 0; j < DONE_HISTORY; j++) {
			if (tasks[i].done_tokens[j] == token)
				return true;
		}
	}
	return false;
}

static __attribute__((noinline)) void apf_wake_slow(struct cpu *c, u32 token, struct apf_node *n)
{
	if (n || token_completed_before(token)) {
		/* A dummy for it is already there, or it already woke its task. */
		c->st.dup_wakes++;
		return;
	}
	/* No sleeper: the page-not-present has not been handled yet. */
	n = c->dummy_free;
	if (!n && hostile_lenient_tokens()) {
		c->hst.dummies_dropped++;
		return;
	}
	if (!n)
		fail(EXIT_BAD_TOKENS, "cpu %u: more than %u dummy entries (page-ready tokens "
		     "without a page-not-present)", c->index, APF_DUMMY_POOL);
	c->dummy_free = n->next;
	c->dummies_live++;
	n->token = token;
	n->task = NULL;
	struct apf_node **head = &c->hash[apf_hash(token)];
	n->next = *head;
	*head = n;
	c->st.dummies++;
}

static inline void apf_wake(struct cpu *c, u32 token)
{
	struct apf_node **pp = &c->hash[apf_hash(token)], *n;

	while ((n = *pp) && n->token != token)
		pp = &n->next;
	if (likely(n && n->task)) {
		struct task *t = n->task;

		*pp = n->next;
		c->st.completions++;
		if (t != c->pk_head)
			c->st.out_of_order++;
		unpark(c, t, token);
		return;
	}
	apf_wake_slow(c, token, n);
}

/* Wake every task parked on this CPU (a wake-all, or going offline); returns how many. */
u32 apf_wake_all_parked(struct cpu *c)
{
	u32 woken = 0;
	struct task *t;

	while ((t = c->pk_head)) {
		struct apf_node **pp = &c->hash[apf_hash(t->node.token)];

		while (*pp != &t->node)
			pp = &(*pp)->next;
		*pp = t->node.next;
		unpark(c, t, t->node.token);
		woken++;
	}
	c->st.wakeall_woken += woken;
	return woken;
}

/* Page-ready interrupt (entry.S apf_ready_entry). */
void apf_ready_handler(struct kframe *f)
{
	struct cpu *c = this_cpu();
	struct apf_area *area = c->apf_area;
	u32 token = area->token;

	if (likely(token != APF_WAKE_ALL && token != 0)) {
		apf_wake(c, token);
	} else if (token == APF_WAKE_ALL) {
		c->st.wakealls++;
		if (c->reonline)
			c->st.wakealls_after_online++;
		apf_wake_all_parked(c);
	} else {
		c->st.zero_tokens++;
	}
	area->token = 0;
	skip_idle_hlt(c, f);
	if (likely(!hostile.mode)) {
		apic_eoi();
		if (likely(c->apf_on))
			wrmsr(MSR_KVM_ASYNC_PF_ACK, 1);
	} else {
		hostile_ready_ack(c);
	}
	/* Woke the idle loop: run the task right away instead of returning to idle first. */
	if (f->rip == (u64)(uintptr_t)idle_hlt + 1 && c->rq_head && !c->offline_req)
		run_from_idle(c);
}

u32 apf_dummies_left(struct cpu *c)
{
	return c->dummies_live;
}
