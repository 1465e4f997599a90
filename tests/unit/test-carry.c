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

#include "internal.h"

#define SIZE (16u << 20)

static char dir[] = "/tmp/qbm-carry-XXXXXX";

static char *path_of(const char *name)
{
    static char buf[4][256];
    static unsigned next;
    char *p = buf[next++ % 4];

    snprintf(p, sizeof(buf[0]), "%s/%s", dir, name);
    return p;
}

/*
 * Write NAME: a fresh image of `size` bytes (4 KiB clusters) backed by
 * BACKING (may be
 * NULL), with a data run of `data_clusters` clusters at guest cluster 16.
 */
static void write_image(const char *name, uint64_t size,
                        const char *backing, uint64_t data_clusters)
{
    struct qcow2_out_run run = { 16, data_clusters, true };
    struct qbm_io *io;
    struct qcow2_writer *w;
    const uint8_t *b;
    size_t len;
    FILE *f;

    assert_int_equal(qbm_io_mem_open(NULL, 0, &io), 0);
    assert_int_equal(qcow2_writer_plan(io, size, 12, backing,
                                       backing ? "qcow2" : NULL, &run,
                                       data_clusters ? 1 : 0, &w), 0);
    assert_int_equal(qcow2_writer_finish(w), 0);
    qcow2_writer_free(w);
    b = qbm_io_mem_data(io, &len);
    f = fopen(path_of(name), "wb");
    assert_non_null(f);
    assert_int_equal(fwrite(b, 1, len, f), len);
    assert_int_equal(fclose(f), 0);
    qbm_io_close(io);
}

static void add_bitmap(const char *name, const char *bitmap, bool enabled,
                       uint64_t dirty_off)
{
    struct qbm_image *img = qbm_open(path_of(name), QBM_OPEN_RDWR);

    assert_non_null(img);
    assert_int_equal(qbm_bitmap_add(img, bitmap, 65536,
                                    enabled ? 0 : QBM_ADD_DISABLED), 0);
    if (dirty_off != UINT64_MAX) {
        assert_int_equal(qbm_bitmap_set_dirty(img, bitmap, dirty_off, 1),
                         0);
    }
    assert_int_equal(qbm_commit(img), 0);
    qbm_close(img);
}

static int group_setup(void **state)
{
    assert_non_null(mkdtemp(dir));
    return 0;
}

static const char *const files[] = { "parent", "base", "top", "small",
                                     "odd", "b4", "l2", "l1", "t4" };

static int group_teardown(void **state)
{
    size_t i;

    for (i = 0; i < QBM_ARRAY_SIZE(files); i++) {
        unlink(path_of(files[i]));
    }
    rmdir(dir);
    return 0;
}

/* parent (ck) <- base (no ck, 2 data clusters) <- top (ck, new), fresh
 * for each test. */
static int setup(void **state)
{
    write_image("parent", SIZE, NULL, 0);
    write_image("base", SIZE, "parent", 2);
    write_image("top", SIZE, "base", 0);
    add_bitmap("parent", "ck", true, UINT64_MAX);
    add_bitmap("top", "ck", true, 1 << 20);
    add_bitmap("top", "new", false, UINT64_MAX);
    return 0;
}

struct events {
    char line[8][300];
    size_t n;
    int stop; /* returned from the first call when non-zero */
};

static int record(void *opaque, int action, const char *bitmap,
                  const char *layer)
{
    struct events *ev = opaque;
    const char *slash = strrchr(layer, '/');

    assert_true(ev->n < 8);
    snprintf(ev->line[ev->n++], sizeof(ev->line[0]), "%d %s %s", action,
             bitmap, slash ? slash + 1 : layer);
    return ev->stop;
}

struct text {
    char *p;
    size_t len;
};

static int put_extent(void *opaque, uint64_t off, uint64_t len)
{
    struct text *t = opaque;
    size_t used = strlen(t->p);

    snprintf(t->p + used, t->len - used, "%llu+%llu,",
             (unsigned long long)off, (unsigned long long)len);
    return 0;
}

/* Extents of bitmap `name` of image `file` on disk, as "off+len,...", or
 * "absent". */
static void image_extents(const char *file, const char *name, char *out,
                          size_t len)
{
    struct qbm_image *img = qbm_open(path_of(file), 0);
    struct text t = { out, len };
    int idx;

    assert_non_null(img);
    idx = qbm_bitmap_find(img, name);
    out[0] = '\0';
    if (idx >= 0) {
        assert_int_equal(qbm_bitmap_extents(img, (size_t)idx, put_extent,
                                            &t), 0);
    } else {
        snprintf(out, len, "absent");
    }
    qbm_close(img);
}

static void base_extents(const char *name, char *out, size_t len)
{
    image_extents("base", name, out, len);
}

