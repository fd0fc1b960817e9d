/*
 * guest.h - shared definitions of the apfvm reference test guest.
 *
 * The first part is plain #defines so that the assembly files (which gcc
 * preprocesses, *.S) and the C files agree on the memory layout, the GDT
 * selectors and the control-register bits.
 */
#ifndef APFVM_GUEST_H
#define APFVM_GUEST_H

/* ---- Memory layout (must match guest.ld and the VMM's layout) ---- */
#define KERNEL_BASE		0x100000	/* link and load address (1 MiB) */
#define TRAMPOLINE_ADDR		0x8000		/* AP real-mode entry, free in the VMM layout */
#define SIPI_VECTOR		(TRAMPOLINE_ADDR >> 12)	/* AP starts at CS:IP = 0x0800:0000 */

#define MAX_CPUS		64
#define STACK_SHIFT		14
#define STACK_SIZE		(1 << STACK_SHIFT)	/* 16 KiB kernel stack per CPU */
#define IST_STACK_SIZE		4096		/* per-CPU stack for #DF (IST1) */

/*
 * GDT layout, shared by all CPUs. The user segments are laid out the way
 * SYSCALL/SYSRET need them (STAR[47:32] = KERNEL_CS, STAR[63:48] = USER_CS32:
 * SYSRET loads SS = USER_CS32 + 8 and CS = USER_CS32 + 16), so that user mode
 * can be added later without reshuffling. Each CPU gets its own 16-byte TSS
 * descriptor because LTR marks the descriptor busy.
 */
#define KERNEL_CS32		0x08	/* flat 32-bit code, only used while booting */
#define KERNEL_CS		0x10	/* 64-bit code, DPL0 */
#define KERNEL_DS		0x18	/* flat data, DPL0 */
#define USER_CS32		0x20	/* placeholder for the SYSRET layout, DPL3 */
#define USER_DS			0x28	/* flat data, DPL3 */
#define USER_CS			0x30	/* 64-bit code, DPL3 */
#define TSS_SEL_BASE		0x38
#define TSS_SEL(cpu)		(TSS_SEL_BASE + 16 * (cpu))
#define GDT_SIZE		(TSS_SEL_BASE + 16 * MAX_CPUS)

/* ---- Control registers and MSRs ---- */
#define CR0_PE			0x00000001
#define CR0_NW			0x20000000
#define CR0_CD			0x40000000
#define CR0_PG			0x80000000
#define CR4_PAE			0x00000020

#define MSR_APIC_BASE		0x1b
#define APIC_BASE_EXTD		(1 << 10)	/* x2APIC mode */
#define APIC_BASE_EN		(1 << 11)
#define MSR_EFER		0xc0000080
#define EFER_LME		(1 << 8)
#define MSR_GS_BASE		0xc0000101

/* KVM paravirtual MSRs (Documentation/virt/kvm/x86/msr.rst) */
#define MSR_KVM_SYSTEM_TIME_NEW	0x4b564d01	/* kvmclock: only used to learn the TSC rate */
#define MSR_KVM_ASYNC_PF_EN	0x4b564d02
#define MSR_KVM_ASYNC_PF_INT	0x4b564d06
#define MSR_KVM_ASYNC_PF_ACK	0x4b564d07
#define KVM_ASYNC_PF_ENABLED	(1 << 0)
#define KVM_ASYNC_PF_SEND_ALWAYS (1 << 1)
#define KVM_ASYNC_PF_DELIVERY_AS_INT (1 << 3)
#define KVM_PV_REASON_PAGE_NOT_PRESENT 1
#define KVM_FEATURE_CLOCKSOURCE2 3
#define KVM_FEATURE_ASYNC_PF	4
#define KVM_FEATURE_ASYNC_PF_INT 14
#define APF_WAKE_ALL		0xffffffffu	/* page-ready token: wake every task parked on this CPU */

