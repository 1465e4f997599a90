/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * The allocator of a transaction: a working copy of the refcount table and
 * of the refcount blocks it touches, cluster allocation over them, sharing
 * and deferred releases, and writing the changed refcounts out (qcow2
 * spec, "Host cluster management"; docs/design.md, "Crash-safe
 * transactions").
 *
 * Nothing here reaches the disk before qbm_alloc_write(): the caller (the
 * commit in txn.c) decides when refcounts become durable. A cluster whose
 * refcount says "free" but which holds known metadata (the index of
 * image-meta.c) is refused as corruption, never handed out.
 */
#include <stdlib.h>

#include "internal.h"

#define SECTOR 512

struct rc_block {
    uint64_t offset; /* host offset of the block */
    uint8_t *buf;
    uint8_t *orig; /* a live block as read, for a rollback; NULL if created */
    bool dirty;
    bool created; /* by this transaction, in a cluster it allocated */
    bool is_new;  /* created here: its reftable entry must be written */
    bool hooked;  /* created here and its reftable entry written */
    uint64_t dirty_lo, dirty_hi;     /* bytes changed since the last write */
    uint64_t written_lo, written_hi; /* bytes of a live block overwritten */
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

/* A run of clusters allocated by this transaction (bytes). */
struct alloc_run {
    uint64_t offset, length;
};
QBM_DARRAY(alloc_runs, struct alloc_run);

/* A run to release after the commit: its clusters lose `refs` references
 * each. */
struct release {
    uint64_t offset, length; /* bytes */
    uint64_t refs;
};
QBM_DARRAY(releases, struct release);

struct qbm_alloc {
    struct qbm_image *img;
    struct qcow2_meta_index *meta; /* never handed out, whatever the
                                    * refcounts say */
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

    struct alloc_runs allocs; /* writes are only allowed there */
    struct releases releases; /* applied after the commit */

    uint64_t hint;    /* next cluster index to try */
    uint64_t old_end; /* the image end before the transaction */
    bool rt_switched; /* the header may point to the grown table */
};

/* ---- refcount blocks ---------------------------------------------------- */

static void free_blocks(struct qbm_alloc *a)
{
    uint64_t i;

    if (!a->blocks) {
        return;
    }
    for (i = 0; i < a->rt_entries; i++) {
        if (a->blocks[i]) {
            free(a->blocks[i]->buf);
            free(a->blocks[i]->orig);
            free(a->blocks[i]);
        }
    }
    free(a->blocks);
    a->blocks = NULL;
}

/* The block for reftable index rt, or NULL when none exists (refcounts in
 * its range are all 0). */
static int get_block(struct qbm_alloc *a, uint64_t rt, struct rc_block **ret)
{
    struct rc_block *b;
    uint64_t off;
    int r;

    if (a->blocks[rt]) {
        *ret = a->blocks[rt];
        return 0;
    }
    off = a->rt[rt] & REFT_OFFSET_MASK;
    if (off == 0) {
        *ret = NULL;
        return 0;
    }
    if (!is_aligned(off, a->cs)) {
        return qbm_err(EINVAL,
                       "refcount table entry %llu: block offset "
                       "0x%llx not cluster aligned",
                       (unsigned long long)rt, (unsigned long long)off);
    }
    b = qbm_calloc(1, sizeof(*b));
    if (!b) {
        return -ENOMEM;
    }
    b->buf = qbm_malloc(a->cs);
    b->orig = qbm_malloc(a->cs);
    r = b->buf && b->orig ? 0 : -ENOMEM;
    r = r ? r
          : qbm_image_read_meta(a->img, b->buf, a->cs, off, "refcount block");
    if (r < 0) {
        free(b->buf);
        free(b->orig);
        free(b);
        return r;
    }
    memcpy(b->orig, b->buf, a->cs);
    b->offset = off;
    a->blocks[rt] = b;
    *ret = b;
    return 0;
}

/* A cluster whose refcount is 0 must hold no known metadata: one that
 * does is never handed out (design.md, "Crash-safe transactions", 1). */
static int check_free(const struct qbm_alloc *a, uint64_t cluster)
{
    const char *what = qcow2_meta_index_find(a->meta, cluster);

    if (what) {
        return qbm_err(EUCLEAN,
                       "refcount of cluster 0x%llx is 0 but it "
                       "holds the %s: the image is corrupt (try qemu-img "
                       "check -r all)",
                       (unsigned long long)(cluster * a->cs), what);
    }
    return 0;
}

/* Create the missing block for index rt in the first cluster of the range
 * it covers, where it describes itself. */
static int new_block_at(struct qbm_alloc *a, uint64_t rt, uint64_t cluster)
{
    struct rc_block *b;
    int r = check_free(a, cluster);

    if (r < 0) {
        return r;
    }
    b = qbm_calloc(1, sizeof(*b));
    if (!b) {
        return -ENOMEM;
    }
    b->buf = qbm_calloc(1, a->cs);
    if (!b->buf) {
        free(b);
        return -ENOMEM;
    }
    b->offset = cluster * a->cs;
    mark_dirty(b, 0, a->cs); /* a new cluster: written whole */
    b->is_new = true;
    b->created = true;
    a->blocks[rt] = b;
    a->rt[rt] = b->offset;
    if (cluster / a->per_block == rt) {
        qcow2_refblock_set(b->buf, a->bits, cluster % a->per_block, 1);
    }
    return 0;
}

static int get_refcount(struct qbm_alloc *a, uint64_t c, uint64_t *ret)
{
    uint64_t rt = c / a->per_block;
    struct rc_block *b;
    int r;

    if (rt >= a->rt_entries) {
        *ret = 0;
        return 0;
    }
    r = get_block(a, rt, &b);
    if (r < 0) {
        return r;
    }
    *ret = b ? qcow2_refblock_entry(b->buf, a->bits, c % a->per_block) : 0;
    return 0;
}

static int set_refcount(struct qbm_alloc *a, uint64_t c, uint64_t value)
{
    uint64_t rt = c / a->per_block;
    struct rc_block *b;
    int r;

    if (rt >= a->rt_entries) {
        return qbm_err(EINVAL,
                       "internal: cluster 0x%llx outside the "
                       "refcount table",
                       (unsigned long long)(c * a->cs));
    }
    r = get_block(a, rt, &b);
    if (r < 0) {
        return r;
    }
    if (!b) {
        r = new_block_at(a, rt, rt * a->per_block);
        if (r < 0) {
            return r;
        }
        b = a->blocks[rt];
    }
    qcow2_refblock_set(b->buf, a->bits, c % a->per_block, value);
    mark_dirty(b, (c % a->per_block) * a->bits / 8,
               ((c % a->per_block) * a->bits + a->bits + 7) / 8);
    return 0;
}

/*
 * Grow the refcount table so that it has at least `need` entries. The new
 * refblocks and the new table go at the first cluster the old table does
 * not cover (everything from there on is free), the blocks covering
 * themselves and the table; the table is oversized by half, as QEMU does.
 */
static int grow_reftable(struct qbm_alloc *a, uint64_t need)
{
    const struct qcow2_header *h = &a->img->hdr;
    uint64_t old_entries = a->rt_entries;
    uint64_t e0 = old_entries * a->per_block; /* first uncovered cluster */
    uint64_t entries = old_entries + old_entries / 2 + 1;
    uint64_t k, tbl, i;
    struct rc_block **blocks;
    uint64_t *rt;
    int r;

    if (entries < need) {
        entries = need;
    }
    for (;;) {
        tbl = div_round_up(entries * 8, a->cs);
        k = 1;
        while (k * a->per_block < k + tbl) {
            k++;
        }
        if (entries >= old_entries + k) {
            break;
        }
        entries = old_entries + k;
    }
    entries = tbl * a->cs / 8; /* use the whole clusters */
    if (tbl * a->cs > QCOW2_MAX_REFTABLE_BYTES) {
        return qbm_err(ENOSPC, "the refcount table would exceed 8 MiB");
    }
    rt = qbm_calloc(entries, sizeof(*rt));
    blocks = qbm_calloc(entries, sizeof(*blocks));
    if (!rt || !blocks) {
        free(rt);
        free(blocks);
        return -ENOMEM;
    }
    memcpy(rt, a->rt, old_entries * sizeof(*rt));
    memcpy(blocks, a->blocks, old_entries * sizeof(*blocks));
    free(a->rt);
    free(a->blocks);
    a->rt = rt;
    a->blocks = blocks;
    a->rt_entries = entries;

    /* A table grown earlier in this transaction never became live: give
     * its clusters back. */
    if (a->rt_grown) {
        for (i = 0; i < a->rt_clusters; i++) {
            r = set_refcount(a, a->rt_offset / a->cs + i, 0);
            if (r < 0) {
                return r;
            }
        }
    } else if (h->refcount_table_offset) {
        r = qbm_alloc_release_later(
            a, h->refcount_table_offset,
            (uint64_t)h->refcount_table_clusters * a->cs, 1);
        if (r < 0) {
            return r;
        }
    }
    for (i = 0; i < k; i++) {
        r = new_block_at(a, old_entries + i, e0 + i);
        if (r < 0) {
            return r;
        }
    }
    for (i = 0; i < k + tbl; i++) {
        r = set_refcount(a, e0 + i, 1);
        if (r < 0) {
            return r;
        }
    }
    a->rt_grown = true;
    a->rt_offset = (e0 + k) * a->cs;
    a->rt_clusters = tbl;
    return 0;
}

/* ---- allocation --------------------------------------------------------- */

void qbm_alloc_free(struct qbm_alloc *a)
{
    if (!a) {
        return;
    }
    free_blocks(a);
    qcow2_meta_index_free(a->meta);
    free(a->rt);
    qbm_darray_free(&a->allocs);
    qbm_darray_free(&a->releases);
    free(a);
}

int qbm_alloc_new(struct qbm_image *img, struct qbm_alloc **ret)
{
    struct qbm_alloc *a = qbm_calloc(1, sizeof(*a));
    int r;

    if (!a) {
        return -ENOMEM;
    }
    a->img = img;
    a->cs = img->cluster_size;
    a->bits = img->refcount_bits;
    a->per_block = a->cs * 8 / a->bits;
    a->rt_entries = img->reftable_entries;
    a->rt = qbm_malloc(a->rt_entries * sizeof(*a->rt));
    a->blocks = qbm_calloc(a->rt_entries, sizeof(*a->blocks));
    if (!a->rt || !a->blocks) {
        qbm_alloc_free(a);
        return -ENOMEM;
    }
    memcpy(a->rt, img->reftable, a->rt_entries * sizeof(*a->rt));
    /* Before anything relies on the refcount blocks, check where they lie
     * against the other structures. */
    r = qcow2_meta_index_build(img, &a->meta);
    r = r ? r : qcow2_meta_index_check_refcounts(a->meta);
    r = r ? r : qcow2_refcount_end(img, &a->old_end);
    if (r < 0) {
        qbm_alloc_free(a);
        return r;
    }
    *ret = a;
    return 0;
}

int qbm_alloc_clusters(struct qbm_alloc *a, uint64_t n, uint64_t *ret_offset)
{
    uint64_t c = a->hint, start = 0, run = 0, i;
    struct alloc_run run_bytes;
    int r;

    if (n == 0) {
        return qbm_err(EINVAL, "internal: empty allocation");
    }
    while (run < n) {
        uint64_t rt = c / a->per_block, rc;

        if (rt >= a->rt_entries) {
            r = grow_reftable(a, rt + (n - run) / a->per_block + 2);
            if (r < 0) {
                return r;
            }
            run = 0;
            continue;
        }
        if (!(a->rt[rt] & REFT_OFFSET_MASK)) {
            r = new_block_at(a, rt, rt * a->per_block);
            if (r < 0) {
                return r;
            }
            if (c == rt * a->per_block) {
                run = 0;
                c++;
                continue;
            }
        }
        r = get_refcount(a, c, &rc);
        if (r < 0) {
            return r;
        }
        if (rc == 0) {
            r = check_free(a, c);
            if (r < 0) {
                return r;
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
        r = set_refcount(a, start + i, 1);
        if (r < 0) {
            return r;
        }
    }
    run_bytes.offset = start * a->cs;
    run_bytes.length = n * a->cs;
    if (a->allocs.n && a->allocs.v[a->allocs.n - 1].offset +
                               a->allocs.v[a->allocs.n - 1].length ==
                           run_bytes.offset) {
        /* Right after the previous run: one run, checked at once. */
        a->allocs.v[a->allocs.n - 1].length += run_bytes.length;
    } else {
        r = qbm_darray_push(&a->allocs, run_bytes, 0);
        if (r < 0) {
            return r;
        }
    }
    a->hint = start + n;
    *ret_offset = start * a->cs;
    return 0;
}

/* Whether n free clusters in a row lie below the image end, from the hint
 * on; nothing is changed (ranges without a refcount block are skipped). */
static int hole_for(struct qbm_alloc *a, uint64_t n, bool *ret)
{
    struct qbm_space sp;
    uint64_t c, end, run = 0, rc;
    int r;

    *ret = false;
    qbm_alloc_space(a, &sp);
    end = sp.end_after / a->cs;
    for (c = a->hint; c < end; c++) {
        uint64_t rt = c / a->per_block;

        if (rt >= a->rt_entries) {
            break;
        }
        if (!(a->rt[rt] & REFT_OFFSET_MASK)) {
            run = 0;
            c = (rt + 1) * a->per_block - 1;
            continue;
        }
        r = get_refcount(a, c, &rc);
        if (r < 0) {
            return r;
        }
        if (rc == 0 && !qcow2_meta_index_find(a->meta, c)) {
            if (++run == n) {
                *ret = true;
                return 0;
            }
        } else {
            run = 0;
        }
    }
    return 0;
}

int qbm_alloc_run(struct qbm_alloc *a, uint64_t n, uint64_t *ret_offset,
                  uint64_t *ret_n)
{
    /* A new refcount block takes the first cluster of its range, so free
     * space past the covered part never holds a run longer than a range
     * minus one: half a range is always found. */
    uint64_t most = a->per_block / 2 ? a->per_block / 2 : 1;
    bool hole = true;
    int r = 0;

    *ret_n = n < most ? n : most;
    /* Never grow the image for the sake of a run: without a hole for it
     * below the end, one cluster, first fit, as any allocation. */
    if (*ret_n > 1 && a->hint < a->old_end / a->cs) {
        r = hole_for(a, *ret_n, &hole);
    }
    if (r < 0) {
        return r;
    }
    *ret_n = hole ? *ret_n : 1;
    return qbm_alloc_clusters(a, *ret_n, ret_offset);
}

int qbm_alloc_share(struct qbm_alloc *a, uint64_t off, bool *ret_shared)
{
    uint64_t c = off / a->cs, rc, max;
    int r;

    *ret_shared = false;
    max = a->bits == 64 ? UINT64_MAX : (1ull << a->bits) - 1;
    if (!is_aligned(off, a->cs) || c / a->per_block >= a->rt_entries) {
        return 0;
    }
    r = get_refcount(a, c, &rc);
    if (r < 0) {
        return r;
    }
    /* A refcount of 0 means the cluster is not live (a corrupt table):
     * sharing would resurrect whatever it holds now. */
    if (rc == 0 || rc >= max) {
        return 0;
    }
    r = set_refcount(a, c, rc + 1);
    if (r < 0) {
        return r;
    }
    *ret_shared = true;
    return 0;
}

int qbm_alloc_check_owned(const struct qbm_alloc *a, uint64_t off, size_t len)
{
    uint64_t pos = off, end = off + len;
    size_t i;

    /* Only clusters this transaction allocated may be written before the
     * commit: a last line of defence against overwriting live data. A
     * batch may span runs allocated one after the other. */
    while (pos < end || len == 0) {
        for (i = 0; i < a->allocs.n; i++) {
            const struct alloc_run *run = &a->allocs.v[i];

            if (pos >= run->offset && pos - run->offset < run->length) {
                break;
            }
        }
        if (i == a->allocs.n) {
            return qbm_err(EFAULT,
                           "internal: write at 0x%llx outside the clusters "
                           "allocated by this transaction",
                           (unsigned long long)pos);
        }
        if (len == 0) {
            break;
        }
        pos = a->allocs.v[i].offset + a->allocs.v[i].length;
    }
    return 0;
}

int qbm_alloc_release_later(struct qbm_alloc *a, uint64_t off, uint64_t len,
                            uint64_t refs)
{
    struct release rel = { .offset = off, .length = len, .refs = refs };

    if (len == 0 || refs == 0) {
        return 0;
    }
    return qbm_darray_push(&a->releases, rel, 0);
}

/* ---- writing the refcounts out ------------------------------------------ */

static int write_block(struct qbm_alloc *a, struct rc_block *b)
{
    /* Only the sectors that changed: less to write and flush. */
    uint64_t lo = b->dirty_lo / SECTOR * SECTOR;
    uint64_t hi = div_round_up(b->dirty_hi, SECTOR) * SECTOR;
    int r;

    if (hi > a->cs) {
        hi = a->cs;
    }
    if (!b->created) {
        /* Recorded before the write: a failed write may have landed. */
        if (b->written_hi == 0 || lo < b->written_lo) {
            b->written_lo = lo;
        }
        if (hi > b->written_hi) {
            b->written_hi = hi;
        }
    }
    r = qbm_io_pwrite(a->img->io, b->buf + lo, hi - lo, b->offset + lo);
    if (r == 0) {
        b->dirty = false;
    }
    return r;
}

int qbm_alloc_write(struct qbm_alloc *a)
{
    uint64_t i;
    int pass, r;

    /* Blocks in new clusters first: if the disk is full, live blocks are
     * not touched yet. */
    for (pass = 0; pass < 2; pass++) {
        for (i = 0; i < a->rt_entries; i++) {
            struct rc_block *b = a->blocks[i];

            if (b && b->dirty && b->created == (pass == 0)) {
                r = write_block(a, b);
                if (r < 0) {
                    return r;
                }
            }
        }
    }
    return 0;
}

int qbm_alloc_hook(struct qbm_alloc *a)
{
    struct qbm_io *io = a->img->io;
    uint64_t i;
    int r;

    if (a->rt_grown) {
        uint8_t *buf = qbm_calloc(a->rt_clusters, a->cs);
        /* refcount_table_offset and refcount_table_clusters */
        uint8_t sw[QCOW2_HDR_NB_SNAPSHOTS - QCOW2_HDR_REFCOUNT_TABLE_OFFSET];

        if (!buf) {
            return -ENOMEM;
        }
        for (i = 0; i < a->rt_entries; i++) {
            be64_store(buf + i * 8, a->rt[i]);
        }
        r = qbm_io_pwrite(io, buf, a->rt_clusters * a->cs, a->rt_offset);
        free(buf);
        r = r ? r : qbm_io_flush(io);
        if (r) {
            return r;
        }
        /* Offset and size of the table in one write inside sector 0. */
        a->rt_switched = true;
        be64_store(sw, a->rt_offset); /* sw starts at the offset */
        be32_store(sw + QCOW2_HDR_REFCOUNT_TABLE_CLUSTERS -
                       QCOW2_HDR_REFCOUNT_TABLE_OFFSET,
                   (uint32_t)a->rt_clusters);
        return qcow2_header_write(io, sw, sizeof(sw),
                                  QCOW2_HDR_REFCOUNT_TABLE_OFFSET);
    }
    bool any = false;

    for (i = 0; i < a->rt_entries; i++) {
        struct rc_block *b = a->blocks[i];
        uint8_t e[8];

        if (b && b->is_new) {
            any = true;
            b->hooked = true;
            be64_store(e, b->offset);
            r = qbm_io_pwrite(io, e, 8,
                              a->img->hdr.refcount_table_offset + i * 8);
            if (r < 0) {
                return r;
            }
            b->is_new = false;
        }
    }
    return any ? qbm_io_flush(io) : 0;
}

int qbm_alloc_apply_releases(struct qbm_alloc *a)
{
    size_t i;
    uint64_t c;
    int r;

    for (i = 0; i < a->releases.n; i++) {
        const struct release *rel = &a->releases.v[i];
        uint64_t first = rel->offset / a->cs;
        uint64_t end = div_round_up(rel->offset + rel->length, a->cs);
        uint64_t refs = rel->refs;

        for (c = first; c < end; c++) {
            uint64_t rc;

            r = get_refcount(a, c, &rc);
            if (r < 0) {
                return r;
            }
            /* A refcount below what is released would be someone else's
             * bug; going below zero would only make things worse. */
            if (rc > 0) {
                r = set_refcount(a, c, rc > refs ? rc - refs : 0);
                if (r < 0) {
                    return r;
                }
            }
        }
    }
    return 0;
}

int qbm_alloc_refcount(struct qbm_alloc *a, uint64_t offset, uint64_t *ret)
{
    return get_refcount(a, offset / a->cs, ret);
}

/* ---- space and rollback ------------------------------------------------- */

/* Call fn on every run of clusters the transaction writes: allocated
 * clusters, refcount blocks it created, a grown refcount table. */
static int for_each_new_run(struct qbm_alloc *a,
                            int (*fn)(struct qbm_alloc *a, uint64_t off,
                                      uint64_t len, void *opaque),
                            void *opaque)
{
    uint64_t i;
    size_t k;
    int r;

    for (k = 0; k < a->allocs.n; k++) {
        r = fn(a, a->allocs.v[k].offset, a->allocs.v[k].length, opaque);
        if (r < 0) {
            return r;
        }
    }
    for (i = 0; i < a->rt_entries; i++) {
        if (a->blocks[i] && a->blocks[i]->created) {
            r = fn(a, a->blocks[i]->offset, a->cs, opaque);
            if (r < 0) {
                return r;
            }
        }
    }
    return a->rt_grown ? fn(a, a->rt_offset, a->rt_clusters * a->cs, opaque)
                       : 0;
}

static int add_run(struct qbm_alloc *a, uint64_t off, uint64_t len,
                   void *opaque)
{
    struct qbm_space *sp = opaque;

    sp->bytes += len;
    if (off + len > sp->end_after) {
        sp->end_after = off + len;
    }
    return 0;
}

void qbm_alloc_space(struct qbm_alloc *a, struct qbm_space *ret)
{
    memset(ret, 0, sizeof(*ret));
    ret->end_before = ret->end_after = a->old_end;
    for_each_new_run(a, add_run, ret);
}

/* Adjacent runs (clusters allocated one by one) are reserved together. */
struct reserve_state {
    uint64_t off, len;
};

static int reserve_run(struct qbm_alloc *a, uint64_t off, uint64_t len,
                       void *opaque)
{
    struct reserve_state *st = opaque;
    int r = 0;

    if (st->len && st->off + st->len == off) {
        st->len += len;
        return 0;
    }
    if (st->len) {
        r = qbm_io_reserve(a->img->io, st->off, st->len);
    }
    st->off = off;
    st->len = len;
    return r;
}

int qbm_alloc_reserve(struct qbm_alloc *a)
{
    struct reserve_state st = { 0 };
    int r = for_each_new_run(a, reserve_run, &st);

    return r || !st.len ? r : qbm_io_reserve(a->img->io, st.off, st.len);
}

int qbm_alloc_rollback(struct qbm_alloc *a)
{
    const struct qcow2_header *h = &a->img->hdr;
    struct qbm_io *io = a->img->io;
    uint8_t zero[8] = { 0 };
    uint64_t i;
    int r = 0;

    /* Unhook first (nothing live may point at a new block when its
     * clusters become free again), then give the live blocks their old
     * bytes back. */
    if (a->rt_switched) {
        uint8_t sw[QCOW2_HDR_NB_SNAPSHOTS - QCOW2_HDR_REFCOUNT_TABLE_OFFSET];

        be64_store(sw, h->refcount_table_offset);
        be32_store(sw + QCOW2_HDR_REFCOUNT_TABLE_CLUSTERS -
                       QCOW2_HDR_REFCOUNT_TABLE_OFFSET,
                   h->refcount_table_clusters);
        r = qcow2_header_write(io, sw, sizeof(sw),
                               QCOW2_HDR_REFCOUNT_TABLE_OFFSET);
    }
    for (i = 0; i < a->rt_entries && r == 0; i++) {
        struct rc_block *b = a->blocks[i];

        if (b && b->hooked && !a->rt_grown) {
            r = qbm_io_pwrite(io, zero, 8, h->refcount_table_offset + i * 8);
        }
    }
    r = r ? r : qbm_io_flush(io);
    for (i = 0; i < a->rt_entries && r == 0; i++) {
        struct rc_block *b = a->blocks[i];

        if (b && b->orig && b->written_hi > b->written_lo) {
            r = qbm_io_pwrite(io, b->orig + b->written_lo,
                              b->written_hi - b->written_lo,
                              b->offset + b->written_lo);
        }
    }
    return r ? r : qbm_io_flush(io);
}
