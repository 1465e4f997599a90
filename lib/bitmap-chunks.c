/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * In-memory chunked bitmap and the bit-run scanner shared by every reader.
 *
 * Bits are stored in the on-disk order (qcow2 spec, "Bitmap data"): bit k
 * is bit k % 8 of byte k / 8. Loading a little-endian 64-bit word therefore
 * gives bit k at position k % 64, which lets the scanner skip clean or
 * dirty words whole.
 */
#include <stdlib.h>
#include <sys/mman.h>

#include "internal.h"

uint8_t qbm_chunk_ones[1];
uint8_t qbm_chunk_ref[1];
uint8_t qbm_chunk_or[1];

/*
 * Chunk buffers come from arenas of anonymous memory, populated by the
 * kernel at once: faulting pages in one by one costs several times more
 * than having the kernel populate a mapping (measured: 130 ms vs 33 ms for
 * 32 MiB in a VM). Arenas double in size, so a bitmap with one dirty chunk
 * still maps only one chunk's worth; from 2 MiB on they are asked for
 * transparent huge pages before being populated, which halved the cost of
 * the memory of a 32 MiB rewrite again (docs/performance.md, issue 16).
 * Buffers are released with the whole bitmap.
 */
#define ARENA_HUGE (2u << 20)

static void *arena_map(size_t bytes)
{
    void *p;

    if (bytes < ARENA_HUGE) {
        p = mmap(NULL, bytes, PROT_READ | PROT_WRITE,
                 MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
        return p == MAP_FAILED ? NULL : p;
    }
    p = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
             -1, 0);
    if (p == MAP_FAILED) {
        return NULL;
    }
    /* Advice only: without huge pages (or MADV_POPULATE_WRITE, Linux
     * 5.14), pages come as they are touched. */
    madvise(p, bytes, MADV_HUGEPAGE);
#ifdef MADV_POPULATE_WRITE
    madvise(p, bytes, MADV_POPULATE_WRITE);
#endif
    return p;
}

struct qbm_chunk_arena {
    struct qbm_chunk_arena *next;
    uint8_t *base;
    size_t bytes, used;
};

#define ARENA_MAX_CHUNKS 256

uint8_t *qbm_window_alloc(size_t bytes)
{
    uint8_t *p;

    if (qbm_alloc_hook_fails(bytes)) {
        return NULL;
    }
    /* From the heap: a window is at most QBM_READ_WINDOW (or one large
     * cluster) and one is taken per bitmap read, so a mapping of its own
     * (mmap, populate, munmap: ~37 us) cost more than the reads it
     * serves when an image has many small bitmaps; freed windows are
     * reused by the next one. */
    p = malloc(bytes);
    if (!p) {
        qbm_err(ENOMEM, "out of memory allocating %zu bytes", bytes);
    }
    return p;
}

void qbm_window_free(uint8_t *p, size_t bytes)
{
    (void)bytes;
    free(p);
}

/* A zeroed chunk buffer, or NULL (ENOMEM recorded). */
static uint8_t *chunk_alloc(struct qbm_bmap *bm)
{
    struct qbm_chunk_arena *a = bm->arenas;
    uint8_t *c;

    if (qbm_alloc_hook_fails(bm->chunk_bytes)) {
        return NULL;
    }
    if (bm->spare) {
        c = bm->spare;
        memcpy(&bm->spare, c, sizeof(bm->spare));
        memset(c, 0, bm->chunk_bytes);
        return c;
    }
    if (!a || a->used + bm->chunk_bytes > a->bytes) {
        uint64_t n = bm->arena_chunks ? bm->arena_chunks : 1;
        void *p;

        a = calloc(1, sizeof(*a));
        if (!a) {
            qbm_err(ENOMEM, "out of memory");
            return NULL;
        }
        a->bytes = n * bm->chunk_bytes;
        p = arena_map(a->bytes);
        if (!p) {
            free(a);
            qbm_err(ENOMEM, "out of memory mapping %llu bytes",
                    (unsigned long long)(n * bm->chunk_bytes));
            return NULL;
        }
        a->base = p;
        a->next = bm->arenas;
        bm->arenas = a;
        bm->arena_chunks = n * 2 > ARENA_MAX_CHUNKS ? ARENA_MAX_CHUNKS : n * 2;
    }
    c = a->base + a->used;
    a->used += bm->chunk_bytes;
    return c;
}

