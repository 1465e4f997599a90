/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * Writer of fresh qcow2 images (version 3, 16-bit refcounts), used for
 * restore and extract output. The layout is planned up front from the
 * list of guest clusters to store, so every structure is written once:
 *
 *   header | refcount table | refcount blocks | L1 | L2 tables | data
 *
 * Data clusters are stored in guest order, so consecutive guest clusters
 * are consecutive in the file (and copies can be done in large runs). The
 * file is a new temporary one (crash safety comes from the rename that
 * publishes it, so the order of writes inside does not matter) or a block
 * device written in place: every metadata cluster below the end is written
 * whole, so what the device held before is never read as a table (the
 * caller zero-fills the parts of data clusters it has no data for), and
 * the header goes last, after a flush (qcow2_writer_set_ordered()).
 */
#include <stdlib.h>

#include "internal.h"

#define OUT_HEADER_LENGTH 112

struct qcow2_writer {
    struct qbm_io *io;
    uint64_t size, cs;
    unsigned cluster_bits;
    const struct qcow2_out_run *runs;
    size_t nruns;
    uint64_t *run_host; /* host offset of each data run's first cluster */
    uint64_t l1_entries, l1_clusters, nl2, ndata;
    uint64_t rt_off, rt_clusters, rb_off, rb_clusters;
    uint64_t l1_off, l2_off, data_off, total;
    char *backing, *backing_fmt;
    bool ordered; /* flush before the header */
};

void qcow2_writer_free(struct qcow2_writer *w)
{
    if (!w) {
        return;
    }
    free(w->run_host);
    free(w->backing);
    free(w->backing_fmt);
    free(w);
}

int qcow2_writer_plan(struct qbm_io *io, uint64_t size, unsigned cluster_bits,
                      const char *backing, const char *backing_fmt,
                      const struct qcow2_out_run *runs, size_t nruns,
                      struct qcow2_writer **ret)
{
    struct qcow2_writer *w = qbm_calloc(1, sizeof(*w));
    uint64_t l2e, per_block, last_l2 = UINT64_MAX, base, i;
    size_t k;

    if (!w) {
        return -ENOMEM;
    }
    w->io = io;
    w->size = size;
    w->cluster_bits = cluster_bits;
    w->cs = 1ull << cluster_bits;
    w->runs = runs;
    w->nruns = nruns;
    l2e = w->cs / 8;
    w->l1_entries = div_round_up(size, w->cs * l2e);
    if (w->l1_entries > QCOW2_MAX_L1_BYTES / 8) {
        qcow2_writer_free(w);
        return qbm_err(EFBIG, "virtual size too large for the cluster size");
    }
    w->l1_clusters = div_round_up(w->l1_entries * 8, w->cs);
    if (w->l1_clusters == 0) {
        w->l1_clusters = 1;
    }
    w->run_host = qbm_calloc(nruns ? nruns : 1, sizeof(*w->run_host));
    if ((backing && !(w->backing = qbm_strndup(backing, strlen(backing)))) ||
        (backing_fmt &&
         !(w->backing_fmt = qbm_strndup(backing_fmt, strlen(backing_fmt)))) ||
        !w->run_host) {
        qcow2_writer_free(w);
        return -ENOMEM;
    }
    for (k = 0; k < nruns; k++) {
        for (i = runs[k].first / l2e;
             i <= (runs[k].first + runs[k].count - 1) / l2e; i++) {
            if (i != last_l2) {
                w->nl2++;
                last_l2 = i;
            }
        }
        if (runs[k].data) {
            w->run_host[k] = w->ndata; /* in clusters, fixed up below */
            w->ndata += runs[k].count;
        }
    }
    /* Refcount blocks cover every cluster, including themselves and the
     * table: grow both until they are big enough. */
    per_block = w->cs * 8 / 16;
    base = 1 + w->l1_clusters + w->nl2 + w->ndata;
    w->rb_clusters = 1;
    w->rt_clusters = 1;
    for (;;) {
        uint64_t total = base + w->rb_clusters + w->rt_clusters;
        uint64_t rb = div_round_up(total, per_block);
        uint64_t rt = div_round_up(rb * 8, w->cs);

        if (rb <= w->rb_clusters && rt <= w->rt_clusters) {
            w->total = total;
            break;
        }
        w->rb_clusters = rb > w->rb_clusters ? rb : w->rb_clusters;
        w->rt_clusters = rt > w->rt_clusters ? rt : w->rt_clusters;
    }
    if (w->rt_clusters * w->cs > QCOW2_MAX_REFTABLE_BYTES) {
        qcow2_writer_free(w);
        return qbm_err(EFBIG, "output image too large");
    }
    w->rt_off = w->cs;
    w->rb_off = w->rt_off + w->rt_clusters * w->cs;
    w->l1_off = w->rb_off + w->rb_clusters * w->cs;
    w->l2_off = w->l1_off + w->l1_clusters * w->cs;
    w->data_off = w->l2_off + w->nl2 * w->cs;
    for (k = 0; k < nruns; k++) {
        if (runs[k].data) {
            w->run_host[k] = w->data_off + w->run_host[k] * w->cs;
        }
    }
    *ret = w;
    return 0;
}

void qcow2_writer_set_ordered(struct qcow2_writer *w)
{
    w->ordered = true;
}

uint64_t qcow2_writer_end(const struct qcow2_writer *w)
{
    return w->total * w->cs;
}