/* x2APIC registers are MSRs 0x800 + (xAPIC MMIO offset >> 4). */
#define MSR_X2APIC_ID		0x802
#define MSR_X2APIC_SVR		0x80f
#define MSR_X2APIC_EOI		0x80b
#define MSR_X2APIC_ICR		0x830
#define MSR_X2APIC_LVT_TIMER	0x832
#define MSR_X2APIC_TIMER_INIT	0x838
#define MSR_X2APIC_TIMER_DIV	0x83e
#define APIC_LVT_PERIODIC	(1 << 17)
#define APIC_TIMER_DIV_1	0xb
#define APIC_SVR_ENABLE		(1 << 8)
#define ICR_INIT		0x4500	/* delivery mode INIT, level assert */
#define ICR_STARTUP		0x4600	/* delivery mode Start-up, level assert; | vector */

/* ---- Page table entry bits ---- */
#define PTE_P			0x001
#define PTE_W			0x002
#define PTE_U			0x004	/* user accessible (set at every level: no protection) */
#define PTE_PS			0x080	/* 2 MiB page in a page directory */

/* ---- Devices ---- */
#define EXIT_PORT		0xf4	/* outl(code) ends the VM with (code & 0xff) */
#define SNAPSHOT_PORT		0xf0	/* outl(any): the VMM snapshots the VM right here */
#define PAGER_PORT_PFN		0xf8	/* apfvm pager control: first pfn; read: pages evicted */
#define PAGER_PORT_COUNT	0xfc	/* page count: evicts synchronously */
#define COM1_PORT		0x3f8

/* ---- PVH ---- */
#define XEN_ELFNOTE_PHYS32_ENTRY 18
#define HVM_START_MAGIC		0x336ec578

/* ---- Vectors ---- */
#define VEC_UD			6	/* #UD: ud2 from CPL3 is the system call */
#define VEC_DOUBLE_FAULT	8
#define VEC_GP			13	/* #GP: wrmsr_safe() turns it into an error return */
#define VEC_PF			14	/* #PF: also async PF "page not present" */
#define VEC_APF_READY		0xec	/* async PF "page ready" (MSR_KVM_ASYNC_PF_INT) */
#define VEC_APF_READY_ALT	0xe0	/* a second page-ready vector (hostile=msr-script) */
#define VEC_TIMER		0xef	/* BSP's LAPIC timer: watchdog only, never preempts */
#define VEC_TIMER_HIGH		0xfe	/* the watchdog with hostile=no-eoi (above 0xec's class) */
#define VEC_IPI			0xf0	/* reschedule: migrated tasks arrived / go offline */
#define VEC_SPURIOUS		0xff	/* x2APIC spurious-interrupt vector */
#define NUM_EXCEPTIONS		32

/* ---- Exit codes (see README.md) ---- */
#define EXIT_BAD_BOOT		2	/* bad hvm_start_info or command line */
#define EXIT_BAD_MPTABLE	3
#define EXIT_AP_TIMEOUT		4
#define EXIT_BAD_APIC		5	/* no x2APIC, or APIC id disagrees with the MP table */
#define EXIT_BAD_DATA		6	/* a toucher found a wrong byte */
#define EXIT_BAD_TOKENS		7	/* wrong or duplicate page-ready tokens, dummies left */
#define EXIT_TASKS		8	/* a task failed, did not finish, or is still parked */
#define EXIT_WATCHDOG		9	/* timeout_s passed before the workload finished */
#define EXIT_BAD_REGION		10	/* pages= region not inside RAM (PVH memmap) */
#define EXIT_HOTPLUG		11	/* CPU offline/online did not complete */
#define EXIT_EXCEPTION		0x7e

/* ---- System calls: ud2 at CPL3, number in RAX, arguments in RDI, RSI, RDX, R10, R8 ---- */
#define SYS_YIELD		0	/* run another ready task of this CPU, if any */
#define SYS_EXIT		1	/* (result): this task is done; 0 = success */
#define SYS_EVICT		2	/* (): ask the VMM to evict the whole region; returns pages evicted */
#define SYS_CPU_OFFLINE		3	/* (cpu): ask CPU to go offline (asynchronous) */
#define SYS_CPU_ONLINE		4	/* (cpu): INIT/SIPI an offline CPU (asynchronous) */
#define SYS_BAD_DATA		5	/* (page, pass, offset, expected, got): log a wrong word */
#define SYS_FAIL		6	/* (exit code, message index): fail the run now */

