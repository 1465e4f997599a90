/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* qbm consolidate: fold incrementals into the full backup in place. */
#include <getopt.h>
#include <stdio.h>

#include "qbm-tool.h"

static const char usage[] =
    "Usage: qbm consolidate [-p] FULL INCREMENTAL...\n"
    "Fold the incremental backups (oldest first) into FULL in place, so\n"
    "FULL becomes the disk as of the last one (a rolling full backup).\n"
    "Crash-safe: FULL switches from the old to the new contents in one\n"
    "write; a crash leaves it either untouched or complete.\n\n"
    "  -p          show progress\n"
    "  -h, --help  show this help\n";

int cmd_consolidate(int argc, char **argv)
{
    static const struct option opts[] = {
        { "help", no_argument, NULL, 'h' },
        { NULL, 0, NULL, 0 },
    };
    unsigned last = (unsigned)-1;
    bool progress = false;
    int c;

    while ((c = getopt_long(argc, argv, "+ph", opts, NULL)) != -1) {
        switch (c) {
        case 'p':
            progress = true;
            break;
        case 'h':
            fputs(usage, stdout);
            return 0;
        default:
            return usage_error("consolidate", "invalid option");
        }
    }
    if (argc - optind < 2) {
        return usage_error("consolidate", "expected FULL and INCREMENTAL...");
    }
    if (qbm_consolidate(argv[optind], (const char *const *)argv + optind + 1,
                        (size_t)(argc - optind - 1),
                        progress ? show_progress : NULL, &last) < 0) {
        if (progress) {
            fputc('\n', stderr);
        }
        tool_lib_error(NULL);
        return 1;
    }
    if (progress) {
        end_progress(&last);
    }
    return 0;
}
