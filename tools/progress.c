/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* Progress display for long operations, as qemu-img convert -p shows it. */
#include <stdio.h>

#include "qbm-tool.h"

static int show_progress(void *opaque, uint64_t done, uint64_t total)
{
    struct progress *p = opaque;
    unsigned pct = total ? (unsigned)(done * 10000 / total) : 10000;

    if (pct > 10000) {
        pct = 10000;
    }
    /* Redraw only when the figure changes by 0.01%. */
    if (pct != p->last) {
        p->last = pct;
        fprintf(stderr, "    (%u.%02u/100%%)\r", pct / 100, pct % 100);
        fflush(stderr);
    }
    return 0;
}

struct progress progress_init(const struct tool_args *a)
{
    struct progress p = { a->progress, (unsigned)-1 };

    return p;
}

qbm_progress_fn progress_fn(const struct progress *p)
{
    return p->on ? show_progress : NULL;
}

int progress_finish(struct progress *p, int r)
{
    if (p->on) {
        /* A failure breaks the line, so the message starts on its own. */
        if (r >= 0 && p->last != 10000) {
            fprintf(stderr, "    (100.00/100%%)");
        }
        fputc('\n', stderr);
    }
    if (r < 0) {
        tool_lib_error(NULL);
        return 1;
    }
    return 0;
}
