/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * Where an image's metadata lies (qcow2 spec, "Host cluster management",
 * "Cluster mapping", "Snapshots", "Bitmaps"; docs/design.md, "Validation").
 *
 * One enumerator, qcow2_meta_walk(), finds every structure qbm knows, from
 * the header down to the data clusters, once per reference. Both its users
 * rely on it being complete: check counts the references it reports and
 * compares them with the refcounts, and the overlap index built here keeps
 * the allocator from handing out a cluster that holds metadata although
 * its refcount says it is free (a corrupt image). Like QEMU's check, it
 * follows every L1 entry, also those past the virtual size and those of
 * internal snapshots, into their L2 tables.
 *
 * Its cost follows the file, not the sizes the header claims: L1 tables
 * are read 64 KiB at a time and only up to the end of the file, L2 tables
 * (read only when data clusters are asked for) and bitmap tables only the
 * part inside it; past the end everything reads as zeros and references
 * nothing. An L2 table is walked once however many L1 entries point to
 * it: a first pass over the L1 tables counts the entries per L2 table, and
 * its data clusters are reported once with that count (the references QEMU
 * counts: an L2 table shared by a snapshot and the active L1 table gives
 * its data refcount 2), so that thousands of L1 entries pointing to one
 * table cost thousands of entries, not thousands of tables.
 */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>

#include "internal.h"

#define REPAIR "; repair with 'qemu-img check -r all'"

/* ---- the enumerator ------------------------------------------------------ */

static const char *const kind_names[] = {
    [QCOW2_META_HEADER] = "header",
    [QCOW2_META_REFTABLE] = "refcount table",
    [QCOW2_META_REFBLOCK] = "refcount block",
    [QCOW2_META_L1] = "L1 table",
    [QCOW2_META_SNAPSHOT_TABLE] = "snapshot table",
    [QCOW2_META_SNAPSHOT_L1] = "snapshot L1 table",
    [QCOW2_META_L2] = "L2 table",
    [QCOW2_META_DATA] = "data cluster",
    [QCOW2_META_COMPRESSED] = "compressed cluster",
    [QCOW2_META_CRYPTO] = "encryption header",
    [QCOW2_META_BITMAP_DIR] = "bitmap directory",
    [QCOW2_META_STALE_BITMAP_DIR] = "stale bitmap directory",
    [QCOW2_META_BITMAP_TABLE] = "bitmap table",
    [QCOW2_META_BITMAP_DATA] = "bitmap data",
};

/* An L2 table inside the file: the L1 entries pointing to it (saturating),
 * and whether its data has been reported. */
struct l2_use {
    uint64_t off; /* 0: a free slot */
    uint32_t refs;
    bool walked;
};

/* The L2 tables by offset: open addressing, linear probing, at most half
 * full (cap a power of two). At most one per cluster of the file. */
struct l2_uses {
    struct l2_use *v;
    size_t n, cap;
};

struct walk {
    struct qbm_image *img;
    unsigned flags;
    qcow2_meta_fn fn;
    qcow2_meta_problem_fn problem_fn;
    void *opaque;
    uint64_t cs;
    uint64_t file_end;  /* everything past it reads as zeros */
    struct l2_uses l2s; /* with QCOW2_META_WALK_DATA */
};

static struct l2_use *l2_slot(const struct l2_uses *u, uint64_t off)
{
    size_t i = (size_t)((off * 0x9e3779b97f4a7c15ull) >> 32) & (u->cap - 1);

    while (u->v[i].off && u->v[i].off != off) {
        i = (i + 1) & (u->cap - 1);
    }
    return &u->v[i];
}

/* Count one more L1 entry pointing to the L2 table at off (not 0). */
static int l2_use_add(struct l2_uses *u, uint64_t off)
{
    struct l2_use *slot;

    if ((u->n + 1) * 2 > u->cap) {
        struct l2_uses big = { .cap = u->cap ? u->cap * 2 : 256 };
        size_t i;

        big.v = qbm_calloc(big.cap, sizeof(*big.v));
        if (!big.v) {
            return -ENOMEM;
        }
        for (i = 0; i < u->cap; i++) {
            if (u->v[i].off) {
                *l2_slot(&big, u->v[i].off) = u->v[i];
            }
        }
        big.n = u->n;
        free(u->v);
        *u = big;
    }
    slot = l2_slot(u, off);
    if (!slot->off) {
        slot->off = off;
        u->n++;
    }
    if (slot->refs < UINT32_MAX) {
        slot->refs++;
    }
    return 0;
}

