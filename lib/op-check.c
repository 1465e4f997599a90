/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * Consistency check and repair (reference notes sections 6 and 8).
 *
 * References are counted per host cluster from every structure qbm knows,
 * as qcow2_meta_walk() (image-meta.c) reports them, then compared with the
 * refcounts: fewer refcounts than references is corruption (a cluster
 * could be handed out twice), more is a leak. Leak repair relies on the
 * count being complete, so every L1 entry is walked, including those past
 * the virtual size (internal snapshots keep VM state there), and images
 * with unknown incompatible features never get here. The allocator's
 * overlap index is built by the same walk, so what check counts and what
 * an edit refuses to allocate over are the same structures.
 */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"

/* Refcounts may claim clusters a little past the end of the file. */
#define MAX_CLUSTERS_PAST_EOF (1ull << 24)
/* References are counted in pages of this many clusters, allocated on first
 * use: memory follows the references, not what the refcounts claim. */
#define REF_PAGE 4096

struct check {
    struct qbm_image *img;
    qbm_problem_fn fn;
    void *opaque;
    uint64_t cs;
    uint64_t file_end;  /* the file's size: everything past it reads as 0 */
    uint64_t per_block; /* refcounts per refcount block */
    uint32_t **refs;    /* nref / REF_PAGE pages, NULL until referenced */
    uint64_t nref;
    uint64_t ref_end; /* the last cluster with a reference, plus one */
    uint8_t *block;   /* the refcount block last read */
    uint64_t block_off;
    bool block_valid;
    uint64_t count[4];
    int stop; /* the callback asked to stop */
    int err;  /* -ENOMEM while counting */
};

static uint32_t refs_at(const struct check *c, uint64_t i)
{
    const uint32_t *page = c->refs[i / REF_PAGE];

    return page ? page[i % REF_PAGE] : 0;
}

static void refs_free(struct check *c)
{
    uint64_t i;

    for (i = 0; c->refs && i < div_round_up(c->nref, REF_PAGE); i++) {
        free(c->refs[i]);
    }
    free(c->refs);
}

static void problem(struct check *c, int kind, uint64_t off, const char *fmt,
                    ...) QBM_PRINTF(4, 5);

static void problem(struct check *c, int kind, uint64_t off, const char *fmt,
                    ...)
{
    char msg[512];
    va_list ap;

    c->count[kind]++;
    if (!c->fn || c->stop) {
        return;
    }
    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    c->stop = c->fn(c->opaque, kind, off, msg);
}

/* Count `refs` references to the clusters of [off, off + len). */
static void add_ref(struct check *c, uint64_t off, uint64_t len,
                    const char *what, uint32_t refs)
{
    uint64_t first = off / c->cs, end, i;

    if (len == 0) {
        return;
    }
    end = div_round_up(off + len, c->cs);
    if (off + len < off || end > c->nref) {
        problem(c, QBM_PROBLEM_CORRUPTION, off,
                "%s at 0x%llx: beyond the "
                "clusters the refcounts describe",
                what, (unsigned long long)off);
        end = c->nref;
    }
    if (first < end && end > c->ref_end) {
        c->ref_end = end;
    }
    for (i = first; i < end && !c->err; i++) {
        uint32_t **page = &c->refs[i / REF_PAGE];

        if (!*page && !(*page = qbm_calloc(REF_PAGE, sizeof(**page)))) {
            c->err = -ENOMEM;
            break;
        }
        (*page)[i % REF_PAGE] += refs < UINT32_MAX - (*page)[i % REF_PAGE]
                                     ? refs
                                     : UINT32_MAX - (*page)[i % REF_PAGE];
    }
}

/* An in-use bitmap's table: the bitmap, or NULL. */
static const struct qcow2_bitmap *in_use_bitmap(const struct check *c,
                                                const struct qcow2_meta *m)
{
    const struct qcow2_bitmap *bm;

    if (m->kind != QCOW2_META_BITMAP_TABLE) {
        return NULL;
    }
    bm = &c->img->bitmaps[m->index];
    return bm->flags & BME_FLAG_IN_USE ? bm : NULL;
}

