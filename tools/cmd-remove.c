/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* qbm remove: delete bitmaps (in-use ones too, as QEMU allows). */
#include <stdio.h>

#include "qbm-tool.h"

static const char usage[] =
    "Usage: qbm remove [--dry-run] IMAGE NAME...\n"
    "Remove the named bitmaps from IMAGE in one crash-safe update and free\n"
    "their clusters. In-use (inconsistent) bitmaps may be removed.\n\n";

int cmd_remove(int argc, char **argv)
{
    struct tool_args a = {
        .cmd = "remove",
        .usage = usage,
        .common = TOOL_OPT_EDIT,
        .min_args = 2,
        .max_args = -1,
        .args_hint = "IMAGE and NAME...",
    };

    return edit_names(&a, argc, argv, qbm_bitmap_remove, "remove", "from");
}
