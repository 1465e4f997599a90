/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * Refcount table and refcount blocks (qcow2 spec, "Host cluster
 * management").
 */
#include <stdlib.h>

#include "internal.h"

uint64_t qcow2_refblock_entry(const uint8_t *block, unsigned bits, uint64_t idx)
{
    switch (bits) {
    case 64:
        return be64_load(block + idx * 8);
    case 32:
        return be32_load(block + idx * 4);
    case 16:
        return be16_load(block + idx * 2);
    case 8:
        return block[idx];
    default: {
        /* 1, 2 and 4-bit entries are packed from the least significant bit
         * of each byte. */
        uint64_t bit = idx * bits;
        return (block[bit / 8] >> (bit % 8)) & ((1u << bits) - 1);
    }
    }
}

void qcow2_refblock_set(uint8_t *block, unsigned bits, uint64_t idx,
                        uint64_t value)
{
    switch (bits) {
    case 64:
        be64_store(block + idx * 8, value);
        break;
    case 32:
        be32_store(block + idx * 4, (uint32_t)value);
        break;
    case 16:
        be16_store(block + idx * 2, (uint16_t)value);
        break;
    case 8:
        block[idx] = (uint8_t)value;
        break;
    default: {
        uint64_t bit = idx * bits;
        uint8_t mask = (uint8_t)(((1u << bits) - 1) << (bit % 8));

        block[bit / 8] =
            (uint8_t)((block[bit / 8] & ~mask) | ((value << (bit % 8)) & mask));
        break;
    }
    }
}

int qcow2_refcount_load(struct qbm_image *img)
{
    const struct qcow2_header *h = &img->hdr;
    uint64_t bytes, i;
    uint8_t *buf;
    int r;

    if (h->refcount_table_clusters == 0) {
        return qbm_err(EINVAL, "refcount table at 0x%llx: zero clusters",
                       (unsigned long long)h->refcount_table_offset);
    }
    if (!is_aligned(h->refcount_table_offset, img->cluster_size) ||
        h->refcount_table_offset == 0) {
        return qbm_err(EINVAL,
                       "refcount table at 0x%llx: offset not "
                       "cluster aligned",
                       (unsigned long long)h->refcount_table_offset);
    }
    if (!mul_ok(h->refcount_table_clusters, img->cluster_size, &bytes) ||
        bytes > QCOW2_MAX_REFTABLE_BYTES) {
        return qbm_err(EINVAL,
                       "refcount table at 0x%llx: %u clusters is "
                       "larger than 8 MiB",
                       (unsigned long long)h->refcount_table_offset,
                       h->refcount_table_clusters);
    }
    buf = qbm_malloc(bytes);
    if (!buf) {
        return -ENOMEM;
    }
    r = qbm_image_read_meta(img, buf, bytes, h->refcount_table_offset,
                            "refcount table");
    if (r < 0) {
        free(buf);
        return r;
    }
    img->reftable_entries = bytes / 8;
    img->reftable = qbm_malloc(bytes);
    if (!img->reftable) {
        free(buf);
        return -ENOMEM;
    }
    for (i = 0; i < img->reftable_entries; i++) {
        img->reftable[i] = be64_load(buf + i * 8);
    }
    free(buf);
    return 0;
}

int qcow2_refcount_get(struct qbm_image *img, uint64_t cluster,
                       uint64_t *ret_refcount)
{
    uint64_t per_block = img->cluster_size * 8 / img->refcount_bits;
    uint64_t rt_index = cluster / per_block;
    uint64_t block;
    int r;

    if (rt_index >= img->reftable_entries) {
        *ret_refcount = 0;
        return 0;
    }
    block = img->reftable[rt_index] & REFT_OFFSET_MASK;
    if (block == 0) {
        *ret_refcount = 0;
        return 0;
    }
    if (!is_aligned(block, img->cluster_size)) {
        return qbm_err(
            EINVAL,
            "refcount table entry %llu at 0x%llx: block "
            "offset 0x%llx not cluster aligned",
            (unsigned long long)rt_index,
            (unsigned long long)(img->hdr.refcount_table_offset + rt_index * 8),
            (unsigned long long)block);
    }
    if (!img->refblock_cache || img->refblock_cache_offset != block) {
        if (!img->refblock_cache) {
            img->refblock_cache = qbm_malloc(img->cluster_size);
            if (!img->refblock_cache) {
                return -ENOMEM;
            }
        }
        img->refblock_cache_offset = 0;
        r = qbm_image_read_meta(img, img->refblock_cache, img->cluster_size,
                                block, "refcount block");
        if (r < 0) {
            return r;
        }
        img->refblock_cache_offset = block;
    }
    *ret_refcount = qcow2_refblock_entry(
        img->refblock_cache, img->refcount_bits, cluster % per_block);
    return 0;
}

uint64_t qcow2_refblock_last(const uint8_t *block, unsigned bits, uint64_t n)
{
    uint64_t w = div_round_up(n * bits, 64), i;

    /* Whole 64-bit words first: a mostly empty block costs little. */
    for (; w > 0; w--) {
        uint64_t v;

        memcpy(&v, block + (w - 1) * 8, 8);
        if (v) {
            break;
        }
    }
    if (w == 0) {
        return 0;
    }
    for (i = w * 64 / bits; i > (w - 1) * 64 / bits; i--) {
        if (i <= n && qcow2_refblock_entry(block, bits, i - 1)) {
            return i;
        }
    }
    return 0;
}

static int cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;

    return x < y ? -1 : x > y;
}

