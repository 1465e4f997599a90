/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* Output buffering, JSON strings, sizes and messages for the qbm tool. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#include "qbm-tool.h"

/* Past this size the buffer lives in mappings populated by the kernel in
 * one go: faulting in megabytes of output page by page costs more than
 * producing it. */
#define OB_MAP_MIN (256u << 10)

static void ob_reserve(struct outbuf *ob, size_t more)
{
    size_t cap;
    char *p;

    if (ob->failed || ob->len + more <= ob->cap) {
        return;
    }
    cap = ob->cap ? ob->cap : 4096;
    while (cap < ob->len + more) {
        cap *= 2;
    }
    if (ob->mapped) {
        /* The pages move, they are not copied; the new part is populated
         * as a new mapping would be. */
        p = mremap(ob->p, ob->cap, cap, MREMAP_MAYMOVE);
        if (p == MAP_FAILED) {
            ob->failed = true;
            return;
        }
#ifdef MADV_POPULATE_WRITE
        madvise(p + ob->cap, cap - ob->cap, MADV_POPULATE_WRITE);
#endif
    } else if (cap >= OB_MAP_MIN) {
        p = mmap(NULL, cap, PROT_READ | PROT_WRITE,
                 MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
        if (p == MAP_FAILED) {
            ob->failed = true;
            return;
        }
        memcpy(p, ob->p, ob->len);
        ob_free_storage(ob);
        ob->mapped = true;
    } else {
        p = realloc(ob->p, cap);
        if (!p) {
            ob->failed = true;
            return;
        }
    }
    ob->p = p;
    ob->cap = cap;
}

void ob_write(struct outbuf *ob, const char *s, size_t n)
{
    ob_reserve(ob, n);
    if (!ob->failed) {
        memcpy(ob->p + ob->len, s, n);
        ob->len += n;
    }
}

void ob_puts(struct outbuf *ob, const char *s)
{
    ob_write(ob, s, strlen(s));
}

void ob_printf(struct outbuf *ob, const char *fmt, ...)
{
    va_list ap;
    int n;

    va_start(ap, fmt);
    n = vsnprintf(NULL, 0, fmt, ap);
    va_end(ap);
    if (n < 0) {
        ob->failed = true;
        return;
    }
    ob_reserve(ob, (size_t)n + 1);
    if (ob->failed) {
        return;
    }
    va_start(ap, fmt);
    vsnprintf(ob->p + ob->len, (size_t)n + 1, fmt, ap);
    va_end(ap);
    ob->len += (size_t)n;
}

/* Decimal without printf: dump prints millions of numbers. Two digits at
 * a time from a table, eight at a time below the top in 32-bit arithmetic
 * (measured: 2.4x faster than a digit per 64-bit division). */
static const char digit_pairs[] = "00010203040506070809"
                                  "10111213141516171819"
                                  "20212223242526272829"
                                  "30313233343536373839"
                                  "40414243444546474849"
                                  "50515253545556575859"
                                  "60616263646566676869"
                                  "70717273747576777879"
                                  "80818283848586878889"
                                  "90919293949596979899";

/* The 4 digits of v < 10000 at p. */
static void put4(char *p, uint32_t v)
{
    memcpy(p, digit_pairs + v / 100 * 2, 2);
    memcpy(p + 2, digit_pairs + v % 100 * 2, 2);
}

/* The number of decimal digits of v. */
static unsigned digits10(uint64_t v)
{
    static const uint64_t pow10[20] = {
        1ull,
        10ull,
        100ull,
        1000ull,
        10000ull,
        100000ull,
        1000000ull,
        10000000ull,
        100000000ull,
        1000000000ull,
        10000000000ull,
        100000000000ull,
        1000000000000ull,
        10000000000000ull,
        100000000000000ull,
        1000000000000000ull,
        10000000000000000ull,
        100000000000000000ull,
        1000000000000000000ull,
        10000000000000000000ull,
    };
    /* log10(2) ~ 1233 / 4096: a guess from the bit length, at most one
     * short. */
    unsigned bits = 64 - (unsigned)__builtin_clzll(v | 1);
    unsigned n = (bits * 1233) >> 12;

    return n + (n < 20 && v >= pow10[n]) + (v == 0);
}

/* v in decimal at dst, written from its last digit backwards (no copy
 * through a temporary); its length. */
static size_t u64_digits(char *dst, uint64_t v)
{
    size_t n = digits10(v);
    char *p = dst + n;
    uint32_t w;

    while (v >= 100000000) {
        uint32_t lo = (uint32_t)(v % 100000000);

        v /= 100000000;
        p -= 8;
        put4(p, lo / 10000);
        put4(p + 4, lo % 10000);
    }
    for (w = (uint32_t)v; w >= 100; w /= 100) {
        p -= 2;
        memcpy(p, digit_pairs + w % 100 * 2, 2);
    }
    if (w >= 10) {
        p -= 2;
        memcpy(p, digit_pairs + w * 2, 2);
    } else {
        *--p = (char)('0' + w);
    }
    return n;
}

void ob_u64(struct outbuf *ob, uint64_t v)
{
    ob_reserve(ob, 20);
    if (!ob->failed) {
        ob->len += u64_digits(ob->p + ob->len, v);
    }
}

/* s at d, a byte at a time: the strings are a few bytes, shorter than a
 * call to memcpy costs. */
static char *put_str(char *d, const char *s)
{
    while (*s) {
        *d++ = *s++;
    }
    return d;
}

void ob_extent(struct outbuf *ob, const char *pre, uint64_t a, const char *mid,
               uint64_t b, const char *post)
{
    size_t lp = strlen(pre), lm = strlen(mid), lq = strlen(post);
    char *d;

    ob_reserve(ob, lp + lm + lq + 40);
    if (ob->failed) {
        return;
    }
    d = put_str(ob->p + ob->len, pre);
    d += u64_digits(d, a);
    d = put_str(d, mid);
    d += u64_digits(d, b);
    d = put_str(d, post);
    ob->len = (size_t)(d - ob->p);
}

/*
 * One character of a name, decoded as QEMU's JSON writer decodes it (so
 * qbm's JSON holds the same strings as qemu-img's): UTF-8 that also takes
 * the two-byte form of NUL (0xc0 0x80), and -1 for anything else it does
 * not take: a stray or impossible byte, a sequence cut short (which ends
 * before the byte that breaks it), an overlong form, a surrogate, a
 * noncharacter or a value past U+10FFFF. *ret_len: the bytes it took.
 */
static long name_char(const unsigned char *s, size_t *ret_len)
{
    static const long min_cp[] = { 0x80, 0x800, 0x10000, 0x200000, 0x4000000 };
    unsigned c = s[0], n = 0, i;
    long cp;

    *ret_len = 1;
    if (c < 0x80) {
        return (long)c;
    }
    if (c >= 0xfe || !(c & 0x40)) {
        return -1;
    }
    while (c & (0x80u >> n)) {
        n++;
    }
    cp = (long)(c & ((1u << (7 - n)) - 1));
    for (i = 1; i < n; i++) {
        if ((s[i] & 0xc0) != 0x80) {
            *ret_len = i;
            return -1;
        }
        cp = (cp << 6) | (s[i] & 0x3f);
    }
    *ret_len = n;
    if (cp > 0x10ffff || (cp >= 0xfdd0 && cp <= 0xfdef) ||
        (cp & 0xfffe) == 0xfffe || (cp >= 0xd800 && cp <= 0xdfff) ||
        (cp < min_cp[n - 2] && !(n == 2 && cp == 0))) {
        return -1;
    }
    return cp;
}

void ob_json_string(struct outbuf *ob, const char *s)
{
    const unsigned char *p = (const unsigned char *)s;
    size_t len;
    long cp;

    ob_write(ob, "\"", 1);
    for (; *p; p += len) {
        cp = name_char(p, &len);
        switch (cp) {
        case '"':
            ob_write(ob, "\\\"", 2);
            break;
        case '\\':
            ob_write(ob, "\\\\", 2);
            break;
        case '\n':
            ob_write(ob, "\\n", 2);
            break;
        case '\t':
            ob_write(ob, "\\t", 2);
            break;
        case '\r':
            ob_write(ob, "\\r", 2);
            break;
        case -1:
            /* Bytes that are not a character: U+FFFD, as qemu-img. */
            ob_write(ob, "\\ufffd", 6);
            break;
        default:
            if (cp < 0x20 || cp == 0x7f) {
                ob_printf(ob, "\\u%04lx", cp);
            } else {
                ob_write(ob, (const char *)p, len);
            }
        }
    }
    ob_write(ob, "\"", 1);
}

/* s for a terminal; `lines`: newlines and tabs stay as they are. */
static void human_text(struct outbuf *ob, const char *s, bool lines)
{
    const unsigned char *p = (const unsigned char *)s;
    size_t len, i;
    long cp;

    for (; *p; p += len) {
        cp = name_char(p, &len);
        if (lines && (cp == '\n' || cp == '\t')) {
            ob_write(ob, (const char *)p, 1);
        } else if (cp < 0x20 || (cp >= 0x7f && cp <= 0x9f)) {
            /* Control characters and bytes that are not text would reach
             * the terminal: show their bytes as \xNN. */
            for (i = 0; i < len; i++) {
                ob_printf(ob, "\\x%02x", p[i]);
            }
        } else {
            ob_write(ob, (const char *)p, len);
        }
    }
}

void ob_json_field(struct outbuf *ob, const char *key, const char *value)
{
    ob_puts(ob, ", \"");
    ob_puts(ob, key);
    ob_puts(ob, "\": ");
    ob_json_string(ob, value);
}

void ob_human_string(struct outbuf *ob, const char *s)
{
    human_text(ob, s, false);
}

int ob_flush_human(struct outbuf *ob)
{
    struct outbuf out = { 0 };

    ob_write(ob, "", 1); /* a string, for the decoder */
    if (!ob->failed) {
        human_text(&out, ob->p, true);
    }
    out.failed |= ob->failed;
    ob_free(ob);
    return ob_flush(&out);
}

char *human_string(const char *s)
{
    struct outbuf ob = { 0 };
    char *r = NULL;

    ob_human_string(&ob, s);
    ob_write(&ob, "", 1);
    if (!ob.failed) {
        r = strdup(ob.p);
    }
    ob_free(&ob);
    return r;
}

int ob_flush_all(struct outbuf *const *obs, size_t n)
{
    size_t i;
    int ret = 0;

    for (i = 0; i < n; i++) {
        if (obs[i]->failed) {
            fprintf(stderr, "qbm: out of memory building the output\n");
            ret = 1;
        }
    }
    for (i = 0; i < n && ret == 0 && !tool_quiet; i++) {
        if (obs[i]->len &&
            fwrite(obs[i]->p, 1, obs[i]->len, stdout) != obs[i]->len) {
            ret = 1;
        }
    }
    if (ret == 0 && fflush(stdout) != 0) {
        ret = 1;
    }
    if (ret && errno) {
        fprintf(stderr, "qbm: cannot write the output: %s\n", strerror(errno));
    }
    for (i = 0; i < n; i++) {
        ob_free(obs[i]);
    }
    return ret;
}

int ob_flush(struct outbuf *ob)
{
    int ret = 0;

    if (ob->failed) {
        fprintf(stderr, "qbm: out of memory building the output\n");
        ret = 1;
    } else if (ob->len && !tool_quiet &&
               (fwrite(ob->p, 1, ob->len, stdout) != ob->len ||
                fflush(stdout) != 0)) {
        fprintf(stderr, "qbm: cannot write the output: %s\n", strerror(errno));
        ret = 1;
    }
    ob_free(ob);
    return ret;
}

void ob_free_storage(struct outbuf *ob)
{
    if (ob->mapped) {
        munmap(ob->p, ob->cap);
    } else {
        free(ob->p);
    }
    ob->mapped = false;
}

void ob_free(struct outbuf *ob)
{
    ob_free_storage(ob);
    ob->p = NULL;
    ob->len = ob->cap = 0;
}

void format_size(char *buf, size_t len, uint64_t bytes)
{
    static const char *const units[] = { "B",   "KiB", "MiB", "GiB",
                                         "TiB", "PiB", "EiB" };
    double v = (double)bytes;
    unsigned u = 0;

    while (v >= 1024 && u + 1 < sizeof(units) / sizeof(units[0])) {
        v /= 1024;
        u++;
    }
    if (u == 0) {
        snprintf(buf, len, "%llu B", (unsigned long long)bytes);
    } else {
        snprintf(buf, len, "%.3g %s", v, units[u]);
    }
}

void tool_verror(const char *file, const char *fmt, va_list ap)
{
    char msg[4096];
    char *shown;

    vsnprintf(msg, sizeof(msg), fmt, ap);
    /* Names in it (files, bitmaps) may hold control characters. */
    shown = human_string(msg);
    fputs("qbm: ", stderr);
    if (file) {
        char *f = human_string(file);

        fprintf(stderr, "%s: ", f ? f : file);
        free(f);
    }
    fprintf(stderr, "%s\n", shown ? shown : msg);
    free(shown);
}

void tool_error(const char *file, const char *fmt, ...)
{
    va_list ap;

    va_start(ap, fmt);
    tool_verror(file, fmt, ap);
    va_end(ap);
}

void tool_lib_error(const char *file)
{
    tool_error(file, "%s", qbm_get_error());
}

bool parse_output(const char *arg, enum output_format *ret)
{
    if (strcmp(arg, "human") == 0) {
        *ret = OUTPUT_HUMAN;
    } else if (strcmp(arg, "json") == 0) {
        *ret = OUTPUT_JSON;
    } else {
        return false;
    }
    return true;
}
