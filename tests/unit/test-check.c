/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * qbm_check (and the allocation map) on hostile layouts: what it reports,
 * and that its cost follows the file, not sizes claimed by the header or
 * the refcount table (an L1 table or refcount blocks far past the end of
 * the file read as zeros and must not be read or walked entry by entry),
 * nor the number of L1 entries pointing to one L2 table.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>
#ifdef __GLIBC__
#include <malloc.h>
#endif

#include "testlib.h"

#define CS 4096ull
/* The writer's layout with 4 KiB clusters: header, refcount table, one
 * refcount block (16-bit entries), L1 table. */
#define RT_OFF (1 * CS)
#define RB_OFF (2 * CS)
#define L1_OFF (3 * CS)
#define PER_BLOCK (CS * 8 / 16)

/* A fresh, empty 64 MiB image with 4 KiB clusters, as bytes (in a buffer
 * of at least 4 clusters); the file ends at or inside its L1 cluster. */
static uint8_t *fresh_image(size_t *ret_len)
{
    uint8_t *b = tl_image_bytes(64 << 20, NULL, 0, ret_len), *copy;

    assert_true(*ret_len > L1_OFF && *ret_len <= L1_OFF + CS);
    /* Room for the edits below, inside the same clusters. */
    copy = calloc(1, L1_OFF + CS);
    memcpy(copy, b, *ret_len);
    free(b);
    assert_int_equal(be64_load(copy + 40), L1_OFF);
    assert_int_equal(be64_load(copy + 48), RT_OFF);
    assert_int_equal(be64_load(copy + RT_OFF), RB_OFF);
    return copy;
}

struct problems {
    uint64_t count[4];
    char text[8][160];
    size_t n;
};

static int collect(void *opaque, int kind, uint64_t off, const char *msg)
{
    struct problems *p = opaque;

    p->count[kind & 3]++;
    if (p->n < 8) {
        snprintf(p->text[p->n++], sizeof(p->text[0]), "%d %s", kind, msg);
    }
    return 0;
}

/* qbm_check of the image BUF (LEN bytes) into `p`: the bytes it read. */
static uint64_t check_counted(const uint8_t *buf, size_t len,
                              struct problems *p)
{
    struct tl_count_io *io;
    struct qbm_image *img = tl_open_counted(buf, len, false, &io);
    uint64_t nread;

    io->read_bytes = 0;
    assert_int_equal(qbm_check(img, collect, p), 0);
    nread = io->read_bytes;
    qbm_close(img);
    return nread;
}

/*
 * An L1 table of 4 Mi entries (32 MiB, the most qbm accepts) in a 16 KiB
 * file: the part past the end of the file references nothing and is not
 * read; the table's own clusters past the refcounts are one corruption.
 */
static void test_l1_past_eof(void **state)
{
    size_t len;
    uint8_t *buf = fresh_image(&len);
    struct problems p = { .n = 0 };
    uint64_t nread;

    be32_store(buf + 36, QCOW2_MAX_L1_BYTES / 8);
    nread = check_counted(buf, len, &p);
    assert_int_equal(p.n, 1);
    assert_string_equal(p.text[0], "1 L1 table at 0x3000: beyond the "
                        "clusters the refcounts describe");
    assert_true(nread < 64 * 1024);
    free(buf);
}

/* The 32 L1 entries point at distinct L2 tables past the end of the file:
 * they hold only zeros, so none is read. */
static void test_l2_past_eof(void **state)
{
    size_t len, i;
    uint8_t *buf = fresh_image(&len);
    struct problems p = { .n = 0 };
    uint64_t nread;

    for (i = 0; i < 32; i++) {
        be64_store(buf + L1_OFF + i * 8, (1000 + i) * CS);
    }
    nread = check_counted(buf, len, &p);
    assert_int_equal(p.count[QBM_PROBLEM_CORRUPTION], 32);
    assert_int_equal(p.count[QBM_PROBLEM_LEAK], 0);
    assert_string_equal(p.text[0], "1 L2 table at 0x3e8000: beyond the "
                        "clusters the refcounts describe");
    assert_true(nread < 32 * CS);
    free(buf);
}

