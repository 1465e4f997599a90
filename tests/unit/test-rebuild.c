/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * op-rebuild.c: a bitmap rebuilt from the differences between a disk and
 * its backups, on images made in memory by the fresh-image writer, whose
 * clusters (4 KiB) are data of one byte value, zero flags, or absent.
 * Bitmaps are read back after the commit (the extent walkers read what is
 * on disk).
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>

#include <cmocka.h>

#include "testlib.h"

#define CS 4096u
#define SIZE (1u << 20)

/* `count` clusters from `first`: data filled with `fill`, or zero flags. */
struct spec {
    uint64_t first, count;
    bool data;
    uint8_t fill;
};

static struct qbm_image *make(const char *name, const struct spec *s, size_t n,
                              bool rdwr)
{
    struct qcow2_out_run runs[16];
    struct qcow2_writer *w;
    struct qbm_image *img;
    struct qbm_io *io;
    uint8_t buf[CS];
    size_t k;

    assert_true(n <= QBM_ARRAY_SIZE(runs));
    for (k = 0; k < n; k++) {
        runs[k] = (struct qcow2_out_run){ s[k].first, s[k].count, s[k].data };
    }
    assert_int_equal(qbm_io_mem_open(NULL, 0, &io), 0);
    assert_int_equal(qcow2_writer_plan(io, SIZE, 12, NULL, NULL, runs, n, &w),
                     0);
    for (k = 0; k < n; k++) {
        for (uint64_t c = 0; s[k].data && c < s[k].count; c++) {
            memset(buf, s[k].fill, CS);
            assert_int_equal(
                qbm_io_pwrite(io, buf, CS,
                              qcow2_writer_run_host(w, k) + c * CS),
                0);
        }
    }
    assert_int_equal(qcow2_writer_finish(w), 0);
    qcow2_writer_free(w);
    assert_int_equal(qbm_image_open_io(io, name, rdwr, &img), 0);
    return img;
}

/*
 * The disk against a full backup:
 *   cluster  0,1,3   0x11 both sides                    equal
 *   cluster  2       0x11 / 0x99                        differs
 *   cluster  5       zero flags / 0x44                  differs
 *   cluster  8       data of zeros / absent             equal
 *   cluster 10       0x22 both                          equal
 *   cluster 12       0x33 / zero flags                  differs
 */
static const struct spec disk_spec[] = {
    { 0, 4, true, 0x11 },  { 5, 1, false, 0 },    { 8, 1, true, 0 },
    { 10, 1, true, 0x22 }, { 12, 1, true, 0x33 },
};
static const struct spec full_spec[] = {
    { 0, 2, true, 0x11 }, { 2, 1, true, 0x99 },  { 3, 1, true, 0x11 },
    { 5, 1, true, 0x44 }, { 10, 1, true, 0x22 }, { 12, 1, false, 0 },
};
/* An incremental that puts cluster 2 back to what the disk holds. */
static const struct spec inc_spec[] = { { 2, 1, true, 0x11 } };

static struct qbm_image *disk(void)
{
    return make("disk", disk_spec, QBM_ARRAY_SIZE(disk_spec), true);
}

static struct qbm_image *full(void)
{
    return make("full", full_spec, QBM_ARRAY_SIZE(full_spec), false);
}

static void rebuild(struct qbm_image *img, struct qbm_image **bk, size_t nb,
                    uint64_t gran, uint64_t want_dirty)
{
    uint64_t dirty = 0;

    assert_int_equal(
        qbm_rebuild_stage(&img, 1, bk, nb, "ck", gran, NULL, &dirty), 0);
    assert_int_equal(dirty, want_dirty);
}

static void test_granules(void **state)
{
    struct qbm_image *img = disk(), *bk = full();

    (void)state;
    rebuild(img, &bk, 1, 4096, 3 * CS);
    assert_int_equal(qbm_commit(img), 0);
    tl_assert_described(img, "ck", "2 4096 8192+4096,20480+4096,49152+4096,");
    qbm_close(img);
    qbm_close(bk);
}

/* One differing cluster marks the whole granule it lies in. */
static void test_coarse_granularity(void **state)
{
    struct qbm_image *img = disk(), *bk = full();

    (void)state;
    rebuild(img, &bk, 1, 65536, 65536);
    assert_int_equal(qbm_commit(img), 0);
    tl_assert_described(img, "ck", "2 65536 0+65536,");
    qbm_close(img);
    qbm_close(bk);
}

/* The newest backup wins: the incremental makes cluster 2 equal. */
static void test_incremental(void **state)
{
    struct qbm_image *img = disk();
    struct qbm_image *bk[2] = {
        make("inc", inc_spec, QBM_ARRAY_SIZE(inc_spec), false), full()
    };

    (void)state;
    rebuild(img, bk, 2, 4096, 2 * CS);
    assert_int_equal(qbm_commit(img), 0);
    tl_assert_described(img, "ck", "2 4096 20480+4096,49152+4096,");
    qbm_close(img);
    qbm_close(bk[0]);
    qbm_close(bk[1]);
}

/* A bitmap of that name is replaced, keeping its granularity, enabled
 * even when it was disabled. */