/* Count one reference to each structure the enumerator finds. */
static int count_found(void *opaque, const struct qcow2_meta *m)
{
    struct check *c = opaque;
    const struct qcow2_bitmap *bm = in_use_bitmap(c, m);

    if (m->kind == QCOW2_META_STALE_BITMAP_DIR) {
        return 0; /* QEMU ignores it: its clusters are leaks */
    }
    if (bm) {
        problem(c, QBM_PROBLEM_BITMAP, bm->entry_offset,
                "bitmap '%s' is in "
                "use (inconsistent): QEMU did not store it back, so it "
                "cannot be used for incremental backups",
                bm->name);
    }
    /* Unaligned ones were reported as bad entries of their tables. */
    if (!m->misaligned) {
        add_ref(c, m->offset, m->length, m->what, m->refs);
    }
    return c->err ? c->err : c->stop ? 1 : 0;
}

/* A bad table entry is corruption; so is a bitmap table that cannot be
 * read, unless the bitmap is in use (already reported as lost). */
static int count_problem(void *opaque, const struct qcow2_meta *m, uint64_t at,
                         const char *msg)
{
    struct check *c = opaque;

    problem(c,
            in_use_bitmap(c, m) ? QBM_PROBLEM_BITMAP : QBM_PROBLEM_CORRUPTION,
            at, "%s", msg);
    return c->stop ? 1 : 0;
}

/* What the header says about the bitmaps, after their structures. */
static void check_bitmaps_state(struct check *c)
{
    struct qbm_image *img = c->img;

    if (img->bitmaps_state == QBM_BITMAPS_STALE) {
        problem(c, QBM_PROBLEM_BITMAP, QCOW2_HDR_AUTOCLEAR_FEATURES,
                "the bitmaps extension is stale (autoclear bit clear%s): "
                "QEMU ignores every bitmap and their clusters are leaked",
                img->hdr.version < 3 ? ", version 2 image" : "");
    }
    if (img->bitmaps_state == QBM_BITMAPS_NONE &&
        (img->hdr.autoclear_features & QBM_AUTOCLEAR_BITMAPS)) {
        problem(c, QBM_PROBLEM_BITMAP, QCOW2_HDR_AUTOCLEAR_FEATURES,
                "the autoclear \"bitmaps\" bit is set without a bitmaps "
                "extension (QEMU marks such an image corrupt on its next "
                "write)");
    }
}

/*
 * Refcount block rt of the table into c->block, or NULL when it is absent
 * or lies wholly past the end of the file (every refcount 0). The number of
 * its entries that lie inside the file (the rest read as 0) goes to
 * *ret_in_file. The last block read is kept: tables may repeat an offset.
 */
static int refblock(struct check *c, uint64_t rt, const uint8_t **ret,
                    uint64_t *ret_in_file)
{
    struct qbm_image *img = c->img;
    uint64_t off =
        rt < img->reftable_entries ? img->reftable[rt] & REFT_OFFSET_MASK : 0;
    uint64_t end;
    int r;

    *ret = NULL;
    *ret_in_file = 0;
    if (!off || (off >= c->file_end && add_ok(off, c->cs, &end) &&
                 end <= QCOW2_MAX_HOST_OFFSET)) {
        return 0;
    }
    if (!c->block) {
        c->block = qbm_malloc(c->cs);
        if (!c->block) {
            return -ENOMEM;
        }
    }
    if (!c->block_valid || c->block_off != off) {
        c->block_valid = false;
        r = qbm_image_read_meta(img, c->block, c->cs, off, "refcount block");
        if (r < 0) {
            return r;
        }
        c->block_off = off;
        c->block_valid = true;
    }
    *ret = c->block;
    *ret_in_file =
        off >= c->file_end ? 0
        : c->file_end - off >= c->cs
            ? c->per_block
            : div_round_up((c->file_end - off) * 8, img->refcount_bits);
    return 0;
}

/* The highest cluster with a non-zero refcount, plus one. */
static int refcounted_end(struct check *c, uint64_t *ret)
{
    struct qbm_image *img = c->img;
    uint64_t rt = img->reftable_entries, in_file, last;
    const uint8_t *block;
    int r;

    while (rt > 0) {
        uint64_t off = img->reftable[rt - 1] & REFT_OFFSET_MASK;

        rt--;
        if (!off || !is_aligned(off, c->cs)) {
            continue;
        }
        r = refblock(c, rt, &block, &in_file);
        if (r < 0) {
            return r;
        }
        last =
            block ? qcow2_refblock_last(block, img->refcount_bits, in_file) : 0;
        if (last) {
            *ret = rt * c->per_block + last;
            return 0;
        }
    }
    *ret = 0;
    return 0;
}

