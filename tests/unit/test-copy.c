/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * qbm_bitmap_copy() on whole images in memory: every bitmap or the ones
 * named, each clash policy, in-use bitmaps, what it reports, refusals, a
 * callback that stops, the result after a commit, and every allocation
 * made to fail in turn.
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

#define SIZE (64u << 20)

static uint8_t *fresh;
static size_t fresh_len;

static int group_setup(void **state)
{
    fresh = tl_image_bytes(SIZE, NULL, 0, &fresh_len);
    return 0;
}

static int group_teardown(void **state)
{
    free(fresh);
    return 0;
}

static struct qbm_image *open_fresh(const char *name)
{
    struct qbm_image *img = qbm_open_memory(fresh, fresh_len, name,
                                            QBM_OPEN_RDWR);

    assert_non_null(img);
    return img;
}

/* src: a (enabled, 64 KiB, 1 MiB dirty), b (disabled, 512 B, byte 0
 * dirty), c (enabled, 1 MiB, nothing dirty); dst: b (4 KiB, 2 MiB
 * dirty). Committed. */
static void make_pair(struct qbm_image **ret_src, struct qbm_image **ret_dst)
{
    struct qbm_image *src = open_fresh("src"), *dst = open_fresh("dst");

    assert_int_equal(qbm_bitmap_add(src, "a", 65536, 0), 0);
    assert_int_equal(qbm_bitmap_set_dirty(src, "a", 1 << 20, 1), 0);
    assert_int_equal(qbm_bitmap_add(src, "b", 512, QBM_ADD_DISABLED), 0);
    assert_int_equal(qbm_bitmap_set_dirty(src, "b", 0, 1), 0);
    assert_int_equal(qbm_bitmap_add(src, "c", 1 << 20, 0), 0);
    assert_int_equal(qbm_bitmap_add(dst, "b", 4096, 0), 0);
    assert_int_equal(qbm_bitmap_set_dirty(dst, "b", 2 << 20, 1), 0);
    assert_int_equal(qbm_commit(src), 0);
    assert_int_equal(qbm_commit(dst), 0);
    *ret_src = src;
    *ret_dst = dst;
}

struct events {
    char text[512];
    size_t calls;
    int stop; /* returned from every call when non-zero */
};

static int record(void *opaque, int action, const char *bitmap,
                  uint64_t granularity)
{
    struct events *ev = opaque;

    tl_appendf(ev->text, sizeof(ev->text), "%s%d:%s:%llu",
               ev->text[0] ? " " : "", action, bitmap,
               (unsigned long long)granularity);
    ev->calls++;
    return ev->stop;
}

#define COPIED "1"
#define MERGED "2"
#define REPLACED "3"
#define SKIPPED "4"

static void test_clash_refused(void **state)
{
    struct events ev = { .text = "" };
    struct qbm_image *src, *dst;

    make_pair(&src, &dst);
    assert_int_equal(qbm_bitmap_copy(dst, src, NULL, 0, 0, record, &ev),
                     -1);
    assert_int_equal(qbm_get_errno(), EEXIST);
    assert_string_equal(qbm_get_error(),
                        "dst: a bitmap named 'b' exists already");
    assert_string_equal(ev.text, COPIED ":a:65536");
    assert_int_equal(qbm_bitmap_find(dst, "a"), 1);
    assert_int_equal(qbm_bitmap_count(dst), 2);
    qbm_close(dst);
    qbm_close(src);
}

static void test_merge(void **state)
{
    struct events ev = { .text = "" };
    struct qbm_image *src, *dst;

    make_pair(&src, &dst);
    assert_int_equal(qbm_bitmap_copy(dst, src, NULL, 0, QBM_COPY_MERGE,
                                     record, &ev), 0);
    assert_string_equal(ev.text, COPIED ":a:65536 " MERGED ":b:512 "
                        COPIED ":c:1048576");
    /* The target keeps its granularity and state; the bits are ORed. */
    assert_int_equal(qbm_commit(dst), 0);
    tl_assert_described(dst, "b", "2 4096 0+4096,2097152+4096,");
    tl_assert_described(dst, "a", "2 65536 1048576+65536,");
    tl_assert_described(dst, "c", "2 1048576 ");
    qbm_close(dst);
    qbm_close(src);
}

/* Named bitmaps in the order given; REPLACE takes the source's
 * granularity and state; the result survives a commit. */
static void test_replace_named(void **state)
{
    static const char *const names[] = { "b", "a" };
    struct events ev = { .text = "" };
    struct qbm_image *src, *dst, *again;
    const uint8_t *bytes;
    size_t len;

    make_pair(&src, &dst);
    assert_int_equal(qbm_bitmap_copy(dst, src, names, 2, QBM_COPY_REPLACE,
                                     record, &ev), 0);
    assert_string_equal(ev.text, REPLACED ":b:512 " COPIED ":a:65536");
    assert_int_equal(qbm_commit(dst), 0);
    bytes = qbm_io_mem_data(dst->io, &len);
    again = qbm_open_memory(bytes, len, "again", 0);
    assert_non_null(again);
    tl_assert_described(again, "b", "0 512 0+512,");
    tl_assert_described(again, "a", "2 65536 1048576+65536,");
    tl_assert_described(again, "c", "absent");
    qbm_close(again);
    qbm_close(dst);
    qbm_close(src);
}

