/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * Carrying bitmaps over an external snapshot taken without bitmap
 * handling (qemu-img create -b BASE TOP, or a snapshot by a tool that
 * does not know about bitmaps): BASE's checkpoints stop at the snapshot,
 * and writes to TOP are recorded nowhere. As libvirt's external snapshots
 * do (qemuSnapshotDiskBitmapsPropagate), each enabled, consistent bitmap of
 * BASE is continued in TOP and BASE's copy is left recording; TOP's copy
 * is marked with every cluster TOP already holds (a superset of the writes
 * since the snapshot), so that the checkpoint spans the chain and QEMU
 * keeps recording in TOP. On request BASE's copies are then disabled, the
 * older model of a tool that reads the union itself (libvirt rejects a
 * chain with a disabled copy).
 */
#include <stdio.h>
#include <stdlib.h>
#include <sys/stat.h>

#include "internal.h"

struct snap {
    const char *base_name, *top_name;
    unsigned flags;
    struct qbm_image *base, *top;
    char **carried; /* names of the bitmaps continued in TOP */
    size_t ncarried;
    qbm_carry_snapshot_fn fn;
    void *opaque;
    int user_ret; /* the callback's value that stopped the call */
    /* A dry run's figures: TOP's commit, then BASE's. */
    struct qbm_space_info space[2];
    /* A dry run: the images whose device is too small, and why. */
    bool nospace[2];
    char nospace_msg[2][1024];
};

enum { SNAP_TOP, SNAP_BASE };

/* Tell the caller; 1 when it says stop (its value kept in user_ret). */
static int report(struct snap *s, int action, const char *bitmap,
                  const char *image)
{
    if (!s->fn) {
        return 0;
    }
    s->user_ret = s->fn(s->opaque, action, bitmap, image);
    if (s->user_ret) {
        qbm_err(ECANCELED, "stopped by the callback");
        return 1;
    }
    return 0;
}

/* Commit `img` (named `file`); a dry run only runs the commit's checks
 * and placement, its figures kept in s->space[which]. Then report
 * `done`. A dry run whose only refusal is a device too small goes on
 * (nothing reported): the manager learns what each image needs at
 * once. */
static int finish(struct snap *s, struct qbm_image *img, const char *file,
                  int which, int done)
{
    struct qbm_space sp;
    int r;

    if (s->flags & QBM_CARRY_SNAPSHOT_DRY_RUN) {
        r = qbm_impl_commit_space(img, &sp);
        if (r == 0) {
            s->space[which] = (struct qbm_space_info){
                .bytes = sp.bytes,
                .end_before = sp.end_before,
                .end_after = sp.end_after,
                .capacity = img->io->capacity,
            };
            if (qbm_txn_check_capacity(img, &sp) < 0) {
                s->nospace[which] = true;
                snprintf(s->nospace_msg[which], sizeof(s->nospace_msg[0]),
                         "%s: %s", file, qbm_err_message());
                return 0;
            }
        }
    } else {
        r = qbm_impl_commit(img);
    }
    if (r < 0) {
        char msg[1024];

        snprintf(msg, sizeof(msg), "%s", qbm_err_message());
        return qbm_err(-r, "%s: %s; the image was not changed", file, msg);
    }
    return report(s, done, NULL, file);
}

static bool same_inode(const char *a, const char *b)
{
    struct stat sa, sb;

    return stat(a, &sa) == 0 && stat(b, &sb) == 0 && sa.st_dev == sb.st_dev &&
           sa.st_ino == sb.st_ino;
}

/* TOP must be a snapshot of BASE: its backing file is BASE's file. */
static int check_backing(struct snap *s)
{
    char *backing = NULL;
    bool same;
    int r;

    r = qbm_impl_image_backing_path(s->top, &backing);
    if (r == -ENOMEM) {
        return r;
    }
    if (r < 0) {
        backing = NULL; /* none, or one qbm cannot name: not BASE */
    }
    same = backing && same_inode(backing, s->base_name);
    if (!same) {
        qbm_err(EINVAL, "%s: its backing file is %s, not %s", s->top_name,
                backing ? backing : "(none)", s->base_name);
    }
    free(backing);
    return same ? 0 : -EINVAL;
}

/* Stage in TOP every enabled, consistent bitmap of BASE, marked with TOP's
 * clusters. */
static int continue_in_top(struct snap *s)
{
    uint32_t i;
    int r;

    s->carried = qbm_calloc(s->base->nb_bitmaps + 1, sizeof(*s->carried));
    if (!s->carried) {
        return -ENOMEM;
    }
    for (i = 0; i < s->base->nb_bitmaps; i++) {
        const struct qcow2_bitmap *bm = &s->base->bitmaps[i];
        const struct qcow2_bitmap *own;
        const char *in_use;
        bool added = false;

        if (!(bm->flags & BME_FLAG_AUTO)) {
            r = report(s, QBM_CARRY_SNAPSHOT_SKIPPED, bm->name, s->base_name);
            if (r) {
                return r;
            }
            continue;
        }
        /* In use, here or in TOP's copy: its bits are not known, so it
         * is skipped (as libvirt does) and the rest carried. */
        own = qcow2_bitmap_lookup(s->top, bm->name);
        in_use = NULL;
        if (!qbm_impl_bitmap_consistent(s->base, i)) {
            in_use = s->base_name;
        } else if (own && (own->flags & BME_FLAG_IN_USE)) {
            in_use = s->top_name;
        }
        if (in_use) {
            r = report(s, QBM_CARRY_SNAPSHOT_IN_USE, bm->name, in_use);
            if (r) {
                return r;
            }
            continue;
        }
        r = 0;
        if (!own) {
            r = qbm_impl_bitmap_add(s->top, bm->name,
                                    1ull << bm->granularity_bits, 0);
            added = true;
        }
        r = r ? r : qbm_impl_bitmap_populate(s->top, bm->name, s->top);
        if (r < 0) {
            return qbm_err_prefix(r, "%s", s->top_name);
        }
        s->carried[s->ncarried] = qbm_strndup(bm->name, strlen(bm->name));
        if (!s->carried[s->ncarried]) {
            return -ENOMEM;
        }
        s->ncarried++;
        r = report(s,
                   added ? QBM_CARRY_SNAPSHOT_ADDED : QBM_CARRY_SNAPSHOT_MARKED,
                   bm->name, s->top_name);
        if (r) {
            return r;
        }
    }
    return 0;
}