/* A cluster whose refcount exceeds its references, for leak repair. */
struct leak {
    uint64_t cluster;
    uint64_t excess;
};

QBM_DARRAY(leaks, struct leak);

/* Compare the refcount of cluster i with its references. */
static int compare_one(struct check *c, uint64_t i, uint64_t rc,
                       struct leaks *leaks)
{
    uint32_t refs = refs_at(c, i);

    if (rc < refs) {
        problem(c, QBM_PROBLEM_CORRUPTION, i * c->cs,
                "cluster 0x%llx: refcount %llu, but %u references",
                (unsigned long long)(i * c->cs), (unsigned long long)rc, refs);
    } else if (rc > refs) {
        problem(c, QBM_PROBLEM_LEAK, i * c->cs,
                "cluster 0x%llx leaked: refcount %llu, %u references",
                (unsigned long long)(i * c->cs), (unsigned long long)rc, refs);
        if (leaks) {
            struct leak l = { .cluster = i, .excess = rc - refs };
            int r = qbm_darray_push(leaks, l, 0);

            if (r < 0) {
                return r;
            }
        }
    }
    return 0;
}

/*
 * Compare refcounts with references; with `leaks`, collect the excess.
 * Block by block: where the refcounts are 0 (no block, or past the end of
 * the file) only clusters below the last reference can differ.
 */
static int compare(struct check *c, struct leaks *leaks)
{
    struct qbm_image *img = c->img;
    uint64_t i, rt;
    int r;

    for (i = 0; i < img->reftable_entries; i++) {
        uint64_t e = img->reftable[i], off = e & REFT_OFFSET_MASK;

        if (e & REFT_RESERVED_MASK) {
            problem(c, QBM_PROBLEM_CORRUPTION,
                    img->hdr.refcount_table_offset + i * 8,
                    "refcount table entry %llu: reserved bits set",
                    (unsigned long long)i);
        }
        if (off && !is_aligned(off, c->cs)) {
            problem(c, QBM_PROBLEM_CORRUPTION,
                    img->hdr.refcount_table_offset + i * 8,
                    "refcount table entry %llu: block 0x%llx not cluster "
                    "aligned",
                    (unsigned long long)i, (unsigned long long)off);
            return 0; /* refcounts cannot be read reliably */
        }
    }
    for (rt = 0; rt * c->per_block < c->nref && !c->stop; rt++) {
        uint64_t first = rt * c->per_block, end = c->nref, in_file;
        const uint8_t *block;

        if (end - first > c->per_block) {
            end = first + c->per_block;
        }
        if (first >= c->ref_end && rt >= img->reftable_entries) {
            break; /* no block and no reference from here on */
        }
        r = refblock(c, rt, &block, &in_file);
        if (r < 0) {
            return r;
        }
        if (end > first + in_file && end > c->ref_end) {
            /* Past both: refcount 0 and no reference. */
            end = first + in_file > c->ref_end ? first + in_file : c->ref_end;
        }
        for (i = first; i < end && !c->stop; i++) {
            uint64_t rc = 0;

            if (block && i - first < in_file) {
                rc = qcow2_refblock_entry(block, img->refcount_bits, i - first);
            } else if (!c->refs[i / REF_PAGE]) {
                /* Refcount 0 and no reference up to the next page. */
                i = (i / REF_PAGE + 1) * REF_PAGE - 1;
                continue;
            }
            r = compare_one(c, i, rc, leaks);
            if (r < 0) {
                return r;
            }
        }
    }
    return 0;
}

