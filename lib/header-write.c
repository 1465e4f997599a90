/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * Writing cluster 0 crash-safely (qcow2 spec, "Header" and "Header
 * extensions"; reference notes sections 2 and 7): finding the extensions
 * again in the bytes on disk, and switching the bitmaps extension with
 * writes that stay inside one 512-byte sector, each followed by a flush.
 * header.c decodes the same bytes; the transactions of txn.c and alloc.c
 * and the backing-file change of backing.c write them through here.
 */
#include <stdlib.h>

#include "internal.h"

int qcow2_header_write(struct qbm_io *io, const void *buf, size_t len,
                       uint64_t off)
{
    int r = qbm_io_pwrite(io, buf, len, off);

    return r < 0 ? r : qbm_io_flush(io);
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
    while (pos + 8 <= end) {
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
        pos += 8 + ((uint64_t)len + 7) / 8 * 8;
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
        uint64_t need = lay->end_pos + 40; /* extension + end marker */

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
        !qcow2_one_sector(88, lay->end_pos + 8)) {
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
 */
int qcow2_header_bitmaps_switch(struct qbm_image *img,
                                struct qcow2_header_layout *lay, uint32_t nb,
                                uint64_t dir_offset, uint64_t dir_size)
{
    struct qbm_io *io = img->io;
    uint8_t *c0 = lay->c0;
    uint64_t old_ac = be64_load(c0 + 88);
    uint64_t new_ac = (old_ac & QBM_AUTOCLEAR_DATA_FILE_RAW) |
                      (nb ? QBM_AUTOCLEAR_BITMAPS : 0);
    uint8_t ext[24], ac[8];
    uint64_t p;
    int r;

    be32_store(ext, nb);
    be32_store(ext + 4, 0);
    be64_store(ext + 8, dir_size);
    be64_store(ext + 16, dir_offset);
    be64_store(ac, new_ac);

    if (nb > 0 && lay->ext_pos) {
        p = lay->ext_pos;
        if ((old_ac & QBM_AUTOCLEAR_BITMAPS) &&
            qcow2_one_sector(88, p + 32)) {
            memcpy(c0 + 88, ac, 8);
            memcpy(c0 + p + 8, ext, 24);
            return qcow2_header_write(io, c0 + 88, p + 32 - 88, 88);
        }
        if ((old_ac & QBM_AUTOCLEAR_BITMAPS) && new_ac == old_ac &&
            qcow2_one_sector(p + 8, p + 32)) {
            return qcow2_header_write(io, ext, 24, p + 8);
        }
        /* Poison first, as QEMU does for in-place updates. */
        be64_store(c0 + 88, old_ac & ~(uint64_t)QBM_AUTOCLEAR_BITMAPS);
        r = qcow2_header_write(io, c0 + 88, 8, 88);
        r = r ? r : qcow2_header_write(io, ext, 24, p + 8);
        return r ? r : qcow2_header_write(io, ac, 8, 88);
    }
    if (nb > 0) {
        const struct qcow2_header *h = &img->hdr;
        uint8_t hdr8[8];

        p = lay->end_pos;
        if (h->backing_file_offset && h->backing_file_offset < p + 40) {
            /* Move the backing name out of the way: copy, then switch the
             * 8-byte pointer (one aligned write). */
            uint64_t nbo = img->cluster_size - h->backing_file_size;
            uint8_t off8[8];

            r = qcow2_header_write(io, c0 + h->backing_file_offset,
                                   h->backing_file_size, nbo);
            be64_store(off8, nbo);
            r = r ? r : qcow2_header_write(io, off8, 8, 8);
            if (r) {
                return r;
            }
        }
        /* The extension's body and a new end marker go past the current
         * end marker, where readers do not look. */
        memcpy(c0 + p + 8, ext, 24);
        memset(c0 + p + 32, 0, 8);
        r = qcow2_header_write(io, c0 + p + 8, 32, p + 8);
        if (r) {
            return r;
        }
        be32_store(hdr8, QCOW2_EXT_BITMAPS);
        be32_store(hdr8 + 4, 24);
        if (qcow2_one_sector(88, p + 8)) {
            memcpy(c0 + 88, ac, 8);
            memcpy(c0 + p, hdr8, 8);
            return qcow2_header_write(io, c0 + 88, p + 8 - 88, 88);
        }
        r = qcow2_header_write(io, hdr8, 8, p);
        return r ? r : qcow2_header_write(io, ac, 8, 88);
    }
    if (lay->ext_pos) {
        p = lay->ext_pos;
        if (lay->ext_last) {
            static const uint8_t zero8[8];

            if (qcow2_one_sector(88, p + 8)) {
                memcpy(c0 + 88, ac, 8);
                memset(c0 + p, 0, 8);
                return qcow2_header_write(io, c0 + 88, p + 8 - 88, 88);
            }
            r = qcow2_header_write(io, ac, 8, 88);
            return r ? r : qcow2_header_write(io, zero8, 8, p);
        }
        /* Other extensions follow: shift them down by 32 bytes in one
         * write, which the plan made sure fits in sector 0. */
        memcpy(c0 + 88, ac, 8);
        memmove(c0 + p, c0 + p + 32, lay->end_pos + 8 - (p + 32));
        memset(c0 + lay->end_pos - 24, 0, 32);
        return qcow2_header_write(io, c0 + 88, lay->end_pos + 8 - 88, 88);
    }
    if (new_ac != old_ac) {
        return qcow2_header_write(io, ac, 8, 88);
    }
    return 0;
}
