/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * Cluster 0: the fixed header and the header extensions
 * (qcow2 spec, "Header", "Header extensions", "Feature name table").
 */
#include <stdio.h>
#include <stdlib.h>

#include "internal.h"

void qcow2_header_free(struct qcow2_header *hdr)
{
    size_t i;

    if (!hdr) {
        return;
    }
    for (i = 0; i < hdr->nb_exts; i++) {
        free(hdr->exts[i].data);
    }
    free(hdr->exts);
    free(hdr->features);
    free(hdr->backing_file);
    free(hdr->backing_format);
    free(hdr->data_file);
    memset(hdr, 0, sizeof(*hdr));
}

/* The version 2 header stops where the version 3 fields begin; the version
 * 3 header where the additional fields begin. */
_Static_assert(QCOW2_V2_HEADER_LEN == QCOW2_HDR_INCOMPATIBLE_FEATURES,
               "version 2 header length");
_Static_assert(QCOW2_V3_HEADER_LEN == QCOW2_HDR_COMPRESSION_TYPE,
               "version 3 header length");

static int decode_fixed(const uint8_t *b, size_t len, struct qcow2_header *h)
{
    if (len < QCOW2_V2_HEADER_LEN) {
        return qbm_err(EINVAL,
                       "not a qcow2 image: file too short (%zu "
                       "bytes)",
                       len);
    }
    if (be32_load(b + QCOW2_HDR_MAGIC) != QCOW2_MAGIC) {
        return qbm_err(EINVAL, "not a qcow2 image (bad magic)");
    }
    h->version = be32_load(b + QCOW2_HDR_VERSION);
    h->backing_file_offset = be64_load(b + QCOW2_HDR_BACKING_FILE_OFFSET);
    h->backing_file_size = be32_load(b + QCOW2_HDR_BACKING_FILE_SIZE);
    h->cluster_bits = be32_load(b + QCOW2_HDR_CLUSTER_BITS);
    h->size = be64_load(b + QCOW2_HDR_SIZE);
    h->crypt_method = be32_load(b + QCOW2_HDR_CRYPT_METHOD);
    h->l1_size = be32_load(b + QCOW2_HDR_L1_SIZE);
    h->l1_table_offset = be64_load(b + QCOW2_HDR_L1_TABLE_OFFSET);
    h->refcount_table_offset = be64_load(b + QCOW2_HDR_REFCOUNT_TABLE_OFFSET);
    h->refcount_table_clusters =
        be32_load(b + QCOW2_HDR_REFCOUNT_TABLE_CLUSTERS);
    h->nb_snapshots = be32_load(b + QCOW2_HDR_NB_SNAPSHOTS);
    h->snapshots_offset = be64_load(b + QCOW2_HDR_SNAPSHOTS_OFFSET);

    if (h->version != 2 && h->version != 3) {
        return qbm_err(EOPNOTSUPP,
                       "header at 0x0: unsupported qcow2 "
                       "version %u",
                       h->version);
    }
    if (h->cluster_bits < QCOW2_MIN_CLUSTER_BITS ||
        h->cluster_bits > QCOW2_MAX_CLUSTER_BITS) {
        return qbm_err(EINVAL,
                       "header at 0x0: cluster_bits %u out of range "
                       "9..21",
                       h->cluster_bits);
    }
    h->cluster_size = 1ull << h->cluster_bits;

    if (h->version == 2) {
        h->refcount_order = 4;
        h->header_length = QCOW2_V2_HEADER_LEN;
        return 0;
    }
    if (len < QCOW2_V3_HEADER_LEN) {
        return qbm_err(EINVAL, "header at 0x0: truncated version 3 header");
    }
    h->incompatible_features = be64_load(b + QCOW2_HDR_INCOMPATIBLE_FEATURES);
    h->compatible_features = be64_load(b + QCOW2_HDR_COMPATIBLE_FEATURES);
    h->autoclear_features = be64_load(b + QCOW2_HDR_AUTOCLEAR_FEATURES);
    h->refcount_order = be32_load(b + QCOW2_HDR_REFCOUNT_ORDER);
    h->header_length = be32_load(b + QCOW2_HDR_HEADER_LENGTH);
    if (h->header_length < QCOW2_V3_HEADER_LEN || h->header_length % 8 != 0 ||
        h->header_length > h->cluster_size || h->header_length > len) {
        return qbm_err(EINVAL, "header at 0x0: header_length %u is invalid",
                       h->header_length);
    }
    /* Additional fields are absent when the header is too short for them
     * (spec: "Additional fields"). */
    if (h->header_length > QCOW2_HDR_COMPRESSION_TYPE) {
        h->compression_type = b[QCOW2_HDR_COMPRESSION_TYPE];
    }
    return 0;
}

