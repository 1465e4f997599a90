/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * qbm_carry_commit() on small chains written to a temporary directory:
 * what it reports and stages for a gap with and without FILL_GAPS, for a
 * disabled copy with and without INCLUDE_DISABLED, for copies in use, a
 * callback that stops it, its refusals (which stage nothing), and every
 * allocation made to fail in turn.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>

#include "testlib.h"

#define SIZE (16u << 20)

/* parent (ck) <- base (no ck, 2 data clusters) <- top (ck, new), fresh
 * for each test. */
static int setup(void **state)
{
    tl_write_image("parent", SIZE, NULL, 0);
    tl_write_image("base", SIZE, "parent", 2);
    tl_write_image("top", SIZE, "base", 0);
    tl_add_bitmap("parent", "ck", 65536, true, TL_CLEAN);
    tl_add_bitmap("top", "ck", 65536, true, 1 << 20);
    tl_add_bitmap("top", "new", 65536, false, TL_CLEAN);
    return 0;
}

/* The extents of bitmap `name` of image `file` on disk are `want`
 * ("off+len,...", or "absent"). */
static void assert_extents(const char *file, const char *name, const char *want)
{
    struct qbm_image *img = qbm_open(tl_path(file), 0);
    char got[256];

    assert_non_null(img);
    tl_extents(img, name, got, sizeof(got));
    qbm_close(img); /* before a failure could leave it open and locked */
    assert_string_equal(got, want);
}

/* Actions as the callback sees them (enum qbm_carry_action). */
#define COPIED "1"
#define MERGED "2"
#define GAP "3"
#define FILLED "4"
#define MARKED "5"
#define DISABLED "6"
#define IN_USE "7"

static void test_gap_not_carried(void **state)
{
    struct qbm_image *base = qbm_open(tl_path("base"), QBM_OPEN_RDWR);
    struct tl_events ev = { .n = 0 };

    assert_non_null(base);
    assert_int_equal(
        qbm_carry_commit(base, tl_path("top"), 0, tl_record_action, &ev), 0);
    /* new is disabled in top: libvirt and vdsm carry only recording
     * bitmaps. */
    tl_assert_events(&ev, GAP " ck base", DISABLED " new top", NULL);
    assert_int_equal(qbm_bitmap_find(base, "ck"), -1);
    assert_int_equal(qbm_bitmap_find(base, "new"), -1);
    assert_int_equal(qbm_commit(base), 0);
    qbm_close(base);
    assert_extents("base", "ck", "absent");
    assert_extents("base", "new", "absent");
}

/* INCLUDE_DISABLED: the disabled bitmap is carried, disabled in BASE. */
static void test_include_disabled(void **state)
{
    struct qbm_image *base = qbm_open(tl_path("base"), QBM_OPEN_RDWR);
    struct tl_events ev = { .n = 0 };
    int idx;

    assert_non_null(base);
    assert_int_equal(qbm_carry_commit(base, tl_path("top"),
                                      QBM_CARRY_INCLUDE_DISABLED,
                                      tl_record_action, &ev),
                     0);
    tl_assert_events(&ev, GAP " ck base", COPIED " new top", NULL);
    idx = qbm_bitmap_find(base, "new");
    assert_true(idx >= 0);
    assert_int_equal(qbm_bitmap_flags(base, (size_t)idx), 0);
    assert_int_equal(qbm_commit(base), 0);
    qbm_close(base);
    assert_extents("base", "new", "");
}

/*
 * A copy in use above BASE or in BASE keeps only its own bitmap from being
 * carried (it was once the whole call): reported, and the others carried.
 * With MARK_WRITTEN, an in-use bitmap of BASE alone is left unmarked and
 * reported, once.
 */
