/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * The system calls of bitmap data (issue 16): a commit that rewrites every
 * data cluster of a bitmap reads and writes them in runs, not one cluster
 * per call; and the fault backend's vectored write, which a crash or an
 * error can cut after a prefix of its sectors.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "testlib.h"

/* 4 KiB clusters and granularity: a data cluster covers 128 MiB, so a
 * disk of almost 4 GiB has NCHUNKS of them, the last one short by three
 * bits. */
#define CS 4096ull
#define GRAN 4096ull
#define CHUNK_SPAN (CS * 8 * GRAN)
#define NCHUNKS 32ull
#define DISK (NCHUNKS * CHUNK_SPAN - 3 * GRAN)

/* The bytes of an image with bitmaps a and b: in every chunk, a has the
 * first half of the bits and b the second, so merging b into a changes
 * every data cluster of a. */
static uint8_t *dense_pair(size_t *ret_len)
{
    size_t len;
    uint8_t *fresh = tl_image_bytes(DISK, NULL, 0, &len), *copy;
    struct qbm_image *img = qbm_open_memory(fresh, len, "mem", QBM_OPEN_RDWR);
    uint64_t i;

    assert_non_null(img);
    assert_int_equal(qbm_bitmap_add(img, "a", GRAN, 0), 0);
    assert_int_equal(qbm_bitmap_add(img, "b", GRAN, 0), 0);
    for (i = 0; i < NCHUNKS; i++) {
        assert_int_equal(
            qbm_bitmap_set_dirty(img, "a", i * CHUNK_SPAN, CHUNK_SPAN / 2), 0);
        assert_int_equal(qbm_bitmap_set_dirty(img, "b",
                                              i * CHUNK_SPAN + CHUNK_SPAN / 2,
                                              CHUNK_SPAN / 2 - GRAN),
                         0);
    }
    assert_int_equal(qbm_commit(img), 0);
    copy = tl_mem_copy(img, ret_len);
    qbm_close(img);
    free(fresh);
    return copy;
}

static uint64_t dirty(struct qbm_image *img, const char *name)
{
    uint64_t bytes = 0;
    size_t i;

    for (i = 0; i < qbm_bitmap_count(img); i++) {
        if (!strcmp(qbm_bitmap_name(img, i), name)) {
            assert_int_equal(qbm_bitmap_dirty_bytes(img, i, &bytes), 0);
        }
    }
    return bytes;
}

/*
 * Merging b into a rewrites a's NCHUNKS data clusters: they are read in
 * runs (b's and a's, a window at a time) and written in one batch with
 * the table; one call per cluster would be 2 * NCHUNKS reads and NCHUNKS
 * writes.
 */
static void test_dense_rewrite_batches(void **state)
{
    struct tl_count_io *c;
    struct qbm_image *img;
    size_t len;
    uint8_t *buf = dense_pair(&len);
    uint64_t reads, writes;

    img = tl_open_counted(buf, len, true, &c);
    c->reads = 0;
    assert_int_equal(qbm_bitmap_merge(img, "a", img, "b"), 0);
    reads = c->reads;
    assert_int_equal(qbm_commit(img), 0);
    writes = c->writes;
    printf("merge: %llu reads; commit: %llu reads, %llu writes (%llu "
           "bytes), %llu flushes\n",
           (unsigned long long)reads, (unsigned long long)c->reads - reads,
           (unsigned long long)writes, (unsigned long long)c->write_bytes,
           (unsigned long long)c->flushes);
    /* b's table, then the data clusters in two reads (b's, then a's:
     * 128 KiB each, one window). */
    assert_true(reads <= 4);
    /* Data and table in one batch, the directory, refcount sectors, the
     * switch and the releases: a handful, whatever NCHUNKS is. */
    assert_true(writes <= 8);
    /* Each data cluster once, and metadata of a few sectors: a batch
     * written twice would double the first term. */
    assert_true(c->write_bytes >= NCHUNKS * CS);
    assert_true(c->write_bytes <= NCHUNKS * CS + 4 * CS);
    assert_int_equal(dirty(img, "a"), DISK - (NCHUNKS - 1) * GRAN);
    qbm_close(img);
    free(buf);
}

