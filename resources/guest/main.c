/*
 * main.c - BSP boot flow of the apfvm reference guest.
 *
 * The output lines are a contract with the VMM's integration tests; see
 * README.md before changing any of them.
 */
#include "guest.h"

#define CMDLINE_MAX	4096

/* Xen PVH start of day structure (version 0 fields; version 1 adds nothing we use). */
struct hvm_start_info {
	u32 magic;		/* HVM_START_MAGIC */
	u32 version;
	u32 flags;
	u32 nr_modules;
	u64 modlist_paddr;
	u64 cmdline_paddr;	/* NUL-terminated, 0 = none */
	u64 rsdp_paddr;
	u64 memmap_paddr;	/* version >= 1 */
	u32 memmap_entries;
	u32 reserved;
} __packed;

struct boot_options {
	u32 exit_code;		/* exit=<decimal>, default 0 */
	bool fail_triple;	/* fail=triple: triple fault after the cmdline line */
	bool fail_port;		/* fail=port: write to an unassigned I/O port */
	bool hold;		/* hold: stay up after the result instead of exiting */
};

/* Our own copy: the original may sit in memory we reuse (e.g. the trampoline page). */
static char cmdline[CMDLINE_MAX];

static void copy_cmdline(const struct hvm_start_info *si)
{
	if (!si->cmdline_paddr)
		return;
	const char *src = phys_to_virt(si->cmdline_paddr);
	size_t len = strnlen(src, CMDLINE_MAX - 1);

	memcpy(cmdline, src, len);
	cmdline[len] = '\0';
}

/* Print the command line on one line: control characters become '?'. */
static void print_cmdline(void)
{
	console_lock();
	kprintf_locked("apfvm-ref: boot cmdline=\"");
	for (const char *p = cmdline; *p; p++) {
		char ch = (*p >= 0x20 && *p < 0x7f) ? *p : '?';
		kprintf_locked("%c", ch);
	}
	kprintf_locked("\"\n");
	console_unlock();
}

/* Space-separated words; unknown words are ignored (the VMM may add its own). */
static void parse_cmdline(struct boot_options *opt)
{
	const char *p = cmdline;

	while (*p) {
		while (*p == ' ' || *p == '\t')
			p++;
		const char *word = p;
		while (*p && *p != ' ' && *p != '\t')
			p++;
		size_t len = (size_t)(p - word);

		if (str_has_prefix(word, len, "exit=")) {
			if (!parse_u32(word + 5, len - 5, &opt->exit_code))
				fail(EXIT_BAD_BOOT, "bad exit= value in the command line");
		} else if (str_equal(word, len, "fail=triple")) {
			opt->fail_triple = true;
		} else if (str_equal(word, len, "fail=port")) {
			opt->fail_port = true;
		} else if (str_equal(word, len, "fail=data")) {
			wl.fail_data = true;	/* checked by the workload (user.c) */
		} else if (str_equal(word, len, "hold")) {
			opt->hold = true;
		} else if (str_equal(word, len, "chatter")) {
			chatter = true;	/* with hold: print lines forever (workload.c) */
		} else if (str_has_prefix(word, len, "fail=")) {
			fail(EXIT_BAD_BOOT, "unknown fail= mode in the command line");
		} else if (hostile_parse_word(word, len)) {
			/* hostile.c */
		} else {
			workload_parse_word(word, len);	/* the workload's words (workload.c) */
		}
	}
}

/*
 * What the hypervisor advertises: the KVM signature leaf and the paravirtual feature bits,
 * among them async page faults (bit 4) and page-ready by interrupt (bit 14), which the VMM's
 * --apf switch controls.
 */
