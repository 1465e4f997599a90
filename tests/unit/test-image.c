/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * Whole images in memory: made by the fresh-image writer, edited through
 * the public API, reopened; and every allocation of open, edit and commit
 * made to fail in turn, which must fail cleanly (ENOMEM) and leave the
 * image as it was.
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

/* The fresh images' virtual size (4 KiB clusters). */
#define SIZE (64u << 20)

static int no_problems(void *opaque, int kind, uint64_t off, const char *m)
{
    fail_msg("unexpected problem: %s", m);
    return 0;
}

struct collect {
    uint64_t v[16][2];
    size_t n;
};

static int collect(void *opaque, uint64_t off, uint64_t len)
{
    struct collect *c = opaque;

    assert_true(c->n < 16);
    c->v[c->n][0] = off;
    c->v[c->n][1] = len;
    c->n++;
    return 0;
}

static void test_edit_and_reopen(void **state)
{
    size_t len, len2;
    uint8_t *img0 = tl_image_bytes(SIZE, NULL, 0, &len);
    struct qbm_image *img, *again;
    struct collect c = { .n = 0 };
    const uint8_t *b;
    uint64_t dirty;
    int i;

    img = qbm_open_memory(img0, len, "mem", QBM_OPEN_RDWR);
    assert_non_null(img);
    assert_int_equal(qbm_check(img, no_problems, NULL), 0);
    assert_int_equal(qbm_bitmap_add(img, "ck1", 0, 0), 0);
    assert_int_equal(qbm_bitmap_granularity(img, 0), 4096);
    assert_int_equal(qbm_bitmap_add(img, "ck1", 0, 0), -1);
    assert_int_equal(qbm_get_errno(), EEXIST);
    assert_int_equal(qbm_bitmap_add(img, "fine", 512, QBM_ADD_DISABLED), 0);
    assert_int_equal(qbm_bitmap_set_dirty(img, "ck1", 5000, 10000), 0);
    assert_int_equal(qbm_bitmap_set_dirty(img, "fine", 1 << 20, 1), 0);
    assert_int_equal(qbm_bitmap_merge(img, "fine", img, "ck1"), 0);
    assert_int_equal(qbm_commit(img), 0);
    assert_int_equal(qbm_check(img, no_problems, NULL), 0);

    b = qbm_io_mem_data(img->io, &len2);
    again = qbm_open_memory(b, len2, "again", 0);
    assert_non_null(again);
    i = qbm_bitmap_find(again, "fine");
    assert_true(i >= 0);
    assert_int_equal(qbm_bitmap_flags(again, (size_t)i), 0);
    assert_int_equal(qbm_bitmap_extents(again, (size_t)i, collect, &c), 0);
    /* ck1 at 4 KiB granularity marks 4096..16384; fine adds 1 MiB. */
    assert_int_equal(c.n, 2);
    assert_int_equal(c.v[0][0], 4096);
    assert_int_equal(c.v[0][1], 12288);
    assert_int_equal(c.v[1][0], 1 << 20);
    assert_int_equal(c.v[1][1], 512);
    assert_int_equal(qbm_bitmap_dirty_bytes(again, (size_t)i, &dirty), 0);
    assert_int_equal(dirty, 12288 + 512);
    qbm_close(again);

    /* Remove everything: the extension goes away with the last one. */
    assert_int_equal(qbm_bitmap_remove(img, "ck1"), 0);
    assert_int_equal(qbm_bitmap_remove(img, "fine"), 0);
    assert_int_equal(qbm_commit(img), 0);
    assert_int_equal(qbm_image_bitmaps_state(img), QBM_BITMAPS_NONE);
    assert_int_equal(qbm_image_features(img, QBM_FEATURE_AUTOCLEAR), 0);
    assert_int_equal(qbm_check(img, no_problems, NULL), 0);
    qbm_close(img);
    qbm_close(NULL);
    free(img0);
}

/* Before the commit, extents and dirty bytes show the staged contents
 * (a new bitmap has no table on disk, an edited one the old table). */
