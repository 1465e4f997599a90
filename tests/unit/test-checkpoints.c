/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * qbm_checkpoints_*() on small chains written to a temporary directory:
 * states, orphans and remedies for shapes worked out by hand, the order of
 * the remedies, redefinitions, refusals, a callback that stops, and every
 * allocation made to fail in turn.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <inttypes.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <cmocka.h>

#include "testlib.h"

#define SIZE (16u << 20)

struct out {
    char text[4096];
    int stop; /* returned from every call when non-zero */
    size_t calls;
};

#define put(o, ...) tl_appendf((o)->text, sizeof((o)->text), __VA_ARGS__)

static const char *base(const char *path)
{
    const char *s = path ? strrchr(path, '/') : NULL;

    return s ? s + 1 : path ? path : "-";
}

static int on_disk(void *opaque, const char *checkpoint, const char *target,
                   const char *bitmap, const char *image, int state,
                   const char *detail)
{
    struct out *o = opaque;

    put(o, "D %s %s %s %s %d\n", checkpoint, target, bitmap, base(image),
        state);
    o->calls++;
    return o->stop;
}

static int on_orphan(void *opaque, const char *target, const char *image,
                     size_t layer, const char *bitmap)
{
    struct out *o = opaque;

    put(o, "O %s %s %zu %s\n", target, base(image), layer, bitmap);
    o->calls++;
    return o->stop;
}

static int on_remedy(void *opaque, const struct qbm_remedy *m)
{
    struct out *o = opaque;
    size_t i;

    put(o, "R %d %s %s %s %s %s %" PRIu64, m->action,
        m->checkpoint ? m->checkpoint : "-", m->target ? m->target : "-",
        base(m->image), m->bitmap ? m->bitmap : "-",
        m->source ? m->source : "-", m->granularity);
    if (m->action == QBM_REMEDY_REDEFINE) {
        put(o, " parent=%s", m->parent ? m->parent : "-");
        for (i = 0; i < m->ndisks; i++) {
            put(o, " %s=%s", m->disk_targets[i],
                m->disk_bitmaps[i] ? m->disk_bitmaps[i] : "no");
        }
    }
    put(o, "\n");
    o->calls++;
    return o->stop;
}

/*
 * Disk vda: a (top) <- b <- c; vdb: d; vdc has no image.
 *   a: ck1 ck2 -ck3 old "bad name"   b: ck1 -ck2 ck3   c: ck1 ck4
 *   d: ck1 -ck5
 * ck1 covers vda, vdb; ck2, ck3 vda; ck4 vda (created before ck1... by
 * time: ck4 first); ck5 vdb; ck6 vdb (missing); ck7 vdc, vde (unchecked).
 */
struct fixture {
    struct qbm_chain *vda, *vdb;
    struct qbm_checkpoints *set;
};

static void build(struct fixture *f)
{
    static const char *const a[] = { "ck1", "ck2", "-ck3", "old",
                                     "bad name", NULL };
    static const char *const b[] = { "ck1", "-ck2", "ck3", NULL };
    static const char *const c[] = { "ck1", "ck4", NULL };
    static const char *const d[] = { "ck1", "-ck5", NULL };
    static const struct {
        const char *name, *parent;
        int64_t t;
        const char *disks[2][2];
    } cks[] = {
        { "ck4", NULL, 10, { { "vda", "ck4" } } },
        { "ck1", "ck4", 20, { { "vda", "ck1" }, { "vdb", "ck1" } } },
        { "ck2", "ck1", 30, { { "vda", "ck2" }, { "vdb", NULL } } },
        { "ck3", "ck2", 40, { { "vda", "ck3" } } },
        { "ck5", "ck3", 50, { { "vdb", "ck5" } } },
        { "ck6", "ck5", 60, { { "vdb", "ck6" } } },
        { "ck7", "ck6", 70, { { "vdc", "ck7" }, { "vde", "ck7" } } },
    };
    size_t i, j;

    tl_write_image("c", SIZE, NULL, 0);
    tl_write_image("b", SIZE, "c", 0);
    tl_write_image("a", SIZE, "b", 0);
    tl_write_image("d", SIZE, NULL, 0);
    tl_add_bitmaps("a", a);
    tl_add_bitmaps("b", b);
    tl_add_bitmaps("c", c);
    tl_add_bitmaps("d", d);
    f->vda = qbm_chain_open(tl_path("a"), 0);
    f->vdb = qbm_chain_open(tl_path("d"), 0);
    assert_non_null(f->vda);
    assert_non_null(f->vdb);
    f->set = qbm_checkpoints_new();
    assert_non_null(f->set);
    assert_int_equal(qbm_checkpoints_add_target(f->set, "vda", f->vda), 0);
    assert_int_equal(qbm_checkpoints_add_target(f->set, "vdb", f->vdb), 0);
    assert_int_equal(qbm_checkpoints_add_target(f->set, "vdc", NULL), 0);
    for (i = 0; i < QBM_ARRAY_SIZE(cks); i++) {
        assert_int_equal(qbm_checkpoints_add(f->set, cks[i].name,
                                             cks[i].parent, cks[i].t), 0);
        for (j = 0; j < 2 && cks[i].disks[j][0]; j++) {
            assert_int_equal(qbm_checkpoints_add_disk(f->set, cks[i].name,
                                                      cks[i].disks[j][0],
                                                      cks[i].disks[j][1]),
                             0);
        }
    }
}

