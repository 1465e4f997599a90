/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* Progress display for long operations, as qemu-img convert -p shows it. */
#include <stdio.h>

#include "qbm-tool.h"

int show_progress(void *opaque, uint64_t done, uint64_t total)
{
    unsigned *last = opaque;
    unsigned pct = total ? (unsigned)(done * 10000 / total) : 10000;

    if (pct > 10000) {
        pct = 10000;
    }
    /* Redraw only when the figure changes by 0.01%. */
    if (pct != *last) {
        *last = pct;
        fprintf(stderr, "    (%u.%02u/100%%)\r", pct / 100, pct % 100);
        fflush(stderr);
    }
    return 0;
}

void end_progress(void *opaque)
{
    if (*(unsigned *)opaque != 10000) {
        fprintf(stderr, "    (100.00/100%%)");
    }
    fputc('\n', stderr);
}
