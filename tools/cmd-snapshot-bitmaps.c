/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * qbm snapshot-bitmaps: after an external snapshot TOP over BASE taken
 * without bitmap handling, continue BASE's checkpoints in TOP.
 */
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>

#include "qbm-tool.h"

static const char usage[] =
    "Usage: qbm snapshot-bitmaps [--disable-base] [--dry-run] BASE TOP\n"
    "Give TOP (whose backing file is BASE) every enabled bitmap of BASE,\n"
    "same name and granularity, enabled, and mark in it every cluster TOP\n"
    "already holds, so each checkpoint covers the writes since the\n"
    "snapshot and QEMU keeps tracking in TOP. Disabled bitmaps are not\n"
    "carried. A bitmap TOP already has is only marked.\n\n"
    "      --disable-base  then disable the carried bitmaps in BASE\n"
    "  -n, --dry-run       say what would change, change nothing\n"
    "  -h, --help          show this help\n";

int cmd_snapshot_bitmaps(int argc, char **argv)
{
    static const struct option opts[] = {
        { "disable-base", no_argument, NULL, 'd' },
        { "dry-run", no_argument, NULL, 'n' },
        { "help", no_argument, NULL, 'h' },
        { NULL, 0, NULL, 0 },
    };
    struct outbuf plan = { 0 }, plan2 = { 0 };
    struct qbm_image *base, *top;
    bool disable_base = false, dry_run = false;
    const char *bfile, *tfile;
    char **carried = NULL;
    size_t ncarried = 0, i;
    char *backing;
    int c, ret;

    while ((c = getopt_long(argc, argv, "+nh", opts, NULL)) != -1) {
        switch (c) {
        case 'd':
            disable_base = true;
            break;
        case 'n':
            dry_run = true;
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
    bfile = argv[optind];
    tfile = argv[optind + 1];
    top = edit_open(tfile);
    if (!top) {
        return 1;
    }
    backing = qbm_image_backing_path(top);
    if (!backing || !same_file(backing, bfile)) {
        tool_error(tfile, "its backing file is %s, not %s",
                   backing ? backing : "(none)", bfile);
        free(backing);
        qbm_close(top);
        return 1;
    }
    free(backing);
    base = qbm_open(bfile, 0);
    if (!base) {
        tool_lib_error(bfile);
        qbm_close(top);
        return 1;
    }
    carried = calloc(qbm_bitmap_count(base) + 1, sizeof(*carried));
    for (i = 0; carried && i < qbm_bitmap_count(base); i++) {
        const char *name = qbm_bitmap_name(base, i);

        if (!(qbm_bitmap_flags(base, i) & QBM_BITMAP_AUTO)) {
            ob_printf(&plan, "not carrying disabled bitmap '%s'\n", name);
            continue;
        }
        if (!qbm_bitmap_consistent(base, i)) {
            tool_error(bfile, "bitmap '%s' is in use; repair it first with "
                       "'qbm check --repair'", name);
            goto fail;
        }
        if (qbm_bitmap_find(top, name) < 0 &&
            qbm_bitmap_add(top, name, qbm_bitmap_granularity(base, i), 0) <
                0) {
            goto lib_fail;
        }
        if (qbm_bitmap_populate(top, name, top) < 0) {
            goto lib_fail;
        }
        carried[ncarried++] = (char *)name;
        ob_printf(&plan, "would continue bitmap '%s' in %s, marking the "
                  "clusters it holds\n", name, tfile);
    }
    if (!carried) {
        tool_error(tfile, "out of memory");
        goto fail;
    }
    ret = edit_finish(top, tfile, dry_run, &plan);
    top = NULL;
    if (ret || !disable_base || ncarried == 0) {
        free(carried);
        qbm_close(base);
        return ret;
    }
    /* The base is read-only for QEMU from now on; disabling its copies
     * records that the checkpoints moved up. */
    for (i = 0; i < ncarried; i++) {
        carried[i] = strdup(carried[i]);
    }
    qbm_close(base);
    base = edit_open(bfile);
    for (i = 0; base && i < ncarried; i++) {
        if (!carried[i] || qbm_bitmap_disable(base, carried[i]) < 0) {
            ret = edit_fail(base, bfile, &plan2);
            base = NULL;
            break;
        }
        ob_printf(&plan2, "would disable bitmap '%s' in %s\n", carried[i],
                  bfile);
    }
    if (base) {
        ret = edit_finish(base, bfile, dry_run, &plan2);
    } else if (ret == 0) {
        ret = 1;
    }
    for (i = 0; i < ncarried; i++) {
        free(carried[i]);
    }
    free(carried);
    return ret;

lib_fail:
    tool_lib_error(tfile);
fail:
    free(carried);
    ob_free(&plan);
    qbm_close(base);
    qbm_close(top);
    return 1;
}
