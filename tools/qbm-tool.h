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

#include <getopt.h>

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
/* A JSON string of s's bytes, as qemu-img writes them: what is not UTF-8
 * becomes U+FFFD. */
void ob_json_string(struct outbuf *ob, const char *s);
/* `, "key": ` then value as a JSON string (key: plain ASCII). */
void ob_json_field(struct outbuf *ob, const char *key, const char *value);
/* s for a terminal: control characters (C0, DEL, C1) and bytes that are
 * not UTF-8 as \xNN. */
void ob_human_string(struct outbuf *ob, const char *s);
/* Print a human report: as ob_flush(), its control characters (but
 * newlines and tabs) and bytes that are not UTF-8 shown as \\xNN. */
int ob_flush_human(struct outbuf *ob);
/* The same as a new string (NULL: out of memory); the caller frees it. */
char *human_string(const char *s);
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
void tool_verror(const char *file, const char *fmt, va_list ap);
void tool_lib_error(const char *file);

enum output_format { OUTPUT_HUMAN, OUTPUT_JSON };
/* Parse --output=VALUE; returns false when invalid. */
bool parse_output(const char *arg, enum output_format *ret);

/* -q: print nothing on stdout and no progress (errors and warnings stay). */
extern bool tool_quiet;

/*
 * Option parsing (options.c), shared by every subcommand. Each command
 * keeps its own table of options (its short ones in `shortopts`, long
 * ones in `opts`, values other than the common ones' below) and names the
 * common options it takes in `common`:
 *
 *     struct tool_args a = {
 *         .cmd = "add", .usage = usage, .shortopts = "g:", .opts = opts,
 *         .common = TOOL_OPT_EDIT, .min_args = 2, .max_args = 2,
 *         .args_hint = "IMAGE and NAME",
 *     };
 *     while ((c = tool_getopt(&a, argc, argv)) > 0) {
 *         switch (c) { case 'g': ...; }  // misuse: return usage_error()
 *     }
 *     if (c < 0) {
 *         return a.status;
 *     }
 *     ... a.args[0 .. a.nargs) are the operands ...
 *
 * GNU argument order: options may follow operands, `--` ends them.
 * -q/--quiet and -h/--help are always taken.
 */
#define TOOL_OPT_FORMAT 0x1u    /* -f, --format=qcow2 (nothing else) */
#define TOOL_OPT_OUTPUT 0x2u    /* --output=human|json */
#define TOOL_OPT_SHARE 0x4u     /* -U, --force-share: no image locks */
#define TOOL_OPT_DRY_RUN 0x8u   /* -n, --dry-run */
#define TOOL_OPT_PROGRESS 0x10u /* -p */
#define TOOL_OPT_READ (TOOL_OPT_FORMAT | TOOL_OPT_OUTPUT | TOOL_OPT_SHARE)
#define TOOL_OPT_EDIT (TOOL_OPT_FORMAT | TOOL_OPT_DRY_RUN)

/* getopt value of --output (the common options take 'f', 'U', 'n', 'p',
 * 'q', 'h' and this one; a command's own options use other values). */
#define TOOL_KEY_OUTPUT 0x100
#define TOOL_MAX_OPTIONS 32

#define TOOL_GETOPT_DONE 0  /* parsed; the operands are in args */
#define TOOL_GETOPT_EXIT -1 /* return status (--help: 0, misuse: 2) */

struct tool_args {
    /* Set by the command. */
    const char *cmd;           /* its name, for messages */
    const char *usage;         /* what --help prints */
    const char *shortopts;     /* its own short options ("g:"), or NULL */
    const struct option *opts; /* its own long options, or NULL */
    unsigned common;           /* TOOL_OPT_* */
    int min_args, max_args;    /* operand count (max_args -1: no limit) */
    const char *args_hint;     /* "IMAGE and NAME": what a misuse expects */
    /* Set by tool_getopt. */
    enum output_format output;
    unsigned open_flags; /* QBM_OPEN_FORCE_SHARE with -U */
    bool dry_run, progress;
    bool format_given; /* -f qcow2 */
    int status;
    char **args; /* the operands */
    int nargs;
    /* tool_getopt's own. */
    bool started;
    int argc;
    char **argv;
    struct option all[TOOL_MAX_OPTIONS];
    char shorts[64];
};

/* The next of the command's own options, or TOOL_GETOPT_DONE, or
 * TOOL_GETOPT_EXIT (after --help or a misuse message). */
int tool_getopt(struct tool_args *a, int argc, char **argv);
/* For a command with no options of its own: -1 to go on, else the exit
 * code to return. */
int tool_parse(struct tool_args *a, int argc, char **argv);
/* Misuse: one line "qbm: CMD: message" (cmd may be NULL), then a hint
 * "Try 'qbm help CMD'." on stderr; returns EXIT_USAGE. */
int usage_error(const char *cmd, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));
/* -f/-F FORMAT: true for qcow2, else a misuse message. */
bool parse_format(const char *cmd, const char *opt, const char *arg);

/* Open an image or a chain, printing the error (qbm: FILE: message). */
struct qbm_image *tool_open(const char *file, unsigned flags);
struct qbm_chain *tool_chain_open(const char *file, unsigned flags);

/* Editing helpers (edit-common.c). */
#define edit_open(file) tool_open((file), QBM_OPEN_RDWR)
/* Commit (or, for a dry run, print the plan), close; returns the exit code. */
int edit_finish(struct qbm_image *img, const char *file, bool dry_run,
                struct outbuf *plan);
/* Print the library error, drop the plan, close; returns 1. */
int edit_fail(struct qbm_image *img, const char *file, struct outbuf *plan);
/* Append the space the staged edits need (qbm_commit_plan with flags) to
 * plan; -1 with the library's error when the commit would be refused. */
int edit_plan_space(struct qbm_image *img, unsigned flags, struct outbuf *plan);
/* Append the space line of those figures (flags: as edit_plan_space). */
void edit_space_line(struct outbuf *plan, unsigned flags,
                     const struct qbm_space_info *sp);
/*
 * A command IMAGE NAME... with no options of its own but the common
 * editing ones: fn(img, NAME) for each NAME, planned as "would VERB bitmap
 * 'NAME' PREP IMAGE", in one commit.
 */
int edit_names(struct tool_args *a, int argc, char **argv,
               int (*fn)(struct qbm_image *img, const char *name),
               const char *verb, const char *prep);
/*
 * After CMD FIRST SECOND failed: when LOWER lies in UPPER's backing chain
 * (UPPER and LOWER are FIRST and SECOND in some order), the operands are
 * the wrong way round: say so, with the command to run instead.
 */
void hint_swapped(const char *cmd, const char *upper, const char *lower,
                  const char *first, const char *second);
/* "64k", "1M", "512": bytes. */
bool parse_size(const char *s, uint64_t *ret);
bool same_file(const char *a, const char *b);

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

/* progress.c: -p, as qemu-img convert -p shows it, on stderr. */
struct progress {
    bool on;
    unsigned last;
};
/* The state for a command run with (a->progress) or without -p. */
struct progress progress_init(const struct tool_args *a);
/* The callback to give the library (NULL without -p); its opaque is p. */
qbm_progress_fn progress_fn(const struct progress *p);
/*
 * After the library call that returned r: end the progress line, and for
 * r < 0 print the library's error (it names the file). Returns 0 or 1.
 */
int progress_finish(struct progress *p, int r);

#endif
