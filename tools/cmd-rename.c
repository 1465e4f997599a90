/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* qbm rename: give a bitmap a new name. */
#include <stdio.h>

#include "qbm-tool.h"

static const char usage[] =
    "Usage: qbm rename [--dry-run] IMAGE OLD NEW\n"
    "Rename bitmap OLD to NEW (1 to 1023 bytes, unique in IMAGE).\n\n";

int cmd_rename(int argc, char **argv)
{
    struct tool_args a = {
        .cmd = "rename",
        .usage = usage,
        .common = TOOL_OPT_EDIT,
        .min_args = 3,
        .max_args = 3,
        .args_hint = "IMAGE, OLD and NEW",
    };
    struct outbuf plan = { 0 };
    struct qbm_image *img;
    int r;

    r = tool_parse(&a, argc, argv);
    if (r >= 0) {
        return r;
    }
    img = edit_open(a.args[0]);
    if (!img) {
        return 1;
    }
    if (qbm_bitmap_rename(img, a.args[1], a.args[2]) < 0) {
        return edit_fail(img, a.args[0], &plan);
    }
    ob_printf(&plan, "would rename bitmap '%s' of %s to '%s'\n", a.args[1],
              a.args[0], a.args[2]);
    return edit_finish(img, a.args[0], a.dry_run, &plan);
}
