/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * Carrying bitmaps over a commit. `qemu-img commit` writes the data of the
 * layers above a base into it but keeps only the bitmaps the base already
 * has; this module decides which bitmaps of those layers go into the base,
 * with which granularity and state, and which must not: as libvirt after a
 * block commit (qemuBlockBitmapsHandleCommitFinish), a bitmap is carried
 * only when every copy from the top down to the base records and is
 * consistent and no layer among them lacks it (a gap: writes to that
 * layer are in no bitmap, and carrying the others into the base would
 * make the chain look whole).
 */
#include <stdlib.h>
#include <sys/stat.h>

#include "internal.h"

struct carry {
    struct qbm_image *base;
    struct qbm_chain *chain; /* TOP's chain, no locks: directories only */
    /* Every layer of TOP's chain as this operation sees it: the n above
     * BASE are read-locked ones of our own, then BASE (the caller's handle,
     * with its staged state), then the chain's. */
    struct qbm_image **layers;
    size_t n;             /* BASE's index in the chain */
    unsigned *rules;      /* qbm_chain_rules() of one bitmap */
    const char **skipped; /* bitmaps not carried for a gap (borrowed) */
    size_t nskipped;
    unsigned flags;
    qbm_carry_fn fn;
    void *opaque;
    int user_ret; /* the callback's value that stopped the call */
};

static bool same_inode(const char *a, const char *b)
{
    struct stat sa, sb;

    return stat(a, &sa) == 0 && stat(b, &sb) == 0 && sa.st_dev == sb.st_dev &&
           sa.st_ino == sb.st_ino;
}

static const char *layer_name(struct carry *c, size_t k)
{
    return k == c->n ? c->base->filename : c->chain->names[k];
}

/*
 * Whether layer k (at most BASE) is a gap of the bitmap whose rules are in
 * c->rules and whose topmost copy is `enabled`: what a commit merges into
 * BASE is layers 0..n, and a layer among them lacking the bitmap loses
 * its writes when it lies between two copies, or above the topmost copy
 * while that copy is enabled (it was recording, so the layers above
 * should have continued it, as libvirt requires). A disabled copy with
 * nothing above is a frozen checkpoint: no gap.
 */
static bool is_gap(struct carry *c, bool enabled, size_t k)
{
    /* Only the rules of a layer lacking the bitmap: the state of the
     * copies (disabled, in use) is no gap. */
    return (c->rules[k] & QBM_CHAIN_BIT(QBM_CHAIN_GAP)) ||
           ((c->rules[k] & QBM_CHAIN_BIT(QBM_CHAIN_NOT_IN_TOP)) && enabled);
}

/* Tell the caller; 1 when it says stop (its value kept in user_ret, so
 * that a negative one is not taken for an -errno). */
static int report(struct carry *c, int action, const char *name, size_t k)
{
    if (!c->fn) {
        return 0;
    }
    c->user_ret = c->fn(c->opaque, action, name, layer_name(c, k));
    if (c->user_ret) {
        qbm_err(ECANCELED, "stopped by the callback");
        return 1;
    }
    return 0;
}

/* Remember that `name` is not carried: decided at its first sight, as
 * BASE's copy of another bitmap staged since then would change the
 * rules. */
static int skip(struct carry *c, const char *name)
{
    const char **p = qbm_realloc(c->skipped, (c->nskipped + 1) * sizeof(*p));

    if (!p) {
        return -ENOMEM;
    }
    c->skipped = p;
    c->skipped[c->nskipped++] = name;
    return 0;
}

static bool skipped(struct carry *c, const char *name)
{
    size_t i;

    for (i = 0; i < c->nskipped; i++) {
        if (strcmp(c->skipped[i], name) == 0) {
            return true;
        }
    }
    return false;
}

/*
 * What keeps the bitmap whose rules are in c->rules from being carried,
 * as a set of QBM_CHAIN_BIT()s of layer k (at most BASE): a gap (unless
 * FILL_GAPS), a disabled copy (unless INCLUDE_DISABLED), a copy in use
 * (always: its bits are not known). What lies below BASE is no reason:
 * the commit does not touch it, a check of the chain still sees it, and a
 * copy carried whole stays right once that is repaired.
 */
