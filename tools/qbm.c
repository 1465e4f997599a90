/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* qbm: the command table. Each subcommand lives in cmd-<name>.c. */
#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "qbm-tool.h"

struct command {
    const char *name;
    int (*fn)(int argc, char **argv);
    const char *summary;
};

/*
 * qbm checkpoints reads libvirt's XML with libxml2, which would bring ICU's
 * 30 MB of data into this statically linked command: it lives in its own,
 * dynamically linked program, qbm-checkpoints, found beside this one (the
 * build tree, or an installation that puts both in one place) or in the
 * helper directory.
 */
static int cmd_checkpoints_exec(int argc, char **argv)
{
    char self[PATH_MAX], path[PATH_MAX + 32];
    ssize_t n = readlink("/proc/self/exe", self, sizeof(self) - 1);
    char *slash;

    if (n > 0) {
        self[n] = '\0';
        slash = strrchr(self, '/');
        if (slash) {
            snprintf(path, sizeof(path), "%.*s/qbm-checkpoints",
                     (int)(slash - self), self);
            if (access(path, X_OK) == 0) {
                execv(path, argv);
            }
        }
    }
    execv(QBM_HELPER_DIR "/qbm-checkpoints", argv);
    tool_error(NULL, "checkpoints: cannot run %s: %s",
               QBM_HELPER_DIR "/qbm-checkpoints", strerror(errno));
    return 1;
}

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
    { "rebuild", cmd_rebuild, "rebuild a bitmap by comparing with backups" },
    { "verify", cmd_verify, "compare a disk with its backups" },
    { "checkpoints", cmd_checkpoints_exec,
      "check a libvirt domain's checkpoints" },
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
    fprintf(f, "\nRun 'qbm help COMMAND' (or 'qbm COMMAND --help') for a "
               "command's options;\nsee qbm(1).\n");
}

static const struct command *find_command(const char *name)
{
    size_t i;

    for (i = 0; i < sizeof(commands) / sizeof(commands[0]); i++) {
        if (strcmp(name, commands[i].name) == 0) {
            return &commands[i];
        }
    }
    return NULL;
}

/* qbm help [COMMAND]: as qbm COMMAND --help. */
static int help(int argc, char **argv)
{
    const struct command *cmd;
    char *args[3];

    if (argc < 3) {
        print_help(stdout);
        return 0;
    }
    if (argc > 3) {
        return usage_error("help", "expected at most one COMMAND");
    }
    cmd = find_command(argv[2]);
    if (!cmd) {
        return usage_error(NULL, "unknown command '%s'", argv[2]);
    }
    args[0] = argv[2];
    args[1] = (char *)"--help";
    args[2] = NULL;
    return cmd->fn(2, args);
}

/*
 * qbm __complete-bitmaps IMAGE: the names of IMAGE's bitmaps, one a line,
 * for the shell completion (read without locks; names holding a newline
 * left out). Not listed: not a command for people. Exit 1, silently, when
 * IMAGE cannot be read.
 */
static int complete_bitmaps(int argc, char **argv)
{
    struct qbm_image *img;
    size_t i;

    if (argc != 3) {
        return EXIT_USAGE;
    }
    img = qbm_open(argv[2], QBM_OPEN_FORCE_SHARE);
    if (!img) {
        return 1;
    }
    for (i = 0; i < qbm_bitmap_count(img); i++) {
        const char *name = qbm_bitmap_name(img, i);

        if (!strchr(name, '\n')) {
            printf("%s\n", name);
        }
    }
    qbm_close(img);
    return fflush(stdout) == 0 ? 0 : 1;
}

int main(int argc, char **argv)
{
    const struct command *cmd;

    if (argc < 2) {
        print_help(stderr);
        return EXIT_USAGE;
    }
    if (strcmp(argv[1], "--help") == 0 || strcmp(argv[1], "-h") == 0 ||
        strcmp(argv[1], "help") == 0) {
        return help(argc, argv);
    }
    if (strcmp(argv[1], "__complete-bitmaps") == 0) {
        return complete_bitmaps(argc, argv);
    }
    if (strcmp(argv[1], "--version") == 0 || strcmp(argv[1], "-V") == 0) {
        printf("qbm %s\n", qbm_version());
        return 0;
    }
    cmd = find_command(argv[1]);
    if (!cmd) {
        return usage_error(NULL, "unknown command '%s'", argv[1]);
    }
    return cmd->fn(argc - 1, argv + 1);
}
