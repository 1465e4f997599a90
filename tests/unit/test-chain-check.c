/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * qbm_chain_check() and qbm_check_backing() on small chains written to a
 * temporary directory: the findings for chain shapes worked out by hand,
 * their order, a callback that stops, a backing loop, and every
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
#define MAX_LAYERS 6

static const char *layer_file(size_t i)
{
    static const char *const names[MAX_LAYERS] = { "l0", "l1", "l2", "l3",
                                                   "l4", "l5" };

    return names[i];
}

/*
 * A chain l0 (top) <- l1 <- ... with one character per layer, top first,
 * for each bitmap: "X" has it enabled, "x" disabled, "U" enabled and in
 * use, "u" disabled and in use, "-" not. shapes[b] is the shape of bitmap
 * "b<b>".
 */
static void make_chain(const char *const *shapes, size_t nbitmaps)
{
    size_t n = strlen(shapes[0]), i, b;
    char name[8];

    assert_true(n <= MAX_LAYERS);
    for (i = n; i-- > 0;) {
        tl_write_image(layer_file(i), SIZE,
                       i + 1 < n ? layer_file(i + 1) : NULL, 0);
    }
    for (b = 0; b < nbitmaps; b++) {
        snprintf(name, sizeof(name), "b%zu", b);
        for (i = 0; i < n; i++) {
            char c = shapes[b][i];

            if (c != '-') {
                tl_add_bitmap(layer_file(i), name, 65536, c == 'X' || c == 'U',
                              TL_CLEAN);
            }
        }
    }
    /* Last: an image with a bitmap in use takes no more edits. */
    for (b = 0; b < nbitmaps; b++) {
        snprintf(name, sizeof(name), "b%zu", b);
        for (i = 0; i < n; i++) {
            if (shapes[b][i] == 'U' || shapes[b][i] == 'u') {
                tl_set_in_use(layer_file(i), name);
            }
        }
    }
}

struct findings {
    char text[512];
    int stop; /* returned from every call when non-zero */
    size_t calls;
};

static int record(void *opaque, int rule, const char *bitmap, size_t layer,
                  size_t origin)
{
    struct findings *f = opaque;

    tl_appendf(f->text, sizeof(f->text), "%s%d:%s:%zu:%zu",
               f->text[0] ? " " : "", rule, bitmap, layer, origin);
    f->calls++;
    return f->stop;
}

/* The findings for `shapes`, as "rule:bitmap:layer:origin ...". */
static void findings_of(const char *const *shapes, size_t nbitmaps,
                        char *out, size_t len)
{
    struct findings f = { .text = "" };
    struct qbm_chain *ch;

    make_chain(shapes, nbitmaps);
    ch = qbm_chain_open(tl_path("l0"), 0);
    assert_non_null(ch);
    assert_int_equal(qbm_chain_check(ch, record, &f), 0);
    qbm_chain_close(ch);
    snprintf(out, len, "%s", f.text);
}

/* Rule numbers as the callback sees them. */
#define NOT_IN_TOP "1"
#define GAP "2"
#define DISABLED "3"
#define IN_USE "4"

