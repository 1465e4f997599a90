/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* qbm enable: set whether a bitmap records writes (the auto flag). */
#include <stdio.h>

#include "qbm-tool.h"

static const char usage[] =
    "Usage: qbm enable [--dry-run] IMAGE NAME\n"
    "Make bitmap NAME record writes again (flag auto).\n\n";

int cmd_enable(int argc, char **argv)
{
    struct tool_args a = {
        .cmd = "enable",
        .usage = usage,
        .common = TOOL_OPT_EDIT,
        .min_args = 2,
        .max_args = 2,
        .args_hint = "IMAGE and NAME",
    };

    return edit_names(&a, argc, argv, qbm_bitmap_enable, "enable", "of");
}
