/*
 * cpu.c - per-CPU state: GS base, TSS, IDT, and the x2APIC.
 */
#include "guest.h"

#define CPUID1_ECX_X2APIC	(1u << 21)
#define TSS_TYPE_AVAIL64	0x89	/* present, DPL0, 64-bit TSS (available) */

struct cpu cpus[MAX_CPUS];

/* IST1 stacks: #DF must not run on a possibly broken kernel stack. */
static u8 ist_stacks[MAX_CPUS][IST_STACK_SIZE] __aligned(16);

/* Write this CPU's 16-byte TSS descriptor into the shared GDT and load TR. */
static void tss_load(struct cpu *c)
{
	u64 base = (u64)(uintptr_t)&c->tss;
	u64 limit = sizeof(c->tss) - 1;
	unsigned slot = TSS_SEL(c->index) / 8;

	gdt[slot] = (limit & 0xffff) | ((base & 0xffffff) << 16) |
		    ((u64)TSS_TYPE_AVAIL64 << 40) | (((limit >> 16) & 0xf) << 48) |
		    (((base >> 24) & 0xff) << 56);
	gdt[slot + 1] = base >> 32;
	asm volatile("ltr %w0" : : "r"((u16)TSS_SEL(c->index)) : "memory");
}

/*
 * Called once on each CPU, already in long mode on its own stack. After
 * this, this_cpu() works and exceptions are reported.
 */
void cpu_init(struct cpu *c, u32 index, u32 apic_id)
{
	c->self = c;
	c->index = index;
	c->apic_id = apic_id;
	c->apf_area = &c->apf;
	c->apf_vector = VEC_APF_READY;
	wrmsr(MSR_GS_BASE, (u64)(uintptr_t)c);

	c->tss.ist[0] = (u64)(uintptr_t)&ist_stacks[index][IST_STACK_SIZE];
	c->tss.iomap_base = sizeof(c->tss);	/* no I/O permission bitmap */
	tss_load(c);

	/*
	 * DS/ES hold the DPL3 data selector, as in Linux: IRETQ to CPL3 would
	 * otherwise null them on every return to a user task.
	 */
	asm volatile("movl %0, %%ds; movl %0, %%es" : : "r"((u32)(USER_DS | 3)));

	idt_load();
}

bool x2apic_supported(void)
{
	u32 a, b, c, d;

	cpuid(1, 0, &a, &b, &c, &d);
	return c & CPUID1_ECX_X2APIC;
}

/*
 * Switch this CPU's local APIC to x2APIC mode and return its x2APIC id.
 * Disabled -> x2APIC is an invalid transition (#GP), so enable xAPIC first
 * if the APIC is globally disabled. Also software-enable the APIC (SVR) so
 * that it behaves like an OS-owned APIC; interrupts stay masked (IF=0).
 */
u32 x2apic_enable(void)
{
	u64 base = rdmsr(MSR_APIC_BASE);

	if (!(base & APIC_BASE_EN)) {
		base |= APIC_BASE_EN;
		wrmsr(MSR_APIC_BASE, base);
	}
	if (!(base & APIC_BASE_EXTD)) {
		base |= APIC_BASE_EXTD;
		wrmsr(MSR_APIC_BASE, base);
	}
	wrmsr(MSR_X2APIC_SVR, APIC_SVR_ENABLE | VEC_SPURIOUS);
	return (u32)rdmsr(MSR_X2APIC_ID);
}

/* In x2APIC mode the ICR is one 64-bit MSR: destination in bits 63:32. */
void x2apic_send_ipi(u32 apic_id, u32 icr_low)
{
	wrmsr(MSR_X2APIC_ICR, ((u64)apic_id << 32) | icr_low);
}
