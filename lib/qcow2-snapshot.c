/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * Internal snapshot table (qcow2 spec, "Snapshots"): kept so that later
 * refcount checks can walk snapshot L1 tables; never rewritten by qbm.
 */
#include <stdlib.h>

#include "internal.h"

int qcow2_snapshots_load(struct qbm_image *img)
{
    const struct qcow2_header *h = &img->hdr;
    uint64_t off = h->snapshots_offset;
    uint8_t hdrbuf[QCOW2_SN_HEADER_LEN];
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
    img->snapshots = qbm_calloc(h->nb_snapshots, sizeof(*img->snapshots));
    if (!img->snapshots) {
        return -ENOMEM;
    }
    for (i = 0; i < h->nb_snapshots; i++) {
        struct qcow2_snapshot *sn = &img->snapshots[i];
        uint32_t extra, id_size, name_size;

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
        extra = be32_load(hdrbuf + 36);
        if (extra > QCOW2_SN_MAX_EXTRA) {
            return qbm_err(EINVAL,
                           "snapshot table entry %u at 0x%llx: "
                           "extra data size %u too large",
                           i, (unsigned long long)off, extra);
        }
        if (sn->l1_size > QCOW2_MAX_L1_BYTES / 8 ||
            (sn->l1_size &&
             !is_aligned(sn->l1_table_offset, img->cluster_size))) {
            return qbm_err(EINVAL,
                           "snapshot table entry %u at 0x%llx: "
                           "invalid L1 table",
                           i, (unsigned long long)off);
        }
        off += QCOW2_SN_HEADER_LEN + extra + id_size + name_size;
        off = (off + 7) & ~7ull;
        /* QEMU caps the whole table at 64 MiB. */
        if (off - h->snapshots_offset > (64u << 20)) {
            return qbm_err(EINVAL,
                           "snapshot table at 0x%llx: larger than "
                           "64 MiB",
                           (unsigned long long)h->snapshots_offset);
        }
    }
    img->nb_snapshots = h->nb_snapshots;
    img->snapshots_size = off - h->snapshots_offset;
    return 0;
}
