/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * qbm_carry_snapshot() on a BASE and a TOP written to a temporary
 * directory: what it reports and commits, with and without DISABLE_BASE,
 * a dry run and its space figures, a bitmap TOP has already, its refusals and a callback that
 * stops (which write nothing), and every allocation made to fail in turn.
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

/* base (ck1 enabled, old disabled, ck2 enabled with 512 B granularity)
 * <- top (two data clusters at 64 KiB, no bitmaps). */
static int setup(void **state)
{
    tl_write_image("base", SIZE, NULL, 0);
    tl_write_image("top", SIZE, "base", 2);
    tl_add_bitmap("base", "ck1", 65536, true, TL_CLEAN);
    tl_add_bitmap("base", "old", 65536, false, TL_CLEAN);
    tl_add_bitmap("base", "ck2", 512, true, TL_CLEAN);
    return 0;
}

/* Bitmap `name` of `file` on disk: "flags granularity extents", or
 * "absent". */
static void describe(const char *file, const char *name, char *out,
                     size_t len)
{
    struct qbm_image *img = qbm_open(tl_path(file), 0);

    assert_non_null(img);
    tl_describe(img, name, out, len);
    qbm_close(img);
}

/* describe() of bitmap `name` of `file` is `want`. */
static void assert_described(const char *file, const char *name,
                             const char *want)
{
    char got[300];

    /* Closed before the assertion, which would leave it open and
     * locked. */
    describe(file, name, got, sizeof(got));
    assert_string_equal(got, want);
}

#define ADDED "1"
#define MARKED "2"
#define SKIPPED "3"
#define TOP_DONE "4"
#define DISABLED "5"
#define BASE_DONE "6"
#define IN_USE "7"

static void test_continue(void **state)
{
    struct tl_events ev = { .n = 0 };

    assert_int_equal(qbm_carry_snapshot(tl_path("base"), tl_path("top"), 0,
                                        tl_record_action, &ev),
                     0);
    tl_assert_events(&ev, ADDED " ck1 top", SKIPPED " old base",
                     ADDED " ck2 top", TOP_DONE " - top", NULL);
    /* TOP's clusters, at each bitmap's granularity. */
    assert_described("top", "ck1", "2 65536 65536+65536,");
    assert_described("top", "ck2", "2 512 65536+8192,");
    assert_described("top", "old", "absent");
    assert_described("base", "ck1", "2 65536 ");
}

static void test_disable_base(void **state)
{
    struct tl_events ev = { .n = 0 };

    /* TOP's own copy is kept. */
    tl_add_bitmap("top", "ck1", 4096, false, TL_CLEAN);
    assert_int_equal(qbm_carry_snapshot(tl_path("base"), tl_path("top"),
                                        QBM_CARRY_SNAPSHOT_DISABLE_BASE,
                                        tl_record_action, &ev),
                     0);
    tl_assert_events(&ev, MARKED " ck1 top", SKIPPED " old base",
                     ADDED " ck2 top", TOP_DONE " - top", DISABLED " ck1 base",
                     DISABLED " ck2 base", BASE_DONE " - base", NULL);
    assert_described("top", "ck1", "0 4096 65536+8192,");
    assert_described("base", "ck1", "0 65536 ");
    assert_described("base", "ck2", "0 512 ");
    assert_described("base", "old", "0 65536 ");
}

static void test_dry_run(void **state)
{
    struct tl_events ev = { .n = 0 };
    size_t blen, tlen;
    char *base = tl_contents("base", &blen), *top = tl_contents("top", &tlen);

    assert_int_equal(qbm_carry_snapshot(tl_path("base"), tl_path("top"),
                                        QBM_CARRY_SNAPSHOT_DISABLE_BASE |
                                            QBM_CARRY_SNAPSHOT_DRY_RUN,
                                        tl_record_action, &ev),
                     0);
    assert_int_equal(ev.n, 7);
    assert_string_equal(ev.line[3], TOP_DONE " - top");
    assert_string_equal(ev.line[5], DISABLED " ck2 base");
    tl_assert_unchanged("base", base, blen);
    tl_assert_unchanged("top", top, tlen);
    free(base);
    free(top);
}