/* ---- Per-task stacks ---- */
#define MAX_TASKS		256
#define KSTACK_SIZE		8192
#define USTACK_SIZE		16384

/* ---- Pageable region: guest-physical, touched only by user tasks ---- */
#define REGION_BASE		0x2000000ULL	/* 32 MiB */
#define PAGE_SIZE		4096
#define APF_HASH_SIZE		256
#define APF_DUMMY_POOL		32	/* dummy entries per CPU */
#define DONE_HISTORY		8	/* completed tokens remembered per task (dup detection) */

#ifdef __ASSEMBLER__
/*
 * 32-bit protected mode -> long mode with the shared identity page tables: PAE, CR3,
 * EFER.LME, then paging. Used by the BSP's PVH entry and by the AP trampoline.
 */
.macro ENTER_LONG_MODE_32
	movl	%cr4, %eax
	orl	$CR4_PAE, %eax
	movl	%eax, %cr4
	movl	$pml4, %eax
	movl	%eax, %cr3
	movl	$MSR_EFER, %ecx
	rdmsr
	orl	$EFER_LME, %eax
	wrmsr
	movl	%cr0, %eax
	orl	$(CR0_PG | CR0_PE), %eax
	movl	%eax, %cr0
.endm

/* First thing in 64-bit code: flat kernel data segments, null FS/GS (bases come by MSR). */
.macro LOAD_KERNEL_DATA_SEGMENTS_64
	movl	$KERNEL_DS, %eax
	movl	%eax, %ds
	movl	%eax, %es
	movl	%eax, %ss
	xorl	%eax, %eax
	movl	%eax, %fs
	movl	%eax, %gs
.endm
#endif

#ifndef __ASSEMBLER__

#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

typedef uint8_t u8;
typedef uint16_t u16;
typedef uint32_t u32;
typedef uint64_t u64;
typedef int8_t s8;
typedef int64_t s64;

#define __packed	__attribute__((packed))
#define __aligned(n)	__attribute__((aligned(n)))
#define __noreturn	__attribute__((noreturn))
#define __printf(a, b)	__attribute__((format(printf, a, b)))

#define likely(x)	__builtin_expect(!!(x), 1)
#define unlikely(x)	__builtin_expect(!!(x), 0)

#define ARRAY_SIZE(a)	(sizeof(a) / sizeof((a)[0]))

/* Guest RAM is identity mapped (0-4 GiB), so a physical address is a pointer. */
static inline void *phys_to_virt(u64 paddr)
{
	return (void *)(uintptr_t)paddr;
}

/* ---- Port I/O ---- */
static inline void outb(u16 port, u8 val)
{
	asm volatile("outb %0, %1" : : "a"(val), "Nd"(port));
}

static inline void outl(u16 port, u32 val)
{
	asm volatile("outl %0, %1" : : "a"(val), "Nd"(port));
}

static inline u32 inl(u16 port)
{
	u32 val;
	asm volatile("inl %1, %0" : "=a"(val) : "Nd"(port));
	return val;
}

static inline u8 inb(u16 port)
{
	u8 val;
	asm volatile("inb %1, %0" : "=a"(val) : "Nd"(port));
	return val;
}

/* ---- MSRs, CPUID, TSC, control registers ---- */
static inline u64 rdmsr(u32 msr)
{
	u32 lo, hi;
	asm volatile("rdmsr" : "=a"(lo), "=d"(hi) : "c"(msr));
	return ((u64)hi << 32) | lo;
}

static inline void wrmsr(u32 msr, u64 val)
{
	asm volatile("wrmsr" : : "c"(msr), "a"((u32)val), "d"((u32)(val >> 32)) : "memory");
}

static inline void cpuid(u32 leaf, u32 subleaf, u32 *a, u32 *b, u32 *c, u32 *d)
{
	asm volatile("cpuid" : "=a"(*a), "=b"(*b), "=c"(*c), "=d"(*d) : "a"(leaf), "c"(subleaf));
}

