/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * qbm snapshot-bitmaps: after an external snapshot TOP over BASE taken
 * without bitmap handling, continue BASE's checkpoints in TOP. The
 * workflow is the library's (qbm_carry_snapshot); this prints what it
 * did.
 */
#include <getopt.h>
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
    "                      valid for libvirt)\n"
    "  -n, --dry-run       say what would change, change nothing\n"
    "  -h, --help          show this help\n";

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
        fprintf(stderr,
                "qbm: %s: warning: bitmap '%s' not carried: it is in use "
                "(inconsistent); repair it first with 'qbm check "
                "--repair'\n",
                image, bitmap);
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
        return ob_flush(&rep->plan);
    }
    return 0;
}

int cmd_snapshot_bitmaps(int argc, char **argv)
{
    static const struct option opts[] = {
        { "disable-base", no_argument, NULL, 'd' },
        { "dry-run", no_argument, NULL, 'n' },
        { "help", no_argument, NULL, 'h' },
        { NULL, 0, NULL, 0 },
    };
    struct report rep = { { 0 }, false };
    unsigned flags = 0;
    int c, r;

    while ((c = getopt_long(argc, argv, "+nh", opts, NULL)) != -1) {
        switch (c) {
        case 'd':
            flags |= QBM_CARRY_SNAPSHOT_DISABLE_BASE;
            break;
        case 'n':
            flags |= QBM_CARRY_SNAPSHOT_DRY_RUN;
            rep.dry_run = true;
            break;
        case 'h':
            fputs(usage, stdout);
            return 0;
        default:
            return usage_error("snapshot-bitmaps", "invalid option");
        }
    }
    if (argc - optind != 2) {
        return usage_error("snapshot-bitmaps", "expected BASE and TOP");
    }
    r = qbm_carry_snapshot(argv[optind], argv[optind + 1], flags, report, &rep);
    ob_free(&rep.plan);
    if (r < 0) {
        tool_lib_error(NULL);
        return 1;
    }
    return r ? 1 : 0; /* r > 0: the output could not be written */
}