/* Give a buffer back: the spare list is linked through the buffers. */
static void chunk_give_back(struct qbm_bmap *bm, uint8_t *c)
{
    memcpy(c, &bm->spare, sizeof(bm->spare));
    bm->spare = c;
}

static void arenas_free(struct qbm_bmap *bm)
{
    struct qbm_chunk_arena *a = bm->arenas, *next;

    for (; a; a = next) {
        next = a->next;
        munmap(a->base, a->bytes);
        free(a);
    }
    bm->arenas = NULL;
}

static inline uint64_t load_le64(const uint8_t *p)
{
    uint64_t v;

    memcpy(&v, p, 8);
#if __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    v = __builtin_bswap64(v);
#endif
    return v;
}

/* First bit >= pos and < end whose value is `want`, or end. */
static uint64_t find_next(const uint8_t *data, uint64_t pos, uint64_t end,
                          bool want)
{
    while (pos < end) {
        uint64_t w = load_le64(data + (pos / 64) * 8);
        unsigned shift = pos % 64;

        if (!want) {
            w = ~w;
        }
        w >>= shift;
        if (w) {
            uint64_t found = pos + (uint64_t)__builtin_ctzll(w);
            return found < end ? found : end;
        }
        pos = (pos / 64 + 1) * 64;
        /* Skip clean (or, looking for a clear bit, dirty) stretches four
         * words at a time. */
        while (pos + 256 <= end) {
            uint64_t a = load_le64(data + pos / 8);
            uint64_t b = load_le64(data + pos / 8 + 8);
            uint64_t c = load_le64(data + pos / 8 + 16);
            uint64_t d = load_le64(data + pos / 8 + 24);

            if (want ? (a | b | c | d) != 0 : (a & b & c & d) != ~0ull) {
                break;
            }
            pos += 256;
        }
    }
    return end;
}

/* ---- extent state ------------------------------------------------------ */

static int extent_emit(struct qbm_extent_state *st, uint64_t first_bit,
                       uint64_t end_bit)
{
    uint64_t off = first_bit * st->granularity;
    uint64_t end =
        end_bit >= st->nbits ? st->disk_size : end_bit * st->granularity;
    int r;

    if (end > st->disk_size) {
        end = st->disk_size;
    }
    if (off >= end) {
        return 0;
    }
    st->dirty_bytes += end - off;
    if (st->pending_len && st->pending_off + st->pending_len == off) {
        st->pending_len += end - off;
        return 0;
    }
    if (st->pending_len && st->fn) {
        r = st->fn(st->opaque, st->pending_off, st->pending_len);
        if (r) {
            return r;
        }
    }
    st->pending_off = off;
    st->pending_len = end - off;
    return 0;
}

int qbm_extent_state_chunk(struct qbm_extent_state *st, uint64_t chunk_index,
                           const uint8_t *data)
{
    uint64_t first = chunk_index * st->bits_per_chunk;
    uint64_t end = first + st->bits_per_chunk;
    uint64_t pos;
    int r;

    if (first >= st->nbits || !data) {
        return 0;
    }
    if (end > st->nbits) {
        end = st->nbits;
    }
    if (data == QBM_CHUNK_ONES) {
        return extent_emit(st, first, end);
    }
    pos = 0;
    end -= first;
    while (pos < end) {
        uint64_t s = find_next(data, pos, end, true);
        uint64_t e;

        if (s >= end) {
            break;
        }
        e = find_next(data, s, end, false);
        r = extent_emit(st, first + s, first + e);
        if (r) {
            return r;
        }
        pos = e;
    }
    return 0;
}

