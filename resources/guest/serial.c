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

/* Where formatted output goes: the UART (buf == NULL) or a string buffer. */
struct out {
	char *buf;
	size_t len, cap;
};

static void out_putc(struct out *o, char c)
{
	if (!o->buf) {
		uart_putc(c);
	} else if (o->len + 1 < o->cap) {
		o->buf[o->len++] = c;
		o->buf[o->len] = '\0';
	}
}

static void put_str(struct out *o, const char *s)
{
	if (!s)
		s = "(null)";
	while (*s)
		out_putc(o, *s++);
}

static void put_uint(struct out *o, u64 val, unsigned base, unsigned width, char pad)
{
	static const char digits[] = "0123456789abcdef";
	char buf[24];
	unsigned n = 0;

	do {
		buf[n++] = digits[val % base];
		val /= base;
	} while (val);
	while (width > n) {
		out_putc(o, pad);
		width--;
	}
	while (n)
		out_putc(o, buf[--n]);
}

/*
 * Supports %%, %c, %s, %d, %u, %x, %p with an optional '0' flag, a width and
 * the 'l'/'ll'/'z' length modifiers. That is all the guest needs.
 */
static void kvformat(struct out *o, const char *fmt, va_list ap)
{
	for (; *fmt; fmt++) {
		if (*fmt != '%') {
			out_putc(o, *fmt);
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
			out_putc(o, (char)va_arg(ap, int));
			break;
		case 's':
			put_str(o, va_arg(ap, const char *));
			break;
		case 'd': {
			long long v = longs ? va_arg(ap, long long) : va_arg(ap, int);
			if (v < 0) {
				out_putc(o, '-');
				put_uint(o, -(u64)v, 10, width ? width - 1 : 0, pad);
			} else {
				put_uint(o, (u64)v, 10, width, pad);
			}
			break;
		}
		case 'u':
			put_uint(o, longs ? va_arg(ap, u64) : va_arg(ap, unsigned), 10, width, pad);
			break;
		case 'x':
			put_uint(o, longs ? va_arg(ap, u64) : va_arg(ap, unsigned), 16, width, pad);
			break;
		case 'p':
			put_str(o, "0x");
			put_uint(o, (uintptr_t)va_arg(ap, void *), 16, width, pad);
			break;
		case '%':
			out_putc(o, '%');
			break;
		case '\0':
			return;
		default:
			out_putc(o, '%');
			out_putc(o, *fmt);
			break;
		}
	}
}

void kvprintf_locked(const char *fmt, va_list ap)
{
	struct out o = { 0 };

	kvformat(&o, fmt, ap);
}

/* Format into buf (always NUL-terminated, truncated to size - 1 characters). */
void ksnprintf(char *buf, size_t size, const char *fmt, ...)
{
	struct out o = { .buf = buf, .len = 0, .cap = size };
	va_list ap;

	if (size)
		buf[0] = '\0';
	va_start(ap, fmt);
	kvformat(&o, fmt, ap);
	va_end(ap);
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
