/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* Public bitmap queries: listing, dirty-byte counts and extents. */
#include <stdlib.h>

#include "internal.h"

QBM_API size_t qbm_bitmap_count(const struct qbm_image *img)
{
    return img->nb_bitmaps;
}

struct qcow2_bitmap *qcow2_bitmap_lookup(const struct qbm_image *img,
                                         const char *name)
{
    uint32_t i;

    for (i = 0; i < img->nb_bitmaps; i++) {
        if (strcmp(img->bitmaps[i].name, name) == 0) {
            return &img->bitmaps[i];
        }
    }
    return NULL;
}

int qbm_impl_bitmap_find(const struct qbm_image *img, const char *name)
{
    const struct qcow2_bitmap *bm = qcow2_bitmap_lookup(img, name);

    if (!bm) {
        return qbm_err(ENOENT, "no bitmap named '%s'", name);
    }
    return (int)(bm - img->bitmaps);
}

QBM_API int qbm_bitmap_find(const struct qbm_image *img, const char *name)
{
    return qbm_public_ret(qbm_impl_bitmap_find(img, name));
}

static const struct qcow2_bitmap *get_bitmap(const struct qbm_image *img,
                                             size_t idx)
{
    return idx < img->nb_bitmaps ? &img->bitmaps[idx] : NULL;
}

QBM_API const char *qbm_bitmap_name(const struct qbm_image *img, size_t idx)
{
    const struct qcow2_bitmap *bm = get_bitmap(img, idx);

    return bm ? bm->name : NULL;
}

QBM_API uint64_t qbm_bitmap_granularity(const struct qbm_image *img, size_t idx)
{
    const struct qcow2_bitmap *bm = get_bitmap(img, idx);

    return bm ? 1ull << bm->granularity_bits : 0;
}

QBM_API unsigned qbm_bitmap_flags(const struct qbm_image *img, size_t idx)
{
    const struct qcow2_bitmap *bm = get_bitmap(img, idx);

    return bm ? bm->flags & (QBM_BITMAP_IN_USE | QBM_BITMAP_AUTO) : 0;
}

bool qbm_impl_bitmap_consistent(const struct qbm_image *img, size_t idx)
{
    const struct qcow2_bitmap *bm = get_bitmap(img, idx);

    return bm && !(bm->flags & BME_FLAG_IN_USE) &&
           img->bitmaps_state == QBM_BITMAPS_OK;
}

QBM_API int qbm_bitmap_consistent(const struct qbm_image *img, size_t idx)
{
    return qbm_impl_bitmap_consistent(img, idx);
}

static int chunk_to_extents(void *opaque, uint64_t idx, const uint8_t *data)
{
    return qbm_extent_state_chunk(opaque, idx, data);
}

/* Walk chunks [first, end) of bitmap `bm` of `img` into the extent state
 * `st`. */
static int walk_bitmap_range(struct qbm_image *img, struct qcow2_bitmap *bm,
                             uint64_t first, uint64_t end,
                             struct qbm_extent_state *st)
{
    int r;

    st->pending_off = 0;
    st->pending_len = 0;
    st->dirty_bytes = 0;
    st->granularity = 1ull << bm->granularity_bits;
    st->disk_size = img->hdr.size;
    st->chunk_bytes = img->cluster_size;
    st->bits_per_chunk = img->cluster_size * 8;
    st->nbits = div_round_up(img->hdr.size, st->granularity);
    /* A staged bitmap (an edit not yet committed) is read from its staged
     * data: its table on disk is the old one, or none for a new bitmap. */
    if (bm->data) {
        return qbm_bmap_walk_range(bm->data, first, end, st);
    }
    r = qcow2_bitmap_read_chunk_range(img, bm, first, end, chunk_to_extents,
                                      st);
    if (r) {
        return r;
    }
    return qbm_extent_state_finish(st);
}

/* Walk bitmap `bm` of `img` into the extent state `st`. */
static int walk_bitmap(struct qbm_image *img, struct qcow2_bitmap *bm,
                       struct qbm_extent_state *st)
{
    return walk_bitmap_range(img, bm, 0, UINT64_MAX, st);
}

QBM_API int qbm_bitmap_dirty_bytes(struct qbm_image *img, size_t idx,
                                   uint64_t *ret_bytes)
{
    struct qbm_extent_state st = { 0 };
    int r;

    if (idx >= img->nb_bitmaps) {
        qbm_err(EINVAL, "bitmap index %zu out of range", idx);
        return -1;
    }
    r = walk_bitmap(img, &img->bitmaps[idx], &st);
    if (r < 0) {
        return -1;
    }
    *ret_bytes = st.dirty_bytes;
    return 0;
}

int qbm_extent_wrap_cb(void *opaque, uint64_t off, uint64_t len)
{
    struct qbm_extent_wrap *w = opaque;

    w->user_ret = w->fn(w->opaque, off, len);
    return w->user_ret ? 1 : 0;
}