static void test_staged_queries(void **state)
{
    size_t len;
    uint8_t *img0 = tl_image_bytes(SIZE, NULL, 0, &len);
    struct qbm_image *img;
    struct collect c = { .n = 0 };
    uint64_t dirty;

    img = qbm_open_memory(img0, len, "mem", QBM_OPEN_RDWR);
    assert_non_null(img);
    assert_int_equal(qbm_bitmap_add(img, "b", 4096, 0), 0);
    assert_int_equal(qbm_bitmap_set_dirty(img, "b", 8192, 4096), 0);
    assert_int_equal(qbm_bitmap_extents(img, 0, collect, &c), 0);
    assert_int_equal(c.n, 1);
    assert_int_equal(c.v[0][0], 8192);
    assert_int_equal(c.v[0][1], 4096);
    assert_int_equal(qbm_bitmap_dirty_bytes(img, 0, &dirty), 0);
    assert_int_equal(dirty, 4096);
    assert_int_equal(qbm_commit(img), 0);
    /* Edited after a commit: the staged state, not the table on disk. */
    assert_int_equal(qbm_bitmap_set_dirty(img, "b", 1 << 20, 1), 0);
    c.n = 0;
    assert_int_equal(qbm_bitmap_extents_range(img, 0, 0, SIZE, collect, &c),
                     0);
    assert_int_equal(c.n, 2);
    assert_int_equal(c.v[1][0], 1 << 20);
    assert_int_equal(qbm_bitmap_clear(img, "b"), 0);
    assert_int_equal(qbm_bitmap_dirty_bytes(img, 0, &dirty), 0);
    assert_int_equal(dirty, 0);
    qbm_close(img);
    free(img0);
}

/* Allocation failure at every point of open + edits + commit. */
static void test_allocation_failures(void **state)
{
    size_t len;
    uint8_t *img0 = tl_image_bytes(SIZE, NULL, 0, &len);
    unsigned long n;
    int succeeded = 0;

    for (n = 1; n < 2000 && !succeeded; n++) {
        struct qbm_image *img;
        int r = 0;

        qbm_alloc_fail_after(n);
        img = qbm_open_memory(img0, len, "mem", QBM_OPEN_RDWR);
        if (img) {
            r = qbm_bitmap_add(img, "a", 0, 0);
            r = r ? r : qbm_bitmap_set_dirty(img, "a", 0, 1 << 20);
            r = r ? r : qbm_bitmap_add(img, "b", 512, 0);
            r = r ? r : qbm_bitmap_merge(img, "b", img, "a");
            r = r ? r : qbm_commit(img);
        }
        qbm_alloc_fail_after(0);
        if (!img || r < 0) {
            assert_int_equal(qbm_get_errno(), ENOMEM);
        } else {
            succeeded = 1;
        }
        if (img) {
            /* Whatever happened, the image must check clean or, after a
             * failed commit, refuse further edits. */
            if (r == 0) {
                assert_int_equal(qbm_check(img, no_problems, NULL), 0);
            }
            qbm_close(img);
        }
    }
    assert_true(succeeded);
    assert_true(n > 10);
    free(img0);
}

/* The fresh image with bitmap "b" holding data, and where things are. */
struct layout {
    uint64_t rt, rb, l1, dir, table, data, size;
};

static uint8_t *bitmap_image(size_t *ret_len, struct layout *lay)
{
    size_t len, len2;
    uint8_t *img0 = tl_image_bytes(SIZE, NULL, 0, &len), *copy;
    struct qbm_image *img;

    copy = tl_mem_with_bitmap(img0, len, "b", 0, 65536, &len2);
    free(img0);
    img = qbm_open_memory(copy, len2, "mem", 0);
    assert_non_null(img);
    assert_int_equal(qcow2_bitmap_table_load(img, &img->bitmaps[0]), 0);
    lay->rt = img->hdr.refcount_table_offset;
    lay->rb = img->reftable[0];
    lay->l1 = img->hdr.l1_table_offset;
    lay->dir = img->bm_ext.dir_offset;
    lay->table = img->bitmaps[0].table_offset;
    lay->data = img->bitmaps[0].table[0] & BME_TABLE_OFFSET_MASK;
    lay->size = len2;
    assert_true(lay->rb && lay->data && img->reftable_entries > 5);
    qbm_close(img);
    *ret_len = len2;
    return copy;
}

