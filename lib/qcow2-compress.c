/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * Decompression of compressed clusters (qcow2 spec, "Compressed Clusters
 * Descriptor", and compression_type in "Additional fields"): type 0 is
 * raw deflate (no zlib header, as QEMU writes it), type 1 is zstd frames.
 * The input length is only known to sector precision, so decoding stops
 * once the cluster is full and trailing bytes are ignored.
 */
#include <zlib.h>
#include <zstd.h>

#include "internal.h"

static int inflate_cluster(const uint8_t *in, size_t in_len, uint8_t *out,
                           size_t out_len)
{
    z_stream s;
    int zr;

    memset(&s, 0, sizeof(s));
    /* -15: raw deflate with the largest window, a superset of what QEMU
     * writes (-12). */
    if (inflateInit2(&s, -15) != Z_OK) {
        return qbm_err(ENOMEM, "cannot initialise zlib");
    }
    s.next_in = (Bytef *)in;
    s.avail_in = (uInt)in_len;
    s.next_out = out;
    s.avail_out = (uInt)out_len;
    zr = inflate(&s, Z_FINISH);
    inflateEnd(&s);
    if ((zr == Z_STREAM_END || zr == Z_BUF_ERROR) && s.avail_out == 0) {
        return 0;
    }
    return qbm_err(EINVAL, "deflate data does not decompress to a whole "
                           "cluster");
}

static int zstd_cluster(const uint8_t *in, size_t in_len, uint8_t *out,
                        size_t out_len)
{
    ZSTD_DCtx *dctx = ZSTD_createDCtx();
    ZSTD_inBuffer ib = { in, in_len, 0 };
    ZSTD_outBuffer ob = { out, out_len, 0 };
    size_t zr = 0;
    int r = 0;

    if (!dctx) {
        return qbm_err(ENOMEM, "cannot initialise zstd");
    }
    while (ob.pos < ob.size) {
        size_t in_before = ib.pos, out_before = ob.pos;

        zr = ZSTD_decompressStream(dctx, &ob, &ib);
        if (ZSTD_isError(zr)) {
            r = qbm_err(EINVAL, "zstd data is invalid: %s",
                        ZSTD_getErrorName(zr));
            break;
        }
        if (ib.pos == in_before && ob.pos == out_before) {
            r = qbm_err(EINVAL, "zstd data does not decompress to a whole "
                                "cluster");
            break;
        }
    }
    ZSTD_freeDCtx(dctx);
    return r;
}

int qcow2_decompress(unsigned type, const uint8_t *in, size_t in_len,
                     uint8_t *out, size_t out_len)
{
    switch (type) {
    case 0:
        return inflate_cluster(in, in_len, out, out_len);
    case 1:
        return zstd_cluster(in, in_len, out, out_len);
    default:
        return qbm_err(EOPNOTSUPP, "unknown compression type %u", type);
    }
}