int qbm_impl_bitmap_extents(struct qbm_image *img, size_t idx, qbm_extent_fn fn,
                            void *opaque)
{
    struct qbm_extent_state st = { .fn = fn, .opaque = opaque };

    if (idx >= img->nb_bitmaps) {
        return qbm_err(EINVAL, "bitmap index %zu out of range", idx);
    }
    return walk_bitmap(img, &img->bitmaps[idx], &st);
}

QBM_API int qbm_bitmap_extents(struct qbm_image *img, size_t idx,
                               qbm_extent_fn fn, void *opaque)
{
    struct qbm_extent_wrap w = { fn, opaque, 0 };
    int r;

    if (!fn) {
        qbm_err(EINVAL, "bitmap index %zu out of range", idx);
        return -1;
    }
    r = qbm_impl_bitmap_extents(img, idx, qbm_extent_wrap_cb, &w);
    return qbm_public_ret_cb(r, w.user_ret);
}

struct range_wrap {
    qbm_extent_fn fn;
    void *opaque;
    uint64_t start, end;
    int user_ret;
};

/* Clip each extent to the range; those outside it are not reported. */
static int range_wrap_cb(void *opaque, uint64_t off, uint64_t len)
{
    struct range_wrap *w = opaque;
    uint64_t e = off + len;

    off = off > w->start ? off : w->start;
    e = e < w->end ? e : w->end;
    if (off >= e) {
        return 0;
    }
    w->user_ret = w->fn(w->opaque, off, e - off);
    return w->user_ret ? 1 : 0;
}

QBM_API int qbm_bitmap_extents_range(struct qbm_image *img, size_t idx,
                                     uint64_t offset, uint64_t length,
                                     qbm_extent_fn fn, void *opaque)
{
    struct range_wrap w = { fn, opaque, offset, 0, 0 };
    struct qbm_extent_state st = { .fn = range_wrap_cb, .opaque = &w };
    struct qcow2_bitmap *bm;
    uint64_t span, first, end;
    int r;

    if (!img || !fn || idx >= img->nb_bitmaps) {
        qbm_err(EINVAL, "invalid arguments");
        return -1;
    }
    bm = &img->bitmaps[idx];
    if (offset >= img->hdr.size || length == 0) {
        return 0;
    }
    w.end = length > img->hdr.size - offset ? img->hdr.size : offset + length;
    /* Guest bytes per table entry: a cluster of bits. */
    span = (img->cluster_size * 8) << bm->granularity_bits;
    first = offset / span;
    end = div_round_up(w.end, span);
    r = walk_bitmap_range(img, bm, first, end, &st);
    return qbm_public_ret_cb(r, w.user_ret);
}

static int cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;

    return x < y ? -1 : x > y;
}

static int push_clusters(struct qbm_offsets *o, uint64_t off, uint64_t len,
                         uint64_t cs)
{
    uint64_t c;
    int r;

    for (c = 0; off && c < div_round_up(len, cs); c++) {
        r = qbm_darray_push(o, off + c * cs, 0);
        if (r < 0) {
            return r;
        }
    }
    return 0;
}

int qbm_impl_image_bitmaps_bytes(struct qbm_image *img, uint64_t *ret_bytes)
{
    uint64_t cs = img->cluster_size, n = 0, i, k;
    struct qbm_offsets o = { 0 };
    int r = 0;

    /* The clusters of the bitmaps on disk: directory, tables, data, each
     * counted once (bitmaps may share data clusters). */
    if (img->bitmaps_state == QBM_BITMAPS_OK) {
        r = push_clusters(&o, img->bm_ext.dir_offset, img->bm_ext.dir_size, cs);
    }
    for (i = 0; i < img->nb_bitmaps && r == 0; i++) {
        struct qcow2_bitmap *bm = &img->bitmaps[i];

        if (!bm->table_offset) {
            continue; /* staged, nothing on disk yet */
        }
        r = push_clusters(&o, bm->table_offset, (uint64_t)bm->table_size * 8,
                          cs);
        if (r < 0 || qcow2_bitmap_table_load(img, bm) < 0) {
            continue; /* an in-use bitmap's table may be unreadable */
        }
        for (k = 0; k < bm->table_size && r == 0; k++) {
            r = push_clusters(&o, bm->table[k] & BME_TABLE_OFFSET_MASK, cs, cs);
        }
    }
    if (r == 0 && o.n > 0) {
        qsort(o.v, o.n, sizeof(*o.v), cmp_u64);
        for (k = 0; k < o.n; k++) {
            n += k == 0 || o.v[k] != o.v[k - 1];
        }
        *ret_bytes = n * cs;
    }
    qbm_darray_free(&o);
    return r;
}

QBM_API int qbm_image_bitmaps_bytes(struct qbm_image *img, uint64_t *ret_bytes)
{
    return qbm_public_ret(qbm_impl_image_bitmaps_bytes(img, ret_bytes));
}
