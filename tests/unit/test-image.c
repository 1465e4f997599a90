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

#include "internal.h"

/* A fresh, empty 64 MiB image with 4 KiB clusters, as bytes. */
static uint8_t *fresh_image(size_t *ret_len)
{
    struct qbm_io *io;
    struct qcow2_writer *w;
    uint8_t *copy;
    const uint8_t *b;

    assert_int_equal(qbm_io_mem_open(NULL, 0, &io), 0);
    assert_int_equal(qcow2_writer_plan(io, 64 << 20, 12, NULL, NULL, NULL, 0,
                                       &w), 0);
    assert_int_equal(qcow2_writer_finish(w), 0);
    qcow2_writer_free(w);
    b = qbm_io_mem_data(io, ret_len);
    copy = malloc(*ret_len);
    memcpy(copy, b, *ret_len);
    qbm_io_close(io);
    return copy;
}

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
    uint8_t *img0 = fresh_image(&len);
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

/* Allocation failure at every point of open + edits + commit. */
static void test_allocation_failures(void **state)
{
    size_t len;
    uint8_t *img0 = fresh_image(&len);
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

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_edit_and_reopen),
        cmocka_unit_test(test_allocation_failures),
        cmocka_unit_test(test_mem_far_write),
    };

    return cmocka_run_group_tests(tests, NULL, NULL);
}