static void test_in_use_skipped(void **state)
{
    struct qbm_image *base;
    struct tl_events ev = { .n = 0 };

    tl_add_bitmap("top", "ok", 65536, true, 3 << 20);
    tl_add_bitmap("top", "busy", 65536, true, 4 << 20);
    tl_add_bitmap("base", "busy", 65536, true, TL_CLEAN);
    tl_add_bitmap("base", "mine", 65536, true, TL_CLEAN);
    tl_add_bitmap("base", "old", 65536, true, TL_CLEAN);
    tl_add_bitmap("top", "old", 65536, true, TL_CLEAN);
    tl_set_in_use("top", "busy");
    tl_set_in_use("base", "old");
    tl_set_in_use("base", "mine");
    base = qbm_open(tl_path("base"), QBM_OPEN_RDWR);
    assert_non_null(base);
    assert_int_equal(qbm_carry_commit(base, tl_path("top"),
                                      QBM_CARRY_MARK_WRITTEN, tl_record_action,
                                      &ev),
                     0);
    /* MARK_WRITTEN, in BASE's directory order: BASE's busy is consistent;
     * mine is in use and was not reported yet, old was. */
    tl_assert_events(&ev, GAP " ck base", DISABLED " new top", COPIED " ok top",
                     IN_USE " busy top", IN_USE " old base",
                     MARKED " busy base", IN_USE " mine base",
                     MARKED " ok base", NULL);
    assert_int_equal(qbm_commit(base), 0);
    qbm_close(base);
    assert_extents("base", "ok", "3145728+65536,");
    assert_extents("base", "busy", "");
}

static void test_fill_gaps(void **state)
{
    struct qbm_image *base = qbm_open(tl_path("base"), QBM_OPEN_RDWR);
    struct tl_events ev = { .n = 0 };
    int idx;

    assert_non_null(base);
    assert_int_equal(qbm_carry_commit(base, tl_path("top"), QBM_CARRY_FILL_GAPS,
                                      tl_record_action, &ev),
                     0);
    tl_assert_events(&ev, COPIED " ck top", FILLED " ck base",
                     DISABLED " new top", NULL);
    idx = qbm_bitmap_find(base, "ck");
    assert_true(idx >= 0);
    assert_int_equal(qbm_bitmap_flags(base, (size_t)idx), QBM_BITMAP_AUTO);
    assert_int_equal(qbm_bitmap_granularity(base, (size_t)idx), 65536);
    assert_int_equal(qbm_commit(base), 0);
    qbm_close(base);
    /* The base's two data clusters at 64 KiB (granularity 64 KiB), then
     * the top's dirty byte at 1 MiB. */
    assert_extents("base", "ck", "65536+65536,1048576+65536,");
}

static void test_stop_and_refusals(void **state)
{
    struct qbm_image *base = qbm_open(tl_path("base"), QBM_OPEN_RDWR);
    struct qbm_image *small;
    struct tl_events ev = { .n = 0, .stop = 7 };

    assert_non_null(base);
    assert_int_equal(qbm_carry_commit(base, tl_path("top"), QBM_CARRY_FILL_GAPS,
                                      tl_record_action, &ev),
                     7);
    assert_int_equal(qbm_get_errno(), ECANCELED);
    assert_int_equal(ev.n, 1);
    qbm_close(base); /* drops what was staged */

    /* A negative value is the callback's too, not an error. */
    base = qbm_open(tl_path("base"), QBM_OPEN_RDWR);
    assert_non_null(base);
    ev.n = 0;
    ev.stop = -7;
    assert_int_equal(
        qbm_carry_commit(base, tl_path("top"), 0, tl_record_action, &ev), -7);
    assert_int_equal(qbm_get_errno(), ECANCELED);
    assert_int_equal(ev.n, 1);
    qbm_close(base);

    base = qbm_open(tl_path("base"), QBM_OPEN_RDWR);
    assert_non_null(base);
    assert_int_equal(qbm_carry_commit(base, tl_path("top"), 0x800, NULL, NULL),
                     -1);
    assert_int_equal(qbm_get_errno(), EINVAL);
    assert_int_equal(qbm_carry_commit(NULL, tl_path("top"), 0, NULL, NULL), -1);
    assert_int_equal(qbm_get_errno(), EINVAL);
    /* The base itself is not above the base. */
    assert_int_equal(qbm_carry_commit(base, tl_path("base"), 0, NULL, NULL),
                     -1);
    assert_int_equal(qbm_get_errno(), EINVAL);
    assert_non_null(strstr(qbm_get_error(), "not in the backing chain"));
    assert_false(base->staged);
    qbm_close(base);

    /* A layer of another virtual size: refused before anything is
     * staged. */
    tl_write_image("small", SIZE / 2, NULL, 0);
    tl_write_image("odd", SIZE, "small", 0);
    small = qbm_open(tl_path("small"), QBM_OPEN_RDWR);
    assert_non_null(small);
    assert_int_equal(qbm_carry_commit(small, tl_path("odd"), 0, NULL, NULL),
                     -1);
    assert_int_equal(qbm_get_errno(), EINVAL);
    assert_non_null(strstr(qbm_get_error(), "virtual size"));
    assert_false(small->staged);
    qbm_close(small);
}