/*
 * A broken refcount table makes every commit refuse before it writes
 * anything: the message names the structure, its offset and the remedy, and
 * the image keeps every byte and its size. Entry 5 is not used by an image
 * this small, so only a check of the whole table finds it.
 */
static void test_corrupt_refcounts(void **state)
{
    struct layout L;
    size_t len, i;
    uint8_t *good = bitmap_image(&len, &L);
    unsigned long long e5 = L.rt + 5 * 8, end = (L.size + 4095) / 4096 * 4096;
    struct {
        uint64_t pos, value;
        char msg[160];
    } cases[13];
    size_t n = 0;

#define CASE(p, v, ...)                                                       \
    do {                                                                      \
        cases[n].pos = (p);                                                   \
        cases[n].value = (v);                                                 \
        snprintf(cases[n].msg, sizeof(cases[n].msg), __VA_ARGS__);            \
        n++;                                                                  \
    } while (0)
    CASE(e5, 0x1ff, "refcount table entry 5 at 0x%llx: reserved bits", e5);
    CASE(e5, 1ull << 40, "refcount table entry 5 at 0x%llx: offset "
         "0x10000000000 is past the end of the file (0x%zx)", e5, len);
    CASE(e5, end, "refcount table entry 5 at 0x%llx: offset 0x%llx is past "
         "the end", e5, end);
    CASE(e5, 512, "refcount table entry 5 at 0x%llx: offset 0x200 is not "
         "cluster aligned", e5);
    CASE(e5, L.l1, "refcount table entry 5 at 0x%llx: refcount block at "
         "0x%llx overlaps the L1 table", e5, (unsigned long long)L.l1);
    CASE(e5, L.rt, "refcount table entry 5 at 0x%llx: refcount block at "
         "0x%llx overlaps the refcount table", e5, (unsigned long long)L.rt);
    CASE(e5, L.rb, "and 5 at 0x%llx: both point to the refcount block at "
         "0x%llx", e5, (unsigned long long)L.rb);
    CASE(e5, L.dir, "refcount table entry 5 at 0x%llx: refcount block at "
         "0x%llx overlaps the bitmap directory", e5,
         (unsigned long long)L.dir);
    CASE(e5, L.table, "refcount table entry 5 at 0x%llx: refcount block at "
         "0x%llx overlaps the bitmap table", e5, (unsigned long long)L.table);
    CASE(e5, L.data, "refcount table entry 5 at 0x%llx: refcount block at "
         "0x%llx overlaps the bitmap data", e5, (unsigned long long)L.data);
    CASE(L.rt, 0xff000000, "refcount table entry 0 at 0x%llx: offset "
         "0xff000000 is past the end", (unsigned long long)L.rt);
    CASE(48, L.l1, "refcount table at 0x%llx: overlaps the L1 table",
         (unsigned long long)L.l1);
    CASE(48, end, "refcount table at 0x%llx: its 1 clusters run past the "
         "end", end);
#undef CASE

    for (i = 0; i < n; i++) {
        uint8_t *bad = malloc(len);
        struct qbm_image *img;

        memcpy(bad, good, len);
        be64_store(bad + cases[i].pos, cases[i].value);
        img = qbm_open_memory(bad, len, "mem", QBM_OPEN_RDWR);
        assert_non_null(img);
        assert_int_equal(qbm_bitmap_add(img, "n", 16384, 0), 0);
        assert_int_equal(qbm_commit(img), -1);
        assert_int_equal(qbm_get_errno(), EUCLEAN);
        if (!strstr(qbm_get_error(), cases[i].msg) ||
            !strstr(qbm_get_error(), "qemu-img check -r all")) {
            fail_msg("case %zu: got \"%s\", want \"%s\"", i,
                     qbm_get_error(), cases[i].msg);
        }
        tl_assert_mem_holds(img, bad, len);
        /* The same with an edit of the existing bitmap. */
        assert_int_equal(qbm_bitmap_clear(img, "b"), 0);
        assert_int_equal(qbm_commit(img), -1);
        tl_assert_mem_holds(img, bad, len);
        qbm_close(img);
        free(bad);
    }
    free(good);
}