static unsigned stops(struct carry *c, bool enabled, size_t k)
{
    unsigned why = c->rules[k] & QBM_CHAIN_BIT(QBM_CHAIN_IN_USE);

    if (is_gap(c, enabled, k) && !(c->flags & QBM_CARRY_FILL_GAPS)) {
        why |= QBM_CHAIN_BIT(QBM_CHAIN_GAP);
    }
    if (!(c->flags & QBM_CARRY_INCLUDE_DISABLED)) {
        why |= c->rules[k] & QBM_CHAIN_BIT(QBM_CHAIN_DISABLED);
    }
    return why;
}

/*
 * First sight of `name`, in layer t: create BASE's copy or set its state,
 * merge t's copy, and mark the clusters of every gap layer (FILL_GAPS).
 * A bitmap that stops() is only reported, layer by layer, and skipped.
 */
static int carry_first(struct carry *c, const char *name, size_t t)
{
    static const int actions[][2] = {
        { QBM_CHAIN_GAP, QBM_CARRY_GAP },
        { QBM_CHAIN_DISABLED, QBM_CARRY_DISABLED },
        { QBM_CHAIN_IN_USE, QBM_CARRY_IN_USE },
    };
    const struct qcow2_bitmap *src = qcow2_bitmap_lookup(c->layers[t], name);
    bool enabled = src->flags & BME_FLAG_AUTO, created = false;
    bool stopped = false;
    size_t k, a;
    int r = 0;

    /* Decided before BASE's copy is created, which would hide BASE's own
     * gap. */
    qbm_chain_rules(c->layers, c->chain->n, name, c->rules);
    for (k = 0; k <= c->n && r == 0; k++) {
        unsigned why = stops(c, enabled, k);

        stopped = stopped || why;
        for (a = 0; a < QBM_ARRAY_SIZE(actions) && r == 0; a++) {
            if (why & QBM_CHAIN_BIT(actions[a][0])) {
                r = report(c, actions[a][1], name, k);
            }
        }
    }
    if (r || stopped) {
        return r ? r : skip(c, name);
    }
    /* The topmost copy decides whether BASE's records writes from now
     * on. */
    if (!qcow2_bitmap_lookup(c->base, name)) {
        r = qbm_impl_bitmap_add(c->base, name, 1ull << src->granularity_bits,
                                enabled ? 0 : QBM_ADD_DISABLED);
        created = true;
    } else if (enabled) {
        r = qbm_impl_bitmap_enable(c->base, name);
    } else {
        r = qbm_impl_bitmap_disable(c->base, name);
    }
    r = r ? r : qbm_impl_bitmap_merge(c->base, name, c->layers[t], name);
    if (r < 0) {
        return qbm_err_prefix(r, "%s", c->base->filename);
    }
    r = report(c, created ? QBM_CARRY_COPIED : QBM_CARRY_MERGED, name, t);
    for (k = 0; r == 0 && k <= c->n; k++) {
        if (!is_gap(c, enabled, k)) {
            continue;
        }
        r = qbm_impl_bitmap_populate(c->base, name, c->layers[k]);
        if (r < 0) {
            r = qbm_err_prefix(r, "%s", c->base->filename);
        } else {
            r = report(c, QBM_CARRY_FILLED, name, k);
        }
    }
    return r;
}

/* Everything that can refuse the operation, before anything is staged
 * (a bitmap in use only keeps that bitmap from being carried). */
static int validate(struct carry *c)
{
    size_t l;

    for (l = 0; l < c->n; l++) {
        struct qbm_image *img = c->layers[l];

        if (img->hdr.size != c->base->hdr.size) {
            return qbm_err(EINVAL,
                           "%s: virtual size %llu differs from the "
                           "base's %llu",
                           img->filename, (unsigned long long)img->hdr.size,
                           (unsigned long long)c->base->hdr.size);
        }
    }
    return 0;
}

