/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* qbm rename: give a bitmap a new name. */
#include <getopt.h>
#include <stdio.h>

#include "qbm-tool.h"

static const char usage[] =
    "Usage: qbm rename [--dry-run] IMAGE OLD NEW\n"
    "Rename bitmap OLD to NEW (1 to 1023 bytes, unique in IMAGE).\n\n"
    "  -n, --dry-run  say what would change, change nothing\n"
    "  -h, --help     show this help\n";

int cmd_rename(int argc, char **argv)
{
    struct outbuf plan = { 0 };
    struct qbm_image *img;
    bool dry_run;
    int r;

    r = parse_simple_edit(argc, argv, "rename", usage, 3, 3, &dry_run);
    if (r >= 0) {
        return r;
    }
    img = edit_open(argv[optind]);
    if (!img) {
        return 1;
    }
    if (qbm_bitmap_rename(img, argv[optind + 1], argv[optind + 2]) < 0) {
        return edit_fail(img, argv[optind], &plan);
    }
    ob_printf(&plan, "would rename bitmap '%s' of %s to '%s'\n",
              argv[optind + 1], argv[optind], argv[optind + 2]);
    return edit_finish(img, argv[optind], dry_run, &plan);
}
