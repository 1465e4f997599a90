/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * Crash-safe transactions: cluster allocation over the refcount structures
 * and the ordered commit described in internal.h (reference notes sections
 * 3, 7 and 8).
 *
 * Nothing reaches the disk before qbm_txn_commit() except the contents of
 * clusters this transaction allocated, which nothing references yet and
 * whose refcount on disk is still 0: abandoning a transaction before the
 * commit therefore leaves the image exactly as it was (apart from bytes in
 * free clusters and possibly a longer file).
 */
#include <stdlib.h>

#include "internal.h"

#define REFT_OFFSET_MASK 0xfffffffffffffe00ull
#define REFT_RESERVED_MASK 0x1ffull
#define SECTOR 512
#define REPAIR "; repair with 'qemu-img check -r all'"

struct rc_block {
    uint64_t offset; /* host offset of the block */
    uint8_t *buf;
    bool dirty;
    bool is_new; /* created here: its reftable entry must be written */
    uint64_t dirty_lo, dirty_hi; /* bytes changed since the last write */
};

/* Record that bytes [lo, hi) of b changed. */
static void mark_dirty(struct rc_block *b, uint64_t lo, uint64_t hi)
{
    if (!b->dirty || lo < b->dirty_lo) {
        b->dirty_lo = lo;
    }
    if (!b->dirty || hi > b->dirty_hi) {
        b->dirty_hi = hi;
    }
    b->dirty = true;
}

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

struct qbm_txn {
    struct qbm_image *img;
    uint64_t cs;
    unsigned bits;
    uint64_t per_block;

    /* Working refcount table: a copy of the live one, or a new, larger
     * table (rt_grown) placed at rt_offset. */
    uint64_t *rt;
    uint64_t rt_entries;
    bool rt_grown;
    uint64_t rt_offset, rt_clusters;
    struct rc_block **blocks; /* by reftable index, loaded on demand */

    struct meta_range *meta;
    size_t nmeta, capmeta;

    /* Runs allocated here (writes are only allowed there). */
    uint64_t (*allocs)[2];
    size_t nallocs, capallocs;

    /* Runs to free after the commit: [offset, length) in bytes, and how
     * many references each of their clusters loses. */
    uint64_t (*frees)[3];
    size_t nfrees, capfrees;

    uint64_t hint; /* next cluster index to try */
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

/* ---- the overlap check ----------------------------------------------- */

static int meta_add(struct qbm_txn *t, uint64_t off, uint64_t len,
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
    r = grow_array((void **)&t->meta, &t->capmeta, t->nmeta + 1,
                   sizeof(*t->meta));
    if (r < 0) {
        return r;
    }
    m = &t->meta[t->nmeta++];
    m->start = off / t->cs;
    m->end = div_round_up(end, t->cs);
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

static int meta_add_l2(struct qbm_txn *t, const uint64_t *l1, uint64_t n)
{
    uint64_t i;
    int r;

    for (i = 0; i < n; i++) {
        uint64_t off = l1[i] & L1E_OFFSET_MASK;

        if (off && (r = meta_add(t, off, t->cs, "L2 table"))) {
            return r;
        }
    }
    return 0;
}

/* The L2 tables of an L1 table not loaded yet, read 64 KiB at a time: an
 * edit of a huge disk's bitmaps need not keep (and fault in) its L1. */
static int meta_stream_l1(struct qbm_txn *t, uint64_t nl1)
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
        r = qbm_image_read_meta(t->img, piece, n * 8,
                                t->img->hdr.l1_table_offset + i * 8,
                                "L1 table");
        for (k = 0; k < n && r == 0; k++) {
            piece[k] = be64_load((const uint8_t *)&piece[k]);
        }
        r = r ? r : meta_add_l2(t, piece, n);
    }
    free(piece);
    return r;
}

/*
 * Collect every metadata structure qbm knows about, so that a cluster whose
 * refcount says "free" but which holds metadata is caught (the image is
 * corrupt) instead of overwritten.
 */
