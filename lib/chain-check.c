/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * Rules of a checkpoint that spans the layers of a backing chain, as
 * libvirt judges a bitmap before it uses it (docs/checkpoint-rules.md, R1
 * to R4): the top layer has a copy, the layers that have one form a single
 * run from the top down (it may end above the bottom), and every copy
 * records and is consistent. Also the backing loop check of a single
 * image. The rules are also what commit-bitmaps calls a gap (op-carry.c).
 */
#include <stdio.h>
#include <stdlib.h>

#include "internal.h"

size_t qbm_chain_rules(struct qbm_image *const *layers, size_t n,
                       const char *name, unsigned *rules)
{
    size_t origin = n, k;
    bool above = false;

    for (k = n; k-- > 0;) {
        if (qcow2_bitmap_lookup(layers[k], name)) {
            origin = k;
            break;
        }
    }
    for (k = 0; k < n; k++) {
        const struct qcow2_bitmap *bm;

        rules[k] = 0;
        if (origin == n || k > origin) {
            continue;
        }
        bm = qcow2_bitmap_lookup(layers[k], name);
        if (!bm) {
            rules[k] =
                QBM_CHAIN_BIT(above ? QBM_CHAIN_GAP : QBM_CHAIN_NOT_IN_TOP);
            continue;
        }
        above = true;
        if (!(bm->flags & BME_FLAG_AUTO)) {
            rules[k] |= QBM_CHAIN_BIT(QBM_CHAIN_DISABLED);
        }
        if (bm->flags & BME_FLAG_IN_USE) {
            rules[k] |= QBM_CHAIN_BIT(QBM_CHAIN_IN_USE);
        }
    }
    return origin;
}

static int chain_check(struct qbm_chain *chain, qbm_chain_rule_fn fn,
                       void *opaque)
{
    unsigned *rules = qbm_calloc(chain->n, sizeof(*rules));
    size_t l, k;
    uint32_t i;
    int r = 0, rule;

    if (!rules) {
        return -ENOMEM;
    }
    /* Each bitmap is judged once, from its deepest copy, so a layer that
     * lacks it under several layers that have it is still seen. */
    for (l = 0; l < chain->n && r == 0; l++) {
        struct qbm_image *img = chain->layers[l];

        for (i = 0; i < img->nb_bitmaps && r == 0; i++) {
            const char *name = img->bitmaps[i].name;

            if (qbm_chain_rules(chain->layers, chain->n, name, rules) != l) {
                continue; /* judged at the layer below */
            }
            for (k = 0; k <= l && r == 0; k++) {
                for (rule = QBM_CHAIN_NOT_IN_TOP;
                     rule <= QBM_CHAIN_IN_USE && r == 0; rule++) {
                    if (rules[k] & QBM_CHAIN_BIT(rule)) {
                        r = fn(opaque, rule, name, k, l);
                    }
                }
            }
        }
    }
    free(rules);
    return r;
}

/* The caller's callback: its non-zero value stops the walk with 1, kept
 * here to be returned, so it cannot be mistaken for an -errno. */
struct user_fn {
    qbm_chain_rule_fn rule_fn;
    qbm_problem_fn problem_fn;
    void *opaque;
    int ret;
};

static int user_rule(void *opaque, int rule, const char *bitmap, size_t layer,
                     size_t origin)
{
    struct user_fn *u = opaque;

    u->ret = u->rule_fn(u->opaque, rule, bitmap, layer, origin);
    return u->ret ? 1 : 0;
}

static int user_problem(void *opaque, int kind, uint64_t offset,
                        const char *message)
{
    struct user_fn *u = opaque;

    u->ret = u->problem_fn(u->opaque, kind, offset, message);
    return u->ret ? 1 : 0;
}

QBM_API int qbm_chain_check(struct qbm_chain *chain, qbm_chain_rule_fn fn,
                            void *opaque)
{
    struct user_fn u = { .rule_fn = fn, .opaque = opaque };
    int r;

    if (!chain || !fn) {
        return qbm_public_ret(qbm_err(EINVAL, "invalid arguments"));
    }
    r = chain_check(chain, user_rule, &u);
    return qbm_public_ret_cb(r, u.ret);
}

static int check_backing(struct qbm_image *img, qbm_problem_fn fn, void *opaque)
{
    struct qbm_chain *chain = NULL;
    int r;

    /* Only a file's backing names lead anywhere. */
    if (!img->hdr.backing_file || qbm_io_fd(img->io) < 0) {
        return 0;
    }
    /* The chain as QEMU would open it, without locks: only its shape
     * matters. A backing file that cannot be opened is no defect of this
     * image (a standalone incremental backup may name one that lives
     * elsewhere), but a loop is: QEMU cannot open the image at all. */
    r = qbm_impl_chain_open(img->filename, QBM_OPEN_FORCE_SHARE, &chain);
    qbm_impl_chain_close(chain);
    if (r == -ENOMEM) {
        return r;
    }
    if (r == -ELOOP) {
        char msg[1024];

        snprintf(msg, sizeof(msg), "%s", qbm_err_message());
        /* Rooted at the header's backing_file_offset field. */
        return fn(opaque, QBM_PROBLEM_CORRUPTION, QCOW2_HDR_BACKING_FILE_OFFSET,
                  msg);
    }
    return 0;
}

QBM_API int qbm_check_backing(struct qbm_image *img, qbm_problem_fn fn,
                              void *opaque)
{
    struct user_fn u = { .problem_fn = fn, .opaque = opaque };
    int r;

    if (!img || !fn) {
        return qbm_public_ret(qbm_err(EINVAL, "invalid arguments"));
    }
    r = check_backing(img, user_problem, &u);
    return qbm_public_ret_cb(r, u.ret);
}