/* The image end of `file` on disk. */
static uint64_t end_of(const char *file)
{
    struct qbm_image *img = qbm_open(tl_path(file), 0);
    uint64_t end = 0;
    int r;

    assert_non_null(img);
    r = qbm_image_end_offset(img, &end);
    qbm_close(img);
    assert_int_equal(r, 0);
    return end;
}

/* The plan's figures are what the real run then takes. */
static void test_plan(void **state)
{
    struct qbm_space_info top, base, none;
    uint64_t top_end = end_of("top"), base_end = end_of("base");
    size_t blen, tlen;
    char *bbuf = tl_contents("base", &blen), *tbuf = tl_contents("top", &tlen);

    assert_int_equal(qbm_carry_snapshot_plan(tl_path("base"), tl_path("top"),
                                             0, NULL, NULL, &top, &base),
                     0);
    assert_int_equal(base.end_after, 0);
    assert_int_equal(base.bytes, 0);
    assert_int_equal(qbm_carry_snapshot_plan(tl_path("base"), tl_path("top"),
                                             QBM_CARRY_SNAPSHOT_DISABLE_BASE,
                                             NULL, NULL, &top, &base),
                     0);
    tl_assert_unchanged("base", bbuf, blen);
    tl_assert_unchanged("top", tbuf, tlen);
    free(bbuf);
    free(tbuf);
    assert_int_equal(top.end_before, top_end);
    assert_int_equal(base.end_before, base_end);
    /* New clusters, and free ones below the end used first. */
    assert_true(top.bytes > 0);
    assert_true(top.end_after - top.end_before <= top.bytes);
    assert_true(base.bytes > 0);
    assert_int_equal(top.capacity, 0);
    assert_int_equal(qbm_carry_snapshot(tl_path("base"), tl_path("top"),
                                        QBM_CARRY_SNAPSHOT_DISABLE_BASE, NULL,
                                        NULL),
                     0);
    assert_int_equal(end_of("top"), top.end_after);
    /* BASE's old directory, freed after the switch, may end it. */
    assert_true(end_of("base") <= base.end_after);
    /* Nothing left to carry: nothing to write. */
    assert_int_equal(qbm_carry_snapshot_plan(tl_path("base"), tl_path("top"),
                                             0, NULL, NULL, &top, &base),
                     0);
    assert_int_equal(top.bytes, 0);
    assert_int_equal(top.end_after, end_of("top"));
    assert_int_equal(qbm_carry_snapshot_plan(tl_path("base"), tl_path("top"),
                                             0, NULL, NULL, NULL, &none),
                     -1);
    assert_int_equal(qbm_get_errno(), EINVAL);
}

static void test_refusals(void **state)
{
    struct tl_events ev = { .n = 0 };
    size_t blen, tlen;
    char *base = tl_contents("base", &blen), *top = tl_contents("top", &tlen);
    char want[600];

    assert_int_equal(
        qbm_carry_snapshot(tl_path("base"), tl_path("top"), 0x800, NULL, NULL),
        -1);
    assert_int_equal(qbm_get_errno(), EINVAL);
    assert_int_equal(qbm_carry_snapshot(NULL, tl_path("top"), 0, NULL, NULL),
                     -1);
    assert_int_equal(qbm_get_errno(), EINVAL);

    /* TOP is not a snapshot of BASE. */
    tl_write_image("lone", SIZE, NULL, 0);
    assert_int_equal(qbm_carry_snapshot(tl_path("base"), tl_path("lone"), 0,
                                        tl_record_action, &ev),
                     -1);
    assert_int_equal(qbm_get_errno(), EINVAL);
    snprintf(want, sizeof(want), "%s: its backing file is (none), not %s",
             tl_path("lone"), tl_path("base"));
    assert_string_equal(qbm_get_error(), want);
    assert_int_equal(qbm_carry_snapshot(tl_path("top"), tl_path("base"), 0,
                                        tl_record_action, &ev),
                     -1);
    assert_int_equal(qbm_get_errno(), EINVAL);

    /* A callback that stops at once: nothing is committed. */
    ev.stop = -5;
    assert_int_equal(qbm_carry_snapshot(tl_path("base"), tl_path("top"),
                                        QBM_CARRY_SNAPSHOT_DISABLE_BASE,
                                        tl_record_action, &ev),
                     -5);
    assert_int_equal(qbm_get_errno(), ECANCELED);
    assert_int_equal(ev.n, 1);
    tl_assert_unchanged("base", base, blen);
    tl_assert_unchanged("top", top, tlen);
    free(base);
    free(top);
}

