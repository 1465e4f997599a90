/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* qbm disable: set whether a bitmap records writes (the auto flag). */
#include <getopt.h>
#include <stdio.h>

#include "qbm-tool.h"

static const char usage[] =
    "Usage: qbm disable [--dry-run] IMAGE NAME\n"
    "Stop bitmap NAME recording writes (clear flag auto); its bits are "
    "kept.\n\n"
    "  -n, --dry-run  say what would change, change nothing\n"
    "  -h, --help     show this help\n";

int cmd_disable(int argc, char **argv)
{
    struct outbuf plan = { 0 };
    struct qbm_image *img;
    bool dry_run;
    int r;

    r = parse_simple_edit(argc, argv, "disable", usage, 2, 2, &dry_run);
    if (r >= 0) {
        return r;
    }
    img = edit_open(argv[optind]);
    if (!img) {
        return 1;
    }
    if (qbm_bitmap_disable(img, argv[optind + 1]) < 0) {
        return edit_fail(img, argv[optind], &plan);
    }
    ob_printf(&plan, "would disable bitmap '%s' of %s\n", argv[optind + 1],
              argv[optind]);
    return edit_finish(img, argv[optind], dry_run, &plan);
}
