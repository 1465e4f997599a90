/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* Shared helpers of the qbm command. Tools see only the public API. */
#ifndef QBM_TOOL_H
#define QBM_TOOL_H

#include <errno.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "qbm.h"

#define EXIT_USAGE 2

/* Output is built in memory and printed only when the command succeeds. */
struct outbuf {
    char *p;
    size_t len, cap;
    bool failed; /* out of memory */
    bool mapped; /* p is an mmap()ed area of cap bytes */
};

void ob_write(struct outbuf *ob, const char *s, size_t n);
void ob_puts(struct outbuf *ob, const char *s);
void ob_printf(struct outbuf *ob, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));
void ob_u64(struct outbuf *ob, uint64_t v);
/* PRE a MID b POST in one step (the hot path of dump). */
void ob_extent(struct outbuf *ob, const char *pre, uint64_t a, const char *mid,
               uint64_t b, const char *post);
void ob_json_string(struct outbuf *ob, const char *s);
/* Print to stdout and free; returns 0 or 1 (write error). */
int ob_flush(struct outbuf *ob);
/* The same for several buffers, printed in order. */
int ob_flush_all(struct outbuf *const *obs, size_t n);
void ob_free(struct outbuf *ob);
void ob_free_storage(struct outbuf *ob);

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

/* Editing helpers (edit-common.c). edit_open prints its own error. */
struct qbm_image *edit_open(const char *file);
/* Commit (or, for a dry run, print the plan), close; returns the exit code. */
int edit_finish(struct qbm_image *img, const char *file, bool dry_run,
                struct outbuf *plan);
/* Print the library error, drop the plan, close; returns 1. */
int edit_fail(struct qbm_image *img, const char *file, struct outbuf *plan);
/* "64k", "1M", "512": bytes. */
bool parse_size(const char *s, uint64_t *ret);
bool same_file(const char *a, const char *b);
/*
 * Parse [--dry-run] [--help] and check the argument count. Returns -1 to
 * go on (arguments start at optind), else the exit code to return.
 */
int parse_simple_edit(int argc, char **argv, const char *cmd, const char *usage,
                      int min_args, int max_args, bool *ret_dry_run);

int cmd_info(int argc, char **argv);
int cmd_dump(int argc, char **argv);
int cmd_add(int argc, char **argv);
int cmd_remove(int argc, char **argv);
int cmd_clear(int argc, char **argv);
int cmd_enable(int argc, char **argv);
int cmd_disable(int argc, char **argv);
int cmd_rename(int argc, char **argv);
int cmd_merge(int argc, char **argv);
int cmd_copy(int argc, char **argv);
int cmd_populate(int argc, char **argv);
int cmd_commit_bitmaps(int argc, char **argv);
int cmd_snapshot_bitmaps(int argc, char **argv);
int cmd_check(int argc, char **argv);
int cmd_restore(int argc, char **argv);
int cmd_extract(int argc, char **argv);
int cmd_consolidate(int argc, char **argv);
int cmd_rebuild(int argc, char **argv);
int cmd_verify(int argc, char **argv);
/* In qbm-checkpoints, the program of its own (qbm.c). */
int cmd_checkpoints(int argc, char **argv);

/* progress.c: a qbm_progress_fn; opaque points to an unsigned set to -1. */
void show_progress(void *opaque, uint64_t done, uint64_t total);
void end_progress(void *opaque);

#endif
