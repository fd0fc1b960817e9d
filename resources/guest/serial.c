/*
 * serial.c - COM1 console, a minimal printf, and the VM exit path.
 *
 * Output goes straight to the UART byte by byte while holding a spinlock, so
 * lines from different CPUs never interleave and no line length limit exists.
 * Port accesses are slow on our hosts (each one traps to the VMM), so the
 * UART is not programmed at all (the VMM's and QEMU's work as they come up)
 * and LSR is read once per byte unless the transmitter is really busy.
 * Lines end in a bare "\n": the VMM's tests match them exactly.
 */
#include "guest.h"

#define UART_THR	0	/* transmit holding register (write) */
#define UART_LSR	5	/* line status register */
#define LSR_THRE	0x20	/* transmit holding register empty */

/* Emergency path: how long to wait for the console lock before stealing it. */
#define EMERGENCY_LOCK_US	100000

static volatile u32 console_locked;

static void uart_putc(char c)
{
	while (!(inb(COM1_PORT + UART_LSR) & LSR_THRE))
		cpu_relax();
	outb(COM1_PORT + UART_THR, (u8)c);
}

void console_lock(void)
{
	while (atomic_cmpxchg(&console_locked, 0, 1) != 0) {
		while (console_locked)
			cpu_relax();
	}
}

/*
 * For the exception path: the faulting CPU may itself hold the lock (fault
 * in the middle of a kprintf), so wait a bounded time and then take it.
 */
void console_lock_emergency(void)
{
	u64 deadline = rdtsc() + EMERGENCY_LOCK_US * TSC_PER_US;

	while (atomic_cmpxchg(&console_locked, 0, 1) != 0) {
		if (rdtsc() > deadline) {
			store_release(&console_locked, 1);
			return;
		}
		cpu_relax();
	}
}

void console_unlock(void)
{
	store_release(&console_locked, 0);
}

static void put_str(const char *s)
{
	if (!s)
		s = "(null)";
	while (*s)
		uart_putc(*s++);
}

static void put_uint(u64 val, unsigned base, unsigned width, char pad)
{
	static const char digits[] = "0123456789abcdef";
	char buf[24];
	unsigned n = 0;

	do {
		buf[n++] = digits[val % base];
		val /= base;
	} while (val);
	while (width > n) {
		uart_putc(pad);
		width--;
	}
	while (n)
		uart_putc(buf[--n]);
}

/*
 * Supports %%, %c, %s, %d, %u, %x, %p with an optional '0' flag, a width and
 * the 'l'/'ll'/'z' length modifiers. That is all the guest needs.
 */
void kvprintf_locked(const char *fmt, va_list ap)
{
	for (; *fmt; fmt++) {
		if (*fmt != '%') {
			uart_putc(*fmt);
			continue;
		}
		fmt++;

		char pad = ' ';
		unsigned width = 0;
		int longs = 0;

		if (*fmt == '0') {
			pad = '0';
			fmt++;
		}
		while (*fmt >= '0' && *fmt <= '9')
			width = width * 10 + (unsigned)(*fmt++ - '0');
		while (*fmt == 'l' || *fmt == 'z') {
			longs++;
			fmt++;
		}

		switch (*fmt) {
		case 'c':
			uart_putc((char)va_arg(ap, int));
			break;
		case 's':
			put_str(va_arg(ap, const char *));
			break;
		case 'd': {
			long long v = longs ? va_arg(ap, long long) : va_arg(ap, int);
			if (v < 0) {
				uart_putc('-');
				put_uint(-(u64)v, 10, width ? width - 1 : 0, pad);
			} else {
				put_uint((u64)v, 10, width, pad);
			}
			break;
		}
		case 'u':
			put_uint(longs ? va_arg(ap, u64) : va_arg(ap, unsigned), 10, width, pad);
			break;
		case 'x':
			put_uint(longs ? va_arg(ap, u64) : va_arg(ap, unsigned), 16, width, pad);
			break;
		case 'p':
			put_str("0x");
			put_uint((uintptr_t)va_arg(ap, void *), 16, width, pad);
			break;
		case '%':
			uart_putc('%');
			break;
		case '\0':
			return;
		default:
			uart_putc('%');
			uart_putc(*fmt);
			break;
		}
	}
}

void kprintf_locked(const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	kvprintf_locked(fmt, ap);
	va_end(ap);
}

void kprintf(const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	console_lock();
	kvprintf_locked(fmt, ap);
	console_unlock();
	va_end(ap);
}

/* Every exit, good or bad, goes through here so the last line is always "exit <code>". */
__noreturn void guest_exit(u32 code)
{
	kprintf("apfvm-ref: exit %u\n", code);
	outl(EXIT_PORT, code);
	/* Only reached if nothing listens on the exit port. */
	halt_forever();
}

/*
 * Report a fatal error: a human-readable line, the machine-readable result
 * line, then exit. reason_fmt must not produce '"' or '\' (it goes into JSON).
 */
__noreturn void fail(u32 code, const char *reason_fmt, ...)
{
	va_list ap, ap2;

	va_start(ap, reason_fmt);
	va_copy(ap2, ap);
	console_lock();
	kprintf_locked("apfvm-ref: error: ");
	kvprintf_locked(reason_fmt, ap);
	kprintf_locked("\nAPFVM-RESULT {\"verdict\":\"fail\",\"reason\":\"");
	kvprintf_locked(reason_fmt, ap2);
	kprintf_locked("\"}\n");
	console_unlock();
	va_end(ap2);
	va_end(ap);
	guest_exit(code);
}