/*
 * All 512 entries of the L1 table point to one L2 table (cluster 4) whose
 * first 511 entries point to cluster 5 and whose last has reserved bits
 * set. The references are those of 512 L2 tables (QEMU's count: a table
 * shared by snapshots counts its data once per L1 table), but the table is
 * walked once: its bad entry is reported once, not 512 times (before, the
 * walk cost 512 times the table, and a 160 KiB fuzz input 160 M entries).
 */
static void test_shared_l2_walked_once(void **state)
{
    size_t len, i;
    uint8_t *buf = fresh_image(&len), *img;
    struct problems p = { .n = 0 };
    char want[160];

    len = 6 * CS;
    img = calloc(1, len);
    memcpy(img, buf, L1_OFF + CS);
    be32_store(img + 36, CS / 8);
    for (i = 0; i < CS / 8; i++) {
        be64_store(img + L1_OFF + i * 8, 4 * CS);
        be64_store(img + 4 * CS + i * 8, 5 * CS);
    }
    be64_store(img + 5 * CS - 8, 5 * CS | 0x100);
    check_counted(img, len, &p);
    assert_int_equal(p.count[QBM_PROBLEM_CORRUPTION], 3);
    assert_int_equal(p.count[QBM_PROBLEM_LEAK], 0);
    assert_string_equal(p.text[0], "1 L2 table at 0x4000, entry 511: "
                        "reserved bits set");
    assert_string_equal(p.text[1], "1 cluster 0x4000: refcount 0, but 512 "
                        "references");
    snprintf(want, sizeof(want), "1 cluster 0x5000: refcount 0, but %llu "
             "references", (unsigned long long)(CS / 8 * (CS / 8 - 1)));
    assert_string_equal(p.text[2], want);
    free(img);
    free(buf);
}

struct alloc_rec {
    char *text;
    size_t size;
};

static int alloc_append(void *opaque, uint64_t off, uint64_t len,
                        unsigned status)
{
    struct alloc_rec *a = opaque;

    tl_appendf(a->text, a->size, "%llx+%llx:%u ", (unsigned long long)off,
               (unsigned long long)len, status);
    return 0;
}

/*
 * The 512 L1 entries point in turn to two L2 tables: A (cluster 4), whose
 * first half is data, and B (cluster 5), all zero clusters; the disk ends
 * 1 MiB and 512 bytes into the last span (B's). The allocation map reads
 * each table once and replays its runs for the other entries (before, it
 * decoded and, the tables alternating, read 512 tables: 2 MiB).
 */
static void test_shared_l2_allocation(void **state)
{
    const uint64_t span = CS / 8 * CS;
    const uint64_t size = 511 * span + (1 << 20) + 512;
    size_t len, i;
    uint8_t *buf = fresh_image(&len), *bytes;
    struct alloc_rec got = { calloc(1, 64 << 10), 64 << 10 };
    char *want = calloc(1, 64 << 10);
    struct tl_count_io *io;
    struct qbm_image *img;

    assert_int_equal(buf[7], 3);
    len = 7 * CS;
    bytes = calloc(1, len);
    memcpy(bytes, buf, L1_OFF + CS);
    be64_store(bytes + 24, size);
    be32_store(bytes + 36, CS / 8);
    for (i = 0; i < CS / 8; i++) {
        be64_store(bytes + L1_OFF + i * 8, (4 + i % 2) * CS);
        if (i < CS / 16) {
            be64_store(bytes + 4 * CS + i * 8, 6 * CS);
        }
        be64_store(bytes + 5 * CS + i * 8, 1); /* zero flag */
    }
    for (i = 0; i < CS / 8; i++) {
        uint64_t n = i % 2 ? span : span / 2;

        if (i * span + n > size) {
            n = size - i * span;
        }
        tl_appendf(want, 64 << 10, "%llx+%llx:%u ",
                   (unsigned long long)(i * span), (unsigned long long)n,
                   i % 2 ? QBM_ALLOC_ZERO : QBM_ALLOC_DATA);
    }
    img = tl_open_counted(bytes, len, false, &io);
    io->read_bytes = 0;
    assert_int_equal(qbm_image_allocation(img, alloc_append, &got), 0);
    assert_string_equal(got.text, want);
    /* The L1 table and the two L2 tables, at most: not 512 tables. */
    assert_in_range(io->read_bytes, 2 * CS, 3 * CS);
    qbm_close(img);
    free(got.text);
    free(want);
    free(bytes);
    free(buf);
}

