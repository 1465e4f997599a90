/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * Fuzz harness: the first bytes of the input are a program of edits, the
 * rest is an image. The image is opened read-write in memory, the edits
 * are staged and committed, and the result is reopened. Invariants: a
 * commit that succeeds leaves an image that opens, lists exactly the
 * bitmaps the edits staged, and has no corruption if it had none before
 * (leaks are allowed only where the input already leaked).
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fuzz-common.h"
#include "internal.h"

#define PROGRAM 16

static int count_problem(void *opaque, int kind, uint64_t off,
                         const char *msg)
{
    uint64_t *counts = opaque;

    counts[kind & 3]++;
    return 0;
}

static void problems(struct qbm_image *img, uint64_t counts[4])
{
    memset(counts, 0, 4 * sizeof(counts[0]));
    if (qbm_check(img, count_problem, counts) < 0) {
        counts[1]++; /* could not check: treat as corrupt */
    }
}

static void apply(struct qbm_image *img, const uint8_t *p)
{
    size_t n = qbm_bitmap_count(img);
    const char *first = n ? qbm_bitmap_name(img, 0) : "none";
    const char *last = n ? qbm_bitmap_name(img, n - 1) : "none";
    char name[8];

    snprintf(name, sizeof(name), "f%u", p[1] % 16);
    switch (p[0] % 9) {
    case 0:
        qbm_bitmap_add(img, name, 512ull << (p[1] % 12), p[1] & 0x80 ? 1 : 0);
        break;
    case 1:
        qbm_bitmap_remove(img, first);
        break;
    case 2:
        qbm_bitmap_clear(img, last);
        break;
    case 3:
        qbm_bitmap_enable(img, first);
        break;
    case 4:
        qbm_bitmap_disable(img, last);
        break;
    case 5:
        qbm_bitmap_rename(img, first, name);
        break;
    case 6:
        qbm_bitmap_merge(img, first, img, last);
        break;
    case 7:
        qbm_bitmap_set_dirty(img, last,
                             (uint64_t)p[1] << 20, (uint64_t)(p[0] | 1) << 12);
        break;
    default:
        qbm_bitmap_populate(img, first, img);
        break;
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct qbm_image *img, *again;
    uint64_t before[4], after[4];
    const uint8_t *bytes;
    char **names = NULL;
    size_t len, n, i;
    int r;

    if (size < PROGRAM || size > (8u << 20)) {
        return 0;
    }
    img = qbm_open_memory(data + PROGRAM, size - PROGRAM, "fuzz",
                          QBM_OPEN_RDWR);
    if (!img) {
        return 0;
    }
    problems(img, before);
    for (i = 0; i + 1 < PROGRAM; i += 2) {
        apply(img, data + i);
    }
    n = qbm_bitmap_count(img);
    names = calloc(n + 1, sizeof(*names));
    for (i = 0; names && i < n; i++) {
        names[i] = strdup(qbm_bitmap_name(img, i));
    }
    r = qbm_commit(img);
    if (r == 0 && names) {
        bytes = qbm_io_mem_data(img->io, &len);
        again = qbm_open_memory(bytes, len, "fuzz-again", 0);
        CHECK(again != NULL);
        CHECK(qbm_bitmap_count(again) == n);
        for (i = 0; i < n; i++) {
            CHECK(qbm_bitmap_find(again, names[i]) >= 0);
        }
        problems(again, after);
        CHECK(before[QBM_PROBLEM_CORRUPTION] ||
              !after[QBM_PROBLEM_CORRUPTION]);
        CHECK(before[QBM_PROBLEM_CORRUPTION] || before[QBM_PROBLEM_LEAK] ||
              !after[QBM_PROBLEM_LEAK]);
        qbm_close(again);
    }
    for (i = 0; names && i < n; i++) {
        free(names[i]);
    }
    free(names);
    qbm_close(img);
    return 0;
}
