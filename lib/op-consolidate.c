/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * Folding incremental backups into the full backup in place ("rolling
 * full"), crash-safely: every changed cluster goes to a new cluster, every
 * touched L2 table and the L1 table are rewritten to new clusters, and one
 * 12-byte write of l1_size and l1_table_offset (qcow2 spec, "Header")
 * switches the whole image at once. Only then are the replaced clusters
 * freed. A crash leaves the full backup as it was or completely updated.
 */
#include <stdlib.h>
#include <sys/stat.h>

#include "internal.h"

/* Read the current guest contents of one cluster from its L2 entry. */
static int read_cluster(struct qbm_image *img, uint64_t e, uint8_t *buf)
{
    uint64_t off = e & L2E_OFFSET_MASK;

    if (e & L2E_COMPRESSED) {
        return qcow2_read_compressed(img, e, 0, buf, img->cluster_size);
    }
    if ((e & L2E_ZERO) || off == 0) {
        memset(buf, 0, img->cluster_size);
        return 0;
    }
    return qbm_image_read_meta(img, buf, img->cluster_size, off,
                               "data cluster");
}

/* Queue the host clusters an L2 entry holds. */
static int free_entry(struct qbm_txn *txn, struct qbm_image *img, uint64_t e)
{
    uint64_t off = e & L2E_OFFSET_MASK;

    if (e & L2E_COMPRESSED) {
        struct qcow2_compressed cd;
        uint64_t first, last;

        qcow2_compressed_decode(e, img->cluster_bits, &cd);
        first = (cd.offset & ~511ull) / img->cluster_size;
        last = (cd.offset + cd.nb_bytes - 1) / img->cluster_size;
        return qbm_txn_free_later(txn, first * img->cluster_size,
                                  (last - first + 1) * img->cluster_size);
    }
    return off ? qbm_txn_free_later(txn, off, img->cluster_size) : 0;
}

struct fold {
    struct qbm_image *img;
    struct qbm_image **incs;
    struct qbm_txn *txn;
    const struct qcow2_map_extent *map;
    size_t nmap, m; /* m: first map piece that may still matter */
    uint8_t *buf;
    struct qbm_progress *progress;
    uint64_t done, total;
};

/* New L2 entry for guest cluster c, given its old one. */
static int fold_cluster(struct fold *f, uint64_t c, uint64_t old, uint64_t *ret)
{
    struct qbm_image *img = f->img;
    uint64_t cs = img->cluster_size;
    uint64_t gs = c * cs, ge = gs + cs, covered = 0, off;
    bool all_zero = true;
    size_t j;
    int r;

    if (ge > img->hdr.size) {
        ge = img->hdr.size;
    }
    while (f->m < f->nmap && f->map[f->m].guest + f->map[f->m].len <= gs) {
        f->m++;
    }
    for (j = f->m; j < f->nmap && f->map[j].guest < ge; j++) {
        uint64_t s = f->map[j].guest > gs ? f->map[j].guest : gs;
        uint64_t e = f->map[j].guest + f->map[j].len < ge
                         ? f->map[j].guest + f->map[j].len
                         : ge;

        covered += e - s;
        all_zero &= f->map[j].type == QCOW2_MAP_ZERO;
    }
    if (covered == ge - gs && all_zero) {
        *ret = L2E_ZERO;
        f->done += covered;
        return free_entry(f->txn, img, old);
    }
    /* Start from the old contents where the incrementals leave gaps. */
    if (covered < ge - gs) {
        r = read_cluster(img, old, f->buf);
    } else {
        memset(f->buf, 0, cs);
        r = 0;
    }
    for (j = f->m; r == 0 && j < f->nmap && f->map[j].guest < ge; j++) {
        const struct qcow2_map_extent *p = &f->map[j];
        uint64_t s = p->guest > gs ? p->guest : gs;
        uint64_t e = p->guest + p->len < ge ? p->guest + p->len : ge;
        struct qbm_image *src = f->incs[p->layer];

        if (p->type == QCOW2_MAP_ZERO) {
            memset(f->buf + (s - gs), 0, e - s);
        } else if (p->type == QCOW2_MAP_DATA) {
            r = qbm_io_pread(qbm_image_data_io(src), f->buf + (s - gs), e - s,
                             p->host + (s - p->guest));
        } else {
            r = qcow2_read_compressed(src, p->host, s - p->start,
                                      f->buf + (s - gs), e - s);
        }
        if (r < 0) {
            r = qbm_err_prefix(r, "%s", src->filename);
        }
        f->done += e - s;
    }
    r = r ? r : qbm_txn_alloc(f->txn, 1, &off);
    r = r ? r : qbm_txn_write(f->txn, f->buf, cs, off);
    r = r ? r : free_entry(f->txn, img, old);
    if (r == 0) {
        *ret = off | L2E_COPIED;
        r = qbm_progress_report(f->progress, f->done, f->total);
    }
    return r;
}

/* Write the new L2 table for L1 entry idx; updates l1 in memory. */
static int flush_l2(struct fold *f, uint8_t *l1, uint64_t idx,
                    const uint8_t *l2)
{
    uint64_t cs = f->img->cluster_size, off;
    uint64_t old = be64_load(l1 + idx * 8) & L1E_OFFSET_MASK;
    int r;

    r = qbm_txn_alloc(f->txn, 1, &off);
    r = r ? r : qbm_txn_write(f->txn, l2, cs, off);
    r = r ? r : qbm_txn_free_later(f->txn, old, old ? cs : 0);
    if (r == 0) {
        be64_store(l1 + idx * 8, off | L2E_COPIED);
    }
    return r;
}

static int fold(struct fold *f)
{
    struct qbm_image *img = f->img;
    uint64_t cs = img->cluster_size, l2e = img->l2_entries;
    uint64_t l1_bytes = (uint64_t)img->hdr.l1_size * 8;
    uint64_t l1_clusters = div_round_up(l1_bytes, cs), off;
    uint64_t cur = UINT64_MAX, prev_end = 0, c, end;
    uint8_t *l1 = qbm_calloc(l1_clusters ? l1_clusters : 1, cs);
    uint8_t *l2 = qbm_malloc(cs);
    /* The switch: l1_size and l1_table_offset, in one write. */
    uint8_t sw[QCOW2_HDR_REFCOUNT_TABLE_OFFSET - QCOW2_HDR_L1_SIZE];
    size_t k;
    int r = 0;

    if (!l1 || !l2) {
        r = -ENOMEM;
        goto out;
    }
    r = qbm_image_read_meta(img, l1, l1_bytes, img->hdr.l1_table_offset,
                            "L1 table");
    /* Pieces are sorted: the clusters they touch come in increasing
     * order; each is folded once, each touched L2 table written once. */
    for (k = 0; r == 0 && k < f->nmap; k++) {
        c = f->map[k].guest / cs;
        end = div_round_up(f->map[k].guest + f->map[k].len, cs);
        if (c < prev_end) {
            c = prev_end;
        }
        for (; r == 0 && c < end; c++) {
            uint64_t e;

            if (c / l2e != cur) {
                if (cur != UINT64_MAX) {
                    r = flush_l2(f, l1, cur, l2);
                }
                cur = c / l2e;
                off = be64_load(l1 + cur * 8) & L1E_OFFSET_MASK;
                if (r == 0 && off) {
                    r = qcow2_read_l2(img, off);
                    if (r == 0) {
                        memcpy(l2, img->l2_cache, cs);
                    }
                } else {
                    memset(l2, 0, cs);
                }
            }
            r = r ? r : fold_cluster(f, c, be64_load(l2 + (c % l2e) * 8), &e);
            if (r == 0) {
                be64_store(l2 + (c % l2e) * 8, e);
            }
        }
        if (end > prev_end) {
            prev_end = end;
        }
    }
    if (r == 0 && cur != UINT64_MAX) {
        r = flush_l2(f, l1, cur, l2);
    }
    r = r ? r : qbm_txn_alloc(f->txn, l1_clusters, &off);
    r = r ? r : qbm_txn_write(f->txn, l1, l1_clusters * cs, off);
    r = r ? r
          : qbm_txn_free_later(f->txn, img->hdr.l1_table_offset,
                               l1_clusters * cs);
    if (r == 0) {
        be32_store(sw, img->hdr.l1_size); /* sw starts at l1_size */
        be64_store(sw + QCOW2_HDR_L1_TABLE_OFFSET - QCOW2_HDR_L1_SIZE, off);
        r = qbm_txn_commit_write(f->txn, sw, sizeof(sw), QCOW2_HDR_L1_SIZE);
        f->txn = NULL;
    }
out:
    free(l1);
    free(l2);
    return r;
}

int qbm_consolidate_images(struct qbm_image *img, struct qbm_image **layers,
                           size_t n, struct qbm_progress *progress)
{
    struct qcow2_map_extent *map = NULL;
    struct fold f = { 0 };
    size_t nmap = 0, i, j;
    int r;

    if (img->hdr.version < 3 || img->extl2 || img->nb_snapshots ||
        img->hdr.backing_file || img->hdr.crypt_method || !img->rdwr ||
        (img->hdr.incompatible_features &
         (QBM_INCOMPAT_DIRTY | QBM_INCOMPAT_CORRUPT |
          QBM_INCOMPAT_DATA_FILE))) {
        return qbm_err(EOPNOTSUPP,
                       "%s: consolidate needs a plain version 3 "
                       "full backup (no snapshots, backing file, extended "
                       "L2, external data, encryption, dirty or corrupt "
                       "bit)",
                       img->filename);
    }
    for (i = 0; i < n; i++) {
        if (layers[i]->hdr.size != img->hdr.size) {
            return qbm_err(EINVAL,
                           "%s: virtual size differs from the full "
                           "backup's",
                           layers[i]->filename);
        }
    }
    r = qbm_resolve(layers, n, img->hdr.size, &map, &nmap);
    if (r < 0 || nmap == 0) {
        return r;
    }
    /* Enabled bitmaps of the full backup must learn what changes: mark
     * first, so a crash can only leave them marking too much. */
    for (i = 0; i < img->nb_bitmaps && r == 0; i++) {
        if ((img->bitmaps[i].flags & (BME_FLAG_AUTO | BME_FLAG_IN_USE)) !=
            BME_FLAG_AUTO) {
            continue;
        }
        for (j = 0; j < nmap && r == 0; j++) {
            r = qbm_impl_bitmap_set_dirty(img, img->bitmaps[i].name,
                                          map[j].guest, map[j].len);
        }
    }
    if (r == 0 && img->staged) {
        r = qbm_impl_commit(img);
    }
    f.img = img;
    f.incs = layers;
    f.map = map;
    f.nmap = nmap;
    f.progress = progress;
    for (j = 0; j < nmap; j++) {
        f.total += map[j].len;
    }
    f.buf = r ? NULL : qbm_malloc(img->cluster_size);
    if (r == 0 && !f.buf) {
        r = -ENOMEM;
    }
    r = r ? r : qbm_txn_begin(img, &f.txn);
    r = r ? r : fold(&f);
    if (r < 0) {
        qbm_txn_abort(f.txn);
    } else {
        r = qbm_image_reload(img);
    }
    free(f.buf);
    free(map);
    return r;
}

static int consolidate(const char *full, const char *const *incs, size_t n,
                       struct qbm_progress *progress)
{
    struct qbm_image *img = NULL, **layers;
    size_t i, j;
    struct stat sa, sb;
    int r = 0;

    layers = qbm_calloc(n ? n : 1, sizeof(*layers));
    if (!layers) {
        return -ENOMEM;
    }
    r = qbm_impl_open(full, QBM_OPEN_RDWR, &img);
    if (r < 0) {
        r = qbm_err_prefix(r, "%s", full);
        goto out;
    }
    for (i = 0; i < n && r == 0; i++) {
        for (j = 0; j < i; j++) {
            if (stat(incs[i], &sa) == 0 && stat(incs[j], &sb) == 0 &&
                sa.st_dev == sb.st_dev && sa.st_ino == sb.st_ino) {
                r = qbm_err(EINVAL, "%s is given twice", incs[i]);
            }
        }
        if (r == 0 && stat(incs[i], &sa) == 0 && stat(full, &sb) == 0 &&
            sa.st_dev == sb.st_dev && sa.st_ino == sb.st_ino) {
            r = qbm_err(EINVAL, "%s is the full backup itself", incs[i]);
        }
        if (r == 0) {
            /* Newest first for the resolver. */
            r = qbm_impl_open(incs[i], 0, &layers[n - 1 - i]);
            if (r < 0) {
                r = qbm_err_prefix(r, "%s", incs[i]);
            }
        }
    }
    if (r == 0) {
        r = qbm_consolidate_images(img, layers, n, progress);
    }
out:
    for (i = 0; i < n; i++) {
        qbm_impl_close(layers[i]);
    }
    free(layers);
    qbm_impl_close(img);
    return r;
}

QBM_API int qbm_consolidate(const char *full, const char *const *incs, size_t n,
                            qbm_progress_fn progress, void *opaque)
{
    struct qbm_progress p = { progress, opaque, 0 };

    if (!full || (!incs && n)) {
        return qbm_public_ret(qbm_err(EINVAL, "invalid arguments"));
    }
    return qbm_progress_ret(&p, consolidate(full, incs, n, &p));
}