static int count_problems(void *opaque, int kind, uint64_t off,
                          const char *msg)
{
    struct collect *c = opaque;

    return collect(c, off, (uint64_t)kind);
}

/*
 * L2 tables that only an internal snapshot's L1 table, or an active L1
 * entry past the virtual size, points to hold metadata too: when one's
 * refcount is 0 (a corrupt image), an edit refuses, naming it, instead of
 * allocating its cluster and overwriting it; check counts the same
 * reference. The fresh 64 MiB image has 4 KiB clusters: header, refcount
 * table, refcount block, L1 table of 32 entries. The L2 table goes to the
 * first free cluster: 6 after a snapshot table (cluster 4) and the
 * snapshot's L1 table (cluster 5), else 4.
 */
static void test_hidden_l2_not_allocated(void **state)
{
    enum { CS = 4096, RB = 2 * CS, L1 = 3 * CS, SN = 4 * CS, SN_L1 = 5 * CS,
           LEN = 7 * CS };
    size_t len;
    uint8_t *img0 = tl_image_bytes(SIZE, NULL, 0, &len), *buf = malloc(LEN);
    struct qbm_image *img;
    struct collect p;
    char msg[160];
    uint64_t l2;
    int pass;

    assert_true(len > L1 && len <= L1 + CS);
    assert_int_equal(be64_load(img0 + QCOW2_HDR_L1_TABLE_OFFSET), L1);
    assert_int_equal(be32_load(img0 + QCOW2_HDR_L1_SIZE), 32);
    for (pass = 0; pass < 2; pass++) {
        memset(buf, 0, LEN);
        memcpy(buf, img0, len);
        if (pass == 0) {
            /* One snapshot (id "1", name "s") with a 1-entry L1 table. */
            l2 = 6 * CS;
            be32_store(buf + QCOW2_HDR_NB_SNAPSHOTS, 1);
            be64_store(buf + QCOW2_HDR_SNAPSHOTS_OFFSET, SN);
            be64_store(buf + SN, SN_L1);
            be32_store(buf + SN + 8, 1);
            be16_store(buf + SN + 12, 1);
            be16_store(buf + SN + 14, 1);
            memcpy(buf + SN + 40, "1s", 2);
            be16_store(buf + RB + 4 * 2, 1);
            be16_store(buf + RB + 5 * 2, 1);
            be64_store(buf + SN_L1, l2);
        } else {
            /* A 33rd active L1 entry, past the virtual size. */
            l2 = 4 * CS;
            be32_store(buf + QCOW2_HDR_L1_SIZE, 33);
            be64_store(buf + L1 + 32 * 8, l2);
        }
        img = qbm_open_memory(buf, LEN, "mem", QBM_OPEN_RDWR);
        assert_non_null(img);

        memset(&p, 0, sizeof(p));
        assert_int_equal(qbm_check(img, count_problems, &p), 0);
        assert_int_equal(p.n, 1);
        assert_int_equal(p.v[0][0], l2);
        assert_int_equal(p.v[0][1], QBM_PROBLEM_CORRUPTION);

        assert_int_equal(qbm_bitmap_add(img, "n", 65536, 0), 0);
        assert_int_equal(qbm_commit(img), -1);
        assert_int_equal(qbm_get_errno(), EUCLEAN);
        snprintf(msg, sizeof(msg), "refcount of cluster 0x%llx is 0 but it "
                 "holds the L2 table: the image is corrupt (try qemu-img "
                 "check -r all); the image was not changed",
                 (unsigned long long)l2);
        assert_string_equal(qbm_get_error(), msg);
        tl_assert_mem_holds(img, buf, LEN);
        qbm_close(img);
    }
    free(buf);
    free(img0);
}

