/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* qbm restore: rebuild a disk from a full backup plus incrementals. */
#include <getopt.h>
#include <libgen.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>

#include "qbm-tool.h"

static const char usage[] =
    "Usage: qbm restore [-O raw|qcow2] -o OUTPUT [-p] [--checkpoint NAME]\n"
    "                   FULL [INCREMENTAL...]\n"
    "       qbm restore --link [--force] FULL INCREMENTAL...\n"
    "Write to OUTPUT the disk as of the last INCREMENTAL given: every\n"
    "cluster from the newest image that holds it (data, compressed data or\n"
    "zero flags). FULL may be qcow2 or raw; incrementals are qcow2 files\n"
    "holding only changed clusters (backing pointers are not followed).\n"
    "Everything is checked before anything is written; a file OUTPUT\n"
    "appears only once complete and flushed (a block device is written\n"
    "in place).\n\n"
    "  -O FORMAT          raw (default, sparse) or qcow2\n"
    "  -o OUTPUT          the file to write (replaced if it exists; a\n"
    "                     symbolic link is followed), or a block device\n"
    "                     to write in place (at least as large as the\n"
    "                     output; only the output's bytes are written)\n"
    "      --checkpoint=NAME  give the qcow2 output an empty enabled bitmap\n"
    "                     NAME so incremental backups can resume\n"
    "  -p                 show progress\n"
    "      --link         instead, make each INCREMENTAL's backing file the\n"
    "                     image before it (metadata only), so QEMU opens\n"
    "                     the last one as the restored disk\n"
    "      --force        with --link: replace existing backing files\n"
    "  -h, --help         show this help\n";

/* The name to record in `img_path` for `target`: relative when both are
 * in the same directory, else absolute. */
static char *backing_name(const char *img_path, const char *target)
{
    char a[PATH_MAX], b[PATH_MAX], *da, *db;
    char *res = NULL;

    if (!realpath(img_path, a) || !realpath(target, b)) {
        return NULL;
    }
    da = strdup(a);
    db = strdup(b);
    if (da && db && strcmp(dirname(da), dirname(db)) == 0) {
        res = strdup(strrchr(b, '/') + 1);
    } else {
        res = strdup(b);
    }
    free(da);
    free(db);
    return res;
}

static int link_chain(char **files, int n, bool force)
{
    int i;

    for (i = 1; i < n; i++) {
        struct qbm_image *prev = qbm_open(files[i - 1], QBM_OPEN_ANY_FORMAT);
        struct qbm_image *img;
        const char *cur;
        char *name, *existing;
        int r = 0;

        if (!prev) {
            tool_lib_error(files[i - 1]);
            return 1;
        }
        img = edit_open(files[i]);
        if (!img) {
            qbm_close(prev);
            return 1;
        }
        if (qbm_image_virtual_size(img) != qbm_image_virtual_size(prev)) {
            tool_error(files[i], "virtual size differs from %s", files[i - 1]);
            r = 1;
        }
        cur = qbm_image_backing_file(img);
        existing = cur ? qbm_image_backing_path(img) : NULL;
        if (r == 0 && cur && existing && same_file(existing, files[i - 1])) {
            /* already linked */
        } else if (r == 0 && cur && !force) {
            tool_error(files[i],
                       "already has backing file %s (use --force "
                       "to replace it)",
                       cur);
            r = 1;
        } else if (r == 0) {
            name = backing_name(files[i], files[i - 1]);
            if (!name ||
                qbm_image_set_backing(img, name, qbm_image_format(prev)) < 0) {
                tool_error(files[i], "%s",
                           name ? qbm_get_error() : "cannot resolve names");
                r = 1;
            }
            free(name);
        }
        free(existing);
        qbm_close(img);
        qbm_close(prev);
        if (r) {
            return r;
        }
    }
    return 0;
}

int cmd_restore(int argc, char **argv)
{
    static const struct option opts[] = {
        { "checkpoint", required_argument, NULL, 'k' },
        { "link", no_argument, NULL, 'l' },
        { "force", no_argument, NULL, 'f' },
        { "help", no_argument, NULL, 'h' },
        { NULL, 0, NULL, 0 },
    };
    int format = QBM_OUTPUT_RAW;
    const char *output = NULL, *checkpoint = NULL;
    unsigned last = (unsigned)-1;
    bool progress = false, link = false, force = false;
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
        case 'l':
            link = true;
            break;
        case 'f':
            force = true;
            break;
        case 'h':
            fputs(usage, stdout);
            return 0;
        default:
            return usage_error("restore", "invalid option");
        }
    }
    if (link) {
        if (output || argc - optind < 2) {
            return usage_error("restore", "--link takes FULL and "
                                          "INCREMENTAL..., and no -o");
        }
        return link_chain(argv + optind, argc - optind, force);
    }
    if (!output || argc - optind < 1) {
        return usage_error("restore", "expected -o OUTPUT and FULL");
    }
    if (checkpoint && format != QBM_OUTPUT_QCOW2) {
        return usage_error("restore", "--checkpoint needs -O qcow2");
    }
    if (qbm_restore((const char *const *)argv + optind, (size_t)(argc - optind),
                    output, format, checkpoint, progress ? show_progress : NULL,
                    &last) < 0) {
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