/* Report a structure that `refs` references point to. */
static int found_refs(struct walk *w, struct qcow2_meta *m,
                      enum qcow2_meta_kind kind, uint64_t off, uint64_t len,
                      uint64_t owner, uint64_t index, uint32_t refs)
{
    *m = (struct qcow2_meta){
        .kind = kind,
        .what = kind_names[kind],
        .offset = off,
        .length = len,
        .owner = owner,
        .index = index,
        .refs = refs,
    };
    /* Reported even so, for the overlap index; the other structures are
     * checked where they are decoded (unaligned data is a bad entry). */
    if (kind == QCOW2_META_REFBLOCK || kind == QCOW2_META_L2) {
        m->misaligned = !is_aligned(off, w->cs);
    }
    return w->fn(w->opaque, m);
}

static int found(struct walk *w, struct qcow2_meta *m,
                 enum qcow2_meta_kind kind, uint64_t off, uint64_t len,
                 uint64_t owner, uint64_t index)
{
    return found_refs(w, m, kind, off, len, owner, index, 1);
}

static int problem(struct walk *w, const struct qcow2_meta *m, uint64_t at,
                   const char *fmt, ...) QBM_PRINTF(4, 5);

static int problem(struct walk *w, const struct qcow2_meta *m, uint64_t at,
                   const char *fmt, ...)
{
    char msg[512];
    va_list ap;

    if (!w->problem_fn) {
        return 0;
    }
    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    return w->problem_fn(w->opaque, m, at, msg);
}

/* The data clusters an L2 table points to, each reported with `refs`.
 * Entries past the end of the file read as zero and reference nothing:
 * they are not read. */
static int walk_l2(struct walk *w, const struct qcow2_meta *l2, uint32_t refs)
{
    struct qbm_image *img = w->img;
    bool data_file = img->hdr.incompatible_features & QBM_INCOMPAT_DATA_FILE;
    uint64_t n = img->l2_entries, j, end;
    struct qcow2_meta m;
    int r;

    if (l2->offset >= w->file_end && add_ok(l2->offset, w->cs, &end) &&
        end <= QCOW2_MAX_HOST_OFFSET) {
        return 0;
    }
    if (l2->offset < w->file_end && w->file_end - l2->offset < w->cs) {
        n = div_round_up(w->file_end - l2->offset, img->l2_entry_size);
    }
    r = qcow2_read_l2(img, l2->offset);
    if (r < 0) {
        return r;
    }
    for (j = 0; j < n; j++) {
        uint64_t e = be64_load(img->l2_cache + j * img->l2_entry_size);
        uint64_t off = e & L2E_OFFSET_MASK;

        if (e & L2E_COMPRESSED) {
            struct qcow2_compressed cd;

            /* Counted by the 512-byte sectors the data spans. */
            qcow2_compressed_decode(e, img->cluster_bits, &cd);
            r = found_refs(w, &m, QCOW2_META_COMPRESSED, cd.offset & ~511ull,
                           (cd.offset & 511) + cd.nb_bytes, l2->offset, j,
                           refs);
        } else if (e & L2E_STD_RESERVED_MASK) {
            r = problem(w, l2, l2->offset + j * 8,
                        "%s at 0x%llx, entry %llu: reserved bits set", l2->what,
                        (unsigned long long)l2->offset, (unsigned long long)j);
        } else if (!off || data_file) {
            r = 0;
        } else if (!is_aligned(off, w->cs)) {
            r = problem(w, l2, l2->offset + j * 8,
                        "%s at 0x%llx, entry %llu: data offset 0x%llx not "
                        "cluster aligned",
                        l2->what, (unsigned long long)l2->offset,
                        (unsigned long long)j, (unsigned long long)off);
        } else {
            r = found_refs(w, &m, QCOW2_META_DATA, off, w->cs, l2->offset, j,
                           refs);
        }
        if (r) {
            return r;
        }
    }
    return 0;
}

/* The entries of an L1 table in the file (n of them) for `entry`, read
 * 64 KiB at a time: 0, -errno or the first non-zero value of `entry`. */
