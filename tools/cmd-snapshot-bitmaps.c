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

struct report {
    struct outbuf plan;
    bool dry_run;
};

static int report(void *opaque, int action, const char *bitmap,
                  const char *image)
{
    struct report *rep = opaque;

    switch (action) {
    case QBM_CARRY_SNAPSHOT_SKIPPED:
        ob_printf(&rep->plan, "not carrying disabled bitmap '%s'\n", bitmap);
        break;
    case QBM_CARRY_SNAPSHOT_IN_USE:
        tool_error(image,
                   "warning: bitmap '%s' not carried: it is in use "
                   "(inconsistent); repair it first with 'qbm check "
                   "--repair'",
                   bitmap);
        ob_printf(&rep->plan, "not carrying bitmap '%s': in use in %s\n",
                  bitmap, image);
        break;
    case QBM_CARRY_SNAPSHOT_ADDED:
    case QBM_CARRY_SNAPSHOT_MARKED:
        ob_printf(&rep->plan,
                  "would continue bitmap '%s' in %s, marking "
                  "the clusters it holds\n",
                  bitmap, image);
        break;
    case QBM_CARRY_SNAPSHOT_DISABLED:
        ob_printf(&rep->plan, "would disable bitmap '%s' in %s\n", bitmap,
                  image);
        break;
    case QBM_CARRY_SNAPSHOT_TOP_DONE:
    case QBM_CARRY_SNAPSHOT_BASE_DONE:
        /* Each image's plan, once it is settled. */
        if (!rep->dry_run) {
            ob_free(&rep->plan);
            break;
        }
        ob_puts(&rep->plan, "(dry run: nothing was written)\n");
        return ob_flush_human(&rep->plan);
    }
    return 0;
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
    struct report rep = { { 0 }, false };
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
        flags |= QBM_CARRY_SNAPSHOT_DRY_RUN;
        rep.dry_run = true;
    }
    r = qbm_carry_snapshot(a.args[0], a.args[1], flags, report, &rep);
    ob_free(&rep.plan);
    if (r < 0) {
        tool_lib_error(NULL);
        /* BASE TOP given as TOP BASE: BASE's chain holds TOP. */
        hint_swapped(a.cmd, a.args[0], a.args[1], a.args[0], a.args[1]);
        return 1;
    }
    return r ? 1 : 0; /* r > 0: the output could not be written */
}
