/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * qbm commit-bitmaps: carry the bitmaps of TOP (and of any layer between
 * TOP and BASE) into BASE around a `qemu-img commit`, which itself drops
 * the bitmaps that exist only above the base. The policy is the
 * library's (qbm_carry_commit); this prints what it did.
 */
#include <stdio.h>
#include <stdlib.h>

#include "qbm-tool.h"

static const char usage[] =
    "Usage: qbm commit-bitmaps [--mark-written] [--fill-gaps] "
    "[--carry-disabled]\n"
    "                          [--dry-run] TOP BASE\n"
    "As libvirt after a block commit: merge every bitmap of TOP, and of the\n"
    "layers between TOP and BASE, into BASE's bitmap of the same name,\n"
    "creating it (enabled, same granularity) when BASE lacks it. Run it\n"
    "before or after 'qemu-img commit' (with -d, or -b BASE for a deeper\n"
    "base).\n"
    "A bitmap is not carried, with a warning, when a copy from TOP down to\n"
    "BASE is disabled or in use, or when it has a gap (a layer down to BASE\n"
    "lacks it while layers above and below have it, or while the topmost\n"
    "copy is enabled): writes to that layer are in no bitmap, and\n"
    "'qbm check --chain' keeps reporting it.\n\n"
    "      --fill-gaps     carry such bitmaps too, marking in BASE's copy\n"
    "                      every cluster each gap layer holds (a superset\n"
    "                      of its writes); needs those layers' data\n"
    "      --carry-disabled  carry bitmaps with disabled copies too, BASE's\n"
    "                      copy taking the topmost copy's state (not valid\n"
    "                      for libvirt)\n"
    "      --mark-written  also mark in BASE's enabled bitmaps every cluster\n"
    "                      the commit copies (the layers' own allocation);\n"
    "                      needs the layers to still hold their data\n";

struct report {
    struct outbuf *plan;
    const char *base;
};

static int report(void *opaque, int action, const char *bitmap,
                  const char *layer)
{
    struct report *rep = opaque;

    switch (action) {
    case QBM_CARRY_COPIED:
    case QBM_CARRY_MERGED:
        ob_printf(rep->plan, "would %s bitmap '%s' of %s into %s\n",
                  action == QBM_CARRY_COPIED ? "copy" : "merge", bitmap, layer,
                  rep->base);
        break;
    case QBM_CARRY_GAP:
        tool_error(rep->base,
                   "warning: bitmap '%s' not carried: %s "
                   "lacks it, so writes made to that layer are in no "
                   "checkpoint (--fill-gaps marks its clusters instead)",
                   bitmap, layer);
        ob_printf(rep->plan,
                  "would not carry bitmap '%s': %s lacks it "
                  "(a gap)\n",
                  bitmap, layer);
        break;
    case QBM_CARRY_DISABLED:
        tool_error(rep->base,
                   "warning: bitmap '%s' not carried: its copy in "
                   "%s is disabled, so libvirt does not use it "
                   "(--carry-disabled carries it anyway)",
                   bitmap, layer);
        ob_printf(rep->plan,
                  "would not carry bitmap '%s': %s's copy is "
                  "disabled\n",
                  bitmap, layer);
        break;
    case QBM_CARRY_IN_USE:
        tool_error(rep->base,
                   "warning: bitmap '%s' not carried: its copy in "
                   "%s is in use (inconsistent); repair it first with "
                   "'qbm check --repair'",
                   bitmap, layer);
        ob_printf(rep->plan,
                  "would not carry bitmap '%s': %s's copy is in use\n", bitmap,
                  layer);
        break;
    case QBM_CARRY_FILLED:
        ob_printf(rep->plan,
                  "would mark in bitmap '%s' of %s the clusters "
                  "of %s, which lacks it\n",
                  bitmap, rep->base, layer);
        break;
    case QBM_CARRY_MARKED:
        ob_printf(rep->plan,
                  "would mark the committed clusters in bitmap "
                  "'%s' of %s\n",
                  bitmap, layer);
        break;
    }
    return 0;
}

int cmd_commit_bitmaps(int argc, char **argv)
{
    static const struct option opts[] = {
        { "mark-written", no_argument, NULL, 'm' },
        { "fill-gaps", no_argument, NULL, 'g' },
        { "carry-disabled", no_argument, NULL, 'D' },
        { NULL, 0, NULL, 0 },
    };
    struct tool_args a = {
        .cmd = "commit-bitmaps",
        .usage = usage,
        .opts = opts,
        .common = TOOL_OPT_EDIT,
        .min_args = 2,
        .max_args = 2,
        .args_hint = "TOP and BASE",
    };
    struct outbuf plan = { 0 };
    struct report rep = { &plan, NULL };
    struct qbm_image *base;
    unsigned flags = 0;
    int c;

    while ((c = tool_getopt(&a, argc, argv)) > 0) {
        switch (c) {
        case 'm':
            flags |= QBM_CARRY_MARK_WRITTEN;
            break;
        case 'g':
            flags |= QBM_CARRY_FILL_GAPS;
            break;
        case 'D':
            flags |= QBM_CARRY_INCLUDE_DISABLED;
            break;
        }
    }
    if (c < 0) {
        return a.status;
    }
    rep.base = a.args[1];
    base = edit_open(rep.base);
    if (!base) {
        return 1;
    }
    if (qbm_carry_commit(base, a.args[0], flags, report, &rep) != 0) {
        tool_lib_error(NULL);
        ob_free(&plan);
        qbm_close(base);
        /* TOP BASE given as BASE TOP: BASE's chain holds TOP. */
        hint_swapped(a.cmd, a.args[1], a.args[0], a.args[0], a.args[1]);
        return 1;
    }
    return edit_finish(base, rep.base, a.dry_run, &plan);
}