static void test_shapes(void **state)
{
    static const struct {
        const char *shape, *want;
    } cases[] = {
        { "XXX", "" },
        { "X--", "" },   /* began in the top, run ends above the bottom */
        { "X", "" },
        { "x", DISABLED ":b0:0:0" }, /* even in the top alone */
        { "U", IN_USE ":b0:0:0" },
        { "u", DISABLED ":b0:0:0 " IN_USE ":b0:0:0" },
        { "X-X", GAP ":b0:1:2" },
        { "-XX", NOT_IN_TOP ":b0:0:2" },
        { "--X", NOT_IN_TOP ":b0:0:2 " NOT_IN_TOP ":b0:1:2" },
        /* frozen before the top: still not in the top, and disabled */
        { "-x-", NOT_IN_TOP ":b0:0:1 " DISABLED ":b0:1:1" },
        { "x-X", DISABLED ":b0:0:2 " GAP ":b0:1:2" },
        { "xX", DISABLED ":b0:0:1" },
        { "Xx", DISABLED ":b0:1:1" }, /* disabled in a backing layer */
        { "XXx-", DISABLED ":b0:2:2" },
        { "XU", IN_USE ":b0:1:1" },
        { "UXU", IN_USE ":b0:0:2 " IN_USE ":b0:2:2" },
        { "X-x-X", GAP ":b0:1:4 " DISABLED ":b0:2:4 " GAP ":b0:3:4" },
        { "-X--X", NOT_IN_TOP ":b0:0:4 " GAP ":b0:2:4 " GAP ":b0:3:4" },
    };
    char got[512];
    size_t i;

    for (i = 0; i < QBM_ARRAY_SIZE(cases); i++) {
        findings_of(&cases[i].shape, 1, got, sizeof(got));
        if (strcmp(got, cases[i].want) != 0) {
            fail_msg("shape %s: got '%s', want '%s'", cases[i].shape, got,
                     cases[i].want);
        }
        tl_dir_clean(state);
    }
}

/* By origin layer from the top down, then directory order, then layer,
 * then rule. */
static void test_order(void **state)
{
    static const char *const shapes[] = { "X--X", "--X-", "-X--", "u---",
                                          "x---" };
    char got[512];

    findings_of(shapes, 5, got, sizeof(got));
    assert_string_equal(got, DISABLED ":b3:0:0 " IN_USE ":b3:0:0 "
                        DISABLED ":b4:0:0 "
                        NOT_IN_TOP ":b2:0:1 "
                        NOT_IN_TOP ":b1:0:2 " NOT_IN_TOP ":b1:1:2 "
                        GAP ":b0:1:3 " GAP ":b0:2:3");
}

static void test_stop_and_refusals(void **state)
{
    static const char *const shape = "--X";
    struct findings f = { .text = "", .stop = -7 };
    struct qbm_chain *ch;

    make_chain(&shape, 1);
    ch = qbm_chain_open(tl_path("l0"), 0);
    assert_non_null(ch);
    /* The callback's own value comes back, even a negative one. */
    assert_int_equal(qbm_chain_check(ch, record, &f), -7);
    assert_int_equal(qbm_get_errno(), ECANCELED);
    assert_int_equal(f.calls, 1);
    assert_int_equal(qbm_chain_check(ch, NULL, NULL), -1);
    assert_int_equal(qbm_get_errno(), EINVAL);
    assert_int_equal(qbm_chain_check(NULL, record, &f), -1);
    assert_int_equal(qbm_get_errno(), EINVAL);
    qbm_chain_close(ch);
}

/* Every allocation of the call made to fail in turn: ENOMEM or the whole
 * answer, never part of it. */
static void test_check_allocation_failures(void **state)
{
    static const char *const shapes[] = { "X-x-X", "-X-X" };
    struct qbm_chain *ch;
    unsigned long n;
    char want[512];
    int succeeded = 0;

    findings_of(shapes, 2, want, sizeof(want));
    ch = qbm_chain_open(tl_path("l0"), 0);
    assert_non_null(ch);
    for (n = 1; n < 100 && !succeeded; n++) {
        struct findings f = { .text = "" };
        int r;

        qbm_alloc_fail_after(n);
        r = qbm_chain_check(ch, record, &f);
        qbm_alloc_fail_after(0);
        if (r < 0) {
            assert_int_equal(r, -1);
            assert_int_equal(qbm_get_errno(), ENOMEM);
            assert_int_equal(f.calls, 0);
        } else {
            assert_int_equal(r, 0);
            assert_string_equal(f.text, want);
            succeeded = 1;
        }
    }
    assert_true(succeeded);
    assert_true(n > 2);
    qbm_chain_close(ch);
}

