/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * The public calls a language binding leans on: a progress callback that
 * stops restore, extract, consolidate, rebuild and verify (its value comes
 * back, errno ECANCELED, and nothing is left behind or switched), and
 * qbm_bitmap_extents_range() (clipping, and a piecewise walk that resumes
 * after a stopped batch giving the same extents as one whole walk).
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cmocka.h>

#include "testlib.h"

#define SIZE (48u << 20)

/* File NAME of the test directory, in a buffer of its own (tl_path's
 * last four results rotate; the calls here keep arrays of paths). */
static const char *const files[] = { "full",  "inc", "out", "before",
                                     "after", "bm",  "disk" };

static char *path_of(const char *name)
{
    static char buf[QBM_ARRAY_SIZE(files)][256];
    size_t i;

    for (i = 0; strcmp(files[i], name) != 0; i++) {
        assert_true(i + 1 < QBM_ARRAY_SIZE(files));
    }
    snprintf(buf[i], sizeof(buf[i]), "%s", tl_path(name));
    return buf[i];
}

/* Write NAME: a fresh image (4 KiB clusters) with a data run of `n`
 * clusters at guest cluster `at`, every byte of it `byte`. */
static void write_image(const char *name, uint64_t at, uint64_t n, uint8_t byte)
{
    struct qcow2_out_run run = { at, n, true };
    struct qbm_io *io;
    struct qcow2_writer *w;
    const uint8_t *b;
    uint8_t *data;
    size_t len;
    FILE *f;

    assert_int_equal(qbm_io_mem_open(NULL, 0, &io), 0);
    assert_int_equal(
        qcow2_writer_plan(io, SIZE, 12, NULL, NULL, &run, n ? 1 : 0, &w), 0);
    if (n) {
        data = malloc(n * 4096);
        memset(data, byte, n * 4096);
        assert_int_equal(
            qbm_io_pwrite(io, data, n * 4096, qcow2_writer_run_host(w, 0)), 0);
        free(data);
    }
    assert_int_equal(qcow2_writer_finish(w), 0);
    qcow2_writer_free(w);
    b = qbm_io_mem_data(io, &len);
    f = fopen(path_of(name), "wb");
    assert_non_null(f);
    assert_int_equal(fwrite(b, 1, len, f), len);
    assert_int_equal(fclose(f), 0);
    qbm_io_close(io);
}

static bool exists(const char *path)
{
    struct stat st;

    return lstat(path, &st) == 0;
}

struct stopper {
    unsigned calls;
    unsigned stop_at; /* stop at this call (1 = the first); 0 = never */
};

static int progress_cb(void *opaque, uint64_t done, uint64_t total)
{
    struct stopper *s = opaque;

    assert_true(done <= total || total == 0);
    return ++s->calls == s->stop_at ? 42 : 0;
}

static int setup(void **state)
{
    tl_dir_clean(state);
    write_image("full", 0, 64, 0x11);
    write_image("inc", 62, 4, 0x22);
    return 0;
}

static void test_restore_stopped(void **state)
{
    const char *images[] = { path_of("full"), path_of("inc") };
    struct stopper s = { 0, 1 };

    assert_int_equal(qbm_restore(images, 2, path_of("out"), QBM_OUTPUT_RAW,
                                 NULL, progress_cb, &s),
                     42);
    assert_int_equal(qbm_get_errno(), ECANCELED);
    assert_int_equal(s.calls, 1);
    assert_false(exists(path_of("out")));
    /* Going on to the end writes it. */
    s = (struct stopper){ 0, 0 };
    assert_int_equal(qbm_restore(images, 2, path_of("out"), QBM_OUTPUT_RAW,
                                 NULL, progress_cb, &s),
                     0);
    assert_true(s.calls > 1);
    assert_true(exists(path_of("out")));
}

static void test_extract_stopped(void **state)
{
    struct stopper s = { 0, 1 };

    assert_int_equal(qbm_extract(path_of("full"), NULL, path_of("out"),
                                 QBM_EXTRACT_FULL, NULL, progress_cb, &s),
                     42);
    assert_int_equal(qbm_get_errno(), ECANCELED);
    assert_int_equal(s.calls, 1);
    assert_false(exists(path_of("out")));
    s = (struct stopper){ 0, 0 };
    assert_int_equal(qbm_extract(path_of("full"), NULL, path_of("out"),
                                 QBM_EXTRACT_FULL, NULL, progress_cb, &s),
                     0);
    assert_true(s.calls >= 1);
    assert_true(exists(path_of("out")));
}

