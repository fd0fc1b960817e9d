/*
 * entry.S - PVH ELF note, BSP entry (32-bit protected mode -> long mode),
 * the shared GDT, the boot page tables and the exception entry stubs.
 */
#include "guest.h"

/*
 * PVH note: tells the VMM (or QEMU) to enter at pvh_start32 in 32-bit
 * protected mode with EBX = &hvm_start_info. Loaders skip "name" aligned to
 * the PT_NOTE segment's p_align, so keep this section 4-byte aligned.
 */
	.section .note.pvh, "a", @note
	.balign 4
	.long	4				/* namesz: "Xen\0" */
	.long	4				/* descsz: 32-bit physical address */
	.long	XEN_ELFNOTE_PHYS32_ENTRY
	.asciz	"Xen"
	.long	pvh_start32

/* ------------------------------------------------------------------------ */
	.section .text.entry, "ax"
	.code32
	.globl	pvh_start32
pvh_start32:
	cli
	cld
	/* PVH guarantees flat segments but not a GDT: load ours and reload CS. */
	lgdt	gdt_desc
	ljmp	$KERNEL_CS32, $1f
1:	movl	$KERNEL_DS, %eax
	movl	%eax, %ds
	movl	%eax, %es
	movl	%eax, %ss
	movl	%eax, %fs
	movl	%eax, %gs
	movl	%ebx, %esi			/* &hvm_start_info, kept until main() */

	/* Zero .bss ourselves: loaders only copy p_filesz and may skip the rest. */
	movl	$__bss_start, %edi
	movl	$__bss_end, %ecx
	subl	%edi, %ecx
	shrl	$2, %ecx
	xorl	%eax, %eax
	rep stosl

	/*
	 * Identity map 0-4 GiB with 2 MiB pages: PML4[0] -> PDPT[0..3] -> pd[4][512].
	 * User-accessible at every level: user tasks run in the same map (no protection).
	 */
	movl	$(pdpt + PTE_P + PTE_W + PTE_U), pml4
	movl	$(pd + PTE_P + PTE_W + PTE_U), %eax
	xorl	%ecx, %ecx
2:	movl	%eax, pdpt(, %ecx, 8)
	addl	$4096, %eax
	incl	%ecx
	cmpl	$4, %ecx
	jb	2b
	movl	$(PTE_P + PTE_W + PTE_U + PTE_PS), %eax
	xorl	%ecx, %ecx
3:	movl	%eax, pd(, %ecx, 8)		/* high halves are 0 (zeroed .bss) */
	addl	$0x200000, %eax
	incl	%ecx
	cmpl	$(4 * 512), %ecx
	jb	3b

	ENTER_LONG_MODE_32
	ljmp	$KERNEL_CS, $bsp_start64

	.code64
bsp_start64:
	LOAD_KERNEL_DATA_SEGMENTS_64
	leaq	boot_stack_top(%rip), %rsp
	xorl	%ebp, %ebp			/* terminate frame-pointer chains */
	movl	%esi, %edi			/* main(start_info_paddr) */
	call	main
	/* fall through: main() does not return */

	.globl	halt_forever
halt_forever:
	cli
	hlt
	jmp	halt_forever

/* ------------------------------------------------------------------------ */
/*
 * Exception entry. Every stub leaves the same frame (struct trap_frame):
 * vector and error code (a dummy 0 where the CPU pushes none), then
 * isr_common saves the GPRs and calls trap_handler(frame). The CPU aligns
 * RSP to 16 before pushing its 5 words, and 5 + 2 + 15 words = 176 bytes
 * keeps the call 16-byte aligned as the ABI requires.
 */
	.text
	.code64

/* Vectors for which the CPU pushes an error code. */
#define HAS_ERRCODE(v) ((v) == 8 || ((v) >= 10 && (v) <= 14) || (v) == 17 || \
			(v) == 21 || (v) == 29 || (v) == 30)

	.irp	vec, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
	.balign	16
isr_\vec:
	.if	!HAS_ERRCODE(\vec)
	pushq	$0
	.endif
	pushq	$\vec
	jmp	isr_common
	.endr

isr_common:
	pushq	%rax
	pushq	%rbx
	pushq	%rcx
	pushq	%rdx
	pushq	%rsi
	pushq	%rdi
	pushq	%rbp
	pushq	%r8
	pushq	%r9
	pushq	%r10
	pushq	%r11
	pushq	%r12
	pushq	%r13
	pushq	%r14
	pushq	%r15
	cld
	movq	%rsp, %rdi
	call	trap_handler
	popq	%r15
	popq	%r14
	popq	%r13
	popq	%r12
	popq	%r11
	popq	%r10
	popq	%r9
	popq	%r8
	popq	%rbp
	popq	%rdi
	popq	%rsi
	popq	%rdx
	popq	%rcx
	popq	%rbx
	popq	%rax
	addq	$16, %rsp			/* vector, error code */
	iretq

