/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* Output buffering, JSON strings, sizes and messages for the qbm tool. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "qbm-tool.h"

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
    p = realloc(ob->p, cap);
    if (!p) {
        ob->failed = true;
        return;
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
void ob_u64(struct outbuf *ob, uint64_t v)
{
    char tmp[20];
    size_t i = sizeof(tmp);

    do {
        tmp[--i] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    ob_write(ob, tmp + i, sizeof(tmp) - i);
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

int ob_flush(struct outbuf *ob)
{
    int ret = 0;

    if (ob->failed) {
        fprintf(stderr, "qbm: out of memory building the output\n");
        ret = 1;
    } else if (ob->len && (fwrite(ob->p, 1, ob->len, stdout) != ob->len ||
                           fflush(stdout) != 0)) {
        fprintf(stderr, "qbm: cannot write the output: %s\n",
                strerror(errno));
        ret = 1;
    }
    ob_free(ob);
    return ret;
}

void ob_free(struct outbuf *ob)
{
    free(ob->p);
    ob->p = NULL;
    ob->len = ob->cap = 0;
}

void format_size(char *buf, size_t len, uint64_t bytes)
{
    static const char *const units[] = { "B", "KiB", "MiB", "GiB", "TiB",
                                         "PiB", "EiB" };
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

void tool_error(const char *file, const char *fmt, ...)
{
    va_list ap;

    fputs("qbm: ", stderr);
    if (file) {
        fprintf(stderr, "%s: ", file);
    }
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
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

int usage_error(const char *cmd, const char *fmt, ...)
{
    va_list ap;

    fputs("qbm: ", stderr);
    if (cmd) {
        fprintf(stderr, "%s: ", cmd);
    }
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fprintf(stderr, "\nTry 'qbm %s%s--help' for more information.\n",
            cmd ? cmd : "", cmd ? " " : "");
    return EXIT_USAGE;
}