static void test_consolidate_stopped(void **state)
{
    const char *full[] = { path_of("full") };
    const char *inc[] = { path_of("inc") };
    struct stopper s = { 0, 1 };
    char *before, *after;
    size_t nb, na;

    assert_int_equal(qbm_restore(full, 1, path_of("before"), QBM_OUTPUT_RAW,
                                 NULL, NULL, NULL),
                     0);
    assert_int_equal(qbm_consolidate(path_of("full"), inc, 1, progress_cb, &s),
                     42);
    assert_int_equal(qbm_get_errno(), ECANCELED);
    assert_int_equal(qbm_restore(full, 1, path_of("after"), QBM_OUTPUT_RAW,
                                 NULL, NULL, NULL),
                     0);
    before = tl_contents("before", &nb);
    after = tl_contents("after", &na);
    assert_int_equal(nb, na);
    assert_memory_equal(before, after, nb);
    free(after);
    /* Done to the end, the incremental's bytes are in. */
    unlink(path_of("after"));
    assert_int_equal(qbm_consolidate(path_of("full"), inc, 1, NULL, NULL), 0);
    assert_int_equal(qbm_restore(full, 1, path_of("after"), QBM_OUTPUT_RAW,
                                 NULL, NULL, NULL),
                     0);
    after = tl_contents("after", &na);
    assert_int_equal(nb, na);
    assert_memory_not_equal(before, after, nb);
    free(before);
    free(after);
}

struct extents {
    uint64_t v[64][2];
    size_t n;
    size_t stop_after; /* stop after this many (0 = never) */
};

static int collect(void *opaque, uint64_t off, uint64_t len)
{
    struct extents *e = opaque;

    assert_true(e->n < 64);
    e->v[e->n][0] = off;
    e->v[e->n][1] = len;
    e->n++;
    return e->stop_after && e->n % e->stop_after == 0 ? 1 : 0;
}

static void test_extents_range(void **state)
{
    /* 512-byte granularity on 4 KiB clusters: a table entry covers
     * 16 MiB of guest; runs on both sides of the first boundary and one
     * across it. */
    struct qbm_image *img;
    struct extents whole = { .n = 0 }, part = { .n = 0 };
    static const uint64_t runs[][2] = {
        { 0, 512 },
        { 4096, 8192 },
        { (1u << 20) - 512, 1024 },
        { 3u << 20, 65536 },
        { (16u << 20) - 512, 1024 },
        { 40u << 20, 4096 },
        { SIZE - 512, 512 },
    };
    uint64_t from = 0;
    size_t i;
    int r;

    write_image("bm", 0, 0, 0);
    img = qbm_open(path_of("bm"), QBM_OPEN_RDWR);
    assert_non_null(img);
    assert_int_equal(qbm_bitmap_add(img, "b", 512, 0), 0);
    for (i = 0; i < QBM_ARRAY_SIZE(runs); i++) {
        assert_int_equal(qbm_bitmap_set_dirty(img, "b", runs[i][0], runs[i][1]),
                         0);
    }
    assert_int_equal(qbm_commit(img), 0);
    qbm_close(img);
    img = qbm_open(path_of("bm"), 0);
    assert_non_null(img);

    assert_int_equal(qbm_bitmap_extents(img, 0, collect, &whole), 0);
    assert_int_equal(whole.n, QBM_ARRAY_SIZE(runs));
    /* Piecewise, two extents per batch, resuming at the last one's end. */
    part.stop_after = 2;
    do {
        size_t before = part.n;

        r = qbm_bitmap_extents_range(img, 0, from, UINT64_MAX - from, collect,
                                     &part);
        assert_true(r == 0 || r == 1);
        if (r == 1) {
            assert_int_equal(qbm_get_errno(), ECANCELED);
        }
        if (part.n > before) {
            from = part.v[part.n - 1][0] + part.v[part.n - 1][1];
        }
    } while (r == 1);
    assert_int_equal(part.n, whole.n);
    assert_memory_equal(part.v, whole.v, whole.n * sizeof(whole.v[0]));

    /* Clipped to the range: the middle of the third run to inside the
     * fourth. */
    part = (struct extents){ .n = 0 };
    assert_int_equal(qbm_bitmap_extents_range(img, 0, 1u << 20,
                                              (3u << 20) + 4096 - (1u << 20),
                                              collect, &part),
                     0);
    assert_int_equal(part.n, 2);
    assert_int_equal(part.v[0][0], 1u << 20);
    assert_int_equal(part.v[0][1], 512);
    assert_int_equal(part.v[1][0], 3u << 20);
    assert_int_equal(part.v[1][1], 4096);
    /* Empty and out-of-disk ranges report nothing; bad arguments fail. */
    part = (struct extents){ .n = 0 };
    assert_int_equal(qbm_bitmap_extents_range(img, 0, 8192, 0, collect, &part),
                     0);
    assert_int_equal(
        qbm_bitmap_extents_range(img, 0, SIZE, 4096, collect, &part), 0);
    assert_int_equal(part.n, 0);
    assert_int_equal(qbm_bitmap_extents_range(img, 1, 0, SIZE, collect, &part),
                     -1);
    assert_int_equal(qbm_get_errno(), EINVAL);
    qbm_close(img);
}