/*
 * 512 refcount table entries pointing at distinct blocks past the end of
 * the file: they hold only zeros, so none is read.
 */
static void test_refblocks_past_eof(void **state)
{
    size_t len, i;
    uint8_t *buf = fresh_image(&len);
    struct problems p = { .n = 0 };
    uint64_t nread;

    for (i = 1; i < CS / 8; i++) {
        be64_store(buf + RT_OFF + i * 8, (1000 + i) * CS);
    }
    nread = check_counted(buf, len, &p);
    /* Each block is a reference past the refcounts, and nothing else. */
    assert_int_equal(p.count[QBM_PROBLEM_CORRUPTION], CS / 8 - 1);
    assert_int_equal(p.count[QBM_PROBLEM_LEAK], 0);
    assert_string_equal(p.text[0], "1 refcount block at 0x3e9000: beyond "
                        "the clusters the refcounts describe");
    assert_true(nread < 64 * 1024);
    free(buf);
}

/*
 * References and refcounts past the end of the file, compared where the
 * refcounts are 0 because a block is missing, lies past the end of the
 * file, or is partly there: every difference is reported, once.
 *   - refcount 1 for cluster 200 (past the end, in the block): a leak;
 *   - L1 entry 0 -> an L2 table at cluster 100 (past the end, refcount 0):
 *     corruption; it reads as zeros and references nothing more;
 *   - table entry 1 missing, entry 2 the same block as entry 0: the
 *     refcounts extend to 2 * 2048 + 201 clusters; L1 entry 1 -> cluster
 *     2048 + 5 (no block): corruption; block 2's refcounts are all leaks,
 *     and the block, referenced twice, has refcount 1: corruption.
 */
static void test_compare_past_eof(void **state)
{
    size_t len;
    uint8_t *buf = fresh_image(&len);
    struct problems p = { .n = 0 };
    struct qbm_image *img;
    uint64_t nonzero = 0, i;

    len = L1_OFF + CS;
    be16_store(buf + RB_OFF + 200 * 2, 1);
    for (i = 0; i < PER_BLOCK; i++) {
        nonzero += be16_load(buf + RB_OFF + i * 2) != 0;
    }
    assert_int_equal(nonzero, 5);
    be64_store(buf + L1_OFF, 100 * CS);
    be64_store(buf + L1_OFF + 8, (PER_BLOCK + 5) * CS);
    be64_store(buf + RT_OFF + 16, RB_OFF);
    img = qbm_open_memory(buf, len, "mem", 0);
    assert_non_null(img);
    assert_int_equal(qbm_check(img, collect, &p), 0);
    /* Block 0 is also block 2: counted twice, with refcount 1. */
    assert_int_equal(p.count[QBM_PROBLEM_CORRUPTION], 3);
    assert_int_equal(p.count[QBM_PROBLEM_LEAK], 1 + nonzero);
    assert_string_equal(p.text[0], "1 cluster 0x2000: refcount 1, but 2 "
                        "references");
    assert_string_equal(p.text[1], "1 cluster 0x64000: refcount 0, but 1 "
                        "references");
    assert_string_equal(p.text[2], "2 cluster 0xc8000 leaked: refcount 1, "
                        "0 references");
    assert_string_equal(p.text[3], "1 cluster 0x805000: refcount 0, but 1 "
                        "references");
    assert_string_equal(p.text[4], "2 cluster 0x1000000 leaked: refcount 1, "
                        "0 references");
    qbm_close(img);

    /* The same block cut by the end of the file: cluster 200's refcount is
     * past it, so it reads as 0 and neither 200 nor 2 * 2048 + 200 leaks;
     * the refcounts now end with the block's last non-zero entry. */
    len = RB_OFF + 200 * 2;
    memset(&p, 0, sizeof(p));
    img = qbm_open_memory(buf, len, "mem", 0);
    assert_non_null(img);
    assert_int_equal(qbm_check(img, collect, &p), 0);
    assert_int_equal(p.count[QBM_PROBLEM_CORRUPTION], 1);
    assert_int_equal(p.count[QBM_PROBLEM_LEAK], nonzero - 1);
    qbm_close(img);
    free(buf);
}