static void unbuild(struct fixture *f)
{
    qbm_checkpoints_free(f->set);
    qbm_chain_close(f->vda);
    qbm_chain_close(f->vdb);
    tl_dir_clean(NULL);
}

/* Worked out by hand from the rules (qbm.h). */
static const char want_plain[] =
    /* ck4: in c only: not in the top (a, b lack it): broken, repaired. */
    "D ck4 vda ck4 a 2\n"
    "D ck1 vda ck1 a 0\n"
    "D ck1 vdb ck1 d 0\n"
    /* ck2: disabled in b, a later checkpoint (ck3) recorded there. */
    "D ck2 vda ck2 a 3\n"
    /* ck3: disabled in the top, nothing later on vda: deleted. */
    "D ck3 vda ck3 a 3\n"
    /* ck5: disabled in the top of vdb, ck6 later but missing: deleted. */
    "D ck5 vdb ck5 d 3\n"
    "D ck6 vdb ck6 d 1\n"
    "D ck7 vdc ck7 - 5\n"
    "D ck7 vde ck7 - 5\n"
    "O vda a 0 old\n"
    "O vda a 0 bad name\n"
    "R 2 ck4 vda a ck4 - 65536\n"
    "R 3 ck4 vda a ck4 - 0\n"
    "R 2 ck4 vda b ck4 - 65536\n"
    "R 3 ck4 vda b ck4 - 0\n"
    "R 4 ck2 vda b ck2 ck3 0\n"
    "R 5 ck2 vda b ck2 - 0\n"
    "R 7 ck3 - - - - 0\n"
    "R 6 ck3 vda a ck3 - 0\n"
    "R 6 ck3 vda b ck3 - 0\n"
    "R 7 ck5 - - - - 0\n"
    "R 6 ck5 vdb d ck5 - 0\n"
    "R 7 ck6 - - - - 0\n";

static void test_plan(void **state)
{
    struct fixture f;
    struct out o = { "" };
    char want[4096];

    build(&f);
    assert_int_equal(qbm_checkpoints_check(f.set, 0, on_disk, on_orphan,
                                           on_remedy, &o), 0);
    snprintf(want, sizeof(want), "%s%s%s", want_plain,
             "R 6 - vda a old - 0\n", "R 6 - vda a bad name - 0\n");
    assert_string_equal(o.text, want);
    unbuild(&f);
}

/* Redefinitions: "old" passes the rules on vda (in the top only, enabled):
 * redefined under the newest checkpoint kept (ck7: its disks are only
 * unchecked; ck3, ck5 and ck6 are deleted), covering vda alone; "bad name"
 * is no name libvirt takes: removed. */
static void test_redefine(void **state)
{
    struct fixture f;
    struct out o = { "" };
    char want[4096];

    build(&f);
    assert_int_equal(qbm_checkpoints_check(f.set, QBM_CHECKPOINTS_REDEFINE,
                                           on_disk, on_orphan, on_remedy,
                                           &o), 0);
    snprintf(want, sizeof(want), "%s%s%s", want_plain,
             "R 8 old - - - - 0 parent=ck7 vda=old vdb=no vdc=no\n",
             "R 6 - vda a bad name - 0\n");
    assert_string_equal(o.text, want);
    unbuild(&f);
}