/* ------------------------------------------------------------------------ */
/*
 * Fast entry paths: #PF (async PF page-not-present), #UD (system calls),
 * the page-ready vector, the reschedule IPI and the watchdog timer. Guest
 * kernel mode may be emulated at ~1 us per instruction, so these save only
 * the vector and the caller-saved registers (struct kframe): the C handler
 * keeps the callee-saved ones, and switch_to() saves those of a task that
 * is switched out. 5 CPU words + error code + vector + 9 registers = 128
 * bytes keeps the call 16-byte aligned.
 */
.macro FAST_ENTRY name, vector, handler, has_errcode
	.globl	\name
	.balign	16
\name:
	.if	!\has_errcode
	pushq	$0
	.endif
	pushq	$\vector
	pushq	%rax
	pushq	%rcx
	pushq	%rdx
	pushq	%rsi
	pushq	%rdi
	pushq	%r8
	pushq	%r9
	pushq	%r10
	pushq	%r11
	cld
	movq	%rsp, %rdi
	call	\handler
	jmp	fast_exit
.endm

	FAST_ENTRY pf_entry, VEC_PF, pf_handler, 1
	FAST_ENTRY ud_entry, VEC_UD, ud_handler, 0
	FAST_ENTRY apf_ready_entry, VEC_APF_READY, apf_ready_handler, 0
	FAST_ENTRY apf_ready_alt_entry, VEC_APF_READY_ALT, apf_ready_handler, 0
	FAST_ENTRY ipi_entry, VEC_IPI, ipi_handler, 0
	FAST_ENTRY timer_entry, VEC_TIMER, timer_handler, 0

/* Also where a new task starts: its first switch_to() returns here. */
	.globl	fast_exit
fast_exit:
	popq	%r11
	popq	%r10
	popq	%r9
	popq	%r8
	popq	%rdi
	popq	%rsi
	popq	%rdx
	popq	%rcx
	popq	%rax
	addq	$16, %rsp			/* vector, error code */
	iretq

/*
 * void switch_to(u64 *prev_ksp, u64 next_ksp): save the callee-saved
 * registers on the current kernel stack, store RSP in *prev_ksp, continue
 * on next_ksp where that context called switch_to() (or a new task's
 * prepared stack, which returns into fast_exit).
 */
	.globl	switch_to
switch_to:
	pushq	%rbp
	pushq	%rbx
	pushq	%r12
	pushq	%r13
	pushq	%r14
	pushq	%r15
	movq	%rsp, (%rdi)
	movq	%rsi, %rsp
	popq	%r15
	popq	%r14
	popq	%r13
	popq	%r12
	popq	%rbx
	popq	%rbp
	ret

/*
 * int wrmsr_safe(u32 msr, u64 val): WRMSR that returns 1 instead of dying if
 * the hypervisor refuses the value with #GP (trap_handler moves RIP from
 * wrmsr_safe_insn to wrmsr_safe_gp). Only hostile= uses it.
 */
	.globl	wrmsr_safe
	.globl	wrmsr_safe_insn
	.globl	wrmsr_safe_gp
wrmsr_safe:
	movl	%edi, %ecx
	movl	%esi, %eax
	movq	%rsi, %rdx
	shrq	$32, %rdx
wrmsr_safe_insn:
	wrmsr
	xorl	%eax, %eax
	ret
wrmsr_safe_gp:
	movl	$1, %eax
	ret

/* Spurious APIC interrupts need no EOI: just return. */
	.globl	isr_spurious
isr_spurious:
	iretq

	.section .rodata
	.balign	8
	.globl	isr_stubs
isr_stubs:
	.irp	vec, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
	.quad	isr_\vec
	.endr

/* ------------------------------------------------------------------------ */
/*
 * The one GDT, used from the first instruction on by every CPU (the AP
 * trampoline loads it too). TSS descriptors are filled in by cpu_init().
 */
	.section .data
	.balign	16
	.globl	gdt
gdt:
	.quad	0				/* null */
	.quad	0x00cf9b000000ffff		/* KERNEL_CS32: flat 32-bit code */
	.quad	0x00af9b000000ffff		/* KERNEL_CS: 64-bit code (L=1) */
	.quad	0x00cf93000000ffff		/* KERNEL_DS: flat data */
	.quad	0x00cffb000000ffff		/* USER_CS32 (SYSRET layout only) */
	.quad	0x00cff3000000ffff		/* USER_DS */
	.quad	0x00affb000000ffff		/* USER_CS: 64-bit code */
	.fill	(GDT_SIZE - TSS_SEL_BASE) / 8, 8, 0	/* per-CPU TSS descriptors */
gdt_end:
	.if	gdt_end - gdt != GDT_SIZE
	.error	"GDT layout does not match GDT_SIZE"
	.endif

	/* Only loaded from 32-bit code, so a 32-bit base is enough. */
gdt_desc:
	.word	GDT_SIZE - 1
	.long	gdt

/* ------------------------------------------------------------------------ */
	.section .bss
	.balign	4096
	.globl	pml4
pml4:	.skip	4096
pdpt:	.skip	4096
pd:	.skip	4 * 4096

	.balign	16
boot_stack:
	.skip	STACK_SIZE
boot_stack_top:

	.section .note.GNU-stack, "", @progbits
