/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* qbm populate: OR a layer's own allocation into a bitmap. */
#include <getopt.h>
#include <stdio.h>

#include "qbm-tool.h"

static const char usage[] =
    "Usage: qbm populate [--from LAYER_IMAGE] [--dry-run] IMAGE NAME\n"
    "OR into bitmap NAME of IMAGE every cluster LAYER_IMAGE (default: IMAGE)\n"
    "itself holds: data or zero flags in its own L1/L2 tables, not what it\n"
    "inherits from its backing file. Bits round outwards to the bitmap's\n"
    "granularity.\n\n"
    "      --from=FILE  take the allocation of FILE's own layer\n"
    "  -n, --dry-run    say what would change, change nothing\n"
    "  -h, --help       show this help\n";

int cmd_populate(int argc, char **argv)
{
    static const struct option opts[] = {
        { "from", required_argument, NULL, 'f' },
        { "dry-run", no_argument, NULL, 'n' },
        { "help", no_argument, NULL, 'h' },
        { NULL, 0, NULL, 0 },
    };
    struct outbuf plan = { 0 };
    struct qbm_image *img, *layer = NULL;
    const char *from = NULL, *file, *name;
    bool dry_run = false;
    int c, ret;

    while ((c = getopt_long(argc, argv, "+nh", opts, NULL)) != -1) {
        switch (c) {
        case 'f':
            from = optarg;
            break;
        case 'n':
            dry_run = true;
            break;
        case 'h':
            fputs(usage, stdout);
            return 0;
        default:
            return usage_error("populate", "invalid option");
        }
    }
    if (argc - optind != 2) {
        return usage_error("populate", "expected IMAGE and NAME");
    }
    file = argv[optind];
    name = argv[optind + 1];
    img = edit_open(file);
    if (!img) {
        return 1;
    }
    if (from && !same_file(from, file)) {
        layer = qbm_open(from, 0);
        if (!layer) {
            tool_lib_error(from);
            qbm_close(img);
            return 1;
        }
    }
    if (qbm_bitmap_populate(img, name, layer ? layer : img) < 0) {
        qbm_close(layer);
        return edit_fail(img, file, &plan);
    }
    ob_printf(&plan,
              "would mark in bitmap '%s' of %s the clusters "
              "allocated in %s\n",
              name, file, layer ? from : file);
    ret = edit_finish(img, file, dry_run, &plan);
    qbm_close(layer);
    return ret;
}
