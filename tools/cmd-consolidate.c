/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* qbm consolidate: fold incrementals into the full backup in place. */
#include <stdio.h>

#include "qbm-tool.h"

static const char usage[] =
    "Usage: qbm consolidate [-p] FULL INCREMENTAL...\n"
    "Fold the incremental backups (oldest first) into FULL in place, so\n"
    "FULL becomes the disk as of the last one (a rolling full backup).\n"
    "Crash-safe: FULL switches from the old to the new contents in one\n"
    "write; a crash leaves it either untouched or complete.\n\n";

int cmd_consolidate(int argc, char **argv)
{
    struct tool_args a = {
        .cmd = "consolidate",
        .usage = usage,
        .common = TOOL_OPT_FORMAT | TOOL_OPT_PROGRESS,
        .min_args = 2,
        .max_args = -1,
        .args_hint = "FULL and INCREMENTAL...",
    };
    struct progress p;
    int r;

    r = tool_parse(&a, argc, argv);
    if (r >= 0) {
        return r;
    }
    p = progress_init(&a);
    r = qbm_consolidate(a.args[0], (const char *const *)a.args + 1,
                        (size_t)(a.nargs - 1), progress_fn(&p), &p);
    return progress_finish(&p, r);
}
