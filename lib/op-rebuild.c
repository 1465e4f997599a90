/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * Comparing a disk with what its backups restore to: rebuild a lost or
 * inconsistent bitmap from the differences (rebuild), or report them
 * (verify).
 *
 * Each side is resolved into one map (chain-resolve.c): the disk through
 * its backing chain, the backups as restore reads them (op-restore.c).
 * The two maps are walked together in guest order. A range that reads as
 * zeros on both sides (unallocated or zero flags) is equal without being
 * read; where one side only holds data, that data is compared with zeros;
 * where both do, both are read. So each side's data is read once, in
 * blocks of BLOCK bytes, while the kernel reads ahead of it (READAHEAD
 * bytes of each side's data, which may lie anywhere in its file).
 * Differences come out in guest order, as runs of granules, so memory
 * follows the maps and the bitmap, never the virtual size.
 */
#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>

#include "internal.h"

#define BLOCK (1u << 20)
#define READAHEAD (64ull << 20)
/* The kernel reads at most about its readahead window per request. */
#define PREFETCH_PIECE (4ull << 20)
/* verify reports differences in sectors. */
#define VERIFY_GRANULARITY 512

/* One side of the comparison: its layers, resolved. */
struct side {
    struct qbm_image **layers;
    struct qcow2_map_extent *map;
    size_t n;
    size_t cur;     /* first extent not wholly before the position */
    size_t ra;      /* first extent not wholly prefetched */
    uint64_t ra_to; /* guest offset prefetched up to */
    uint8_t *buf;
};

/* Called for each run of differing granules, in increasing order: 0 to
 * go on, a positive value to stop, or -errno. */
typedef int (*diff_fn)(void *opaque, uint64_t off, uint64_t len);

struct diff {
    struct side s[2];
    uint64_t size, gran;
    uint64_t run_start, run_end; /* pending run; run_end 0: none */
    diff_fn fn;
    void *opaque;
    const uint8_t *zeros;
    struct qbm_progress *progress;
    uint64_t done, total;
};

/* The data extent of side s at pos, or NULL where it reads as zeros
 * (unallocated or zero flags); *ret_end: where that ends. */
static const struct qcow2_map_extent *at(struct side *s, uint64_t pos,
                                         uint64_t size, uint64_t *ret_end)
{
    const struct qcow2_map_extent *e;

    while (s->cur < s->n && s->map[s->cur].guest + s->map[s->cur].len <= pos) {
        s->cur++;
    }
    if (s->cur == s->n) {
        *ret_end = size;
        return NULL;
    }
    e = &s->map[s->cur];
    if (e->guest > pos) {
        *ret_end = e->guest;
        return NULL;
    }
    *ret_end = e->guest + e->len;
    return e->type == QCOW2_MAP_ZERO ? NULL : e;
}

/* Ask the kernel to read side s's data up to READAHEAD past pos. */
static void prefetch(struct side *s, uint64_t pos)
{
    uint64_t limit = pos + READAHEAD;

    if (s->ra_to >= pos + READAHEAD / 2) {
        return;
    }
    if (s->ra_to < pos) {
        s->ra_to = pos;
    }
    while (s->ra < s->n && s->map[s->ra].guest < limit) {
        const struct qcow2_map_extent *e = &s->map[s->ra];
        uint64_t from = e->guest > s->ra_to ? e->guest : s->ra_to;
        uint64_t end = e->guest + e->len;
        uint64_t to = end < limit ? end : limit;

        while (from < to) {
            uint64_t n =
                to - from < PREFETCH_PIECE ? to - from : PREFETCH_PIECE;

            qbm_map_prefetch(s->layers, e, from, n);
            from += n;
        }
        if (end > limit) {
            break;
        }
        s->ra++;
    }
    s->ra_to = limit;
}

static int flush_run(struct diff *d)
{
    uint64_t end = d->run_end < d->size ? d->run_end : d->size;
    int r = 0;

    if (d->run_end) {
        r = d->fn(d->opaque, d->run_start, end - d->run_start);
        d->run_end = 0;
    }
    return r;
}

/* Granule [s, e) differs. */
static int mark(struct diff *d, uint64_t s, uint64_t e)
{
    int r;

    if (d->run_end && s <= d->run_end) {
        if (e > d->run_end) {
            d->run_end = e;
        }
        return 0;
    }
    r = flush_run(d);
    d->run_start = s;
    d->run_end = e;
    return r;
}

/* Compare `len` bytes at guest offset pos, granule by granule. */
static int compare(struct diff *d, uint64_t pos, const uint8_t *a,
                   const uint8_t *b, size_t len)
{
    size_t off = 0;
    int r;

    if (memcmp(a, b, len) == 0) {
        return 0;
    }
    while (off < len) {
        uint64_t g = pos + off;
        uint64_t gs = g - g % d->gran;
        size_t n = gs + d->gran - g < len - off ? (size_t)(gs + d->gran - g)
                                                : len - off;

        /* A granule found already needs no second look. */
        if (d->run_end <= g && memcmp(a + off, b + off, n) != 0) {
            r = mark(d, gs, gs + d->gran);
            if (r) {
                return r;
            }
        }
        off += n;
    }
    return 0;
}

/*
 * Walk both maps. With `count`, only add up the bytes to read (for
 * progress). Returns 0, -errno, or the positive value that stopped fn.
 */
static int walk(struct diff *d, bool count)
{
    uint64_t pos = 0;
    int r = 0, i;

    for (i = 0; i < 2; i++) {
        d->s[i].cur = 0;
    }
    while (pos < d->size && r == 0) {
        const struct qcow2_map_extent *e[2];
        uint64_t end[2], stop;

        e[0] = at(&d->s[0], pos, d->size, &end[0]);
        e[1] = at(&d->s[1], pos, d->size, &end[1]);
        stop = end[0] < end[1] ? end[0] : end[1];
        if (!e[0] && !e[1]) {
            pos = stop; /* zeros on both sides: equal, nothing read */
            continue;
        }
        if (count) {
            d->total += (stop - pos) * (uint64_t)(!!e[0] + !!e[1]);
            pos = stop;
            continue;
        }
        while (pos < stop && r == 0) {
            size_t len = stop - pos < BLOCK ? (size_t)(stop - pos) : BLOCK;
            const uint8_t *p[2];

            for (i = 0; i < 2 && r == 0; i++) {
                p[i] = d->zeros;
                if (e[i]) {
                    prefetch(&d->s[i], pos);
                    r = qbm_map_read(d->s[i].layers, e[i], pos, len,
                                     d->s[i].buf);
                    p[i] = d->s[i].buf;
                    d->done += len;
                }
            }
            r = r ? r : compare(d, pos, p[0], p[1], len);
            if (r == 0) {
                r = qbm_progress_report(d->progress, d->done, d->total);
            }
            pos += len;
        }
    }
    return r ? r : flush_run(d);
}

QBM_DARRAY(map_vec, struct qcow2_map_extent);

/*
 * A raw layer is one data extent (qcow2_map_walk); keep only the parts
 * its file holds (SEEK_DATA), since a hole reads as zeros: a sparse raw
 * full backup is then read where it has data, as a qcow2 one.
 */
static int sparse_raw(struct qbm_image **layers, struct qcow2_map_extent **map,
                      size_t *n)
{
    struct map_vec out = { 0 };
    size_t i;
    int r = 0;

    for (i = 0; i < *n && r == 0; i++) {
        struct qcow2_map_extent e = (*map)[i];
        int fd = qbm_io_fd(layers[e.layer]->io);
        uint64_t end = e.host + e.len, pos = e.host;

        if (!layers[e.layer]->raw || e.type != QCOW2_MAP_DATA || fd < 0) {
            r = qbm_darray_push(&out, e, 0);
            continue;
        }
        while (pos < end && r == 0) {
            off_t d = lseek(fd, (off_t)pos, SEEK_DATA), h;
            struct qcow2_map_extent p = e;

            if (d < 0 && errno == ENXIO) {
                break; /* a hole up to the end of the file */
            }
            if (d < 0) {
                /* No SEEK_DATA here: all of it is data. */
                p.guest = e.guest + (pos - e.host);
                p.host = pos;
                p.len = end - pos;
                r = qbm_darray_push(&out, p, 0);
                break;
            }
            if ((uint64_t)d >= end) {
                break;
            }
            h = lseek(fd, d, SEEK_HOLE);
            if (h < 0 || (uint64_t)h > end) {
                h = (off_t)end;
            }
            p.guest = e.guest + ((uint64_t)d - e.host);
            p.host = (uint64_t)d;
            p.len = (uint64_t)h - (uint64_t)d;
            r = qbm_darray_push(&out, p, 0);
            pos = (uint64_t)h;
        }
    }
    if (r < 0) {
        qbm_darray_free(&out);
        return r;
    }
    free(*map);
    *map = out.v;
    *n = out.n;
    return 0;
}

/*
 * Compare the disk `disk[0..nd)` (a backing chain, top first) with the
 * backups `bk[0..nb)` (newest first) in granules of `gran` bytes: fn gets
 * each run of granules that differ, in increasing order.
 */
static int diff_run(struct qbm_image **disk, size_t nd, struct qbm_image **bk,
                    size_t nb, uint64_t gran, diff_fn fn, void *opaque,
                    struct qbm_progress *progress)
{
    struct diff d = {
        .gran = gran, .fn = fn, .opaque = opaque, .progress = progress
    };
    bool counting = progress && progress->fn;
    uint8_t *zeros = NULL;
    int r, i;

    d.size = disk[0]->hdr.size;
    d.s[0].layers = disk;
    d.s[1].layers = bk;
    r = qbm_resolve(disk, nd, d.size, &d.s[0].map, &d.s[0].n);
    r = r ? r : qbm_resolve(bk, nb, d.size, &d.s[1].map, &d.s[1].n);
    r = r ? r : sparse_raw(disk, &d.s[0].map, &d.s[0].n);
    r = r ? r : sparse_raw(bk, &d.s[1].map, &d.s[1].n);
    if (r == 0) {
        /* calloc maps untouched zero pages: reading them stays in cache. */
        zeros = qbm_calloc(1, BLOCK);
        d.s[0].buf = qbm_malloc(BLOCK);
        d.s[1].buf = qbm_malloc(BLOCK);
        r = zeros && d.s[0].buf && d.s[1].buf ? 0 : -ENOMEM;
    }
    d.zeros = zeros;
    if (r == 0 && counting) {
        r = walk(&d, true);
    }
    r = r ? r : walk(&d, false);
    if (r == 0 && counting) {
        r = qbm_progress_report(progress, d.total, d.total);
    }
    for (i = 0; i < 2; i++) {
        free(d.s[i].map);
        free(d.s[i].buf);
    }
    free(zeros);
    return r;
}

static int same_size(struct qbm_image *img, struct qbm_image **bk, size_t nb)
{
    uint64_t a = img->hdr.size, b = bk[nb - 1]->hdr.size;

    if (a != b) {
        return qbm_err_prefix(qbm_err(EINVAL,
                                      "virtual size %llu differs from the "
                                      "backups' %llu",
                                      (unsigned long long)a,
                                      (unsigned long long)b),
                              "%s", img->filename);
    }
    return 0;
}

/* ---- rebuild ------------------------------------------------------------ */

struct rebuild_ctx {
    struct qbm_image *img;
    const char *name;
    uint64_t dirty;
};

static int rebuild_cb(void *opaque, uint64_t off, uint64_t len)
{
    struct rebuild_ctx *c = opaque;

    c->dirty += len;
    return qbm_impl_bitmap_set_dirty(c->img, c->name, off, len);
}

int qbm_rebuild_stage(struct qbm_image **disk, size_t nd, struct qbm_image **bk,
                      size_t nb, const char *name, uint64_t granularity,
                      struct qbm_progress *progress, uint64_t *ret_dirty)
{
    struct qbm_image *img = disk[0];
    const struct qcow2_bitmap *bm = qcow2_bitmap_lookup(img, name);
    struct rebuild_ctx c = { img, name, 0 };
    int r;

    r = same_size(img, bk, nb);
    if (r < 0) {
        return r;
    }
    if (bm && granularity == 0) {
        granularity = 1ull << bm->granularity_bits;
    }
    /* Staged before anything is read, so that a granularity the rules
     * refuse, or an image that cannot take edits, fails at once. */
    if (bm) {
        r = qbm_impl_bitmap_remove(img, name);
    }
    r = r ? r : qbm_impl_bitmap_add(img, name, granularity, 0);
    if (r < 0) {
        return qbm_err_prefix(r, "%s", img->filename);
    }
    bm = qcow2_bitmap_lookup(img, name);
    r = diff_run(disk, nd, bk, nb, 1ull << bm->granularity_bits, rebuild_cb, &c,
                 progress);
    if (r < 0) {
        return r;
    }
    *ret_dirty = c.dirty;
    return 0;
}

/* IMAGE may be in no backup's place. */
static int not_a_backup(const char *image, const char *const *backups, size_t n)
{
    struct stat a, b;
    size_t i;

    if (stat(image, &a) < 0) {
        return 0; /* the open reports it */
    }
    for (i = 0; i < n; i++) {
        if (stat(backups[i], &b) == 0 && a.st_dev == b.st_dev &&
            a.st_ino == b.st_ino) {
            return qbm_err_prefix(qbm_err(EINVAL,
                                          "the image is also given as a "
                                          "backup (%s)",
                                          backups[i]),
                                  "%s", image);
        }
    }
    return 0;
}

static int rebuild(const char *image, const char *name, uint64_t granularity,
                   const char *const *backups, size_t n, unsigned flags,
                   struct qbm_progress *progress, uint64_t *ret_dirty)
{
    struct qbm_chain *ch = NULL;
    struct qbm_image **bk = NULL;
    uint64_t size, dirty = 0;
    int r;

    r = not_a_backup(image, backups, n);
    if (r < 0) {
        return r;
    }
    /* The image first: a running VM's lock is the likeliest refusal. */
    r = qbm_impl_chain_open(image, QBM_OPEN_RDWR, &ch);
    if (r < 0) {
        return qbm_err_prefix(r, "%s", image);
    }
    r = qbm_backups_open(backups, n, false, &bk, &size);
    r = r ? r
          : qbm_rebuild_stage(ch->layers, ch->n, bk, n, name, granularity,
                              progress, &dirty);
    if (r == 0 && !(flags & QBM_REBUILD_DRY_RUN)) {
        r = qbm_impl_commit(ch->layers[0]);
        if (r < 0) {
            r = qbm_err_prefix(r, "%s", image);
        }
    }
    if (r == 0 && ret_dirty) {
        *ret_dirty = dirty;
    }
    qbm_backups_close(bk, n);
    qbm_impl_chain_close(ch);
    return r;
}

QBM_API int qbm_rebuild(const char *image, const char *name,
                        uint64_t granularity, const char *const *backups,
                        size_t n, unsigned flags, qbm_progress_fn progress,
                        void *opaque, uint64_t *ret_dirty_bytes)
{
    struct qbm_progress p = { progress, opaque, 0 };

    if (!image || !name || !backups || (flags & ~QBM_REBUILD_MASK)) {
        return qbm_public_ret(qbm_err(EINVAL, "invalid arguments"));
    }
    return qbm_progress_ret(&p, rebuild(image, name, granularity, backups, n,
                                        flags, &p, ret_dirty_bytes));
}

/* ---- verify ------------------------------------------------------------- */

/* A run of guest bytes [start, end). */
struct run {
    uint64_t start, end;
};
QBM_DARRAY(runs, struct run);

struct verify_ctx {
    struct runs dirty; /* what the bitmap marks (with --bitmap) */
    bool filter;
    size_t j;
    struct qbm_extent_wrap *w;
};

static int dirty_cb(void *opaque, uint64_t off, uint64_t len)
{
    struct runs *v = opaque;
    struct run x = { off, off + len };

    return qbm_darray_push(v, x, 0);
}

static int verify_emit(struct verify_ctx *c, uint64_t s, uint64_t e)
{
    return s < e ? qbm_extent_wrap_cb(c->w, s, e - s) : 0;
}

/* Report [off, off + len), less what the bitmap marks dirty. */
static int verify_cb(void *opaque, uint64_t off, uint64_t len)
{
    struct verify_ctx *c = opaque;
    uint64_t s = off, e = off + len;
    int r;

    if (!c->filter) {
        return verify_emit(c, s, e);
    }
    while (c->j < c->dirty.n && c->dirty.v[c->j].end <= s) {
        c->j++;
    }
    for (size_t k = c->j; k < c->dirty.n && c->dirty.v[k].start < e; k++) {
        r = verify_emit(c, s, c->dirty.v[k].start);
        if (r) {
            return r;
        }
        if (c->dirty.v[k].end >= e) {
            return 0;
        }
        s = c->dirty.v[k].end > s ? c->dirty.v[k].end : s;
    }
    return verify_emit(c, s, e);
}

static int verify(const char *image, const char *const *backups, size_t n,
                  const char *bitmap, unsigned flags, struct qbm_extent_wrap *w,
                  struct qbm_progress *progress)
{
    struct verify_ctx c = { .filter = bitmap != NULL, .w = w };
    struct qbm_chain *ch = NULL;
    struct qbm_image **bk = NULL;
    uint64_t size;
    int r;

    r = not_a_backup(image, backups, n);
    if (r < 0) {
        return r;
    }
    r = qbm_impl_chain_open(
        image,
        QBM_OPEN_ANY_FORMAT |
            ((flags & QBM_VERIFY_FORCE_SHARE) ? QBM_OPEN_FORCE_SHARE : 0),
        &ch);
    if (r < 0) {
        return qbm_err_prefix(r, "%s", image);
    }
    if (bitmap) {
        struct qbm_image *top = ch->layers[0];
        int idx = qbm_impl_bitmap_find(top, bitmap);

        r = idx;
        if (idx >= 0 && !qbm_impl_bitmap_consistent(top, (size_t)idx)) {
            r = qbm_err(EBUSY,
                        "bitmap '%s' is in use (inconsistent); rebuild "
                        "it with 'qbm rebuild'",
                        bitmap);
        }
        r = r < 0
                ? r
                : qbm_impl_bitmap_extents(top, (size_t)idx, dirty_cb, &c.dirty);
        if (r < 0) {
            r = qbm_err_prefix(r, "%s", image);
        }
    }
    r = r ? r
          : qbm_backups_open(backups, n, flags & QBM_VERIFY_FORCE_SHARE, &bk,
                             &size);
    r = r ? r : same_size(ch->layers[0], bk, n);
    r = r ? r
          : diff_run(ch->layers, ch->n, bk, n, VERIFY_GRANULARITY, verify_cb,
                     &c, progress);
    qbm_darray_free(&c.dirty);
    qbm_backups_close(bk, n);
    qbm_impl_chain_close(ch);
    return r;
}

QBM_API int qbm_verify(const char *image, const char *const *backups, size_t n,
                       const char *bitmap, unsigned flags, qbm_extent_fn fn,
                       void *opaque, qbm_progress_fn progress,
                       void *progress_opaque)
{
    struct qbm_extent_wrap w = { fn, opaque, 0 };
    struct qbm_progress p = { progress, progress_opaque, 0 };
    int r;

    if (!image || !backups || !fn || (flags & ~QBM_VERIFY_MASK)) {
        return qbm_public_ret(qbm_err(EINVAL, "invalid arguments"));
    }
    r = verify(image, backups, n, bitmap, flags, &w, &p);
    /* Stopped by either callback: that one's value. */
    return p.user_ret ? qbm_progress_ret(&p, r)
                      : qbm_public_ret_cb(r, w.user_ret);
}
