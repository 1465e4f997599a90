/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* qbm verify: where a disk differs from what its backups restore to. */
#include <getopt.h>
#include <inttypes.h>
#include <stdio.h>

#include "qbm-tool.h"

static const char usage[] =
    "Usage: qbm verify [--bitmap NAME] [--output=human|json] [-p] [-U] "
    "IMAGE\n"
    "                  FULL [INCREMENTAL...]\n"
    "List the extents (in 512-byte sectors) where IMAGE, read through its\n"
    "backing chain, differs from what FULL plus the INCREMENTALs restore\n"
    "to (as 'qbm restore').\n\n"
    "  -B, --bitmap=NAME    only the differences that bitmap NAME of IMAGE\n"
    "                       marks clean (writes it missed, a corrupt backup\n"
    "                       or a wrong bitmap)\n"
    "      --output=FORMAT  human (default) or json\n"
    "  -p                   show progress\n"
    "  -U, --force-share    do not take QEMU's locks on IMAGE and its backing\n"
    "                       files (a disk a VM writes meanwhile may compare\n"
    "                       as anything)\n"
    "  -h, --help           show this help\n"
    "Exit status: 0 no difference, 2 differences, 1 could not verify.\n";

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

int cmd_verify(int argc, char **argv)
{
    static const struct option opts[] = {
        { "bitmap", required_argument, NULL, 'B' },
        { "output", required_argument, NULL, 'o' },
        { "force-share", no_argument, NULL, 'U' },
        { "help", no_argument, NULL, 'h' },
        { NULL, 0, NULL, 0 },
    };
    enum output_format fmt = OUTPUT_HUMAN;
    struct outbuf head = { 0 }, ext = { 0 }, tail = { 0 };
    struct outbuf *all[] = { &head, &ext, &tail };
    struct verify_ctx v = { &ext, OUTPUT_HUMAN, 0, 0 };
    const char *bitmap = NULL, *image;
    const char *const *backups;
    unsigned last = (unsigned)-1;
    bool progress = false;
    unsigned flags = 0;
    size_t n, i;
    int c, r;

    while ((c = getopt_long(argc, argv, "+B:pUh", opts, NULL)) != -1) {
        switch (c) {
        case 'B':
            bitmap = optarg;
            break;
        case 'o':
            if (!parse_output(optarg, &fmt)) {
                return usage_error("verify", "--output must be human or json");
            }
            break;
        case 'p':
            progress = true;
            break;
        case 'U':
            flags |= QBM_VERIFY_FORCE_SHARE;
            break;
        case 'h':
            fputs(usage, stdout);
            return 0;
        default:
            return usage_error("verify", "invalid option");
        }
    }
    if (argc - optind < 2) {
        return usage_error("verify", "expected IMAGE and FULL");
    }
    image = argv[optind];
    backups = (const char *const *)argv + optind + 1;
    n = (size_t)(argc - optind - 1);
    v.fmt = fmt;
    r = qbm_verify(image, backups, n, bitmap, flags, add_extent, &v,
                   progress ? show_progress : NULL, &last);
    if (r != 0) {
        if (progress) {
            fputc('\n', stderr);
        }
        if (ext.failed) {
            tool_error(image, "out of memory building the output");
        } else {
            tool_lib_error(NULL);
        }
        ob_free(&ext);
        return 1;
    }
    if (progress) {
        end_progress(&last);
    }
    if (fmt == OUTPUT_JSON) {
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
