/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * Backing chains (qcow2 spec, "Header": backing_file_offset; "Header
 * extensions": backing file format): name resolution as QEMU does it,
 * format choice, loop and depth limits (docs/design.md, "Layers"), and
 * reading one checkpoint across layers.
 */
#include <stdlib.h>
#include <sys/stat.h>

#include "internal.h"

#define QBM_MAX_CHAIN 256

void qbm_impl_chain_close(struct qbm_chain *chain)
{
    size_t i;

    if (!chain) {
        return;
    }
    for (i = 0; i < chain->n; i++) {
        qbm_impl_close(chain->layers[i]);
        free(chain->names[i]);
    }
    free(chain->layers);
    free(chain->names);
    free(chain);
}

QBM_API void qbm_chain_close(struct qbm_chain *chain)
{
    qbm_impl_chain_close(chain);
}

/*
 * Resolve a backing name relative to the name of the image that refers to
 * it, as given: QEMU joins it with the directory part of that name without
 * resolving symlinks.
 */
static int resolve_backing(const char *referrer, const char *name, char **ret)
{
    const char *slash, *colon;
    size_t dirlen;
    char *out;

    if (strncmp(name, "json:", 5) == 0) {
        return qbm_err(EOPNOTSUPP,
                       "backing file name '%s' is a json: "
                       "specification, which qbm does not support",
                       name);
    }
    colon = strchr(name, ':');
    slash = strchr(name, '/');
    if (colon && (!slash || colon < slash)) {
        if (strncmp(name, "file:", 5) == 0) {
            name += 5;
        } else {
            return qbm_err(EOPNOTSUPP,
                           "backing file '%s' uses a protocol "
                           "qbm does not support",
                           name);
        }
    }
    if (name[0] == '\0') {
        return qbm_err(EINVAL, "empty backing file name");
    }
    slash = strrchr(referrer, '/');
    if (name[0] == '/' || !slash) {
        *ret = qbm_strndup(name, strlen(name));
        return *ret ? 0 : -ENOMEM;
    }
    dirlen = (size_t)(slash - referrer) + 1;
    out = qbm_malloc(dirlen + strlen(name) + 1);
    if (!out) {
        return -ENOMEM;
    }
    memcpy(out, referrer, dirlen);
    strcpy(out + dirlen, name);
    *ret = out;
    return 0;
}

int qbm_impl_image_backing_path(const struct qbm_image *img, char **ret_path)
{
    if (!img->hdr.backing_file) {
        return qbm_err(ENOENT, "no backing file");
    }
    return resolve_backing(img->filename, img->hdr.backing_file, ret_path);
}

QBM_API char *qbm_image_backing_path(const struct qbm_image *img)
{
    char *out = NULL;

    return qbm_impl_image_backing_path(img, &out) < 0 ? NULL : out;
}

static int chain_push(struct qbm_chain *chain, struct qbm_image *img,
                      char *name)
{
    struct qbm_image **layers;
    char **names;

    layers = qbm_realloc(chain->layers, (chain->n + 1) * sizeof(*layers));
    if (!layers) {
        return -ENOMEM;
    }
    chain->layers = layers;
    names = qbm_realloc(chain->names, (chain->n + 1) * sizeof(*names));
    if (!names) {
        return -ENOMEM;
    }
    chain->names = names;
    chain->layers[chain->n] = img;
    chain->names[chain->n] = name;
    chain->n++;
    return 0;
}

/* Open a backing layer: format from the referrer's extension, or probed
 * as QEMU does without one. */
static int open_layer(const char *name, const char *format, bool force_share,
                      struct qbm_image **ret)
{
    struct qbm_io *io;
    int r;

    if (format && strcmp(format, "qcow2") != 0 && strcmp(format, "raw")) {
        return qbm_err(EOPNOTSUPP,
                       "backing format '%s' is not supported "
                       "(only qcow2 and raw)",
                       format);
    }
    r = qbm_io_file_open(name, false,
                         force_share ? QBM_LOCK_NONE : QBM_LOCK_READ, &io);
    if (r < 0) {
        return r;
    }
    r = qbm_image_open_format(io, name,
                              !format                        ? QBM_FORMAT_PROBE
                              : strcmp(format, "qcow2") == 0 ? QBM_FORMAT_QCOW2
                                                             : QBM_FORMAT_RAW,
                              false, ret);
    if (r == 0 && force_share) {
        (*ret)->lock = QBM_LOCK_NONE; /* and so its data file */
    }
    return r;
}

int qbm_impl_chain_open(const char *filename, unsigned flags,
                        struct qbm_chain **ret_chain)
{
    struct qbm_chain *chain;
    struct qbm_image *img;
    dev_t devs[QBM_MAX_CHAIN];
    ino_t inos[QBM_MAX_CHAIN];
    bool force_share = flags & QBM_OPEN_FORCE_SHARE;
    char *name;
    size_t i;
    int r;

    chain = qbm_calloc(1, sizeof(*chain));
    if (!chain) {
        return -ENOMEM;
    }
    r = qbm_impl_open(filename, flags, &img);
    if (r < 0) {
        free(chain);
        return r;
    }
    name = qbm_strndup(filename, strlen(filename));
    r = name ? chain_push(chain, img, name) : -ENOMEM;
    if (r < 0) {
        free(name);
        qbm_impl_close(img);
        qbm_impl_chain_close(chain); /* the arrays chain_push may have grown */
        return r;
    }
    for (;;) {
        struct qbm_image *top = chain->layers[chain->n - 1];
        const char *backing = top->hdr.backing_file;
        struct stat st;

        if (stat(chain->names[chain->n - 1], &st) < 0) {
            r = qbm_err(errno, "%s: cannot stat: %s",
                        chain->names[chain->n - 1], strerror(errno));
            goto fail;
        }
        for (i = 0; i + 1 < chain->n; i++) {
            if (devs[i] == st.st_dev && inos[i] == st.st_ino) {
                r = qbm_err(ELOOP,
                            "backing chain loops: '%s' is also layer "
                            "%zu",
                            chain->names[chain->n - 1], i);
                goto fail;
            }
        }
        devs[chain->n - 1] = st.st_dev;
        inos[chain->n - 1] = st.st_ino;
        if (top->raw || !backing) {
            break;
        }
        if (chain->n >= QBM_MAX_CHAIN) {
            r = qbm_err(ELOOP, "backing chain deeper than %d layers",
                        QBM_MAX_CHAIN);
            goto fail;
        }
        r = resolve_backing(chain->names[chain->n - 1], backing, &name);
        if (r < 0) {
            r = qbm_err_prefix(r, "%s", chain->names[chain->n - 1]);
            goto fail;
        }
        r = open_layer(name, top->hdr.backing_format, force_share, &img);
        if (r < 0) {
            r = qbm_err_prefix(r, "backing file %s", name);
            free(name);
            goto fail;
        }
        r = chain_push(chain, img, name);
        if (r < 0) {
            qbm_impl_close(img);
            free(name);
            goto fail;
        }
    }
    *ret_chain = chain;
    return 0;

fail:
    qbm_impl_chain_close(chain);
    return r;
}

QBM_API struct qbm_chain *qbm_chain_open(const char *filename, unsigned flags)
{
    struct qbm_chain *chain = NULL;

    return qbm_impl_chain_open(filename, flags, &chain) < 0 ? NULL : chain;
}

QBM_API size_t qbm_chain_length(const struct qbm_chain *chain)
{
    return chain->n;
}

QBM_API struct qbm_image *qbm_chain_layer(const struct qbm_chain *chain,
                                          size_t idx)
{
    return idx < chain->n ? chain->layers[idx] : NULL;
}

QBM_API const char *qbm_chain_filename(const struct qbm_chain *chain,
                                       size_t idx)
{
    return idx < chain->n ? chain->names[idx] : NULL;
}

/* ---- one checkpoint across layers ------------------------------------- */

/* A guest byte range. */
struct guest_extent {
    uint64_t off, len;
};
QBM_DARRAY(guest_extents, struct guest_extent);

/* Every layer's extents of one bitmap, clipped to the top's size. */
struct extent_collect {
    struct guest_extents all;
    uint64_t limit;
};

static int collect_extent(void *opaque, uint64_t off, uint64_t len)
{
    struct extent_collect *c = opaque;
    struct guest_extent e;

    if (off >= c->limit) {
        return 0;
    }
    e.off = off;
    e.len = len > c->limit - off ? c->limit - off : len;
    return qbm_darray_push(&c->all, e, 0);
}

static int cmp_extent(const void *a, const void *b)
{
    const struct guest_extent *x = a, *y = b;

    return x->off < y->off ? -1 : x->off > y->off;
}

int qbm_impl_chain_bitmap_extents(struct qbm_chain *chain, const char *name,
                                  qbm_extent_fn fn, void *opaque,
                                  int *ret_consistent)
{
    struct extent_collect c = { { 0 } };
    int consistent = 1, found = 0, r = 0;
    size_t i;

    c.limit = chain->layers[0]->hdr.size;
    for (i = 0; i < chain->n; i++) {
        struct qbm_image *img = chain->layers[i];
        uint32_t j;

        for (j = 0; j < img->nb_bitmaps; j++) {
            if (strcmp(img->bitmaps[j].name, name) != 0) {
                continue;
            }
            found = 1;
            if (!qbm_impl_bitmap_consistent(img, j)) {
                consistent = 0;
            }
            r = qbm_impl_bitmap_extents(img, j, collect_extent, &c);
            if (r < 0) {
                qbm_darray_free(&c.all);
                return qbm_err_prefix(r, "%s", chain->names[i]);
            }
        }
    }
    if (!found) {
        return qbm_err(ENOENT,
                       "no layer of the chain has a bitmap named "
                       "'%s'",
                       name);
    }
    /* Each layer's list is sorted; the union needs one sort and a sweep. */
    qsort(c.all.v, c.all.n, sizeof(*c.all.v), cmp_extent);
    {
        uint64_t cur_off = 0, cur_end = 0;
        bool have = false;

        for (i = 0; i < c.all.n && r == 0; i++) {
            uint64_t off = c.all.v[i].off, end = off + c.all.v[i].len;

            if (have && off <= cur_end) {
                if (end > cur_end) {
                    cur_end = end;
                }
                continue;
            }
            if (have) {
                r = fn(opaque, cur_off, cur_end - cur_off);
            }
            cur_off = off;
            cur_end = end;
            have = true;
        }
        if (have && r == 0) {
            r = fn(opaque, cur_off, cur_end - cur_off);
        }
    }
    qbm_darray_free(&c.all);
    if (r) {
        return r;
    }
    if (ret_consistent) {
        *ret_consistent = consistent;
    }
    return 0;
}

QBM_API int qbm_chain_bitmap_extents(struct qbm_chain *chain, const char *name,
                                     qbm_extent_fn fn, void *opaque,
                                     int *ret_consistent)
{
    struct qbm_extent_wrap w = { fn, opaque, 0 };
    int r;

    if (!name || !fn) {
        qbm_err(EINVAL, "invalid arguments");
        return -1;
    }
    r = qbm_impl_chain_bitmap_extents(chain, name, qbm_extent_wrap_cb, &w,
                                      ret_consistent);
    return qbm_public_ret_cb(r, w.user_ret);
}
