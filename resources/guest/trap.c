/*
 * trap.c - the IDT and the exception handler.
 *
 * Any CPU exception is fatal for now: report it and end the VM with
 * EXIT_EXCEPTION. Exceptions only come from real faults (the guest never
 * uses INT3/INT n).
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

void trap_handler(struct trap_frame *f);	/* called from isr_common */

void trap_handler(struct trap_frame *f)
{
	int cpu = trap_cpu_index();

	console_lock_emergency();
	kprintf_locked("apfvm-ref: exception %u err=0x%lx rip=0x%lx cr2=0x%lx\n",
		       (unsigned)f->vector, f->error_code, f->rip, read_cr2());
	console_unlock();
	fail(EXIT_EXCEPTION, "exception %u on cpu %d", (unsigned)f->vector, cpu);
}
