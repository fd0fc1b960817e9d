/*
 * trap.c - the IDT and the exception handler.
 *
 * Two exceptions have fast paths (entry.S): #UD from CPL3 with UD2 at RIP
 * is a system call (sched.c), and #PF with the async PF flag set is a
 * "page not present" (apf.c). A #GP from wrmsr_safe() is an error return
 * (hostile= tests what KVM refuses). Any other exception is fatal: report it and
 * end the VM with EXIT_EXCEPTION. The guest never uses INT3/INT n.
 */
#include "guest.h"

#define GATE_INTERRUPT	0x8e	/* present, DPL0, 64-bit interrupt gate (clears IF) */
#define IST_DF		1	/* TSS ist[0] */

struct idt_gate {
	u16 offset_lo;
	u16 selector;
	u8 ist;
	u8 type;
	u16 offset_mid;
	u32 offset_hi;
	u32 reserved;
} __packed;

static struct idt_gate idt[256] __aligned(16);

extern const u64 isr_stubs[NUM_EXCEPTIONS];
extern void isr_spurious(void);

static void idt_set_gate(unsigned vec, u64 handler, u8 ist)
{
	idt[vec] = (struct idt_gate){
		.offset_lo = (u16)handler,
		.selector = KERNEL_CS,
		.ist = ist,
		.type = GATE_INTERRUPT,
		.offset_mid = (u16)(handler >> 16),
		.offset_hi = (u32)(handler >> 32),
	};
}

/* Build the shared IDT; done once by the BSP before any CPU loads it. */
void idt_init(void)
{
	for (unsigned vec = 0; vec < NUM_EXCEPTIONS; vec++)
		idt_set_gate(vec, isr_stubs[vec], vec == VEC_DOUBLE_FAULT ? IST_DF : 0);
	/* The fast paths: system calls, async PF, interrupts (entry.S). */
	idt_set_gate(VEC_UD, (u64)(uintptr_t)ud_entry, 0);
	idt_set_gate(VEC_PF, (u64)(uintptr_t)pf_entry, 0);
	idt_set_gate(VEC_APF_READY, (u64)(uintptr_t)apf_ready_entry, 0);
	idt_set_gate(VEC_APF_READY_ALT, (u64)(uintptr_t)apf_ready_alt_entry, 0);
	idt_set_gate(VEC_TIMER, (u64)(uintptr_t)timer_entry, 0);
	idt_set_gate(VEC_TIMER_HIGH, (u64)(uintptr_t)timer_entry, 0);
	idt_set_gate(VEC_IPI, (u64)(uintptr_t)ipi_entry, 0);
	idt_set_gate(VEC_SPURIOUS, (u64)(uintptr_t)isr_spurious, 0);
}

void idt_load(void)
{
	struct desc_ptr d = { .limit = sizeof(idt) - 1, .base = (u64)(uintptr_t)idt };

	asm volatile("lidt %0" : : "m"(d));
}

/*
 * With an empty IDT, the #UD from UD2 cannot be delivered (#GP), nor can
 * that (#DF), which makes the CPU shut down: a triple fault for the VMM.
 */
__noreturn void trigger_triple_fault(void)
{
	struct desc_ptr d = { .limit = 0, .base = 0 };

	asm volatile("lidt %0; ud2" : : "m"(d) : "memory");
	__builtin_unreachable();
}

/* Which CPU is this? Read the GS base MSR: valid even before cpu_init(). */
static int trap_cpu_index(void)
{
	uintptr_t c = (uintptr_t)rdmsr(MSR_GS_BASE);

	if (c < (uintptr_t)&cpus[0] || c >= (uintptr_t)&cpus[MAX_CPUS])
		return -1;
	return (int)((struct cpu *)c)->index;
}

/* Any exception that is not a system call or an async PF ends the run. */
__noreturn void fatal_exception(u64 vector, u64 error_code, u64 rip, u64 cs)
{
	int cpu = trap_cpu_index();
	u64 cr2 = read_cr2();

	console_lock_emergency();
	kprintf_locked("apfvm-ref: exception %u err=0x%lx rip=0x%lx cr2=0x%lx\n",
		       (unsigned)vector, error_code, rip, cr2);
	if (cs & 3)
		kprintf_locked("apfvm-ref: (in user mode)\n");
	console_unlock();
	fail(EXIT_EXCEPTION, "exception %u on cpu %d", (unsigned)vector, cpu);
}

void trap_handler(struct trap_frame *f);	/* called from isr_common */

void trap_handler(struct trap_frame *f)
{
	if (f->vector == VEC_GP && !(f->cs & 3) &&
	    f->rip == (u64)(uintptr_t)wrmsr_safe_insn) {
		f->rip = (u64)(uintptr_t)wrmsr_safe_gp;	/* refused: wrmsr_safe() returns 1 */
		return;
	}
	fatal_exception(f->vector, f->error_code, f->rip, f->cs);
}
