/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * Fuzz harness: open arbitrary bytes as a qcow2 image from memory, then
 * read everything a user can ask for (header, features, bitmaps, dirty
 * bytes, extents, allocation map, the full consistency check), asserting
 * the invariants of every answer. Any violation aborts.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#include "fuzz-common.h"
#include "qbm.h"

struct walk {
    uint64_t size, next, sum, count;
};

static int on_extent(void *opaque, uint64_t off, uint64_t len)
{
    struct walk *w = opaque;

    /* Increasing, non-empty, not adjacent (merged), inside the disk. */
    CHECK(len > 0);
    CHECK(w->count == 0 || off > w->next);
    CHECK(off + len <= w->size && off + len > off);
    w->next = off + len;
    w->sum += len;
    w->count++;
    return w->count > 1000000; /* bound the harness's own work */
}

static int on_alloc(void *opaque, uint64_t off, uint64_t len, unsigned st)
{
    struct walk *w = opaque;

    CHECK(len > 0);
    CHECK(w->count == 0 || off >= w->next);
    CHECK(off + len <= w->size && off + len > off);
    CHECK(st == QBM_ALLOC_DATA || st == QBM_ALLOC_ZERO);
    w->next = off + len;
    w->count++;
    return w->count > 1000000;
}

static int on_problem(void *opaque, int kind, uint64_t off, const char *msg)
{
    CHECK(kind >= QBM_PROBLEM_CORRUPTION && kind <= QBM_PROBLEM_BITMAP);
    CHECK(msg && msg[0]);
    return ++*(unsigned *)opaque > 100000;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct qbm_image *img = qbm_open_memory(data, size, "fuzz", 0);
    unsigned w, bit, problems = 0;
    size_t i, n;

    if (!img) {
        CHECK(qbm_get_error()[0] != '\0');
        CHECK(qbm_get_errno() > 0);
        return 0;
    }
    CHECK(qbm_image_version(img) == 2 || qbm_image_version(img) == 3);
    CHECK(qbm_image_cluster_size(img) >= 512 &&
          qbm_image_cluster_size(img) <= (2u << 20));
    CHECK(qbm_image_refcount_bits(img) >= 1 &&
          qbm_image_refcount_bits(img) <= 64);
    (void)qbm_image_compression_type(img);
    (void)qbm_image_backing_file(img);
    (void)qbm_image_backing_format(img);
    (void)qbm_image_data_file(img);
    for (unsigned s = 0; s < qbm_image_snapshot_count(img); s++) {
        struct qbm_snapshot_info sn;

        CHECK(qbm_image_snapshot(img, s, &sn) == 0);
        CHECK(sn.id && sn.name);
    }
    {
        struct qbm_encryption_info enc;

        if (qbm_image_encryption(img, &enc) == 0) {
            CHECK(enc.format[0] != '\0');
        }
    }
    free(qbm_image_backing_path(img));
    for (w = 0; w < 3; w++) {
        (void)qbm_image_features(img, w);
        for (bit = 0; bit < 64; bit++) {
            (void)qbm_image_feature_name(img, w, bit);
        }
    }
    n = qbm_bitmap_count(img);
    CHECK(qbm_image_bitmaps_state(img) == QBM_BITMAPS_OK || n == 0);
    for (i = 0; i < n; i++) {
        struct walk wk = { .size = qbm_image_virtual_size(img) };
        uint64_t dirty;
        int r;

        CHECK(qbm_bitmap_name(img, i) != NULL);
        CHECK(qbm_bitmap_find(img, qbm_bitmap_name(img, i)) >= 0);
        CHECK(qbm_bitmap_granularity(img, i) >= 512);
        (void)qbm_bitmap_flags(img, i);
        (void)qbm_bitmap_consistent(img, i);
        if (qbm_bitmap_dirty_bytes(img, i, &dirty) < 0) {
            CHECK(qbm_get_error()[0] != '\0');
            continue;
        }
        CHECK(dirty <= qbm_image_virtual_size(img));
        r = qbm_bitmap_extents(img, i, on_extent, &wk);
        if (r == 0) {
            CHECK(wk.sum == dirty);
        }
    }
    {
        struct walk wk = { .size = qbm_image_virtual_size(img) };

        (void)qbm_image_allocation(img, on_alloc, &wk);
    }
    (void)qbm_check(img, on_problem, &problems);
    qbm_close(img);
    return 0;
}
