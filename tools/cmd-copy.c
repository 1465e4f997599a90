/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * qbm copy: copy bitmaps, with their granularity and flags, between images.
 * The policy is the library's (qbm_bitmap_copy); this prints what it did.
 */
#include <inttypes.h>
#include <stdio.h>

#include "qbm-tool.h"

static const char usage[] =
    "Usage: qbm copy [--merge|--replace] [--dry-run] SOURCE_IMAGE "
    "TARGET_IMAGE [NAME...]\n"
    "Copy bitmaps (all consistent ones by default) from SOURCE_IMAGE to\n"
    "TARGET_IMAGE with their name, granularity, flags and contents. A name\n"
    "that exists in TARGET_IMAGE is an error unless --merge (OR into it) or\n"
    "--replace (drop it first).\n\n"
    "      --merge    OR into a bitmap of the same name\n"
    "      --replace  replace a bitmap of the same name\n";

struct report {
    struct outbuf *plan;
    const char *src;
};

static int report(void *opaque, int action, const char *bitmap,
                  uint64_t granularity)
{
    static const char *const verbs[] = {
        [QBM_COPY_COPIED] = "copy",
        [QBM_COPY_MERGED] = "merge",
        [QBM_COPY_REPLACED] = "replace",
    };
    struct report *rep = opaque;

    if (action == QBM_COPY_SKIPPED) {
        tool_error(rep->src, "warning: skipping in-use bitmap '%s'", bitmap);
    } else if (action >= QBM_COPY_COPIED && action <= QBM_COPY_REPLACED) {
        ob_printf(rep->plan, "would %s bitmap '%s' (granularity %" PRIu64 ")\n",
                  verbs[action], bitmap, granularity);
    }
    return 0;
}

int cmd_copy(int argc, char **argv)
{
    static const struct option opts[] = {
        { "merge", no_argument, NULL, 'm' },
        { "replace", no_argument, NULL, 'r' },
        { NULL, 0, NULL, 0 },
    };
    struct tool_args a = {
        .cmd = "copy",
        .usage = usage,
        .opts = opts,
        .common = TOOL_OPT_EDIT,
        .min_args = 2,
        .max_args = -1,
        .args_hint = "SOURCE_IMAGE and TARGET_IMAGE",
    };
    struct outbuf plan = { 0 };
    struct report rep = { &plan, NULL };
    struct qbm_image *src, *dst;
    unsigned flags = 0;
    const char *dfile;
    int c, r;

    while ((c = tool_getopt(&a, argc, argv)) > 0) {
        switch (c) {
        case 'm':
            flags = QBM_COPY_MERGE;
            break;
        case 'r':
            flags = QBM_COPY_REPLACE;
            break;
        }
    }
    if (c < 0) {
        return a.status;
    }
    rep.src = a.args[0];
    dfile = a.args[1];
    if (same_file(rep.src, dfile)) {
        tool_error(dfile, "source and target are the same image");
        return 1;
    }
    src = tool_open(rep.src, 0);
    if (!src) {
        return 1;
    }
    dst = edit_open(dfile);
    if (!dst) {
        qbm_close(src);
        return 1;
    }
    /* No NAME: every bitmap (NULL). */
    r = qbm_bitmap_copy(dst, src,
                        a.nargs > 2 ? (const char *const *)a.args + 2 : NULL,
                        (size_t)(a.nargs - 2), flags, report, &rep);
    if (r != 0) {
        if (qbm_get_errno() == EEXIST) {
            tool_error(NULL, "%s (use --merge or --replace)", qbm_get_error());
        } else {
            tool_lib_error(NULL);
        }
        ob_free(&plan);
        qbm_close(dst);
        qbm_close(src);
        return 1;
    }
    r = edit_finish(dst, dfile, a.dry_run, &plan);
    qbm_close(src);
    return r;
}
