/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * Changing an image's backing file crash-safely (qcow2 spec, "Header":
 * backing_file_offset and backing_file_size; "Header extensions": the
 * backing file format, and the name stored after the extensions).
 *
 * The name is written to a free part of cluster 0 first, then the header's
 * backing_file_offset and backing_file_size are switched in one write
 * inside sector 0. The backing format extension must never disagree with a
 * live backing name (QEMU would read a qcow2 file as raw data), so it is
 * only changed while no backing file is set, or in the same single-sector
 * write as the pointer.
 */
#include <stdlib.h>

#include "internal.h"

static bool overlaps(uint64_t a, uint64_t alen, uint64_t b, uint64_t blen)
{
    return a < b + blen && b < a + alen;
}

static int set_backing(struct qbm_image *img, const char *name, const char *fmt)
{
    const struct qcow2_header *h = &img->hdr;
    struct qbm_io *io = img->io;
    uint64_t cs = img->cluster_size, end_pos, fmt_pos, fmt_len, ext_end, npos;
    uint64_t len = strlen(name), flen = strlen(fmt), old = 0, olen = 0;
    struct qcow2_header_layout lay = { 0 };
    bool fmt_same;
    uint8_t *c0;
    /* backing_file_offset and backing_file_size, switched in one write. */
    uint8_t ptr[QCOW2_HDR_CLUSTER_BITS - QCOW2_HDR_BACKING_FILE_OFFSET];
    int r;

    if (!img->rdwr || img->raw) {
        return qbm_err(EROFS, "image not opened for writing");
    }
    if (h->incompatible_features &
        (QBM_INCOMPAT_DIRTY | QBM_INCOMPAT_CORRUPT)) {
        return qbm_err(EUCLEAN, "the dirty or corrupt bit is set; run "
                                "'qemu-img check -r all' first");
    }
    if (len == 0 || len > QCOW2_MAX_BACKING_NAME || flen == 0 || flen >= 16) {
        return qbm_err(EINVAL, "invalid backing file name or format");
    }
    r = qcow2_header_layout_read(img, QCOW2_EXT_BACKING_FORMAT, &lay);
    c0 = lay.c0;
    if (r < 0) {
        goto out;
    }
    if (!lay.end_pos) {
        r = qbm_err(ENOTSUP, "header at 0x0: the extension list has no end "
                             "marker");
        goto out;
    }
    end_pos = lay.end_pos;
    fmt_pos = lay.ext_pos;
    fmt_len = lay.ext_len;
    fmt_same =
        fmt_pos && fmt_len == flen && memcmp(c0 + fmt_pos + 8, fmt, flen) == 0;
    ext_end = end_pos + 8;
    if (!fmt_pos) {
        ext_end += 8 + (flen + 7) / 8 * 8; /* the extension to insert */
    }
    if (h->backing_file_offset) {
        old = h->backing_file_offset;
        olen = h->backing_file_size;
    }
    /* Where the new name goes: the end of the cluster, or right after the
     * extensions, but never over the live name. */
    npos = cs - len;
    if (npos < ext_end || overlaps(npos, len, old, olen)) {
        npos = ext_end;
        if (npos + len > cs || overlaps(npos, len, old, olen)) {
            r = qbm_err(ENOSPC, "no room in the header cluster for the "
                                "backing file name");
            goto out;
        }
    }
    if (!fmt_same && old &&
        !(fmt_pos && (fmt_len + 7) / 8 == (flen + 7) / 8 &&
          qcow2_one_sector(QCOW2_HDR_BACKING_FILE_OFFSET,
                           fmt_pos + 8 + (flen + 7) / 8 * 8))) {
        r = qbm_err(ENOTSUP,
                    "cannot change the backing format of an image "
                    "that already has a backing file crash-safely here");
        goto out;
    }
    if (!fmt_same && !old) {
        /* No backing file yet: the format can change first, harmlessly. */
        uint8_t ext[24] = { 0 };
        uint64_t body = (flen + 7) / 8 * 8;

        if (fmt_pos && (fmt_len + 7) / 8 == (flen + 7) / 8) {
            be32_store(ext, (uint32_t)flen);
            memcpy(ext + 4, fmt, flen);
            r = qcow2_header_write(io, ext, 4 + body, fmt_pos + 4);
        } else if (!fmt_pos) {
            memcpy(ext, fmt, flen); /* body, then a new end marker */
            r = qcow2_header_write(io, ext, body + 8, end_pos + 8);
            be32_store(ext, QCOW2_EXT_BACKING_FORMAT);
            be32_store(ext + 4, (uint32_t)flen);
            r = r ? r : qcow2_header_write(io, ext, 8, end_pos);
        } else {
            r = qbm_err(ENOTSUP, "the backing format extension has an "
                                 "unexpected size");
        }
        if (r < 0) {
            goto out;
        }
    }
    r = qcow2_header_write(io, name, len, npos);
    if (r < 0) {
        goto out;
    }
    be64_store(ptr, npos); /* ptr starts at backing_file_offset */
    be32_store(ptr + QCOW2_HDR_BACKING_FILE_SIZE -
                   QCOW2_HDR_BACKING_FILE_OFFSET,
               (uint32_t)len);
    if (!fmt_same && old) {
        /* Pointer and format together, in one sector-0 write. */
        uint64_t body = (flen + 7) / 8 * 8, wend = fmt_pos + 8 + body;

        memcpy(c0 + QCOW2_HDR_BACKING_FILE_OFFSET, ptr, sizeof(ptr));
        be32_store(c0 + fmt_pos + 4, (uint32_t)flen);
        memset(c0 + fmt_pos + 8, 0, body);
        memcpy(c0 + fmt_pos + 8, fmt, flen);
        r = qcow2_header_write_span(io, c0, QCOW2_HDR_BACKING_FILE_OFFSET,
                                    wend);
    } else {
        r = qcow2_header_write(io, ptr, sizeof(ptr),
                               QCOW2_HDR_BACKING_FILE_OFFSET);
    }
    if (r == 0) {
        r = qbm_image_reload(img);
    }
out:
    free(c0);
    return r;
}

QBM_API int qbm_image_set_backing(struct qbm_image *img, const char *backing,
                                  const char *format)
{
    if (!backing || !format) {
        return qbm_public_ret(qbm_err(EINVAL, "invalid arguments"));
    }
    return qbm_public_ret(set_backing(img, backing, format));
}