/* A write far past the end of a memory image is refused, not zero-filled:
 * a fuzzer must report the bug behind the offset, not run out of memory. */
static void test_mem_far_write(void **state)
{
    static const uint8_t sector[512] = { 1 };
    struct qbm_io *io;
    uint64_t size;

    assert_int_equal(qbm_io_mem_open(sector, sizeof(sector), &io), 0);
    assert_int_equal(qbm_io_pwrite(io, sector, 512, 512 + (1ull << 30) + 512),
                     -EFBIG);
    assert_int_equal(qbm_io_pwrite(io, sector, 512, 1ull << 40), -EFBIG);
    assert_int_equal(qbm_io_pwrite(io, sector, 512, UINT64_MAX - 100),
                     -EFBIG);
    assert_int_equal(qbm_io_size(io, &size), 0);
    assert_int_equal(size, 512);
    /* Growing by less is an ordinary write. */
    assert_int_equal(qbm_io_pwrite(io, sector, 512, 1 << 20), 0);
    assert_int_equal(qbm_io_size(io, &size), 0);
    assert_int_equal(size, (1 << 20) + 512);
    qbm_io_close(io);
}

/*
 * An image on a "device" (a memory io with a capacity): an edit that needs
 * more than the device holds past the image end is refused by the dry run
 * and by the commit, with nothing written; one that fits ends where its
 * dry run said.
 */
static void test_device_space(void **state)
{
    const uint64_t cs = 4096;
    size_t len;
    uint8_t *buf = tl_image_bytes(SIZE, NULL, 0, &len);
    struct qbm_image *img;
    uint64_t end, bytes, after, worst_bytes, worst_end;
    char msg[256];

    img = qbm_open_memory(buf, len, "dev", QBM_OPEN_RDWR);
    assert_non_null(img);
    assert_int_equal(qbm_image_end_offset(img, &end), 0);
    assert_true(end > 0 && end % cs == 0);
    qbm_io_set_capacity(img->io, end + 2 * cs);
    assert_int_equal(qbm_image_capacity(img), end + 2 * cs);

    /* 64 MiB at 512 B: 16 KiB of bitmap data, 4 clusters when all dirty,
     * a table and a directory: 6 clusters. */
    assert_int_equal(qbm_bitmap_add(img, "a", 512, 0), 0);
    assert_int_equal(qbm_commit_plan(img, QBM_PLAN_WORST_CASE, &worst_bytes,
                                     &worst_end), 0);
    assert_int_equal(worst_bytes, 6 * cs);
    assert_int_equal(worst_end, end + 6 * cs);
    assert_int_equal(qbm_commit_plan(img, 0, &bytes, &after), 0);
    assert_int_equal(bytes, 2 * cs);
    assert_int_equal(after, end + 2 * cs);
    assert_int_equal(qbm_bitmap_set_dirty(img, "a", 0, 64 << 20), 0);
    assert_int_equal(qbm_commit_plan(img, 0, &bytes, &after), -1);
    assert_int_equal(qbm_get_errno(), ENOSPC);
    snprintf(msg, sizeof(msg),
             "not enough space on dev: the edit needs %llu bytes past the "
             "image end %llu; the device has %llu",
             (unsigned long long)(6 * cs), (unsigned long long)end,
             (unsigned long long)(end + 2 * cs));
    assert_string_equal(qbm_get_error(), msg);
    assert_int_equal(qbm_commit(img), -1);
    assert_int_equal(qbm_get_errno(), ENOSPC);
    tl_assert_mem_holds(img, buf, len);
    qbm_close(img);

    /* Room for it: the commit ends where the dry run said. */
    img = qbm_open_memory(buf, len, "dev", QBM_OPEN_RDWR);
    assert_non_null(img);
    qbm_io_set_capacity(img->io, end + 6 * cs);
    assert_int_equal(qbm_bitmap_add(img, "a", 512, 0), 0);
    assert_int_equal(qbm_bitmap_set_dirty(img, "a", 0, 64 << 20), 0);
    assert_int_equal(qbm_commit_plan(img, 0, &bytes, &after), 0);
    assert_int_equal(bytes, 6 * cs);
    assert_int_equal(after, end + 6 * cs);
    assert_int_equal(qbm_commit(img), 0);
    assert_int_equal(qbm_image_end_offset(img, &end), 0);
    assert_int_equal(end, after);
    assert_int_equal(qbm_check(img, no_problems, NULL), 0);
    qbm_close(img);
    free(buf);
}

