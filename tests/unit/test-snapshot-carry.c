/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * qbm_carry_snapshot() on a BASE and a TOP written to a temporary
 * directory: what it reports and commits, with and without DISABLE_BASE,
 * a dry run, a bitmap TOP has already, its refusals and a callback that
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

#include "internal.h"

#define SIZE (16u << 20)

static char dir[] = "/tmp/qbm-snapshot-carry-XXXXXX";

static char *path_of(const char *name)
{
    static char buf[4][256];
    static unsigned next;
    char *p = buf[next++ % 4];

    snprintf(p, sizeof(buf[0]), "%s/%s", dir, name);
    return p;
}

/* Write NAME: an image (4 KiB clusters) backed by BACKING (may be NULL),
 * with `data_clusters` data clusters at guest cluster 16 (64 KiB). */
static void write_image(const char *name, const char *backing,
                        uint64_t data_clusters)
{
    struct qcow2_out_run run = { 16, data_clusters, true };
    struct qbm_io *io;
    struct qcow2_writer *w;
    const uint8_t *b;
    size_t len;
    FILE *f;

    assert_int_equal(qbm_io_mem_open(NULL, 0, &io), 0);
    assert_int_equal(qcow2_writer_plan(io, SIZE, 12, backing,
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

static void add_bitmap(const char *name, const char *bitmap,
                       uint64_t granularity, bool enabled)
{
    struct qbm_image *img = qbm_open(path_of(name), QBM_OPEN_RDWR);

    assert_non_null(img);
    assert_int_equal(qbm_bitmap_add(img, bitmap, granularity,
                                    enabled ? 0 : QBM_ADD_DISABLED), 0);
    assert_int_equal(qbm_commit(img), 0);
    qbm_close(img);
}

/* The whole file, to see that nothing was written. */
static char *contents(const char *name, size_t *ret_len)
{
    FILE *f = fopen(path_of(name), "rb");
    char *p;
    long len;

    assert_non_null(f);
    assert_int_equal(fseek(f, 0, SEEK_END), 0);
    len = ftell(f);
    assert_true(len > 0);
    rewind(f);
    p = malloc((size_t)len);
    assert_non_null(p);
    assert_int_equal(fread(p, 1, (size_t)len, f), (size_t)len);
    fclose(f);
    *ret_len = (size_t)len;
    return p;
}

static void assert_unchanged(const char *name, const char *before,
                             size_t len)
{
    size_t now_len;
    char *now = contents(name, &now_len);

    assert_int_equal(now_len, len);
    assert_memory_equal(now, before, len);
    free(now);
}

static int group_setup(void **state)
{
    assert_non_null(mkdtemp(dir));
    return 0;
}

static int group_teardown(void **state)
{
    static const char *const files[] = { "base", "top", "lone" };
    size_t i;

    for (i = 0; i < QBM_ARRAY_SIZE(files); i++) {
        unlink(path_of(files[i]));
    }
    rmdir(dir);
    return 0;
}

/* base (ck1 enabled, old disabled, ck2 enabled with 512 B granularity)
 * <- top (two data clusters at 64 KiB, no bitmaps). */
static int setup(void **state)
{
    write_image("base", NULL, 0);
    write_image("top", "base", 2);
    add_bitmap("base", "ck1", 65536, true);
    add_bitmap("base", "old", 65536, false);
    add_bitmap("base", "ck2", 512, true);
    return 0;
}

struct events {
    char line[10][300];
    size_t n;
    int stop; /* returned from the first call when non-zero */
};

static int record(void *opaque, int action, const char *bitmap,
                  const char *image)
{
    struct events *ev = opaque;
    const char *slash = strrchr(image, '/');

    assert_true(ev->n < 10);
    snprintf(ev->line[ev->n++], sizeof(ev->line[0]), "%d %s %s", action,
             bitmap ? bitmap : "-", slash ? slash + 1 : image);
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

/* Bitmap `name` of `file` on disk: "flags granularity extents", or
 * "absent". */
static void describe(const char *file, const char *name, char *out,
                     size_t len)
{
    struct qbm_image *img = qbm_open(path_of(file), 0);
    char ext[200] = "";
    struct text t = { ext, sizeof(ext) };
    int idx;

    assert_non_null(img);
    idx = qbm_bitmap_find(img, name);
    if (idx < 0) {
        snprintf(out, len, "absent");
    } else {
        assert_int_equal(qbm_bitmap_extents(img, (size_t)idx, put_extent,
                                            &t), 0);
        snprintf(out, len, "%u %llu %s", qbm_bitmap_flags(img, (size_t)idx),
                 (unsigned long long)qbm_bitmap_granularity(img,
                                                            (size_t)idx),
                 ext);
    }
    qbm_close(img);
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
    struct events ev = { .n = 0 };
    char got[300];

    assert_int_equal(qbm_carry_snapshot(path_of("base"), path_of("top"), 0,
                                        record, &ev), 0);
    assert_int_equal(ev.n, 4);
    assert_string_equal(ev.line[0], ADDED " ck1 top");
    assert_string_equal(ev.line[1], SKIPPED " old base");
    assert_string_equal(ev.line[2], ADDED " ck2 top");
    assert_string_equal(ev.line[3], TOP_DONE " - top");
    /* TOP's clusters, at each bitmap's granularity. */
    describe("top", "ck1", got, sizeof(got));
    assert_string_equal(got, "2 65536 65536+65536,");
    describe("top", "ck2", got, sizeof(got));
    assert_string_equal(got, "2 512 65536+8192,");
    describe("top", "old", got, sizeof(got));
    assert_string_equal(got, "absent");
    describe("base", "ck1", got, sizeof(got));
    assert_string_equal(got, "2 65536 ");
}

static void test_disable_base(void **state)
{
    struct events ev = { .n = 0 };
    char got[300];

    add_bitmap("top", "ck1", 4096, false); /* TOP's own copy is kept */
    assert_int_equal(qbm_carry_snapshot(path_of("base"), path_of("top"),
                                        QBM_CARRY_SNAPSHOT_DISABLE_BASE,
                                        record, &ev), 0);
    assert_int_equal(ev.n, 7);
    assert_string_equal(ev.line[0], MARKED " ck1 top");
    assert_string_equal(ev.line[1], SKIPPED " old base");
    assert_string_equal(ev.line[2], ADDED " ck2 top");
    assert_string_equal(ev.line[3], TOP_DONE " - top");
    assert_string_equal(ev.line[4], DISABLED " ck1 base");
    assert_string_equal(ev.line[5], DISABLED " ck2 base");
    assert_string_equal(ev.line[6], BASE_DONE " - base");
    describe("top", "ck1", got, sizeof(got));
    assert_string_equal(got, "0 4096 65536+8192,");
    describe("base", "ck1", got, sizeof(got));
    assert_string_equal(got, "0 65536 ");
    describe("base", "ck2", got, sizeof(got));
    assert_string_equal(got, "0 512 ");
    describe("base", "old", got, sizeof(got));
    assert_string_equal(got, "0 65536 ");
}

static void test_dry_run(void **state)
{
    struct events ev = { .n = 0 };
    size_t blen, tlen;
    char *base = contents("base", &blen), *top = contents("top", &tlen);

    assert_int_equal(qbm_carry_snapshot(path_of("base"), path_of("top"),
                                        QBM_CARRY_SNAPSHOT_DISABLE_BASE |
                                            QBM_CARRY_SNAPSHOT_DRY_RUN,
                                        record, &ev), 0);
    assert_int_equal(ev.n, 7);
    assert_string_equal(ev.line[3], TOP_DONE " - top");
    assert_string_equal(ev.line[5], DISABLED " ck2 base");
    assert_unchanged("base", base, blen);
    assert_unchanged("top", top, tlen);
    free(base);
    free(top);
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

static void test_refusals(void **state)
{
    struct events ev = { .n = 0 };
    size_t blen, tlen;
    char *base = contents("base", &blen), *top = contents("top", &tlen);
    char want[600];

    assert_int_equal(qbm_carry_snapshot(path_of("base"), path_of("top"),
                                        0x800, NULL, NULL), -1);
    assert_int_equal(qbm_get_errno(), EINVAL);
    assert_int_equal(qbm_carry_snapshot(NULL, path_of("top"), 0, NULL,
                                        NULL), -1);
    assert_int_equal(qbm_get_errno(), EINVAL);

    /* TOP is not a snapshot of BASE. */
    write_image("lone", NULL, 0);
    assert_int_equal(qbm_carry_snapshot(path_of("base"), path_of("lone"), 0,
                                        record, &ev), -1);
    assert_int_equal(qbm_get_errno(), EINVAL);
    snprintf(want, sizeof(want), "%s: its backing file is (none), not %s",
             path_of("lone"), path_of("base"));
    assert_string_equal(qbm_get_error(), want);
    assert_int_equal(qbm_carry_snapshot(path_of("top"), path_of("base"), 0,
                                        record, &ev), -1);
    assert_int_equal(qbm_get_errno(), EINVAL);

    /* A callback that stops at once: nothing is committed. */
    ev.stop = -5;
    assert_int_equal(qbm_carry_snapshot(path_of("base"), path_of("top"),
                                        QBM_CARRY_SNAPSHOT_DISABLE_BASE,
                                        record, &ev), -5);
    assert_int_equal(qbm_get_errno(), ECANCELED);
    assert_int_equal(ev.n, 1);
    assert_unchanged("base", base, blen);
    assert_unchanged("top", top, tlen);
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
    struct events ev = { .n = 0 };
    char got[300];

    set_in_use("base", "ck2");
    assert_int_equal(qbm_carry_snapshot(path_of("base"), path_of("top"), 0,
                                        record, &ev), 0);
    assert_int_equal(ev.n, 4);
    assert_string_equal(ev.line[0], ADDED " ck1 top");
    assert_string_equal(ev.line[1], SKIPPED " old base");
    assert_string_equal(ev.line[2], IN_USE " ck2 base");
    assert_string_equal(ev.line[3], TOP_DONE " - top");
    describe("top", "ck1", got, sizeof(got));
    assert_string_equal(got, "2 65536 65536+65536,");
    describe("top", "ck2", got, sizeof(got));
    assert_string_equal(got, "absent");
    describe("base", "ck1", got, sizeof(got));
    assert_string_equal(got, "2 65536 ");

    /* TOP's own copy in use: not marked, and not disabled in BASE. */
    setup(state);
    add_bitmap("top", "ck1", 65536, true);
    set_in_use("top", "ck1");
    ev.n = 0;
    assert_int_equal(qbm_carry_snapshot(path_of("base"), path_of("top"),
                                        QBM_CARRY_SNAPSHOT_DISABLE_BASE,
                                        record, &ev), 0);
    assert_int_equal(ev.n, 6);
    assert_string_equal(ev.line[0], IN_USE " ck1 top");
    assert_string_equal(ev.line[1], SKIPPED " old base");
    assert_string_equal(ev.line[2], ADDED " ck2 top");
    assert_string_equal(ev.line[3], TOP_DONE " - top");
    assert_string_equal(ev.line[4], DISABLED " ck2 base");
    assert_string_equal(ev.line[5], BASE_DONE " - base");
    describe("base", "ck1", got, sizeof(got));
    assert_string_equal(got, "2 65536 ");
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
    struct qbm_image *img = qbm_open(path_of(file), 0);
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
        r = qbm_carry_snapshot(path_of("base"), path_of("top"),
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
        cmocka_unit_test_setup(test_refusals, setup),
        cmocka_unit_test_setup(test_in_use_skipped, setup),
        cmocka_unit_test(test_allocation_failures),
    };

    return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