static void test_replace(void **state)
{
    struct qbm_image *img = disk(), *bk = full();

    (void)state;
    assert_int_equal(qbm_bitmap_add(img, "ck", 16384, QBM_ADD_DISABLED), 0);
    assert_int_equal(qbm_bitmap_set_dirty(img, "ck", 0, SIZE), 0);
    assert_int_equal(qbm_commit(img), 0);
    rebuild(img, &bk, 1, 0, 3 * 16384);
    assert_int_equal(qbm_commit(img), 0);
    tl_assert_described(img, "ck", "2 16384 0+32768,49152+16384,");
    qbm_close(img);
    qbm_close(bk);
}

/* Refused before anything is staged: another size, a bad granularity. */
static void test_refusals(void **state)
{
    struct qbm_image *img = disk(), *bk = full(), *other;
    struct qcow2_out_run run = { 0, 1, true };
    struct qcow2_writer *w;
    struct qbm_io *io;
    uint64_t dirty = 7;

    (void)state;
    assert_int_equal(qbm_io_mem_open(NULL, 0, &io), 0);
    assert_int_equal(
        qcow2_writer_plan(io, 2 * SIZE, 12, NULL, NULL, &run, 1, &w), 0);
    assert_int_equal(qcow2_writer_finish(w), 0);
    qcow2_writer_free(w);
    assert_int_equal(qbm_image_open_io(io, "big", false, &other), 0);
    assert_int_equal(
        qbm_rebuild_stage(&img, 1, &other, 1, "ck", 0, NULL, &dirty), -EINVAL);
    assert_non_null(strstr(qbm_get_error(), "virtual size"));
    assert_int_equal(
        qbm_rebuild_stage(&img, 1, &bk, 1, "ck", 3000, NULL, &dirty), -EINVAL);
    assert_non_null(strstr(qbm_get_error(), "power of two"));
    assert_int_equal(dirty, 7);
    tl_assert_described(img, "ck", "absent");
    qbm_close(other);
    qbm_close(img);
    qbm_close(bk);
}

struct stop_at {
    unsigned calls, stop_at;
    uint64_t last_done, last_total;
};

static int count_progress(void *opaque, uint64_t done, uint64_t total)
{
    struct stop_at *s = opaque;

    assert_true(done <= total);
    assert_true(done >= s->last_done);
    s->last_done = done;
    s->last_total = total;
    return ++s->calls == s->stop_at ? 7 : 0;
}

/* Progress counts the bytes read on both sides, up to its total; a
 * non-zero value stops the comparison with -ECANCELED and is kept for
 * the caller. */
static void test_progress(void **state)
{
    struct stop_at s = { 0 };
    struct qbm_progress p = { count_progress, &s, 0 };
    struct qbm_image *img = disk(), *bk = full();
    uint64_t dirty = 0;

    (void)state;
    assert_int_equal(qbm_rebuild_stage(&img, 1, &bk, 1, "ck", 4096, &p, &dirty),
                     0);
    assert_int_equal(dirty, 3 * CS);
    assert_int_equal(p.user_ret, 0);
    assert_true(s.calls > 1);
    /* Both sides' data extents, one side's where only it has data. */
    assert_int_equal(s.last_total, (4 + 1 + 1 + 1) * CS + (4 + 1 + 1) * CS);
    assert_int_equal(s.last_done, s.last_total);
    qbm_close(img);
    qbm_close(bk);

    img = disk();
    bk = full();
    s = (struct stop_at){ .stop_at = 2 };
    dirty = 9;
    assert_int_equal(qbm_rebuild_stage(&img, 1, &bk, 1, "ck", 4096, &p, &dirty),
                     -ECANCELED);
    assert_int_equal(p.user_ret, 7);
    assert_int_equal(s.calls, 2);
    assert_int_equal(dirty, 9);
    assert_int_equal(qbm_progress_ret(&p, -ECANCELED), 7);
    qbm_close(img);
    qbm_close(bk);
}

/* Every allocation may fail: an error, or the right bitmap. */
static void test_alloc_failures(void **state)
{
    bool succeeded = false;
    unsigned long n;

    (void)state;
    for (n = 1; !succeeded && n < 10000; n++) {
        struct qbm_image *img = disk(), *bk = full();
        uint64_t dirty = 0;
        int r;

        qbm_alloc_fail_after(n);
        r = qbm_rebuild_stage(&img, 1, &bk, 1, "ck", 4096, NULL, &dirty);
        r = r ? r : qbm_impl_commit(img);
        qbm_alloc_fail_after(0);
        if (r < 0) {
            assert_int_equal(r, -ENOMEM);
        } else {
            tl_assert_described(img, "ck",
                                "2 4096 8192+4096,20480+4096,49152+4096,");
            succeeded = true;
        }
        qbm_close(img);
        qbm_close(bk);
    }
    assert_true(succeeded);
    assert_true(n > 5);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_granules),
        cmocka_unit_test(test_coarse_granularity),
        cmocka_unit_test(test_incremental),
        cmocka_unit_test(test_replace),
        cmocka_unit_test(test_refusals),
        cmocka_unit_test(test_progress),
        cmocka_unit_test(test_alloc_failures),
    };

    return cmocka_run_group_tests(tests, NULL, NULL);
}