/*
 * b4 <- l2 <- l1 (ck) <- t4 (ck): ck started in l1, so l2 and b4, older
 * than it, are no gap. Both copies go into b4; the second one was once
 * skipped without a word because b4's freshly staged copy made l2 look
 * like a hole between two copies.
 */
static void test_every_copy_carried(void **state)
{
    struct qbm_image *base;
    struct tl_events ev = { .n = 0 };

    tl_write_image("b4", SIZE, NULL, 0);
    tl_write_image("l2", SIZE, "b4", 0);
    tl_write_image("l1", SIZE, "l2", 0);
    tl_write_image("t4", SIZE, "l1", 0);
    tl_add_bitmap("l1", "ck", 65536, true, 2 << 20);
    tl_add_bitmap("t4", "ck", 65536, true, 1 << 20);
    base = qbm_open(tl_path("b4"), QBM_OPEN_RDWR);
    assert_non_null(base);
    assert_int_equal(
        qbm_carry_commit(base, tl_path("t4"), 0, tl_record_action, &ev), 0);
    tl_assert_events(&ev, COPIED " ck t4", MERGED " ck l1", NULL);
    assert_int_equal(qbm_commit(base), 0);
    qbm_close(base);
    assert_extents("b4", "ck", "1048576+65536,2097152+65536,");
}

/* Every allocation of the call made to fail in turn: ENOMEM, no crash. */
static void test_allocation_failures(void **state)
{
    unsigned long n;
    int succeeded = 0;

    for (n = 1; n < 5000 && !succeeded; n++) {
        struct qbm_image *base = qbm_open(tl_path("base"), QBM_OPEN_RDWR);
        int r;

        assert_non_null(base);
        qbm_alloc_fail_after(n);
        r = qbm_carry_commit(base, tl_path("top"),
                             QBM_CARRY_FILL_GAPS | QBM_CARRY_MARK_WRITTEN |
                                 QBM_CARRY_INCLUDE_DISABLED,
                             NULL, NULL);
        qbm_alloc_fail_after(0);
        if (r < 0) {
            assert_int_equal(qbm_get_errno(), ENOMEM);
        } else {
            assert_int_equal(r, 0);
            succeeded = 1;
        }
        qbm_close(base);
    }
    assert_true(succeeded);
    assert_true(n > 10);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup(test_gap_not_carried, setup),
        cmocka_unit_test_setup(test_include_disabled, setup),
        cmocka_unit_test_setup(test_in_use_skipped, setup),
        cmocka_unit_test_setup(test_fill_gaps, setup),
        cmocka_unit_test_setup(test_stop_and_refusals, setup),
        cmocka_unit_test(test_every_copy_carried),
        cmocka_unit_test_setup(test_allocation_failures, setup),
    };

    return cmocka_run_group_tests(tests, tl_dir_setup, tl_dir_teardown);
}
