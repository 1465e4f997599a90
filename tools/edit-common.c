/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* Helpers shared by the editing subcommands. */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "qbm-tool.h"

void edit_space_line(struct outbuf *plan, unsigned flags,
                     const struct qbm_space_info *sp)
{
    ob_printf(plan,
              "%s %" PRIu64 " bytes of new clusters (%" PRIu64
              " past the image end %" PRIu64 "); image end %s: %" PRIu64,
              (flags & QBM_PLAN_WORST_CASE) ? "at most, once every bit is "
                                              "dirty, it needs"
                                            : "needs",
              sp->bytes, sp->end_after - sp->end_before, sp->end_before,
              (flags & QBM_PLAN_WORST_CASE) ? "then" : "after the edit",
              sp->end_after);
    if (sp->capacity) {
        ob_printf(plan, "; the device has %" PRIu64 " bytes%s", sp->capacity,
                  sp->end_after > sp->capacity ? " (too few)" : "");
    }
    ob_puts(plan, "\n");
}

int edit_plan_space(struct qbm_image *img, unsigned flags, struct outbuf *plan)
{
    struct qbm_space_info sp = { 0 };

    if (qbm_commit_plan(img, flags, &sp.bytes, &sp.end_after) < 0 ||
        qbm_image_end_offset(img, &sp.end_before) < 0) {
        return -1;
    }
    sp.capacity = qbm_image_capacity(img);
    edit_space_line(plan, flags, &sp);
    return 0;
}

int edit_finish(struct qbm_image *img, const char *file, bool dry_run,
                struct outbuf *plan)
{
    int ret = 0;

    if (dry_run) {
        /* The commit's own checks and placement, nothing written. */
        if (edit_plan_space(img, 0, plan) < 0) {
            return edit_fail(img, file, plan);
        }
        ob_puts(plan, "(dry run: nothing was written)\n");
        ret = ob_flush_human(plan);
    } else if (qbm_commit(img) < 0) {
        tool_lib_error(file);
        ob_free(plan);
        ret = 1;
    } else {
        ob_free(plan);
    }
    qbm_close(img);
    return ret;
}

int edit_fail(struct qbm_image *img, const char *file, struct outbuf *plan)
{
    tool_lib_error(file);
    ob_free(plan);
    qbm_close(img);
    return 1;
}

bool parse_size(const char *s, uint64_t *ret)
{
    char *end;
    unsigned long long v;
    unsigned shift = 0;

    if (!*s || *s == '-') {
        return false;
    }
    errno = 0;
    v = strtoull(s, &end, 10);
    if (errno || end == s) {
        return false;
    }
    switch (*end) {
    case '\0':
        break;
    case 'k':
    case 'K':
        shift = 10;
        break;
    case 'm':
    case 'M':
        shift = 20;
        break;
    case 'g':
    case 'G':
        shift = 30;
        break;
    case 't':
    case 'T':
        shift = 40;
        break;
    default:
        return false;
    }
    if (*end && end[1] != '\0' && strcmp(end + 1, "iB") != 0 &&
        strcmp(end + 1, "B") != 0) {
        return false;
    }
    if (shift && v > (UINT64_MAX >> shift)) {
        return false;
    }
    *ret = (uint64_t)v << shift;
    return true;
}

bool same_file(const char *a, const char *b)
{
    struct stat sa, sb;

    return stat(a, &sa) == 0 && stat(b, &sb) == 0 && sa.st_dev == sb.st_dev &&
           sa.st_ino == sb.st_ino;
}

void hint_swapped(const char *cmd, const char *upper, const char *lower,
                  const char *first, const char *second)
{
    struct qbm_chain *ch = qbm_chain_open(upper, QBM_OPEN_FORCE_SHARE);
    size_t i;

    for (i = 1; ch && i < qbm_chain_length(ch); i++) {
        if (same_file(qbm_chain_filename(ch, i), lower)) {
            tool_error(cmd,
                       "BASE is above TOP (%s is in the backing chain of "
                       "%s); did you mean 'qbm %s %s %s'?",
                       lower, upper, cmd, second, first);
            break;
        }
    }
    qbm_chain_close(ch);
}

int edit_names(struct tool_args *a, int argc, char **argv,
               int (*fn)(struct qbm_image *img, const char *name),
               const char *verb, const char *prep)
{
    struct outbuf plan = { 0 };
    struct qbm_image *img;
    const char *file;
    int r, i;

    r = tool_parse(a, argc, argv);
    if (r >= 0) {
        return r;
    }
    file = a->args[0];
    img = edit_open(file);
    if (!img) {
        return 1;
    }
    for (i = 1; i < a->nargs; i++) {
        if (fn(img, a->args[i]) < 0) {
            return edit_fail(img, file, &plan);
        }
        ob_printf(&plan, "would %s bitmap '%s' %s %s\n", verb, a->args[i], prep,
                  file);
    }
    return edit_finish(img, file, a->dry_run, &plan);
}