static int sum_extents(void *opaque, uint64_t offset, uint64_t length)
{
    *(uint64_t *)opaque += length;
    return 0;
}

/* The staged data of bitmap `name`. */
static struct qbm_bmap *staged(struct qbm_image *img, const char *name)
{
    uint32_t i;

    for (i = 0; i < img->nb_bitmaps; i++) {
        if (!strcmp(img->bitmaps[i].name, name)) {
            return img->bitmaps[i].data;
        }
    }
    return NULL;
}

/*
 * A merge that changes referenced chunks leaves pending ORs: no chunk
 * memory is taken (the commit computes each OR a window at a time and
 * writes it). Before the commit they read as the OR (dirty bytes, extents
 * of a range); a partial edit loads one of them, a second merge of another
 * bitmap loads the rest; the commit writes them all.
 */
static void test_pending_or(void **state)
{
    struct qbm_image *img;
    struct qbm_bmap *d;
    size_t len, clen, ia;
    uint8_t *buf = dense_pair(&len), *withc;
    uint64_t i, got = 0, merged = DISK - (NCHUNKS - 1) * GRAN;

    /* A third bitmap c: the bit of each chunk that neither a nor b has. */
    img = qbm_open_memory(buf, len, "mem", QBM_OPEN_RDWR);
    assert_non_null(img);
    assert_int_equal(qbm_bitmap_add(img, "c", GRAN, 0), 0);
    for (i = 0; i + 1 < NCHUNKS; i++) {
        assert_int_equal(qbm_bitmap_set_dirty(img, "c",
                                              (i + 1) * CHUNK_SPAN - GRAN,
                                              GRAN),
                         0);
    }
    assert_int_equal(qbm_commit(img), 0);
    withc = tl_mem_copy(img, &clen);
    qbm_close(img);

    img = qbm_open_memory(withc, clen, "mem", QBM_OPEN_RDWR);
    assert_non_null(img);
    assert_int_equal(qbm_bitmap_merge(img, "a", img, "b"), 0);
    d = staged(img, "a");
    assert_non_null(d);
    for (i = 0; i < NCHUNKS; i++) {
        assert_ptr_equal(d->chunks[i], QBM_CHUNK_OR);
    }
    assert_null(d->arenas);
    /* A bit of a, one of b, and the clean last bit of chunk 5. */
    assert_int_equal(qbm_bmap_get(d, 5 * CHUNK_SPAN / GRAN), 1);
    assert_int_equal(qbm_bmap_get(d, (5 * CHUNK_SPAN + CHUNK_SPAN / 2) / GRAN),
                     1);
    assert_int_equal(qbm_bmap_get(d, 6 * CHUNK_SPAN / GRAN - 1), 0);
    assert_int_equal(dirty(img, "a"), merged);
    ia = (size_t)qbm_bitmap_find(img, "a");
    assert_int_equal(qbm_bitmap_extents_range(img, ia, 2 * CHUNK_SPAN,
                                              CHUNK_SPAN, sum_extents,
                                              &got),
                     0);
    assert_int_equal(got, CHUNK_SPAN - GRAN);
    /* The same merge again changes nothing. */
    assert_int_equal(qbm_bitmap_merge(img, "a", img, "b"), 0);
    assert_ptr_equal(d->chunks[5], QBM_CHUNK_OR);
    /* A partial edit loads the chunk it touches. */
    assert_int_equal(
        qbm_bitmap_set_dirty(img, "a", 4 * CHUNK_SPAN - GRAN, GRAN), 0);
    assert_true(d->chunks[3] != QBM_CHUNK_OR && d->chunks[3] != NULL);
    assert_ptr_equal(d->chunks[4], QBM_CHUNK_OR);
    assert_int_equal(dirty(img, "a"), merged + GRAN);
    /* c fills the last bit of every chunk: a is then all dirty. */
    assert_int_equal(qbm_bitmap_merge(img, "a", img, "c"), 0);
    assert_int_equal(dirty(img, "a"), DISK);
    assert_int_equal(qbm_commit(img), 0);
    assert_int_equal(dirty(img, "a"), DISK);
    qbm_close(img);
    free(withc);

    /* Committed straight away: the ORs as they were computed. */
    img = qbm_open_memory(buf, len, "mem", QBM_OPEN_RDWR);
    assert_int_equal(qbm_bitmap_merge(img, "a", img, "b"), 0);
    assert_int_equal(qbm_commit(img), 0);
    assert_int_equal(dirty(img, "a"), merged);
    qbm_close(img);
    free(buf);
}