static void test_gap_not_carried(void **state)
{
    struct qbm_image *base = qbm_open(path_of("base"), QBM_OPEN_RDWR);
    struct events ev = { .n = 0 };
    char got[256];

    assert_non_null(base);
    assert_int_equal(qbm_carry_commit(base, path_of("top"), 0, record, &ev),
                     0);
    assert_int_equal(ev.n, 2);
    assert_string_equal(ev.line[0], "3 ck base"); /* QBM_CARRY_GAP */
    /* new is disabled in top: libvirt and vdsm carry only recording
     * bitmaps. */
    assert_string_equal(ev.line[1], "6 new top"); /* QBM_CARRY_DISABLED */
    assert_int_equal(qbm_bitmap_find(base, "ck"), -1);
    assert_int_equal(qbm_bitmap_find(base, "new"), -1);
    assert_int_equal(qbm_commit(base), 0);
    qbm_close(base);
    base_extents("ck", got, sizeof(got));
    assert_string_equal(got, "absent");
    base_extents("new", got, sizeof(got));
    assert_string_equal(got, "absent");
}

/* INCLUDE_DISABLED: the disabled bitmap is carried, disabled in BASE. */
static void test_include_disabled(void **state)
{
    struct qbm_image *base = qbm_open(path_of("base"), QBM_OPEN_RDWR);
    struct events ev = { .n = 0 };
    char got[256];
    int idx;

    assert_non_null(base);
    assert_int_equal(qbm_carry_commit(base, path_of("top"),
                                      QBM_CARRY_INCLUDE_DISABLED, record, &ev),
                     0);
    assert_int_equal(ev.n, 2);
    assert_string_equal(ev.line[0], "3 ck base");
    assert_string_equal(ev.line[1], "1 new top"); /* QBM_CARRY_COPIED */
    idx = qbm_bitmap_find(base, "new");
    assert_true(idx >= 0);
    assert_int_equal(qbm_bitmap_flags(base, (size_t)idx), 0);
    assert_int_equal(qbm_commit(base), 0);
    qbm_close(base);
    base_extents("new", got, sizeof(got));
    assert_string_equal(got, "");
}

/* Make bitmap `bitmap` of `file` in use, as QEMU leaves it after a
 * crash (the flag written straight into its directory entry). */
static void set_in_use(const char *file, const char *bitmap)
{
    struct qbm_image *img = qbm_open(path_of(file), QBM_OPEN_RDWR);
    int idx;

    assert_non_null(img);
    idx = qbm_bitmap_find(img, bitmap);
    assert_true(idx >= 0);
    img->bitmaps[idx].flags |= BME_FLAG_IN_USE;
    img->staged = true;
    assert_int_equal(qbm_commit(img), 0);
    qbm_close(img);
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
    struct events ev = { .n = 0 };
    char got[256];

    add_bitmap("top", "ok", true, 3 << 20);
    add_bitmap("top", "busy", true, 4 << 20);
    add_bitmap("base", "busy", true, UINT64_MAX);
    add_bitmap("base", "mine", true, UINT64_MAX);
    add_bitmap("base", "old", true, UINT64_MAX);
    add_bitmap("top", "old", true, UINT64_MAX);
    set_in_use("top", "busy");
    set_in_use("base", "old");
    set_in_use("base", "mine");
    base = qbm_open(path_of("base"), QBM_OPEN_RDWR);
    assert_non_null(base);
    assert_int_equal(qbm_carry_commit(base, path_of("top"),
                                      QBM_CARRY_MARK_WRITTEN, record, &ev),
                     0);
    assert_int_equal(ev.n, 8);
    assert_string_equal(ev.line[0], "3 ck base");
    assert_string_equal(ev.line[1], "6 new top");
    assert_string_equal(ev.line[2], "1 ok top");
    assert_string_equal(ev.line[3], "7 busy top"); /* QBM_CARRY_IN_USE */
    assert_string_equal(ev.line[4], "7 old base");
    /* MARK_WRITTEN, in BASE's directory order: BASE's busy is consistent;
     * mine is in use and was not reported yet, old was. */
    assert_string_equal(ev.line[5], "5 busy base");
    assert_string_equal(ev.line[6], "7 mine base");
    assert_string_equal(ev.line[7], "5 ok base");
    assert_int_equal(qbm_commit(base), 0);
    qbm_close(base);
    base_extents("ok", got, sizeof(got));
    assert_string_equal(got, "3145728+65536,");
    base_extents("busy", got, sizeof(got));
    assert_string_equal(got, "");
}

