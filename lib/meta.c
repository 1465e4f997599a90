/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * Where an image's metadata lies: an index of every structure qbm knows,
 * by host cluster, so that the allocator never hands out a cluster that
 * holds one even when its refcount says it is free (a corrupt image), and
 * the check of the refcount table against it (reference notes sections 3
 * and 8).
 */
#include <stdlib.h>

#include "internal.h"

#define REFT_OFFSET_MASK 0xfffffffffffffe00ull
#define REFT_RESERVED_MASK 0x1ffull
#define REPAIR "; repair with 'qemu-img check -r all'"

/* A run of clusters that holds metadata, for the overlap check. */
struct meta_range {
    uint64_t start, end; /* cluster indices, end exclusive */
    uint64_t off;        /* byte offset of the structure */
    uint64_t rt_index;   /* refcount blocks: their table entry; else
                          * UINT64_MAX */
    const char *what;
};

static const char what_reftable[] = "refcount table";
static const char what_refblock[] = "refcount block";
/* Not live metadata: kept from allocation, but anything may lie over it. */
static const char what_stale_dir[] = "stale bitmap directory";

struct qcow2_meta_index {
    struct qbm_image *img;
    uint64_t cs;
    struct meta_range *meta; /* sorted by start */
    size_t nmeta, capmeta;
};

static int grow_array(void **arr, size_t *cap, size_t need, size_t elem)
{
    size_t ncap;
    void *p;

    if (need <= *cap) {
        return 0;
    }
    ncap = *cap ? *cap * 2 : 64;
    while (ncap < need) {
        ncap *= 2;
    }
    p = qbm_realloc(*arr, ncap * elem);
    if (!p) {
        return -ENOMEM;
    }
    *arr = p;
    *cap = ncap;
    return 0;
}

/* ---- building the index ------------------------------------------------ */

static int meta_add(struct qcow2_meta_index *mi, uint64_t off, uint64_t len,
                    const char *what)
{
    struct meta_range *m;
    uint64_t end;
    int r;

    if (len == 0) {
        return 0;
    }
    if (!add_ok(off, len, &end)) {
        end = UINT64_MAX;
    }
    r = grow_array((void **)&mi->meta, &mi->capmeta, mi->nmeta + 1,
                   sizeof(*mi->meta));
    if (r < 0) {
        return r;
    }
    m = &mi->meta[mi->nmeta++];
    m->start = off / mi->cs;
    m->end = div_round_up(end, mi->cs);
    m->off = off;
    m->rt_index = UINT64_MAX;
    m->what = what;
    return 0;
}

static int cmp_meta(const void *a, const void *b)
{
    const struct meta_range *x = a, *y = b;

    /* Refcount blocks at one offset in table order, for the message. */
    if (x->start != y->start) {
        return x->start < y->start ? -1 : 1;
    }
    return x->rt_index < y->rt_index ? -1 : x->rt_index > y->rt_index;
}

static int meta_add_l2(struct qcow2_meta_index *mi, const uint64_t *l1,
                       uint64_t n)
{
    uint64_t i;
    int r;

    for (i = 0; i < n; i++) {
        uint64_t off = l1[i] & L1E_OFFSET_MASK;

        if (off && (r = meta_add(mi, off, mi->cs, "L2 table"))) {
            return r;
        }
    }
    return 0;
}

/* The L2 tables of an L1 table not loaded yet, read 64 KiB at a time: an
 * edit of a huge disk's bitmaps need not keep (and fault in) its L1. */
static int meta_stream_l1(struct qcow2_meta_index *mi, uint64_t nl1)
{
    enum { PIECE = 8192 };
    uint64_t *piece = qbm_malloc(PIECE * 8);
    uint64_t i, k, n;
    int r = 0;

    if (!piece) {
        return -ENOMEM;
    }
    for (i = 0; i < nl1 && r == 0; i += n) {
        n = nl1 - i < PIECE ? nl1 - i : PIECE;
        r = qbm_image_read_meta(mi->img, piece, n * 8,
                                mi->img->hdr.l1_table_offset + i * 8,
                                "L1 table");
        for (k = 0; k < n && r == 0; k++) {
            piece[k] = be64_load((const uint8_t *)&piece[k]);
        }
        r = r ? r : meta_add_l2(mi, piece, n);
    }
    free(piece);
    return r;
}

/*
 * Collect every metadata structure qbm knows about, so that a cluster whose
 * refcount says "free" but which holds metadata is caught (the image is
 * corrupt) instead of overwritten.
 */
