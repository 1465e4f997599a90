/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* The in-memory chunked bitmap against a plain bool-array model. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "internal.h"

struct model {
    uint64_t disk, gran, nbits;
    uint8_t *bits;
};

struct collect {
    uint64_t (*v)[2];
    size_t n;
};

static int collect(void *opaque, uint64_t off, uint64_t len)
{
    struct collect *c = opaque;

    c->v = realloc(c->v, (c->n + 1) * sizeof(*c->v));
    c->v[c->n][0] = off;
    c->v[c->n][1] = len;
    c->n++;
    return 0;
}

/* Compare the bitmap's extents with the model's. */
static void check_against(struct qbm_bmap *bm, struct model *m)
{
    struct collect c = { 0 };
    uint64_t k = 0, dirty = 0;
    size_t e = 0;

    assert_int_equal(qbm_bmap_extents(bm, collect, &c), 0);
    while (k < m->nbits) {
        uint64_t s, end;

        if (!m->bits[k]) {
            k++;
            continue;
        }
        s = k;
        while (k < m->nbits && m->bits[k]) {
            k++;
        }
        end = k * m->gran < m->disk ? k * m->gran : m->disk;
        assert_true(e < c.n);
        assert_int_equal(c.v[e][0], s * m->gran);
        assert_int_equal(c.v[e][1], end - s * m->gran);
        dirty += end - s * m->gran;
        e++;
    }
    assert_int_equal(e, c.n);
    assert_int_equal(qbm_bmap_dirty_bytes(bm, &k), 0);
    assert_int_equal(k, dirty);
    free(c.v);
}

/* Turn every in-memory chunk into a reference to a copy of its bytes in a
 * memory io owned by the bitmap: as if it had been staged from disk. */
static void chunks_to_refs(struct qbm_bmap *bm)
{
    uint8_t *img = calloc(bm->nchunks, bm->chunk_bytes);
    struct qbm_io *io;
    uint64_t i;

    for (i = 0; i < bm->nchunks; i++) {
        if (bm->chunks[i] && bm->chunks[i] != QBM_CHUNK_ONES) {
            memcpy(img + i * bm->chunk_bytes, bm->chunks[i], bm->chunk_bytes);
        }
    }
    assert_int_equal(qbm_io_mem_open(img, bm->nchunks * bm->chunk_bytes,
                                     &io), 0);
    assert_int_equal(qbm_bmap_adopt_io(bm, io), 0);
    for (i = 0; i < bm->nchunks; i++) {
        if (bm->chunks[i] && bm->chunks[i] != QBM_CHUNK_ONES) {
            bm->chunks[i] = NULL;
            assert_int_equal(qbm_bmap_set_ref(bm, i, io,
                                              i * bm->chunk_bytes), 0);
            assert_ptr_equal(bm->chunks[i], QBM_CHUNK_REF);
        }
    }
    free(img);
}

/* Random set_range calls, mirrored in the model. */
static void random_ops(struct qbm_bmap *bm, struct model *m, int ops)
{
    int i;

    for (i = 0; i < ops; i++) {
        uint64_t off = (uint64_t)rand() % (m->disk + 1000);
        uint64_t len = (uint64_t)rand() % (m->disk / 2 + 2);
        uint64_t k;

        if (rand() % 10 == 0) {
            off = 0;
            len = m->disk; /* whole disk: all-ones chunks */
        }
        assert_int_equal(qbm_bmap_set_range(bm, off, len), 0);
        for (k = off / m->gran; len && off < m->disk && k < m->nbits &&
                                k * m->gran < off + len; k++) {
            m->bits[k] = 1;
        }
    }
}

static void test_random_vs_model(void **state)
{
    unsigned seed = getenv("QBM_TEST_SEED") ? (unsigned)atoi(
                        getenv("QBM_TEST_SEED")) : 12345;
    int round;

    srand(seed);
    for (round = 0; round < 300; round++) {
        struct model m;
        struct qbm_bmap *bm;
        uint64_t chunk = 512u << (rand() % 3);
        int i;

        m.gran = 512ull << (rand() % 6);
        m.disk = (uint64_t)(rand() % 5000 + 1) * 512 + rand() % 512;
        m.nbits = (m.disk + m.gran - 1) / m.gran;
        m.bits = calloc(m.nbits + 1, 1);
        assert_int_equal(qbm_bmap_new(m.disk, m.gran, chunk, &bm), 0);
        random_ops(bm, &m, rand() % 20);
        if (round % 2) {
            /* Referenced chunks read and change like loaded ones. */
            chunks_to_refs(bm);
            check_against(bm, &m);
            random_ops(bm, &m, rand() % 4);
        }
        for (i = 0; i < 50; i++) {
            uint64_t k = (uint64_t)rand() % m.nbits;

            assert_int_equal(qbm_bmap_get(bm, k), m.bits[k]);
        }
        check_against(bm, &m);
        qbm_bmap_free(bm);
        free(m.bits);
    }
}