static void test_rebuild_stopped(void **state)
{
    const char *backups[] = { path_of("full") };
    struct stopper s = { 0, 1 };
    uint64_t dirty = 1;
    char *before;
    size_t len;

    write_image("disk", 0, 64, 0x33);
    before = tl_contents("disk", &len);
    assert_int_equal(qbm_rebuild(path_of("disk"), "ck", 4096, backups, 1, 0,
                                 progress_cb, &s, &dirty),
                     42);
    assert_int_equal(qbm_get_errno(), ECANCELED);
    assert_int_equal(s.calls, 1);
    assert_int_equal(dirty, 1);
    tl_assert_unchanged("disk", before, len);
    free(before);
    /* Going on to the end commits it. */
    s = (struct stopper){ 0, 0 };
    assert_int_equal(qbm_rebuild(path_of("disk"), "ck", 4096, backups, 1, 0,
                                 progress_cb, &s, &dirty),
                     0);
    assert_true(s.calls > 1);
    assert_int_equal(dirty, 64 * 4096);
}

static void test_verify_stopped(void **state)
{
    const char *backups[] = { path_of("full") };
    struct extents ext = { .n = 0 };
    struct stopper s = { 0, 1 };

    write_image("disk", 0, 64, 0x33);
    assert_int_equal(qbm_verify(path_of("disk"), backups, 1, NULL, 0, collect,
                                &ext, progress_cb, &s),
                     42);
    assert_int_equal(qbm_get_errno(), ECANCELED);
    assert_int_equal(s.calls, 1);
    s = (struct stopper){ 0, 0 };
    ext = (struct extents){ .n = 0 };
    assert_int_equal(qbm_verify(path_of("disk"), backups, 1, NULL, 0, collect,
                                &ext, progress_cb, &s),
                     0);
    assert_true(s.calls > 1);
    assert_int_equal(ext.n, 1);
    assert_int_equal(ext.v[0][0], 0);
    assert_int_equal(ext.v[0][1], 64 * 4096);
    /* The extent callback stops it as before: its value. */
    ext = (struct extents){ .n = 0, .stop_after = 1 };
    assert_int_equal(qbm_verify(path_of("disk"), backups, 1, NULL, 0, collect,
                                &ext, progress_cb, &s),
                     1);
    assert_int_equal(qbm_get_errno(), ECANCELED);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup(test_restore_stopped, setup),
        cmocka_unit_test_setup(test_extract_stopped, setup),
        cmocka_unit_test_setup(test_consolidate_stopped, setup),
        cmocka_unit_test_setup(test_extents_range, setup),
        cmocka_unit_test_setup(test_rebuild_stopped, setup),
        cmocka_unit_test_setup(test_verify_stopped, setup),
    };

    return cmocka_run_group_tests(tests, tl_dir_setup, tl_dir_teardown);
}
