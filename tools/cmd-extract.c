/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* qbm extract: an offline incremental (or full) backup of a disk. */
#include <stdio.h>

#include "qbm-tool.h"

static const char usage[] =
    "Usage: qbm extract [--chain] [--full] [--backing PREVIOUS] "
    "[--rotate NEW]\n"
    "                   [--disable-old] [-p] [-U] -o OUTPUT IMAGE [BITMAP]\n"
    "Write to OUTPUT a qcow2 image holding the clusters of IMAGE (read\n"
    "through its backing chain) that BITMAP marks dirty, zero flags where\n"
    "the disk reads as zeros: an incremental backup of a shut-down VM.\n"
    "'qbm restore FULL ... OUTPUT' rebuilds the disk from it.\n\n"
    "  -o OUTPUT            the backup file, or block device, to write (as\n"
    "                       for restore)\n"
    "  -c, --chain          the dirty set is BITMAP's union over the chain\n"
    "      --full           copy everything allocated (a full backup)\n"
    "  -b, --backing=FILE   record FILE (the previous backup) as OUTPUT's\n"
    "                       backing file, so QEMU opens the chain directly\n"
    "      --rotate=NEW     once OUTPUT is safely written, add an empty\n"
    "                       enabled bitmap NEW to IMAGE; BITMAP stays\n"
    "                       enabled, as libvirt keeps every checkpoint\n"
    "                       (refused before anything is written if IMAGE\n"
    "                       has NEW already)\n"
    "      --disable-old    with --rotate: also disable BITMAP (the older\n"
    "                       model; not valid for libvirt)\n";

int cmd_extract(int argc, char **argv)
{
    static const struct option opts[] = {
        { "chain", no_argument, NULL, 'c' },
        { "full", no_argument, NULL, 'F' },
        { "backing", required_argument, NULL, 'b' },
        { "rotate", required_argument, NULL, 'r' },
        { "disable-old", no_argument, NULL, 'D' },
        { NULL, 0, NULL, 0 },
    };
    struct tool_args a = {
        .cmd = "extract",
        .usage = usage,
        .shortopts = "o:cb:",
        .opts = opts,
        .common = TOOL_OPT_FORMAT | TOOL_OPT_PROGRESS | TOOL_OPT_SHARE,
        .min_args = 1,
        .max_args = 2,
        .args_hint = "-o OUTPUT, IMAGE and BITMAP",
    };
    const char *output = NULL, *backing = NULL, *rotate = NULL;
    const char *image, *bitmap = NULL;
    unsigned flags = 0, rotate_flags = 0;
    struct progress p;
    int c, r;

    while ((c = tool_getopt(&a, argc, argv)) > 0) {
        switch (c) {
        case 'o':
            output = optarg;
            break;
        case 'c':
            flags |= QBM_EXTRACT_CHAIN;
            break;
        case 'F':
            flags |= QBM_EXTRACT_FULL;
            break;
        case 'b':
            backing = optarg;
            break;
        case 'r':
            rotate = optarg;
            break;
        case 'D':
            rotate_flags |= QBM_EXTRACT_DISABLE_OLD;
            break;
        }
    }
    if (c < 0) {
        return a.status;
    }
    if (!output || (a.nargs == 1 && !(flags & QBM_EXTRACT_FULL))) {
        return usage_error("extract", "expected -o OUTPUT, IMAGE and "
                                      "BITMAP");
    }
    image = a.args[0];
    if (a.nargs == 2) {
        bitmap = a.args[1];
    }
    if (rotate && !bitmap) {
        return usage_error("extract", "--rotate needs BITMAP");
    }
    if (rotate_flags && !rotate) {
        return usage_error("extract", "--disable-old needs --rotate");
    }
    if (a.open_flags & QBM_OPEN_FORCE_SHARE) {
        if (rotate) {
            /* The rotation edits IMAGE, which needs its locks. */
            return usage_error("extract", "--rotate cannot be used with -U");
        }
        flags |= QBM_EXTRACT_FORCE_SHARE;
    }
    p = progress_init(&a);
    if (rotate) {
        r = qbm_extract_rotate(image, bitmap, rotate, output,
                               flags | rotate_flags, backing, progress_fn(&p),
                               &p);
    } else {
        r = qbm_extract(image, bitmap, output, flags, backing, progress_fn(&p),
                        &p);
    }
    /* The library names the file each message is about. */
    if (progress_finish(&p, r) != 0) {
        return 1;
    }
    return 0;
}
