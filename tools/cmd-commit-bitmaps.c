/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * qbm commit-bitmaps: carry the bitmaps of TOP (and of any layer between
 * TOP and BASE) into BASE around a `qemu-img commit`, which itself drops
 * the bitmaps that exist only above the base.
 */
#include <getopt.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>

#include "qbm-tool.h"

static const char usage[] =
    "Usage: qbm commit-bitmaps [--mark-written] [--dry-run] TOP BASE\n"
    "Merge every bitmap of TOP, and of the layers between TOP and BASE,\n"
    "into BASE's bitmap of the same name, creating it with the same\n"
    "granularity when BASE lacks it; BASE's copy takes the enabled state of\n"
    "the topmost layer. Run it before or after 'qemu-img commit' (with -d,\n"
    "or -b BASE for a deeper base).\n\n"
    "      --mark-written  also mark in BASE's enabled bitmaps every cluster\n"
    "                      the commit copies (the layers' own allocation);\n"
    "                      needs the layers to still hold their data\n"
    "  -n, --dry-run       say what would change, change nothing\n"
    "  -h, --help          show this help\n";

/* Layers strictly above BASE in TOP's chain, top first. */
static int find_layers(const char *top, const char *base, char ***ret,
                       size_t *ret_n)
{
    struct qbm_chain *ch = qbm_chain_open(top, QBM_OPEN_FORCE_SHARE);
    size_t i, n;
    char **names;

    if (!ch) {
        tool_lib_error(top);
        return -1;
    }
    n = qbm_chain_length(ch);
    for (i = 1; i < n; i++) {
        if (same_file(qbm_chain_filename(ch, i), base)) {
            break;
        }
    }
    if (i == n) {
        tool_error(base, "not in the backing chain of %s", top);
        qbm_chain_close(ch);
        return -1;
    }
    names = calloc(i, sizeof(*names));
    for (n = 0; names && n < i; n++) {
        names[n] = strdup(qbm_chain_filename(ch, n));
    }
    qbm_chain_close(ch);
    if (!names) {
        tool_error(top, "out of memory");
        return -1;
    }
    *ret = names;
    *ret_n = i;
    return 0;
}

static int carry(struct qbm_image *base, const char *bfile,
                 struct qbm_image **layers, char **names, size_t n,
                 bool mark, struct outbuf *plan)
{
    size_t l, i;

    for (l = 0; l < n; l++) {
        struct qbm_image *L = layers[l];

        if (qbm_image_virtual_size(L) != qbm_image_virtual_size(base)) {
            tool_error(names[l], "virtual size %" PRIu64 " differs from "
                       "the base's %" PRIu64, qbm_image_virtual_size(L),
                       qbm_image_virtual_size(base));
            return -1;
        }
        for (i = 0; i < qbm_bitmap_count(L); i++) {
            const char *name = qbm_bitmap_name(L, i);
            unsigned flags = qbm_bitmap_flags(L, i);
            bool created = false, seen_above = false;
            size_t k;

            if (!qbm_bitmap_consistent(L, i)) {
                tool_error(names[l], "bitmap '%s' is in use; repair it "
                           "first with 'qbm check --repair'", name);
                return -1;
            }
            for (k = 0; k < l; k++) {
                seen_above |= qbm_bitmap_find(layers[k], name) >= 0;
            }
            /* The topmost layer with the bitmap decides whether BASE's
             * copy records writes from now on. */
            if (!seen_above && qbm_bitmap_find(base, name) < 0) {
                if (qbm_bitmap_add(base, name, qbm_bitmap_granularity(L, i),
                                   (flags & QBM_BITMAP_AUTO)
                                       ? 0 : QBM_ADD_DISABLED) < 0) {
                    goto lib_fail;
                }
                created = true;
            } else if (!seen_above &&
                       ((flags & QBM_BITMAP_AUTO)
                            ? qbm_bitmap_enable(base, name)
                            : qbm_bitmap_disable(base, name)) < 0) {
                goto lib_fail;
            }
            if (qbm_bitmap_merge(base, name, L, name) < 0) {
                goto lib_fail;
            }
            ob_printf(plan, "would %s bitmap '%s' of %s into %s\n",
                      created ? "copy" : "merge", name, names[l], bfile);
        }
    }
    if (mark) {
        for (i = 0; i < qbm_bitmap_count(base); i++) {
            if (!(qbm_bitmap_flags(base, i) & QBM_BITMAP_AUTO)) {
                continue;
            }
            for (l = 0; l < n; l++) {
                if (qbm_bitmap_populate(base, qbm_bitmap_name(base, i),
                                        layers[l]) < 0) {
                    goto lib_fail;
                }
            }
            ob_printf(plan, "would mark the committed clusters in bitmap "
                      "'%s' of %s\n", qbm_bitmap_name(base, i), bfile);
        }
    }
    return 0;

lib_fail:
    tool_lib_error(bfile);
    return -1;
}

int cmd_commit_bitmaps(int argc, char **argv)
{
    static const struct option opts[] = {
        { "mark-written", no_argument, NULL, 'm' },
        { "dry-run", no_argument, NULL, 'n' },
        { "help", no_argument, NULL, 'h' },
        { NULL, 0, NULL, 0 },
    };
    struct outbuf plan = { 0 };
    struct qbm_image *base = NULL, **layers = NULL;
    char **names = NULL;
    size_t n = 0, i;
    bool mark = false, dry_run = false;
    const char *top, *bfile;
    int c, ret = 1;

    while ((c = getopt_long(argc, argv, "+nh", opts, NULL)) != -1) {
        switch (c) {
        case 'm':
            mark = true;
            break;
        case 'n':
            dry_run = true;
            break;
        case 'h':
            fputs(usage, stdout);
            return 0;
        default:
            return usage_error("commit-bitmaps", "invalid option");
        }
    }
    if (argc - optind != 2) {
        return usage_error("commit-bitmaps", "expected TOP and BASE");
    }
    top = argv[optind];
    bfile = argv[optind + 1];
    if (find_layers(top, bfile, &names, &n) < 0) {
        return 1;
    }
    layers = calloc(n, sizeof(*layers));
    if (!layers) {
        goto out;
    }
    for (i = 0; i < n; i++) {
        layers[i] = qbm_open(names[i], 0);
        if (!layers[i]) {
            tool_lib_error(names[i]);
            goto out;
        }
    }
    base = edit_open(bfile);
    if (!base) {
        goto out;
    }
    if (carry(base, bfile, layers, names, n, mark, &plan) < 0) {
        ob_free(&plan);
        qbm_close(base);
        goto out;
    }
    ret = edit_finish(base, bfile, dry_run, &plan);

out:
    for (i = 0; i < n; i++) {
        if (layers) {
            qbm_close(layers[i]);
        }
        free(names[i]);
    }
    free(layers);
    free(names);
    return ret;
}
