/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* qbm extract: an offline incremental (or full) backup of a disk. */
#include <getopt.h>
#include <stdio.h>

#include "qbm-tool.h"

static const char usage[] =
    "Usage: qbm extract [--chain] [--full] [--backing PREVIOUS] "
    "[--rotate NEW]\n"
    "                   [--disable-old] [-p] -o OUTPUT IMAGE [BITMAP]\n"
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
    "                       model; not valid for libvirt)\n"
    "  -p                   show progress\n"
    "  -h, --help           show this help\n";

int cmd_extract(int argc, char **argv)
{
    static const struct option opts[] = {
        { "chain", no_argument, NULL, 'c' },
        { "full", no_argument, NULL, 'f' },
        { "backing", required_argument, NULL, 'b' },
        { "rotate", required_argument, NULL, 'r' },
        { "disable-old", no_argument, NULL, 'D' },
        { "help", no_argument, NULL, 'h' },
        { NULL, 0, NULL, 0 },
    };
    const char *output = NULL, *backing = NULL, *rotate = NULL;
    const char *image, *bitmap = NULL;
    unsigned flags = 0, rotate_flags = 0, last = (unsigned)-1;
    bool progress = false;
    int c, r;

    while ((c = getopt_long(argc, argv, "+o:cb:ph", opts, NULL)) != -1) {
        switch (c) {
        case 'o':
            output = optarg;
            break;
        case 'c':
            flags |= QBM_EXTRACT_CHAIN;
            break;
        case 'f':
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
        case 'p':
            progress = true;
            break;
        case 'h':
            fputs(usage, stdout);
            return 0;
        default:
            return usage_error("extract", "invalid option");
        }
    }
    if (!output || argc - optind < 1 || argc - optind > 2 ||
        (argc - optind == 1 && !(flags & QBM_EXTRACT_FULL))) {
        return usage_error("extract", "expected -o OUTPUT, IMAGE and "
                                      "BITMAP");
    }
    image = argv[optind];
    if (argc - optind == 2) {
        bitmap = argv[optind + 1];
    }
    if (rotate && !bitmap) {
        return usage_error("extract", "--rotate needs BITMAP");
    }
    if (rotate_flags && !rotate) {
        return usage_error("extract", "--disable-old needs --rotate");
    }
    if (rotate) {
        r = qbm_extract_rotate(image, bitmap, rotate, output,
                               flags | rotate_flags, backing,
                               progress ? show_progress : NULL, &last);
    } else {
        r = qbm_extract(image, bitmap, output, flags, backing,
                        progress ? show_progress : NULL, &last);
    }
    if (r < 0) {
        if (progress) {
            fputc('\n', stderr);
        }
        /* The library names the file each message is about. */
        tool_lib_error(NULL);
        return 1;
    }
    if (progress) {
        end_progress(&last);
    }
    return 0;
}
