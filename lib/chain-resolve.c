/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * Resolving a stack of layers into one map: every guest range comes from
 * the newest layer that provides it (data, compressed or zero), as a
 * backing chain reads, or as a full backup plus incrementals restore.
 * Cost follows the number of extents, never the virtual size.
 */
#include <stdlib.h>

#include "internal.h"

QBM_DARRAY(map_extents, struct qcow2_map_extent);

/* One layer's extents, clipped to the size and tagged with the layer. */
struct layer_extents {
    struct map_extents exts;
    uint64_t limit;
    uint32_t layer;
};

static int collect(void *opaque, const struct qcow2_map_extent *e)
{
    struct layer_extents *le = opaque;
    struct qcow2_map_extent c = *e;

    if (c.guest >= le->limit) {
        return 0;
    }
    if (c.len > le->limit - c.guest) {
        c.len = le->limit - c.guest;
    }
    c.layer = le->layer;
    return qbm_darray_push(&le->exts, c, 0);
}

/* Append a piece of extent e covering [pos, end) to out, merging. */
static int emit(struct map_extents *out, const struct qcow2_map_extent *e,
                uint64_t pos, uint64_t end)
{
    struct qcow2_map_extent p = *e;
    struct qcow2_map_extent *last = out->n ? &out->v[out->n - 1] : NULL;

    p.guest = pos;
    p.len = end - pos;
    if (e->type == QCOW2_MAP_DATA) {
        p.host = e->host + (pos - e->guest);
    }
    if (last && last->guest + last->len == pos && last->layer == p.layer &&
        last->type == p.type &&
        (p.type == QCOW2_MAP_ZERO ||
         (p.type == QCOW2_MAP_DATA && last->host + last->len == p.host) ||
         (p.type == QCOW2_MAP_COMPRESSED && last->host == p.host))) {
        last->len += p.len;
        return 0;
    }
    return qbm_darray_push(out, p, 0);
}

int qbm_resolve(struct qbm_image **layers, size_t n, uint64_t size,
                struct qcow2_map_extent **ret, size_t *ret_n)
{
    struct layer_extents *per = qbm_calloc(n ? n : 1, sizeof(*per));
    struct map_extents out = { 0 };
    size_t *cur = qbm_calloc(n ? n : 1, sizeof(*cur));
    uint64_t pos = 0;
    size_t l;
    int r = 0;

    if (!per || !cur) {
        free(per);
        free(cur);
        return -ENOMEM;
    }
    for (l = 0; l < n && r == 0; l++) {
        per[l].limit = size;
        per[l].layer = (uint32_t)l;
        /* Before anything is written: a missing data file is an error
         * of the input, found while the output does not exist yet. */
        r = qbm_image_data_open(layers[l]);
        r = r ? r : qcow2_map_walk(layers[l], collect, &per[l]);
        if (r > 0) {
            r = -EIO;
        }
        if (r < 0) {
            r = qbm_err_prefix(r, "%s", layers[l]->filename);
        }
    }
    while (r == 0 && pos < size) {
        uint64_t next = UINT64_MAX, end;
        size_t best = n;

        /* The newest layer covering pos wins; older ones only fill what
         * comes before the next extent of a newer layer. */
        for (l = 0; l < n; l++) {
            const struct map_extents *v = &per[l].exts;

            while (cur[l] < v->n &&
                   v->v[cur[l]].guest + v->v[cur[l]].len <= pos) {
                cur[l]++;
            }
            if (cur[l] == v->n) {
                continue;
            }
            if (v->v[cur[l]].guest <= pos) {
                if (best == n) {
                    best = l;
                }
            } else if (best == n && v->v[cur[l]].guest < next) {
                next = v->v[cur[l]].guest;
            }
        }
        if (best == n) {
            if (next == UINT64_MAX) {
                break;
            }
            pos = next;
            continue;
        }
        end =
            per[best].exts.v[cur[best]].guest + per[best].exts.v[cur[best]].len;
        for (l = 0; l < best; l++) {
            const struct map_extents *v = &per[l].exts;

            if (cur[l] < v->n && v->v[cur[l]].guest > pos &&
                v->v[cur[l]].guest < end) {
                end = v->v[cur[l]].guest;
            }
        }
        r = emit(&out, &per[best].exts.v[cur[best]], pos, end);
        pos = end;
    }
    for (l = 0; l < n; l++) {
        qbm_darray_free(&per[l].exts);
    }
    free(per);
    free(cur);
    if (r < 0) {
        qbm_darray_free(&out);
        return r;
    }
    *ret = out.v;
    *ret_n = out.n;
    return 0;
}