static int add_ext(struct qcow2_header *h, uint32_t magic, uint32_t elen,
                   uint64_t off, const uint8_t *data)
{
    struct qcow2_ext *exts, *e;

    exts = qbm_realloc(h->exts, (h->nb_exts + 1) * sizeof(*exts));
    if (!exts) {
        return -ENOMEM;
    }
    h->exts = exts;
    e = &exts[h->nb_exts];
    e->magic = magic;
    e->len = elen;
    e->offset = off;
    e->data = qbm_malloc(elen);
    if (!e->data) {
        return -ENOMEM;
    }
    memcpy(e->data, data, elen);
    h->nb_exts++;
    return 0;
}

static int decode_feature_table(struct qcow2_header *h, const uint8_t *d,
                                uint32_t elen)
{
    size_t n = elen / 48, i;

    h->features = qbm_calloc(n ? n : 1, sizeof(*h->features));
    if (!h->features) {
        return -ENOMEM;
    }
    for (i = 0; i < n; i++) {
        const uint8_t *e = d + i * 48;

        h->features[i].type = e[0];
        h->features[i].bit = e[1];
        memcpy(h->features[i].name, e + 2, 46);
        h->features[i].name[46] = '\0';
        if (e[0] < 3 && e[1] < 64 && h->features[i].name[0] &&
            !h->feature_names[e[0]][e[1]]) {
            h->feature_names[e[0]][e[1]] = h->features[i].name;
        }
    }
    h->nb_features = n;
    return 0;
}

static int decode_string_ext(char **dst, const uint8_t *d, uint32_t elen)
{
    *dst = qbm_strndup((const char *)d, elen);
    return *dst ? 0 : -ENOMEM;
}

/* An extension of a fixed size with another length is refused, as QEMU
 * refuses it. */
static int expect_ext_length(const char *what, uint64_t off, uint32_t elen,
                             uint32_t want)
{
    if (elen != want) {
        return qbm_err(EINVAL, "%s at 0x%llx: length %u, expected %u", what,
                       (unsigned long long)off, elen, want);
    }
    return 0;
}

static int decode_extensions(const uint8_t *b, struct qcow2_header *h)
{
    uint64_t off = h->header_length;
    uint64_t end =
        h->backing_file_offset ? h->backing_file_offset : h->cluster_size;
    int r;

    while (off < end) {
        uint32_t magic, elen;
        uint64_t next;
        const uint8_t *d;
        size_t i;

        if (end - off < 8) {
            return qbm_err(EINVAL,
                           "header extension at 0x%llx: extension "
                           "header crosses the end of the header area",
                           (unsigned long long)off);
        }
        magic = be32_load(b + off);
        elen = be32_load(b + off + 4);
        if (magic == QCOW2_EXT_END) {
            h->ext_end = off + 8;
            return 0;
        }
        if (elen > end - off - 8) {
            return qbm_err(EINVAL,
                           "header extension 0x%08x at 0x%llx: "
                           "length %u runs past the header area",
                           magic, (unsigned long long)off, elen);
        }
        d = b + off + 8;
        for (i = 0; i < h->nb_exts; i++) {
            if (h->exts[i].magic == magic) {
                return qbm_err(EINVAL,
                               "header extension 0x%08x at 0x%llx: "
                               "appears twice",
                               magic, (unsigned long long)off);
            }
        }
        switch (magic) {
        case QCOW2_EXT_BACKING_FORMAT:
            if (elen >= 16) {
                return qbm_err(EINVAL,
                               "backing format extension at 0x%llx: "
                               "length %u too large",
                               (unsigned long long)off, elen);
            }
            r = decode_string_ext(&h->backing_format, d, elen);
            break;
        case QCOW2_EXT_FEATURE_TABLE:
            r = decode_feature_table(h, d, elen);
            break;
        case QCOW2_EXT_DATA_FILE:
            r = decode_string_ext(&h->data_file, d, elen);
            break;
        case QCOW2_EXT_BITMAPS:
            r = expect_ext_length("bitmaps extension", off, elen, 24);
            break;
        case QCOW2_EXT_CRYPTO:
            r = expect_ext_length("encryption header pointer", off, elen, 16);
            break;
        default:
            r = 0; /* unknown: kept as bytes */
            break;
        }
        if (r < 0) {
            return r;
        }
        r = add_ext(h, magic, elen, off, d);
        if (r < 0) {
            return r;
        }
        next = off + 8 + ((uint64_t)elen + 7) / 8 * 8;
        off = next;
    }
    /* No end marker before the area ends: QEMU stops there too. */
    h->ext_end = end;
    return 0;
}

/* The name of a feature bit, from the image's table or the spec. */
static const char *spec_feature_name(unsigned type, unsigned bit)
{
    static const char *const incompat[] = {
        "dirty bit",        "corrupt bit",         "external data file",
        "compression type", "extended L2 entries",
    };
    static const char *const autoclear[] = { "bitmaps", "raw external data" };

    if (type == QBM_FEATURE_INCOMPATIBLE && bit < QBM_ARRAY_SIZE(incompat)) {
        return incompat[bit];
    }
    if (type == QBM_FEATURE_COMPATIBLE && bit == 0) {
        return "lazy refcounts";
    }
    if (type == QBM_FEATURE_AUTOCLEAR && bit < QBM_ARRAY_SIZE(autoclear)) {
        return autoclear[bit];
    }
    return NULL;
}