static int ctime_of(void *opaque, const struct qbm_remedy *m)
{
    int64_t *t = opaque;

    if (m->action == QBM_REMEDY_REDEFINE) {
        *t = m->creation_time;
    }
    return 0;
}

static void test_redefine_time(void **state)
{
    struct fixture f;
    int64_t t = 0, before = (int64_t)time(NULL);

    build(&f);
    assert_int_equal(qbm_checkpoints_check(f.set, QBM_CHECKPOINTS_REDEFINE,
                                           NULL, NULL, ctime_of, &t), 0);
    assert_true(t >= before && t <= (int64_t)time(NULL));
    /* A kept checkpoint from the future pushes it after itself. */
    assert_int_equal(qbm_checkpoints_add(f.set, "late", NULL,
                                         before + 1000), 0);
    assert_int_equal(qbm_checkpoints_check(f.set, QBM_CHECKPOINTS_REDEFINE,
                                           NULL, NULL, ctime_of, &t), 0);
    assert_int_equal(t, before + 1001);
    unbuild(&f);
}

static void test_refusals_and_stop(void **state)
{
    struct fixture f;
    struct out o = { "", -5 };

    build(&f);
    assert_int_equal(qbm_checkpoints_add(f.set, "ck1", NULL, 0), -1);
    assert_int_equal(qbm_get_errno(), EEXIST);
    assert_int_equal(qbm_checkpoints_add(f.set, "", NULL, 0), -1);
    assert_int_equal(qbm_get_errno(), EINVAL);
    assert_int_equal(qbm_checkpoints_add_disk(f.set, "nope", "vda", "x"),
                     -1);
    assert_int_equal(qbm_get_errno(), ENOENT);
    assert_int_equal(qbm_checkpoints_add_disk(f.set, "ck1", "vda", "x"),
                     -1);
    assert_int_equal(qbm_get_errno(), EEXIST);
    assert_int_equal(qbm_checkpoints_add_target(f.set, "vda", NULL), -1);
    assert_int_equal(qbm_get_errno(), EEXIST);
    assert_int_equal(qbm_checkpoints_check(f.set, 2, NULL, NULL, NULL,
                                           NULL), -1);
    assert_int_equal(qbm_get_errno(), EINVAL);
    assert_int_equal(qbm_checkpoints_check(NULL, 0, NULL, NULL, NULL,
                                           NULL), -1);
    assert_int_equal(qbm_checkpoints_check(f.set, 0, on_disk, on_orphan,
                                           on_remedy, &o), -5);
    assert_int_equal(qbm_get_errno(), ECANCELED);
    assert_int_equal(o.calls, 1);
    qbm_checkpoints_free(NULL);
    unbuild(&f);
}

/* Every allocation of the calls made to fail in turn: ENOMEM or the whole
 * answer, never part of it. */
static void test_allocation_failures(void **state)
{
    struct fixture f;
    struct out ref = { "" };
    unsigned long n;
    int succeeded = 0;

    build(&f);
    assert_int_equal(qbm_checkpoints_check(f.set, QBM_CHECKPOINTS_REDEFINE,
                                           on_disk, on_orphan, on_remedy,
                                           &ref), 0);
    for (n = 1; n < 10000 && !succeeded; n++) {
        struct out o = { "" };
        int r;

        qbm_alloc_fail_after(n);
        r = qbm_checkpoints_check(f.set, QBM_CHECKPOINTS_REDEFINE, on_disk,
                                  on_orphan, on_remedy, &o);
        qbm_alloc_fail_after(0);
        if (r < 0) {
            assert_int_equal(r, -1);
            assert_int_equal(qbm_get_errno(), ENOMEM);
            assert_int_equal(o.calls, 0);
        } else {
            assert_int_equal(r, 0);
            assert_string_equal(o.text, ref.text);
            succeeded = 1;
        }
    }
    assert_true(succeeded);
    assert_true(n > 10);
    unbuild(&f);

    /* Building the set, likewise. */
    for (n = 1, succeeded = 0; n < 100 && !succeeded; n++) {
        struct qbm_checkpoints *set;
        int r = -1;

        qbm_alloc_fail_after(n);
        set = qbm_checkpoints_new();
        if (set) {
            r = qbm_checkpoints_add(set, "a", "p", 1);
            r = r ? r : qbm_checkpoints_add_disk(set, "a", "vda", "a");
            r = r ? r : qbm_checkpoints_add_target(set, "vda", NULL);
        }
        qbm_alloc_fail_after(0);
        if (r < 0) {
            assert_int_equal(qbm_get_errno(), ENOMEM);
        } else {
            succeeded = 1;
        }
        qbm_checkpoints_free(set);
    }
    assert_true(succeeded);
}

