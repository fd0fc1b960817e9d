/*
 * user.c - the user-mode (CPL3) tasks. Everything here runs at CPL3: no
 * privileged instructions, no kernel functions (kprintf, ...), only plain
 * memory, RDTSC, LOCK'd atomics and system calls (UD2, see sched.c).
 *
 * Only these tasks ever touch the pageable region: a guest kernel-mode touch
 * of a missing page is synchronous and would defeat the test.
 */
#include "guest.h"

/* ---- System calls ---- */

static inline u64 syscall5(u64 nr, u64 a, u64 b, u64 c, u64 d, u64 e)
{
	register u64 r10 asm("r10") = d;
	register u64 r8 asm("r8") = e;
	u64 ret;

	asm volatile("ud2" : "=a"(ret) : "0"(nr), "D"(a), "S"(b), "d"(c), "r"(r10), "r"(r8)
		     : "memory");
	return ret;
}

static inline void sys_yield(void)
{
	syscall5(SYS_YIELD, 0, 0, 0, 0, 0);
}

static __noreturn void sys_exit(u64 result)
{
	syscall5(SYS_EXIT, result, 0, 0, 0, 0);
	for (;;)
		;
}

static __noreturn void sys_fail(u32 code, u32 reason)
{
	syscall5(SYS_FAIL, code, reason, 0, 0, 0);
	for (;;)
		;
}

/* Give the CPU away only if someone else on it is ready (or it must go offline). */
static inline void maybe_yield(struct task *t)
{
	struct cpu *c = t->cpu;

	if (c->nr_ready || c->offline_req)
		sys_yield();
}

/* ---- Page contents ---- */

/* splitmix64's finalizer */
static inline u64 mix64(u64 x)
{
	x ^= x >> 30;
	x *= 0xbf58476d1ce4e5b9ULL;
	x ^= x >> 27;
	x *= 0x94d049bb133111ebULL;
	x ^= x >> 31;
	return x;
}

#define GOLDEN	0x9e3779b97f4a7c15ULL

/* Word w of region page `page` after pass `pass`: a function of (seed, page, pass, offset). */
static inline u64 page_key(u32 page, u32 pass)
{
	return mix64(mix64((u64)wl.seed ^ 0xa0761d6478bd642fULL) ^ (((u64)pass << 32) | page));
}

static inline u64 fingerprint(u64 key, u32 word)
{
	return mix64(key + (u64)(word + 1) * GOLDEN);
}

#define WORDS_PER_PAGE	(PAGE_SIZE / 8)

static __attribute__((noinline)) void bad_word(struct task *t, u32 page, u32 pass, u32 word,
					       u64 expected, u64 got)
{
	u64 diff = expected ^ got;

	for (int b = 0; b < 8; b++)
		if ((diff >> (8 * b)) & 0xff)
			t->bad_bytes++;
	atomic_cmpxchg(&wl.first_bad_page, 0xffffffff, page);
	if (atomic_fetch_add(&wl.bad_reports, 1) < 8)
		syscall5(SYS_BAD_DATA, page, pass, (u64)word * 8, expected, got);
}

static inline volatile u64 *page_ptr(u32 page)
{
	return (volatile u64 *)(uintptr_t)(REGION_BASE + (u64)page * PAGE_SIZE);
}

/* Check every byte of the page: the contents of pass `written` (-1: zeros). */
static void verify_page(struct task *t, u32 page, int written, u32 pass)
{
	volatile u64 *p = page_ptr(page);

	if (written < 0) {
		for (u32 w = 0; w < WORDS_PER_PAGE; w++) {
			u64 v = p[w];
			if (unlikely(v))
				bad_word(t, page, pass, w, 0, v);
		}
	} else {
		u64 key = page_key(page, (u32)written);
		for (u32 w = 0; w < WORDS_PER_PAGE; w++) {
			u64 v = p[w], e = fingerprint(key, w);
			if (unlikely(v != e))
				bad_word(t, page, pass, w, e, v);
		}
	}
}

/*
 * Verify what the previous pass wrote (pass 0: zeros, the VMM's zero-fill),
 * then write this pass's contents.
 */
static void touch_page(struct task *t, u32 page, u32 pass)
{
	volatile u64 *p = page_ptr(page);

	verify_page(t, page, (int)pass - 1, pass);
	u64 key = page_key(page, pass);
	for (u32 w = 0; w < WORDS_PER_PAGE; w++)
		p[w] = fingerprint(key, w);
}

/* fail=data: flip one bit of a page written in the last pass and check it again. */
static void corrupt_and_recheck(struct task *t, u32 page)
{
	volatile u64 *p = page_ptr(page);

	p[17] ^= 0x40;
	verify_page(t, page, (int)wl.passes - 1, wl.passes);
}

/* ---- A seeded random order without memory: a Feistel permutation with cycle walking ---- */

struct perm {
	u32 n, half, mask;
	u64 k[4];
};