static int meta_collect(struct qbm_txn *t)
{
    struct qbm_image *img = t->img;
    const struct qcow2_header *h = &img->hdr;
    uint64_t i, nl1;
    size_t k;
    int r;

    r = meta_add(t, 0, t->cs, "header");
    r = r ? r : meta_add(t, h->l1_table_offset, (uint64_t)h->l1_size * 8,
                         "L1 table");
    r = r ? r : meta_add(t, h->refcount_table_offset,
                         (uint64_t)h->refcount_table_clusters * t->cs,
                         what_reftable);
    r = r ? r : meta_add(t, h->snapshots_offset, img->snapshots_size,
                         "snapshot table");
    if (r) {
        return r;
    }
    for (i = 0; i < img->reftable_entries; i++) {
        uint64_t off = img->reftable[i] & REFT_OFFSET_MASK;

        if (!off) {
            continue;
        }
        r = meta_add(t, off, t->cs, what_refblock);
        if (r) {
            return r;
        }
        t->meta[t->nmeta - 1].rt_index = i;
    }
    nl1 = div_round_up(h->size, t->cs * img->l2_entries);
    r = img->l1 ? meta_add_l2(t, img->l1, nl1) : meta_stream_l1(t, nl1);
    if (r) {
        return r;
    }
    for (k = 0; k < img->nb_snapshots; k++) {
        r = meta_add(t, img->snapshots[k].l1_table_offset,
                     (uint64_t)img->snapshots[k].l1_size * 8,
                     "snapshot L1 table");
        if (r) {
            return r;
        }
    }
    for (k = 0; k < img->hdr.nb_exts; k++) {
        const struct qcow2_ext *e = &img->hdr.exts[k];

        if (e->magic == QCOW2_EXT_CRYPTO && e->len == 16 &&
            (r = meta_add(t, be64_load(e->data), be64_load(e->data + 8),
                          "encryption header"))) {
            return r;
        }
    }
    if (img->bitmaps_state != QBM_BITMAPS_NONE) {
        r = meta_add(t, img->bm_ext.dir_offset, img->bm_ext.dir_size,
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
        r = meta_add(t, bm->table_offset, (uint64_t)bm->table_size * 8,
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

            if (off && (r = meta_add(t, off, t->cs, "bitmap data"))) {
                return r;
            }
        }
    }
    /* Removed or rewritten bitmaps' tables and data: live until the
     * switch. */
    for (k = 0; k < img->nb_pending_free; k++) {
        r = meta_add(t, img->pending_free[k], t->cs,
                     "replaced bitmap cluster");
        if (r) {
            return r;
        }
    }
    qsort(t->meta, t->nmeta, sizeof(*t->meta), cmp_meta);
    return 0;
}

/* The structure cluster c holds, or NULL. */
static const char *meta_find(const struct qbm_txn *t, uint64_t c)
{
    size_t lo = 0, hi = t->nmeta, i;

    /* Ranges are sorted by start; find the last one starting <= c. Ranges
     * may overlap (corrupt images), so look back a little. */
    while (lo < hi) {
        size_t mid = (lo + hi) / 2;

        if (t->meta[mid].start <= c) {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    for (i = lo; i > 0; i--) {
        const struct meta_range *m = &t->meta[i - 1];

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

static uint64_t rt_entry_pos(const struct qbm_txn *t, uint64_t i)
{
    return t->img->hdr.refcount_table_offset + i * 8;
}

/* m and o (both in the index) share a cluster; m is a refcount structure. */
static int overlap_err(const struct qbm_txn *t, const struct meta_range *m,
                       const struct meta_range *o)
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
                       (unsigned long long)rt_entry_pos(t, m->rt_index),
                       (unsigned long long)o->rt_index,
                       (unsigned long long)rt_entry_pos(t, o->rt_index),
                       (unsigned long long)m->off);
    }
    return qbm_err(EUCLEAN, "refcount table entry %llu at 0x%llx: refcount "
                   "block at 0x%llx overlaps the %s at 0x%llx" REPAIR,
                   (unsigned long long)m->rt_index,
                   (unsigned long long)rt_entry_pos(t, m->rt_index),
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
static int refcount_validate(struct qbm_txn *t)
{
    const struct qbm_image *img = t->img;
    const struct qcow2_header *h = &img->hdr;
    uint64_t size = img->file_size, i;
    size_t k, top = SIZE_MAX;

    if (h->refcount_table_offset +
        ((uint64_t)h->refcount_table_clusters - 1) * t->cs >= size) {
        return qbm_err(EUCLEAN, "refcount table at 0x%llx: its %u clusters "
                       "run past the end of the file (0x%llx)" REPAIR,
                       (unsigned long long)h->refcount_table_offset,
                       h->refcount_table_clusters, (unsigned long long)size);
    }
    for (i = 0; i < img->reftable_entries; i++) {
        uint64_t e = img->reftable[i], off = e & REFT_OFFSET_MASK;
        unsigned long long pos = rt_entry_pos(t, i);

        if (e & REFT_RESERVED_MASK) {
            return qbm_err(EUCLEAN, "refcount table entry %llu at 0x%llx: "
                           "reserved bits set (0x%llx)" REPAIR,
                           (unsigned long long)i, pos,
                           (unsigned long long)e);
        }
        if (off && !is_aligned(off, t->cs)) {
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
    for (k = 0; k < t->nmeta; k++) {
        const struct meta_range *m = &t->meta[k];
        size_t next = k + 1;

        if (m->what == what_stale_dir) {
            continue;
        }
        if (m->what == what_reftable || m->what == what_refblock) {
            if (top != SIZE_MAX && t->meta[top].end > m->start) {
                return overlap_err(t, m, &t->meta[top]);
            }
            while (next < t->nmeta && t->meta[next].what == what_stale_dir) {
                next++;
            }
            if (next < t->nmeta && t->meta[next].start < m->end) {
                return overlap_err(t, m, &t->meta[next]);
            }
        }
        if (top == SIZE_MAX || m->end > t->meta[top].end) {
            top = k;
        }
    }
    return 0;
}

/* ---- refcount blocks ---------------------------------------------------- */

static void free_blocks(struct qbm_txn *t)
{
    uint64_t i;

    if (!t->blocks) {
        return;
    }
    for (i = 0; i < t->rt_entries; i++) {
        if (t->blocks[i]) {
            free(t->blocks[i]->buf);
            free(t->blocks[i]);
        }
    }
    free(t->blocks);
    t->blocks = NULL;
}

/* The block for reftable index rt, or NULL when none exists (refcounts in
 * its range are all 0). */
static int get_block(struct qbm_txn *t, uint64_t rt, struct rc_block **ret)
{
    struct rc_block *b;
    uint64_t off;
    int r;

    if (t->blocks[rt]) {
        *ret = t->blocks[rt];
        return 0;
    }
    off = t->rt[rt] & REFT_OFFSET_MASK;
    if (off == 0) {
        *ret = NULL;
        return 0;
    }
    if (!is_aligned(off, t->cs)) {
        return qbm_err(EINVAL, "refcount table entry %llu: block offset "
                       "0x%llx not cluster aligned", (unsigned long long)rt,
                       (unsigned long long)off);
    }
    b = qbm_calloc(1, sizeof(*b));
    if (!b) {
        return -ENOMEM;
    }
    b->buf = qbm_malloc(t->cs);
    if (!b->buf) {
        free(b);
        return -ENOMEM;
    }
    r = qbm_image_read_meta(t->img, b->buf, t->cs, off, "refcount block");
    if (r < 0) {
        free(b->buf);
        free(b);
        return r;
    }
    b->offset = off;
    t->blocks[rt] = b;
    *ret = b;
    return 0;
}

/* Create the missing block for index rt in the first cluster of the range
 * it covers, where it describes itself. */
static int new_block_at(struct qbm_txn *t, uint64_t rt, uint64_t cluster)
{
    struct rc_block *b;
    const char *what = meta_find(t, cluster);

    if (what) {
        return qbm_err(EUCLEAN, "refcount of cluster 0x%llx is 0 but it "
                       "holds the %s: the image is corrupt (try qemu-img "
                       "check -r all)",
                       (unsigned long long)(cluster * t->cs), what);
    }
    b = qbm_calloc(1, sizeof(*b));
    if (!b) {
        return -ENOMEM;
    }
    b->buf = qbm_calloc(1, t->cs);
    if (!b->buf) {
        free(b);
        return -ENOMEM;
    }
    b->offset = cluster * t->cs;
    mark_dirty(b, 0, t->cs); /* a new cluster: written whole */
    b->is_new = true;
    t->blocks[rt] = b;
    t->rt[rt] = b->offset;
    if (cluster / t->per_block == rt) {
        qcow2_refblock_set(b->buf, t->bits, cluster % t->per_block, 1);
    }
    return 0;
}

static int get_refcount(struct qbm_txn *t, uint64_t c, uint64_t *ret)
{
    uint64_t rt = c / t->per_block;
    struct rc_block *b;
    int r;

    if (rt >= t->rt_entries) {
        *ret = 0;
        return 0;
    }
    r = get_block(t, rt, &b);
    if (r < 0) {
        return r;
    }
    *ret = b ? qcow2_refblock_entry(b->buf, t->bits, c % t->per_block) : 0;
    return 0;
}

static int set_refcount(struct qbm_txn *t, uint64_t c, uint64_t value)
{
    uint64_t rt = c / t->per_block;
    struct rc_block *b;
    int r;

    if (rt >= t->rt_entries) {
        return qbm_err(EINVAL, "internal: cluster 0x%llx outside the "
                       "refcount table", (unsigned long long)(c * t->cs));
    }
    r = get_block(t, rt, &b);
    if (r < 0) {
        return r;
    }
    if (!b) {
        r = new_block_at(t, rt, rt * t->per_block);
        if (r < 0) {
            return r;
        }
        b = t->blocks[rt];
    }
    qcow2_refblock_set(b->buf, t->bits, c % t->per_block, value);
    mark_dirty(b, (c % t->per_block) * t->bits / 8,
               ((c % t->per_block) * t->bits + t->bits + 7) / 8);
    return 0;
}

/*
 * Grow the refcount table so that it has at least `need` entries. The new
 * refblocks and the new table go at the first cluster the old table does
 * not cover (everything from there on is free), the blocks covering
 * themselves and the table; the table is oversized by half, as QEMU does.
 */
static int grow_reftable(struct qbm_txn *t, uint64_t need)
{
    uint64_t old_entries = t->rt_entries;
    uint64_t e0 = old_entries * t->per_block; /* first uncovered cluster */
    uint64_t entries = old_entries + old_entries / 2 + 1;
    uint64_t k, tbl, i;
    struct rc_block **blocks;
    uint64_t *rt;
    int r;

    if (entries < need) {
        entries = need;
    }
    for (;;) {
        tbl = div_round_up(entries * 8, t->cs);
        k = 1;
        while (k * t->per_block < k + tbl) {
            k++;
        }
        if (entries >= old_entries + k) {
            break;
        }
        entries = old_entries + k;
    }
    entries = tbl * t->cs / 8; /* use the whole clusters */
    if (tbl * t->cs > QCOW2_MAX_REFTABLE_BYTES) {
        return qbm_err(ENOSPC, "the refcount table would exceed 8 MiB");
    }
    rt = qbm_calloc(entries, sizeof(*rt));
    blocks = qbm_calloc(entries, sizeof(*blocks));
    if (!rt || !blocks) {
        free(rt);
        free(blocks);
        return -ENOMEM;
    }
    memcpy(rt, t->rt, old_entries * sizeof(*rt));
    memcpy(blocks, t->blocks, old_entries * sizeof(*blocks));
    free(t->rt);
    free(t->blocks);
    t->rt = rt;
    t->blocks = blocks;
    t->rt_entries = entries;

    /* A table grown earlier in this transaction never became live: give
     * its clusters back. */
    if (t->rt_grown) {
        for (i = 0; i < t->rt_clusters; i++) {
            r = set_refcount(t, t->rt_offset / t->cs + i, 0);
            if (r < 0) {
                return r;
            }
        }
    } else {
        r = qbm_txn_free_later(t, t->img->hdr.refcount_table_offset,
                               (uint64_t)t->img->hdr.refcount_table_clusters *
                                   t->cs);
        if (r < 0) {
            return r;
        }
    }
    for (i = 0; i < k; i++) {
        r = new_block_at(t, old_entries + i, e0 + i);
        if (r < 0) {
            return r;
        }
    }
    for (i = 0; i < k + tbl; i++) {
        r = set_refcount(t, e0 + i, 1);
        if (r < 0) {
            return r;
        }
    }
    t->rt_grown = true;
    t->rt_offset = (e0 + k) * t->cs;
    t->rt_clusters = tbl;
    return 0;
}

/* ---- public-internal API ------------------------------------------------ */

void qbm_txn_abort(struct qbm_txn *t)
{
    if (!t) {
        return;
    }
    free_blocks(t);
    free(t->rt);
    free(t->meta);
    free(t->allocs);
    free(t->frees);
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
    t->cs = img->cluster_size;
    t->bits = img->refcount_bits;
    t->per_block = t->cs * 8 / t->bits;
    t->rt_entries = img->reftable_entries;
    t->rt = qbm_malloc(t->rt_entries * sizeof(*t->rt));
    t->blocks = qbm_calloc(t->rt_entries, sizeof(*t->blocks));
    if (!t->rt || !t->blocks) {
        qbm_txn_abort(t);
        return -ENOMEM;
    }
    memcpy(t->rt, img->reftable, t->rt_entries * sizeof(*t->rt));
    r = meta_collect(t);
    r = r ? r : refcount_validate(t);
    if (r < 0) {
        qbm_txn_abort(t);
        return r;
    }
    *ret = t;
    return 0;
}

int qbm_txn_alloc(struct qbm_txn *t, uint64_t n, uint64_t *ret_offset)
{
    uint64_t c = t->hint, start = 0, run = 0, i;
    int r;

    if (n == 0) {
        return qbm_err(EINVAL, "internal: empty allocation");
    }
    while (run < n) {
        uint64_t rt = c / t->per_block, rc;
        const char *what;

        if (rt >= t->rt_entries) {
            r = grow_reftable(t, rt + (n - run) / t->per_block + 2);
            if (r < 0) {
                return r;
            }
            run = 0;
            continue;
        }
        if (!(t->rt[rt] & REFT_OFFSET_MASK)) {
            r = new_block_at(t, rt, rt * t->per_block);
            if (r < 0) {
                return r;
            }
            if (c == rt * t->per_block) {
                run = 0;
                c++;
                continue;
            }
        }
        r = get_refcount(t, c, &rc);
        if (r < 0) {
            return r;
        }
        if (rc == 0) {
            what = meta_find(t, c);
            if (what) {
                return qbm_err(EUCLEAN, "refcount of cluster 0x%llx is 0 but "
                               "it holds the %s: the image is corrupt (try "
                               "qemu-img check -r all)",
                               (unsigned long long)(c * t->cs), what);
            }
            if (run == 0) {
                start = c;
            }
            run++;
        } else {
            run = 0;
        }
        c++;
    }
    for (i = 0; i < n; i++) {
        r = set_refcount(t, start + i, 1);
        if (r < 0) {
            return r;
        }
    }
    r = grow_array((void **)&t->allocs, &t->capallocs, t->nallocs + 1,
                   sizeof(*t->allocs));
    if (r < 0) {
        return r;
    }
    t->allocs[t->nallocs][0] = start * t->cs;
    t->allocs[t->nallocs][1] = n * t->cs;
    t->nallocs++;
    t->hint = start + n;
    *ret_offset = start * t->cs;
    return 0;
}

int qbm_txn_share(struct qbm_txn *t, uint64_t off, bool *ret_shared)
{
    uint64_t c = off / t->cs, rc, max;
    int r;

    *ret_shared = false;
    max = t->bits == 64 ? UINT64_MAX : (1ull << t->bits) - 1;
    if (!is_aligned(off, t->cs) || c / t->per_block >= t->rt_entries) {
        return 0;
    }
    r = get_refcount(t, c, &rc);
    if (r < 0) {
        return r;
    }
    /* A refcount of 0 means the cluster is not live (a corrupt table):
     * sharing would resurrect whatever it holds now. */
    if (rc == 0 || rc >= max) {
        return 0;
    }
    r = set_refcount(t, c, rc + 1);
    if (r < 0) {
        return r;
    }
    *ret_shared = true;
    return 0;
}

/* 0 when [off, off + len) lies in clusters this transaction allocated. */
static int check_allocated(const struct qbm_txn *t, uint64_t off, size_t len)
{
    size_t i;

    /* Only clusters this transaction allocated may be written before the
     * commit: a last line of defence against overwriting live data. */
    for (i = 0; i < t->nallocs; i++) {
        if (off >= t->allocs[i][0] &&
            len <= t->allocs[i][1] - (off - t->allocs[i][0])) {
            return 0;
        }
    }
    return qbm_err(EFAULT, "internal: write at 0x%llx outside the clusters "
                   "allocated by this transaction", (unsigned long long)off);
}

int qbm_txn_write(struct qbm_txn *t, const void *buf, size_t len,
                  uint64_t off)
{
    int r = check_allocated(t, off, len);

    return r ? r : qbm_io_pwrite(t->img->io, buf, len, off);
}

int qbm_txn_copy(struct qbm_txn *t, struct qbm_io *src, uint64_t src_off,
                 size_t len, uint64_t off)
{
    int r = check_allocated(t, off, len);

    return r ? r : qbm_io_copy(src, src_off, t->img->io, off, len);
}

int qbm_txn_release_later(struct qbm_txn *t, uint64_t off, uint64_t len,
                          uint64_t refs)
{
    int r;

    if (len == 0 || refs == 0) {
        return 0;
    }
    r = grow_array((void **)&t->frees, &t->capfrees, t->nfrees + 1,
                   sizeof(*t->frees));
    if (r < 0) {
        return r;
    }
    t->frees[t->nfrees][0] = off;
    t->frees[t->nfrees][1] = len;
    t->frees[t->nfrees][2] = refs;
    t->nfrees++;
    return 0;
}

/* ---- commit --------------------------------------------------------------- */

static int write_blocks(struct qbm_txn *t)
{
    uint64_t i;
    int r;

    for (i = 0; i < t->rt_entries; i++) {
        struct rc_block *b = t->blocks[i];

        if (b && b->dirty) {
            /* Only the sectors that changed: less to write and flush. */
            uint64_t lo = b->dirty_lo / SECTOR * SECTOR;
            uint64_t hi = div_round_up(b->dirty_hi, SECTOR) * SECTOR;

            if (hi > t->cs) {
                hi = t->cs;
            }
            r = qbm_io_pwrite(t->img->io, b->buf + lo, hi - lo,
                              b->offset + lo);
            if (r < 0) {
                return r;
            }
            b->dirty = false;
        }
    }
    return 0;
}

static bool same_sector(uint64_t start, uint64_t end)
{
    return start / SECTOR == (end - 1) / SECTOR;
}

/* Where things are in cluster 0, as it is on disk now. */
struct header_layout {
    uint8_t *c0;       /* cluster 0 */
    uint64_t ext_pos;  /* bitmaps extension, 0 when absent */
    uint64_t end_pos;  /* end-of-extensions marker */
    bool ext_last;     /* the bitmaps extension is directly before end */
};

static int read_layout(struct qbm_txn *t, struct header_layout *lay)
{
    const struct qcow2_header *h = &t->img->hdr;
    uint64_t pos = h->header_length;
    uint64_t end = h->backing_file_offset ? h->backing_file_offset : t->cs;
    uint64_t prev = 0;
    int r;

    memset(lay, 0, sizeof(*lay));
    lay->c0 = qbm_malloc(t->cs);
    if (!lay->c0) {
        return -ENOMEM;
    }
    r = qbm_io_pread(t->img->io, lay->c0, t->cs, 0);
    if (r < 0) {
        return r;
    }
    /* The list was validated at open; find the positions again. */
    while (pos + 8 <= end) {
        uint32_t magic = be32_load(lay->c0 + pos);
        uint32_t len = be32_load(lay->c0 + pos + 4);

        if (magic == QCOW2_EXT_END) {
            lay->end_pos = pos;
            lay->ext_last = lay->ext_pos && prev == lay->ext_pos;
            return 0;
        }
        if (magic == QCOW2_EXT_BITMAPS) {
            lay->ext_pos = pos;
        }
        prev = pos;
        pos += 8 + ((uint64_t)len + 7) / 8 * 8;
    }
    return qbm_err(ENOTSUP, "header at 0x0: the extension list has no end "
                   "marker; qbm will not rewrite it");
}

/* Check, before anything is written, that the header switch is possible. */
static int header_plan(struct qbm_txn *t, const struct header_layout *lay,
                       uint32_t nb)
{
    const struct qcow2_header *h = &t->img->hdr;

    if (nb > 0 && !lay->ext_pos) {
        uint64_t need = lay->end_pos + 40; /* extension + end marker */

        if (h->backing_file_offset && h->backing_file_offset < need &&
            t->cs - h->backing_file_size < need) {
            return qbm_err(ENOSPC, "header at 0x0: no room in the header "
                           "cluster for the bitmaps extension");
        }
        if (need > t->cs) {
            return qbm_err(ENOSPC, "header at 0x0: no room in the header "
                           "cluster for the bitmaps extension");
        }
    }
    if (nb == 0 && lay->ext_pos && !lay->ext_last &&
        !same_sector(88, lay->end_pos + 8)) {
        return qbm_err(ENOTSUP, "header at 0x0: other extensions follow the "
                       "bitmaps extension, so it cannot be removed "
                       "crash-safely");
    }
    return 0;
}

static int pwrite_flush(struct qbm_io *io, const void *buf, size_t len,
                        uint64_t off)
{
    int r = qbm_io_pwrite(io, buf, len, off);

    return r < 0 ? r : qbm_io_flush(io);
}

/*
 * Make the new directory live. Each step is a write that cannot be torn
 * (it stays inside one 512-byte sector) followed by a flush, so every
 * crash leaves either the old or the new bitmaps, or the bitmaps "stale"
 * (autoclear bit clear: QEMU then ignores them and only leaks clusters).
 */
static int header_switch(struct qbm_txn *t, struct header_layout *lay,
                         uint32_t nb, uint64_t dir_offset, uint64_t dir_size)
{
    struct qbm_io *io = t->img->io;
    uint8_t *c0 = lay->c0;
    uint64_t old_ac = be64_load(c0 + 88);
    uint64_t new_ac = (old_ac & QBM_AUTOCLEAR_DATA_FILE_RAW) |
                      (nb ? QBM_AUTOCLEAR_BITMAPS : 0);
    uint8_t ext[24], ac[8];
    uint64_t p;
    int r;

    be32_store(ext, nb);
    be32_store(ext + 4, 0);
    be64_store(ext + 8, dir_size);
    be64_store(ext + 16, dir_offset);
    be64_store(ac, new_ac);

    if (nb > 0 && lay->ext_pos) {
        p = lay->ext_pos;
        if ((old_ac & QBM_AUTOCLEAR_BITMAPS) && same_sector(88, p + 32)) {
            memcpy(c0 + 88, ac, 8);
            memcpy(c0 + p + 8, ext, 24);
            return pwrite_flush(io, c0 + 88, p + 32 - 88, 88);
        }
        if ((old_ac & QBM_AUTOCLEAR_BITMAPS) && new_ac == old_ac &&
            same_sector(p + 8, p + 32)) {
            return pwrite_flush(io, ext, 24, p + 8);
        }
        /* Poison first, as QEMU does for in-place updates. */
        be64_store(c0 + 88, old_ac & ~(uint64_t)QBM_AUTOCLEAR_BITMAPS);
        r = pwrite_flush(io, c0 + 88, 8, 88);
        r = r ? r : pwrite_flush(io, ext, 24, p + 8);
        return r ? r : pwrite_flush(io, ac, 8, 88);
    }
    if (nb > 0) {
        const struct qcow2_header *h = &t->img->hdr;
        uint8_t hdr8[8];

        p = lay->end_pos;
        if (h->backing_file_offset && h->backing_file_offset < p + 40) {
            /* Move the backing name out of the way: copy, then switch the
             * 8-byte pointer (one aligned write). */
            uint64_t nbo = t->cs - h->backing_file_size;
            uint8_t off8[8];

            r = pwrite_flush(io, c0 + h->backing_file_offset,
                             h->backing_file_size, nbo);
            be64_store(off8, nbo);
            r = r ? r : pwrite_flush(io, off8, 8, 8);
            if (r) {
                return r;
            }
        }
        /* The extension's body and a new end marker go past the current
         * end marker, where readers do not look. */
        memcpy(c0 + p + 8, ext, 24);
        memset(c0 + p + 32, 0, 8);
        r = pwrite_flush(io, c0 + p + 8, 32, p + 8);
        if (r) {
            return r;
        }
        be32_store(hdr8, QCOW2_EXT_BITMAPS);
        be32_store(hdr8 + 4, 24);
        if (same_sector(88, p + 8)) {
            memcpy(c0 + 88, ac, 8);
            memcpy(c0 + p, hdr8, 8);
            return pwrite_flush(io, c0 + 88, p + 8 - 88, 88);
        }
        r = pwrite_flush(io, hdr8, 8, p);
        return r ? r : pwrite_flush(io, ac, 8, 88);
    }
    if (lay->ext_pos) {
        p = lay->ext_pos;
        if (lay->ext_last) {
            static const uint8_t zero8[8];

            if (same_sector(88, p + 8)) {
                memcpy(c0 + 88, ac, 8);
                memset(c0 + p, 0, 8);
                return pwrite_flush(io, c0 + 88, p + 8 - 88, 88);
            }
            r = pwrite_flush(io, ac, 8, 88);
            return r ? r : pwrite_flush(io, zero8, 8, p);
        }
        /* Other extensions follow: shift them down by 32 bytes in one
         * write, which header_plan() made sure fits in sector 0. */
        memcpy(c0 + 88, ac, 8);
        memmove(c0 + p, c0 + p + 32, lay->end_pos + 8 - (p + 32));
        memset(c0 + lay->end_pos - 24, 0, 32);
        return pwrite_flush(io, c0 + 88, lay->end_pos + 8 - 88, 88);
    }
    if (new_ac != old_ac) {
        return pwrite_flush(io, ac, 8, 88);
    }
    return 0;
}

static int hook_new_blocks(struct qbm_txn *t)
{
    struct qbm_io *io = t->img->io;
    uint64_t i;
    int r;

    if (t->rt_grown) {
        uint8_t *buf = qbm_calloc(t->rt_clusters, t->cs);
        uint8_t hdr12[12];

        if (!buf) {
            return -ENOMEM;
        }
        for (i = 0; i < t->rt_entries; i++) {
            be64_store(buf + i * 8, t->rt[i]);
        }
        r = qbm_io_pwrite(io, buf, t->rt_clusters * t->cs, t->rt_offset);
        free(buf);
        r = r ? r : qbm_io_flush(io);
        if (r) {
            return r;
        }
        /* Offset and size of the table in one 12-byte write (sector 0). */
        be64_store(hdr12, t->rt_offset);
        be32_store(hdr12 + 8, (uint32_t)t->rt_clusters);
        return pwrite_flush(io, hdr12, 12, 48);
    }
    bool any = false;

    for (i = 0; i < t->rt_entries; i++) {
        struct rc_block *b = t->blocks[i];
        uint8_t e[8];

        if (b && b->is_new) {
            any = true;
            be64_store(e, b->offset);
            r = qbm_io_pwrite(io, e, 8,
                              t->img->hdr.refcount_table_offset + i * 8);
            if (r < 0) {
                return r;
            }
            b->is_new = false;
        }
    }
    return any ? qbm_io_flush(io) : 0;
}

static int apply_frees(struct qbm_txn *t)
{
    size_t i;
    uint64_t c;
    int r;

    for (i = 0; i < t->nfrees; i++) {
        uint64_t first = t->frees[i][0] / t->cs;
        uint64_t end = div_round_up(t->frees[i][0] + t->frees[i][1], t->cs);
        uint64_t refs = t->frees[i][2];

        for (c = first; c < end; c++) {
            uint64_t rc;

            r = get_refcount(t, c, &rc);
            if (r < 0) {
                return r;
            }
            /* A refcount below what is released would be someone else's
             * bug; going below zero would only make things worse. */
            if (rc > 0) {
                r = set_refcount(t, c, rc > refs ? rc - refs : 0);
                if (r < 0) {
                    return r;
                }
            }
        }
    }
    return 0;
}

int qbm_txn_refcount(struct qbm_txn *t, uint64_t offset, uint64_t *ret)
{
    return get_refcount(t, offset / t->cs, ret);
}

int qbm_txn_commit_write(struct qbm_txn *t, const void *buf, size_t len,
                         uint64_t off)
{
    struct qbm_io *io = t->img->io;
    int r = 0;

    if (len == 0 || off + len > t->cs || !same_sector(off, off + len)) {
        r = qbm_err(EINVAL, "internal: switch write is not atomic");
    }
    r = r ? r : write_blocks(t);
    r = r ? r : qbm_io_flush(io);
    r = r ? r : hook_new_blocks(t);
    r = r ? r : pwrite_flush(io, buf, len, off);
    r = r ? r : apply_frees(t);
    r = r ? r : write_blocks(t);
    r = r ? r : qbm_io_flush(io);
    qbm_txn_abort(t);
    return r;
}

int qbm_txn_commit(struct qbm_txn *t, uint32_t nb_bitmaps,
                   uint64_t dir_offset, uint64_t dir_size)
{
    struct header_layout lay = { 0 };
    struct qbm_io *io = t->img->io;
    int r;

    bool keep = nb_bitmaps == QBM_TXN_KEEP_HEADER;

    r = keep ? 0 : read_layout(t, &lay);
    r = r ? r : keep ? 0 : header_plan(t, &lay, nb_bitmaps);
    /* 1-3: refcount increments and new refcount structures, durable
     * before anything refers to the new clusters. */
    r = r ? r : write_blocks(t);
    r = r ? r : qbm_io_flush(io);
    r = r ? r : hook_new_blocks(t);
    /* 4: the switch. */
    r = r ? r : keep ? 0 : header_switch(t, &lay, nb_bitmaps, dir_offset,
                                         dir_size);
    /* 5: only now release what the old state used. */
    r = r ? r : apply_frees(t);
    r = r ? r : write_blocks(t);
    r = r ? r : qbm_io_flush(io);
    free(lay.c0);
    qbm_txn_abort(t);
    return r;
}