uint64_t qcow2_writer_run_host(const struct qcow2_writer *w, size_t run)
{
    return w->run_host[run];
}

static int write_header(struct qcow2_writer *w)
{
    uint8_t *h = qbm_calloc(1, w->cs);
    uint64_t pos = OUT_HEADER_LENGTH;
    int r;

    if (!h) {
        return -ENOMEM;
    }
    be32_store(h + QCOW2_HDR_MAGIC, QCOW2_MAGIC);
    be32_store(h + QCOW2_HDR_VERSION, 3);
    be32_store(h + QCOW2_HDR_CLUSTER_BITS, w->cluster_bits);
    be64_store(h + QCOW2_HDR_SIZE, w->size);
    be32_store(h + QCOW2_HDR_L1_SIZE, (uint32_t)w->l1_entries);
    be64_store(h + QCOW2_HDR_L1_TABLE_OFFSET, w->l1_off);
    be64_store(h + QCOW2_HDR_REFCOUNT_TABLE_OFFSET, w->rt_off);
    be32_store(h + QCOW2_HDR_REFCOUNT_TABLE_CLUSTERS, (uint32_t)w->rt_clusters);
    be32_store(h + QCOW2_HDR_REFCOUNT_ORDER, 4); /* 16-bit refcounts */
    be32_store(h + QCOW2_HDR_HEADER_LENGTH, OUT_HEADER_LENGTH);
    if (w->backing_fmt) {
        size_t len = strlen(w->backing_fmt);

        be32_store(h + pos, QCOW2_EXT_BACKING_FORMAT);
        be32_store(h + pos + 4, (uint32_t)len);
        memcpy(h + pos + 8, w->backing_fmt, len);
        pos += 8 + (len + 7) / 8 * 8;
    }
    pos += 8; /* end marker: zeros */
    if (w->backing) {
        size_t len = strlen(w->backing);

        if (len > QCOW2_MAX_BACKING_NAME || pos + len > w->cs) {
            free(h);
            return qbm_err(ENAMETOOLONG, "backing file name too long");
        }
        be64_store(h + QCOW2_HDR_BACKING_FILE_OFFSET, pos);
        be32_store(h + QCOW2_HDR_BACKING_FILE_SIZE, (uint32_t)len);
        memcpy(h + pos, w->backing, len);
    }
    r = qbm_io_pwrite(w->io, h, w->cs, 0);
    free(h);
    return r;
}

int qcow2_writer_finish(struct qcow2_writer *w)
{
    uint64_t l2e = w->cs / 8, i, cur_l2 = UINT64_MAX, l2_pos = 0;
    uint8_t *l2 = qbm_calloc(1, w->cs);
    uint8_t *l1 = qbm_calloc(w->l1_clusters, w->cs);
    uint8_t *blk = NULL;
    size_t k;
    int r = 0;

    if (!l2 || !l1) {
        r = -ENOMEM;
        goto out;
    }
    /* L2 tables in guest order, as planned. */
    for (k = 0; k < w->nruns && r == 0; k++) {
        const struct qcow2_out_run *run = &w->runs[k];

        for (i = 0; i < run->count && r == 0; i++) {
            uint64_t c = run->first + i;
            uint64_t e = run->data ? (w->run_host[k] + i * w->cs) | L2E_COPIED
                                   : L2E_ZERO;

            if (c / l2e != cur_l2) {
                if (cur_l2 != UINT64_MAX) {
                    r = qbm_io_pwrite(w->io, l2, w->cs,
                                      w->l2_off + l2_pos * w->cs);
                    l2_pos++;
                }
                memset(l2, 0, w->cs);
                cur_l2 = c / l2e;
                be64_store(l1 + cur_l2 * 8,
                           (w->l2_off + l2_pos * w->cs) | L2E_COPIED);
            }
            be64_store(l2 + (c % l2e) * 8, e);
        }
    }
    if (r == 0 && cur_l2 != UINT64_MAX) {
        r = qbm_io_pwrite(w->io, l2, w->cs, w->l2_off + l2_pos * w->cs);
    }
    if (r == 0) {
        r = qbm_io_pwrite(w->io, l1, w->l1_clusters * w->cs, w->l1_off);
    }
    /* Every cluster up to the end is used exactly once. */
    blk = qbm_calloc(w->rb_clusters, w->cs);
    if (r == 0 && !blk) {
        r = -ENOMEM;
    }
    for (i = 0; r == 0 && i < w->total; i++) {
        be16_store(blk + i * 2, 1);
    }
    if (r == 0) {
        r = qbm_io_pwrite(w->io, blk, w->rb_clusters * w->cs, w->rb_off);
    }
    if (r == 0) {
        uint8_t *rt = qbm_calloc(w->rt_clusters, w->cs);

        if (!rt) {
            r = -ENOMEM;
        } else {
            for (i = 0; i < w->rb_clusters; i++) {
                be64_store(rt + i * 8, w->rb_off + i * w->cs);
            }
            r = qbm_io_pwrite(w->io, rt, w->rt_clusters * w->cs, w->rt_off);
            free(rt);
        }
    }
    if (r == 0 && w->ordered) {
        r = qbm_io_flush(w->io);
    }
    if (r == 0) {
        r = write_header(w);
    }
    if (r == 0) {
        r = qbm_io_flush(w->io);
    }
out:
    free(l2);
    free(l1);
    free(blk);
    return r;
}
