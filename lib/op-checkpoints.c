/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * The checkpoints of a libvirt domain against its disks' chains: the state
 * of each checkpoint disk under libvirt's rules (qbm_chain_rules), the
 * bitmaps no checkpoint names, and the steps that repair each problem, or
 * delete what cannot be repaired (docs/checkpoint-rules.md). Only the
 * policy: the caller reads libvirt's XML and opens the chains, and carries
 * out the steps.
 */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#include "internal.h"

struct ckpt_disk {
    char *target;
    char *bitmap; /* NULL: checkpoint='no' */
};

struct ckpt {
    char *name;
    char *parent;
    int64_t ctime;
    struct ckpt_disk *disks;
    size_t ndisks;
    bool deleted; /* cannot be repaired */
};

struct ckpt_target {
    char *target;
    struct qbm_chain *chain; /* borrowed; NULL: no image */
};

struct qbm_checkpoints {
    struct ckpt *cks;
    size_t n;
    struct ckpt_target *targets;
    size_t ntargets;
};

/* Grow *p (of *n elements of `size` bytes) by one zeroed element. */
static int grow(void *p, size_t *n, size_t size)
{
    void **arr = p;
    char *q = qbm_realloc(*arr, (*n + 1) * size);

    if (!q) {
        return -ENOMEM;
    }
    memset(q + *n * size, 0, size);
    *arr = q;
    (*n)++;
    return 0;
}

static char *dup_or_null(const char *s, bool *failed)
{
    char *d;

    if (!s) {
        return NULL;
    }
    d = qbm_strndup(s, strlen(s));
    if (!d) {
        *failed = true;
    }
    return d;
}

static struct ckpt *find_ckpt(struct qbm_checkpoints *set, const char *name)
{
    size_t i;

    for (i = 0; i < set->n; i++) {
        if (strcmp(set->cks[i].name, name) == 0) {
            return &set->cks[i];
        }
    }
    return NULL;
}

static struct ckpt_target *find_target(struct qbm_checkpoints *set,
                                       const char *target)
{
    size_t i;

    for (i = 0; i < set->ntargets; i++) {
        if (strcmp(set->targets[i].target, target) == 0) {
            return &set->targets[i];
        }
    }
    return NULL;
}

QBM_API struct qbm_checkpoints *qbm_checkpoints_new(void)
{
    return qbm_calloc(1, sizeof(struct qbm_checkpoints));
}

QBM_API void qbm_checkpoints_free(struct qbm_checkpoints *set)
{
    size_t i, j;

    if (!set) {
        return;
    }
    for (i = 0; i < set->n; i++) {
        for (j = 0; j < set->cks[i].ndisks; j++) {
            free(set->cks[i].disks[j].target);
            free(set->cks[i].disks[j].bitmap);
        }
        free(set->cks[i].disks);
        free(set->cks[i].name);
        free(set->cks[i].parent);
    }
    for (i = 0; i < set->ntargets; i++) {
        free(set->targets[i].target);
    }
    free(set->cks);
    free(set->targets);
    free(set);
}

static int ckpt_add(struct qbm_checkpoints *set, const char *name,
                    const char *parent, int64_t ctime)
{
    bool failed = false;
    char *n, *p;
    int r;

    if (!*name) {
        return qbm_err(EINVAL, "empty checkpoint name");
    }
    if (find_ckpt(set, name)) {
        return qbm_err(EEXIST, "checkpoint '%s' is listed twice", name);
    }
    n = dup_or_null(name, &failed);
    p = dup_or_null(parent, &failed);
    r = failed ? -ENOMEM : grow(&set->cks, &set->n, sizeof(*set->cks));
    if (r < 0) {
        free(n);
        free(p);
        return r;
    }
    set->cks[set->n - 1].name = n;
    set->cks[set->n - 1].parent = p;
    set->cks[set->n - 1].ctime = ctime;
    return 0;
}