static int run_check(struct check *c, struct leaks *leaks)
{
    struct qbm_image *img = c->img;
    const struct qcow2_header *h = &img->hdr;
    uint64_t file_clusters, end = 0;
    int r;

    c->cs = img->cluster_size;
    c->per_block = c->cs * 8 / img->refcount_bits;
    r = qbm_io_size(img->io, &c->file_end);
    if (r < 0) {
        return r;
    }
    file_clusters = div_round_up(img->file_size, c->cs);
    r = refcounted_end(c, &end);
    if (r < 0) {
        return r;
    }
    c->nref = file_clusters > end ? file_clusters : end;
    if (c->nref > file_clusters + MAX_CLUSTERS_PAST_EOF) {
        problem(c, QBM_PROBLEM_CORRUPTION, 0,
                "refcounts claim clusters far "
                "past the end of the file (up to 0x%llx)",
                (unsigned long long)(end * c->cs));
        c->nref = file_clusters + MAX_CLUSTERS_PAST_EOF;
    }
    c->refs = qbm_calloc(div_round_up(c->nref, REF_PAGE) + 1, sizeof(*c->refs));
    if (!c->refs) {
        return -ENOMEM;
    }

    r = qcow2_meta_walk(img, QCOW2_META_WALK_DATA, count_found, count_problem,
                        c);
    if (r) {
        return r < 0 ? r : 0; /* > 0: the callback asked to stop */
    }
    check_bitmaps_state(c);
    if (h->incompatible_features & QBM_INCOMPAT_DIRTY) {
        problem(c, QBM_PROBLEM_CORRUPTION, QCOW2_HDR_INCOMPATIBLE_FEATURES,
                "the dirty bit is set: refcounts may be stale (lazy "
                "refcounts); 'qemu-img check -r all' rebuilds them");
    }
    if (h->incompatible_features & QBM_INCOMPAT_CORRUPT) {
        problem(c, QBM_PROBLEM_CORRUPTION, QCOW2_HDR_INCOMPATIBLE_FEATURES,
                "the image is marked corrupt");
    }
    return compare(c, leaks);
}

QBM_API int qbm_check(struct qbm_image *img, qbm_problem_fn fn, void *opaque)
{
    struct check c = { .img = img, .fn = fn, .opaque = opaque };
    int r;

    if (img->raw) {
        return 0;
    }
    r = run_check(&c, NULL);
    refs_free(&c);
    free(c.block);
    return qbm_public_ret(r);
}

/* ---- repair ----------------------------------------------------------------
 */

static int repair_writable(struct qbm_image *img)
{
    const struct qcow2_header *h = &img->hdr;

    if (!img->rdwr || img->raw || img->broken) {
        return qbm_err(EROFS, "image not opened for writing");
    }
    if (h->version < 3) {
        return qbm_err(EOPNOTSUPP,
                       "version 2 images cannot hold bitmaps; "
                       "'qemu-img check -r leaks' drops a stale extension");
    }
    if (h->incompatible_features &
        (QBM_INCOMPAT_DIRTY | QBM_INCOMPAT_CORRUPT)) {
        return qbm_err(EUCLEAN, "the image's dirty or corrupt bit is set; "
                                "run 'qemu-img check -r all' first");
    }
    return 0;
}

/* The caller's callback and what it returned (design.md, "Errors"). */
struct repair_cb {
    qbm_repair_fn fn;
    void *opaque;
    int user_ret;
};

/* Tell the caller; a non-zero answer stops the repair (-ECANCELED). */
static int repair_said(struct repair_cb *cb, int action, const char *bitmap,
                       uint64_t count, uint64_t bytes)
{
    if (!cb->fn) {
        return 0;
    }
    cb->user_ret = cb->fn(cb->opaque, action, bitmap, count, bytes);
    return cb->user_ret ? qbm_err(ECANCELED, "stopped by the caller") : 0;
}

QBM_DARRAY(repair_names, char *);

static int repair_in_use(struct qbm_image *img, bool remove,
                         struct repair_cb *cb)
{
    struct repair_names names = { 0 };
    uint32_t k = 0;
    size_t i;
    int r = 0;

    while (k < img->nb_bitmaps && r == 0) {
        struct qcow2_bitmap *bm = &img->bitmaps[k];
        char *name;

        if (!(bm->flags & BME_FLAG_IN_USE)) {
            k++;
            continue;
        }
        /* Named after the commit, when the directory is a new one. */
        name = qbm_strndup(bm->name, strlen(bm->name));
        r = name ? qbm_darray_push(&names, name, 0) : -ENOMEM;
        if (r < 0) {
            free(name);
            break;
        }
        if (remove) {
            r = qbm_impl_bitmap_remove(img, name);
        } else {
            r = qbm_impl_bitmap_salvage(img, name);
            k++;
        }
    }
    r = r ? r : qbm_impl_commit(img);
    for (i = 0; i < names.n && r == 0; i++) {
        r = repair_said(cb,
                        remove ? QBM_REPAIRED_IN_USE_REMOVED
                               : QBM_REPAIRED_IN_USE_DIRTY,
                        names.v[i], 0, 0);
    }
    for (i = 0; i < names.n; i++) {
        free(names.v[i]);
    }
    qbm_darray_free(&names);
    return r;
}

