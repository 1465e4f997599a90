/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* qbm remove: delete bitmaps (in-use ones too, as QEMU allows). */
#include <getopt.h>
#include <stdio.h>

#include "qbm-tool.h"

static const char usage[] =
    "Usage: qbm remove [--dry-run] IMAGE NAME...\n"
    "Remove the named bitmaps from IMAGE in one crash-safe update and free\n"
    "their clusters. In-use (inconsistent) bitmaps may be removed.\n\n"
    "  -n, --dry-run  say what would change, change nothing\n"
    "  -h, --help     show this help\n";

int cmd_remove(int argc, char **argv)
{
    struct outbuf plan = { 0 };
    struct qbm_image *img;
    bool dry_run;
    int r, i;

    r = parse_simple_edit(argc, argv, "remove", usage, 2, -1, &dry_run);
    if (r >= 0) {
        return r;
    }
    img = edit_open(argv[optind]);
    if (!img) {
        return 1;
    }
    for (i = optind + 1; i < argc; i++) {
        if (qbm_bitmap_remove(img, argv[i]) < 0) {
            return edit_fail(img, argv[optind], &plan);
        }
        ob_printf(&plan, "would remove bitmap '%s' from %s\n", argv[i],
                  argv[optind]);
    }
    return edit_finish(img, argv[optind], dry_run, &plan);
}