static int meta_collect(struct qcow2_meta_index *mi)
{
    struct qbm_image *img = mi->img;
    const struct qcow2_header *h = &img->hdr;
    uint64_t i, nl1;
    size_t k;
    int r;

    r = meta_add(mi, 0, mi->cs, "header");
    r = r ? r : meta_add(mi, h->l1_table_offset, (uint64_t)h->l1_size * 8,
                         "L1 table");
    r = r ? r : meta_add(mi, h->refcount_table_offset,
                         (uint64_t)h->refcount_table_clusters * mi->cs,
                         what_reftable);
    r = r ? r : meta_add(mi, h->snapshots_offset, img->snapshots_size,
                         "snapshot table");
    if (r) {
        return r;
    }
    for (i = 0; i < img->reftable_entries; i++) {
        uint64_t off = img->reftable[i] & REFT_OFFSET_MASK;

        if (!off) {
            continue;
        }
        r = meta_add(mi, off, mi->cs, what_refblock);
        if (r) {
            return r;
        }
        mi->meta[mi->nmeta - 1].rt_index = i;
    }
    nl1 = div_round_up(h->size, mi->cs * img->l2_entries);
    r = img->l1 ? meta_add_l2(mi, img->l1, nl1) : meta_stream_l1(mi, nl1);
    if (r) {
        return r;
    }
    for (k = 0; k < img->nb_snapshots; k++) {
        r = meta_add(mi, img->snapshots[k].l1_table_offset,
                     (uint64_t)img->snapshots[k].l1_size * 8,
                     "snapshot L1 table");
        if (r) {
            return r;
        }
    }
    for (k = 0; k < img->hdr.nb_exts; k++) {
        const struct qcow2_ext *e = &img->hdr.exts[k];

        if (e->magic == QCOW2_EXT_CRYPTO && e->len == 16 &&
            (r = meta_add(mi, be64_load(e->data), be64_load(e->data + 8),
                          "encryption header"))) {
            return r;
        }
    }
    if (img->bitmaps_state != QBM_BITMAPS_NONE) {
        r = meta_add(mi, img->bm_ext.dir_offset, img->bm_ext.dir_size,
                     img->bitmaps_state == QBM_BITMAPS_STALE
                         ? what_stale_dir : "bitmap directory");
        if (r) {
            return r;
        }
    }
    for (k = 0; k < img->nb_bitmaps; k++) {
        struct qcow2_bitmap *bm = &img->bitmaps[k];

        if (bm->table_offset == 0) {
            continue; /* added in this session: nothing on disk yet */
        }
        r = meta_add(mi, bm->table_offset, (uint64_t)bm->table_size * 8,
                     "bitmap table");
        if (r) {
            return r;
        }
        /* Tables are small and a refcount block over an untouched
         * bitmap's data must be found too. One that cannot be loaded is
         * refused by the edits that read it; skip it here. */
        if (qcow2_bitmap_table_load(img, bm) < 0) {
            if (qbm_get_errno() == ENOMEM) {
                return -ENOMEM;
            }
            continue;
        }
        for (i = 0; i < bm->table_size; i++) {
            uint64_t off = bm->table[i] & BME_TABLE_OFFSET_MASK;

            if (off && (r = meta_add(mi, off, mi->cs, "bitmap data"))) {
                return r;
            }
        }
    }
    /* Removed or rewritten bitmaps' tables and data: live until the
     * switch. */
    for (k = 0; k < img->nb_pending_free; k++) {
        r = meta_add(mi, img->pending_free[k], mi->cs,
                     "replaced bitmap cluster");
        if (r) {
            return r;
        }
    }
    qsort(mi->meta, mi->nmeta, sizeof(*mi->meta), cmp_meta);
    return 0;
}

void qcow2_meta_index_free(struct qcow2_meta_index *mi)
{
    if (!mi) {
        return;
    }
    free(mi->meta);
    free(mi);
}

int qcow2_meta_index_build(struct qbm_image *img,
                           struct qcow2_meta_index **ret)
{
    struct qcow2_meta_index *mi = qbm_calloc(1, sizeof(*mi));
    int r;

    if (!mi) {
        return -ENOMEM;
    }
    mi->img = img;
    mi->cs = img->cluster_size;
    r = meta_collect(mi);
    if (r < 0) {
        qcow2_meta_index_free(mi);
        return r;
    }
    *ret = mi;
    return 0;
}

/* ---- looking clusters up ------------------------------------------------ */


