/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * Carrying bitmaps over a commit. `qemu-img commit` writes the data of the
 * layers above a base into it but keeps only the bitmaps the base already
 * has; this module decides which bitmaps of those layers go into the base,
 * with which granularity and state, and which must not because a layer of
 * the chain lacks them (a gap: writes to that layer are in no bitmap, and
 * carrying the others into the base would make the chain look whole).
 */
#include <stdlib.h>
#include <sys/stat.h>

#include "internal.h"

struct carry {
    struct qbm_image *base;
    struct qbm_chain *chain; /* TOP's chain, no locks: directories only */
    struct qbm_image **layers; /* the n layers above BASE, read-locked */
    size_t n;                  /* BASE's index in the chain */
    const char **skipped; /* bitmaps not carried for a gap (borrowed) */
    size_t nskipped;
    unsigned flags;
    qbm_carry_fn fn;
    void *opaque;
};

static bool same_inode(const char *a, const char *b)
{
    struct stat sa, sb;

    return stat(a, &sa) == 0 && stat(b, &sb) == 0 &&
           sa.st_dev == sb.st_dev && sa.st_ino == sb.st_ino;
}

/* Layer k of TOP's chain as this operation sees it: BASE is the caller's
 * handle (with its staged state), the layers above are our locked ones. */
static struct qbm_image *layer(struct carry *c, size_t k)
{
    if (k < c->n) {
        return c->layers[k];
    }
    return k == c->n ? c->base : c->chain->layers[k];
}

static const char *layer_name(struct carry *c, size_t k)
{
    return k == c->n ? c->base->filename : c->chain->names[k];
}

/*
 * Whether layer k is a gap of bitmap `name`, whose topmost copy is in
 * layer t (a layer above BASE). What a commit merges into BASE is layers
 * 0..n; a layer k among them lacking the bitmap loses its writes when
 * k lies between two copies (t < k, and the bitmap is in a layer below
 * k), or when k is above t and t's copy is enabled (it was recording,
 * so the layers above should have continued it, as libvirt requires).
 * A disabled copy with nothing above is a frozen checkpoint: no gap.
 */
static bool is_gap(struct carry *c, const char *name, size_t t, size_t k)
{
    size_t len = c->chain->n, j;

    if (qcow2_bitmap_lookup(layer(c, k), name)) {
        return false;
    }
    if (k < t) {
        return qcow2_bitmap_lookup(layer(c, t), name)->flags & BME_FLAG_AUTO;
    }
    for (j = k + 1; j < len; j++) {
        if (qcow2_bitmap_lookup(layer(c, j), name)) {
            return true;
        }
    }
    return false;
}

static int report(struct carry *c, int action, const char *name, size_t k)
{
    int r;

    if (!c->fn) {
        return 0;
    }
    r = c->fn(c->opaque, action, name, layer_name(c, k));
    if (r) {
        qbm_err(ECANCELED, "stopped by the callback");
    }
    return r;
}

/* Remember that `name` is not carried: decided at its first sight, as
 * BASE's copy of another bitmap staged since then would change what
 * is_gap() sees. */
static int skip(struct carry *c, const char *name)
{
    const char **p = qbm_realloc(c->skipped,
                                 (c->nskipped + 1) * sizeof(*p));

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
 * First sight of `name`, in layer t: create BASE's copy or set its state,
 * merge t's copy, and mark the clusters of every gap layer (FILL_GAPS).
 * Without FILL_GAPS a bitmap with a gap is only reported, layer by layer.
 */
static int carry_first(struct carry *c, const char *name, size_t t)
{
    const struct qcow2_bitmap *src = qcow2_bitmap_lookup(c->layers[t], name);
    bool enabled = src->flags & BME_FLAG_AUTO, created = false;
    bool fill = c->flags & QBM_CARRY_FILL_GAPS, gap = false;
    bool *gaps;
    size_t k;
    int r = 0;

    /* Decided before BASE's copy is created, which would hide BASE's own
     * gap from is_gap(). */
    gaps = qbm_calloc(c->n + 1, sizeof(*gaps));
    if (!gaps) {
        return -ENOMEM;
    }
    for (k = 0; k <= c->n && r == 0; k++) {
        gaps[k] = is_gap(c, name, t, k);
        gap = gap || gaps[k];
        if (gaps[k] && !fill) {
            r = report(c, QBM_CARRY_GAP, name, k);
        }
    }
    if (r || (gap && !fill)) {
        free(gaps);
        return r ? r : skip(c, name);
    }
    /* The topmost copy decides whether BASE's records writes from now
     * on. */
    if (!qcow2_bitmap_lookup(c->base, name)) {
        r = qbm_impl_bitmap_add(c->base, name,
                                1ull << src->granularity_bits,
                                enabled ? 0 : QBM_ADD_DISABLED);
        created = true;
    } else if (enabled) {
        r = qbm_impl_bitmap_enable(c->base, name);
    } else {
        r = qbm_impl_bitmap_disable(c->base, name);
    }
    r = r ? r : qbm_impl_bitmap_merge(c->base, name, c->layers[t], name);
    if (r < 0) {
        free(gaps);
        return qbm_err_prefix(r, "%s", c->base->filename);
    }
    r = report(c, created ? QBM_CARRY_COPIED : QBM_CARRY_MERGED, name, t);
    for (k = 0; r == 0 && k <= c->n; k++) {
        if (!gaps[k]) {
            continue;
        }
        r = qbm_impl_bitmap_populate(c->base, name, layer(c, k));
        if (r < 0) {
            r = qbm_err_prefix(r, "%s", c->base->filename);
        } else {
            r = report(c, QBM_CARRY_FILLED, name, k);
        }
    }
    free(gaps);
    return r;
}

/* Everything that can refuse the operation, before anything is staged. */
static int validate(struct carry *c)
{
    size_t l;
    uint32_t i;

    for (l = 0; l < c->n; l++) {
        struct qbm_image *img = c->layers[l];

        if (img->hdr.size != c->base->hdr.size) {
            return qbm_err(EINVAL, "%s: virtual size %llu differs from the "
                           "base's %llu", img->filename,
                           (unsigned long long)img->hdr.size,
                           (unsigned long long)c->base->hdr.size);
        }
        for (i = 0; i < img->nb_bitmaps; i++) {
            if (!qbm_impl_bitmap_consistent(img, i)) {
                return qbm_err(EBUSY, "%s: bitmap '%s' is in use; repair "
                               "it first with 'qbm check --repair'",
                               img->filename, img->bitmaps[i].name);
            }
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

/* MARK_WRITTEN: what the commit copies, in BASE's enabled bitmaps. */
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
    c->layers = qbm_calloc(c->n, sizeof(*c->layers));
    if (!c->layers) {
        return -ENOMEM;
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
    struct carry c = { base, NULL, NULL, 0, NULL, 0, flags, fn, opaque };
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
    free(c.skipped);
    qbm_impl_chain_close(c.chain);
    return r < 0 ? -1 : r;
}