/* vda: a <- s, vdb: b <- s. ck1 covers vda only, with copies in a and s;
 * s's copy belongs to vda as well, so it is no orphan of vdb and is never
 * removed, while "x" in s, named by nothing, is an orphan of both disks
 * but is removed once. */
static void test_shared_backing(void **state)
{
    static const char *const s_bm[] = { "ck1", "x", NULL };
    static const char *const a_bm[] = { "ck1", NULL };
    struct qbm_chain *vda, *vdb;
    struct qbm_checkpoints *set;
    struct out o = { "" };

    tl_write_image("s", SIZE, NULL, 0);
    tl_write_image("a", SIZE, "s", 0);
    tl_write_image("b", SIZE, "s", 0);
    tl_add_bitmaps("s", s_bm);
    tl_add_bitmaps("a", a_bm);
    vda = qbm_chain_open(tl_path("a"), 0);
    vdb = qbm_chain_open(tl_path("b"), 0);
    assert_non_null(vda);
    assert_non_null(vdb);
    set = qbm_checkpoints_new();
    assert_non_null(set);
    assert_int_equal(qbm_checkpoints_add_target(set, "vda", vda), 0);
    assert_int_equal(qbm_checkpoints_add_target(set, "vdb", vdb), 0);
    assert_int_equal(qbm_checkpoints_add(set, "ck1", NULL, 1), 0);
    assert_int_equal(qbm_checkpoints_add_disk(set, "ck1", "vda", "ck1"), 0);
    assert_int_equal(qbm_checkpoints_check(set, 0, on_disk, on_orphan,
                                           on_remedy, &o), 0);
    assert_string_equal(o.text, "D ck1 vda ck1 a 0\n"
                                "O vda s 1 x\n"
                                "O vdb s 1 x\n"
                                "R 6 - vda s x - 0\n");
    qbm_checkpoints_free(set);
    qbm_chain_close(vda);
    qbm_chain_close(vdb);
    tl_dir_clean(NULL);
}

/* libvirt's checkpoint names, [A-Za-z0-9_-][A-Za-z0-9_.-]*, and nothing
 * else. */
static void test_name_valid(void **state)
{
    static const struct {
        const char *name;
        int valid;
    } cases[] = {
        { "ck1", 1 },      { "a.b", 1 }, { "_x", 1 },          { "-x", 1 },
        { "A-Z_0.9", 1 },  { "x.", 1 },  { ".x", 0 },          { "", 0 },
        { "bad name", 0 }, { "a/b", 0 }, { "caf\xc3\xa9", 0 }, { "a:b", 0 },
    };
    size_t i;

    for (i = 0; i < QBM_ARRAY_SIZE(cases); i++) {
        if (qbm_checkpoint_name_valid(cases[i].name) != cases[i].valid) {
            fail_msg("'%s': want %d", cases[i].name, cases[i].valid);
        }
    }
    assert_int_equal(qbm_checkpoint_name_valid(NULL), 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_plan),
        cmocka_unit_test(test_redefine),
        cmocka_unit_test(test_redefine_time),
        cmocka_unit_test(test_refusals_and_stop),
        cmocka_unit_test(test_allocation_failures),
        cmocka_unit_test(test_shared_backing),
        cmocka_unit_test(test_name_valid),
    };

    return cmocka_run_group_tests(tests, tl_dir_setup, tl_dir_teardown);
}
