/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* qbm restore: rebuild a disk from a full backup plus incrementals. */
#include <libgen.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>

#include "qbm-tool.h"

static const char usage[] =
    "Usage: qbm restore [-O raw|qcow2] -o OUTPUT [-p] [-U] [--checkpoint "
    "NAME]\n"
    "                   FULL [INCREMENTAL...]\n"
    "       qbm restore --link [--force] FULL INCREMENTAL...\n"
    "Write to OUTPUT the disk as of the last INCREMENTAL given: every\n"
    "cluster from the newest image that holds it (data, compressed data or\n"
    "zero flags). FULL may be qcow2 or raw (with -f qcow2: only qcow2);\n"
    "incrementals are qcow2 files holding only changed clusters (backing\n"
    "pointers are not followed).\n"
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
    "      --link         instead, make each INCREMENTAL's backing file the\n"
    "                     image before it (metadata only), so QEMU opens\n"
    "                     the last one as the restored disk\n"
    "      --force        with --link: replace existing backing files\n";

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

/* -f qcow2: FULL, which may otherwise be raw, must be qcow2 as well. */
static bool full_is_qcow2(const char *full, unsigned open_flags)
{
    struct qbm_image *img = tool_open(full, QBM_OPEN_ANY_FORMAT | open_flags);
    bool ok = img && strcmp(qbm_image_format(img), "qcow2") == 0;

    if (img && !ok) {
        tool_error(full, "not a qcow2 image (-f qcow2 was given)");
    }
    qbm_close(img);
    return ok;
}

int cmd_restore(int argc, char **argv)
{
    static const struct option opts[] = {
        { "checkpoint", required_argument, NULL, 'k' },
        { "link", no_argument, NULL, 'l' },
        { "force", no_argument, NULL, 'F' },
        { NULL, 0, NULL, 0 },
    };
    struct tool_args a = {
        .cmd = "restore",
        .usage = usage,
        .shortopts = "O:o:",
        .opts = opts,
        .common = TOOL_OPT_FORMAT | TOOL_OPT_PROGRESS | TOOL_OPT_SHARE,
        .min_args = 1,
        .max_args = -1,
        .args_hint = "-o OUTPUT and FULL",
    };
    int format = QBM_OUTPUT_RAW;
    const char *output = NULL, *checkpoint = NULL;
    bool link = false, force = false;
    struct progress p;
    int c;

    while ((c = tool_getopt(&a, argc, argv)) > 0) {
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
        case 'l':
            link = true;
            break;
        case 'F':
            force = true;
            break;
        }
    }
    if (c < 0) {
        return a.status;
    }
    if (a.format_given && !full_is_qcow2(a.args[0], a.open_flags)) {
        return 1;
    }
    if (link) {
        if (output || a.nargs < 2) {
            return usage_error("restore", "--link takes FULL and "
                                          "INCREMENTAL..., and no -o");
        }
        if (a.open_flags & QBM_OPEN_FORCE_SHARE) {
            /* --link edits the incrementals, which needs their locks. */
            return usage_error("restore", "--link cannot be used with -U");
        }
        return link_chain(a.args, a.nargs, force);
    }
    if (a.open_flags & QBM_OPEN_FORCE_SHARE) {
        format |= QBM_RESTORE_FORCE_SHARE;
    }
    if (!output) {
        return usage_error("restore", "expected -o OUTPUT and FULL");
    }
    if (checkpoint && (format & ~QBM_RESTORE_FORCE_SHARE) != QBM_OUTPUT_QCOW2) {
        return usage_error("restore", "--checkpoint needs -O qcow2");
    }
    p = progress_init(&a);
    return progress_finish(&p, qbm_restore((const char *const *)a.args,
                                           (size_t)a.nargs, output, format,
                                           checkpoint, progress_fn(&p), &p));
}
