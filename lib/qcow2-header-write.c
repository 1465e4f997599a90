/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * Writing cluster 0 crash-safely (qcow2 spec, "Header" and "Header
 * extensions"; docs/design.md, "Crash-safe transactions"): finding the
 * extensions again in the bytes on disk, and switching the bitmaps
 * extension with writes that stay inside one 512-byte sector, each
 * followed by a flush. qcow2-header.c decodes the same bytes; the transactions
 * of txn.c and txn-alloc.c and the backing-file change of op-backing.c write
 * them through here.
 */
#include <stdlib.h>

#include "internal.h"

/* An extension starts with its magic and length (qcow2 spec, "Header
 * extensions"); the end marker is such a header with magic 0. */
#define EXT_HDR 8
/* The bitmaps extension's body (qcow2 spec, "Bitmaps extension"). */
enum {
    BITMAPS_NB_BITMAPS = 0,
    BITMAPS_RESERVED = 4,
    BITMAPS_DIR_SIZE = 8,
    BITMAPS_DIR_OFFSET = 16,
    BITMAPS_LEN = 24,
};
#define AUTOCLEAR QCOW2_HDR_AUTOCLEAR_FEATURES

int qcow2_header_write(struct qbm_io *io, const void *buf, size_t len,
                       uint64_t off)
{
    int r = qbm_io_pwrite(io, buf, len, off);

    return r < 0 ? r : qbm_io_flush(io);
}

int qcow2_header_write_span(struct qbm_io *io, const uint8_t *c0,
                            uint64_t start, uint64_t end)
{
    return qcow2_header_write(io, c0 + start, end - start, start);
}

int qcow2_header_layout_read(struct qbm_image *img, uint32_t magic,
                             struct qcow2_header_layout *lay)
{
    const struct qcow2_header *h = &img->hdr;
    uint64_t cs = img->cluster_size;
    uint64_t pos = h->header_length;
    uint64_t end = h->backing_file_offset ? h->backing_file_offset : cs;
    uint64_t prev = 0;
    int r;

    memset(lay, 0, sizeof(*lay));
    lay->c0 = qbm_malloc(cs);
    if (!lay->c0) {
        return -ENOMEM;
    }
    r = qbm_io_pread(img->io, lay->c0, cs, 0);
    if (r < 0) {
        return r;
    }
    /* The list was validated at open; find the positions again. */
    while (pos + EXT_HDR <= end) {
        uint32_t m = be32_load(lay->c0 + pos);
        uint32_t len = be32_load(lay->c0 + pos + 4);

        if (m == QCOW2_EXT_END) {
            lay->end_pos = pos;
            lay->ext_last = lay->ext_pos && prev == lay->ext_pos;
            return 0;
        }
        if (m == magic) {
            lay->ext_pos = pos;
            lay->ext_len = len;
        }
        prev = pos;
        pos += EXT_HDR + ((uint64_t)len + 7) / 8 * 8;
    }
    return 0; /* no end marker: end_pos stays 0 */
}

int qcow2_header_bitmaps_plan(const struct qbm_image *img,
                              const struct qcow2_header_layout *lay,
                              uint32_t nb)
{
    const struct qcow2_header *h = &img->hdr;
    uint64_t cs = img->cluster_size;

    if (!lay->end_pos) {
        return qbm_err(ENOTSUP, "header at 0x0: the extension list has no "
                                "end marker; qbm will not rewrite it");
    }
    if (nb > 0 && !lay->ext_pos) {
        /* The extension, then a new end marker. */
        uint64_t need = lay->end_pos + EXT_HDR + BITMAPS_LEN + EXT_HDR;

        if (h->backing_file_offset && h->backing_file_offset < need &&
            cs - h->backing_file_size < need) {
            return qbm_err(ENOSPC, "header at 0x0: no room in the header "
                                   "cluster for the bitmaps extension");
        }
        if (need > cs) {
            return qbm_err(ENOSPC, "header at 0x0: no room in the header "
                                   "cluster for the bitmaps extension");
        }
    }
    if (nb == 0 && lay->ext_pos && !lay->ext_last &&
        !qcow2_one_sector(AUTOCLEAR, lay->end_pos + EXT_HDR)) {
        return qbm_err(ENOTSUP, "header at 0x0: other extensions follow the "
                                "bitmaps extension, so it cannot be removed "
                                "crash-safely");
    }
    return 0;
}

/*
 * Make the new directory live. Each step is a write that cannot be torn
 * (it stays inside one 512-byte sector) followed by a flush, so every
 * crash leaves either the old or the new bitmaps, or the bitmaps "stale"
 * (autoclear bit clear: QEMU then ignores them and only leaks clusters).
 * c0 follows what is on disk where later steps write from it.
 */
int qcow2_header_bitmaps_switch(struct qbm_image *img,
                                struct qcow2_header_layout *lay, uint32_t nb,
                                uint64_t dir_offset, uint64_t dir_size)
{
    struct qbm_io *io = img->io;
    uint8_t *c0 = lay->c0;
    uint64_t old_ac = be64_load(c0 + AUTOCLEAR);
    uint64_t new_ac = (old_ac & QBM_AUTOCLEAR_DATA_FILE_RAW) |
                      (nb ? QBM_AUTOCLEAR_BITMAPS : 0);
    uint8_t ext[BITMAPS_LEN], ac[8];
    uint64_t p, body, body_end;
    int r;

    be32_store(ext + BITMAPS_NB_BITMAPS, nb);
    be32_store(ext + BITMAPS_RESERVED, 0);
    be64_store(ext + BITMAPS_DIR_SIZE, dir_size);
    be64_store(ext + BITMAPS_DIR_OFFSET, dir_offset);
    be64_store(ac, new_ac);

    if (nb > 0 && lay->ext_pos) {
        p = lay->ext_pos;
        body = p + EXT_HDR;
        body_end = body + BITMAPS_LEN;
        if ((old_ac & QBM_AUTOCLEAR_BITMAPS) &&
            qcow2_one_sector(AUTOCLEAR, body_end)) {
            memcpy(c0 + AUTOCLEAR, ac, sizeof(ac));
            memcpy(c0 + body, ext, BITMAPS_LEN);
            return qcow2_header_write_span(io, c0, AUTOCLEAR, body_end);
        }
        if ((old_ac & QBM_AUTOCLEAR_BITMAPS) && new_ac == old_ac &&
            qcow2_one_sector(body, body_end)) {
            return qcow2_header_write(io, ext, BITMAPS_LEN, body);
        }
        /* Poison first, as QEMU does for in-place updates. */
        be64_store(c0 + AUTOCLEAR, old_ac & ~(uint64_t)QBM_AUTOCLEAR_BITMAPS);
        r = qcow2_header_write_span(io, c0, AUTOCLEAR, AUTOCLEAR + sizeof(ac));
        r = r ? r : qcow2_header_write(io, ext, BITMAPS_LEN, body);
        return r ? r : qcow2_header_write(io, ac, sizeof(ac), AUTOCLEAR);
    }
    if (nb > 0) {
        const struct qcow2_header *h = &img->hdr;
        uint8_t hdr8[EXT_HDR];

        p = lay->end_pos;
        body = p + EXT_HDR;
        body_end = body + BITMAPS_LEN;
        if (h->backing_file_offset &&
            h->backing_file_offset < body_end + EXT_HDR) {
            /* Move the backing name out of the way: copy, then switch the
             * 8-byte pointer (one aligned write). */
            uint64_t nbo = img->cluster_size - h->backing_file_size;
            uint8_t off8[8];

            r = qcow2_header_write(io, c0 + h->backing_file_offset,
                                   h->backing_file_size, nbo);
            be64_store(off8, nbo);
            r = r ? r
                  : qcow2_header_write(io, off8, sizeof(off8),
                                       QCOW2_HDR_BACKING_FILE_OFFSET);
            if (r) {
                return r;
            }
        }
        /* The extension's body and a new end marker go past the current
         * end marker, where readers do not look. */
        memcpy(c0 + body, ext, BITMAPS_LEN);
        memset(c0 + body_end, 0, EXT_HDR);
        r = qcow2_header_write_span(io, c0, body, body_end + EXT_HDR);
        if (r) {
            return r;
        }
        be32_store(hdr8, QCOW2_EXT_BITMAPS);
        be32_store(hdr8 + 4, BITMAPS_LEN);
        if (qcow2_one_sector(AUTOCLEAR, body)) {
            memcpy(c0 + AUTOCLEAR, ac, sizeof(ac));
            memcpy(c0 + p, hdr8, EXT_HDR);
            return qcow2_header_write_span(io, c0, AUTOCLEAR, body);
        }
        r = qcow2_header_write(io, hdr8, EXT_HDR, p);
        return r ? r : qcow2_header_write(io, ac, sizeof(ac), AUTOCLEAR);
    }
    if (lay->ext_pos) {
        p = lay->ext_pos;
        if (lay->ext_last) {
            static const uint8_t zero8[EXT_HDR];

            /* The end marker goes where the extension's header was. */
            if (qcow2_one_sector(AUTOCLEAR, p + EXT_HDR)) {
                memcpy(c0 + AUTOCLEAR, ac, sizeof(ac));
                memset(c0 + p, 0, EXT_HDR);
                return qcow2_header_write_span(io, c0, AUTOCLEAR, p + EXT_HDR);
            }
            r = qcow2_header_write(io, ac, sizeof(ac), AUTOCLEAR);
            return r ? r : qcow2_header_write(io, zero8, EXT_HDR, p);
        }
        /* Other extensions follow: shift them (and the end marker) down
         * over the extension in one write, which the plan made sure fits
         * in sector 0. */
        body_end = p + EXT_HDR + BITMAPS_LEN;
        memcpy(c0 + AUTOCLEAR, ac, sizeof(ac));
        memmove(c0 + p, c0 + body_end, lay->end_pos + EXT_HDR - body_end);
        memset(c0 + lay->end_pos + EXT_HDR - (body_end - p), 0, body_end - p);
        return qcow2_header_write_span(io, c0, AUTOCLEAR,
                                       lay->end_pos + EXT_HDR);
    }
    if (new_ac != old_ac) {
        return qcow2_header_write(io, ac, sizeof(ac), AUTOCLEAR);
    }
    return 0;
}
