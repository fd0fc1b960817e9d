/*
 * tsc.c - learn the TSC rate once, on the BSP.
 *
 * In order: CPUID 0x15 (crystal ratio, exact when complete), kvmclock (KVM's
 * own tsc_to_system_mul, exact), CPUID 0x16 (nominal base MHz), else an
 * assumed 3 GHz. tsc_source names what was used; the result line reports
 * tsc_khz so that cycle counts can be converted.
 */
#include "guest.h"

u64 tsc_khz = TSC_ASSUMED_HZ / 1000;
const char *tsc_source = "assumed";

/* The kvmclock per-CPU structure (pvclock ABI). */
struct pvclock_vcpu_time_info {
	volatile u32 version;
	u32 pad0;
	u64 tsc_timestamp;
	u64 system_time;
	volatile u32 tsc_to_system_mul;
	volatile s8 tsc_shift;
	u8 flags;
	u8 pad[2];
} __packed;

static struct pvclock_vcpu_time_info pvclock __aligned(64);

static bool is_kvm(void)
{
	u32 a, b, c, d;

	cpuid(0x40000000, 0, &a, &b, &c, &d);
	/* "KVMKVMKVM\0\0\0" */
	return b == 0x4b4d564b && c == 0x564b4d56 && d == 0x4d;
}

static u64 kvmclock_khz(void)
{
	u32 features, unused;

	if (!is_kvm())
		return 0;
	cpuid(0x40000001, 0, &features, &unused, &unused, &unused);
	if (!(features & (1u << KVM_FEATURE_CLOCKSOURCE2)))
		return 0;
	wrmsr(MSR_KVM_SYSTEM_TIME_NEW, (u64)(uintptr_t)&pvclock | 1);
	/* KVM fills it in before the guest runs again; allow a few tries. */
	u32 mul = 0;
	s8 shift = 0;
	for (int i = 0; i < 1000 && !mul; i++) {
		u32 v = pvclock.version;
		if (v & 1)
			continue;
		mul = pvclock.tsc_to_system_mul;
		shift = pvclock.tsc_shift;
		if (pvclock.version != v)
			mul = 0;
	}
	wrmsr(MSR_KVM_SYSTEM_TIME_NEW, 0);
	if (!mul)
		return 0;
	/* ns = (tsc << shift) * mul >> 32, so kHz = 10^6 * 2^32 / mul, then undo the shift. */
	u64 khz = (1000000ULL << 32) / mul;
	if (shift < 0)
		khz <<= -shift;
	else
		khz >>= shift;
	return khz;
}

void tsc_calibrate(void)
{
	u32 max, a, b, c, d;

	cpuid(0, 0, &max, &b, &c, &d);
	if (max >= 0x15) {
		cpuid(0x15, 0, &a, &b, &c, &d);
		if (a && b && c) {
			tsc_khz = (u64)c * b / a / 1000;
			tsc_source = "cpuid15";
			return;
		}
	}
	u64 khz = kvmclock_khz();
	if (khz > 1000 && khz < 100000000) {
		tsc_khz = khz;
		tsc_source = "kvmclock";
		return;
	}
	if (max >= 0x16) {
		cpuid(0x16, 0, &a, &b, &c, &d);
		if (a) {
			tsc_khz = (u64)a * 1000;
			tsc_source = "cpuid16";
			return;
		}
	}
}

u64 us_to_tsc(u64 us)
{
	return us * tsc_khz / 1000;
}
