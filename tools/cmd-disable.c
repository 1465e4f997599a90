/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* qbm disable: set whether a bitmap records writes (the auto flag). */
#include <stdio.h>

#include "qbm-tool.h"

static const char usage[] =
    "Usage: qbm disable [--dry-run] IMAGE NAME\n"
    "Stop bitmap NAME recording writes (clear flag auto); its bits are "
    "kept.\n\n";

int cmd_disable(int argc, char **argv)
{
    struct tool_args a = {
        .cmd = "disable",
        .usage = usage,
        .common = TOOL_OPT_EDIT,
        .min_args = 2,
        .max_args = 2,
        .args_hint = "IMAGE and NAME",
    };

    return edit_names(&a, argc, argv, qbm_bitmap_disable, "disable", "of");
}
