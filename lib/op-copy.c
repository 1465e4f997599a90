/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * Copying bitmaps between images with their name, granularity, state and
 * contents, and what to do when the target has a bitmap of that name
 * already: refuse, OR into it, or replace it.
 */
#include "internal.h"

struct copy {
    struct qbm_image *img, *src;
    unsigned flags;
    qbm_copy_fn fn;
    void *opaque;
    int user_ret; /* the callback's value that stopped the call */
};

/* Stage the copy of `sbm` (a bitmap of SRC) into IMG; returns the
 * enum qbm_copy_action done, or -errno. */
static int copy_one(struct copy *c, const struct qcow2_bitmap *sbm)
{
    const char *name = sbm->name;
    int action = QBM_COPY_COPIED, r = 0;

    if (qcow2_bitmap_lookup(c->img, name)) {
        if (!(c->flags & (QBM_COPY_MERGE | QBM_COPY_REPLACE))) {
            return qbm_err(EEXIST, "%s: a bitmap named '%s' exists already",
                           c->img->filename, name);
        }
        if (c->flags & QBM_COPY_REPLACE) {
            r = qbm_impl_bitmap_remove(c->img, name);
            action = QBM_COPY_REPLACED;
        } else {
            action = QBM_COPY_MERGED;
        }
    }
    /* A copy takes the source's granularity and state; a merge keeps the
     * target's. */
    if (r == 0 && action != QBM_COPY_MERGED) {
        r = qbm_impl_bitmap_add(
            c->img, name, 1ull << sbm->granularity_bits,
            (sbm->flags & BME_FLAG_AUTO) ? 0 : QBM_ADD_DISABLED);
    }
    r = r ? r : qbm_impl_bitmap_merge(c->img, name, c->src, name);
    if (r < 0) {
        return qbm_err_prefix(r, "%s", c->img->filename);
    }
    return action;
}

/* Tell the caller what `action` (or -errno) did to `sbm`; 1 when it says
 * stop (its value kept in user_ret). */
static int report(struct copy *c, int action, const struct qcow2_bitmap *sbm)
{
    if (action < 0 || !c->fn) {
        return action < 0 ? action : 0;
    }
    c->user_ret =
        c->fn(c->opaque, action, sbm->name, 1ull << sbm->granularity_bits);
    if (c->user_ret) {
        qbm_err(ECANCELED, "stopped by the callback");
        return 1;
    }
    return 0;
}

static int copy_bitmaps(struct copy *c, const char *const *names, size_t n)
{
    const struct qcow2_bitmap *sbm;
    size_t i;
    int r = 0;

    if (names) {
        for (i = 0; i < n && r == 0; i++) {
            sbm = qcow2_bitmap_lookup(c->src, names[i]);
            if (!sbm) {
                r = qbm_err(ENOENT, "no bitmap named '%s'", names[i]);
                return qbm_err_prefix(r, "%s", c->src->filename);
            }
            r = report(c, copy_one(c, sbm), sbm);
        }
        return r;
    }
    /* Every bitmap, but an in-use one would copy bits that cannot be
     * trusted: skipped, not refused. */
    for (i = 0; i < c->src->nb_bitmaps && r == 0; i++) {
        sbm = &c->src->bitmaps[i];
        if (!qbm_impl_bitmap_consistent(c->src, i)) {
            r = report(c, QBM_COPY_SKIPPED, sbm);
        } else {
            r = report(c, copy_one(c, sbm), sbm);
        }
    }
    return r;
}

QBM_API int qbm_bitmap_copy(struct qbm_image *img, struct qbm_image *src,
                            const char *const *names, size_t n, unsigned flags,
                            qbm_copy_fn fn, void *opaque)
{
    struct copy c = { img, src, flags, fn, opaque, 0 };
    int r;

    if (!img || !src || (!names && n) || (flags & ~QBM_COPY_MASK) ||
        (flags & QBM_COPY_MERGE && flags & QBM_COPY_REPLACE)) {
        return qbm_public_ret(qbm_err(EINVAL, "invalid arguments"));
    }
    if (img == src) {
        return qbm_public_ret(qbm_err(EINVAL, "source and target are the "
                                              "same image"));
    }
    r = copy_bitmaps(&c, names, n);
    if (r < 0) {
        return -1;
    }
    return r ? c.user_ret : 0;
}