/*
 * Pending ORs over several windows of a commit (64 chunks of 4 KiB each)
 * and in two bitmaps at once, mixed with chunks that stay references
 * (b adds nothing there), become shared references (a clean there), stay
 * clean or are all ones; every chunk has its own bits. What the commit
 * writes must read back as what the staged bitmaps showed before it, and
 * as an image where the same ranges were set directly.
 */
#define WCHUNKS 150ull
#define WDISK (WCHUNKS * CHUNK_SPAN)

/* The ranges of a/b (first == true: a) in chunk i, set in bitmap `name`. */
static void set_pattern(struct qbm_image *img, const char *name, uint64_t i,
                        bool first)
{
    uint64_t at = i * CHUNK_SPAN;

    if (first && i % 11 != 0) {
        assert_int_equal(
            qbm_bitmap_set_dirty(img, name, at, (i % 5 + 1) * 3 * GRAN), 0);
    }
    if (!first && i % 10 != 0) {
        assert_int_equal(qbm_bitmap_set_dirty(
                             img, name, at + CHUNK_SPAN / 2 + (i % 3) * GRAN,
                             (i % 7 + 1) * GRAN),
                         0);
    }
    if (!first && i == 77) {
        assert_int_equal(qbm_bitmap_set_dirty(img, name, at, CHUNK_SPAN), 0);
    }
}

static void test_pending_or_windows(void **state)
{
    static char before_a[65536], before_c[65536], got[65536], want[65536];
    size_t flen, len, elen, k;
    uint8_t *fresh = tl_image_bytes(WDISK, NULL, 0, &flen), *buf, *exp;
    struct qbm_image *img = qbm_open_memory(fresh, flen, "mem", QBM_OPEN_RDWR);
    const char *names[] = { "a", "b", "c", "d", "e" };
    uint64_t i;

    assert_non_null(img);
    for (k = 0; k < 5; k++) {
        assert_int_equal(qbm_bitmap_add(img, names[k], GRAN, 0), 0);
    }
    for (i = 0; i < WCHUNKS; i++) {
        set_pattern(img, "a", i, true);
        set_pattern(img, "b", i, false);
        set_pattern(img, "e", i, false); /* b's bits in other clusters */
        /* c, d: the same with the chunks in the other order */
        set_pattern(img, "c", WCHUNKS - 1 - i, true);
        set_pattern(img, "d", WCHUNKS - 1 - i, false);
    }
    assert_int_equal(qbm_commit(img), 0);
    buf = tl_mem_copy(img, &len);
    qbm_close(img);

    /* The expected bitmaps, set directly. */
    img = qbm_open_memory(fresh, flen, "mem", QBM_OPEN_RDWR);
    assert_int_equal(qbm_bitmap_add(img, "a", GRAN, 0), 0);
    assert_int_equal(qbm_bitmap_add(img, "c", GRAN, 0), 0);
    for (i = 0; i < WCHUNKS; i++) {
        set_pattern(img, "a", i, true);
        set_pattern(img, "a", i, false);
        set_pattern(img, "c", WCHUNKS - 1 - i, true);
        set_pattern(img, "c", WCHUNKS - 1 - i, false);
    }
    assert_int_equal(qbm_commit(img), 0);
    exp = tl_mem_copy(img, &elen);
    qbm_close(img);
    free(fresh);

    img = qbm_open_memory(buf, len, "mem", QBM_OPEN_RDWR);
    assert_int_equal(qbm_bitmap_merge(img, "a", img, "b"), 0);
    assert_int_equal(qbm_bitmap_merge(img, "c", img, "d"), 0);
    assert_ptr_equal(staged(img, "a")->chunks[1], QBM_CHUNK_OR);
    assert_ptr_equal(staged(img, "a")->chunks[10], QBM_CHUNK_REF);
    assert_ptr_equal(staged(img, "c")->chunks[WCHUNKS - 2], QBM_CHUNK_OR);
    /* b, and e with the same bits, add nothing now: the pending ORs
     * stay. */
    assert_int_equal(qbm_bitmap_merge(img, "a", img, "b"), 0);
    assert_int_equal(qbm_bitmap_merge(img, "a", img, "e"), 0);
    for (i = 0; i < WCHUNKS; i++) {
        if (i % 11 != 0 && i % 10 != 0 && i != 77) {
            assert_ptr_equal(staged(img, "a")->chunks[i], QBM_CHUNK_OR);
        }
    }
    tl_extents(img, "a", before_a, sizeof(before_a));
    tl_extents(img, "c", before_c, sizeof(before_c));
    assert_int_equal(qbm_commit(img), 0);
    tl_extents(img, "a", got, sizeof(got));
    assert_string_equal(got, before_a);
    tl_extents(img, "c", got, sizeof(got));
    assert_string_equal(got, before_c);
    qbm_close(img);

    img = qbm_open_memory(exp, elen, "mem", 0);
    tl_extents(img, "a", want, sizeof(want));
    assert_string_equal(before_a, want);
    tl_extents(img, "c", want, sizeof(want));
    assert_string_equal(before_c, want);
    qbm_close(img);
    free(exp);
    free(buf);
}

