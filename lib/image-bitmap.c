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

/* Walk bitmap `bm` of `img` into the extent state `st`. */
static int walk_bitmap(struct qbm_image *img, struct qcow2_bitmap *bm,
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
    r = qcow2_bitmap_read_chunks(img, bm, chunk_to_extents, st);
    if (r) {
        return r;
    }
    return qbm_extent_state_finish(st);
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