static inline u64 rdtsc(void)
{
	u32 lo, hi;
	asm volatile("rdtsc" : "=a"(lo), "=d"(hi));
	return ((u64)hi << 32) | lo;
}

static inline u64 read_cr2(void)
{
	u64 val;
	asm volatile("mov %%cr2, %0" : "=r"(val));
	return val;
}

/*
 * Spin-wait hint. Deliberately not PAUSE: the CPL0 instruction emulator on
 * our hosts only handles the plain integer instruction set, so only a
 * compiler barrier (forces the polled variable to be re-read).
 */
static inline void cpu_relax(void)
{
	asm volatile("" : : : "memory");
}

static inline __noreturn void cpu_park(void)
{
	for (;;)
		asm volatile("cli; hlt" : : : "memory");
}

/*
 * Atomics, written out so the instructions are exactly LOCK CMPXCHG / LOCK
 * XADD (gcc's __atomic builtins may use XCHG or MFENCE for seq_cst).
 * x86 is TSO, so a plain store after a compiler barrier is a release store.
 */
static inline u32 atomic_cmpxchg(volatile u32 *p, u32 old, u32 new)
{
	asm volatile("lock cmpxchgl %2, %1" : "+a"(old), "+m"(*p) : "r"(new) : "memory");
	return old;	/* the value found in *p; == old on success */
}

static inline u32 atomic_fetch_add(volatile u32 *p, u32 val)
{
	asm volatile("lock xaddl %0, %1" : "+r"(val), "+m"(*p) : : "memory");
	return val;
}

static inline void store_release(volatile u32 *p, u32 val)
{
	asm volatile("" : : : "memory");
	*p = val;
}

static inline void spin_lock(volatile u32 *l)
{
	while (atomic_cmpxchg(l, 0, 1) != 0) {
		while (*l)
			cpu_relax();
	}
}

static inline void spin_unlock(volatile u32 *l)
{
	store_release(l, 0);
}

static inline void irq_enable(void)
{
	asm volatile("sti" : : : "memory");
}

static inline void irq_disable(void)
{
	asm volatile("cli" : : : "memory");
}

/* ---- Time (the TSC rate is unknown; assume a fast one so waits are never too short) ---- */
#define TSC_ASSUMED_HZ		3000000000ULL
#define TSC_PER_US		(TSC_ASSUMED_HZ / 1000000)
void delay_us(u64 us);

/* Measured rate (tsc.c): set once by the BSP before the APs start. */
extern u64 tsc_khz;
extern const char *tsc_source;
void tsc_calibrate(void);
u64 us_to_tsc(u64 us);

/* ---- Per-CPU data (cpu.c) ---- */
struct tss {
	u32 reserved0;
	u64 rsp[3];		/* rsp[0]: kernel stack of the running task (entry from CPL3) */
	u64 reserved1;
	u64 ist[7];		/* interrupt stacks; ist[0] is IST1 (#DF) */
	u64 reserved2;
	u16 reserved3;
	u16 iomap_base;		/* >= limit: no I/O bitmap, user port I/O faults */
} __packed;

/* The async PF area KVM writes (MSR_KVM_ASYNC_PF_EN points at it). */
struct apf_area {
	volatile u32 flags;	/* KVM_PV_REASON_PAGE_NOT_PRESENT with a not-present #PF */
	volatile u32 token;	/* page-ready token; the guest writes 0 when consumed */
	u8 pad[56];
} __aligned(64);

/*
 * An entry of a CPU's token hash: a parked task's sleep node (task != NULL)
 * or a dummy (task == NULL): a page-ready that came before its page-not-present.
 */
struct apf_node {
	struct apf_node *next;	/* hash chain, or free list for dummies */
	struct task *task;
	u32 token;
};

