/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * L1/L2 tables: the active L1 table, per-layer allocation map, compressed
 * cluster descriptors (qcow2 spec, "Cluster mapping", "Extended L2
 * Entries", "Compressed Clusters Descriptor").
 */
#include <stdlib.h>

#include "internal.h"

/* Guest bytes covered by one L2 table. */
static uint64_t l2_span(const struct qbm_image *img)
{
    return img->cluster_size * img->l2_entries;
}

int qcow2_l1_load(struct qbm_image *img)
{
    const struct qcow2_header *h = &img->hdr;
    uint64_t needed;

    needed = div_round_up(h->size, l2_span(img));
    if (needed > QCOW2_MAX_L1_BYTES / 8) {
        return qbm_err(EINVAL,
                       "header at 0x0: virtual size %llu is too "
                       "large for this cluster size",
                       (unsigned long long)h->size);
    }
    if (h->l1_size < needed) {
        return qbm_err(EINVAL,
                       "L1 table at 0x%llx: %u entries, at least "
                       "%llu needed for the virtual size",
                       (unsigned long long)h->l1_table_offset, h->l1_size,
                       (unsigned long long)needed);
    }
    if ((uint64_t)h->l1_size > QCOW2_MAX_L1_BYTES / 8) {
        return qbm_err(EINVAL,
                       "L1 table at 0x%llx: %u entries is larger "
                       "than 32 MiB",
                       (unsigned long long)h->l1_table_offset, h->l1_size);
    }
    if (h->l1_size > 0 &&
        (h->l1_table_offset == 0 ||
         !is_aligned(h->l1_table_offset, img->cluster_size))) {
        return qbm_err(EINVAL,
                       "L1 table at 0x%llx: offset not cluster "
                       "aligned",
                       (unsigned long long)h->l1_table_offset);
    }
    if (img->keep_l1 && img->keep_l1_offset == h->l1_table_offset &&
        img->keep_l1_size == h->l1_size) {
        img->l1 = img->keep_l1;
        img->keep_l1 = NULL;
    }
    /* The entries themselves are read when first needed: reading bitmaps
     * never needs them, and they can be megabytes. */
    return 0;
}

int qcow2_l1_ensure(struct qbm_image *img)
{
    const struct qcow2_header *h = &img->hdr;
    uint64_t needed, bytes, i;
    uint8_t *buf;
    int r;

    if (img->l1) {
        return 0;
    }
    if (img->raw) {
        /* Callers handle raw layers before asking for their L1. */
        return qbm_err(EINVAL, "internal: a raw layer has no L1 table");
    }
    /* Entries past what the virtual size needs are never consulted. */
    needed = div_round_up(h->size, l2_span(img));
    bytes = needed * 8;
    img->l1 = qbm_calloc(needed ? needed : 1, sizeof(uint64_t));
    if (!img->l1) {
        return -ENOMEM;
    }
    if (needed == 0) {
        return 0;
    }
    buf = qbm_malloc(bytes);
    if (!buf) {
        r = -ENOMEM;
        goto fail;
    }
    r = qbm_image_read_meta(img, buf, bytes, h->l1_table_offset, "L1 table");
    if (r == 0) {
        for (i = 0; i < needed; i++) {
            img->l1[i] = be64_load(buf + i * 8);
        }
    }
    free(buf);
    if (r == 0) {
        return 0;
    }
fail:
    free(img->l1);
    img->l1 = NULL;
    return r;
}

void qcow2_compressed_decode(uint64_t l2e, unsigned cluster_bits,
                             struct qcow2_compressed *ret)
{
    unsigned x = 62 - (cluster_bits - 8);
    uint64_t nsect;

    ret->offset = l2e & ((1ull << x) - 1);
    nsect = ((l2e >> x) & ((1ull << (cluster_bits - 8)) - 1)) + 1;
    ret->nb_bytes = nsect * 512 - (ret->offset & 511);
}

/* Coalesces per-range statuses into maximal runs for the callback. */
struct run {
    qbm_alloc_fn fn;
    void *opaque;
    uint64_t off, len;
    unsigned status;
};

static int run_flush(struct run *run)
{
    int r = 0;

    if (run->len) {
        r = run->fn(run->opaque, run->off, run->len, run->status);
        run->len = 0;
    }
    return r;
}

static int run_add(struct run *run, uint64_t off, uint64_t len, unsigned status)
{
    int r;

    if (status == 0 || len == 0) {
        return 0;
    }
    if (run->len && run->status == status && run->off + run->len == off) {
        run->len += len;
        return 0;
    }
    r = run_flush(run);
    if (r) {
        return r;
    }
    run->off = off;
    run->len = len;
    run->status = status;
    return 0;
}

static int l2_error(struct qbm_image *img, uint64_t l2_off, uint64_t idx,
                    const char *what)
{
    return qbm_err(EINVAL, "L2 table at 0x%llx, entry %llu: %s",
                   (unsigned long long)l2_off, (unsigned long long)idx, what);
}

/* Classify one standard L2 entry for the whole cluster. */
static int classify_std(struct qbm_image *img, uint64_t l2_off, uint64_t idx,
                        uint64_t e, unsigned *ret_status)
{
    bool data_file = img->hdr.incompatible_features & QBM_INCOMPAT_DATA_FILE;
    uint64_t off = e & L2E_OFFSET_MASK;

    if (e & L2E_COMPRESSED) {
        if (data_file) {
            return l2_error(img, l2_off, idx,
                            "compressed cluster with an "
                            "external data file");
        }
        *ret_status = QBM_ALLOC_DATA;
        return 0;
    }
    if (e & L2E_STD_RESERVED_MASK) {
        return l2_error(img, l2_off, idx, "reserved bits set");
    }
    if (e & L2E_ZERO) {
        if (img->hdr.version < 3) {
            return l2_error(img, l2_off, idx,
                            "zero flag in a version 2 "
                            "image");
        }
        *ret_status = QBM_ALLOC_ZERO;
        return 0;
    }
    if (off) {
        if (!is_aligned(off, img->cluster_size)) {
            return l2_error(img, l2_off, idx,
                            "data offset not cluster "
                            "aligned");
        }
        *ret_status = QBM_ALLOC_DATA;
        return 0;
    }
    /* With an external data file, host offset 0 is valid when COPIED says
     * the entry is in use (qcow2 spec, "Cluster mapping": Standard Cluster
     * Descriptor). */
    *ret_status = (data_file && (e & L2E_COPIED)) ? QBM_ALLOC_DATA : 0;
    return 0;
}

/* QEMU's rules for an extended L2 entry (qcow2 spec, "Extended L2
 * Entries"); 0 when valid. */
static int check_extl2_entry(struct qbm_image *img, uint64_t l2_off,
                             uint64_t idx, uint64_t e, uint64_t sc_bitmap)
{
    uint64_t off = e & L2E_OFFSET_MASK;

    if (e & L2E_COMPRESSED) {
        if (img->hdr.incompatible_features & QBM_INCOMPAT_DATA_FILE) {
            return l2_error(img, l2_off, idx,
                            "compressed cluster with an "
                            "external data file");
        }
        return sc_bitmap ? l2_error(img, l2_off, idx,
                                    "compressed cluster "
                                    "with a subcluster bitmap")
                         : 0;
    }
    if (e & (L2E_STD_RESERVED_MASK | L2E_ZERO)) {
        return l2_error(img, l2_off, idx, "reserved bits set");
    }
    if (off && !is_aligned(off, img->cluster_size)) {
        return l2_error(img, l2_off, idx, "data offset not cluster aligned");
    }
    if ((sc_bitmap & 0xffffffffu) & (sc_bitmap >> 32)) {
        return l2_error(img, l2_off, idx,
                        "subcluster both allocated and "
                        "zero");
    }
    if (!off && (sc_bitmap & 0xffffffffu) &&
        !((img->hdr.incompatible_features & QBM_INCOMPAT_DATA_FILE) &&
          (e & L2E_COPIED))) {
        return l2_error(img, l2_off, idx,
                        "allocated subclusters without a "
                        "host cluster");
    }
    return 0;
}

static int walk_extl2_entry(struct qbm_image *img, uint64_t l2_off,
                            uint64_t idx, uint64_t e, uint64_t sc_bitmap,
                            uint64_t guest, uint64_t limit, struct run *run)
{
    uint64_t sc_size = img->cluster_size / 32;
    unsigned i;
    int r;

    r = check_extl2_entry(img, l2_off, idx, e, sc_bitmap);
    if (r < 0) {
        return r;
    }
    if (e & L2E_COMPRESSED) {
        return run_add(run, guest, limit - guest, QBM_ALLOC_DATA);
    }
    for (i = 0; i < 32; i++) {
        uint64_t start = guest + i * sc_size;
        unsigned status = 0;

        if (start >= limit) {
            break;
        }
        if (sc_bitmap & (1ull << (32 + i))) {
            status = QBM_ALLOC_ZERO;
        } else if (sc_bitmap & (1ull << i)) {
            status = QBM_ALLOC_DATA;
        }
        r = run_add(run, start,
                    (limit - start < sc_size) ? limit - start : sc_size,
                    status);
        if (r) {
            return r;
        }
    }
    return 0;
}

int qcow2_read_l2(struct qbm_image *img, uint64_t l2_off)
{
    int r;

    if (img->l2_cache && img->l2_cache_offset == l2_off) {
        return 0;
    }
    if (!img->l2_cache) {
        img->l2_cache = qbm_malloc(img->cluster_size);
        if (!img->l2_cache) {
            return -ENOMEM;
        }
    }
    img->l2_cache_offset = 0;
    r = qbm_image_read_meta(img, img->l2_cache, img->cluster_size, l2_off,
                            "L2 table");
    if (r < 0) {
        return r;
    }
    img->l2_cache_offset = l2_off;
    return 0;
}

/* The entries of the L2 table in the cache for guest offsets base..size
 * (at most one table's span) into `run`. */
static int walk_l2_table(struct qbm_image *img, uint64_t l2_off, uint64_t base,
                         uint64_t size, struct run *run)
{
    uint64_t j;
    int r;

    for (j = 0; j < img->l2_entries; j++) {
        uint64_t guest = base + j * img->cluster_size;
        uint64_t limit, e;
        const uint8_t *p;

        if (guest >= size) {
            break;
        }
        limit =
            size - guest < img->cluster_size ? size : guest + img->cluster_size;
        p = img->l2_cache + j * img->l2_entry_size;
        e = be64_load(p);
        if (img->extl2) {
            r = walk_extl2_entry(img, l2_off, j, e, be64_load(p + 8), guest,
                                 limit, run);
        } else {
            unsigned status = 0;

            r = classify_std(img, l2_off, j, e, &status);
            if (r == 0) {
                r = run_add(run, guest, limit - guest, status);
            }
        }
        if (r) {
            return r;
        }
    }
    return 0;
}

/* A run of an L2 table, relative to the start of the table's span. */
struct l2_run {
    uint64_t off, len;
    unsigned status;
};

/* An L2 table that several L1 entries point to, in an array sorted by
 * offset: how many of them are still to be walked and, while some are,
 * its runs (summarised at the first, a whole span as it is not the last
 * L1 entry, and replayed for the others). */
struct l2_shared {
    uint64_t off;
    struct l2_run *runs;
    uint32_t left, n, cap;
    bool summarised;
};

static int u64_cmp(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;

    return x < y ? -1 : x > y;
}

/* A run_fn recording into an l2_shared (the table's span at offset 0). */
static int l2_record(void *opaque, uint64_t off, uint64_t len, unsigned status)
{
    struct l2_shared *t = opaque;

    if (t->n == t->cap) {
        uint32_t cap = t->cap ? t->cap * 2 : 16;
        struct l2_run *v = qbm_realloc(t->runs, cap * sizeof(*v));

        if (!v) {
            return -ENOMEM;
        }
        t->runs = v;
        t->cap = cap;
    }
    t->runs[t->n++] = (struct l2_run){ off, len, status };
    return 0;
}

/* The runs of `t` shifted to base, up to size, into `run`. */
static int l2_replay(const struct l2_shared *t, uint64_t base, uint64_t size,
                     struct run *run)
{
    size_t k;
    int r;

    for (k = 0; k < t->n && base + t->runs[k].off < size; k++) {
        uint64_t off = base + t->runs[k].off;
        uint64_t len = t->runs[k].len;

        r = run_add(run, off, size - off < len ? size - off : len,
                    t->runs[k].status);
        if (r) {
            return r;
        }
    }
    return 0;
}

/*
 * The L2 table in the cache, whose span at base lies inside the disk,
 * summarised into t and replayed into `run`. On an error in the table
 * the runs before it are replayed first, as a walk entry by entry would
 * have reported them.
 */
static int l2_summarise(struct qbm_image *img, struct l2_shared *t,
                        uint64_t base, struct run *run)
{
    struct run rec = { .fn = l2_record, .opaque = t };
    int r, r2;

    r = walk_l2_table(img, t->off, 0, l2_span(img), &rec);
    if (r == 0) {
        r = run_flush(&rec);
        t->summarised = r == 0;
    }
    if (r == -ENOMEM) {
        return r;
    }
    r2 = l2_replay(t, base, base + l2_span(img), run);
    if (r2 == 0 && r) {
        r2 = run_add(run, base + rec.off, rec.len, rec.status);
    }
    return r2 ? r2 : r;
}

/*
 * The L2 tables that several L1 entries inside the disk point to, sorted
 * by offset with their number of entries: in *ret (free with
 * l2_shared_free), *ret_n of them (at most half the L1 entries).
 */
static int l2_shared_count(struct qbm_image *img, uint64_t nl1,
                           struct l2_shared **ret, size_t *ret_n)
{
    struct l2_shared *v = NULL;
    size_t n = 0, m = 0, i, j;
    uint64_t *offs;

    *ret = NULL;
    *ret_n = 0;
    if (nl1 < 2) {
        return 0;
    }
    offs = qbm_malloc(nl1 * sizeof(*offs));
    if (!offs) {
        return -ENOMEM;
    }
    for (i = 0; i < nl1; i++) {
        if (img->l1[i] & L1E_OFFSET_MASK) {
            offs[n++] = img->l1[i] & L1E_OFFSET_MASK;
        }
    }
    qsort(offs, n, sizeof(*offs), u64_cmp);
    for (i = 0; i < n; i = j) {
        for (j = i + 1; j < n && offs[j] == offs[i]; j++) {
        }
        if (j - i > 1) {
            if (!v) {
                v = qbm_calloc(n / 2, sizeof(*v));
                if (!v) {
                    free(offs);
                    return -ENOMEM;
                }
            }
            v[m].off = offs[i];
            v[m++].left = j - i;
        }
    }
    free(offs);
    *ret = v;
    *ret_n = m;
    return 0;
}

static void l2_shared_free(struct l2_shared *v, size_t n)
{
    size_t i;

    for (i = 0; i < n; i++) {
        free(v[i].runs);
    }
    free(v);
}

/*
 * Each L2 table is read and decoded once: a table that several L1 entries
 * point to is summarised into its runs at the first of them and the runs
 * are replayed, shifted, for the others (then freed after the last), so
 * that thousands of L1 entries pointing to one table cost its runs
 * thousands of times (what the callback is told), not its entries. The
 * summaries in memory are bounded by the L2 tables read: a run per entry,
 * or per subcluster with extended L2 entries.
 */
int qcow2_allocation_walk(struct qbm_image *img, qbm_alloc_fn fn, void *opaque)
{
    uint64_t size = img->hdr.size;
    uint64_t nl1 = div_round_up(size, l2_span(img));
    struct run run = { .fn = fn, .opaque = opaque };
    struct l2_shared *shared = NULL;
    size_t nshared = 0;
    uint64_t i;
    int r;

    r = qcow2_l1_ensure(img);
    if (r) {
        return r;
    }
    r = l2_shared_count(img, nl1, &shared, &nshared);
    if (r) {
        return r;
    }
    for (i = 0; i < nl1 && r == 0; i++) {
        uint64_t l2_off = img->l1[i] & L1E_OFFSET_MASK;
        uint64_t base = i * l2_span(img);
        struct l2_shared *t = NULL;

        if (l2_off == 0) {
            continue;
        }
        if (!is_aligned(l2_off, img->cluster_size)) {
            r = qbm_err(EINVAL,
                        "L1 table at 0x%llx, entry %llu: L2 "
                        "offset 0x%llx not cluster aligned",
                        (unsigned long long)img->hdr.l1_table_offset,
                        (unsigned long long)i, (unsigned long long)l2_off);
            break;
        }
        if (shared) {
            /* The key compares as the first member, off. */
            t = bsearch(&l2_off, shared, nshared, sizeof(*shared), u64_cmp);
            if (t) {
                t->left--;
            }
        }
        if (t && t->summarised) {
            r = l2_replay(t, base, size, &run);
        } else {
            r = qcow2_read_l2(img, l2_off);
            if (r < 0) {
                break;
            }
            if (t && t->left && size - base >= l2_span(img)) {
                r = l2_summarise(img, t, base, &run);
            } else {
                r = walk_l2_table(img, l2_off, base, size, &run);
            }
        }
        if (t && t->left == 0) {
            free(t->runs);
            t->runs = NULL;
            t->n = t->cap = 0;
        }
    }
    l2_shared_free(shared, nshared);
    return r ? r : run_flush(&run);
}

/* ---- host map ----------------------------------------------------------- */

struct map_run {
    qcow2_map_fn fn;
    void *opaque;
    struct qcow2_map_extent cur; /* cur.len == 0: none pending */
};

static int map_flush(struct map_run *m)
{
    int r = 0;

    if (m->cur.len) {
        r = m->fn(m->opaque, &m->cur);
        m->cur.len = 0;
    }
    return r;
}

static int map_add(struct map_run *m, uint64_t guest, uint64_t len,
                   uint32_t type, uint64_t host)
{
    struct qcow2_map_extent *c = &m->cur;
    int r;

    if (len == 0) {
        return 0;
    }
    if (c->len && c->guest + c->len == guest && c->type == type &&
        (type == QCOW2_MAP_ZERO ||
         (type == QCOW2_MAP_DATA && c->host + c->len == host))) {
        c->len += len;
        return 0;
    }
    r = map_flush(m);
    if (r) {
        return r;
    }
    c->guest = guest;
    c->len = len;
    c->type = type;
    c->host = host;
    c->layer = 0;
    c->start = guest;
    return 0;
}

int qcow2_map_walk(struct qbm_image *img, qcow2_map_fn fn, void *opaque)
{
    uint64_t size = img->hdr.size;
    uint64_t sc = img->extl2 ? img->cluster_size / 32 : img->cluster_size;
    bool data_file = img->hdr.incompatible_features & QBM_INCOMPAT_DATA_FILE;
    struct map_run m = { .fn = fn, .opaque = opaque };
    uint64_t nl1, i, j;
    int r;

    if (img->raw) {
        struct qcow2_map_extent all = { 0, size, 0, QCOW2_MAP_DATA, 0, 0 };

        return size ? fn(opaque, &all) : 0;
    }
    if (data_file && !img->data_io) {
        return qbm_err(EINVAL, "internal: the external data file is not "
                               "open");
    }
    if (img->hdr.crypt_method) {
        return qbm_err(EOPNOTSUPP, "encrypted images are not supported "
                                   "here");
    }
    nl1 = div_round_up(size, l2_span(img));
    r = qcow2_l1_ensure(img);
    if (r) {
        return r;
    }
    for (i = 0; i < nl1; i++) {
        uint64_t l2_off = img->l1[i] & L1E_OFFSET_MASK;

        if (!l2_off) {
            continue;
        }
        if (!is_aligned(l2_off, img->cluster_size)) {
            return qbm_err(EINVAL,
                           "L1 table at 0x%llx, entry %llu: L2 "
                           "offset not cluster aligned",
                           (unsigned long long)img->hdr.l1_table_offset,
                           (unsigned long long)i);
        }
        r = qcow2_read_l2(img, l2_off);
        if (r < 0) {
            return r;
        }
        for (j = 0; j < img->l2_entries; j++) {
            uint64_t guest = i * l2_span(img) + j * img->cluster_size;
            const uint8_t *p = img->l2_cache + j * img->l2_entry_size;
            uint64_t e = be64_load(p), limit, k;
            uint64_t host = e & L2E_OFFSET_MASK;

            if (guest >= size) {
                break;
            }
            limit = size - guest < img->cluster_size ? size - guest
                                                     : img->cluster_size;
            if ((e & L2E_COMPRESSED) && data_file) {
                /* QEMU cannot write them there, and refuses to read them
                 * (qcow2 spec, "Header": external data file bit). */
                r = l2_error(img, l2_off, j,
                             "compressed cluster with an external data "
                             "file");
            } else if (e & L2E_COMPRESSED) {
                r = map_add(&m, guest, limit, QCOW2_MAP_COMPRESSED, e);
                r = r ? r : map_flush(&m); /* one cluster per extent */
            } else if (!img->extl2) {
                unsigned st = 0;

                r = classify_std(img, l2_off, j, e, &st);
                if (r == 0 && st) {
                    r = map_add(&m, guest, limit,
                                st == QBM_ALLOC_ZERO ? QCOW2_MAP_ZERO
                                                     : QCOW2_MAP_DATA,
                                host);
                }
            } else {
                uint64_t bm = be64_load(p + 8);

                r = check_extl2_entry(img, l2_off, j, e, bm);
                for (k = 0; k < 32 && r == 0 && k * sc < limit; k++) {
                    uint64_t n = limit - k * sc < sc ? limit - k * sc : sc;

                    if (bm & (1ull << (32 + k))) {
                        r = map_add(&m, guest + k * sc, n, QCOW2_MAP_ZERO, 0);
                    } else if (bm & (1ull << k)) {
                        r = map_add(&m, guest + k * sc, n, QCOW2_MAP_DATA,
                                    host + k * sc);
                    }
                }
            }
            if (r) {
                return r;
            }
        }
    }
    return map_flush(&m);
}

int qcow2_read_compressed(struct qbm_image *img, uint64_t l2e,
                          uint64_t in_cluster, void *buf, size_t len)
{
    struct qcow2_compressed cd;
    uint8_t *in;
    int r;

    if (in_cluster + len > img->cluster_size) {
        return qbm_err(EINVAL, "internal: read past a compressed cluster");
    }
    if (!img->zcache || img->zcache_l2e != l2e) {
        if (!img->zcache) {
            img->zcache = qbm_malloc(img->cluster_size);
            if (!img->zcache) {
                return -ENOMEM;
            }
        }
        img->zcache_l2e = 0;
        qcow2_compressed_decode(l2e, img->cluster_bits, &cd);
        in = qbm_malloc(cd.nb_bytes);
        if (!in) {
            return -ENOMEM;
        }
        r = qbm_image_read_meta(img, in, cd.nb_bytes, cd.offset,
                                "compressed cluster");
        if (r == 0) {
            r = qcow2_decompress(img->hdr.compression_type, in, cd.nb_bytes,
                                 img->zcache, img->cluster_size);
            if (r < 0) {
                r = qbm_err_prefix(r, "compressed cluster at 0x%llx",
                                   (unsigned long long)cd.offset);
            }
        }
        free(in);
        if (r < 0) {
            return r;
        }
        img->zcache_l2e = l2e;
    }
    memcpy(buf, img->zcache + in_cluster, len);
    return 0;
}
