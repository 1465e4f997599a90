/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* qbm add: create an empty bitmap. */
#include <inttypes.h>
#include <stdio.h>

#include "qbm-tool.h"

static const char usage[] =
    "Usage: qbm add [-g GRANULARITY] [--disabled] [--dry-run] IMAGE NAME\n"
    "Add an empty bitmap NAME to IMAGE. It records writes (flag auto)\n"
    "unless --disabled.\n\n"
    "  -g, --granularity=SIZE  bytes per bit, a power of two from 512 to 2G\n"
    "                          (suffixes k, M, G); default as qemu-img: the\n"
    "                          cluster size clamped to 4k..64k\n"
    "      --disabled          create it disabled\n";

int cmd_add(int argc, char **argv)
{
    static const struct option opts[] = {
        { "granularity", required_argument, NULL, 'g' },
        { "disabled", no_argument, NULL, 'd' },
        { "disable", no_argument, NULL, 'd' },
        { NULL, 0, NULL, 0 },
    };
    struct tool_args a = {
        .cmd = "add",
        .usage = usage,
        .shortopts = "g:",
        .opts = opts,
        .common = TOOL_OPT_EDIT,
        .min_args = 2,
        .max_args = 2,
        .args_hint = "IMAGE and NAME",
    };
    struct outbuf plan = { 0 };
    struct qbm_image *img;
    uint64_t gran = 0;
    unsigned flags = 0;
    const char *file, *name;
    int c, idx;

    while ((c = tool_getopt(&a, argc, argv)) > 0) {
        switch (c) {
        case 'g':
            if (!parse_size(optarg, &gran) || gran == 0) {
                return usage_error("add", "invalid granularity '%s'", optarg);
            }
            break;
        case 'd':
            flags |= QBM_ADD_DISABLED;
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
    if (qbm_bitmap_add(img, name, gran, flags) < 0) {
        return edit_fail(img, file, &plan);
    }
    idx = qbm_bitmap_find(img, name);
    ob_printf(&plan,
              "would add bitmap '%s' to %s: granularity %" PRIu64 ", %s\n",
              name, file, qbm_bitmap_granularity(img, (size_t)idx),
              (flags & QBM_ADD_DISABLED) ? "disabled" : "enabled");
    /* What to make room for before QEMU fills it (an LV to extend). */
    if (a.dry_run && edit_plan_space(img, QBM_PLAN_WORST_CASE, &plan) < 0) {
        return edit_fail(img, file, &plan);
    }
    return edit_finish(img, file, a.dry_run, &plan);
}