QBM_API int qbm_checkpoints_add(struct qbm_checkpoints *set, const char *name,
                                const char *parent, int64_t creation_time)
{
    if (!set || !name) {
        return qbm_public_ret(qbm_err(EINVAL, "invalid arguments"));
    }
    return qbm_public_ret(ckpt_add(set, name, parent, creation_time));
}

static int ckpt_add_disk(struct qbm_checkpoints *set, const char *checkpoint,
                         const char *target, const char *bitmap)
{
    struct ckpt *ck = find_ckpt(set, checkpoint);
    bool failed = false;
    char *t, *b;
    size_t i;
    int r;

    if (!ck) {
        return qbm_err(ENOENT, "no checkpoint '%s'", checkpoint);
    }
    for (i = 0; i < ck->ndisks; i++) {
        if (strcmp(ck->disks[i].target, target) == 0) {
            return qbm_err(EEXIST, "checkpoint '%s' lists disk '%s' twice",
                           checkpoint, target);
        }
    }
    t = dup_or_null(target, &failed);
    b = dup_or_null(bitmap, &failed);
    r = failed ? -ENOMEM : grow(&ck->disks, &ck->ndisks, sizeof(*ck->disks));
    if (r < 0) {
        free(t);
        free(b);
        return r;
    }
    ck->disks[ck->ndisks - 1].target = t;
    ck->disks[ck->ndisks - 1].bitmap = b;
    return 0;
}

QBM_API int qbm_checkpoints_add_disk(struct qbm_checkpoints *set,
                                     const char *checkpoint, const char *target,
                                     const char *bitmap)
{
    if (!set || !checkpoint || !target || (bitmap && !*bitmap)) {
        return qbm_public_ret(qbm_err(EINVAL, "invalid arguments"));
    }
    return qbm_public_ret(ckpt_add_disk(set, checkpoint, target, bitmap));
}

static int ckpt_add_target(struct qbm_checkpoints *set, const char *target,
                           struct qbm_chain *chain)
{
    bool failed = false;
    char *t;
    int r;

    if (find_target(set, target)) {
        return qbm_err(EEXIST, "disk '%s' is listed twice", target);
    }
    t = dup_or_null(target, &failed);
    r = failed ? -ENOMEM
               : grow(&set->targets, &set->ntargets, sizeof(*set->targets));
    if (r < 0) {
        free(t);
        return r;
    }
    set->targets[set->ntargets - 1].target = t;
    set->targets[set->ntargets - 1].chain = chain;
    return 0;
}

QBM_API int qbm_checkpoints_add_target(struct qbm_checkpoints *set,
                                       const char *target,
                                       struct qbm_chain *chain)
{
    if (!set || !target || !*target) {
        return qbm_public_ret(qbm_err(EINVAL, "invalid arguments"));
    }
    return qbm_public_ret(ckpt_add_target(set, target, chain));
}

/* ---- evaluation ---------------------------------------------------------- */

/* A growing string; `failed` once an allocation failed. */
struct text {
    char *p;
    size_t len;
    bool failed;
};

static void text_add(struct text *t, const char *fmt, ...) QBM_PRINTF(2, 3);

static void text_add(struct text *t, const char *fmt, ...)
{
    va_list ap;
    char *q;
    int n;

    if (t->failed) {
        return;
    }
    va_start(ap, fmt);
    n = vsnprintf(NULL, 0, fmt, ap);
    va_end(ap);
    q = n < 0 ? NULL : qbm_realloc(t->p, t->len + (size_t)n + 1);
    if (!q) {
        t->failed = true;
        return;
    }
    t->p = q;
    va_start(ap, fmt);
    vsnprintf(t->p + t->len, (size_t)n + 1, fmt, ap);
    va_end(ap);
    t->len += (size_t)n;
}

/* The judgement of one checkpoint disk. */
struct verdict {
    const struct ckpt *ck;
    const struct ckpt_disk *disk;
    const struct ckpt_target *tg; /* NULL: no such disk */
    int state;
    char *detail;
    unsigned *rules; /* qbm_chain_rules(), one per layer */
};