/*
 * An in-use bitmap (whose table size QEMU does not check) with a table of
 * 131072 entries (1 MiB, the most for 4 KiB clusters) in the last cluster
 * of the file, so almost all past its end: reading the bitmap and checking
 * the image read only the part inside the file.
 */
static void test_bitmap_table_past_eof(void **state)
{
    size_t len, blen;
    uint8_t *buf = fresh_image(&len), *bytes;
    struct problems p = { .n = 0 };
    struct tl_count_io *io;
    struct qbm_image *img;
    const uint8_t *b;
    uint64_t dir, end, dirty = 1;

    img = qbm_open_memory(buf, len, "mem", QBM_OPEN_RDWR);
    assert_non_null(img);
    assert_int_equal(qbm_bitmap_add(img, "b", 65536, 0), 0);
    assert_int_equal(qbm_commit(img), 0);
    b = qbm_io_mem_data(img->io, &blen);
    /* The table moves to a new, last cluster of zeros (refcount 0). */
    end = (blen + CS - 1) / CS * CS;
    bytes = calloc(1, end + CS);
    memcpy(bytes, b, blen);
    blen = end + CS;
    qbm_close(img);
    /* The bitmaps extension is the first one: its directory's entry. */
    assert_int_equal(be32_load(bytes + 112), QCOW2_EXT_BITMAPS);
    dir = be64_load(bytes + 112 + 8 + 16);
    be64_store(bytes + dir, end);
    be32_store(bytes + dir + 8, 131072);
    be32_store(bytes + dir + 12, BME_FLAG_IN_USE);

    img = tl_open_counted(bytes, blen, false, &io);
    io->read_bytes = 0;
    assert_int_equal(qbm_bitmap_dirty_bytes(img, 0, &dirty), 0);
    assert_int_equal(dirty, 0);
    assert_int_equal(qbm_check(img, collect, &p), 0);
    /* In use; the table past the refcounts; its first cluster has
     * refcount 0; the old table's cluster leaks. */
    assert_int_equal(p.count[QBM_PROBLEM_BITMAP], 1);
    assert_int_equal(p.count[QBM_PROBLEM_CORRUPTION], 2);
    assert_int_equal(p.count[QBM_PROBLEM_LEAK], 1);
    assert_true(strstr(p.text[1], "bitmap table at ") != NULL);
    assert_true(strstr(p.text[1], ": beyond the clusters the refcounts "
                       "describe") != NULL);
    assert_true(io->read_bytes < 64 * 1024);
    qbm_close(img);
    free(bytes);
    free(buf);
}

/* Bytes the allocator holds in mmapped blocks (large allocations), or 0
 * where that is not known. */
static uint64_t mapped_bytes(void)
{
#ifdef __GLIBC__
    return mallinfo2().hblkhd;
#else
    return 0;
#endif
}

struct mapped {
    uint64_t max;
    uint64_t count[4];
};

static int sample_mapped(void *opaque, int kind, uint64_t off,
                         const char *msg)
{
    struct mapped *m = opaque;
    uint64_t b = mapped_bytes();

    m->count[kind & 3]++;
    if (b > m->max) {
        m->max = b;
    }
    return 0;
}

/*
 * The last refcount table entry repeats the first block: the refcounts
 * claim 511 * 2048 + 4 clusters (4 GiB) of a 16 KiB file. The reference
 * counts take memory for the clusters referenced, not for all of those
 * (sampled while the differences are reported: before, 4 MiB of counts).
 */
static void test_refs_follow_references(void **state)
{
    size_t len;
    uint8_t *buf = fresh_image(&len);
    struct mapped m = { 0 };
    struct qbm_image *img;
    uint64_t base;

    be64_store(buf + RT_OFF + (CS / 8 - 1) * 8, RB_OFF);
    img = qbm_open_memory(buf, len, "mem", 0);
    assert_non_null(img);
    base = mapped_bytes();
    assert_int_equal(qbm_check(img, sample_mapped, &m), 0);
    /* The block, referenced twice, has refcount 1; its copy's 4 non-zero
     * refcounts are leaks. */
    assert_int_equal(m.count[QBM_PROBLEM_CORRUPTION], 1);
    assert_int_equal(m.count[QBM_PROBLEM_LEAK], 4);
    assert_true(m.max < base + 1024 * 1024);
    qbm_close(img);
    free(buf);
}