static int l1_scan(struct walk *w, const struct qcow2_meta *l1, uint64_t n,
                   int (*entry)(struct walk *w, const struct qcow2_meta *l1,
                                uint64_t i, uint64_t e))
{
    enum { PIECE = 8192 };
    uint64_t i, k, len;
    uint8_t *buf;
    int r = 0;

    buf = qbm_malloc((n < PIECE ? n : PIECE) * 8);
    if (!buf) {
        return -ENOMEM;
    }
    for (i = 0; i < n && r == 0; i += len) {
        len = n - i < PIECE ? n - i : PIECE;
        r = qbm_image_read_meta(w->img, buf, len * 8, l1->offset + i * 8,
                                l1->what);
        for (k = 0; k < len && r == 0; k++) {
            uint64_t e = be64_load(buf + k * 8);

            if (e) { /* 0: unallocated, most entries of a sparse disk */
                r = entry(w, l1, i + k, e);
            }
        }
    }
    free(buf);
    return r;
}

/* The number of L1 entries in the file of an L1 table, or 0 when none or
 * the table lies beyond the largest image (refused by walk_l1). */
static uint64_t l1_in_file(struct walk *w, uint64_t l1_off, uint32_t l1_size)
{
    uint64_t bytes = (uint64_t)l1_size * 8, end;

    if (!add_ok(l1_off, bytes, &end) || end > QCOW2_MAX_HOST_OFFSET ||
        l1_off >= w->file_end) {
        return 0;
    }
    if (w->file_end - l1_off < bytes) {
        return div_round_up(w->file_end - l1_off, 8);
    }
    return l1_size;
}

/* The first pass: count an L1 entry pointing to an L2 table that will be
 * walked (cluster aligned, inside the file). */
static int l2_count_entry(struct walk *w, const struct qcow2_meta *l1,
                          uint64_t i, uint64_t e)
{
    uint64_t off = e & L1E_OFFSET_MASK;

    if (!off || !is_aligned(off, w->cs) || off >= w->file_end) {
        return 0;
    }
    return l2_use_add(&w->l2s, off);
}

static int l2_count(struct walk *w, enum qcow2_meta_kind kind, uint64_t l1_off,
                    uint32_t l1_size)
{
    struct qcow2_meta l1 = {
        .what = kind_names[kind],
        .offset = l1_off,
    };
    uint64_t n = l1_in_file(w, l1_off, l1_size);

    return n ? l1_scan(w, &l1, n, l2_count_entry) : 0;
}

/* The L2 table of entry i of an L1 table, and its data when first met. */
static int l1_entry(struct walk *w, const struct qcow2_meta *l1, uint64_t i,
                    uint64_t e)
{
    uint64_t pos = l1->offset + i * 8, off = e & L1E_OFFSET_MASK;
    struct qcow2_meta l2;
    struct l2_use *use;
    int r = 0;

    if (e & L1E_RESERVED_MASK) {
        r = problem(w, l1, pos, "%s at 0x%llx, entry %llu: reserved bits set",
                    l1->what, (unsigned long long)l1->offset,
                    (unsigned long long)i);
    }
    if (r || !off) {
        return r;
    }
    if (!is_aligned(off, w->cs)) {
        r = problem(w, l1, pos,
                    "%s at 0x%llx, entry %llu: L2 offset 0x%llx not cluster "
                    "aligned",
                    l1->what, (unsigned long long)l1->offset,
                    (unsigned long long)i, (unsigned long long)off);
    }
    r = r ? r : found(w, &l2, QCOW2_META_L2, off, w->cs, l1->offset, i);
    if (r || l2.misaligned || !(w->flags & QCOW2_META_WALK_DATA)) {
        return r;
    }
    use = w->l2s.cap ? l2_slot(&w->l2s, off) : NULL;
    if (!use || !use->off) {
        /* Not counted: past the end of the file, zeros to walk. */
        return walk_l2(w, &l2, 1);
    }
    if (use->walked) {
        return 0;
    }
    use->walked = true;
    return walk_l2(w, &l2, use->refs);
}

/*
 * An L1 table (all of its entries) and what it points to. The table is
 * read only up to the end of the file: entries past it read as zero, so a
 * table far larger than the file costs nothing.
 */
