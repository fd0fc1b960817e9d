/*
 * sched.c - user-mode (CPL3) tasks and a cooperative per-CPU scheduler.
 *
 * Each task has a kernel stack (TSS.RSP0 while it runs) and a user stack,
 * and belongs to one CPU's run queue. Nothing preempts a task: it runs until
 * it makes a system call that gives up the CPU (yield, exit) or is parked by
 * an async PF page-not-present. So a vCPU that KVM halts for a page runs
 * nothing else, which is what the `--apf off` baseline must show.
 *
 * A task is switched out inside its own kernel entry (switch_to() saves the
 * callee-saved registers on its kernel stack), so moving a switched-out task
 * to another CPU is just moving the pointer. The only cross-CPU structure is
 * each CPU's `incoming` list (under in_lock), used when CPU 1 goes offline
 * (everything moves to the BSP) and when tasks go back home afterwards.
 *
 * Idle: the CPU's own stack runs idle_loop(): `sti; hlt` until an interrupt
 * (page-ready, reschedule IPI) makes a task ready.
 *
 * System calls: UD2 at CPL3. Number in RAX, arguments in RDI, RSI, RDX, R10,
 * R8, result in RAX; RIP is advanced past the UD2.
 */
#include "guest.h"

struct task tasks[MAX_TASKS];
u32 nr_tasks;

/* Not zeroed at boot (.noinit, not in .bss): only the pages used are ever touched. */
static u8 kstacks[MAX_TASKS][KSTACK_SIZE] __attribute__((section(".noinit"), aligned(4096)));
static u8 ustacks[MAX_TASKS][USTACK_SIZE] __attribute__((section(".noinit"), aligned(4096)));

/* Done by each CPU for itself: at first start and when it comes back online. */
void sched_init_cpu(struct cpu *c)
{
	c->idle.kind = TASK_IDLE;
	c->idle.cpu = c;
	c->idle.home = c;
	c->current = &c->idle;
}

/*
 * A new task's kernel stack looks like one switched out in a fast entry:
 * switch_to() pops zeroed callee-saved registers and returns into fast_exit,
 * which "returns" to user mode at entry(t) with IF=1.
 */
struct task *task_create(struct cpu *c, u32 kind, void (*entry)(struct task *))
{
	if (nr_tasks >= MAX_TASKS)
		fail(EXIT_BAD_BOOT, "more than %u tasks", MAX_TASKS);
	struct task *t = &tasks[nr_tasks];
	t->id = nr_tasks++;
	t->kind = kind;
	t->cpu = c;
	t->home = c;
	t->node.task = t;

	/* Touch the user stack from kernel mode (synchronous) so it is resident at first. */
	volatile u8 *us = ustacks[t->id];
	for (u32 off = 0; off < USTACK_SIZE; off += PAGE_SIZE)
		us[off] = 0;
	u64 *usp = (u64 *)(uintptr_t)&ustacks[t->id][USTACK_SIZE] - 1;
	*usp = 0;	/* a return address of 0: entry() must never return */

	u64 *ksp = (u64 *)(uintptr_t)&kstacks[t->id][KSTACK_SIZE];
	t->kstack_top = (u64)(uintptr_t)ksp;
	*--ksp = USER_DS | 3;			/* ss */
	*--ksp = (u64)(uintptr_t)usp;		/* rsp */
	*--ksp = 0x202;				/* rflags: IF */
	*--ksp = USER_CS | 3;			/* cs */
	*--ksp = (u64)(uintptr_t)entry;		/* rip */
	*--ksp = 0;				/* error code */
	*--ksp = 0;				/* vector */
	*--ksp = 0;				/* rax */
	*--ksp = 0;				/* rcx */
	*--ksp = 0;				/* rdx */
	*--ksp = 0;				/* rsi */
	*--ksp = (u64)(uintptr_t)t;		/* rdi: entry's argument */
	for (int i = 0; i < 4; i++)
		*--ksp = 0;			/* r8-r11 */
	*--ksp = (u64)(uintptr_t)fast_exit;	/* switch_to's return address */
	for (int i = 0; i < 6; i++)
		*--ksp = 0;			/* rbp, rbx, r12-r15 */
	t->ksp = (u64)(uintptr_t)ksp;
	return t;
}

/*
 * Hand a switched-out task to another CPU. Fails if that CPU is not online
 * (checked under its in_lock, which going offline takes too).
 */
bool push_incoming(struct cpu *dst, struct task *t)
{
	spin_lock(&dst->in_lock);
	if (dst->state != CPU_ONLINE) {
		spin_unlock(&dst->in_lock);
		return false;
	}
	t->cpu = dst;
	t->next = dst->incoming;
	dst->incoming = t;
	spin_unlock(&dst->in_lock);
	x2apic_send_ipi(dst->apic_id, VEC_IPI);
	return true;
}