/* A remedy with the strings it points to borrowed from the set and its
 * chains, or owned (redefinitions' arrays). */
struct plan {
    struct qbm_remedy *r;
    size_t n;
};

struct eval {
    struct qbm_checkpoints *set;
    unsigned flags;
    size_t *order; /* checkpoints by creation time, then name */
    struct verdict *v;
    size_t nv;
    struct plan plan;
};

static int by_time(const void *a, const void *b, void *opaque)
{
    const struct ckpt *cks = opaque;
    const struct ckpt *x = &cks[*(const size_t *)a];
    const struct ckpt *y = &cks[*(const size_t *)b];

    if (x->ctime != y->ctime) {
        return x->ctime < y->ctime ? -1 : 1;
    }
    return strcmp(x->name, y->name);
}

static const struct qcow2_bitmap *copy_in(const struct verdict *v, size_t k)
{
    return qcow2_bitmap_lookup(v->tg->chain->layers[k], v->disk->bitmap);
}

/* Whether layer k of v's chain can hold a bitmap added by qbm. */
static bool can_hold(const struct verdict *v, size_t k)
{
    const struct qbm_image *img = v->tg->chain->layers[k];

    return !img->raw && img->hdr.version >= 3;
}

/*
 * Whether a later checkpoint (in creation order) records v's disk with a
 * recording copy in layer k: then the writes since v's copy stopped are in
 * that later bitmap, if v's stopped when it began (libvirt before 6.5).
 * With `sources`, instead call add_source for every later copy in layer k.
 */
static int later_copies(struct eval *e, const struct verdict *v, size_t k,
                        bool *ret_recording,
                        int (*add_source)(struct eval *, const struct verdict *,
                                          size_t, const char *))
{
    const struct ckpt *cks = e->set->cks;
    bool after = false, recording = false;
    size_t i, j;
    int r;

    for (i = 0; i < e->set->n; i++) {
        const struct ckpt *ck = &cks[e->order[i]];

        if (ck == v->ck) {
            after = true;
            continue;
        }
        if (!after) {
            continue;
        }
        for (j = 0; j < ck->ndisks; j++) {
            const struct ckpt_disk *d = &ck->disks[j];
            const struct qcow2_bitmap *bm;

            if (!d->bitmap || strcmp(d->target, v->disk->target) != 0 ||
                strcmp(d->bitmap, v->disk->bitmap) == 0) {
                continue;
            }
            bm = qcow2_bitmap_lookup(v->tg->chain->layers[k], d->bitmap);
            if (!bm) {
                continue;
            }
            if (bm->flags & BME_FLAG_AUTO) {
                recording = true;
            }
            if (add_source) {
                r = add_source(e, v, k, d->bitmap);
                if (r < 0) {
                    return r;
                }
            }
        }
    }
    if (ret_recording) {
        *ret_recording = recording;
    }
    return 0;
}

static const char *layer_name(const struct verdict *v, size_t k)
{
    return v->tg->chain->names[k];
}

/* Judge one checkpoint disk: state, detail, and whether it can be
 * repaired (else its checkpoint is deleted). */