static int walk_l1(struct walk *w, enum qcow2_meta_kind kind, uint64_t l1_off,
                   uint32_t l1_size, uint64_t owner, uint64_t index)
{
    uint64_t bytes = (uint64_t)l1_size * 8, end, n;
    struct qcow2_meta l1;
    int r;

    if (l1_size == 0) {
        return 0;
    }
    r = found(w, &l1, kind, l1_off, bytes, owner, index);
    if (r) {
        return r;
    }
    if (!add_ok(l1_off, bytes, &end) || end > QCOW2_MAX_HOST_OFFSET) {
        return qbm_err(EINVAL,
                       "%s at 0x%llx: beyond the largest possible "
                       "image",
                       l1.what, (unsigned long long)l1_off);
    }
    n = l1_in_file(w, l1_off, l1_size);
    return n ? l1_scan(w, &l1, n, l1_entry) : 0;
}

/* The bitmaps: a stale directory is reported as such, and has no bitmaps
 * (QEMU ignores it). */
static int walk_bitmaps(struct walk *w)
{
    struct qbm_image *img = w->img;
    struct qcow2_meta m;
    uint64_t i;
    uint32_t k;
    int r;

    if (img->bitmaps_state == QBM_BITMAPS_NONE) {
        return 0;
    }
    r = found(w, &m,
              img->bitmaps_state == QBM_BITMAPS_STALE
                  ? QCOW2_META_STALE_BITMAP_DIR
                  : QCOW2_META_BITMAP_DIR,
              img->bm_ext.dir_offset, img->bm_ext.dir_size, 0, UINT64_MAX);
    for (k = 0; k < img->nb_bitmaps && r == 0; k++) {
        struct qcow2_bitmap *bm = &img->bitmaps[k];
        struct qcow2_meta table;

        if (bm->table_offset == 0) {
            continue; /* added in this session: nothing on disk yet */
        }
        r = found(w, &table, QCOW2_META_BITMAP_TABLE, bm->table_offset,
                  (uint64_t)bm->table_size * 8, bm->entry_offset, k);
        if (r) {
            break;
        }
        r = qcow2_bitmap_table_load(img, bm);
        if (r == -ENOMEM) {
            return r;
        }
        if (r < 0) {
            r = problem(w, &table, bm->table_offset, "%s", qbm_err_message());
            continue;
        }
        for (i = 0; i < bm->table_read && r == 0; i++) {
            uint64_t off = bm->table[i] & BME_TABLE_OFFSET_MASK;

            if (off) {
                r = found(w, &m, QCOW2_META_BITMAP_DATA, off, w->cs,
                          bm->table_offset, i);
            }
        }
    }
    return r;
}

int qcow2_meta_walk(struct qbm_image *img, unsigned flags, qcow2_meta_fn fn,
                    qcow2_meta_problem_fn problem_fn, void *opaque)
{
    const struct qcow2_header *h = &img->hdr;
    struct walk w = {
        .img = img,
        .flags = flags,
        .fn = fn,
        .problem_fn = problem_fn,
        .opaque = opaque,
        .cs = img->cluster_size,
    };
    struct qcow2_meta m;
    uint64_t i;
    size_t k;
    int r;

    r = qbm_io_size(img->io, &w.file_end);
    if (r == 0 && (flags & QCOW2_META_WALK_DATA)) {
        r = l2_count(&w, QCOW2_META_L1, h->l1_table_offset, h->l1_size);
        for (k = 0; k < img->nb_snapshots && r == 0; k++) {
            r = l2_count(&w, QCOW2_META_SNAPSHOT_L1,
                         img->snapshots[k].l1_table_offset,
                         img->snapshots[k].l1_size);
        }
    }
    r = r ? r : found(&w, &m, QCOW2_META_HEADER, 0, w.cs, 0, UINT64_MAX);
    r = r ? r
          : found(&w, &m, QCOW2_META_REFTABLE, h->refcount_table_offset,
                  (uint64_t)h->refcount_table_clusters * w.cs, 0, UINT64_MAX);
    for (i = 0; i < img->reftable_entries && r == 0; i++) {
        uint64_t off = img->reftable[i] & REFT_OFFSET_MASK;

        if (off) {
            r = found(&w, &m, QCOW2_META_REFBLOCK, off, w.cs,
                      h->refcount_table_offset, i);
        }
    }
    r = r ? r
          : walk_l1(&w, QCOW2_META_L1, h->l1_table_offset, h->l1_size, 0,
                    UINT64_MAX);
    if (r == 0 && img->nb_snapshots) {
        r = found(&w, &m, QCOW2_META_SNAPSHOT_TABLE, h->snapshots_offset,
                  img->snapshots_size, 0, UINT64_MAX);
    }
    for (k = 0; k < img->nb_snapshots && r == 0; k++) {
        const struct qcow2_snapshot *sn = &img->snapshots[k];

        r = walk_l1(&w, QCOW2_META_SNAPSHOT_L1, sn->l1_table_offset,
                    sn->l1_size, sn->entry_offset, k);
    }
    for (k = 0; k < h->nb_exts && r == 0; k++) {
        const struct qcow2_ext *e = &h->exts[k];

        if (e->magic == QCOW2_EXT_CRYPTO && e->len == 16) {
            r = found(&w, &m, QCOW2_META_CRYPTO, be64_load(e->data),
                      be64_load(e->data + 8), e->offset, UINT64_MAX);
        }
    }
    r = r ? r : walk_bitmaps(&w);
    free(w.l2s.v);
    return r;
}