/* Per-CPU counters; the result line sums them (max_* take the maximum). */
struct apf_stats {
	u64 pfaults;		/* page-not-present #PFs received */
	u64 completions;	/* page-ready with a token that woke a parked task */
	u64 dummies;		/* page-ready that found no sleeper: dummy inserted */
	u64 dummy_consumed;	/* page-not-present that found its dummy: did not sleep */
	u64 wakealls;		/* page-ready with token 0xffffffff */
	u64 wakealls_after_online;	/* ... received after this CPU came back online */
	u64 wakeall_woken;	/* tasks woken by wake-alls (KVM's and our own at offline) */
	u64 zero_tokens;	/* page-ready with token 0 (counted as wrong tokens) */
	u64 dup_wakes;		/* page-ready for a token already completed */
	u64 out_of_order;	/* completion whose task is not the oldest parked one */
	u64 max_parked;		/* most tasks parked at once */
	u64 parked_cycles;	/* TSC cycles from park to wake, summed */
	u64 max_parked_cycles;
	u64 parked_at_offline;	/* tasks parked when this CPU went offline (summed) */
	u64 offline_cycles;	/* times this CPU went offline and came back */
	u64 hlt_skips;		/* interrupts taken between STI and HLT in idle */
};

/* Per-CPU counters of hostile= (hostile.c); reported on the `hostile` line. */
struct hostile_stats {
	u64 wrmsr_tried;	/* apf-outside-ram: bad MSR_KVM_ASYNC_PF_EN values written */
	u64 wrmsr_gp;		/* ... of which KVM refused with #GP */
	u64 acks_skipped;	/* no-ack, no-eoi: page-readys not acknowledged */
	u64 eois_skipped;	/* no-eoi: page-readys not EOI'd */
	u64 toggles;		/* toggle: disable + enable pairs done */
	u64 spins;		/* cli-spin: IF=0 spins done */
	u64 spin_cycles;
	u64 parked_during_spin;	/* cli-spin: tasks parked on this CPU while it spun */
	u64 others_completed_during_spin;	/* cli-spin: completions other CPUs took meanwhile */
	u64 msr_writes;		/* msr-script: script writes done on this CPU */
	u64 msr_gp;		/* ... of which KVM refused with #GP */
	u64 int_reverted;	/* msr-script: accepted page-ready vectors < 32 we put back */
	u64 self_wakes;		/* msr-script: tasks woken by the guest after async PF went off */
	u64 restores;		/* msr-script: proper async PF set up again from idle */
	u64 dummies_dropped;	/* msr-script: page-readys with no sleeper and no dummy left */
};

enum task_kind { TASK_IDLE, TASK_TOUCHER, TASK_BUSY, TASK_CONTROLLER };

struct cpu;

struct task {
	u64 ksp;		/* saved kernel RSP while switched out (switch_to) */
	u64 kstack_top;		/* TSS.RSP0 while it runs */
	struct task *next;	/* run queue / incoming list */
	struct task *pk_prev, *pk_next;	/* the CPU's parked list, oldest first */
	struct apf_node node;	/* its entry in the token hash while parked */
	struct cpu *volatile cpu;	/* where it runs now; stable while it runs */
	struct cpu *home;	/* where it was created (it returns there after hotplug) */
	u32 id;
	u32 kind;
	u32 done_pos;
	u32 done_tokens[DONE_HISTORY];	/* last tokens that woke it */
	u64 park_tsc;
	/* set up by the kernel, read by the task */
	u32 toucher_index;	/* global index among touchers */
	u32 slice_first;	/* region page index of its first page */
	u32 slice_count;
	/* written by the task (user mode), summed in the result */
	volatile u64 pages_touched;
	volatile u64 bad_bytes;
	volatile u64 stalls;
	volatile u64 busy_ops_during_stalls;
	volatile u64 max_touch_cycles;
	volatile u32 exited;
	volatile u32 result;	/* SYS_EXIT argument */
};

enum cpu_state { CPU_DOWN = 0, CPU_ONLINE, CPU_GOING_OFFLINE, CPU_OFFLINE, CPU_BOOTING };

struct cpu {
	struct cpu *self;	/* must stay first: this_cpu() reads %gs:0 */
	u32 index;		/* 0 = BSP, APs 1.. in MP table order */
	u32 apic_id;		/* x2APIC id */
	volatile u32 claimed;	/* an AP took this slot (catches duplicate APIC ids) */
	volatile u32 online;	/* set once the CPU printed its line and checked in */
	struct tss tss __aligned(16);