static int judge(struct eval *e, struct verdict *v)
{
    struct text t = { 0 };
    size_t n, k, origin;
    bool repairable = true;
    int state = QBM_CHECKPOINT_OK;

    if (!v->tg || !v->tg->chain) {
        v->state = QBM_CHECKPOINT_UNCHECKED;
        text_add(&t,
                 v->tg ? "disk '%s' has no image to read"
                       : "the domain has no disk '%s'",
                 v->disk->target);
        v->detail = t.p;
        return t.failed ? -ENOMEM : 0;
    }
    n = v->tg->chain->n;
    v->rules = qbm_calloc(n, sizeof(*v->rules));
    if (!v->rules) {
        return -ENOMEM;
    }
    origin =
        qbm_chain_rules(v->tg->chain->layers, n, v->disk->bitmap, v->rules);
    if (origin == n) {
        v->state = QBM_CHECKPOINT_MISSING;
        text_add(&t, "no layer of the chain of %s has it", layer_name(v, 0));
        v->detail = t.p;
        return t.failed ? -ENOMEM : 0;
    }
    for (k = 0; k <= origin; k++) {
        unsigned rules = v->rules[k];
        const char *sep = t.len ? "; " : "";

        if (rules & QBM_CHAIN_BIT(QBM_CHAIN_NOT_IN_TOP)) {
            text_add(&t, "%s%slayer %zu (%s) lacks it", sep,
                     k == 0 ? "not in the top layer: " : "", k,
                     layer_name(v, k));
        } else if (rules & QBM_CHAIN_BIT(QBM_CHAIN_GAP)) {
            text_add(&t, "%sgap at layer %zu (%s)", sep, k, layer_name(v, k));
        }
        if (rules & (QBM_CHAIN_BIT(QBM_CHAIN_NOT_IN_TOP) |
                     QBM_CHAIN_BIT(QBM_CHAIN_GAP))) {
            state = QBM_CHECKPOINT_BROKEN;
            if (!can_hold(v, k)) {
                text_add(&t, ", which cannot hold bitmaps");
                repairable = false;
            }
        }
        if (rules & QBM_CHAIN_BIT(QBM_CHAIN_DISABLED)) {
            text_add(&t, "%sdisabled in layer %zu (%s)", t.len ? "; " : "", k,
                     layer_name(v, k));
            if (state == QBM_CHECKPOINT_OK) {
                state = QBM_CHECKPOINT_INACTIVE;
            }
            /* In the top and consistent: it missed the writes since it
             * stopped, unless a later checkpoint recorded them. An in-use
             * copy becomes all dirty first, which covers everything. */
            if (k == 0 && !(rules & QBM_CHAIN_BIT(QBM_CHAIN_IN_USE))) {
                bool recording;
                int r = later_copies(e, v, 0, &recording, NULL);

                if (r < 0) {
                    free(t.p);
                    return r;
                }
                if (!recording) {
                    text_add(&t, ", and no later checkpoint recorded the "
                                 "writes since it stopped");
                    repairable = false;
                }
            }
        }
        if (rules & QBM_CHAIN_BIT(QBM_CHAIN_IN_USE)) {
            text_add(&t, "%sin use in layer %zu (%s)", t.len ? "; " : "", k,
                     layer_name(v, k));
            if (state != QBM_CHECKPOINT_BROKEN) {
                state = QBM_CHECKPOINT_INCONSISTENT;
            }
        }
    }
    if (t.failed) {
        free(t.p);
        return -ENOMEM;
    }
    v->state = state;
    v->detail = t.p;
    if (!repairable) {
        ((struct ckpt *)v->ck)->deleted = true;
    }
    return 0;
}

/* ---- the plan ------------------------------------------------------------ */

static bool same_step(const struct qbm_remedy *a, const struct qbm_remedy *b)
{
#define SAME(f) ((!a->f && !b->f) || (a->f && b->f && !strcmp(a->f, b->f)))
    if (a->action != b->action) {
        return false;
    }
    /* One repair of an image repairs every bitmap in it. */
    if (a->action == QBM_REMEDY_REPAIR) {
        return SAME(image);
    }
    return SAME(image) && SAME(bitmap) && SAME(source) && SAME(checkpoint);
#undef SAME
}

/* Append a step, unless the same one is planned already (two disks may
 * share a backing file). */
static int plan_add(struct eval *e, const struct qbm_remedy *step)
{
    size_t i;
    int r;

    if (step->action != QBM_REMEDY_REDEFINE) {
        for (i = 0; i < e->plan.n; i++) {
            if (same_step(&e->plan.r[i], step)) {
                return 0;
            }
        }
    }
    r = grow(&e->plan.r, &e->plan.n, sizeof(*e->plan.r));
    if (r < 0) {
        return r;
    }
    e->plan.r[e->plan.n - 1] = *step;
    return 0;
}

