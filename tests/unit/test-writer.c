/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * The fresh-image writer (qcow2-writer.c) writing in place over an older
 * image, as restore and extract do onto a block device: the caller zeroes
 * cluster 0 and flushes, the writer flushes before its header
 * (qcow2_writer_set_ordered). A crash at any write or flush, with any
 * subset of the unflushed writes reaching the disk, leaves the old image
 * untouched (nothing reached the disk), no qcow2 header at all, or the
 * whole new metadata: never a header over tables that are not there.
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

#define SIZE (64ull << 20)
#define BITS 12

/* Old image: data in the first half; new image: data in the second. */
static const struct qcow2_out_run old_runs[] = {
    { 0, 300, true },
    { 4000, 10, false },
};
static const struct qcow2_out_run new_runs[] = {
    { 700, 5, false },
    { 8192, 600, true },
    { 15000, 3, true },
};

/* Write an image of `runs` (metadata only) over `io`: as onto a device
 * when `in_place` (cluster 0 zeroed and flushed first, ordered writer). */
static int write_image(struct qbm_io *io, const struct qcow2_out_run *runs,
                       size_t n, bool in_place, uint64_t *ret_end)
{
    static uint8_t zeros[1u << BITS];
    struct qcow2_writer *w;
    int r;

    if (in_place) {
        r = qbm_io_pwrite(io, zeros, sizeof(zeros), 0);
        r = r ? r : qbm_io_flush(io);
        if (r < 0) {
            return r;
        }
    }
    r = qcow2_writer_plan(io, SIZE, BITS, NULL, NULL, runs, n, &w);
    if (r < 0) {
        return r;
    }
    if (in_place) {
        qcow2_writer_set_ordered(w);
    }
    if (ret_end) {
        *ret_end = qcow2_writer_end(w);
    }
    r = qcow2_writer_finish(w);
    qcow2_writer_free(w);
    return r;
}

static uint8_t *image_bytes(struct qbm_io *io, size_t *ret_len)
{
    const uint8_t *b = qbm_io_mem_data(io, ret_len);
    uint8_t *copy = malloc(*ret_len);

    assert_non_null(copy);
    memcpy(copy, b, *ret_len);
    return copy;
}

static void test_crash_in_place(void **state)
{
    struct qbm_io *io;
    uint8_t *old, *want;
    size_t old_len, want_len;
    uint64_t end, ops, point;
    uint32_t i;
    unsigned complete = 0, headerless = 0, untouched = 0;

    /* The old image, and the new one written over it without a crash. */
    assert_int_equal(qbm_io_mem_open(NULL, 0, &io), 0);
    assert_int_equal(write_image(io, old_runs, 2, false, NULL), 0);
    old = image_bytes(io, &old_len);
    qbm_io_close(io);
    assert_int_equal(be32_load(old), QCOW2_MAGIC);
    assert_int_equal(qbm_io_fault_open(old, old_len, 0, 1, &io), 0);
    assert_int_equal(write_image(io, new_runs, 3, true, &end), 0);
    ops = qbm_io_fault_ops(io);
    assert_int_equal(qbm_io_fault_crash_image(io, &want, &want_len), 0);
    qbm_io_close(io);
    assert_true(end > old_len); /* the new image reaches further */
    assert_true(ops > 4);

    for (point = 1; point <= ops; point++) {
        for (i = 1; i <= 16; i++) {
            /* Spread seeds: the fault backend's xorshift gives small
             * seeds similar first choices. */
            uint32_t seed = i * 2654435761u;
            uint8_t *got;
            size_t got_len;

            assert_int_equal(qbm_io_fault_open(old, old_len, point, seed, &io),
                             0);
            assert_int_equal(write_image(io, new_runs, 3, true, NULL), -EIO);
            assert_int_equal(qbm_io_fault_crash_image(io, &got, &got_len), 0);
            qbm_io_close(io);
            if (got_len == old_len && memcmp(got, old, old_len) == 0) {
                untouched++;
            } else if (be32_load(got) != QCOW2_MAGIC) {
                /* No header: nothing opens the half-written image. */
                assert_int_equal(be32_load(got), 0);
                headerless++;
            } else {
                /* A header: everything it points at is there (the data
                 * clusters, which the caller writes, are left out). */
                if (got_len != want_len || memcmp(got, want, got_len) != 0) {
                    fail_msg("crash at %llu (seed %u): a header over "
                             "metadata that is not on disk",
                             (unsigned long long)point, seed);
                }
                complete++;
            }
            free(got);
        }
    }
    /* Every outcome occurs: the loop saw the windows in question. */
    assert_true(untouched > 0);
    assert_true(headerless > 0);
    assert_true(complete > 0);
    free(old);
    free(want);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_crash_in_place),
    };

    return cmocka_run_group_tests(tests, NULL, NULL);
}