struct problems {
    size_t n;
    int kind;
    uint64_t offset;
    char message[1024];
    int stop;
};

static int add_problem(void *opaque, int kind, uint64_t offset,
                       const char *message)
{
    struct problems *p = opaque;

    p->n++;
    p->kind = kind;
    p->offset = offset;
    snprintf(p->message, sizeof(p->message), "%s", message);
    return p->stop;
}

/* loop-a -> loop-b -> loop-a: reported once, at the backing_file_offset
 * field; a missing backing file and no backing file are no problem. */
static void test_backing(void **state)
{
    struct problems p = { 0 };
    struct qbm_image *img;
    char want[600];

    tl_write_image("loop-a", SIZE, "loop-b", 0);
    tl_write_image("loop-b", SIZE, "loop-a", 0);
    img = qbm_open(tl_path("loop-a"), 0);
    assert_non_null(img);
    assert_int_equal(qbm_check_backing(img, add_problem, &p), 0);
    assert_int_equal(p.n, 1);
    assert_int_equal(p.kind, QBM_PROBLEM_CORRUPTION);
    assert_int_equal(p.offset, 8);
    snprintf(want, sizeof(want), "backing chain loops: '%s' is also layer 0",
             tl_path("loop-a"));
    assert_string_equal(p.message, want);

    p.stop = 3;
    assert_int_equal(qbm_check_backing(img, add_problem, &p), 3);
    assert_int_equal(qbm_get_errno(), ECANCELED);
    assert_int_equal(qbm_check_backing(img, NULL, NULL), -1);
    assert_int_equal(qbm_get_errno(), EINVAL);
    qbm_close(img);

    tl_write_image("lost", SIZE, "nowhere", 0);
    tl_write_image("l0", SIZE, NULL, 0);
    p.n = 0;
    p.stop = 0;
    img = qbm_open(tl_path("lost"), 0);
    assert_non_null(img);
    assert_int_equal(qbm_check_backing(img, add_problem, &p), 0);
    qbm_close(img);
    img = qbm_open(tl_path("l0"), 0);
    assert_non_null(img);
    assert_int_equal(qbm_check_backing(img, add_problem, &p), 0);
    qbm_close(img);
    assert_int_equal(p.n, 0);
}

/* An allocation failure is an error, never a loop silently missed. */
static void test_backing_allocation_failures(void **state)
{
    struct qbm_image *img;
    unsigned long n;
    int succeeded = 0;

    tl_write_image("loop-a", SIZE, "loop-b", 0);
    tl_write_image("loop-b", SIZE, "loop-a", 0);
    img = qbm_open(tl_path("loop-a"), 0);
    assert_non_null(img);
    for (n = 1; n < 1000 && !succeeded; n++) {
        struct problems p = { 0 };
        int r;

        qbm_alloc_fail_after(n);
        r = qbm_check_backing(img, add_problem, &p);
        qbm_alloc_fail_after(0);
        if (r < 0) {
            assert_int_equal(r, -1);
            assert_int_equal(qbm_get_errno(), ENOMEM);
            assert_int_equal(p.n, 0);
        } else {
            assert_int_equal(r, 0);
            assert_int_equal(p.n, 1);
            assert_non_null(strstr(p.message, "backing chain loops"));
            succeeded = 1;
        }
    }
    assert_true(succeeded);
    assert_true(n > 5);
    qbm_close(img);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_teardown(test_shapes, tl_dir_clean),
        cmocka_unit_test_teardown(test_order, tl_dir_clean),
        cmocka_unit_test_teardown(test_stop_and_refusals, tl_dir_clean),
        cmocka_unit_test_teardown(test_check_allocation_failures, tl_dir_clean),
        cmocka_unit_test_teardown(test_backing, tl_dir_clean),
        cmocka_unit_test(test_backing_allocation_failures),
    };

    return cmocka_run_group_tests(tests, tl_dir_setup, tl_dir_teardown);
}
