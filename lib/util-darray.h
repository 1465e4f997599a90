/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * Typed growable arrays.
 *
 *     QBM_DARRAY(extents, struct extent);   declares struct extents
 *     struct extents a = { 0 };              an empty array
 *     r = qbm_darray_push(&a, e, 0);         0, or -errno (message set)
 *     ... a.v[0 .. a.n) ...
 *     qbm_darray_free(&a);
 *
 * Capacity doubles (the first allocation takes at least 4 KiB), and a
 * reservation that needs more than twice the capacity gets what it needs.
 * Every size is overflow-checked, and `max` caps the number of elements
 * (0: no cap but the address space): where a count comes from the input,
 * pass the limit the format gives it. On failure the array is unchanged
 * and the error (ENOMEM) is recorded with qbm_err().
 */
#ifndef QBM_UTIL_DARRAY_H
#define QBM_UTIL_DARRAY_H

#include <stddef.h>
#include <stdlib.h>

/* Declare struct `name`: v[0..n) in use, room for cap elements. */
#define QBM_DARRAY(name, type) \
    struct name {              \
        type *v;               \
        size_t n;              \
        size_t cap;            \
    }

/*
 * The machinery behind the macros: make *v (of *cap elements of `size`
 * bytes, n in use) hold at least n + extra, at most `max` (0: no cap).
 * Returns 0 or -ENOMEM; *v and *cap change only on success.
 */
int qbm_darray_grow(void **v, size_t *cap, size_t n, size_t extra, size_t size,
                    size_t max);

/* Room for `extra` more elements: 0 or -errno. */
#define qbm_darray_reserve(a, extra, max)                                      \
    ({                                                                         \
        __typeof__(a) qbm_da_ = (a);                                           \
        void *qbm_da_v_ = qbm_da_->v;                                          \
        int qbm_da_r_ = qbm_darray_grow(&qbm_da_v_, &qbm_da_->cap, qbm_da_->n, \
                                        (extra), sizeof(*qbm_da_->v), (max));  \
        qbm_da_->v = qbm_da_v_;                                                \
        qbm_da_r_;                                                             \
    })

/* Append `elem` (evaluated after the array has grown): 0 or -errno. */
#define qbm_darray_push(a, elem, max)                          \
    ({                                                         \
        __typeof__(a) qbm_dp_ = (a);                           \
        int qbm_dp_r_ = qbm_darray_reserve(qbm_dp_, 1, (max)); \
        if (qbm_dp_r_ == 0) {                                  \
            qbm_dp_->v[qbm_dp_->n++] = (elem);                 \
        }                                                      \
        qbm_dp_r_;                                             \
    })

/* The last element (the array must not be empty). */
#define qbm_darray_last(a) ((a)->v[(a)->n - 1])

/* Release the elements' storage; the array is empty again. */
#define qbm_darray_free(a)     \
    do {                       \
        free((a)->v);          \
        (a)->v = NULL;         \
        (a)->n = (a)->cap = 0; \
    } while (0)

#endif /* QBM_UTIL_DARRAY_H */
