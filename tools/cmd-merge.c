/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* qbm merge: OR one or more bitmaps into a target bitmap. */
#include <stdio.h>

#include "qbm-tool.h"

static const char usage[] =
    "Usage: qbm merge [-b SOURCE_IMAGE] [--dry-run] IMAGE TARGET SOURCE...\n"
    "OR the bitmaps SOURCE... (of IMAGE, or of SOURCE_IMAGE with -b) into\n"
    "bitmap TARGET of IMAGE, in one crash-safe update. Granularities may\n"
    "differ: a TARGET bit is set when any byte it covers is dirty.\n\n"
    "  -b, --source-image=FILE  read the SOURCE bitmaps from FILE (same\n"
    "                           virtual size)\n"
    "  -F FORMAT                format of FILE (only qcow2)\n";

int cmd_merge(int argc, char **argv)
{
    static const struct option opts[] = {
        { "source-image", required_argument, NULL, 'b' },
        { NULL, 0, NULL, 0 },
    };
    struct tool_args a = {
        .cmd = "merge",
        .usage = usage,
        .shortopts = "b:F:",
        .opts = opts,
        .common = TOOL_OPT_EDIT,
        .min_args = 3,
        .max_args = -1,
        .args_hint = "IMAGE, TARGET and SOURCE...",
    };
    struct outbuf plan = { 0 };
    struct qbm_image *img, *src = NULL;
    const char *src_file = NULL, *file, *target;
    int c, i, ret;

    while ((c = tool_getopt(&a, argc, argv)) > 0) {
        switch (c) {
        case 'b':
            src_file = optarg;
            break;
        case 'F':
            if (!parse_format("merge", "-F", optarg)) {
                return EXIT_USAGE;
            }
            break;
        }
    }
    if (c < 0) {
        return a.status;
    }
    file = a.args[0];
    target = a.args[1];
    img = edit_open(file);
    if (!img) {
        return 1;
    }
    if (src_file && !same_file(src_file, file)) {
        src = tool_open(src_file, 0);
        if (!src) {
            qbm_close(img);
            return 1;
        }
    }
    for (i = 2; i < a.nargs; i++) {
        if (qbm_bitmap_merge(img, target, src ? src : img, a.args[i]) < 0) {
            tool_lib_error(src && qbm_get_errno() == ENOENT &&
                                   qbm_bitmap_find(img, target) >= 0
                               ? src_file
                               : file);
            ob_free(&plan);
            qbm_close(src);
            qbm_close(img);
            return 1;
        }
        ob_printf(&plan, "would merge bitmap '%s'%s%s into '%s' of %s\n",
                  a.args[i], src ? " of " : "", src ? src_file : "", target,
                  file);
    }
    ret = edit_finish(img, file, a.dry_run, &plan);
    qbm_close(src);
    return ret;
}