static void perm_init(struct perm *pm, u32 n, u64 key)
{
	u32 bits = 2;

	while ((1ULL << bits) < n)
		bits += 2;
	pm->n = n;
	pm->half = bits / 2;
	pm->mask = (1u << pm->half) - 1;
	for (int r = 0; r < 4; r++)
		pm->k[r] = mix64(key + (u64)(r + 1) * GOLDEN);
}

/* A bijection of [0, 4^half) restricted to [0, n) by walking until the value fits. */
static u32 perm_at(const struct perm *pm, u32 i)
{
	u32 x = i;

	do {
		u32 l = x >> pm->half, r = x & pm->mask;
		for (int k = 0; k < 4; k++) {
			u32 nl = r;
			r = l ^ ((u32)mix64(r ^ pm->k[k]) & pm->mask);
			l = nl;
		}
		x = (l << pm->half) | r;
	} while (x >= pm->n);
	return x;
}

/* ---- Tasks ---- */

/* All touchers of all CPUs finished `pass`; the last one in evicts the region. */
static void barrier(struct task *t, u32 pass)
{
	if (atomic_fetch_add(&wl.arrived, 1) == wl.total_touchers - 1) {
		wl.arrived = 0;
		if (wl.evict)
			syscall5(SYS_EVICT, 0, 0, 0, 0, 0);
		store_release(&wl.epoch, pass + 1);
		return;
	}
	while (wl.epoch == pass) {
		maybe_yield(t);
		cpu_relax();
	}
}

void toucher_main(struct task *t)
{
	u32 n = t->slice_count;

	for (u32 pass = 0; pass < wl.passes; pass++) {
		struct perm pm;

		perm_init(&pm, n, mix64(((u64)wl.seed << 32) ^ ((u64)t->toucher_index << 16) ^ pass));
		for (u32 i = 0; i < n; i++) {
			u32 page = t->slice_first + perm_at(&pm, i);
			struct cpu *c = t->cpu;
			u64 ops0 = c->busy_ops;
			u64 t0 = rdtsc();

			touch_page(t, page, pass);

			u64 t1 = rdtsc();
			u64 ops1 = c->busy_ops;
			u64 dt = t1 - t0;

			if (dt > t->max_touch_cycles)
				t->max_touch_cycles = dt;
			if (dt > wl.stall_cycles) {
				t->stalls++;
				t->busy_ops_during_stalls += ops1 - ops0;
			}
			t->pages_touched++;
			maybe_yield(t);
		}
		if (pass + 1 < wl.passes)
			barrier(t, pass);
	}
	if (wl.fail_data && t->toucher_index == 0 && n)
		corrupt_and_recheck(t, t->slice_first);
	atomic_fetch_add(&wl.touchers_left, (u32)-1);
	sys_exit(t->bad_bytes ? 1 : 0);
}

/* Count as fast as possible; every ~50 us look whether someone else wants the CPU. */
void busy_main(struct task *t)
{
	u64 slice = wl.slice_cycles;

	while (wl.touchers_left) {
		struct cpu *c = t->cpu;
		u64 start = rdtsc();

		do {
			for (int i = 0; i < 64; i++)
				c->busy_ops++;
		} while (rdtsc() - start < slice);
		maybe_yield(t);
	}
	sys_exit(0);
}

/* Wait for cond with the CPU shared; false after 10 s. */
#define WAIT_UNTIL(t, cond)							\
	({									\
		u64 _deadline = rdtsc() + 10000ULL * tsc_khz;			\
		bool _ok = true;						\
		while (!(cond)) {						\
			if (rdtsc() > _deadline) {				\
				_ok = false;					\
				break;						\
			}							\
			maybe_yield(t);						\
			cpu_relax();						\
		}								\
		_ok;								\
	})

/*
 * hotplug=N (on the BSP): N times, once CPU 1 has a task parked on a pending
 * fault, take CPU 1 offline and bring it back.
 */
void controller_main(struct task *t)
{
	struct cpu *c1 = &cpus[1];

	for (u32 cycle = 0; cycle < wl.hotplug; cycle++) {
		while (!c1->nr_parked) {
			if (!wl.touchers_left)
				sys_exit(0);
			maybe_yield(t);
			cpu_relax();
		}
		syscall5(SYS_CPU_OFFLINE, 1, 0, 0, 0, 0);
		if (!WAIT_UNTIL(t, c1->state == CPU_OFFLINE))
			sys_fail(EXIT_HOTPLUG, 0);
		syscall5(SYS_CPU_ONLINE, 1, 0, 0, 0, 0);
		if (!WAIT_UNTIL(t, c1->state == CPU_ONLINE))
			sys_fail(EXIT_HOTPLUG, 1);
		if (wl.apf && !WAIT_UNTIL(t, c1->st.wakealls_after_online > cycle))
			sys_fail(EXIT_HOTPLUG, 2);
		wl.hotplug_done = cycle + 1;
	}
	sys_exit(0);
}
