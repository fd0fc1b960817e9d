/*
 * workload.c - the async PF test workload: command-line words, the pageable
 * region, creating the tasks, and the final report (README.md documents the
 * words, the result keys and the exit codes: a contract with the VMM's tests).
 */
#include "guest.h"

struct workload wl = {
	.passes = 1,
	.touchers = 1,
	.seed = 1,
	.stall_us = 2000,
	.timeout_s = 120,
	.dummy_us = 1000,
};

u32 exit_code_pass;
bool hold_after_result;
bool chatter;

/*
 * hold: only the VMM (a signal to it) ends the VM now. With `chatter` the CPU prints lines
 * forever instead of halting: a guest whose console output the host may not keep up with.
 */
__noreturn void hold_forever(void)
{
	kprintf("apfvm-ref: holding\n");
	for (u64 line = 0; chatter; line++)
		kprintf("apfvm-ref: chatter %lu ........................................"
			"........................................\n", line);
	halt_forever();
}
static u64 start_tsc;

/* One command-line word; false if it is not one of ours. Bad values fail (code 2). */
bool workload_parse_word(const char *w, size_t len)
{
	static const struct {
		const char *name;
		u32 *val;
	} nums[] = {
		{ "pages=", &wl.pages },     { "passes=", &wl.passes },
		{ "touchers=", &wl.touchers }, { "busy=", &wl.busy },
		{ "seed=", &wl.seed },       { "stall_us=", &wl.stall_us },
		{ "timeout_s=", &wl.timeout_s }, { "hotplug=", &wl.hotplug },
		{ "dummy_us=", &wl.dummy_us }, { "snapshot_pfault=", &wl.snapshot_pfault },
		{ "snapshot_at_start=", &wl.snapshot_at_start },
	};
	static const struct {
		const char *name;
		bool *val;
	} flags[] = {
		{ "evict=", &wl.evict }, { "dummy=", &wl.dummy },
	};

	for (size_t i = 0; i < ARRAY_SIZE(nums); i++) {
		size_t n = strlen(nums[i].name);
		if (str_has_prefix(w, len, nums[i].name)) {
			if (!parse_u32(w + n, len - n, nums[i].val))
				fail(EXIT_BAD_BOOT, "bad %s value in the command line", nums[i].name);
			if (nums[i].val == &wl.pages)
				wl.enabled = true;
			return true;
		}
	}
	for (size_t i = 0; i < ARRAY_SIZE(flags); i++) {
		size_t n = strlen(flags[i].name);
		u32 v;
		if (str_has_prefix(w, len, flags[i].name)) {
			if (!parse_u32(w + n, len - n, &v) || v > 1)
				fail(EXIT_BAD_BOOT, "bad %s value in the command line (0 or 1)",
				     flags[i].name);
			*flags[i].val = v;
			return true;
		}
	}
	if (str_equal(w, len, "apf=0")) {
		wl.apf_off = true;
		return true;
	}
	if (str_equal(w, len, "apf=1")) {
		wl.apf_off = false;
		return true;
	}
	return false;
}

struct hvm_memmap_entry {
	u64 addr;
	u64 size;
	u32 type;
	u32 reserved;
} __packed;

#define E820_RAM	1

/* The region (REGION_BASE, pages) must lie inside one RAM entry of the PVH memmap. */
void workload_check_region(u64 memmap_paddr, u32 memmap_entries, u32 version)
{
	if (!wl.enabled || wl.pages == 0)
		return;
	u64 start = REGION_BASE, end = REGION_BASE + (u64)wl.pages * PAGE_SIZE;

	if (version < 1 || !memmap_paddr || !memmap_entries)
		fail(EXIT_BAD_REGION, "pages=%u: no memory map in hvm_start_info (version %u)",
		     wl.pages, version);
	const struct hvm_memmap_entry *e = phys_to_virt(memmap_paddr);
	for (u32 i = 0; i < memmap_entries; i++) {
		if (e[i].type == E820_RAM && e[i].addr <= start && e[i].addr + e[i].size >= end)
			return;
	}
	fail(EXIT_BAD_REGION, "pages=%u: region 0x%lx-0x%lx is not inside RAM (memory map)",
	     wl.pages, start, end);
}

