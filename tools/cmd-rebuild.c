/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* qbm rebuild: a bitmap rebuilt by comparing the disk with its backups. */
#include <getopt.h>
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
    "replaced, in use or not. One crash-safe transaction.\n\n"
    "  -g GRANULARITY  bytes per bit (512..2G, k/M/G suffixes); default:\n"
    "                  the replaced bitmap's, else as 'qbm add'\n"
    "  -p              show progress\n"
    "  -n, --dry-run   compare and report the dirty bytes; write nothing\n"
    "  -h, --help      show this help\n";

int cmd_rebuild(int argc, char **argv)
{
    static const struct option opts[] = {
        { "dry-run", no_argument, NULL, 'n' },
        { "help", no_argument, NULL, 'h' },
        { NULL, 0, NULL, 0 },
    };
    uint64_t gran = 0, dirty = 0;
    unsigned flags = 0, last = (unsigned)-1;
    bool progress = false;
    struct outbuf plan = { 0 };
    char size[32];
    int c;

    while ((c = getopt_long(argc, argv, "+g:pnh", opts, NULL)) != -1) {
        switch (c) {
        case 'g':
            if (!parse_size(optarg, &gran) || gran == 0) {
                return usage_error("rebuild", "invalid granularity '%s'",
                                   optarg);
            }
            break;
        case 'p':
            progress = true;
            break;
        case 'n':
            flags |= QBM_REBUILD_DRY_RUN;
            break;
        case 'h':
            fputs(usage, stdout);
            return 0;
        default:
            return usage_error("rebuild", "invalid option");
        }
    }
    if (argc - optind < 3) {
        return usage_error("rebuild", "expected IMAGE, NAME and FULL");
    }
    if (qbm_rebuild(argv[optind], argv[optind + 1], gran,
                    (const char *const *)argv + optind + 2,
                    (size_t)(argc - optind - 2), flags,
                    progress ? show_progress : NULL, &last, &dirty) < 0) {
        if (progress) {
            fputc('\n', stderr);
        }
        /* The library names the file each message is about. */
        tool_lib_error(NULL);
        return 1;
    }
    if (progress) {
        end_progress(&last);
    }
    if (!(flags & QBM_REBUILD_DRY_RUN)) {
        return 0;
    }
    format_size(size, sizeof(size), dirty);
    ob_printf(&plan,
              "would rebuild bitmap '%s' in %s: %" PRIu64 " dirty bytes "
              "(%s)\n(dry run: nothing was written)\n",
              argv[optind + 1], argv[optind], dirty, size);
    if (plan.failed) {
        ob_free(&plan);
        tool_error(argv[optind], "out of memory building the output");
        return 1;
    }
    return ob_flush(&plan);
}