static int image_step(struct eval *e, int action, const struct verdict *v,
                      size_t k, const char *bitmap, const char *source,
                      uint64_t granularity)
{
    struct qbm_remedy step = {
        .action = action,
        .checkpoint = v->ck->name,
        .target = v->tg->target,
        .image = layer_name(v, k),
        .bitmap = bitmap,
        .source = source,
        .granularity = granularity,
    };

    return plan_add(e, &step);
}

static int add_merge(struct eval *e, const struct verdict *v, size_t k,
                     const char *source)
{
    return image_step(e, QBM_REMEDY_MERGE, v, k, v->disk->bitmap, source, 0);
}

/* The repairs of one disk of a checkpoint that is kept. */
static int plan_repairs(struct eval *e, const struct verdict *v)
{
    size_t k, n = v->tg->chain->n;
    uint64_t gran = 0;
    int r = 0;

    /* The granularity of the topmost copy, as libvirt gives a copy it
     * adds in a commit's base. */
    for (k = 0; k < n && !gran; k++) {
        const struct qcow2_bitmap *bm = copy_in(v, k);

        if (bm) {
            gran = 1ull << bm->granularity_bits;
        }
    }
    for (k = 0; k < n && r == 0; k++) {
        unsigned rules = v->rules[k];

        if (rules & (QBM_CHAIN_BIT(QBM_CHAIN_NOT_IN_TOP) |
                     QBM_CHAIN_BIT(QBM_CHAIN_GAP))) {
            r = image_step(e, QBM_REMEDY_ADD, v, k, v->disk->bitmap, NULL,
                           gran);
            r = r ? r
                  : image_step(e, QBM_REMEDY_POPULATE, v, k, v->disk->bitmap,
                               NULL, 0);
        }
        if (r == 0 && (rules & QBM_CHAIN_BIT(QBM_CHAIN_DISABLED))) {
            if (!(rules & QBM_CHAIN_BIT(QBM_CHAIN_IN_USE))) {
                r = later_copies(e, v, k, NULL, add_merge);
            }
            r = r ? r
                  : image_step(e, QBM_REMEDY_ENABLE, v, k, v->disk->bitmap,
                               NULL, 0);
        }
    }
    return r;
}

/* Whether a checkpoint (one that is kept, with kept_only) names `bitmap`
 * for `target`. */
static bool named(struct qbm_checkpoints *set, const char *target,
                  const char *bitmap, bool kept_only)
{
    size_t i, j;

    for (i = 0; i < set->n; i++) {
        if (kept_only && set->cks[i].deleted) {
            continue;
        }
        for (j = 0; j < set->cks[i].ndisks; j++) {
            const struct ckpt_disk *d = &set->cks[i].disks[j];

            if (d->bitmap && !strcmp(d->target, target) &&
                !strcmp(d->bitmap, bitmap)) {
                return true;
            }
        }
    }
    return false;
}

/* Whether a checkpoint (one that is kept, with kept_only) names `bitmap`
 * for a disk that has `image` among its layers: a domain's disks may share
 * a backing file, and a copy there belongs to each of them. */
static bool claimed(struct qbm_checkpoints *set, const char *image,
                    const char *bitmap, bool kept_only)
{
    size_t i, k;

    for (i = 0; i < set->ntargets; i++) {
        const struct ckpt_target *tg = &set->targets[i];

        if (!tg->chain || !named(set, tg->target, bitmap, kept_only)) {
            continue;
        }
        for (k = 0; k < tg->chain->n; k++) {
            if (strcmp(tg->chain->names[k], image) == 0) {
                return true;
            }
        }
    }
    return false;
}

/* REMOVE of every copy of `bitmap` in the chain of `tg` that no kept
 * checkpoint needs. */
static int remove_copies(struct eval *e, const char *checkpoint,
                         const struct ckpt_target *tg, const char *bitmap)
{
    size_t k;
    int r = 0;

    for (k = 0; k < tg->chain->n && r == 0; k++) {
        if (qcow2_bitmap_lookup(tg->chain->layers[k], bitmap) &&
            !claimed(e->set, tg->chain->names[k], bitmap, true)) {
            struct qbm_remedy step = {
                .action = QBM_REMEDY_REMOVE,
                .checkpoint = checkpoint,
                .target = tg->target,
                .image = tg->chain->names[k],
                .bitmap = bitmap,
            };

            r = plan_add(e, &step);
        }
    }
    return r;
}