static void test_whole_chunk_becomes_ones(void **state)
{
    struct qbm_bmap *bm;
    uint64_t dirty;

    /* 512-byte chunks of 4096 bits at 512 B granularity: 2 MiB each. */
    assert_int_equal(qbm_bmap_new(5 << 20, 512, 512, &bm), 0);
    assert_int_equal(bm->nchunks, 3);
    assert_int_equal(qbm_bmap_set_range(bm, 1 << 20, 3 << 20), 0);
    assert_ptr_equal(bm->chunks[1], QBM_CHUNK_ONES);
    assert_non_null(bm->chunks[0]);
    assert_true(bm->chunks[0] != QBM_CHUNK_ONES);
    /* One byte marks its whole granule. */
    assert_int_equal(qbm_bmap_set_range(bm, 5 * (1 << 20) - 1, 1), 0);
    assert_true(qbm_bmap_get(bm, (5 << 20) / 512 - 1));
    assert_int_equal(qbm_bmap_dirty_bytes(bm, &dirty), 0);
    assert_int_equal(dirty, (3 << 20) + 512);
    qbm_bmap_free(bm);
}

/* ORing into a referenced chunk: a subset keeps the reference (nothing to
 * rewrite), anything new reads the chunk in and ORs. */
static void test_or_into_reference(void **state)
{
    uint8_t disk[512] = { 0 }, sub[512] = { 0 }, more[512] = { 0 };
    struct qbm_bmap *bm;
    struct qbm_io *io;

    disk[0] = 0x0f;
    disk[100] = 0x80;
    sub[0] = 0x03;
    more[1] = 0x01;
    assert_int_equal(qbm_bmap_new(1 << 21, 512, 512, &bm), 0);
    assert_int_equal(qbm_io_mem_open(disk, sizeof(disk), &io), 0);
    assert_int_equal(qbm_bmap_adopt_io(bm, io), 0);
    assert_int_equal(qbm_bmap_set_ref(bm, 0, io, 0), 0);
    assert_int_equal(qbm_bmap_or_chunk(bm, 0, sub), 0);
    assert_ptr_equal(bm->chunks[0], QBM_CHUNK_REF);
    assert_int_equal(qbm_bmap_get(bm, 3), 1);
    assert_int_equal(qbm_bmap_get(bm, 4), 0);
    assert_int_equal(qbm_bmap_or_chunk(bm, 0, more), 0);
    assert_true(bm->chunks[0] != QBM_CHUNK_REF);
    assert_int_equal(qbm_bmap_get(bm, 8), 1);
    assert_int_equal(qbm_bmap_get(bm, 807), 1);
    assert_int_equal(qbm_bmap_get(bm, 3), 1);
    /* A reference cannot replace a chunk that holds something. */
    assert_int_equal(qbm_bmap_set_ref(bm, 0, io, 0), -EINVAL);
    qbm_bmap_free(bm);
}

static void test_extent_state_bit_order(void **state)
{
    uint8_t chunk[512] = { 0 };
    struct collect c = { 0 };
    struct qbm_extent_state st = { 0 };

    /* Bits 1..3 of byte 2 (LSB first): bits 17..19. */
    chunk[2] = 0x0e;
    st.fn = collect;
    st.opaque = &c;
    st.granularity = 65536;
    st.disk_size = 1ull << 40;
    st.chunk_bytes = 512;
    st.bits_per_chunk = 4096;
    st.nbits = (1ull << 40) / 65536;
    assert_int_equal(qbm_extent_state_chunk(&st, 0, chunk), 0);
    /* All ones in the next chunk: merges with nothing before it. */
    assert_int_equal(qbm_extent_state_chunk(&st, 1, QBM_CHUNK_ONES), 0);
    assert_int_equal(qbm_extent_state_finish(&st), 0);
    assert_int_equal(c.n, 2);
    assert_int_equal(c.v[0][0], 17 * 65536);
    assert_int_equal(c.v[0][1], 3 * 65536);
    assert_int_equal(c.v[1][0], 4096ull * 65536);
    assert_int_equal(c.v[1][1], 4096ull * 65536);
    free(c.v);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_random_vs_model),
        cmocka_unit_test(test_whole_chunk_becomes_ones),
        cmocka_unit_test(test_or_into_reference),
        cmocka_unit_test(test_extent_state_bit_order),
    };

    return cmocka_run_group_tests(tests, NULL, NULL);
}