int qbm_extent_state_finish(struct qbm_extent_state *st)
{
    int r = 0;

    if (st->pending_len && st->fn) {
        r = st->fn(st->opaque, st->pending_off, st->pending_len);
    }
    st->pending_len = 0;
    return r;
}

/* ---- chunked bitmap ---------------------------------------------------- */

int qbm_bmap_new(uint64_t disk_size, uint64_t granularity, uint64_t chunk_bytes,
                 struct qbm_bmap **ret)
{
    struct qbm_bmap *bm;

    if (granularity == 0 || (granularity & (granularity - 1)) ||
        chunk_bytes == 0 || chunk_bytes % 8) {
        return qbm_err(EINVAL, "invalid bitmap geometry");
    }
    bm = qbm_calloc(1, sizeof(*bm));
    if (!bm) {
        return -ENOMEM;
    }
    bm->disk_size = disk_size;
    bm->granularity = granularity;
    bm->chunk_bytes = chunk_bytes;
    bm->nbits = div_round_up(disk_size, granularity);
    bm->nchunks = div_round_up(div_round_up(bm->nbits, 8), chunk_bytes);
    if (bm->nchunks > BME_MAX_TABLE_SIZE) {
        uint64_t n = bm->nchunks;

        free(bm);
        return qbm_err(EFBIG, "bitmap would need %llu data clusters",
                       (unsigned long long)n);
    }
    bm->chunks = qbm_calloc(bm->nchunks ? bm->nchunks : 1, sizeof(uint8_t *));
    if (!bm->chunks) {
        free(bm);
        return -ENOMEM;
    }
    *ret = bm;
    return 0;
}

void qbm_bmap_free(struct qbm_bmap *bm)
{
    size_t i;

    if (!bm) {
        return;
    }
    arenas_free(bm);
    for (i = 0; i < bm->nowned; i++) {
        qbm_io_close(bm->owned[i]);
    }
    free(bm->owned);
    free(bm->refs);
    free(bm->ors);
    free(bm->chunks);
    free(bm);
}

int qbm_bmap_adopt_io(struct qbm_bmap *bm, struct qbm_io *io)
{
    struct qbm_io **p = qbm_realloc(bm->owned, (bm->nowned + 1) * sizeof(*p));

    if (!p) {
        qbm_io_close(io);
        return -ENOMEM;
    }
    bm->owned = p;
    bm->owned[bm->nowned++] = io;
    return 0;
}

int qbm_bmap_set_ref(struct qbm_bmap *bm, uint64_t idx, struct qbm_io *io,
                     uint64_t offset)
{
    if (idx >= bm->nchunks || bm->chunks[idx]) {
        return qbm_err(EINVAL, "internal: chunk %llu is not empty",
                       (unsigned long long)idx);
    }
    if (!bm->refs) {
        bm->refs = qbm_calloc(bm->nchunks, sizeof(*bm->refs));
        if (!bm->refs) {
            return -ENOMEM;
        }
    }
    bm->refs[idx].io = io;
    bm->refs[idx].offset = offset;
    bm->chunks[idx] = QBM_CHUNK_REF;
    return 0;
}

static int cluster_read(const struct qbm_chunk_ref *ref, uint8_t *buf,
                        uint64_t len)
{
    int r = qbm_io_pread(ref->io, buf, len, ref->offset);

    if (r < 0) {
        return qbm_err_prefix(r, "bitmap data cluster at 0x%llx",
                              (unsigned long long)ref->offset);
    }
    return 0;
}

static void or_into(uint8_t *dst, const uint8_t *src, uint64_t len)
{
    uint64_t i;

    for (i = 0; i < len; i += 8) {
        uint64_t a, b;

        memcpy(&a, dst + i, 8);
        memcpy(&b, src + i, 8);
        a |= b;
        memcpy(dst + i, &a, 8);
    }
}

/* The bytes of referenced or pending-OR chunk idx into buf; tmp holds the
 * second operand of a pending OR (NULL: one is allocated). */
