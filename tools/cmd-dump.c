/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* qbm dump: the dirty extents of one bitmap, or of a checkpoint's chain. */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "qbm-tool.h"

static const char dump_usage[] =
    "Usage: qbm dump [--chain] [--output=human|json] [-U] IMAGE BITMAP\n"
    "List the guest byte ranges BITMAP marks dirty, adjacent ranges merged.\n"
    "\n"
    "  -c, --chain           the union over every layer of the backing "
    "chain\n"
    "                        that has a bitmap of that name\n";

struct dump_ctx {
    struct outbuf *ext; /* the extent lines or JSON objects */
    enum output_format fmt;
    uint64_t count, bytes;
};

static int add_extent(void *opaque, uint64_t off, uint64_t len)
{
    struct dump_ctx *d = opaque;

    if (d->fmt == OUTPUT_JSON) {
        ob_extent(d->ext, d->count ? ", {\"offset\": " : "{\"offset\": ", off,
                  ", \"length\": ", len, "}");
    } else {
        ob_extent(d->ext, "", off, " ", len, "\n");
    }
    d->count++;
    d->bytes += len;
    return d->ext->failed ? -1 : 0;
}

/* "no bitmap named": when a backing layer has one, say how to read it. */
static void no_bitmap(const char *file, const char *name, unsigned flags)
{
    struct qbm_chain *ch = qbm_chain_open(file, flags);
    size_t i;

    for (i = 1; ch && i < qbm_chain_length(ch); i++) {
        struct qbm_image *l = qbm_chain_layer(ch, i);

        if (qbm_bitmap_count(l) && qbm_bitmap_find(l, name) >= 0) {
            tool_error(file,
                       "no bitmap named '%s' in this layer, but its backing "
                       "layer %zu (%s) has one: use 'qbm dump --chain' for "
                       "its union over the chain",
                       name, i, qbm_chain_filename(ch, i));
            qbm_chain_close(ch);
            return;
        }
    }
    qbm_chain_close(ch);
    tool_error(file, "no bitmap named '%s'", name);
}

int cmd_dump(int argc, char **argv)
{
    static const struct option opts[] = {
        { "chain", no_argument, NULL, 'c' },
        { NULL, 0, NULL, 0 },
    };
    struct tool_args a = {
        .cmd = "dump",
        .usage = dump_usage,
        .shortopts = "c",
        .opts = opts,
        .common = TOOL_OPT_READ,
        .min_args = 2,
        .max_args = 2,
        .args_hint = "IMAGE and BITMAP arguments",
    };
    enum output_format fmt;
    struct outbuf head = { 0 }, ext = { 0 }, tail = { 0 };
    struct outbuf *all[] = { &head, &ext, &tail };
    struct dump_ctx d = { &ext, OUTPUT_HUMAN, 0, 0 };
    struct qbm_image *img = NULL;
    struct qbm_chain *ch = NULL;
    bool chain = false;
    const char *file, *name;
    int consistent = 1;
    uint64_t gran = 0;
    int c, r, ret = 1;

    while ((c = tool_getopt(&a, argc, argv)) > 0) {
        switch (c) {
        case 'c':
            chain = true;
            break;
        }
    }
    if (c < 0) {
        return a.status;
    }
    fmt = a.output;
    file = a.args[0];
    name = a.args[1];
    d.fmt = fmt;

    if (chain) {
        ch = tool_chain_open(file, a.open_flags);
        if (!ch) {
            goto out;
        }
        r = qbm_chain_bitmap_extents(ch, name, add_extent, &d, &consistent);
    } else {
        int idx;

        img = tool_open(file, a.open_flags);
        if (!img) {
            goto out;
        }
        idx = qbm_bitmap_find(img, name);
        if (idx < 0) {
            if (qbm_image_bitmaps_state(img) == QBM_BITMAPS_STALE) {
                tool_error(file,
                           "no usable bitmap named '%s' (the bitmaps "
                           "extension is stale: see qbm info)",
                           name);
            } else {
                no_bitmap(file, name, a.open_flags);
            }
            goto out;
        }
        consistent = qbm_bitmap_consistent(img, (size_t)idx);
        gran = qbm_bitmap_granularity(img, (size_t)idx);
        r = qbm_bitmap_extents(img, (size_t)idx, add_extent, &d);
    }
    if (r != 0) {
        if (ext.failed) {
            tool_error(file, "out of memory building the output");
        } else {
            tool_lib_error(file);
        }
        goto out;
    }

    if (fmt == OUTPUT_JSON) {
        head.failed = false;
        ob_puts(&head, "{\"filename\": ");
        ob_json_string(&head, file);
        ob_puts(&head, ", \"name\": ");
        ob_json_string(&head, name);
        if (chain) {
            size_t i;
            bool first = true;

            ob_puts(&head, ", \"layers\": [");
            for (i = 0; i < qbm_chain_length(ch); i++) {
                struct qbm_image *l = qbm_chain_layer(ch, i);
                int j = qbm_bitmap_count(l) ? qbm_bitmap_find(l, name) : -1;

                if (j >= 0) {
                    ob_puts(&head, first ? "" : ", ");
                    ob_json_string(&head, qbm_chain_filename(ch, i));
                    first = false;
                }
            }
            ob_puts(&head, "]");
        } else {
            ob_printf(&head, ", \"granularity\": %" PRIu64, gran);
        }
        ob_printf(&head,
                  ", \"consistent\": %s, \"dirty-bytes\": %" PRIu64
                  ", \"extents\": [",
                  consistent ? "true" : "false", d.bytes);
        ob_puts(&tail, "]}\n");
    } else {
        ob_puts(&head, "# ");
        ob_human_string(&head, file);
        ob_puts(&head, ": bitmap ");
        ob_human_string(&head, name);
        ob_puts(&head, ", ");
        if (chain) {
            ob_puts(&head, "union over the chain, ");
        } else {
            ob_printf(&head, "granularity %" PRIu64 ", ", gran);
        }
        ob_printf(&head, "%s, %" PRIu64 " dirty bytes\n",
                  consistent ? "consistent" : "inconsistent (in-use)", d.bytes);
    }
    ret = ob_flush_all(all, 3);

out:
    ob_free(&ext);
    ob_free(&head);
    ob_free(&tail);
    qbm_close(img);
    qbm_chain_close(ch);
    return ret;
}
