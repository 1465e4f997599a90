/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * qbm snapshot-bitmaps: after an external snapshot TOP over BASE taken
 * without bitmap handling, continue BASE's checkpoints in TOP. The
 * workflow is the library's (qbm_carry_snapshot); this prints what it
 * did.
 */
#include <stdio.h>

#include "qbm-tool.h"

static const char usage[] =
    "Usage: qbm snapshot-bitmaps [--disable-base] [--dry-run] BASE TOP\n"
    "As libvirt when it takes an external snapshot: give TOP (whose\n"
    "backing file is BASE) every enabled bitmap of BASE, same name and\n"
    "granularity, enabled, and mark in it every cluster TOP already holds,\n"
    "so each checkpoint covers the writes since the snapshot and QEMU keeps\n"
    "tracking in TOP. BASE's bitmaps stay enabled. Disabled bitmaps are not\n"
    "carried, nor in-use ones (with a warning). A bitmap TOP already has is\n"
    "only marked.\n\n"
    "      --disable-base  then disable the carried bitmaps in BASE (not\n"
    "                      valid for libvirt)\n";

/* A dry run's plan: TOP's lines, then BASE's (--disable-base). */
struct report {
    struct outbuf plan[2];
    int cur;
    bool base_done;
};

static int report(void *opaque, int action, const char *bitmap,
                  const char *image)
{
    struct report *rep = opaque;
    struct outbuf *ob = &rep->plan[rep->cur];

    switch (action) {
    case QBM_CARRY_SNAPSHOT_SKIPPED:
        ob_printf(ob, "not carrying disabled bitmap '%s'\n", bitmap);
        break;
    case QBM_CARRY_SNAPSHOT_IN_USE:
        tool_error(image,
                   "warning: bitmap '%s' not carried: it is in use "
                   "(inconsistent); repair it first with 'qbm check "
                   "--repair'",
                   bitmap);
        ob_printf(ob, "not carrying bitmap '%s': in use in %s\n", bitmap,
                  image);
        break;
    case QBM_CARRY_SNAPSHOT_ADDED:
    case QBM_CARRY_SNAPSHOT_MARKED:
        ob_printf(ob,
                  "would continue bitmap '%s' in %s, marking "
                  "the clusters it holds\n",
                  bitmap, image);
        break;
    case QBM_CARRY_SNAPSHOT_DISABLED:
        ob_printf(ob, "would disable bitmap '%s' in %s\n", bitmap, image);
        break;
    case QBM_CARRY_SNAPSHOT_TOP_DONE:
        rep->cur = 1;
        break;
    case QBM_CARRY_SNAPSHOT_BASE_DONE:
        rep->base_done = true;
        break;
    }
    return 0;
}

/* Each image's plan with the space its commit needs. */
static int print_plan(struct report *rep, const struct qbm_space_info *top,
                      const struct qbm_space_info *base)
{
    struct outbuf *out = &rep->plan[0];

    edit_space_line(out, 0, top);
    ob_puts(out, "(dry run: nothing was written)\n");
    if (rep->base_done) {
        ob_write(out, rep->plan[1].p, rep->plan[1].len);
        edit_space_line(out, 0, base);
        ob_puts(out, "(dry run: nothing was written)\n");
    }
    return ob_flush_human(out);
}

int cmd_snapshot_bitmaps(int argc, char **argv)
{
    static const struct option opts[] = {
        { "disable-base", no_argument, NULL, 'd' },
        { NULL, 0, NULL, 0 },
    };
    struct tool_args a = {
        .cmd = "snapshot-bitmaps",
        .usage = usage,
        .opts = opts,
        .common = TOOL_OPT_EDIT,
        .min_args = 2,
        .max_args = 2,
        .args_hint = "BASE and TOP",
    };
    struct report rep = { 0 };
    struct qbm_space_info top_sp, base_sp;
    unsigned flags = 0;
    int c, r;

    while ((c = tool_getopt(&a, argc, argv)) > 0) {
        switch (c) {
        case 'd':
            flags |= QBM_CARRY_SNAPSHOT_DISABLE_BASE;
            break;
        }
    }
    if (c < 0) {
        return a.status;
    }
    if (a.dry_run) {
        r = qbm_carry_snapshot_plan(a.args[0], a.args[1], flags, report, &rep,
                                    &top_sp, &base_sp);
        if (r == 0) {
            r = print_plan(&rep, &top_sp, &base_sp);
        }
    } else {
        r = qbm_carry_snapshot(a.args[0], a.args[1], flags, report, &rep);
    }
    ob_free(&rep.plan[0]);
    ob_free(&rep.plan[1]);
    if (r < 0) {
        tool_lib_error(NULL);
        /* BASE TOP given as TOP BASE: BASE's chain holds TOP. */
        hint_swapped(a.cmd, a.args[0], a.args[1], a.args[0], a.args[1]);
        return 1;
    }
    return r ? 1 : 0; /* r > 0: the output could not be written */
}