static int chunk_read(const struct qbm_bmap *bm, uint64_t idx, uint8_t *buf,
                      uint8_t *tmp)
{
    uint8_t *own = NULL;
    int r = cluster_read(&bm->refs[idx], buf, bm->chunk_bytes);

    if (r < 0 || bm->chunks[idx] != QBM_CHUNK_OR) {
        return r;
    }
    if (!tmp && !(tmp = own = qbm_malloc(bm->chunk_bytes))) {
        return -ENOMEM;
    }
    r = cluster_read(&bm->ors[idx], tmp, bm->chunk_bytes);
    if (r == 0) {
        or_into(buf, tmp, bm->chunk_bytes);
    }
    free(own);
    return r;
}

int qbm_bmap_load_chunk(struct qbm_bmap *bm, uint64_t idx)
{
    uint8_t *c;
    int r;

    if (bm->chunks[idx] != QBM_CHUNK_REF && bm->chunks[idx] != QBM_CHUNK_OR) {
        return 0;
    }
    c = chunk_alloc(bm);
    if (!c) {
        return -ENOMEM;
    }
    r = chunk_read(bm, idx, c, NULL);
    if (r < 0) {
        chunk_give_back(bm, c);
        return r;
    }
    bm->chunks[idx] = c;
    return 0;
}

int qbm_bmap_get(const struct qbm_bmap *bm, uint64_t bit)
{
    uint64_t bpc = bm->chunk_bytes * 8, idx = bit / bpc;
    const uint8_t *c;
    uint8_t byte;
    int r;

    if (bit >= bm->nbits) {
        return 0;
    }
    c = bm->chunks[idx];
    if (!c) {
        return 0;
    }
    if (c == QBM_CHUNK_ONES) {
        return 1;
    }
    bit %= bpc;
    if (c == QBM_CHUNK_REF || c == QBM_CHUNK_OR) {
        r = qbm_io_pread(bm->refs[idx].io, &byte, 1,
                         bm->refs[idx].offset + bit / 8);
        if (r == 0 && c == QBM_CHUNK_OR && !((byte >> (bit % 8)) & 1)) {
            r = qbm_io_pread(bm->ors[idx].io, &byte, 1,
                             bm->ors[idx].offset + bit / 8);
        }
        if (r < 0) {
            return r;
        }
        return (byte >> (bit % 8)) & 1;
    }
    return (c[bit / 8] >> (bit % 8)) & 1;
}

/* Set bits [first, end) inside one chunk's buffer. */
static void set_bits(uint8_t *c, uint64_t first, uint64_t end)
{
    while (first < end && first % 8) {
        c[first / 8] |= (uint8_t)(1u << (first % 8));
        first++;
    }
    if (end - first >= 8) {
        uint64_t nbytes = (end - first) / 8;
        memset(c + first / 8, 0xff, nbytes);
        first += nbytes * 8;
    }
    while (first < end) {
        c[first / 8] |= (uint8_t)(1u << (first % 8));
        first++;
    }
}

int qbm_bmap_set_range(struct qbm_bmap *bm, uint64_t off, uint64_t len)
{
    uint64_t bpc = bm->chunk_bytes * 8;
    uint64_t end_off, first, end;

    if (len == 0 || off >= bm->disk_size) {
        return 0;
    }
    if (!add_ok(off, len, &end_off) || end_off > bm->disk_size) {
        end_off = bm->disk_size;
    }
    first = off / bm->granularity;
    end = div_round_up(end_off, bm->granularity);
    while (first < end) {
        uint64_t ci = first / bpc;
        uint64_t cfirst = first % bpc;
        uint64_t cend = (end - ci * bpc) < bpc ? end - ci * bpc : bpc;
        uint64_t chunk_bits =
            bm->nbits - ci * bpc < bpc ? bm->nbits - ci * bpc : bpc;

        if (bm->chunks[ci] != QBM_CHUNK_ONES) {
            if (cfirst == 0 && cend >= chunk_bits) {
                /* Whole chunk: no need to keep bytes. The tail bits past
                 * nbits stay implicit, as they must be zero on disk. */
                bm->chunks[ci] = QBM_CHUNK_ONES;
            } else {
                int r = qbm_bmap_load_chunk(bm, ci);

                if (r < 0) {
                    return r;
                }
                if (!bm->chunks[ci]) {
                    bm->chunks[ci] = chunk_alloc(bm);
                    if (!bm->chunks[ci]) {
                        return -ENOMEM;
                    }
                }
                set_bits(bm->chunks[ci], cfirst, cend);
            }
        }
        first = ci * bpc + cend;
    }
    return 0;
}

