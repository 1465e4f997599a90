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
 * commit therefore leaves the image as it was, apart from bytes in free
 * clusters (a longer file is cut back). A commit that fails before its
 * switch gives the refcounts it wrote back (qbm_alloc_rollback) first.
 * qbm_txn_prepare() tells, before anything is written, what the
 * transaction needs and whether the image (a block device) can hold it.
 */
#include <stdio.h>
#include <stdlib.h>

#include "internal.h"

struct qbm_txn {
    struct qbm_image *img;
    struct qbm_alloc *alloc; /* the refcounts as they will be */
    uint64_t old_size;       /* the file's size before */
    bool wrote;              /* into new clusters (or reserved them) */
    bool refcounts;          /* the commit began writing refcounts */
    bool switched;           /* the commit reached its switch */
};

/*
 * A transaction abandoned before its switch leaves the old state: the
 * refcounts it changed are written back, and the file is cut back to its
 * old size, so that no cluster it wrote stays past the old end. Best
 * effort (the disk may be failing): the caller's error stays the one
 * reported.
 */
static void undo(struct qbm_txn *t)
{
    char msg[1024];
    int err = qbm_err_errno();
    uint64_t size;

    snprintf(msg, sizeof(msg), "%s", qbm_err_message());
    if (t->refcounts && qbm_alloc_rollback(t->alloc) < 0) {
        goto out; /* refcounts may point past the old end: keep it */
    }
    if (qbm_io_size(t->img->io, &size) == 0 && size > t->old_size &&
        qbm_io_truncate(t->img->io, t->old_size) == 0) {
        qbm_io_flush(t->img->io);
    }
out:
    qbm_err_set(err, "%s", msg);
}

/* A commit that failed at or after its switch: say what state it left. */
static int failed_after_switch(struct qbm_txn *t, int r, bool switch_done)
{
    t->img->changed = true;
    if (switch_done) {
        return qbm_err_prefix(r, "the edit is in place, but freeing the "
                                 "clusters it replaced failed (they are "
                                 "leaked: qbm check --repair frees them)");
    }
    return qbm_err_prefix(r, "the switch to the new state failed: the "
                             "image holds the old or the new state (check "
                             "it with qbm check)");
}

void qbm_txn_abort(struct qbm_txn *t)
{
    if (!t) {
        return;
    }
    if ((t->wrote || t->refcounts) && !t->switched) {
        undo(t);
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
    r = qbm_io_size(img->io, &t->old_size);
    r = r ? r : qbm_alloc_new(img, &t->alloc);
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

int qbm_txn_alloc_run(struct qbm_txn *t, uint64_t n, uint64_t *ret_offset,
                      uint64_t *ret_n)
{
    return qbm_alloc_run(t->alloc, n, ret_offset, ret_n);
}

int qbm_txn_share(struct qbm_txn *t, uint64_t off, bool *ret_shared)
{
    return qbm_alloc_share(t->alloc, off, ret_shared);
}

int qbm_txn_write(struct qbm_txn *t, const void *buf, size_t len, uint64_t off)
{
    int r = qbm_alloc_check_owned(t->alloc, off, len);

    t->wrote = true;
    return r ? r : qbm_io_pwrite(t->img->io, buf, len, off);
}

int qbm_txn_writev(struct qbm_txn *t, const struct iovec *iov, int iovcnt,
                   uint64_t off)
{
    size_t len = 0;
    int i, r;

    for (i = 0; i < iovcnt; i++) {
        len += iov[i].iov_len;
    }
    r = qbm_alloc_check_owned(t->alloc, off, len);
    t->wrote = true;
    return r ? r : qbm_io_pwritev(t->img->io, iov, iovcnt, off);
}

int qbm_txn_copy(struct qbm_txn *t, struct qbm_io *src, uint64_t src_off,
                 size_t len, uint64_t off)
{
    int r = qbm_alloc_check_owned(t->alloc, off, len);

    t->wrote = true;
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

void qbm_txn_space(struct qbm_txn *t, struct qbm_space *ret)
{
    qbm_alloc_space(t->alloc, ret);
}

int qbm_txn_check_capacity(const struct qbm_image *img,
                           const struct qbm_space *sp)
{
    uint64_t cap = img->io->capacity;

    if (cap && sp->end_after > cap) {
        return qbm_err(ENOSPC,
                       "not enough space on %s: the edit needs %llu bytes "
                       "past the image end %llu; the device has %llu",
                       img->filename ? img->filename : "the device",
                       (unsigned long long)(sp->end_after - sp->end_before),
                       (unsigned long long)sp->end_before,
                       (unsigned long long)cap);
    }
    return 0;
}

int qbm_txn_prepare(struct qbm_txn *t, uint32_t nb_bitmaps, bool dry,
                    struct qbm_space *ret)
{
    struct qbm_image *img = t->img;
    struct qbm_space sp;
    int r;

    if (nb_bitmaps != QBM_TXN_KEEP_HEADER) {
        /* What the commit checks before its first write, checked now so
         * that a dry run refuses what the commit would. */
        struct qcow2_header_layout lay = { 0 };

        r = qcow2_header_layout_read(img, QCOW2_EXT_BITMAPS, &lay);
        r = r ? r : qcow2_header_bitmaps_plan(img, &lay, nb_bitmaps);
        free(lay.c0);
        if (r < 0) {
            return r;
        }
    }
    qbm_alloc_space(t->alloc, &sp);
    if (ret) {
        *ret = sp;
    }
    if (dry) {
        return 0; /* the caller checks the capacity, figures in hand */
    }
    r = qbm_txn_check_capacity(img, &sp);
    if (r < 0) {
        return r;
    }
    t->wrote = true; /* the file may grow from here */
    r = qbm_alloc_reserve(t->alloc);
    if (r < 0) {
        return qbm_err_prefix(
            r,
            "not enough space for %s: the edit needs %llu bytes (%llu "
            "past the image end %llu)",
            img->filename ? img->filename : "the image",
            (unsigned long long)sp.bytes,
            (unsigned long long)(sp.end_after - sp.end_before),
            (unsigned long long)sp.end_before);
    }
    return 0;
}

/* ---- commit -------------------------------------------------------------- */

/*
 * Steps 1-3 of the commit: refcount increments and new refcount
 * structures, durable before anything refers to the new clusters.
 */
static int commit_refcounts(struct qbm_txn *t)
{
    int r;

    t->refcounts = true;
    r = qbm_alloc_write(t->alloc);

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
    if (r == 0) {
        t->switched = true;
        r = qcow2_header_write(t->img->io, buf, len, off);
        if (r == 0) {
            r = commit_releases(t);
            r = r ? failed_after_switch(t, r, true) : 0;
        } else {
            r = failed_after_switch(t, r, false);
        }
    }
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
    /* 4: the switch (a failure from here on may have made it). */
    t->switched = r == 0;
    if (t->switched && !keep) {
        r = qcow2_header_bitmaps_switch(t->img, &lay, nb_bitmaps, dir_offset,
                                        dir_size);
        r = r ? failed_after_switch(t, r, false) : 0;
    }
    if (t->switched && r == 0) {
        r = commit_releases(t);
        r = r ? failed_after_switch(t, r, true) : 0;
    }
    free(lay.c0);
    qbm_txn_abort(t);
    return r;
}