/*
 * A merge from another image refers to its clusters only while it holds
 * that image's read lock: from a handle opened with force-share, or one
 * of the target's own file, the bits are read at once (the chunk becomes
 * a buffer, not a pending OR or a reference to that handle's file).
 */
/* Merge b of FILE, opened with force-share, into a of x: chunk 0 of a is
 * then in memory. */
static void merge_read_now(struct qbm_image *x, const char *file)
{
    struct qbm_image *y = qbm_open(tl_path(file), QBM_OPEN_FORCE_SHARE);
    struct qbm_bmap *d;

    assert_non_null(y);
    assert_int_equal(qbm_bitmap_merge(x, "a", y, "b"), 0);
    qbm_close(y);
    d = staged(x, "a");
    assert_non_null(d->chunks[0]);
    assert_true(d->chunks[0] != QBM_CHUNK_OR && d->chunks[0] != QBM_CHUNK_REF);
}

static void test_or_source_unlocked(void **state)
{
    struct qbm_image *x, *z;
    struct qbm_bmap *d;

    tl_write_image("x.qcow2", 1ull << 30, NULL, 0);
    tl_add_bitmap("x.qcow2", "a", 65536, true, 0);
    tl_add_bitmap("x.qcow2", "c", 65536, true, 0);
    tl_add_bitmap("x.qcow2", "b", 65536, true, 1 << 20);
    tl_write_image("z.qcow2", 1ull << 30, NULL, 0);
    tl_add_bitmap("z.qcow2", "b", 65536, true, 1 << 20);

    x = qbm_open(tl_path("x.qcow2"), QBM_OPEN_RDWR);
    assert_non_null(x);
    /* Another file, read-locked: a pending OR with its descriptor. */
    z = qbm_open(tl_path("z.qcow2"), 0);
    assert_non_null(z);
    assert_int_equal(qbm_bitmap_merge(x, "c", z, "b"), 0);
    qbm_close(z);
    d = staged(x, "c");
    assert_ptr_equal(d->chunks[0], QBM_CHUNK_OR);
    /* Unlocked, and the same file: read now. */
    merge_read_now(x, "z.qcow2");
    assert_int_equal(qbm_bitmap_clear(x, "a"), 0);
    merge_read_now(x, "x.qcow2");
    assert_int_equal(qbm_commit(x), 0);
    assert_int_equal(dirty(x, "a"), 65536);
    assert_int_equal(dirty(x, "c"), 2 * 65536);
    qbm_close(x);
}

/* A rewrite of a bitmap whose chunks are all ones writes them as bits,
 * the last one only up to the end of the disk, in the same batch. */
static void test_all_ones_batch(void **state)
{
    struct tl_count_io *c;
    struct qbm_image *img;
    size_t len;
    uint8_t *buf = dense_pair(&len);

    img = tl_open_counted(buf, len, true, &c);
    assert_int_equal(qbm_bitmap_set_dirty(img, "b", 0, DISK - 512), 0);
    assert_int_equal(qbm_commit(img), 0);
    assert_true(c->writes <= 8);
    assert_true(c->write_bytes >= NCHUNKS * CS);
    assert_true(c->write_bytes <= NCHUNKS * CS + 4 * CS);
    assert_int_equal(dirty(img, "b"), DISK);
    qbm_close(img);
    free(buf);
}