uint8_t *qbm_bmap_new_chunk(struct qbm_bmap *bm, uint64_t idx)
{
    uint8_t *c = chunk_alloc(bm);

    if (c) {
        bm->chunks[idx] = c;
    }
    return c;
}

/* Whether every bit set in a is set in b. */
static bool is_subset(const uint8_t *a, const uint8_t *b, uint64_t len)
{
    uint64_t i;

    for (i = 0; i < len; i += 8) {
        uint64_t x, y;

        memcpy(&x, a + i, 8);
        memcpy(&y, b + i, 8);
        if (x & ~y) {
            return false;
        }
    }
    return true;
}

int qbm_bmap_or_chunk(struct qbm_bmap *bm, uint64_t idx, const uint8_t *data)
{
    uint8_t *c;
    int r;

    if (!data || idx >= bm->nchunks || bm->chunks[idx] == QBM_CHUNK_ONES) {
        return 0;
    }
    if (data == QBM_CHUNK_ONES) {
        bm->chunks[idx] = QBM_CHUNK_ONES;
        return 0;
    }
    if (bm->chunks[idx] == QBM_CHUNK_REF) {
        r = qbm_bmap_load_chunk(bm, idx);
        if (r < 0) {
            return r;
        }
        if (is_subset(data, bm->chunks[idx], bm->chunk_bytes)) {
            /* data adds no bit: keep the reference, so that the unchanged
             * chunk is shared or copied at commit, not rewritten. */
            chunk_give_back(bm, bm->chunks[idx]);
            bm->chunks[idx] = QBM_CHUNK_REF;
            return 0;
        }
    }
    r = qbm_bmap_load_chunk(bm, idx); /* a pending OR */
    if (r < 0) {
        return r;
    }
    c = bm->chunks[idx];
    if (!c) {
        /* Keep only chunks with a set bit: memory follows dirty data. */
        if (data[0] == 0 && memcmp(data, data + 1, bm->chunk_bytes - 1) == 0) {
            return 0;
        }
        c = chunk_alloc(bm);
        if (!c) {
            return -ENOMEM;
        }
        memcpy(c, data, bm->chunk_bytes);
        bm->chunks[idx] = c;
        return 0;
    }
    or_into(c, data, bm->chunk_bytes);
    return 0;
}

/* Whether chunk k of a batch is on disk (a reference or a pending OR) and
 * data[k] may change it. */
static bool to_check(const struct qbm_bmap *bm, const uint64_t *idx,
                     const uint8_t *const *data, size_t k)
{
    const uint8_t *c = idx[k] < bm->nchunks ? bm->chunks[idx[k]] : NULL;

    return (c == QBM_CHUNK_REF || c == QBM_CHUNK_OR) && data[k] &&
           data[k] != QBM_CHUNK_ONES;
}

/* Read the clusters of references refs[0..m) into bufs, runs of one io's
 * consecutive clusters at once. */
static int refs_read(const struct qbm_bmap *bm,
                     const struct qbm_chunk_ref *refs, uint64_t *offs,
                     uint8_t *const *bufs, size_t m)
{
    size_t k, j;
    int r = 0;

    for (k = 0; k < m; k++) {
        offs[k] = refs[k].offset;
    }
    for (k = 0; k < m && r == 0; k = j) {
        for (j = k + 1; j < m && refs[j].io == refs[k].io; j++) {
        }
        r = qbm_io_read_pieces(refs[k].io, offs + k, bufs + k, j - k,
                               bm->chunk_bytes);
        if (r < 0) {
            r = qbm_err_prefix(r, "bitmap data clusters");
        }
    }
    return r;
}