/* Disable in BASE the bitmaps TOP now continues. */
static int disable_in_base(struct snap *s)
{
    size_t i;
    int r;

    for (i = 0; i < s->ncarried; i++) {
        r = qbm_impl_bitmap_disable(s->base, s->carried[i]);
        if (r < 0) {
            return qbm_err_prefix(r, "%s", s->base_name);
        }
        r = report(s, QBM_CARRY_SNAPSHOT_DISABLED, s->carried[i], s->base_name);
        if (r) {
            return r;
        }
    }
    return finish(s, s->base, s->base_name, SNAP_BASE,
                  QBM_CARRY_SNAPSHOT_BASE_DONE);
}

static int carry_snapshot(struct snap *s)
{
    int r;

    r = qbm_impl_open(s->top_name, QBM_OPEN_RDWR, &s->top);
    if (r < 0) {
        return qbm_err_prefix(r, "%s", s->top_name);
    }
    r = check_backing(s);
    if (r < 0) {
        return r;
    }
    /* A read lock on BASE while TOP is changed: QEMU cannot write it. */
    r = qbm_impl_open(s->base_name, 0, &s->base);
    if (r < 0) {
        return qbm_err_prefix(r, "%s", s->base_name);
    }
    r = continue_in_top(s);
    r = r ? r
          : finish(s, s->top, s->top_name, SNAP_TOP,
                   QBM_CARRY_SNAPSHOT_TOP_DONE);
    qbm_impl_close(s->top);
    s->top = NULL;
    if (r || !(s->flags & QBM_CARRY_SNAPSHOT_DISABLE_BASE) ||
        s->ncarried == 0) {
        return r;
    }
    /* Only once TOP records them: a crash in between leaves both
     * recording, never neither. */
    qbm_impl_close(s->base);
    s->base = NULL;
    r = qbm_impl_open(s->base_name, QBM_OPEN_RDWR, &s->base);
    if (r < 0) {
        return qbm_err_prefix(r, "%s", s->base_name);
    }
    return disable_in_base(s);
}

/* The call; a dry run's figures in ret_space[2] (*ret_figures true) when
 * it returns 0 or fails only on a device too small. */
static int run(const char *base, const char *top, unsigned flags,
               qbm_carry_snapshot_fn fn, void *opaque,
               struct qbm_space_info *ret_space, bool *ret_figures)
{
    struct snap s = { .base_name = base,
                      .top_name = top,
                      .flags = flags,
                      .fn = fn,
                      .opaque = opaque };
    size_t i;
    int r;

    if (!base || !top || (flags & ~QBM_CARRY_SNAPSHOT_MASK)) {
        return qbm_public_ret(qbm_err(EINVAL, "invalid arguments"));
    }
    r = carry_snapshot(&s);
    qbm_impl_close(s.top);
    qbm_impl_close(s.base);
    for (i = 0; i < s.ncarried; i++) {
        free(s.carried[i]);
    }
    free(s.carried);
    if (r < 0) {
        return -1;
    }
    if (r) {
        return s.user_ret;
    }
    if (ret_space) {
        memcpy(ret_space, s.space, sizeof(s.space));
        *ret_figures = true;
    }
    if (s.nospace[SNAP_TOP] || s.nospace[SNAP_BASE]) {
        bool both = s.nospace[SNAP_TOP] && s.nospace[SNAP_BASE];

        qbm_err_set(ENOSPC, "%s%s%s; %s not changed", s.nospace_msg[SNAP_TOP],
                    both ? "; " : "", s.nospace_msg[SNAP_BASE],
                    both ? "the images were" : "the image was");
        return -1;
    }
    return 0;
}

QBM_API int qbm_carry_snapshot(const char *base, const char *top,
                               unsigned flags, qbm_carry_snapshot_fn fn,
                               void *opaque)
{
    return run(base, top, flags, fn, opaque, NULL, NULL);
}

QBM_API int qbm_carry_snapshot_plan(const char *base, const char *top,
                                    unsigned flags, qbm_carry_snapshot_fn fn,
                                    void *opaque,
                                    struct qbm_space_info *ret_top,
                                    struct qbm_space_info *ret_base)
{
    struct qbm_space_info space[2];
    bool figures = false;
    int r;

    if (!ret_top || !ret_base) {
        return qbm_public_ret(qbm_err(EINVAL, "invalid arguments"));
    }
    r = run(base, top, flags | QBM_CARRY_SNAPSHOT_DRY_RUN, fn, opaque, space,
            &figures);
    if (figures) {
        *ret_top = space[SNAP_TOP];
        *ret_base = space[SNAP_BASE];
    }
    return r;
}
