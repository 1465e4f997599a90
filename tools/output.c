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
    if (cap >= OB_MAP_MIN) {
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

/* Decimal without printf: dump prints millions of numbers. */
static size_t u64_digits(char *dst, uint64_t v)
{
    char tmp[20];
    size_t i = sizeof(tmp), n;

    do {
        tmp[--i] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    n = sizeof(tmp) - i;
    memcpy(dst, tmp + i, n);
    return n;
}

void ob_u64(struct outbuf *ob, uint64_t v)
{
    ob_reserve(ob, 20);
    if (!ob->failed) {
        ob->len += u64_digits(ob->p + ob->len, v);
    }
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
    d = ob->p + ob->len;
    memcpy(d, pre, lp);
    d += lp;
    d += u64_digits(d, a);
    memcpy(d, mid, lm);
    d += lm;
    d += u64_digits(d, b);
    memcpy(d, post, lq);
    d += lq;
    ob->len = (size_t)(d - ob->p);
}

void ob_json_string(struct outbuf *ob, const char *s)
{
    const unsigned char *p = (const unsigned char *)s;

    ob_write(ob, "\"", 1);
    for (; *p; p++) {
        switch (*p) {
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
        default:
            if (*p < 0x20 || *p == 0x7f) {
                ob_printf(ob, "\\u%04x", *p);
            } else if (*p >= 0x80) {
                /* Names are bytes; keep JSON valid by escaping bytes that
                 * are not part of well-formed UTF-8 as U+FFFD-free
                 * \u00XX code points of their value. */
                size_t n = 0, k;
                unsigned c = *p;

                if ((c & 0xe0) == 0xc0) {
                    n = 1;
                } else if ((c & 0xf0) == 0xe0) {
                    n = 2;
                } else if ((c & 0xf8) == 0xf0) {
                    n = 3;
                }
                for (k = 1; k <= n; k++) {
                    if ((p[k] & 0xc0) != 0x80) {
                        n = 0;
                        break;
                    }
                }
                if (n) {
                    ob_write(ob, (const char *)p, n + 1);
                    p += n;
                } else {
                    ob_printf(ob, "\\u%04x", c);
                }
            } else {
                ob_write(ob, (const char *)p, 1);
            }
        }
    }
    ob_write(ob, "\"", 1);
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
    fputs("qbm: ", stderr);
    if (file) {
        fprintf(stderr, "%s: ", file);
    }
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
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
