/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* qbm copy: copy bitmaps, with their granularity and flags, between images. */
#include <getopt.h>
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
    "      --replace  replace a bitmap of the same name\n"
    "  -n, --dry-run  say what would change, change nothing\n"
    "  -h, --help     show this help\n";

enum clash { CLASH_FAIL, CLASH_MERGE, CLASH_REPLACE };

static int copy_one(struct qbm_image *dst, struct qbm_image *src,
                    const char *name, enum clash clash, struct outbuf *plan)
{
    int si = qbm_bitmap_find(src, name);
    const char *what = "copy";

    if (si < 0) {
        return -1;
    }
    if (qbm_bitmap_find(dst, name) >= 0) {
        if (clash == CLASH_FAIL) {
            qbm_bitmap_find(dst, "");
            return -2;
        }
        if (clash == CLASH_REPLACE) {
            if (qbm_bitmap_remove(dst, name) < 0) {
                return -3;
            }
            what = "replace";
        } else {
            what = "merge";
        }
    }
    if (strcmp(what, "merge") != 0 &&
        qbm_bitmap_add(dst, name, qbm_bitmap_granularity(src, (size_t)si),
                       (qbm_bitmap_flags(src, (size_t)si) & QBM_BITMAP_AUTO)
                           ? 0 : QBM_ADD_DISABLED) < 0) {
        return -3;
    }
    if (qbm_bitmap_merge(dst, name, src, name) < 0) {
        return -3;
    }
    ob_printf(plan, "would %s bitmap '%s' (granularity %" PRIu64 ")\n",
              what, name, qbm_bitmap_granularity(src, (size_t)si));
    return 0;
}

int cmd_copy(int argc, char **argv)
{
    static const struct option opts[] = {
        { "merge", no_argument, NULL, 'm' },
        { "replace", no_argument, NULL, 'r' },
        { "dry-run", no_argument, NULL, 'n' },
        { "help", no_argument, NULL, 'h' },
        { NULL, 0, NULL, 0 },
    };
    struct outbuf plan = { 0 };
    struct qbm_image *src, *dst;
    enum clash clash = CLASH_FAIL;
    const char *sfile, *dfile;
    bool dry_run = false;
    int c, i, r = 0;

    while ((c = getopt_long(argc, argv, "+nh", opts, NULL)) != -1) {
        switch (c) {
        case 'm':
            clash = CLASH_MERGE;
            break;
        case 'r':
            clash = CLASH_REPLACE;
            break;
        case 'n':
            dry_run = true;
            break;
        case 'h':
            fputs(usage, stdout);
            return 0;
        default:
            return usage_error("copy", "invalid option");
        }
    }
    if (argc - optind < 2) {
        return usage_error("copy", "expected SOURCE_IMAGE and TARGET_IMAGE");
    }
    sfile = argv[optind];
    dfile = argv[optind + 1];
    if (same_file(sfile, dfile)) {
        tool_error(dfile, "source and target are the same image");
        return 1;
    }
    src = qbm_open(sfile, 0);
    if (!src) {
        tool_lib_error(sfile);
        return 1;
    }
    dst = edit_open(dfile);
    if (!dst) {
        qbm_close(src);
        return 1;
    }
    if (argc - optind > 2) {
        for (i = optind + 2; i < argc && r == 0; i++) {
            r = copy_one(dst, src, argv[i], clash, &plan);
            if (r == -1) {
                tool_lib_error(sfile);
            } else if (r == -2) {
                tool_error(dfile, "a bitmap named '%s' exists already (use "
                           "--merge or --replace)", argv[i]);
            }
        }
    } else {
        size_t n = qbm_bitmap_count(src), k;

        for (k = 0; k < n && r == 0; k++) {
            const char *name = qbm_bitmap_name(src, k);

            if (!qbm_bitmap_consistent(src, k)) {
                fprintf(stderr, "qbm: %s: warning: skipping in-use bitmap "
                        "'%s'\n", sfile, name);
                continue;
            }
            r = copy_one(dst, src, name, clash, &plan);
            if (r == -2) {
                tool_error(dfile, "a bitmap named '%s' exists already (use "
                           "--merge or --replace)", name);
            }
        }
    }
    if (r == -3) {
        tool_lib_error(dfile);
    }
    if (r < 0) {
        ob_free(&plan);
        qbm_close(dst);
        qbm_close(src);
        return 1;
    }
    r = edit_finish(dst, dfile, dry_run, &plan);
    qbm_close(src);
    return r;
}