static int carry_bitmaps(struct carry *c)
{
    size_t l, k;
    uint32_t i;
    int r;

    for (l = 0; l < c->n; l++) {
        struct qbm_image *img = c->layers[l];

        for (i = 0; i < img->nb_bitmaps; i++) {
            const char *name = img->bitmaps[i].name;
            size_t t = l;

            for (k = 0; k < l; k++) {
                if (qcow2_bitmap_lookup(c->layers[k], name)) {
                    t = k;
                    break;
                }
            }
            if (t == l) {
                r = carry_first(c, name, l);
                if (r) {
                    return r;
                }
                continue;
            }
            if (skipped(c, name)) {
                continue; /* reported at its first sight */
            }
            r = qbm_impl_bitmap_merge(c->base, name, img, name);
            if (r < 0) {
                return qbm_err_prefix(r, "%s", c->base->filename);
            }
            r = report(c, QBM_CARRY_MERGED, name, l);
            if (r) {
                return r;
            }
        }
    }
    return 0;
}

/* MARK_WRITTEN: what the commit copies, in BASE's enabled bitmaps (an
 * in-use one is all dirty once repaired: left alone, and reported unless
 * it was already). */
static int mark_written(struct carry *c)
{
    uint32_t i;
    size_t l;
    int r;

    for (i = 0; i < c->base->nb_bitmaps; i++) {
        const char *name = c->base->bitmaps[i].name;

        if (!(c->base->bitmaps[i].flags & BME_FLAG_AUTO)) {
            continue;
        }
        if (!qbm_impl_bitmap_consistent(c->base, i)) {
            r = skipped(c, name) ? 0 : report(c, QBM_CARRY_IN_USE, name, c->n);
            if (r) {
                return r;
            }
            continue;
        }
        for (l = 0; l < c->n; l++) {
            r = qbm_impl_bitmap_populate(c->base, name, c->layers[l]);
            if (r < 0) {
                return qbm_err_prefix(r, "%s", c->base->filename);
            }
        }
        r = report(c, QBM_CARRY_MARKED, name, c->n);
        if (r) {
            return r;
        }
    }
    return 0;
}

static int carry_commit(struct carry *c, const char *top)
{
    size_t len, l;
    int r = 0;

    r = qbm_impl_chain_open(top, QBM_OPEN_FORCE_SHARE, &c->chain);
    if (r < 0) {
        return qbm_err_prefix(r, "%s", top);
    }
    len = c->chain->n;
    for (c->n = 1; c->n < len; c->n++) {
        if (same_inode(c->chain->names[c->n], c->base->filename)) {
            break;
        }
    }
    if (c->n == len) {
        return qbm_err(EINVAL, "%s: not in the backing chain of %s",
                       c->base->filename, top);
    }
    c->layers = qbm_calloc(len, sizeof(*c->layers));
    c->rules = c->layers ? qbm_calloc(len, sizeof(*c->rules)) : NULL;
    if (!c->rules) {
        return -ENOMEM;
    }
    c->layers[c->n] = c->base;
    for (l = c->n + 1; l < len; l++) {
        c->layers[l] = c->chain->layers[l];
    }
    /* Read locks on the layers whose bitmaps are copied: QEMU cannot
     * change them until BASE's edits are committed or dropped. */
    for (l = 0; l < c->n && r == 0; l++) {
        const char *name = c->chain->names[l];

        r = qbm_impl_open(name, 0, &c->layers[l]);
        if (r < 0) {
            r = qbm_err_prefix(r, "%s", name);
        }
    }
    r = r ? r : validate(c);
    r = r ? r : carry_bitmaps(c);
    if (r == 0 && (c->flags & QBM_CARRY_MARK_WRITTEN)) {
        r = mark_written(c);
    }
    return r;
}

QBM_API int qbm_carry_commit(struct qbm_image *base, const char *top,
                             unsigned flags, qbm_carry_fn fn, void *opaque)
{
    struct carry c = {
        base, NULL, NULL, 0, NULL, NULL, 0, flags, fn, opaque, 0
    };
    size_t l;
    int r;

    if (!base || !top || (flags & ~QBM_CARRY_MASK)) {
        return qbm_public_ret(qbm_err(EINVAL, "invalid arguments"));
    }
    r = carry_commit(&c, top);
    for (l = 0; c.layers && l < c.n; l++) {
        qbm_impl_close(c.layers[l]);
    }
    free(c.layers);
    free(c.rules);
    free(c.skipped);
    qbm_impl_chain_close(c.chain);
    if (r < 0) {
        return -1;
    }
    return r ? c.user_ret : 0;
}
