/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * Crash-safe transactions: the order in which a commit makes things durable
 * (docs/design.md, "Crash-safe transactions"). What is allocated and how
 * refcounts change is txn-alloc.c's (which asks image-meta.c which clusters
 * hold metadata); how cluster 0 is switched is qcow2-header-write.c's.
 *
 * Nothing reaches the disk before qbm_txn_commit() except the contents of
 * clusters this transaction allocated, which nothing references yet and
 * whose refcount on disk is still 0: abandoning a transaction before the
 * commit therefore leaves the image exactly as it was (apart from bytes in
 * free clusters and possibly a longer file).
 */
#include <stdlib.h>

#include "internal.h"

struct qbm_txn {
    struct qbm_image *img;
    struct qbm_alloc *alloc; /* the refcounts as they will be */
};

void qbm_txn_abort(struct qbm_txn *t)
{
    if (!t) {
        return;
    }
    qbm_alloc_free(t->alloc);
    free(t);
}

int qbm_txn_begin(struct qbm_image *img, struct qbm_txn **ret)
{
    struct qbm_txn *t;
    int r;

    if (!img->rdwr) {
        return qbm_err(EROFS, "image not opened for writing");
    }
    t = qbm_calloc(1, sizeof(*t));
    if (!t) {
        return -ENOMEM;
    }
    t->img = img;
    r = qbm_alloc_new(img, &t->alloc);
    if (r < 0) {
        qbm_txn_abort(t);
        return r;
    }
    *ret = t;
    return 0;
}

int qbm_txn_alloc(struct qbm_txn *t, uint64_t n, uint64_t *ret_offset)
{
    return qbm_alloc_clusters(t->alloc, n, ret_offset);
}

int qbm_txn_share(struct qbm_txn *t, uint64_t off, bool *ret_shared)
{
    return qbm_alloc_share(t->alloc, off, ret_shared);
}

int qbm_txn_write(struct qbm_txn *t, const void *buf, size_t len, uint64_t off)
{
    int r = qbm_alloc_check_owned(t->alloc, off, len);

    return r ? r : qbm_io_pwrite(t->img->io, buf, len, off);
}

int qbm_txn_copy(struct qbm_txn *t, struct qbm_io *src, uint64_t src_off,
                 size_t len, uint64_t off)
{
    int r = qbm_alloc_check_owned(t->alloc, off, len);

    return r ? r : qbm_io_copy(src, src_off, t->img->io, off, len);
}

int qbm_txn_release_later(struct qbm_txn *t, uint64_t off, uint64_t len,
                          uint64_t refs)
{
    return qbm_alloc_release_later(t->alloc, off, len, refs);
}

int qbm_txn_free_later(struct qbm_txn *t, uint64_t off, uint64_t len)
{
    return off ? qbm_txn_release_later(t, off, len, 1) : 0;
}

int qbm_txn_refcount(struct qbm_txn *t, uint64_t offset, uint64_t *ret)
{
    return qbm_alloc_refcount(t->alloc, offset, ret);
}

/* ---- commit -------------------------------------------------------------- */

/*
 * Steps 1-3 of the commit: refcount increments and new refcount
 * structures, durable before anything refers to the new clusters.
 */
static int commit_refcounts(struct qbm_txn *t)
{
    int r = qbm_alloc_write(t->alloc);

    r = r ? r : qbm_io_flush(t->img->io);
    return r ? r : qbm_alloc_hook(t->alloc);
}

/* Step 5: only once the switch is durable, release what the old state
 * used. */
static int commit_releases(struct qbm_txn *t)
{
    int r = qbm_alloc_apply_releases(t->alloc);

    r = r ? r : qbm_alloc_write(t->alloc);
    return r ? r : qbm_io_flush(t->img->io);
}

int qbm_txn_commit_write(struct qbm_txn *t, const void *buf, size_t len,
                         uint64_t off)
{
    int r = 0;

    if (len == 0 || off + len > t->img->cluster_size ||
        !qcow2_one_sector(off, off + len)) {
        r = qbm_err(EINVAL, "internal: switch write is not atomic");
    }
    r = r ? r : commit_refcounts(t);
    r = r ? r : qcow2_header_write(t->img->io, buf, len, off);
    r = r ? r : commit_releases(t);
    qbm_txn_abort(t);
    return r;
}

int qbm_txn_commit(struct qbm_txn *t, uint32_t nb_bitmaps, uint64_t dir_offset,
                   uint64_t dir_size)
{
    struct qcow2_header_layout lay = { 0 };
    bool keep = nb_bitmaps == QBM_TXN_KEEP_HEADER;
    int r = 0;

    if (!keep) {
        r = qcow2_header_layout_read(t->img, QCOW2_EXT_BITMAPS, &lay);
        r = r ? r : qcow2_header_bitmaps_plan(t->img, &lay, nb_bitmaps);
    }
    r = r ? r : commit_refcounts(t);
    /* 4: the switch. */
    if (!keep) {
        r = r ? r
              : qcow2_header_bitmaps_switch(t->img, &lay, nb_bitmaps,
                                            dir_offset, dir_size);
    }
    r = r ? r : commit_releases(t);
    free(lay.c0);
    qbm_txn_abort(t);
    return r;
}