/* ---- the overlap index --------------------------------------------------- */

/* A run of clusters that holds metadata. */
struct meta_range {
    uint64_t start, end; /* cluster indices, end exclusive */
    uint64_t off;        /* byte offset of the structure */
    uint64_t rt_index;   /* refcount blocks: their table entry; else
                          * UINT64_MAX */
    enum qcow2_meta_kind kind;
    const char *what;
};

QBM_DARRAY(meta_ranges, struct meta_range);

struct qcow2_meta_index {
    struct qbm_image *img;
    uint64_t cs;
    struct meta_ranges meta; /* sorted by start */
};

static int meta_add(struct qcow2_meta_index *mi, enum qcow2_meta_kind kind,
                    const char *what, uint64_t off, uint64_t len,
                    uint64_t rt_index)
{
    struct meta_range m = {
        .start = off / mi->cs,
        .off = off,
        .rt_index = rt_index,
        .kind = kind,
        .what = what,
    };
    uint64_t end;

    if (len == 0) {
        return 0;
    }
    if (!add_ok(off, len, &end)) {
        end = UINT64_MAX;
    }
    m.end = div_round_up(end, mi->cs);
    return qbm_darray_push(&mi->meta, m, 0);
}

static int index_found(void *opaque, const struct qcow2_meta *m)
{
    struct qcow2_meta_index *mi = opaque;

    return meta_add(mi, m->kind, m->what, m->offset, m->length,
                    m->kind == QCOW2_META_REFBLOCK ? m->index : UINT64_MAX);
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

void qcow2_meta_index_free(struct qcow2_meta_index *mi)
{
    if (!mi) {
        return;
    }
    qbm_darray_free(&mi->meta);
    free(mi);
}

/*
 * Every structure the enumerator finds, except data clusters (L2 tables
 * are not read: an edit of a huge disk's bitmaps need not walk its
 * allocation), plus what staged edits replace: the tables and data of
 * removed or rewritten bitmaps stay live until the switch. A bitmap table
 * that cannot be loaded is refused by the edits that read it; here it only
 * goes without its data clusters.
 */
int qcow2_meta_index_build(struct qbm_image *img, struct qcow2_meta_index **ret)
{
    struct qcow2_meta_index *mi = qbm_calloc(1, sizeof(*mi));
    size_t k;
    int r;

    if (!mi) {
        return -ENOMEM;
    }
    mi->img = img;
    mi->cs = img->cluster_size;
    r = qcow2_meta_walk(img, 0, index_found, NULL, mi);
    for (k = 0; k < img->pending_free.n && r == 0; k++) {
        r = meta_add(mi, QCOW2_META_BITMAP_DATA, "replaced bitmap cluster",
                     img->pending_free.v[k], mi->cs, UINT64_MAX);
    }
    if (r < 0) {
        qcow2_meta_index_free(mi);
        return r;
    }
    qsort(mi->meta.v, mi->meta.n, sizeof(*mi->meta.v), cmp_meta);
    *ret = mi;
    return 0;
}

/* ---- looking clusters up ------------------------------------------------ */

const char *qcow2_meta_index_find(const struct qcow2_meta_index *mi, uint64_t c)
{
    size_t lo = 0, hi = mi->meta.n, i;

    /* Ranges are sorted by start; find the last one starting <= c. Ranges
     * may overlap (corrupt images), so look back a little. */
    while (lo < hi) {
        size_t mid = (lo + hi) / 2;

        if (mi->meta.v[mid].start <= c) {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    for (i = lo; i > 0; i--) {
        const struct meta_range *m = &mi->meta.v[i - 1];

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
    if (m->kind != QCOW2_META_REFBLOCK && o->kind == QCOW2_META_REFBLOCK) {
        const struct meta_range *x = m;

        m = o; /* say it from the block's side when there is one */
        o = x;
    }
    if (m->kind != QCOW2_META_REFBLOCK) {
        return qbm_err(EUCLEAN,
                       "refcount table at 0x%llx: overlaps the %s "
                       "at 0x%llx" REPAIR,
                       (unsigned long long)m->off, o->what,
                       (unsigned long long)o->off);
    }
    if (o->kind == QCOW2_META_REFBLOCK) {
        return qbm_err(EUCLEAN,
                       "refcount table entries %llu at 0x%llx and "
                       "%llu at 0x%llx: both point to the refcount block at "
                       "0x%llx" REPAIR,
                       (unsigned long long)m->rt_index,
                       (unsigned long long)rt_entry_pos(mi, m->rt_index),
                       (unsigned long long)o->rt_index,
                       (unsigned long long)rt_entry_pos(mi, o->rt_index),
                       (unsigned long long)m->off);
    }
    return qbm_err(EUCLEAN,
                   "refcount table entry %llu at 0x%llx: refcount "
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
            ((uint64_t)h->refcount_table_clusters - 1) * mi->cs >=
        size) {
        return qbm_err(EUCLEAN,
                       "refcount table at 0x%llx: its %u clusters "
                       "run past the end of the file (0x%llx)" REPAIR,
                       (unsigned long long)h->refcount_table_offset,
                       h->refcount_table_clusters, (unsigned long long)size);
    }
    for (i = 0; i < img->reftable_entries; i++) {
        uint64_t e = img->reftable[i], off = e & REFT_OFFSET_MASK;
        unsigned long long pos = rt_entry_pos(mi, i);

        if (e & REFT_RESERVED_MASK) {
            return qbm_err(EUCLEAN,
                           "refcount table entry %llu at 0x%llx: "
                           "reserved bits set (0x%llx)" REPAIR,
                           (unsigned long long)i, pos, (unsigned long long)e);
        }
        if (off && !is_aligned(off, mi->cs)) {
            return qbm_err(EUCLEAN,
                           "refcount table entry %llu at 0x%llx: "
                           "offset 0x%llx is not cluster aligned" REPAIR,
                           (unsigned long long)i, pos, (unsigned long long)off);
        }
        if (off >= size) {
            return qbm_err(EUCLEAN,
                           "refcount table entry %llu at 0x%llx: "
                           "offset 0x%llx is past the end of the file "
                           "(0x%llx)" REPAIR,
                           (unsigned long long)i, pos, (unsigned long long)off,
                           (unsigned long long)size);
        }
    }
    /*
     * The index is sorted by start. A range overlapping a refcount
     * structure r either starts before it, and then the range reaching
     * furthest among those before r overlaps r too, or starts inside r,
     * and then so does the next range after r. Other overlaps (bitmap data
     * clusters shared between bitmaps, L2 tables between snapshots) are
     * legitimate.
     */
    for (k = 0; k < mi->meta.n; k++) {
        const struct meta_range *m = &mi->meta.v[k];
        size_t next = k + 1;

        if (m->kind == QCOW2_META_STALE_BITMAP_DIR) {
            continue; /* not live: anything may lie over it */
        }
        if (m->kind == QCOW2_META_REFTABLE || m->kind == QCOW2_META_REFBLOCK) {
            if (top != SIZE_MAX && mi->meta.v[top].end > m->start) {
                return overlap_err(mi, m, &mi->meta.v[top]);
            }
            while (next < mi->meta.n &&
                   mi->meta.v[next].kind == QCOW2_META_STALE_BITMAP_DIR) {
                next++;
            }
            if (next < mi->meta.n && mi->meta.v[next].start < m->end) {
                return overlap_err(mi, m, &mi->meta.v[next]);
            }
        }
        if (top == SIZE_MAX || m->end > mi->meta.v[top].end) {
            top = k;
        }
    }
    return 0;
}
