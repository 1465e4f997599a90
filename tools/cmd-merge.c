/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* qbm merge: OR one or more bitmaps into a target bitmap. */
#include <getopt.h>
#include <stdio.h>

#include "qbm-tool.h"

static const char usage[] =
    "Usage: qbm merge [-b SOURCE_IMAGE] [--dry-run] IMAGE TARGET SOURCE...\n"
    "OR the bitmaps SOURCE... (of IMAGE, or of SOURCE_IMAGE with -b) into\n"
    "bitmap TARGET of IMAGE, in one crash-safe update. Granularities may\n"
    "differ: a TARGET bit is set when any byte it covers is dirty.\n\n"
    "  -b, --source-image=FILE  read the SOURCE bitmaps from FILE (same\n"
    "                           virtual size)\n"
    "  -F FORMAT                format of FILE (only qcow2)\n"
    "  -n, --dry-run            say what would change, change nothing\n"
    "  -h, --help               show this help\n";

int cmd_merge(int argc, char **argv)
{
    static const struct option opts[] = {
        { "source-image", required_argument, NULL, 'b' },
        { "dry-run", no_argument, NULL, 'n' },
        { "help", no_argument, NULL, 'h' },
        { NULL, 0, NULL, 0 },
    };
    struct outbuf plan = { 0 };
    struct qbm_image *img, *src = NULL;
    const char *src_file = NULL, *file, *target;
    bool dry_run = false;
    int c, i, ret;

    while ((c = getopt_long(argc, argv, "+b:F:nh", opts, NULL)) != -1) {
        switch (c) {
        case 'b':
            src_file = optarg;
            break;
        case 'F':
            if (strcmp(optarg, "qcow2") != 0) {
                return usage_error("merge", "only qcow2 sources have "
                                            "bitmaps");
            }
            break;
        case 'n':
            dry_run = true;
            break;
        case 'h':
            fputs(usage, stdout);
            return 0;
        default:
            return usage_error("merge", "invalid option");
        }
    }
    if (argc - optind < 3) {
        return usage_error("merge", "expected IMAGE, TARGET and SOURCE...");
    }
    file = argv[optind];
    target = argv[optind + 1];
    img = edit_open(file);
    if (!img) {
        return 1;
    }
    if (src_file && !same_file(src_file, file)) {
        src = qbm_open(src_file, 0);
        if (!src) {
            tool_lib_error(src_file);
            qbm_close(img);
            return 1;
        }
    }
    for (i = optind + 2; i < argc; i++) {
        if (qbm_bitmap_merge(img, target, src ? src : img, argv[i]) < 0) {
            tool_lib_error(src && qbm_get_errno() == ENOENT &&
                                   qbm_bitmap_find(img, target) >= 0
                               ? src_file
                               : file);
            ob_free(&plan);
            qbm_close(src);
            qbm_close(img);
            return 1;
        }
        ob_printf(&plan, "would merge bitmap '%s'%s%s into '%s' of %s\n",
                  argv[i], src ? " of " : "", src ? src_file : "", target,
                  file);
    }
    ret = edit_finish(img, file, dry_run, &plan);
    qbm_close(src);
    return ret;
}
