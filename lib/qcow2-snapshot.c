/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * Internal snapshot table (qcow2 spec, "Snapshots"): kept so that later
 * refcount checks can walk snapshot L1 tables; never rewritten by qbm.
 */
#include <stdint.h>
#include <stdlib.h>

#include "internal.h"

void qcow2_snapshots_free(struct qcow2_snapshot *sn, uint32_t n)
{
    uint32_t i;

    for (i = 0; sn && i < n; i++) {
        free(sn[i].id);
        free(sn[i].name);
    }
    free(sn);
}

/* The id and name that follow an entry's header and extra data, each cut
 * at a NUL as QEMU reads them. */
static int snapshot_strings(struct qbm_image *img, struct qcow2_snapshot *sn,
                            uint64_t off, uint32_t id_size, uint32_t name_size)
{
    char *buf = qbm_malloc((size_t)id_size + name_size + 1);
    int r;

    if (!buf) {
        return -ENOMEM;
    }
    r = qbm_image_read_meta(img, buf, (size_t)id_size + name_size, off,
                            "snapshot table entry");
    if (r == 0) {
        sn->id = qbm_strndup(buf, id_size);
        sn->name = qbm_strndup(buf + id_size, name_size);
        if (!sn->id || !sn->name) {
            r = -ENOMEM;
        }
    }
    free(buf);
    return r;
}

/* A big-endian field of an entry's extra data. gcc 12's -fanalyzer takes
 * the bytes qbm_image_read_meta() read into the zeroed buffer for
 * uninitialized (a false positive: the read fills all it is asked for,
 * zeros past the end of the file), so its warning is off here only. */
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wanalyzer-use-of-uninitialized-value"
static uint64_t extra_u64(const uint8_t *extra, size_t at)
{
    uint64_t v = 0;
    size_t k;

    for (k = 0; k < 8; k++) {
        v = v << 8 | extra[at + k];
    }
    return v;
}
#pragma GCC diagnostic pop

/* Entry i at *off; on success *off is the next entry's offset. */
static int snapshot_load(struct qbm_image *img, struct qcow2_snapshot *sn,
                         uint32_t i, uint64_t *next)
{
    uint64_t off = *next;
    uint8_t hdrbuf[QCOW2_SN_HEADER_LEN], extrabuf[24] = { 0 };
    uint32_t extra, id_size, name_size;
    int r;

    r = qbm_image_read_meta(img, hdrbuf, sizeof(hdrbuf), off,
                            "snapshot table entry");
    if (r < 0) {
        return r;
    }
    sn->entry_offset = off;
    sn->l1_table_offset = be64_load(hdrbuf);
    sn->l1_size = be32_load(hdrbuf + 8);
    id_size = be16_load(hdrbuf + 12);
    name_size = be16_load(hdrbuf + 14);
    sn->date_sec = be32_load(hdrbuf + 16);
    sn->date_nsec = be32_load(hdrbuf + 20);
    sn->vm_clock_nsec = be64_load(hdrbuf + 24);
    sn->vm_state_size = be32_load(hdrbuf + 32);
    extra = be32_load(hdrbuf + 36);
    if (extra > QCOW2_SN_MAX_EXTRA) {
        return qbm_err(EINVAL,
                       "snapshot table entry %u at 0x%llx: "
                       "extra data size %u too large",
                       i, (unsigned long long)off, extra);
    }
    if (sn->l1_size > QCOW2_MAX_L1_BYTES / 8 ||
        (sn->l1_size && !is_aligned(sn->l1_table_offset, img->cluster_size))) {
        return qbm_err(EINVAL,
                       "snapshot table entry %u at 0x%llx: "
                       "invalid L1 table",
                       i, (unsigned long long)off);
    }
    /* Extra data: vm_state_size_large (8), disk_size (8), icount (8). */
    if (extra) {
        r = qbm_image_read_meta(
            img, extrabuf, extra < sizeof(extrabuf) ? extra : sizeof(extrabuf),
            off + QCOW2_SN_HEADER_LEN, "snapshot table entry");
        if (r < 0) {
            return r;
        }
    }
    if (extra >= 8) {
        sn->vm_state_size = extra_u64(extrabuf, 0);
    }
    sn->icount = extra >= 24 ? extra_u64(extrabuf, 16) : UINT64_MAX;
    r = snapshot_strings(img, sn, off + QCOW2_SN_HEADER_LEN + extra, id_size,
                         name_size);
    if (r < 0) {
        return r;
    }
    off += QCOW2_SN_HEADER_LEN + extra + id_size + name_size;
    *next = (off + 7) & ~7ull;
    return 0;
}

int qcow2_snapshots_load(struct qbm_image *img)
{
    const struct qcow2_header *h = &img->hdr;
    uint64_t off = h->snapshots_offset;
    struct qcow2_snapshot *sn;
    uint32_t i;
    int r;

    if (h->nb_snapshots == 0) {
        return 0;
    }
    if (h->nb_snapshots > QCOW2_MAX_SNAPSHOTS) {
        return qbm_err(EINVAL,
                       "snapshot table at 0x%llx: %u snapshots is "
                       "more than 65536",
                       (unsigned long long)off, h->nb_snapshots);
    }
    if (off == 0 || !is_aligned(off, img->cluster_size)) {
        return qbm_err(EINVAL,
                       "snapshot table at 0x%llx: offset not "
                       "cluster aligned",
                       (unsigned long long)off);
    }
    sn = qbm_calloc(h->nb_snapshots, sizeof(*sn));
    if (!sn) {
        return -ENOMEM;
    }
    for (i = 0; i < h->nb_snapshots; i++) {
        r = snapshot_load(img, &sn[i], i, &off);
        if (r < 0) {
            qcow2_snapshots_free(sn, i + 1);
            return r;
        }
        /* QEMU caps the whole table at 64 MiB. */
        if (off - h->snapshots_offset > (64u << 20)) {
            qcow2_snapshots_free(sn, i + 1);
            return qbm_err(EINVAL,
                           "snapshot table at 0x%llx: larger than "
                           "64 MiB",
                           (unsigned long long)h->snapshots_offset);
        }
    }
    img->snapshots = sn;
    img->nb_snapshots = h->nb_snapshots;
    img->snapshots_size = off - h->snapshots_offset;
    return 0;
}
