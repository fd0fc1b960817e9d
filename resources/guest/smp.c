/*
 * smp.c - bring up the APs listed in the MP table with INIT-SIPI-SIPI.
 *
 * APs are started one at a time, in MP table order, and each must check in
 * before the next is started. That keeps the output order deterministic
 * (the VMM's tests match it) and pins a missing CPU to its APIC id.
 */
#include "guest.h"

#define INIT_DELAY_US		10000		/* INIT -> first SIPI (MP spec: 10 ms) */
#define SIPI_DELAY_US		200		/* between the two SIPIs */
#define AP_TIMEOUT_US		5000000		/* how long one AP gets to check in */

struct mp_cpus mp_cpus;
static volatile u32 cpus_online;		/* CPUs that checked in, BSP included */

u32 cpus_online_count(void)
{
	return cpus_online;
}

/* The MP table position of an APIC id, or -1. */
static int cpu_index_of(u32 apic_id)
{
	for (u32 i = 0; i < mp_cpus.count; i++) {
		if (mp_cpus.apic_id[i] == apic_id)
			return (int)i;
	}
	return -1;
}

/* INIT-SIPI-SIPI one AP (first start, or back online after going offline). */
void ap_start(u32 index)
{
	u32 apic_id = mp_cpus.apic_id[index];

	x2apic_send_ipi(apic_id, ICR_INIT);
	delay_us(INIT_DELAY_US);
	x2apic_send_ipi(apic_id, ICR_STARTUP | SIPI_VECTOR);
	delay_us(SIPI_DELAY_US);
	/* The second SIPI is ignored by an AP that already started. */
	x2apic_send_ipi(apic_id, ICR_STARTUP | SIPI_VECTOR);
}

/* Runs on the BSP once it is set up; the BSP is cpus[0]. */
void smp_boot_aps(void)
{
	atomic_fetch_add(&cpus_online, 1);	/* the BSP itself */
	memcpy(phys_to_virt(TRAMPOLINE_ADDR), trampoline_start,
	       (size_t)(trampoline_end - trampoline_start));

	for (u32 i = 1; i < mp_cpus.count; i++) {
		ap_start(i);

		u64 deadline = rdtsc() + AP_TIMEOUT_US * TSC_PER_US;

		while (!cpus[i].online) {
			if (rdtsc() > deadline)
				fail(EXIT_AP_TIMEOUT, "cpu %u (apic %u) did not come up",
				     i, mp_cpus.apic_id[i]);
			cpu_relax();
		}
	}
}

/*
 * An AP that the BSP brings back online (SYS_CPU_ONLINE): same stack as
 * before, nothing printed. Its tasks come back from the BSP by themselves.
 */
static __noreturn void ap_reenter(struct cpu *c, u32 index, u32 apic_id)
{
	cpu_init(c, index, apic_id);
	sched_init_cpu(c);
	c->reonline = 1;
	if (wl.apf)
		apf_enable(c);	/* KVM answers with a wake-all (wakealls_after_online) */
	c->st.offline_cycles++;
	spin_lock(&c->in_lock);
	c->state = CPU_ONLINE;
	spin_unlock(&c->in_lock);
	idle_loop(c);
}

/* C entry of every AP (from ap_start64 in trampoline.S), on its own stack. */
__noreturn void ap_main(u64 stack_top);

__noreturn void ap_main(u64 stack_top)
{
	/* Report faults from here on (GS base is still 0: trap.c copes). */
	idt_load();

	u32 apic_id = x2apic_enable();
	int index = cpu_index_of(apic_id);

	if (index <= 0)
		fail(EXIT_BAD_APIC, "AP with apic id %u is not an AP in the MP table", apic_id);

	struct cpu *c = &cpus[index];

	if (c->state == CPU_BOOTING && c->claimed)
		ap_reenter(c, (u32)index, apic_id);
	if (atomic_cmpxchg(&c->claimed, 0, 1) != 0)
		fail(EXIT_BAD_APIC, "two CPUs report apic id %u", apic_id);
	cpu_init(c, (u32)index, apic_id);
	c->stack_top = stack_top;

	kprintf("apfvm-ref: cpu %u apic %u long mode\n", c->index, c->apic_id);
	if (wl.apf) {
		apf_enable(c);
		if (c->apf_on && !apf_wait_wakeall(c, 0, 1000000))
			kprintf("apfvm-ref: cpu%u: no wake-all within 1 s of enabling async PF\n",
				c->index);
	}
	sched_init_cpu(c);
	c->state = CPU_ONLINE;
	atomic_fetch_add(&cpus_online, 1);
	store_release(&c->online, 1);

	if (wl.enabled)
		idle_loop(c);
	cpu_park();
}