int qbm_bmap_or_chunks(struct qbm_bmap *bm, const uint64_t *idx,
                       const uint8_t *const *data, size_t n,
                       struct qbm_io *src_io, const uint64_t *src_offs,
                       uint8_t *const *scratch)
{
    uint64_t *cidx = NULL, cs = bm->chunk_bytes;
    uint8_t **bufs = NULL, **tmps = NULL, *tmp = NULL;
    size_t *which = NULL, m = 0, nor = 0, k, j;
    int r = 0;

    /* The chunks on disk that data may change are read (into scratch, or
     * into new chunk buffers without a source to refer to) to see whether
     * data adds a bit. */
    for (k = 0; k < n; k++) {
        if (to_check(bm, idx, data, k)) {
            m++;
            nor += bm->chunks[idx[k]] == QBM_CHUNK_OR;
        }
    }
    if (m) {
        cidx = qbm_malloc(m * sizeof(*cidx));
        bufs = qbm_calloc(m, sizeof(*bufs));
        tmps = qbm_calloc(m, sizeof(*tmps));
        which = qbm_malloc(m * sizeof(*which));
        tmp = nor ? qbm_malloc(nor * cs) : NULL;
        if (!cidx || !bufs || !tmps || !which || (nor && !tmp)) {
            r = -ENOMEM;
            goto out;
        }
        if (src_io && !bm->ors) {
            bm->ors = qbm_calloc(bm->nchunks, sizeof(*bm->ors));
            if (!bm->ors) {
                r = -ENOMEM;
                goto out;
            }
        }
    }
    for (k = 0, m = 0, nor = 0; k < n && r == 0; k++) {
        if (to_check(bm, idx, data, k)) {
            bufs[m] = src_io ? scratch[k] : chunk_alloc(bm);
            r = bufs[m] ? 0 : -ENOMEM;
            if (bm->chunks[idx[k]] == QBM_CHUNK_OR) {
                tmps[m] = tmp + nor++ * cs;
            }
            cidx[m] = idx[k];
            which[m++] = k;
        }
    }
    r = r ? r : qbm_bmap_read_chunks(bm, cidx, bufs, tmps, m);
    for (k = 0; k < m; k++) {
        uint64_t i = cidx[k];
        uint8_t *c;

        if (r < 0 || is_subset(data[which[k]], bufs[k], cs)) {
            /* data adds no bit: the chunk stays on disk (see or_chunk). */
            if (!src_io && bufs[k]) {
                chunk_give_back(bm, bufs[k]);
            }
        } else if (src_io && bm->chunks[i] == QBM_CHUNK_REF) {
            /* The OR is computed when needed: by the commit, which writes
             * it without keeping it. */
            bm->ors[i].io = src_io;
            bm->ors[i].offset = src_offs[which[k]];
            bm->chunks[i] = QBM_CHUNK_OR;
        } else if (!src_io) {
            bm->chunks[i] = bufs[k]; /* ORed below */
        } else {
            /* A pending OR that data changes: loaded, ORed below. */
            c = chunk_alloc(bm);
            if (!c) {
                r = -ENOMEM;
                continue;
            }
            memcpy(c, bufs[k], cs);
            bm->chunks[i] = c;
        }
    }
    for (k = 0, j = 0; k < n && r == 0; k++) {
        if (j < m && which[j] == k) {
            /* Checked above: kept, a pending OR, or loaded to OR now. */
            j++;
            if (bm->chunks[idx[k]] == QBM_CHUNK_REF ||
                bm->chunks[idx[k]] == QBM_CHUNK_OR) {
                continue;
            }
        }
        r = qbm_bmap_or_chunk(bm, idx[k], data[k]);
    }
out:
    free(cidx);
    free(bufs);
    free(tmps);
    free(which);
    free(tmp);
    return r;
}