	/* scheduler (sched.c); only this CPU touches these, with IF=0 */
	struct task *current;
	struct task *rq_head, *rq_tail;
	struct task *pk_head, *pk_tail;	/* parked tasks, oldest first */
	struct task idle;	/* this CPU's idle context (its own stack) */
	u64 stack_top;		/* its own (boot/idle) stack, reused when it comes back online */
	volatile u32 nr_ready;	/* ready tasks queued; user tasks yield only when > 0 */
	volatile u32 offline_req;	/* the BSP asked this CPU to go offline */
	volatile u32 state;	/* enum cpu_state */
	volatile u32 nr_parked;
	volatile u32 in_lock;	/* protects incoming and state changes that stop migration */
	struct task *volatile incoming;	/* tasks migrated here by other CPUs */
	volatile u32 reonline;	/* came back online at least once */
	u32 apf_on;		/* async PF enabled on this CPU */

	/* async PF (apf.c) */
	struct apf_area apf;
	/*
	 * The area KVM writes now: &apf, except with hostile=msr-script, whose
	 * writes move it (or turn async PF off: then a zero area nobody writes).
	 */
	struct apf_area *apf_area;
	u32 apf_vector;		/* the page-ready vector KVM uses now */
	u32 apf_dirty;		/* msr-script changed the set-up apf_enable() made */
	struct apf_node *hash[APF_HASH_SIZE];
	struct apf_node *dummy_free;
	u32 dummies_live;
	struct apf_node dummy_pool[APF_DUMMY_POOL];
	struct apf_stats st;
	struct hostile_stats hst;

	/* incremented by busy tasks in user mode; read by touchers */
	volatile u64 busy_ops __aligned(64);
};

extern struct cpu cpus[MAX_CPUS];

static inline struct cpu *this_cpu(void)
{
	struct cpu *c;
	asm volatile("movq %%gs:0, %0" : "=r"(c));
	return c;
}

void cpu_init(struct cpu *c, u32 index, u32 apic_id);
bool x2apic_supported(void);
u32 x2apic_enable(void);
void x2apic_send_ipi(u32 apic_id, u32 icr_low);

/* ---- Traps (trap.c) ---- */
struct trap_frame {
	/* pushed by isr_common in entry.S */
	u64 r15, r14, r13, r12, r11, r10, r9, r8;
	u64 rbp, rdi, rsi, rdx, rcx, rbx, rax;
	/* pushed by the per-vector stub (error code: by the CPU or a dummy 0) */
	u64 vector, error_code;
	/* pushed by the CPU */
	u64 rip, cs, rflags, rsp, ss;
};

struct desc_ptr {
	u16 limit;
	u64 base;
} __packed;

/*
 * The frame of the fast entry paths (#PF, #UD, interrupts): entry.S pushes
 * the vector and the caller-saved registers only. The callee-saved ones
 * stay in the CPU through C code and switch_to() saves them on a switch.
 */
struct kframe {
	u64 r11, r10, r9, r8, rdi, rsi, rdx, rcx, rax;
	u64 vector, error_code;	/* error code: by the CPU (#PF) or a dummy 0 */
	u64 rip, cs, rflags, rsp, ss;
};

void idt_init(void);
void idt_load(void);
__noreturn void trigger_triple_fault(void);
__noreturn void fatal_exception(u64 vector, u64 error_code, u64 rip, u64 cs);

/* entry.S */
void switch_to(u64 *prev_ksp, u64 next_ksp);
extern const u8 fast_exit[];
void pf_entry(void);
void ud_entry(void);
void apf_ready_entry(void);
void apf_ready_alt_entry(void);
void ipi_entry(void);
void timer_entry(void);

extern const u8 idle_hlt[];

/* An interrupt that hit idle between STI and HLT: do not halt after it. */
static inline void skip_idle_hlt(struct cpu *c, struct kframe *f)
{
	if (unlikely(f->rip == (u64)(uintptr_t)idle_hlt)) {
		f->rip++;
		c->st.hlt_skips++;
	}
}

