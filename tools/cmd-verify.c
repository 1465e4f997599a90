/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* qbm verify: where a disk differs from what its backups restore to. */
#include <inttypes.h>
#include <stdio.h>

#include "qbm-tool.h"

static const char usage[] =
    "Usage: qbm verify [--bitmap NAME] [--output=human|json] [-p] [-U] "
    "IMAGE\n"
    "                  FULL [INCREMENTAL...]\n"
    "List the extents (in 512-byte sectors) where IMAGE, read through its\n"
    "backing chain, differs from what FULL plus the INCREMENTALs restore\n"
    "to (as 'qbm restore'). IMAGE may be raw (with -f qcow2: only qcow2).\n"
    "-U takes no locks on IMAGE, its backing files and the backups: a disk\n"
    "a VM writes meanwhile may compare as anything.\n"
    "Exit status: 0 no difference, 2 differences, 1 could not verify.\n\n"
    "  -B, --bitmap=NAME     only the differences that bitmap NAME of IMAGE\n"
    "                        marks clean (writes it missed, a corrupt\n"
    "                        backup or a wrong bitmap)\n";

struct verify_ctx {
    struct outbuf *ext;
    enum output_format fmt;
    uint64_t count, bytes;
};

static int add_extent(void *opaque, uint64_t off, uint64_t len)
{
    struct verify_ctx *v = opaque;

    if (v->fmt == OUTPUT_JSON) {
        ob_extent(v->ext, v->count ? ", {\"offset\": " : "{\"offset\": ", off,
                  ", \"length\": ", len, "}");
    } else {
        ob_extent(v->ext, "", off, " ", len, "\n");
    }
    v->count++;
    v->bytes += len;
    return v->ext->failed ? -1 : 0;
}

static bool image_is_qcow2(const char *image, unsigned flags)
{
    struct qbm_image *img = tool_open(image, QBM_OPEN_ANY_FORMAT | flags);
    bool ok = img && strcmp(qbm_image_format(img), "qcow2") == 0;

    if (img && !ok) {
        tool_error(image, "not a qcow2 image (-f qcow2 was given)");
    }
    qbm_close(img);
    return ok;
}

int cmd_verify(int argc, char **argv)
{
    static const struct option opts[] = {
        { "bitmap", required_argument, NULL, 'B' },
        { NULL, 0, NULL, 0 },
    };
    struct tool_args a = {
        .cmd = "verify",
        .usage = usage,
        .shortopts = "B:",
        .opts = opts,
        .common = TOOL_OPT_READ | TOOL_OPT_PROGRESS,
        .min_args = 2,
        .max_args = -1,
        .args_hint = "IMAGE and FULL",
    };
    struct outbuf head = { 0 }, ext = { 0 }, tail = { 0 };
    struct outbuf *all[] = { &head, &ext, &tail };
    struct verify_ctx v = { &ext, OUTPUT_HUMAN, 0, 0 };
    const char *bitmap = NULL, *image;
    const char *const *backups;
    struct progress p;
    unsigned flags = 0;
    size_t n, i;
    int c, r;

    while ((c = tool_getopt(&a, argc, argv)) > 0) {
        switch (c) {
        case 'B':
            bitmap = optarg;
            break;
        }
    }
    if (c < 0) {
        return a.status;
    }
    image = a.args[0];
    backups = (const char *const *)a.args + 1;
    n = (size_t)(a.nargs - 1);
    if (a.open_flags & QBM_OPEN_FORCE_SHARE) {
        flags |= QBM_VERIFY_FORCE_SHARE;
    }
    if (a.format_given && !image_is_qcow2(image, a.open_flags)) {
        return 1;
    }
    v.fmt = a.output;
    p = progress_init(&a);
    r = qbm_verify(image, backups, n, bitmap, flags, add_extent, &v,
                   progress_fn(&p), &p);
    if (r != 0 && ext.failed) {
        if (p.on) {
            fputc('\n', stderr);
        }
        tool_error(image, "out of memory building the output");
        ob_free(&ext);
        return 1;
    }
    /* The library names the file each message is about. */
    if (progress_finish(&p, r) != 0) {
        ob_free(&ext);
        return 1;
    }
    if (v.fmt == OUTPUT_JSON) {
        ob_puts(&head, "{\"filename\": ");
        ob_json_string(&head, image);
        ob_puts(&head, ", \"backups\": [");
        for (i = 0; i < n; i++) {
            ob_puts(&head, i ? ", " : "");
            ob_json_string(&head, backups[i]);
        }
        ob_puts(&head, "], \"bitmap\": ");
        if (bitmap) {
            ob_json_string(&head, bitmap);
        } else {
            ob_puts(&head, "null");
        }
        ob_printf(&head, ", \"differing-bytes\": %" PRIu64 ", \"extents\": [",
                  v.bytes);
        ob_puts(&tail, "]}\n");
    } else {
        ob_printf(&head,
                  "# %s: %" PRIu64 " bytes in %" PRIu64
                  " extents differ from the backups",
                  image, v.bytes, v.count);
        if (bitmap) {
            ob_puts(&head, " where bitmap '");
            ob_puts(&head, bitmap);
            ob_puts(&head, "' is clean");
        }
        ob_puts(&head, "\n");
    }
    if (head.failed || tail.failed) {
        tool_error(image, "out of memory building the output");
        ob_free(&head);
        ob_free(&ext);
        ob_free(&tail);
        return 1;
    }
    if (ob_flush_all(all, 3) != 0) {
        return 1;
    }
    return v.count ? 2 : 0;
}