int qbm_bmap_read_chunks(const struct qbm_bmap *bm, const uint64_t *idx,
                         uint8_t *const *bufs, uint8_t *const *tmps, size_t n)
{
    struct qbm_chunk_ref *refs;
    uint64_t *offs;
    uint8_t **ptrs;
    size_t k, m = 0;
    int r;

    refs = qbm_malloc(2 * n * sizeof(*refs));
    offs = qbm_malloc(2 * n * sizeof(*offs));
    ptrs = qbm_malloc(2 * n * sizeof(*ptrs));
    r = refs && offs && ptrs ? 0 : -ENOMEM;
    /* First operands into bufs, second ones of pending ORs into tmps. */
    for (k = 0; k < n && r == 0; k++) {
        refs[m] = bm->refs[idx[k]];
        ptrs[m++] = bufs[k];
    }
    for (k = 0; k < n && r == 0; k++) {
        if (bm->chunks[idx[k]] == QBM_CHUNK_OR) {
            refs[m] = bm->ors[idx[k]];
            ptrs[m++] = tmps[k];
        }
    }
    r = r ? r : refs_read(bm, refs, offs, ptrs, m);
    for (k = 0; k < n && r == 0; k++) {
        if (bm->chunks[idx[k]] == QBM_CHUNK_OR) {
            or_into(bufs[k], tmps[k], bm->chunk_bytes);
        }
    }
    free(refs);
    free(offs);
    free(ptrs);
    return r;
}

static void extent_state_init(struct qbm_extent_state *st,
                              const struct qbm_bmap *bm, qbm_extent_fn fn,
                              void *opaque)
{
    memset(st, 0, sizeof(*st));
    st->fn = fn;
    st->opaque = opaque;
    st->granularity = bm->granularity;
    st->disk_size = bm->disk_size;
    st->bits_per_chunk = bm->chunk_bytes * 8;
    st->chunk_bytes = bm->chunk_bytes;
    st->nbits = bm->nbits;
}

/* Feed chunks [first, end) to st; referenced chunks are read into a
 * scratch buffer, not kept. */
static int walk_chunks(const struct qbm_bmap *bm, uint64_t first, uint64_t end,
                       struct qbm_extent_state *st)
{
    uint8_t *tmp = NULL;
    uint64_t i;
    int r = 0;

    if (end > bm->nchunks) {
        end = bm->nchunks;
    }
    for (i = first; i < end && r == 0; i++) {
        const uint8_t *c = bm->chunks[i];

        if (c == QBM_CHUNK_REF || c == QBM_CHUNK_OR) {
            /* Two chunks of scratch: a pending OR's operands. */
            if (!tmp && !(tmp = qbm_malloc(2 * bm->chunk_bytes))) {
                r = -ENOMEM;
                break;
            }
            r = chunk_read(bm, i, tmp, tmp + bm->chunk_bytes);
            c = tmp;
        }
        if (r == 0) {
            r = qbm_extent_state_chunk(st, i, c);
        }
    }
    free(tmp);
    return r ? r : qbm_extent_state_finish(st);
}

int qbm_bmap_extents(const struct qbm_bmap *bm, qbm_extent_fn fn, void *opaque)
{
    struct qbm_extent_state st;

    extent_state_init(&st, bm, fn, opaque);
    return walk_chunks(bm, 0, UINT64_MAX, &st);
}

int qbm_bmap_walk_range(const struct qbm_bmap *bm, uint64_t first, uint64_t end,
                        struct qbm_extent_state *st)
{
    return walk_chunks(bm, first, end, st);
}

int qbm_bmap_dirty_bytes(const struct qbm_bmap *bm, uint64_t *ret_bytes)
{
    struct qbm_extent_state st;
    int r;

    extent_state_init(&st, bm, NULL, NULL);
    r = walk_chunks(bm, 0, UINT64_MAX, &st);
    if (r == 0) {
        *ret_bytes = st.dirty_bytes;
    }
    return r;
}
