/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* Growable arrays (util-darray.h). */
#include <stdint.h>

#include "internal.h"

/* The first allocation of an array: enough elements for this many bytes. */
#define DARRAY_FIRST_BYTES 4096

int qbm_darray_grow(void **v, size_t *cap, size_t n, size_t extra, size_t size,
                    size_t max)
{
    size_t limit = SIZE_MAX / size, need, next;
    void *p;

    if (max && max < limit) {
        limit = max;
    }
    if (__builtin_add_overflow(n, extra, &need) || need > limit) {
        return qbm_err(ENOMEM,
                       "out of memory: an array would exceed %zu "
                       "elements",
                       limit);
    }
    if (need <= *cap) {
        return 0;
    }
    if (*cap == 0) {
        next = DARRAY_FIRST_BYTES / size;
    } else if (__builtin_mul_overflow(*cap, 2, &next)) {
        next = limit;
    }
    if (next < need) {
        next = need;
    }
    if (next > limit) {
        next = limit;
    }
    p = qbm_realloc(*v, next * size);
    if (!p) {
        return -ENOMEM;
    }
    *v = p;
    *cap = next;
    return 0;
}