/* Runs on the BSP once every CPU is up (and in its idle loop). */
__noreturn void workload_run(void)
{
	struct cpu *bsp = &cpus[0];
	u32 ncpu = mp_cpus.count;

	wl.cpus = ncpu;
	wl.total_touchers = wl.pages ? wl.touchers * ncpu : 0;
	u32 ntasks = wl.total_touchers + wl.busy * ncpu + (wl.hotplug ? 1 : 0);
	if (ntasks > MAX_TASKS)
		fail(EXIT_BAD_BOOT, "%u tasks asked for, at most %u", ntasks, MAX_TASKS);
	if (wl.hotplug && ncpu < 2)
		fail(EXIT_BAD_BOOT, "hotplug= needs at least 2 cpus");
	if (wl.passes == 0)
		fail(EXIT_BAD_BOOT, "passes= must be at least 1");
	wl.stall_cycles = us_to_tsc(wl.stall_us);
	wl.slice_cycles = us_to_tsc(50);
	wl.dummy_cycles = us_to_tsc(wl.dummy_us);
	wl.touchers_left = wl.total_touchers;
	wl.first_bad_page = 0xffffffff;
	wl.tasks_alive = ntasks;

	kprintf("apfvm-ref: tsc_khz=%lu source=%s\n", tsc_khz, tsc_source);
	kprintf("apfvm-ref: workload pages=%u passes=%u touchers=%u busy=%u seed=%u evict=%u "
		"dummy=%u hotplug=%u tasks=%u apf=%u\n", wl.pages, wl.passes, wl.touchers,
		wl.busy, wl.seed, wl.evict, wl.dummy, wl.hotplug, ntasks, wl.apf);

	u32 ti = 0;
	for (u32 i = 0; i < ncpu; i++) {
		for (u32 j = 0; wl.pages && j < wl.touchers; j++, ti++) {
			struct task *t = task_create(&cpus[i], TASK_TOUCHER, toucher_main);
			u32 first = (u32)((u64)ti * wl.pages / wl.total_touchers);
			u32 last = (u32)((u64)(ti + 1) * wl.pages / wl.total_touchers);
			t->toucher_index = ti;
			t->slice_first = first;
			t->slice_count = last - first;
		}
		for (u32 j = 0; j < wl.busy; j++)
			task_create(&cpus[i], TASK_BUSY, busy_main);
	}
	if (wl.hotplug)
		task_create(bsp, TASK_CONTROLLER, controller_main);

	start_tsc = rdtsc();
	wl.deadline_tsc = start_tsc + (u64)wl.timeout_s * tsc_khz * 1000;
	watchdog_start();

	if (ntasks == 0)
		workload_finish(0, NULL);
	for (u32 i = 0; i < nr_tasks; i++) {
		struct task *t = &tasks[i];
		if (t->cpu == bsp)
			runq_add(bsp, t);
		else if (!push_incoming(t->cpu, t))
			fail(EXIT_AP_TIMEOUT, "cpu %u is not online", t->cpu->index);
	}
	idle_loop(bsp);
}

/* Without pages=: the boot test. The result line stays exactly as it always was. */
__noreturn void boot_report(u32 n, u32 code, bool hold)
{
	u64 wakealls = 0;

	for (u32 i = 0; i < n; i++)
		wakealls += cpus[i].st.wakealls;
	kprintf("apfvm-ref: apf=%u wakealls=%lu tsc_khz=%lu source=%s\n", wl.apf, wakealls,
		tsc_khz, tsc_source);
	if (hostile.mode)
		hostile_report(n);
	kprintf("APFVM-RESULT {\"verdict\":\"pass\",\"cpus\":%u}\n", n);
	if (hold)
		hold_forever();
	guest_exit(code);
}

