/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* qbm: the command table. Each subcommand lives in cmd-<name>.c. */
#include <stdio.h>
#include <string.h>

#include "qbm-tool.h"

struct command {
    const char *name;
    int (*fn)(int argc, char **argv);
    const char *summary;
};

static const struct command commands[] = {
    { "info", cmd_info, "show an image's header and bitmaps" },
    { "dump", cmd_dump, "list the dirty extents of a bitmap" },
    { "add", cmd_add, "add an empty bitmap" },
    { "remove", cmd_remove, "remove bitmaps" },
    { "clear", cmd_clear, "mark every bit of a bitmap clean" },
    { "enable", cmd_enable, "make a bitmap record writes" },
    { "disable", cmd_disable, "stop a bitmap recording writes" },
    { "rename", cmd_rename, "rename a bitmap" },
    { "merge", cmd_merge, "OR bitmaps into another one" },
    { "copy", cmd_copy, "copy bitmaps between images" },
    { "populate", cmd_populate, "mark a layer's allocated clusters" },
    { "commit-bitmaps", cmd_commit_bitmaps,
      "carry bitmaps into the base of a commit" },
    { "snapshot-bitmaps", cmd_snapshot_bitmaps,
      "continue checkpoints in a new snapshot layer" },
    { "check", cmd_check, "check bitmaps, refcounts and chain; repair" },
    { "restore", cmd_restore, "rebuild a disk from full + incrementals" },
    { "extract", cmd_extract, "write an offline incremental backup" },
    { "consolidate", cmd_consolidate,
      "fold incrementals into the full backup" },
};

static void print_help(FILE *f)
{
    size_t i;

    fprintf(f, "Usage: qbm COMMAND [OPTIONS] ARGS...\n"
               "Inspect and edit the persistent dirty bitmaps of qcow2 "
               "images offline.\n\nCommands:\n");
    for (i = 0; i < sizeof(commands) / sizeof(commands[0]); i++) {
        fprintf(f, "  %-17s %s\n", commands[i].name, commands[i].summary);
    }
    fprintf(f, "\nRun 'qbm COMMAND --help' for a command's options; see "
               "qbm(1).\n");
}

int main(int argc, char **argv)
{
    size_t i;

    if (argc < 2) {
        print_help(stderr);
        return EXIT_USAGE;
    }
    if (strcmp(argv[1], "--help") == 0 || strcmp(argv[1], "-h") == 0 ||
        strcmp(argv[1], "help") == 0) {
        print_help(stdout);
        return 0;
    }
    if (strcmp(argv[1], "--version") == 0 || strcmp(argv[1], "-V") == 0) {
        printf("qbm %s\n", qbm_version());
        return 0;
    }
    for (i = 0; i < sizeof(commands) / sizeof(commands[0]); i++) {
        if (strcmp(argv[1], commands[i].name) == 0) {
            return commands[i].fn(argc - 1, argv + 1);
        }
    }
    return usage_error(NULL, "unknown command '%s'", argv[1]);
}
