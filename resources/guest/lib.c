/*
 * lib.c - the few libc-like helpers the guest needs.
 *
 * memset/memcpy/memmove use REP STOS/MOVS in inline assembly on purpose: gcc
 * may emit calls to them for struct copies, and a plain C loop could be
 * turned back into a call to itself by gcc's loop-idiom recognition.
 */
#include "guest.h"

void *memset(void *dst, int c, size_t n)
{
	void *d = dst;

	asm volatile("rep stosb" : "+D"(d), "+c"(n) : "a"(c) : "memory");
	return dst;
}

void *memcpy(void *dst, const void *src, size_t n)
{
	void *d = dst;

	asm volatile("rep movsb" : "+D"(d), "+S"(src), "+c"(n) : : "memory");
	return dst;
}

void *memmove(void *dst, const void *src, size_t n)
{
	if ((uintptr_t)dst - (uintptr_t)src >= n)
		return memcpy(dst, src, n);	/* no harmful overlap: copy forwards */

	/* dst overlaps the end of src: copy backwards with DF set. */
	void *d = (u8 *)dst + n - 1;
	const void *s = (const u8 *)src + n - 1;
	asm volatile("std; rep movsb; cld" : "+D"(d), "+S"(s), "+c"(n) : : "memory");
	return dst;
}

int memcmp(const void *a, const void *b, size_t n)
{
	const u8 *pa = a, *pb = b;

	for (size_t i = 0; i < n; i++) {
		if (pa[i] != pb[i])
			return pa[i] < pb[i] ? -1 : 1;
	}
	return 0;
}

size_t strnlen(const char *s, size_t max)
{
	size_t n = 0;

	while (n < max && s[n])
		n++;
	return n;
}

size_t strlen(const char *s)
{
	return strnlen(s, SIZE_MAX);
}

/* Does the length-delimited string s start with the C string prefix? */
bool str_has_prefix(const char *s, size_t len, const char *prefix)
{
	size_t plen = strlen(prefix);

	return len >= plen && memcmp(s, prefix, plen) == 0;
}

/* Is the length-delimited string s exactly the C string word? */
bool str_equal(const char *s, size_t len, const char *word)
{
	return len == strlen(word) && memcmp(s, word, len) == 0;
}

/* Parse a non-empty decimal number that fits in 32 bits. */
bool parse_u32(const char *s, size_t len, u32 *out)
{
	u64 val = 0;

	if (len == 0)
		return false;
	for (size_t i = 0; i < len; i++) {
		if (s[i] < '0' || s[i] > '9')
			return false;
		val = val * 10 + (u64)(s[i] - '0');
		if (val > UINT32_MAX)
			return false;
	}
	*out = (u32)val;
	return true;
}

void delay_us(u64 us)
{
	u64 end = rdtsc() + us * TSC_PER_US;

	while (rdtsc() < end)
		cpu_relax();
}