/* A crash on a vectored write leaves a prefix of its sectors (at least
 * one, not all) in what reads see and among the unflushed writes. */
static void test_fault_cuts_batch(void **state)
{
    static uint8_t zero[8192];
    uint8_t a[1024], b[3000], got[8192];
    struct iovec iov[2] = { { a, sizeof(a) }, { b, sizeof(b) } };
    struct qbm_io *io;
    uint64_t cut = 0;
    size_t len, k;
    const uint8_t *live;
    uint32_t seed;
    bool inside_b = false;

    memset(a, 0xaa, sizeof(a));
    memset(b, 0xbb, sizeof(b));
    for (seed = 1; seed <= 16; seed++) {
        assert_int_equal(qbm_io_fault_open(zero, sizeof(zero), 1, seed, &io),
                         0);
        assert_true(qbm_io_pwritev(io, iov, 2, 512) < 0);
        assert_true(qbm_io_fault_cut(io, &cut));
        assert_true(cut >= 512 && cut < sizeof(a) + sizeof(b));
        assert_true(cut % 512 == 0);
        inside_b |= cut > sizeof(a);
        live = qbm_io_mem_data(qbm_io_fault_live(io), &len);
        memcpy(got, zero, sizeof(got));
        memcpy(got, live, len < sizeof(got) ? len : sizeof(got));
        for (k = 0; k < sizeof(a) + sizeof(b); k++) {
            uint8_t want = k >= cut ? 0 : k < sizeof(a) ? 0xaa : 0xbb;

            assert_int_equal(got[512 + k], want);
        }
        /* Later operations fail: the process is gone. */
        assert_true(qbm_io_flush(io) < 0);
        qbm_io_close(io);
    }
    assert_true(inside_b);

    /* Failing once (a full disk) cuts it too, and what follows works. */
    assert_int_equal(qbm_io_fault_open(zero, sizeof(zero), 0, 7, &io), 0);
    qbm_io_fault_fail_once(io, 1, ENOSPC);
    assert_int_equal(qbm_io_pwritev(io, iov, 2, 0), -ENOSPC);
    assert_true(qbm_io_fault_cut(io, NULL));
    assert_int_equal(qbm_io_pwritev(io, iov, 2, 0), 0);
    assert_int_equal(qbm_io_flush(io), 0);
    qbm_io_close(io);
}

/* The memory backend has no vectored ops: the fallback loop writes and
 * reads each buffer in turn. */
static void test_fallback_loop(void **state)
{
    uint8_t a[100], b[700], ra[100], rb[700];
    struct iovec w[2] = { { a, sizeof(a) }, { b, sizeof(b) } };
    struct iovec r[2] = { { ra, sizeof(ra) }, { rb, sizeof(rb) } };
    struct qbm_io *io;

    memset(a, 1, sizeof(a));
    memset(b, 2, sizeof(b));
    assert_int_equal(qbm_io_mem_open(NULL, 0, &io), 0);
    assert_int_equal(qbm_io_pwritev(io, w, 2, 10), 0);
    assert_int_equal(qbm_io_preadv(io, r, 2, 10), 0);
    assert_memory_equal(a, ra, sizeof(a));
    assert_memory_equal(b, rb, sizeof(b));
    /* Past the end reads as zeros. */
    assert_int_equal(qbm_io_preadv(io, r, 2, 500), 0);
    assert_int_equal(rb[699], 0);
    qbm_io_close(io);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_dense_rewrite_batches),
        cmocka_unit_test(test_all_ones_batch),
        cmocka_unit_test(test_pending_or),
        cmocka_unit_test(test_pending_or_windows),
        cmocka_unit_test_teardown(test_or_source_unlocked, tl_dir_clean),
        cmocka_unit_test(test_fault_cuts_batch),
        cmocka_unit_test(test_fallback_loop),
    };

    return cmocka_run_group_tests(tests, tl_dir_setup, tl_dir_teardown);
}