/* libvirt's checkpoint names: [A-Za-z0-9_-][A-Za-z0-9_.-]*
 * (docs/checkpoint-rules.md, section 7). */
static bool libvirt_name(const char *s)
{
    size_t i;

    for (i = 0; s[i]; i++) {
        char c = s[i];

        if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
              (c >= '0' && c <= '9') || c == '_' || c == '-' ||
              (c == '.' && i > 0))) {
            return false;
        }
    }
    return i > 0;
}

QBM_API int qbm_checkpoint_name_valid(const char *name)
{
    return name && libvirt_name(name);
}

/* Whether `bitmap` passes every rule on the chain of `tg`. */
static int valid_on(const struct ckpt_target *tg, const char *bitmap,
                    bool *ret_valid)
{
    unsigned *rules = qbm_calloc(tg->chain->n, sizeof(*rules));
    size_t k;
    bool valid;

    if (!rules) {
        return -ENOMEM;
    }
    valid = qbm_chain_rules(tg->chain->layers, tg->chain->n, bitmap, rules) <
            tg->chain->n;
    for (k = 0; k < tg->chain->n; k++) {
        valid = valid && !rules[k];
    }
    free(rules);
    *ret_valid = valid;
    return 0;
}

/* Whether the orphan `bitmap` was dealt with already (it is planned by
 * name, over every disk, at its first sight). */
static bool orphan_planned(struct eval *e, const char *bitmap)
{
    size_t i;

    for (i = 0; i < e->plan.n; i++) {
        const struct qbm_remedy *s = &e->plan.r[i];

        if ((s->action == QBM_REMEDY_REDEFINE &&
             !strcmp(s->checkpoint, bitmap)) ||
            (s->action == QBM_REMEDY_REMOVE && !s->checkpoint &&
             !strcmp(s->bitmap, bitmap))) {
            return true;
        }
    }
    return false;
}

/*
 * The orphan `bitmap`, over every disk: a redefinition covering the disks
 * where it passes the rules (REDEFINE flag, a name libvirt takes and no
 * checkpoint has), the removal of every other copy.
 */
static int plan_orphan(struct eval *e, const char *bitmap, const char **parent,
                       int64_t *ctime)
{
    struct qbm_checkpoints *set = e->set;
    const char **targets = NULL, **bitmaps = NULL;
    bool redefine = (e->flags & QBM_CHECKPOINTS_REDEFINE) &&
                    libvirt_name(bitmap) && !find_ckpt(set, bitmap);
    bool *valid = qbm_calloc(set->ntargets ? set->ntargets : 1, sizeof(*valid));
    bool any = false;
    size_t t;
    int r = valid ? 0 : -ENOMEM;

    for (t = 0; t < set->ntargets && r == 0 && redefine; t++) {
        const struct ckpt_target *tg = &set->targets[t];

        if (tg->chain && !named(set, tg->target, bitmap, false)) {
            r = valid_on(tg, bitmap, &valid[t]);
            any = any || valid[t];
        }
    }
    if (r == 0 && any) {
        targets = qbm_calloc(set->ntargets, sizeof(*targets));
        bitmaps = qbm_calloc(set->ntargets, sizeof(*bitmaps));
        r = targets && bitmaps ? 0 : -ENOMEM;
    }
    if (r == 0 && any) {
        struct qbm_remedy step = {
            .action = QBM_REMEDY_REDEFINE,
            .checkpoint = bitmap,
            .parent = *parent,
            .creation_time = *ctime,
            .ndisks = set->ntargets,
            .disk_targets = targets,
            .disk_bitmaps = bitmaps,
        };

        for (t = 0; t < set->ntargets; t++) {
            targets[t] = set->targets[t].target;
            bitmaps[t] = valid[t] ? bitmap : NULL;
        }
        r = plan_add(e, &step);
        if (r == 0) {
            targets = bitmaps = NULL; /* the plan's now */
            *parent = bitmap;
            (*ctime)++;
        }
    }
    for (t = 0; t < set->ntargets && r == 0; t++) {
        const struct ckpt_target *tg = &set->targets[t];

        if (tg->chain && !valid[t] && !named(set, tg->target, bitmap, false)) {
            r = remove_copies(e, NULL, tg, bitmap);
        }
    }
    free(targets);
    free(bitmaps);
    free(valid);
    return r;
}