static u64 max_u64(u64 a, u64 b)
{
	return a > b ? a : b;
}

/*
 * Every task exited (the last one calls this), or the watchdog or a task
 * gave up (forced_code != 0). Prints per-CPU lines and the result line, and
 * exits. Other CPUs may still take interrupts: the numbers are a snapshot.
 */
__noreturn void workload_finish(u32 forced_code, const char *forced_reason)
{
	if (atomic_cmpxchg(&wl.finishing, 0, 1) != 0)
		cpu_park();	/* someone else is reporting */

	u64 now = rdtsc();
	u64 elapsed = now - start_tsc;
	struct apf_stats tot = { 0 };
	u64 parked_at_exit = 0, dummies_left = 0, busy_ops = 0;

	for (u32 i = 0; i < wl.cpus; i++) {
		struct cpu *c = &cpus[i];
		struct apf_stats *s = &c->st;

		tot.pfaults += s->pfaults;
		tot.completions += s->completions;
		tot.dummies += s->dummies;
		tot.dummy_consumed += s->dummy_consumed;
		tot.wakealls += s->wakealls;
		tot.wakealls_after_online += s->wakealls_after_online;
		tot.wakeall_woken += s->wakeall_woken;
		tot.zero_tokens += s->zero_tokens;
		tot.dup_wakes += s->dup_wakes;
		tot.out_of_order += s->out_of_order;
		tot.max_parked = max_u64(tot.max_parked, s->max_parked);
		tot.parked_cycles += s->parked_cycles;
		tot.max_parked_cycles = max_u64(tot.max_parked_cycles, s->max_parked_cycles);
		tot.parked_at_offline += s->parked_at_offline;
		tot.offline_cycles += s->offline_cycles;
		parked_at_exit += c->nr_parked;
		dummies_left += apf_dummies_left(c);
		busy_ops += c->busy_ops;
		kprintf("apfvm-ref: cpu%u pfaults=%lu completions=%lu dummies=%lu dummy_consumed=%lu "
			"wakealls=%lu wakealls_after_online=%lu wakeall_woken=%lu dup_wakes=%lu "
			"zero_tokens=%lu out_of_order=%lu max_parked=%lu parked_ms=%lu "
			"max_parked_us=%lu parked_now=%u oldest_parked_ms=%lu dummies_left=%u busy_ops=%lu "
			"offline_cycles=%lu parked_at_offline=%lu hlt_skips=%lu\n",
			i, s->pfaults, s->completions, s->dummies, s->dummy_consumed, s->wakealls,
			s->wakealls_after_online, s->wakeall_woken, s->dup_wakes, s->zero_tokens,
			s->out_of_order, s->max_parked, s->parked_cycles / tsc_khz,
			s->max_parked_cycles * 1000 / tsc_khz, c->nr_parked,
			c->pk_head && now > c->pk_head->park_tsc ?
				(now - c->pk_head->park_tsc) / tsc_khz : 0, apf_dummies_left(c),
			c->busy_ops, s->offline_cycles, s->parked_at_offline, s->hlt_skips);
	}

	u64 pages_touched = 0, bad_bytes = 0, stalls = 0, stall_ops = 0, max_touch = 0;
	u32 unfinished = 0, failed = 0;
	for (u32 i = 0; i < nr_tasks; i++) {
		struct task *t = &tasks[i];

		pages_touched += t->pages_touched;
		bad_bytes += t->bad_bytes;
		stalls += t->stalls;
		stall_ops += t->busy_ops_during_stalls;
		max_touch = max_u64(max_touch, t->max_touch_cycles);
		if (!t->exited)
			unfinished++;
		else if (t->result)
			failed++;
	}
	u64 wrong_tokens = tot.zero_tokens + dummies_left;

	/* The verdict: the first problem found, in this order. */
	char reason[160];
	u32 code = exit_code_pass;
	reason[0] = '\0';
	if (forced_code) {
		code = forced_code;
		if (forced_code == EXIT_WATCHDOG)
			ksnprintf(reason, sizeof(reason), "watchdog: not finished after %u s: "
				  "%u tasks unfinished, %lu parked", wl.timeout_s, unfinished,
				  parked_at_exit);
		else
			ksnprintf(reason, sizeof(reason), "%s", forced_reason);
	} else if (bad_bytes) {
		code = EXIT_BAD_DATA;
		ksnprintf(reason, sizeof(reason), "%lu bad bytes, first in region page %u",
			  bad_bytes, wl.first_bad_page);
	} else if ((wrong_tokens || tot.dup_wakes || dummies_left) && !hostile_lenient_tokens()) {
		code = EXIT_BAD_TOKENS;
		ksnprintf(reason, sizeof(reason), "tokens: %lu wrong, %lu duplicate wakes, "
			  "%lu dummies left", wrong_tokens, tot.dup_wakes, dummies_left);
	} else if (parked_at_exit || unfinished || failed) {
		code = EXIT_TASKS;
		ksnprintf(reason, sizeof(reason), "tasks: %lu parked at exit, %u unfinished, "
			  "%u failed", parked_at_exit, unfinished, failed);
	}

	if (wl.hotplug && wl.hotplug_done < wl.hotplug)
		kprintf("apfvm-ref: hotplug: only %u of %u offline/online cycles done (the "
			"touchers finished first)\n", wl.hotplug_done, wl.hotplug);
	kprintf("apfvm-ref: elapsed_ms=%lu max_touch_us=%lu\n", elapsed / tsc_khz,
		max_touch * 1000 / tsc_khz);

	if (hostile.mode)
		hostile_report(wl.cpus);
	console_lock();
	if (reason[0])
		kprintf_locked("apfvm-ref: error: %s\n", reason);
	kprintf_locked("APFVM-RESULT {\"verdict\":\"%s\"", reason[0] ? "fail" : "pass");
	if (reason[0])
		kprintf_locked(",\"reason\":\"%s\"", reason);
	kprintf_locked(",\"cpus\":%u,\"apf\":%u,\"pfaults\":%lu,\"completions\":%lu,"
		       "\"dummies\":%lu,\"dummy_consumed\":%lu,\"wakealls\":%lu,"
		       "\"wakealls_after_online\":%lu,\"wrong_tokens\":%lu,\"dup_wakes\":%lu,"
		       "\"out_of_order\":%lu,\"max_parked\":%lu,\"parked_cycles\":%lu,"
		       "\"max_parked_cycles\":%lu,\"parked_at_exit\":%lu,\"dummies_left\":%lu,",
		       wl.cpus, wl.apf, tot.pfaults, tot.completions, tot.dummies,
		       tot.dummy_consumed, tot.wakealls, tot.wakealls_after_online, wrong_tokens,
		       tot.dup_wakes, tot.out_of_order, tot.max_parked, tot.parked_cycles,
		       tot.max_parked_cycles, parked_at_exit, dummies_left);
	kprintf_locked("\"pages\":%u,\"passes\":%u,\"pages_touched\":%lu,\"bad_bytes\":%lu,"
		       "\"first_bad_page\":%d,\"busy_ops\":%lu,\"stalls\":%lu,"
		       "\"busy_ops_during_stalls\":%lu,\"evictions_requested\":%lu,"
		       "\"pages_evicted\":%lu,\"offline_cycles\":%lu,\"parked_at_offline\":%lu,"
		       "\"snapshot_requested\":%u,\"tsc_khz\":%lu,\"elapsed_ms\":%lu}\n",
		       wl.pages, wl.passes, pages_touched, bad_bytes,
		       wl.first_bad_page == 0xffffffff ? -1 : (int)wl.first_bad_page, busy_ops,
		       stalls, stall_ops, wl.evictions_requested, wl.pages_evicted,
		       tot.offline_cycles, tot.parked_at_offline, wl.snapshot_requested, tsc_khz,
		       elapsed / tsc_khz);
	console_unlock();

	if (hold_after_result)
		hold_forever();
	guest_exit(code);
}