static void test_fill_gaps(void **state)
{
    struct qbm_image *base = qbm_open(path_of("base"), QBM_OPEN_RDWR);
    struct events ev = { .n = 0 };
    char got[256];
    int idx;

    assert_non_null(base);
    assert_int_equal(qbm_carry_commit(base, path_of("top"),
                                      QBM_CARRY_FILL_GAPS, record, &ev), 0);
    assert_int_equal(ev.n, 3);
    assert_string_equal(ev.line[0], "1 ck top");
    assert_string_equal(ev.line[1], "4 ck base"); /* QBM_CARRY_FILLED */
    assert_string_equal(ev.line[2], "6 new top");
    idx = qbm_bitmap_find(base, "ck");
    assert_true(idx >= 0);
    assert_int_equal(qbm_bitmap_flags(base, (size_t)idx), QBM_BITMAP_AUTO);
    assert_int_equal(qbm_bitmap_granularity(base, (size_t)idx), 65536);
    assert_int_equal(qbm_commit(base), 0);
    qbm_close(base);
    /* The base's two data clusters at 64 KiB (granularity 64 KiB), then
     * the top's dirty byte at 1 MiB. */
    base_extents("ck", got, sizeof(got));
    assert_string_equal(got, "65536+65536,1048576+65536,");
}

static void test_stop_and_refusals(void **state)
{
    struct qbm_image *base = qbm_open(path_of("base"), QBM_OPEN_RDWR);
    struct qbm_image *small;
    struct events ev = { .n = 0, .stop = 7 };

    assert_non_null(base);
    assert_int_equal(qbm_carry_commit(base, path_of("top"),
                                      QBM_CARRY_FILL_GAPS, record, &ev), 7);
    assert_int_equal(qbm_get_errno(), ECANCELED);
    assert_int_equal(ev.n, 1);
    qbm_close(base); /* drops what was staged */

    /* A negative value is the callback's too, not an error. */
    base = qbm_open(path_of("base"), QBM_OPEN_RDWR);
    assert_non_null(base);
    ev.n = 0;
    ev.stop = -7;
    assert_int_equal(qbm_carry_commit(base, path_of("top"), 0, record, &ev),
                     -7);
    assert_int_equal(qbm_get_errno(), ECANCELED);
    assert_int_equal(ev.n, 1);
    qbm_close(base);

    base = qbm_open(path_of("base"), QBM_OPEN_RDWR);
    assert_non_null(base);
    assert_int_equal(qbm_carry_commit(base, path_of("top"), 0x800, NULL,
                                      NULL), -1);
    assert_int_equal(qbm_get_errno(), EINVAL);
    assert_int_equal(qbm_carry_commit(NULL, path_of("top"), 0, NULL, NULL),
                     -1);
    assert_int_equal(qbm_get_errno(), EINVAL);
    /* The base itself is not above the base. */
    assert_int_equal(qbm_carry_commit(base, path_of("base"), 0, NULL, NULL),
                     -1);
    assert_int_equal(qbm_get_errno(), EINVAL);
    assert_non_null(strstr(qbm_get_error(), "not in the backing chain"));
    assert_false(base->staged);
    qbm_close(base);

    /* A layer of another virtual size: refused before anything is
     * staged. */
    write_image("small", SIZE / 2, NULL, 0);
    write_image("odd", SIZE, "small", 0);
    small = qbm_open(path_of("small"), QBM_OPEN_RDWR);
    assert_non_null(small);
    assert_int_equal(qbm_carry_commit(small, path_of("odd"), 0, NULL, NULL),
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
    struct events ev = { .n = 0 };
    char got[256];

    write_image("b4", SIZE, NULL, 0);
    write_image("l2", SIZE, "b4", 0);
    write_image("l1", SIZE, "l2", 0);
    write_image("t4", SIZE, "l1", 0);
    add_bitmap("l1", "ck", true, 2 << 20);
    add_bitmap("t4", "ck", true, 1 << 20);
    base = qbm_open(path_of("b4"), QBM_OPEN_RDWR);
    assert_non_null(base);
    assert_int_equal(qbm_carry_commit(base, path_of("t4"), 0, record, &ev),
                     0);
    assert_int_equal(ev.n, 2);
    assert_string_equal(ev.line[0], "1 ck t4"); /* QBM_CARRY_COPIED */
    assert_string_equal(ev.line[1], "2 ck l1"); /* QBM_CARRY_MERGED */
    assert_int_equal(qbm_commit(base), 0);
    qbm_close(base);
    image_extents("b4", "ck", got, sizeof(got));
    assert_string_equal(got, "1048576+65536,2097152+65536,");
}

/* Every allocation of the call made to fail in turn: ENOMEM, no crash. */
static void test_allocation_failures(void **state)
{
    unsigned long n;
    int succeeded = 0;

    for (n = 1; n < 5000 && !succeeded; n++) {
        struct qbm_image *base = qbm_open(path_of("base"), QBM_OPEN_RDWR);
        int r;

        assert_non_null(base);
        qbm_alloc_fail_after(n);
        r = qbm_carry_commit(base, path_of("top"),
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

    return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