int qcow2_refcount_end(struct qbm_image *img, uint64_t *ret_end)
{
    uint64_t cs = img->cluster_size, per_block = cs * 8 / img->refcount_bits;
    uint64_t rt, size, last = 0, end, *offs = NULL, n = 0, i;
    uint8_t *block = NULL, *zero = NULL;
    int r;

    r = qbm_io_size(img->io, &size);
    if (r < 0) {
        return r;
    }
    /* The blocks worth reading: aligned, inside the file (past its end a
     * block reads as zeros: all its refcounts are 0, as check counts
     * them), each distinct offset once, however many entries name it. */
    offs = qbm_malloc((img->reftable_entries + 1) * sizeof(*offs));
    block = qbm_malloc(cs);
    if (!offs || !block) {
        r = -ENOMEM;
        goto out;
    }
    for (rt = 0; rt < img->reftable_entries; rt++) {
        uint64_t off = img->reftable[rt] & REFT_OFFSET_MASK;

        if (off && is_aligned(off, cs) && off < size) {
            offs[n++] = off;
        }
    }
    qsort(offs, n, sizeof(*offs), cmp_u64);
    for (i = 0, rt = 0; i < n; i++) {
        if (i == 0 || offs[i] != offs[rt - 1]) {
            offs[rt++] = offs[i];
        }
    }
    n = rt;
    zero = qbm_calloc(n + 1, 1); /* 1: read, every refcount 0 */
    r = zero ? 0 : -ENOMEM;
    /* From the last block down: usually one block is read. */
    for (rt = img->reftable_entries; r == 0 && rt > 0 && last == 0; rt--) {
        uint64_t off = img->reftable[rt - 1] & REFT_OFFSET_MASK, k, lo, hi;

        if (!off || !is_aligned(off, cs) || off >= size) {
            continue;
        }
        for (lo = 0, hi = n; lo < hi;) {
            k = lo + (hi - lo) / 2;
            if (offs[k] < off) {
                lo = k + 1;
            } else {
                hi = k;
            }
        }
        if (zero[lo]) {
            continue;
        }
        r = qbm_image_read_meta(img, block, cs, off, "refcount block");
        if (r < 0) {
            break;
        }
        k = size - off >= cs
                ? per_block
                : div_round_up((size - off) * 8, img->refcount_bits);
        last = qcow2_refblock_last(block, img->refcount_bits, k);
        if (last) {
            last += (rt - 1) * per_block;
        } else {
            zero[lo] = 1;
        }
    }
    if (r == 0 && (!mul_ok(last, cs, &end) || end > QCOW2_MAX_HOST_OFFSET)) {
        r = qbm_err(EINVAL,
                    "refcount table at 0x%llx: refcounts claim clusters "
                    "past the largest possible image",
                    (unsigned long long)img->hdr.refcount_table_offset);
    }
    if (r == 0) {
        *ret_end = end;
    }
out:
    free(offs);
    free(block);
    free(zero);
    return r;
}