static void test_in_use(void **state)
{
    static const char *const names[] = { "c" };
    struct events ev = { .text = "" };
    struct qbm_image *src, *dst;

    make_pair(&src, &dst);
    /* As QEMU leaves a bitmap it did not store back. */
    src->bitmaps[qbm_bitmap_find(src, "c")].flags |= BME_FLAG_IN_USE;
    assert_int_equal(qbm_bitmap_copy(dst, src, NULL, 0, QBM_COPY_MERGE,
                                     record, &ev), 0);
    assert_string_equal(ev.text, COPIED ":a:65536 " MERGED ":b:512 "
                        SKIPPED ":c:1048576");
    /* Named, it is refused (by the merge), the message naming the
     * target. */
    assert_int_equal(qbm_bitmap_copy(dst, src, names, 1, 0, record, &ev),
                     -1);
    assert_int_equal(qbm_get_errno(), EBUSY);
    assert_non_null(strstr(qbm_get_error(), "dst: bitmap 'c' is in use"));
    qbm_close(dst);
    qbm_close(src);
}

static void test_stop_and_refusals(void **state)
{
    static const char *const missing[] = { "a", "zz" };
    struct events ev = { .text = "", .stop = -9 };
    struct qbm_image *src, *dst;

    make_pair(&src, &dst);
    assert_int_equal(qbm_bitmap_copy(dst, src, NULL, 0, QBM_COPY_MERGE,
                                     record, &ev), -9);
    assert_int_equal(qbm_get_errno(), ECANCELED);
    assert_int_equal(ev.calls, 1);
    qbm_close(dst);

    dst = open_fresh("dst");
    ev.stop = 0;
    ev.text[0] = '\0';
    assert_int_equal(qbm_bitmap_copy(dst, src, missing, 2, 0, record, &ev),
                     -1);
    assert_int_equal(qbm_get_errno(), ENOENT);
    assert_string_equal(qbm_get_error(), "src: no bitmap named 'zz'");
    assert_string_equal(ev.text, COPIED ":a:65536");
    assert_int_equal(qbm_bitmap_copy(dst, src, NULL, 0,
                                     QBM_COPY_MERGE | QBM_COPY_REPLACE,
                                     NULL, NULL), -1);
    assert_int_equal(qbm_get_errno(), EINVAL);
    assert_int_equal(qbm_bitmap_copy(dst, src, NULL, 1, 0, NULL, NULL), -1);
    assert_int_equal(qbm_get_errno(), EINVAL);
    assert_int_equal(qbm_bitmap_copy(dst, src, NULL, 0, 0x10, NULL, NULL),
                     -1);
    assert_int_equal(qbm_get_errno(), EINVAL);
    assert_int_equal(qbm_bitmap_copy(src, src, NULL, 0, QBM_COPY_MERGE,
                                     NULL, NULL), -1);
    assert_int_equal(qbm_get_errno(), EINVAL);
    qbm_close(dst);
    qbm_close(src);
}

/* Every allocation of the call made to fail in turn: ENOMEM, no crash,
 * and once it succeeds the whole answer. */
static void test_allocation_failures(void **state)
{
    unsigned long n;
    int succeeded = 0;

    for (n = 1; n < 5000 && !succeeded; n++) {
        struct events ev = { .text = "" };
        struct qbm_image *src, *dst;
        int r;

        make_pair(&src, &dst);
        qbm_alloc_fail_after(n);
        r = qbm_bitmap_copy(dst, src, NULL, 0, QBM_COPY_REPLACE, record,
                            &ev);
        qbm_alloc_fail_after(0);
        if (r < 0) {
            assert_int_equal(qbm_get_errno(), ENOMEM);
        } else {
            assert_int_equal(r, 0);
            assert_string_equal(ev.text, COPIED ":a:65536 "
                                REPLACED ":b:512 " COPIED ":c:1048576");
            assert_int_equal(qbm_commit(dst), 0);
            tl_assert_described(dst, "b", "0 512 0+512,");
            succeeded = 1;
        }
        qbm_close(dst);
        qbm_close(src);
    }
    assert_true(succeeded);
    assert_true(n > 5);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_clash_refused),
        cmocka_unit_test(test_merge),
        cmocka_unit_test(test_replace_named),
        cmocka_unit_test(test_in_use),
        cmocka_unit_test(test_stop_and_refusals),
        cmocka_unit_test(test_allocation_failures),
    };

    return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