static inline void apic_eoi(void)
{
	wrmsr(MSR_X2APIC_EOI, 0);
}

/* ---- Async PF, the guest side (apf.c) ---- */
bool apf_advertised(void);
void apf_enable(struct cpu *c);
void apf_disable(struct cpu *c);
bool apf_wait_wakeall(struct cpu *c, u64 before, u64 timeout_us);
void pf_handler(struct kframe *f);
void apf_ready_handler(struct kframe *f);
u32 apf_wake_all_parked(struct cpu *c);
u32 apf_dummies_left(struct cpu *c);

/* ---- hostile=<mode>: misbehaving on purpose (hostile.c) ---- */
enum hostile_mode {
	HOSTILE_NONE = 0,
	HOSTILE_APF_OUTSIDE_RAM,	/* bad MSR_KVM_ASYNC_PF_EN values instead of enabling */
	HOSTILE_NO_ACK,			/* page-ready: EOI but never MSR_KVM_ASYNC_PF_ACK */
	HOSTILE_NO_EOI,			/* page-ready: neither EOI nor ACK */
	HOSTILE_TOGGLE,			/* disable + enable async PF `toggles` times with tasks parked */
	HOSTILE_CLI_SPIN,		/* spin with IF=0 for spin_ms with a task parked */
	HOSTILE_MSR_SCRIPT,		/* the async PF MSR writes of msr_ops= (fuzzing) */
};

/* msr-script: one write; kind % 3 picks the MSR (INT, EN, ACK). */
#define MAX_MSR_OPS		128
struct msr_op {
	u8 kind;
	u64 val;
};

struct hostile {
	u32 mode;		/* enum hostile_mode */
	u32 toggles;		/* toggle: total over all CPUs */
	u32 toggle_burst;	/* toggle: pairs per page-not-present */
	u32 spin_ms;		/* cli-spin */
	volatile u32 toggles_claimed;
	bool msr_keep_refused;	/* msr-script: no EN = 0 after a refused EN write */
	u32 msr_nops;		/* msr-script: writes in msr_ops */
	volatile u32 msr_next;	/* ... the next one to do, over all CPUs */
	struct msr_op msr_ops[MAX_MSR_OPS];
};
extern struct hostile hostile;

bool hostile_parse_word(const char *word, size_t len);
void hostile_apf_enable(struct cpu *c);
void hostile_ready_ack(struct cpu *c);
void hostile_parked(struct cpu *c);
void hostile_yield(struct cpu *c);
void hostile_idle(struct cpu *c);
bool hostile_lenient_tokens(void);
void hostile_report(u32 cpus);
int wrmsr_safe(u32 msr, u64 val);	/* entry.S: 0, or 1 if the wrmsr raised #GP */
extern const u8 wrmsr_safe_insn[], wrmsr_safe_gp[];

/* ---- Tasks and the per-CPU scheduler (sched.c) ---- */
extern struct task tasks[MAX_TASKS];
extern u32 nr_tasks;
void sched_init_cpu(struct cpu *c);
struct task *task_create(struct cpu *c, u32 kind, void (*entry)(struct task *));
void schedule(struct cpu *c, struct task *prev);

/* Queue a task at the tail of this CPU's run queue (IF=0, this CPU only). */
static inline void runq_add(struct cpu *c, struct task *t)
{
	t->next = NULL;
	if (c->rq_tail)
		c->rq_tail->next = t;
	else
		c->rq_head = t;
	c->rq_tail = t;
	c->nr_ready++;
}
bool push_incoming(struct cpu *dst, struct task *t);
__noreturn void idle_loop(struct cpu *c);
void run_from_idle(struct cpu *c);
void ud_handler(struct kframe *f);
void ipi_handler(struct kframe *f);
void timer_handler(struct kframe *f);
void watchdog_start(void);

/* ---- The workload (workload.c) and its user-mode tasks (user.c) ---- */
struct workload {
	/* command line */
	bool enabled;		/* pages= given: run tasks, print the full result */
	bool evict;
	bool dummy;
	bool apf_off;		/* apf=0: do not enable async PF */