static int plan_all(struct eval *e)
{
    struct qbm_checkpoints *set = e->set;
    const char *parent = NULL;
    int64_t ctime = (int64_t)time(NULL);
    size_t i, j, k;
    int r = 0;

    /* In-use copies first: the other steps refuse them (a merge may read
     * the copy of a checkpoint that is deleted afterwards). */
    for (i = 0; i < e->nv && r == 0; i++) {
        const struct verdict *v = &e->v[i];

        for (k = 0; v->rules && k < v->tg->chain->n && r == 0; k++) {
            if (v->rules[k] & QBM_CHAIN_BIT(QBM_CHAIN_IN_USE)) {
                r = image_step(e, QBM_REMEDY_REPAIR, v, k, NULL, NULL, 0);
            }
        }
    }
    for (i = 0; i < e->nv && r == 0; i++) {
        const struct verdict *v = &e->v[i];

        if (v->rules && !v->ck->deleted) {
            r = plan_repairs(e, v);
        }
    }
    /* What cannot be repaired: the metadata, then every copy. */
    for (i = 0; i < set->n && r == 0; i++) {
        const struct ckpt *ck = &set->cks[e->order[i]];
        struct qbm_remedy step = { .action = QBM_REMEDY_DELETE };

        if (!ck->deleted) {
            if (ck->ctime >= ctime) {
                ctime = ck->ctime + 1;
            }
            parent = ck->name;
            continue;
        }
        step.checkpoint = ck->name;
        r = plan_add(e, &step);
        for (j = 0; j < ck->ndisks && r == 0; j++) {
            const struct ckpt_disk *d = &ck->disks[j];
            const struct ckpt_target *tg = find_target(set, d->target);

            if (d->bitmap && tg && tg->chain &&
                !named(set, d->target, d->bitmap, true)) {
                r = remove_copies(e, ck->name, tg, d->bitmap);
            }
        }
    }
    /* Orphans, by name at first sight. */
    for (i = 0; i < set->ntargets && r == 0; i++) {
        const struct ckpt_target *tg = &set->targets[i];

        for (k = 0; tg->chain && k < tg->chain->n && r == 0; k++) {
            const struct qbm_image *img = tg->chain->layers[k];
            uint32_t b;

            for (b = 0; b < img->nb_bitmaps && r == 0; b++) {
                const char *name = img->bitmaps[b].name;

                if (!claimed(set, tg->chain->names[k], name, false) &&
                    !orphan_planned(e, name)) {
                    r = plan_orphan(e, name, &parent, &ctime);
                }
            }
        }
    }
    return r;
}

static void eval_free(struct eval *e)
{
    size_t i;

    for (i = 0; i < e->nv; i++) {
        free(e->v[i].detail);
        free(e->v[i].rules);
    }
    for (i = 0; i < e->plan.n; i++) {
        if (e->plan.r[i].action == QBM_REMEDY_REDEFINE) {
            free((void *)e->plan.r[i].disk_targets);
            free((void *)e->plan.r[i].disk_bitmaps);
        }
    }
    free(e->plan.r);
    free(e->v);
    free(e->order);
}

/* The caller's callbacks: a non-zero value stops the walk, kept to be
 * returned. */
struct user {
    qbm_checkpoint_disk_fn disk_fn;
    qbm_orphan_fn orphan_fn;
    qbm_remedy_fn remedy_fn;
    void *opaque;
    int ret;
};

