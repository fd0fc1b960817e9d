/*
 * trampoline.S - AP start-up code.
 *
 * trampoline_start..trampoline_end is copied by the BSP to TRAMPOLINE_ADDR;
 * a SIPI with vector TRAMPOLINE_ADDR >> 12 starts an AP there in real mode
 * (CS = 0x0800, IP = 0). It is position independent: trampoline-internal
 * addresses are written as offsets from trampoline_start, anything in the
 * kernel image (gdt, pml4, ap_start64) is a link-time absolute address.
 * No stack is used until 64-bit mode.
 */
#include "guest.h"

/* Linear address of a trampoline label once copied to TRAMPOLINE_ADDR. */
#define TR_ADDR(label)	((label) - trampoline_start + TRAMPOLINE_ADDR)

	.section .rodata.trampoline, "a"	/* data to the image: copied, never run in place */
	.globl	trampoline_start, trampoline_end

	.code16
trampoline_start:
	cli
	cld
	movw	%cs, %ax
	movw	%ax, %ds			/* DS:offset addresses trampoline data */
	lgdtl	tr_gdt_desc - trampoline_start	/* 32-bit operand: full 32-bit base */
	movl	%cr0, %eax
	andl	$~(CR0_CD | CR0_NW), %eax	/* INIT leaves caches disabled */
	orl	$CR0_PE, %eax
	movl	%eax, %cr0
	ljmpl	$KERNEL_CS32, $TR_ADDR(tr_protected)

	.code32
tr_protected:
	movl	$KERNEL_DS, %eax
	movl	%eax, %ds
	movl	%eax, %es
	movl	%eax, %ss
	ENTER_LONG_MODE_32
	ljmp	$KERNEL_CS, $ap_start64		/* into the kernel image proper */

	.balign	4
tr_gdt_desc:
	.word	GDT_SIZE - 1
	.long	gdt
trampoline_end:

/* ------------------------------------------------------------------------ */
	.text
	.code64
ap_start64:
	LOAD_KERNEL_DATA_SEGMENTS_64
	/*
	 * Coming back online (CPU hotplug): the BSP put this CPU's own stack in
	 * ap_reentry_rsp before INIT/SIPI; its old contents are dead.
	 */
	movq	ap_reentry_rsp(%rip), %rsp
	testq	%rsp, %rsp
	jnz	1f
	/*
	 * First start: take a stack slot with LOCK XADD: robust even if a slow
	 * AP from an earlier SIPI shows up late. The slot is not the CPU index;
	 * ap_main() derives that from the APIC id and the MP table.
	 */
	movl	$1, %eax
	lock xaddl %eax, ap_stack_next(%rip)
	cmpl	$MAX_CPUS, %eax
	jae	halt_forever			/* more APs than stacks: park silently */
	incl	%eax				/* stack grows down from the slot's end */
	shlq	$STACK_SHIFT, %rax
	leaq	ap_stacks(%rip), %rsp
	addq	%rax, %rsp
1:	xorl	%ebp, %ebp
	movq	%rsp, %rdi			/* ap_main(stack_top) */
	call	ap_main
	jmp	halt_forever

	.section .bss
	.balign	8
	.globl	ap_reentry_rsp
ap_reentry_rsp:
	.skip	8
	.balign	4
ap_stack_next:
	.skip	4
	.balign	16
ap_stacks:
	.skip	MAX_CPUS * STACK_SIZE

	.section .note.GNU-stack, "", @progbits