/*
 * A plan refused only because the device is too small still gives its
 * figures, the same the message prints; a manager extends the device by
 * them and the commit then ends there. Any other failure leaves the
 * outputs as they were.
 */
static void test_device_space_figures(void **state)
{
    const uint64_t cs = 4096;
    const uint64_t unset = 0x5a5a5a5a5a5a5a5aull;
    size_t len;
    uint8_t *buf = tl_image_bytes(SIZE, NULL, 0, &len);
    struct qbm_image *img;
    uint64_t end, cap, bytes = unset, after = unset;
    char msg[256];

    img = qbm_open_memory(buf, len, "dev", QBM_OPEN_RDWR);
    assert_non_null(img);
    assert_int_equal(qbm_image_end_offset(img, &end), 0);
    cap = end + cs;
    qbm_io_set_capacity(img->io, cap);
    assert_int_equal(qbm_bitmap_add(img, "a", 512, 0), 0);
    assert_int_equal(qbm_bitmap_set_dirty(img, "a", 0, 64 << 20), 0);

    /* Another failure first: unknown flags leave the outputs alone. */
    assert_int_equal(qbm_commit_plan(img, 0x80, &bytes, &after), -1);
    assert_int_equal(qbm_get_errno(), EINVAL);
    assert_true(bytes == unset && after == unset);

    assert_int_equal(qbm_commit_plan(img, 0, &bytes, &after), -1);
    assert_int_equal(qbm_get_errno(), ENOSPC);
    assert_true(bytes != unset && after != unset);
    assert_true(after > cap && bytes >= after - end);
    snprintf(msg, sizeof(msg),
             "not enough space on dev: the edit needs %llu bytes past the "
             "image end %llu; the device has %llu",
             (unsigned long long)(after - end), (unsigned long long)end,
             (unsigned long long)cap);
    assert_string_equal(qbm_get_error(), msg);
    tl_assert_mem_holds(img, buf, len);

    /* Extended by what the plan said, the same commit fits and ends
     * there. */
    qbm_io_set_capacity(img->io, after);
    assert_int_equal(qbm_commit_plan(img, 0, &bytes, &end), 0);
    assert_int_equal(end, after);
    assert_int_equal(qbm_commit(img), 0);
    assert_int_equal(qbm_image_end_offset(img, &end), 0);
    assert_int_equal(end, after);
    assert_int_equal(qbm_check(img, no_problems, NULL), 0);
    qbm_close(img);

    /* Read-only: refused before any placement, outputs untouched. */
    img = qbm_open_memory(buf, len, "dev", 0);
    assert_non_null(img);
    qbm_io_set_capacity(img->io, cap);
    bytes = after = unset;
    assert_int_equal(qbm_commit_plan(img, 0, &bytes, &after), -1);
    assert_int_not_equal(qbm_get_errno(), ENOSPC);
    assert_true(bytes == unset && after == unset);
    qbm_close(img);
    free(buf);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_edit_and_reopen),
        cmocka_unit_test(test_staged_queries),
        cmocka_unit_test(test_allocation_failures),
        cmocka_unit_test(test_corrupt_refcounts),
        cmocka_unit_test(test_hidden_l2_not_allocated),
        cmocka_unit_test(test_mem_far_write),
        cmocka_unit_test(test_device_space),
        cmocka_unit_test(test_device_space_figures),
    };

    return cmocka_run_group_tests(tests, NULL, NULL);
}
