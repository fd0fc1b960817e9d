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

/* x2APIC registers are MSRs 0x800 + (xAPIC MMIO offset >> 4). */
#define MSR_X2APIC_ID		0x802
#define MSR_X2APIC_SVR		0x80f
#define MSR_X2APIC_ICR		0x830
#define APIC_SVR_ENABLE		(1 << 8)
#define ICR_INIT		0x4500	/* delivery mode INIT, level assert */
#define ICR_STARTUP		0x4600	/* delivery mode Start-up, level assert; | vector */

/* ---- Page table entry bits ---- */
#define PTE_P			0x001
#define PTE_W			0x002
#define PTE_PS			0x080	/* 2 MiB page in a page directory */

/* ---- Devices ---- */
#define EXIT_PORT		0xf4	/* outl(code) ends the VM with (code & 0xff) */
#define COM1_PORT		0x3f8

/* ---- PVH ---- */
#define XEN_ELFNOTE_PHYS32_ENTRY 18
#define HVM_START_MAGIC		0x336ec578

/* ---- Vectors ---- */
#define VEC_DOUBLE_FAULT	8
#define VEC_SPURIOUS		0xff	/* x2APIC spurious-interrupt vector */
#define NUM_EXCEPTIONS		32

/* ---- Exit codes (see README.md) ---- */
#define EXIT_BAD_BOOT		2	/* bad hvm_start_info or command line */
#define EXIT_BAD_MPTABLE	3
#define EXIT_AP_TIMEOUT		4
#define EXIT_BAD_APIC		5	/* no x2APIC, or APIC id disagrees with the MP table */
#define EXIT_EXCEPTION		0x7e

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

#define __packed	__attribute__((packed))
#define __aligned(n)	__attribute__((aligned(n)))
#define __noreturn	__attribute__((noreturn))
#define __printf(a, b)	__attribute__((format(printf, a, b)))

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

/* ---- Time (the TSC rate is unknown; assume a fast one so waits are never too short) ---- */
#define TSC_ASSUMED_HZ		3000000000ULL
#define TSC_PER_US		(TSC_ASSUMED_HZ / 1000000)
void delay_us(u64 us);

/* ---- Per-CPU data (cpu.c) ---- */
struct tss {
	u32 reserved0;
	u64 rsp[3];		/* stacks for privilege changes; rsp[0] used once CPL3 exists */
	u64 reserved1;
	u64 ist[7];		/* interrupt stacks; ist[0] is IST1 (#DF) */
	u64 reserved2;
	u16 reserved3;
	u16 iomap_base;		/* >= limit: no I/O bitmap, user port I/O faults */
} __packed;

struct cpu {
	struct cpu *self;	/* must stay first: this_cpu() reads %gs:0 */
	u32 index;		/* 0 = BSP, APs 1.. in MP table order */
	u32 apic_id;		/* x2APIC id */
	volatile u32 claimed;	/* an AP took this slot (catches duplicate APIC ids) */
	volatile u32 online;	/* set once the CPU printed its line and checked in */
	struct tss tss __aligned(16);
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

void idt_init(void);
void idt_load(void);
__noreturn void trigger_triple_fault(void);

/* ---- MP table (mptable.c) ---- */
struct mp_cpus {
	u32 count;			/* enabled processors */
	u32 apic_id[MAX_CPUS];		/* [0] = BSP, then the APs in table order */
};

void mptable_parse(struct mp_cpus *out);

/* ---- SMP bring-up (smp.c) ---- */
extern struct mp_cpus mp_cpus;
void smp_boot_aps(void);
u32 cpus_online_count(void);

/* ---- Console and exit (serial.c) ---- */
void console_lock(void);
void console_lock_emergency(void);
void console_unlock(void);
void kvprintf_locked(const char *fmt, va_list ap);
void kprintf_locked(const char *fmt, ...) __printf(1, 2);
void kprintf(const char *fmt, ...) __printf(1, 2);
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