/* Every allocation of a check (pages of counts, refcount block, L1
 * pieces) made to fail in turn: the check fails with ENOMEM, leaking
 * nothing, until it succeeds. */
static void test_allocation_failures(void **state)
{
    size_t len;
    uint8_t *buf = fresh_image(&len);
    struct qbm_image *img;
    unsigned long n;
    int r = -1;

    /* Refcounts for 2 * 2048 + 201 clusters (table entry 2 repeats the
     * block), a reference in the second page of counts, leaks. */
    be64_store(buf + RT_OFF + 16, RB_OFF);
    be64_store(buf + L1_OFF, 4200 * CS);
    be16_store(buf + RB_OFF + 200 * 2, 1);
    img = qbm_open_memory(buf, len, "mem", QBM_OPEN_RDWR);
    assert_non_null(img);
    for (n = 1; n < 100 && r < 0; n++) {
        qbm_alloc_fail_after(n);
        r = qbm_check(img, NULL, NULL);
        qbm_alloc_fail_after(0);
        if (r < 0) {
            assert_int_equal(qbm_get_errno(), ENOMEM);
        }
    }
    assert_int_equal(r, 0);
    assert_true(n > 4);
    qbm_close(img);
    free(buf);
}

/* The fresh image with bitmap "a" holding data, committed, as bytes. */
static uint8_t *bitmap_image(size_t *ret_len)
{
    size_t len;
    uint8_t *buf = fresh_image(&len);
    uint8_t *copy = tl_mem_with_bitmap(buf, len, "a", 65536, 1 << 20, ret_len);

    free(buf);
    return copy;
}

/*
 * Check on a handle with an added bitmap not committed yet: that bitmap
 * has no table on disk, so it references nothing (before, its table was
 * taken to be at offset 0, and the header cluster counted twice).
 */
static void test_staged_bitmap(void **state)
{
    size_t len;
    uint8_t *buf = bitmap_image(&len);
    struct problems p = { .n = 0 };
    struct qbm_image *img;

    img = qbm_open_memory(buf, len, "mem", QBM_OPEN_RDWR);
    assert_non_null(img);
    assert_int_equal(qbm_bitmap_add(img, "b", 65536, 0), 0);
    assert_int_equal(qbm_check(img, collect, &p), 0);
    if (p.n) {
        fail_msg("unexpected problem: %s", p.text[0]);
    }
    qbm_close(img);
    free(buf);
}

/*
 * Every allocation of a check of an image with a bitmap made to fail in
 * turn: the check fails with ENOMEM, or succeeds finding nothing wrong
 * (before, a bitmap table that could not be loaded for want of memory was
 * reported as a corruption of the image).
 */
static void test_bitmap_allocation_failures(void **state)
{
    size_t len;
    uint8_t *buf = bitmap_image(&len);
    struct problems p;
    struct qbm_image *img;
    unsigned long n;
    int r = -1;

    for (n = 1; n < 100 && r < 0; n++) {
        /* Opened each time: a table once loaded stays loaded. */
        img = qbm_open_memory(buf, len, "mem", 0);
        assert_non_null(img);
        memset(&p, 0, sizeof(p));
        qbm_alloc_fail_after(n);
        r = qbm_check(img, collect, &p);
        qbm_alloc_fail_after(0);
        if (r < 0) {
            assert_int_equal(qbm_get_errno(), ENOMEM);
        } else if (p.n) {
            fail_msg("allocation %lu failed: %s", n, p.text[0]);
        }
        qbm_close(img);
    }
    assert_int_equal(r, 0);
    free(buf);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_l1_past_eof),
        cmocka_unit_test(test_l2_past_eof),
        cmocka_unit_test(test_shared_l2_walked_once),
        cmocka_unit_test(test_shared_l2_allocation),
        cmocka_unit_test(test_refblocks_past_eof),
        cmocka_unit_test(test_compare_past_eof),
        cmocka_unit_test(test_refs_follow_references),
        cmocka_unit_test(test_bitmap_table_past_eof),
        cmocka_unit_test(test_allocation_failures),
        cmocka_unit_test(test_staged_bitmap),
        cmocka_unit_test(test_bitmap_allocation_failures),
    };

    return cmocka_run_group_tests(tests, NULL, NULL);
}