static int report(struct eval *e, struct user *u)
{
    struct qbm_checkpoints *set = e->set;
    size_t i, k;
    uint32_t b;

    for (i = 0; i < e->nv && u->disk_fn; i++) {
        const struct verdict *v = &e->v[i];

        u->ret =
            u->disk_fn(u->opaque, v->ck->name, v->disk->target, v->disk->bitmap,
                       v->tg && v->tg->chain ? v->tg->chain->names[0] : NULL,
                       v->state, v->detail ? v->detail : "");
        if (u->ret) {
            return 1;
        }
    }
    for (i = 0; i < set->ntargets && u->orphan_fn; i++) {
        const struct ckpt_target *tg = &set->targets[i];

        for (k = 0; tg->chain && k < tg->chain->n; k++) {
            const struct qbm_image *img = tg->chain->layers[k];

            for (b = 0; b < img->nb_bitmaps; b++) {
                const char *name = img->bitmaps[b].name;

                if (claimed(set, tg->chain->names[k], name, false)) {
                    continue;
                }
                u->ret = u->orphan_fn(u->opaque, tg->target,
                                      tg->chain->names[k], k, name);
                if (u->ret) {
                    return 1;
                }
            }
        }
    }
    for (i = 0; i < e->plan.n && u->remedy_fn; i++) {
        u->ret = u->remedy_fn(u->opaque, &e->plan.r[i]);
        if (u->ret) {
            return 1;
        }
    }
    return 0;
}

static int checkpoints_check(struct qbm_checkpoints *set, unsigned flags,
                             struct user *u)
{
    struct eval e = { .set = set, .flags = flags };
    size_t i, j, nv = 0;
    int r = 0;

    for (i = 0; i < set->n; i++) {
        set->cks[i].deleted = false;
        for (j = 0; j < set->cks[i].ndisks; j++) {
            nv += set->cks[i].disks[j].bitmap != NULL;
        }
    }
    e.order = qbm_calloc(set->n ? set->n : 1, sizeof(*e.order));
    e.v = qbm_calloc(nv ? nv : 1, sizeof(*e.v));
    if (!e.order || !e.v) {
        eval_free(&e);
        return -ENOMEM;
    }
    for (i = 0; i < set->n; i++) {
        e.order[i] = i;
    }
    qsort_r(e.order, set->n, sizeof(*e.order), by_time, set->cks);
    for (i = 0; i < set->n && r == 0; i++) {
        const struct ckpt *ck = &set->cks[e.order[i]];

        for (j = 0; j < ck->ndisks && r == 0; j++) {
            struct verdict *v;

            if (!ck->disks[j].bitmap) {
                continue;
            }
            v = &e.v[e.nv++];
            v->ck = ck;
            v->disk = &ck->disks[j];
            v->tg = find_target(set, ck->disks[j].target);
            r = judge(&e, v);
        }
    }
    /* A missing bitmap cannot be repaired. */
    for (i = 0; i < e.nv; i++) {
        if (e.v[i].state == QBM_CHECKPOINT_MISSING) {
            ((struct ckpt *)e.v[i].ck)->deleted = true;
        }
    }
    r = r ? r : plan_all(&e);
    r = r ? r : report(&e, u);
    eval_free(&e);
    return r;
}

QBM_API int qbm_checkpoints_check(struct qbm_checkpoints *set, unsigned flags,
                                  qbm_checkpoint_disk_fn disk_fn,
                                  qbm_orphan_fn orphan_fn,
                                  qbm_remedy_fn remedy_fn, void *opaque)
{
    struct user u = { disk_fn, orphan_fn, remedy_fn, opaque, 0 };
    int r;

    if (!set || (flags & ~QBM_CHECKPOINTS_MASK)) {
        return qbm_public_ret(qbm_err(EINVAL, "invalid arguments"));
    }
    r = checkpoints_check(set, flags, &u);
    return qbm_public_ret_cb(r, u.ret);
}