static void drain_incoming(struct cpu *c)
{
	spin_lock(&c->in_lock);
	struct task *list = c->incoming;
	c->incoming = NULL;
	spin_unlock(&c->in_lock);
	while (list) {
		struct task *t = list;
		list = t->next;
		runq_add(c, t);
	}
}

/*
 * The next ready task. A task away from home (moved off CPU 1 while it was
 * offline) goes back once home is online again; `running` (the task giving
 * up the CPU right now, still on its kernel stack) is never handed over.
 */
static struct task *runq_pop(struct cpu *c, struct task *running)
{
	struct task *t;

	while ((t = c->rq_head)) {
		c->rq_head = t->next;
		if (!c->rq_head)
			c->rq_tail = NULL;
		c->nr_ready--;
		if (likely(t->home == c) || t == running || !push_incoming(t->home, t))
			return t;
	}
	return NULL;
}

static inline void switch_task(struct cpu *c, struct task *prev, struct task *next)
{
	c->current = next;
	if (next != &c->idle)
		c->tss.rsp[0] = next->kstack_top;
	switch_to(&prev->ksp, next->ksp);
	/* Back here when prev runs again, possibly on another CPU: c is stale now. */
}

/*
 * prev (the current task) gives up the CPU; it is already queued (yield),
 * parked, or exited. Returns when prev is switched back in.
 */
void schedule(struct cpu *c, struct task *prev)
{
	struct task *next = NULL;

	if (likely(!c->offline_req))
		next = runq_pop(c, prev);
	if (!next)
		next = &c->idle;
	if (next == prev)
		return;
	switch_task(c, prev, next);
}

/* ---- CPU offline (CPU 1 on the BSP's request), always from the idle loop ---- */

static __noreturn void cpu_go_offline(struct cpu *c)
{
	struct cpu *bsp = &cpus[0];
	struct task *t;

	/* As Linux's kvm_cpu_down_prepare: disable async PF, wake what we parked. */
	apf_disable(c);
	c->st.parked_at_offline += apf_wake_all_parked(c);

	spin_lock(&c->in_lock);
	c->state = CPU_GOING_OFFLINE;	/* no more migrations to us */
	spin_unlock(&c->in_lock);
	drain_incoming(c);

	/* Every task goes to the BSP; they come home when we are back. */
	spin_lock(&bsp->in_lock);
	while ((t = c->rq_head)) {
		c->rq_head = t->next;
		t->cpu = bsp;
		t->next = bsp->incoming;
		bsp->incoming = t;
	}
	spin_unlock(&bsp->in_lock);
	c->rq_tail = NULL;
	c->nr_ready = 0;
	x2apic_send_ipi(bsp->apic_id, VEC_IPI);

	c->offline_req = 0;
	store_release(&c->state, CPU_OFFLINE);
	/* Until INIT/SIPI: ap_start64 comes back on this same stack (stack_top). */
	cpu_park();
}

/*
 * From an interrupt handler that woke the idle loop out of HLT: switch to a
 * ready task now. The idle context is saved inside the handler's frame on
 * the idle stack; when a task later switches back to idle, the handler
 * returns and IRETQ resumes idle_loop right after its HLT.
 */
void run_from_idle(struct cpu *c)
{
	struct task *t = runq_pop(c, NULL);

	if (t)
		switch_task(c, &c->idle, t);
}

__noreturn void idle_loop(struct cpu *c)
{
	for (;;) {
		if (c->incoming)
			drain_incoming(c);
		if (c->offline_req)
			cpu_go_offline(c);
		struct task *t = runq_pop(c, NULL);
		if (t) {
			switch_task(c, &c->idle, t);
			continue;
		}
		if (unlikely(hostile.mode)) {
			hostile_idle(c);
			if (c->rq_head)
				continue;
		}
		/*
		 * STI's one-instruction shadow should keep interrupts out until HLT
		 * runs; handlers also skip the HLT if one came in anyway (idle_hlt).
		 */
		asm volatile("sti\n.globl idle_hlt\nidle_hlt: hlt\ncli" : : : "memory");
	}
}

/* Reschedule IPI: migrated tasks arrived, or go offline. */
void ipi_handler(struct kframe *f)
{
	struct cpu *c = this_cpu();

	skip_idle_hlt(c, f);
	apic_eoi();
	if (c->incoming)
		drain_incoming(c);
	if (c->offline_req && (f->cs & 3)) {
		/* Interrupted a task: queue it (it moves to the BSP) and let idle go offline. */
		struct task *t = c->current;
		runq_add(c, t);
		schedule(c, t);
	}
	/* Interrupted kernel code (idle, or the dummy window): idle_loop/schedule look. */
}

/* ---- Watchdog: the BSP's LAPIC timer, ~10 Hz, only checks the deadline ---- */