static void report_kvm_cpuid(void)
{
	u32 eax, sig[3], features, unused;

	cpuid(0x40000000, 0, &eax, &sig[0], &sig[1], &sig[2]);
	cpuid(0x40000001, 0, &features, &unused, &unused, &unused);
	char name[13];
	memcpy(name, sig, 12);
	name[12] = '\0';
	for (int i = 0; i < 12; i++)
		if (name[i] && (name[i] < 0x20 || name[i] >= 0x7f))
			name[i] = '?';
	kprintf("apfvm-ref: kvm signature=\"%s\" features=0x%x async_pf=%u async_pf_int=%u\n",
		name, features, (features >> 4) & 1, (features >> 14) & 1);
}

__noreturn void main(u32 start_info_paddr);

__noreturn void main(u32 start_info_paddr)
{
	const struct hvm_start_info *si = phys_to_virt(start_info_paddr);
	struct boot_options opt = { 0 };

	/* Exceptions are reported from here on. */
	idt_init();
	cpu_init(&cpus[0], 0, 0);	/* APIC id filled in below, once x2APIC is on */

	if (si->magic != HVM_START_MAGIC)
		fail(EXIT_BAD_BOOT, "bad hvm_start_info magic 0x%x at 0x%x", si->magic,
		     start_info_paddr);
	copy_cmdline(si);
	print_cmdline();
	parse_cmdline(&opt);
	exit_code_pass = opt.exit_code;
	hold_after_result = opt.hold;

	if (opt.fail_port) {
		/* Nothing is there: the VMM must ignore the access and carry on. */
		outb(0x9999, 0x2a);
		kprintf("apfvm-ref: fail=port: wrote 0x2a to port 0x9999\n");
	}
	if (opt.fail_triple) {
		kprintf("apfvm-ref: fail=triple: triple faulting now\n");
		trigger_triple_fault();
	}

	report_kvm_cpuid();
	workload_check_region(si->memmap_paddr, si->memmap_entries, si->version);
	tsc_calibrate();
	wl.apf = !wl.apf_off && apf_advertised();
	mptable_parse(&mp_cpus);
	kprintf("apfvm-ref: mptable cpus=%u bsp_apic=%u\n", mp_cpus.count, mp_cpus.apic_id[0]);

	if (!x2apic_supported())
		fail(EXIT_BAD_APIC, "x2APIC not supported (CPUID.1:ECX[21])");
	u32 apic_id = x2apic_enable();
	if (apic_id != mp_cpus.apic_id[0])
		fail(EXIT_BAD_APIC, "BSP apic id %u but the MP table says %u", apic_id,
		     mp_cpus.apic_id[0]);
	cpus[0].apic_id = apic_id;
	cpus[0].claimed = 1;
	kprintf("apfvm-ref: cpu 0 apic %u long mode\n", apic_id);
	if (wl.apf) {
		apf_enable(&cpus[0]);
		if (cpus[0].apf_on && !apf_wait_wakeall(&cpus[0], 0, 1000000))
			kprintf("apfvm-ref: cpu0: no wake-all within 1 s of enabling async PF\n");
	}
	sched_init_cpu(&cpus[0]);
	cpus[0].state = CPU_ONLINE;
	cpus[0].online = 1;

	smp_boot_aps();

	u32 n = cpus_online_count();
	if (n != mp_cpus.count)
		fail(EXIT_AP_TIMEOUT, "%u of %u cpus online", n, mp_cpus.count);
	kprintf("apfvm-ref: all %u cpus up\n", n);
	for (u32 i = 0; i < n; i++)
		wl.apf = wl.apf && cpus[i].apf_on;	/* hostile=apf-outside-ram leaves it off */
	for (u32 i = 1; i <= wl.snapshot_at_start; i++) {
		/* The VMM pauses during the write; a restored VM goes on from the next line. */
		kprintf("apfvm-ref: snapshot %u of %u requested at start\n", i, wl.snapshot_at_start);
		wl.snapshot_requested = i;
		outl(SNAPSHOT_PORT, i);
		kprintf("apfvm-ref: running after snapshot request %u\n", i);
	}
	if (wl.enabled)
		workload_run();
	boot_report(n, opt.exit_code, opt.hold);
}
