/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* qbm clear: mark every bit of a bitmap clean. */
#include <stdio.h>

#include "qbm-tool.h"

static const char usage[] =
    "Usage: qbm clear [--dry-run] IMAGE NAME\n"
    "Mark every bit of bitmap NAME clean (nothing changed since now).\n\n";

int cmd_clear(int argc, char **argv)
{
    struct tool_args a = {
        .cmd = "clear",
        .usage = usage,
        .common = TOOL_OPT_EDIT,
        .min_args = 2,
        .max_args = 2,
        .args_hint = "IMAGE and NAME",
    };

    return edit_names(&a, argc, argv, qbm_bitmap_clear, "clear", "of");
}