const char *qcow2_meta_index_find(const struct qcow2_meta_index *mi,
                                  uint64_t c)
{
    size_t lo = 0, hi = mi->nmeta, i;

    /* Ranges are sorted by start; find the last one starting <= c. Ranges
     * may overlap (corrupt images), so look back a little. */
    while (lo < hi) {
        size_t mid = (lo + hi) / 2;

        if (mi->meta[mid].start <= c) {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    for (i = lo; i > 0; i--) {
        const struct meta_range *m = &mi->meta[i - 1];

        if (c < m->end) {
            return m->what;
        }
        if (lo - i > 64) {
            break;
        }
    }
    return NULL;
}

/* ---- validating the refcount structures --------------------------------- */

static uint64_t rt_entry_pos(const struct qcow2_meta_index *mi, uint64_t i)
{
    return mi->img->hdr.refcount_table_offset + i * 8;
}

/* m and o (both in the index) share a cluster; m is a refcount structure. */
static int overlap_err(const struct qcow2_meta_index *mi,
                       const struct meta_range *m, const struct meta_range *o)
{
    if (m->what != what_refblock && o->what == what_refblock) {
        const struct meta_range *x = m;

        m = o; /* say it from the block's side when there is one */
        o = x;
    }
    if (m->what != what_refblock) {
        return qbm_err(EUCLEAN, "refcount table at 0x%llx: overlaps the %s "
                       "at 0x%llx" REPAIR, (unsigned long long)m->off,
                       o->what, (unsigned long long)o->off);
    }
    if (o->what == what_refblock) {
        return qbm_err(EUCLEAN, "refcount table entries %llu at 0x%llx and "
                       "%llu at 0x%llx: both point to the refcount block at "
                       "0x%llx" REPAIR, (unsigned long long)m->rt_index,
                       (unsigned long long)rt_entry_pos(mi, m->rt_index),
                       (unsigned long long)o->rt_index,
                       (unsigned long long)rt_entry_pos(mi, o->rt_index),
                       (unsigned long long)m->off);
    }
    return qbm_err(EUCLEAN, "refcount table entry %llu at 0x%llx: refcount "
                   "block at 0x%llx overlaps the %s at 0x%llx" REPAIR,
                   (unsigned long long)m->rt_index,
                   (unsigned long long)rt_entry_pos(mi, m->rt_index),
                   (unsigned long long)m->off, o->what,
                   (unsigned long long)o->off);
}

/*
 * Check the whole refcount table and where its blocks lie before anything
 * relies on them: refcount updates are written into the blocks, so a block
 * past the end of the file would grow it by gigabytes, and one over other
 * metadata would overwrite it (qcow2 spec, "Host cluster management";
 * qemu-img check reports all of these). Reserved bits are refused even in
 * entries not used yet. Costs a pass over the table and the overlap index,
 * no I/O: what a block holds is not checked (any value is a refcount).
 */
int qcow2_meta_index_check_refcounts(const struct qcow2_meta_index *mi)
{
    const struct qbm_image *img = mi->img;
    const struct qcow2_header *h = &img->hdr;
    uint64_t size = img->file_size, i;
    size_t k, top = SIZE_MAX;

    if (h->refcount_table_offset +
        ((uint64_t)h->refcount_table_clusters - 1) * mi->cs >= size) {
        return qbm_err(EUCLEAN, "refcount table at 0x%llx: its %u clusters "
                       "run past the end of the file (0x%llx)" REPAIR,
                       (unsigned long long)h->refcount_table_offset,
                       h->refcount_table_clusters, (unsigned long long)size);
    }
    for (i = 0; i < img->reftable_entries; i++) {
        uint64_t e = img->reftable[i], off = e & REFT_OFFSET_MASK;
        unsigned long long pos = rt_entry_pos(mi, i);

        if (e & REFT_RESERVED_MASK) {
            return qbm_err(EUCLEAN, "refcount table entry %llu at 0x%llx: "
                           "reserved bits set (0x%llx)" REPAIR,
                           (unsigned long long)i, pos,
                           (unsigned long long)e);
        }
        if (off && !is_aligned(off, mi->cs)) {
            return qbm_err(EUCLEAN, "refcount table entry %llu at 0x%llx: "
                           "offset 0x%llx is not cluster aligned" REPAIR,
                           (unsigned long long)i, pos,
                           (unsigned long long)off);
        }
        if (off >= size) {
            return qbm_err(EUCLEAN, "refcount table entry %llu at 0x%llx: "
                           "offset 0x%llx is past the end of the file "
                           "(0x%llx)" REPAIR, (unsigned long long)i, pos,
                           (unsigned long long)off, (unsigned long long)size);
        }
    }
    /*
     * The index is sorted by start. A range overlapping a refcount
     * structure r either starts before it, and then the range reaching
     * furthest among those before r overlaps r too, or starts inside r,
     * and then so does the next range after r. Other overlaps (bitmap data
     * clusters shared between bitmaps) are legitimate.
     */
    for (k = 0; k < mi->nmeta; k++) {
        const struct meta_range *m = &mi->meta[k];
        size_t next = k + 1;

        if (m->what == what_stale_dir) {
            continue;
        }
        if (m->what == what_reftable || m->what == what_refblock) {
            if (top != SIZE_MAX && mi->meta[top].end > m->start) {
                return overlap_err(mi, m, &mi->meta[top]);
            }
            while (next < mi->nmeta && mi->meta[next].what == what_stale_dir) {
                next++;
            }
            if (next < mi->nmeta && mi->meta[next].start < m->end) {
                return overlap_err(mi, m, &mi->meta[next]);
            }
        }
        if (top == SIZE_MAX || m->end > mi->meta[top].end) {
            top = k;
        }
    }
    return 0;
}