/* Drop a stale extension (or a lone autoclear bit); its clusters become
 * leaks, which the leak repair then frees. */
static int repair_stale(struct qbm_image *img, struct repair_cb *cb)
{
    struct qbm_txn *txn;
    bool stale = img->bitmaps_state == QBM_BITMAPS_STALE;
    int r;

    if (img->bitmaps_state == QBM_BITMAPS_OK ||
        (img->bitmaps_state == QBM_BITMAPS_NONE &&
         !(img->hdr.autoclear_features & QBM_AUTOCLEAR_BITMAPS))) {
        return 0;
    }
    r = qbm_txn_begin(img, &txn);
    r = r ? r : qbm_txn_commit(txn, 0, 0, 0);
    r = r ? r : qbm_image_reload(img);
    return r ? r
             : repair_said(cb,
                           stale ? QBM_REPAIRED_STALE : QBM_REPAIRED_AUTOCLEAR,
                           NULL, 0, 0);
}

static int repair_leaks(struct qbm_image *img, struct repair_cb *cb)
{
    struct check c = { .img = img };
    struct leaks leaks = { 0 };
    struct qbm_txn *txn = NULL;
    size_t i;
    int r;

    r = run_check(&c, &leaks);
    refs_free(&c);
    free(c.block);
    if (r == 0 && c.count[QBM_PROBLEM_CORRUPTION]) {
        r = qbm_err(EUCLEAN,
                    "the image has %llu corruption(s); qbm only "
                    "frees leaks: use 'qemu-img check -r all'",
                    (unsigned long long)c.count[QBM_PROBLEM_CORRUPTION]);
    }
    if (r == 0 && leaks.n) {
        r = qbm_txn_begin(img, &txn);
        for (i = 0; i < leaks.n && r == 0; i++) {
            r = qbm_txn_release_later(txn,
                                      leaks.v[i].cluster * img->cluster_size,
                                      img->cluster_size, leaks.v[i].excess);
        }
        if (r == 0) {
            r = qbm_txn_commit(txn, QBM_TXN_KEEP_HEADER, 0, 0);
        } else {
            qbm_txn_abort(txn);
        }
        if (r == 0) {
            r = qbm_image_reload(img);
        }
        if (r == 0) {
            r = repair_said(cb, QBM_REPAIRED_LEAKS, NULL, leaks.n,
                            leaks.n * img->cluster_size);
        }
    }
    qbm_darray_free(&leaks);
    return r;
}

QBM_API int qbm_repair_report(struct qbm_image *img, unsigned flags,
                              qbm_repair_fn fn, void *opaque)
{
    struct repair_cb cb = { fn, opaque, 0 };
    int r;

    if (!img || flags & ~QBM_REPAIR_MASK ||
        (flags & QBM_REPAIR_IN_USE_DIRTY && flags & QBM_REPAIR_IN_USE_REMOVE)) {
        return qbm_public_ret(qbm_err(EINVAL, "invalid repair flags"));
    }
    r = repair_writable(img);
    if (r == 0 && (flags & QBM_REPAIR_STALE)) {
        r = repair_stale(img, &cb);
    }
    if (r == 0 &&
        (flags & (QBM_REPAIR_IN_USE_DIRTY | QBM_REPAIR_IN_USE_REMOVE))) {
        r = repair_in_use(img, flags & QBM_REPAIR_IN_USE_REMOVE, &cb);
    }
    if (r == 0 && (flags & QBM_REPAIR_LEAKS)) {
        r = repair_leaks(img, &cb);
    }
    return r < 0 && cb.user_ret ? cb.user_ret : qbm_public_ret(r);
}

QBM_API int qbm_repair(struct qbm_image *img, unsigned flags)
{
    return qbm_repair_report(img, flags, NULL, NULL);
}