const char *qcow2_feature_name(const struct qcow2_header *h, unsigned type,
                               unsigned bit)
{
    if (type < 3 && bit < 64 && h->feature_names[type][bit]) {
        return h->feature_names[type][bit];
    }
    return spec_feature_name(type, bit);
}

static int check_features(struct qcow2_header *h)
{
    uint64_t unknown = h->incompatible_features & ~QCOW2_INCOMPAT_KNOWN;

    if (unknown) {
        char names[512] = "";
        size_t used = 0;
        unsigned bit;

        for (bit = 0; bit < 64; bit++) {
            const char *name;

            if (!(unknown & (1ull << bit))) {
                continue;
            }
            name = qcow2_feature_name(h, QBM_FEATURE_INCOMPATIBLE, bit);
            if (used < sizeof(names)) {
                int n;
                if (name) {
                    n = snprintf(names + used, sizeof(names) - used, "%s%s",
                                 used ? ", " : "", name);
                } else {
                    n = snprintf(names + used, sizeof(names) - used, "%sbit %u",
                                 used ? ", " : "", bit);
                }
                used += n > 0 ? (size_t)n : 0;
            }
        }
        return qbm_err(EOPNOTSUPP,
                       "header at 0x0: unsupported incompatible "
                       "feature(s): %s",
                       names);
    }
    if (h->refcount_order > 6) {
        return qbm_err(EINVAL, "header at 0x0: refcount_order %u too large",
                       h->refcount_order);
    }
    if (h->crypt_method > 2) {
        return qbm_err(EOPNOTSUPP,
                       "header at 0x0: unknown encryption method "
                       "%u",
                       h->crypt_method);
    }
    if (!!(h->incompatible_features & QBM_INCOMPAT_COMPRESSION) !=
        (h->compression_type != 0)) {
        return qbm_err(EINVAL,
                       "header at 0x0: compression type %u does not "
                       "match the compression type feature bit",
                       h->compression_type);
    }
    if (h->compression_type > 1) {
        return qbm_err(EOPNOTSUPP,
                       "header at 0x0: unknown compression type "
                       "%u",
                       h->compression_type);
    }
    if ((h->incompatible_features & QBM_INCOMPAT_EXTL2) &&
        h->cluster_bits < 14) {
        return qbm_err(EINVAL, "header at 0x0: extended L2 entries need "
                               "clusters of at least 16 KiB");
    }
    if ((h->autoclear_features & QBM_AUTOCLEAR_DATA_FILE_RAW) &&
        !(h->incompatible_features & QBM_INCOMPAT_DATA_FILE)) {
        return qbm_err(EINVAL, "header at 0x0: raw external data bit set "
                               "without an external data file");
    }
    return 0;
}

int qcow2_header_decode(const uint8_t *buf, size_t len, uint64_t file_size,
                        struct qcow2_header *ret_hdr)
{
    struct qcow2_header h;
    size_t i;
    int r;

    memset(&h, 0, sizeof(h));
    r = decode_fixed(buf, len, &h);
    if (r < 0) {
        goto fail;
    }
    if (len < h.cluster_size && len < file_size) {
        r = qbm_err(EINVAL, "header at 0x0: internal: short header buffer");
        goto fail;
    }
    if (h.backing_file_offset) {
        if (h.backing_file_offset > h.cluster_size ||
            h.backing_file_size > QCOW2_MAX_BACKING_NAME ||
            h.backing_file_size > h.cluster_size - h.backing_file_offset) {
            r = qbm_err(EINVAL,
                        "backing file name at 0x%llx: %u bytes do "
                        "not fit in the header cluster",
                        (unsigned long long)h.backing_file_offset,
                        h.backing_file_size);
            goto fail;
        }
        if (h.backing_file_offset < h.header_length) {
            r = qbm_err(EINVAL,
                        "backing file name at 0x%llx: overlaps the "
                        "header",
                        (unsigned long long)h.backing_file_offset);
            goto fail;
        }
    }
    r = decode_extensions(buf, &h);
    if (r < 0) {
        goto fail;
    }
    if (h.backing_file_offset) {
        h.backing_file = qbm_strndup((const char *)buf + h.backing_file_offset,
                                     h.backing_file_size);
        if (!h.backing_file) {
            r = -ENOMEM;
            goto fail;
        }
        if (strlen(h.backing_file) != h.backing_file_size) {
            r = qbm_err(EINVAL,
                        "backing file name at 0x%llx: contains a "
                        "NUL byte",
                        (unsigned long long)h.backing_file_offset);
            goto fail;
        }
    }
    r = check_features(&h);
    if (r < 0) {
        goto fail;
    }
    for (i = 0; i < h.nb_exts; i++) {
        if (h.exts[i].magic == QCOW2_EXT_BITMAPS) {
            h.bitmaps_ext = &h.exts[i];
        }
    }
    *ret_hdr = h;
    return 0;

fail:
    qcow2_header_free(&h);
    return r;
}