void watchdog_start(void)
{
	/* KVM's APIC timer counts at 1 GHz; elsewhere the period just differs. */
	wrmsr(MSR_X2APIC_TIMER_DIV, APIC_TIMER_DIV_1);
	/* hostile=no-eoi leaves 0xec in service, which holds back VEC_TIMER (same class). */
	wrmsr(MSR_X2APIC_LVT_TIMER, APIC_LVT_PERIODIC |
	      (hostile.mode == HOSTILE_NO_EOI ? VEC_TIMER_HIGH : VEC_TIMER));
	wrmsr(MSR_X2APIC_TIMER_INIT, 100000000);
}

void timer_handler(struct kframe *f)
{
	skip_idle_hlt(this_cpu(), f);
	apic_eoi();
	if (unlikely(rdtsc() > wl.deadline_tsc))
		workload_finish(EXIT_WATCHDOG, "watchdog");
}

/* ---- System calls ---- */

static __noreturn void sys_exit(struct cpu *c, struct task *t, u64 result)
{
	t->result = (u32)result;
	store_release(&t->exited, 1);
	if (atomic_fetch_add(&wl.tasks_alive, (u32)-1) == 1)
		workload_finish(0, NULL);
	schedule(c, t);
	fail(EXIT_TASKS, "exited task %u was switched back in", t->id);
}

/* Ask the VMM's pager to evict the whole region (pager-control ports). */
static u64 sys_evict(void)
{
	spin_lock(&wl.evict_lock);
	outl(PAGER_PORT_PFN, (u32)(REGION_BASE >> 12));
	outl(PAGER_PORT_COUNT, wl.pages);
	u32 n = inl(PAGER_PORT_PFN);
	wl.evictions_requested++;
	if (n == 0xffffffff) {
		if (!wl.no_pager) {
			wl.no_pager = true;
			kprintf("apfvm-ref: evict: no pager-control device (port 0x%x reads "
				"0xffffffff): pages stay resident\n", PAGER_PORT_PFN);
		}
	} else {
		wl.pages_evicted += n;
		if (n != wl.pages)
			kprintf("apfvm-ref: evict: %u of %u pages evicted (the others were not "
				"resident for the pager)\n", n, wl.pages);
	}
	spin_unlock(&wl.evict_lock);
	return n;
}

static u64 sys_cpu_offline(u64 index)
{
	if (index == 0 || index >= mp_cpus.count || cpus[index].state != CPU_ONLINE)
		return (u64)-1;
	struct cpu *c = &cpus[index];
	store_release(&c->offline_req, 1);
	x2apic_send_ipi(c->apic_id, VEC_IPI);
	return 0;
}

static u64 sys_cpu_online(u64 index)
{
	if (index == 0 || index >= mp_cpus.count || cpus[index].state != CPU_OFFLINE)
		return (u64)-1;
	struct cpu *c = &cpus[index];
	c->state = CPU_BOOTING;
	ap_reentry_rsp = c->stack_top;
	ap_start((u32)index);
	return 0;
}

static const char *const fail_reasons[] = {
	"hotplug: cpu 1 did not go offline within 10 s",
	"hotplug: cpu 1 did not come back online within 10 s",
	"hotplug: no wake-all within 10 s after cpu 1 re-enabled async PF",
};

static void sys_bad_data(struct kframe *f)
{
	kprintf("apfvm-ref: bad data page=%lu pass=%lu offset=%lu expected=0x%016lx got=0x%016lx\n",
		f->rdi, f->rsi, f->rdx, f->r10, f->r8);
}

void ud_handler(struct kframe *f)
{
	if (unlikely(!(f->cs & 3) || *(volatile u16 *)(uintptr_t)f->rip != 0x0b0f))
		fatal_exception(VEC_UD, 0, f->rip, f->cs);
	f->rip += 2;

	struct cpu *c = this_cpu();
	struct task *t = c->current;

	switch (f->rax) {
	case SYS_YIELD:
		if (unlikely(hostile.mode))
			hostile_yield(c);
		if (c->rq_head || c->offline_req) {
			runq_add(c, t);
			schedule(c, t);
		}
		return;
	case SYS_EXIT:
		sys_exit(c, t, f->rdi);
	case SYS_EVICT:
		f->rax = sys_evict();
		return;
	case SYS_CPU_OFFLINE:
		f->rax = sys_cpu_offline(f->rdi);
		return;
	case SYS_CPU_ONLINE:
		f->rax = sys_cpu_online(f->rdi);
		return;
	case SYS_BAD_DATA:
		sys_bad_data(f);
		return;
	case SYS_FAIL:
		workload_finish((u32)f->rdi,
				f->rsi < ARRAY_SIZE(fail_reasons) ? fail_reasons[f->rsi] : "task failed");
	default:
		fail(EXIT_TASKS, "task %u: unknown system call %lu", t->id, f->rax);
	}
}
