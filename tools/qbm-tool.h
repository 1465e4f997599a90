/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* Shared helpers of the qbm command. Tools see only the public API. */
#ifndef QBM_TOOL_H
#define QBM_TOOL_H

#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "qbm.h"

#define EXIT_USAGE 2

/* Output is built in memory and printed only when the command succeeds. */
struct outbuf {
    char *p;
    size_t len, cap;
    bool failed; /* out of memory */
};

void ob_write(struct outbuf *ob, const char *s, size_t n);
void ob_puts(struct outbuf *ob, const char *s);
void ob_printf(struct outbuf *ob, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));
void ob_u64(struct outbuf *ob, uint64_t v);
void ob_json_string(struct outbuf *ob, const char *s);
/* Print to stdout and free; returns 0 or 1 (write error). */
int ob_flush(struct outbuf *ob);
void ob_free(struct outbuf *ob);

/* "64 MiB", "1.5 GiB", "512 B". */
void format_size(char *buf, size_t len, uint64_t bytes);

/* qbm: FILE: message (from the library's last error when msg is NULL). */
void tool_error(const char *file, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));
void tool_lib_error(const char *file);

enum output_format { OUTPUT_HUMAN, OUTPUT_JSON };
/* Parse --output=VALUE; returns false (after a message) when invalid. */
bool parse_output(const char *arg, enum output_format *ret);

/* Usage error helper: prints message + hint, returns EXIT_USAGE. */
int usage_error(const char *cmd, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

int cmd_info(int argc, char **argv);
int cmd_dump(int argc, char **argv);

#endif
