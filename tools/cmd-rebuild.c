/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* qbm rebuild: a bitmap rebuilt by comparing the disk with its backups. */
#include <inttypes.h>
#include <stdio.h>

#include "qbm-tool.h"

static const char usage[] =
    "Usage: qbm rebuild [-g GRANULARITY] [-p] [--dry-run] IMAGE NAME FULL\n"
    "                   [INCREMENTAL...]\n"
    "Make NAME an enabled, consistent bitmap of IMAGE marking exactly the\n"
    "granules whose content (read through IMAGE's backing chain) differs\n"
    "from what FULL plus the INCREMENTALs restore to (as 'qbm restore'):\n"
    "what the next incremental backup needs, after a crash left the\n"
    "bitmap in use or it was lost. A bitmap NAME already there is\n"
    "replaced, in use or not. One crash-safe transaction. -f qcow2 names\n"
    "IMAGE's format (the only one rebuild edits).\n\n"
    "  -g GRANULARITY        bytes per bit (512..2G, k/M/G suffixes);\n"
    "                        default: the replaced bitmap's, else as\n"
    "                        'qbm add'\n";

int cmd_rebuild(int argc, char **argv)
{
    struct tool_args a = {
        .cmd = "rebuild",
        .usage = usage,
        .shortopts = "g:",
        .common = TOOL_OPT_EDIT | TOOL_OPT_PROGRESS,
        .min_args = 3,
        .max_args = -1,
        .args_hint = "IMAGE, NAME and FULL",
    };
    uint64_t gran = 0, dirty = 0;
    struct outbuf plan = { 0 };
    struct progress p;
    char size[32];
    int c, r;

    while ((c = tool_getopt(&a, argc, argv)) > 0) {
        switch (c) {
        case 'g':
            if (!parse_size(optarg, &gran) || gran == 0) {
                return usage_error("rebuild", "invalid granularity '%s'",
                                   optarg);
            }
            break;
        }
    }
    if (c < 0) {
        return a.status;
    }
    p = progress_init(&a);
    r = qbm_rebuild(a.args[0], a.args[1], gran, (const char *const *)a.args + 2,
                    (size_t)(a.nargs - 2), a.dry_run ? QBM_REBUILD_DRY_RUN : 0,
                    progress_fn(&p), &p, &dirty);
    /* The library names the file each message is about. */
    if (progress_finish(&p, r) != 0) {
        return 1;
    }
    if (!a.dry_run) {
        return 0;
    }
    format_size(size, sizeof(size), dirty);
    ob_printf(&plan,
              "would rebuild bitmap '%s' in %s: %" PRIu64 " dirty bytes "
              "(%s)\n(dry run: nothing was written)\n",
              a.args[1], a.args[0], dirty, size);
    if (plan.failed) {
        ob_free(&plan);
        tool_error(a.args[0], "out of memory building the output");
        return 1;
    }
    return ob_flush(&plan);
}
