/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* Typed growable arrays (lib/util-darray.h): growth, caps, overflow and
 * allocation failure, which must leave an array as it was. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "internal.h"

struct pair {
    uint64_t a, b;
};
QBM_DARRAY(pairs, struct pair);
QBM_DARRAY(bytes, uint8_t);

static void check_pairs(const struct pairs *p, size_t n)
{
    size_t i;

    assert_int_equal(p->n, n);
    assert_true(p->cap >= p->n);
    for (i = 0; i < n; i++) {
        assert_int_equal(p->v[i].a, i);
        assert_int_equal(p->v[i].b, ~(uint64_t)i);
    }
}

static void test_push_doubles(void **state)
{
    struct pairs p = { 0 };
    size_t i;

    /* The first allocation holds 4 KiB of elements, then it doubles. */
    for (i = 0; i < 5000; i++) {
        struct pair e = { i, ~(uint64_t)i };

        assert_int_equal(qbm_darray_push(&p, e, 0), 0);
        if (i == 0) {
            assert_int_equal(p.cap, 4096 / sizeof(struct pair));
        }
        if (i == 256) {
            assert_int_equal(p.cap, 512);
        }
    }
    check_pairs(&p, 5000);
    assert_int_equal(p.cap, 8192);
    assert_int_equal(qbm_darray_last(&p).a, 4999);
    qbm_darray_free(&p);
    assert_null(p.v);
    assert_int_equal(p.n, 0);
    assert_int_equal(p.cap, 0);
}

static void test_reserve_jump(void **state)
{
    struct bytes b = { 0 };

    assert_int_equal(qbm_darray_reserve(&b, 1, 0), 0);
    assert_int_equal(b.cap, 4096);
    b.n = 4096;
    memset(b.v, 0xab, b.n);
    /* More than twice the capacity: exactly what is needed. */
    assert_int_equal(qbm_darray_reserve(&b, 100000, 0), 0);
    assert_int_equal(b.cap, 104096);
    assert_int_equal(b.v[4095], 0xab);
    /* Room already there: nothing changes. */
    assert_int_equal(qbm_darray_reserve(&b, 100000, 0), 0);
    assert_int_equal(b.cap, 104096);
    b.n = b.cap;
    assert_int_equal(qbm_darray_reserve(&b, 1, 0), 0);
    assert_int_equal(b.cap, 2 * 104096);
    qbm_darray_free(&b);
}

static void test_cap(void **state)
{
    struct pairs p = { 0 };
    struct pair *v;
    size_t i;

    for (i = 0; i < 300; i++) {
        struct pair e = { i, ~(uint64_t)i };

        assert_int_equal(qbm_darray_push(&p, e, 300), 0);
    }
    /* Doubling from 256 stops at the cap. */
    assert_int_equal(p.cap, 300);
    v = p.v;
    {
        struct pair e = { 300, 0 };

        assert_int_equal(qbm_darray_push(&p, e, 300), -ENOMEM);
    }
    assert_int_equal(qbm_get_errno(), ENOMEM);
    assert_non_null(strstr(qbm_get_error(), "exceed 300 elements"));
    assert_ptr_equal(p.v, v);
    assert_int_equal(p.cap, 300);
    check_pairs(&p, 300);
    qbm_darray_free(&p);
}

static void test_overflow(void **state)
{
    struct pairs p = { 0 };
    struct bytes b = { 0 };

    /* SIZE_MAX elements of 16 bytes cannot be addressed: refused before
     * any allocation. */
    qbm_alloc_fail_after(1);
    assert_int_equal(qbm_darray_reserve(&p, SIZE_MAX, 0), -ENOMEM);
    assert_non_null(strstr(qbm_get_error(), "would exceed"));
    qbm_alloc_fail_after(0);
    assert_null(p.v);
    assert_int_equal(p.cap, 0);
    assert_int_equal(qbm_darray_reserve(&p, SIZE_MAX / 16 + 1, 0), -ENOMEM);
    assert_null(p.v);
    /* n + extra wraps around. */
    assert_int_equal(qbm_darray_reserve(&b, 10, 0), 0);
    b.n = 10;
    assert_int_equal(qbm_darray_reserve(&b, SIZE_MAX - 5, 0), -ENOMEM);
    assert_int_equal(qbm_get_errno(), ENOMEM);
    assert_int_equal(b.n, 10);
    assert_int_equal(b.cap, 4096);
    qbm_darray_free(&b);
}

static void test_alloc_failure(void **state)
{
    struct pairs p = { 0 };
    struct pair *v;
    size_t i;

    /* The first allocation fails: still empty. */
    qbm_alloc_fail_after(1);
    {
        struct pair e = { 0, ~(uint64_t)0 };

        assert_int_equal(qbm_darray_push(&p, e, 0), -ENOMEM);
    }
    qbm_alloc_fail_after(0);
    assert_int_equal(qbm_get_errno(), ENOMEM);
    assert_non_null(strstr(qbm_get_error(), "out of memory allocating"));
    assert_null(p.v);
    assert_int_equal(p.n, 0);
    assert_int_equal(p.cap, 0);

    /* A full array whose growth fails keeps its elements and storage. */
    for (i = 0; i < 256; i++) {
        struct pair e = { i, ~(uint64_t)i };

        assert_int_equal(qbm_darray_push(&p, e, 0), 0);
    }
    assert_int_equal(p.cap, 256);
    v = p.v;
    qbm_alloc_fail_after(1);
    {
        struct pair e = { 256, ~(uint64_t)256 };

        assert_int_equal(qbm_darray_push(&p, e, 0), -ENOMEM);
    }
    qbm_alloc_fail_after(0);
    assert_int_equal(qbm_get_errno(), ENOMEM);
    assert_ptr_equal(p.v, v);
    assert_int_equal(p.cap, 256);
    check_pairs(&p, 256);
    {
        struct pair e = { 256, ~(uint64_t)256 };

        assert_int_equal(qbm_darray_push(&p, e, 0), 0);
    }
    check_pairs(&p, 257);
    qbm_darray_free(&p);
}

/* Every allocation of a run of pushes fails in turn: each time the array
 * holds exactly what was pushed before the failure (and valgrind sees no
 * leak once it is freed). */
static void test_alloc_failure_loop(void **state)
{
    unsigned long fail;
    int succeeded = 0;

    for (fail = 1; !succeeded; fail++) {
        struct pairs p = { 0 };
        size_t i;
        int r = 0;

        qbm_alloc_fail_after(fail);
        for (i = 0; i < 3000 && r == 0; i++) {
            struct pair e = { i, ~(uint64_t)i };

            r = qbm_darray_push(&p, e, 0);
        }
        qbm_alloc_fail_after(0);
        if (r < 0) {
            assert_int_equal(r, -ENOMEM);
            check_pairs(&p, i - 1);
        } else {
            check_pairs(&p, 3000);
            succeeded = 1;
        }
        qbm_darray_free(&p);
    }
    /* 256, 512, ..., 4096: five allocations, the sixth countdown passes. */
    assert_int_equal(fail, 7);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_push_doubles),
        cmocka_unit_test(test_reserve_jump),
        cmocka_unit_test(test_cap),
        cmocka_unit_test(test_overflow),
        cmocka_unit_test(test_alloc_failure),
        cmocka_unit_test(test_alloc_failure_loop),
    };

    return cmocka_run_group_tests(tests, NULL, NULL);
}
