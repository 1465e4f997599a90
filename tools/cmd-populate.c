/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* qbm populate: OR a layer's own allocation into a bitmap. */
#include <stdio.h>

#include "qbm-tool.h"

static const char usage[] =
    "Usage: qbm populate [--from LAYER_IMAGE] [--dry-run] IMAGE NAME\n"
    "OR into bitmap NAME of IMAGE every cluster LAYER_IMAGE (default: IMAGE)\n"
    "itself holds: data or zero flags in its own L1/L2 tables, not what it\n"
    "inherits from its backing file. Bits round outwards to the bitmap's\n"
    "granularity.\n\n"
    "      --from=FILE       take the allocation of FILE's own layer\n";

int cmd_populate(int argc, char **argv)
{
    static const struct option opts[] = {
        { "from", required_argument, NULL, 'F' },
        { NULL, 0, NULL, 0 },
    };
    struct tool_args a = {
        .cmd = "populate",
        .usage = usage,
        .opts = opts,
        .common = TOOL_OPT_EDIT,
        .min_args = 2,
        .max_args = 2,
        .args_hint = "IMAGE and NAME",
    };
    struct outbuf plan = { 0 };
    struct qbm_image *img, *layer = NULL;
    const char *from = NULL, *file, *name;
    int c, ret;

    while ((c = tool_getopt(&a, argc, argv)) > 0) {
        switch (c) {
        case 'F':
            from = optarg;
            break;
        }
    }
    if (c < 0) {
        return a.status;
    }
    file = a.args[0];
    name = a.args[1];
    img = edit_open(file);
    if (!img) {
        return 1;
    }
    if (from && !same_file(from, file)) {
        layer = tool_open(from, 0);
        if (!layer) {
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
    ret = edit_finish(img, file, a.dry_run, &plan);
    qbm_close(layer);
    return ret;
}
