/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* qbm restore: rebuild a disk from a full backup plus incrementals. */
#include <getopt.h>
#include <stdio.h>

#include "qbm-tool.h"

static const char usage[] =
    "Usage: qbm restore [-O raw|qcow2] -o OUTPUT [-p] [--checkpoint NAME]\n"
    "                   FULL [INCREMENTAL...]\n"
    "Write to OUTPUT the disk as of the last INCREMENTAL given: every\n"
    "cluster from the newest image that holds it (data, compressed data or\n"
    "zero flags). FULL may be qcow2 or raw; incrementals are qcow2 files\n"
    "holding only changed clusters (backing pointers are not followed).\n"
    "Everything is checked before anything is written; OUTPUT appears only\n"
    "once complete and flushed.\n\n"
    "  -O FORMAT          raw (default, sparse) or qcow2\n"
    "  -o OUTPUT          the file to write (replaced if it exists)\n"
    "      --checkpoint=NAME  give the qcow2 output an empty enabled bitmap\n"
    "                     NAME so incremental backups can resume\n"
    "  -p                 show progress\n"
    "  -h, --help         show this help\n";

int cmd_restore(int argc, char **argv)
{
    static const struct option opts[] = {
        { "checkpoint", required_argument, NULL, 'k' },
        { "help", no_argument, NULL, 'h' },
        { NULL, 0, NULL, 0 },
    };
    int format = QBM_OUTPUT_RAW;
    const char *output = NULL, *checkpoint = NULL;
    unsigned last = (unsigned)-1;
    bool progress = false;
    int c;

    while ((c = getopt_long(argc, argv, "+O:o:ph", opts, NULL)) != -1) {
        switch (c) {
        case 'O':
            if (strcmp(optarg, "raw") == 0) {
                format = QBM_OUTPUT_RAW;
            } else if (strcmp(optarg, "qcow2") == 0) {
                format = QBM_OUTPUT_QCOW2;
            } else {
                return usage_error("restore", "-O must be raw or qcow2");
            }
            break;
        case 'o':
            output = optarg;
            break;
        case 'k':
            checkpoint = optarg;
            break;
        case 'p':
            progress = true;
            break;
        case 'h':
            fputs(usage, stdout);
            return 0;
        default:
            return usage_error("restore", "invalid option");
        }
    }
    if (!output || argc - optind < 1) {
        return usage_error("restore", "expected -o OUTPUT and FULL");
    }
    if (checkpoint && format != QBM_OUTPUT_QCOW2) {
        return usage_error("restore", "--checkpoint needs -O qcow2");
    }
    if (qbm_restore((const char *const *)argv + optind,
                    (size_t)(argc - optind), output, format, checkpoint,
                    progress ? show_progress : NULL, &last) < 0) {
        if (progress) {
            fputc('\n', stderr);
        }
        tool_lib_error(output);
        return 1;
    }
    if (progress) {
        end_progress(&last);
    }
    return 0;
}