	bool fail_data;		/* fail=data: corrupt one byte on purpose (checker self-test) */
	u32 pages, passes, touchers, busy, seed, stall_us, timeout_s, hotplug, dummy_us;
	u32 snapshot_pfault;	/* ask for a snapshot at a CPU's Nth page-not-present */
	u32 snapshot_at_start;	/* snapshots to ask for, one after the other, once CPUs are up */
	/* derived */
	u64 dummy_cycles;	/* dummy_us in TSC cycles */
	bool apf;		/* async PF enabled on every CPU */
	u32 cpus;
	u32 total_touchers;
	u64 stall_cycles;	/* stall_us in TSC cycles */
	u64 slice_cycles;	/* busy tasks check for ready tasks this often */
	u64 deadline_tsc;	/* watchdog */
	/* shared by the user tasks */
	volatile u32 touchers_left;
	volatile u32 arrived;	/* barrier between passes */
	volatile u32 epoch;	/* passes every toucher finished */
	volatile u32 first_bad_page;	/* region page index, 0xffffffff = none */
	volatile u32 bad_reports;
	volatile u32 hotplug_done;	/* offline/online cycles the controller finished */
	/* kernel */
	volatile u32 tasks_alive;
	volatile u32 evict_lock;
	volatile u32 finishing;
	volatile u32 snapshot_requested;
	bool no_pager;		/* the pager-control port is not there */
	u64 evictions_requested;
	u64 pages_evicted;
};
extern struct workload wl;

bool workload_parse_word(const char *word, size_t len);
void workload_check_region(u64 memmap_paddr, u32 memmap_entries, u32 start_info_version);
void workload_run(void) __noreturn;
void boot_report(u32 cpus_up, u32 exit_code, bool hold) __noreturn;
__noreturn void workload_finish(u32 forced_code, const char *forced_reason);
extern u32 exit_code_pass;
extern bool hold_after_result;
extern bool chatter;
__noreturn void hold_forever(void);

void toucher_main(struct task *t);
void busy_main(struct task *t);
void controller_main(struct task *t);

/* ---- MP table (mptable.c) ---- */
struct mp_cpus {
	u32 count;			/* enabled processors */
	u32 apic_id[MAX_CPUS];		/* [0] = BSP, then the APs in table order */
};

void mptable_parse(struct mp_cpus *out);

/* ---- SMP bring-up (smp.c) ---- */
extern struct mp_cpus mp_cpus;
extern volatile u64 ap_reentry_rsp;
void smp_boot_aps(void);
void ap_start(u32 index);
u32 cpus_online_count(void);

/* ---- Console and exit (serial.c) ---- */
void console_lock(void);
void console_lock_emergency(void);
void console_unlock(void);
void kvprintf_locked(const char *fmt, va_list ap);
void kprintf_locked(const char *fmt, ...) __printf(1, 2);
void kprintf(const char *fmt, ...) __printf(1, 2);
void ksnprintf(char *buf, size_t size, const char *fmt, ...) __printf(3, 4);
__noreturn void guest_exit(u32 code);
__noreturn void fail(u32 code, const char *reason_fmt, ...) __printf(2, 3);

/* ---- Library (lib.c) ---- */
void *memset(void *dst, int c, size_t n);
void *memcpy(void *dst, const void *src, size_t n);
void *memmove(void *dst, const void *src, size_t n);
int memcmp(const void *a, const void *b, size_t n);
size_t strlen(const char *s);
size_t strnlen(const char *s, size_t max);
bool str_has_prefix(const char *s, size_t len, const char *prefix);
bool str_equal(const char *s, size_t len, const char *word);
bool parse_u32(const char *s, size_t len, u32 *out);

/* ---- Assembly symbols ---- */
extern u64 gdt[GDT_SIZE / 8];
extern const u8 trampoline_start[], trampoline_end[];
__noreturn void halt_forever(void);

#endif /* __ASSEMBLER__ */
#endif /* APFVM_GUEST_H */