/*
 * A bitmap in use in BASE, or in TOP's own copy, is skipped and reported
 * (libvirt's propagation skips inconsistent bitmaps); the others are
 * carried, and BASE's copies stay enabled. This call once refused the
 * whole job.
 */
static void test_in_use_skipped(void **state)
{
    struct tl_events ev = { .n = 0 };

    tl_set_in_use("base", "ck2");
    assert_int_equal(qbm_carry_snapshot(tl_path("base"), tl_path("top"), 0,
                                        tl_record_action, &ev),
                     0);
    tl_assert_events(&ev, ADDED " ck1 top", SKIPPED " old base",
                     IN_USE " ck2 base", TOP_DONE " - top", NULL);
    assert_described("top", "ck1", "2 65536 65536+65536,");
    assert_described("top", "ck2", "absent");
    assert_described("base", "ck1", "2 65536 ");

    /* TOP's own copy in use: not marked, and not disabled in BASE. */
    setup(state);
    tl_add_bitmap("top", "ck1", 65536, true, TL_CLEAN);
    tl_set_in_use("top", "ck1");
    ev.n = 0;
    assert_int_equal(qbm_carry_snapshot(tl_path("base"), tl_path("top"),
                                        QBM_CARRY_SNAPSHOT_DISABLE_BASE,
                                        tl_record_action, &ev),
                     0);
    tl_assert_events(&ev, IN_USE " ck1 top", SKIPPED " old base",
                     ADDED " ck2 top", TOP_DONE " - top", DISABLED " ck2 base",
                     BASE_DONE " - base", NULL);
    assert_described("base", "ck1", "2 65536 ");
}

static int count_corruption(void *opaque, int kind, uint64_t offset,
                            const char *message)
{
    *(unsigned *)opaque += kind == QBM_PROBLEM_CORRUPTION;
    return 0;
}

/* `file` passes qbm_check without corruption. */
static void assert_sound(const char *file)
{
    struct qbm_image *img = qbm_open(tl_path(file), 0);
    unsigned corruptions = 0;

    assert_non_null(img);
    assert_int_equal(qbm_check(img, count_corruption, &corruptions), 0);
    assert_int_equal(corruptions, 0);
    qbm_close(img);
}

/*
 * Every allocation made to fail in turn: ENOMEM, and each image in its
 * old state or its new one, TOP's first. (A commit that fails after
 * writing new clusters may leave them past the old end of the file,
 * referenced by nothing: the state, not the bytes, is what is compared.)
 */
static void test_allocation_failures(void **state)
{
    unsigned long n;
    int succeeded = 0;
    char top[300], base[300];

    for (n = 1; n < 5000 && !succeeded; n++) {
        int r, err;

        setup(state);
        qbm_alloc_fail_after(n);
        r = qbm_carry_snapshot(tl_path("base"), tl_path("top"),
                               QBM_CARRY_SNAPSHOT_DISABLE_BASE, NULL, NULL);
        qbm_alloc_fail_after(0);
        err = qbm_get_errno();
        describe("top", "ck2", top, sizeof(top));
        describe("base", "ck2", base, sizeof(base));
        assert_sound("top");
        assert_sound("base");
        if (r < 0) {
            assert_int_equal(err, ENOMEM);
            if (strcmp(top, "absent") == 0) {
                assert_string_equal(base, "2 512 ");
            } else {
                assert_string_equal(top, "2 512 65536+8192,");
            }
        } else {
            assert_int_equal(r, 0);
            succeeded = 1;
        }
    }
    assert_true(succeeded);
    assert_true(n > 10);
    assert_string_equal(top, "2 512 65536+8192,");
    assert_string_equal(base, "0 512 ");
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup(test_continue, setup),
        cmocka_unit_test_setup(test_disable_base, setup),
        cmocka_unit_test_setup(test_dry_run, setup),
        cmocka_unit_test_setup(test_plan, setup),
        cmocka_unit_test_setup(test_refusals, setup),
        cmocka_unit_test_setup(test_in_use_skipped, setup),
        cmocka_unit_test(test_allocation_failures),
    };

    return cmocka_run_group_tests(tests, tl_dir_setup, tl_dir_teardown);
}
