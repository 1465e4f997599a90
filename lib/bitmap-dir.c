/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * Bitmaps extension, bitmap directory and bitmap tables (qcow2 spec,
 * "Bitmaps extension", "Bitmap directory", "Bitmap table"), and a bitmap's
 * data read through its table ("Bitmap data"), streamed or as a struct
 * qbm_bmap of references. Validation follows what QEMU refuses on open.
 */
#include <stdlib.h>

#include "internal.h"

int qcow2_bitmaps_ext_decode(const uint8_t *data, uint32_t len,
                             uint64_t ext_offset, struct qcow2_bitmaps_ext *ret)
{
    struct qcow2_bitmaps_ext e;

    if (len != 24) {
        return qbm_err(EINVAL,
                       "bitmaps extension at 0x%llx: length %u, "
                       "expected 24",
                       (unsigned long long)ext_offset, len);
    }
    e.nb_bitmaps = be32_load(data);
    e.dir_size = be64_load(data + 8);
    e.dir_offset = be64_load(data + 16);
    if (be32_load(data + 4) != 0) {
        return qbm_err(EINVAL,
                       "bitmaps extension at 0x%llx: reserved field "
                       "is not zero",
                       (unsigned long long)ext_offset);
    }
    if (e.nb_bitmaps == 0 || e.nb_bitmaps > BME_MAX_BITMAPS) {
        return qbm_err(EINVAL,
                       "bitmaps extension at 0x%llx: %u bitmaps, "
                       "expected 1..65535",
                       (unsigned long long)ext_offset, e.nb_bitmaps);
    }
    if (e.dir_size == 0 || e.dir_size > BME_MAX_DIR_SIZE) {
        return qbm_err(EINVAL,
                       "bitmaps extension at 0x%llx: directory size "
                       "%llu out of range",
                       (unsigned long long)ext_offset,
                       (unsigned long long)e.dir_size);
    }
    *ret = e;
    return 0;
}

uint64_t qcow2_bitmap_entry_size(const struct qcow2_bitmap *bm)
{
    return ((uint64_t)BME_ENTRY_HEADER + bm->extra_data_size + bm->name_size +
            7) &
           ~7ull;
}

uint64_t qcow2_bitmap_table_size(uint64_t disk_size, unsigned gran_bits,
                                 uint64_t cluster_size)
{
    uint64_t nbits = div_round_up(disk_size, 1ull << gran_bits);
    uint64_t bytes = div_round_up(nbits, 8);

    return div_round_up(bytes, cluster_size);
}

void qcow2_bitmaps_free(struct qcow2_bitmap *bms, uint32_t n)
{
    uint32_t i;

    if (!bms) {
        return;
    }
    for (i = 0; i < n; i++) {
        free(bms[i].name);
        free(bms[i].table);
        qbm_bmap_free(bms[i].data);
    }
    free(bms);
}

/* QEMU's per-entry constraints (check_dir_entry). */
static int check_entry(const struct qcow2_bitmap *bm, uint32_t idx,
                       uint64_t cluster_size, uint64_t disk_size)
{
    const char *why = NULL;
    uint64_t phys;

    if (bm->table_size == 0 || bm->table_size > BME_MAX_TABLE_SIZE) {
        why = "bitmap_table_size out of range";
    } else if (bm->table_offset == 0 ||
               !is_aligned(bm->table_offset, cluster_size)) {
        why = "bitmap_table_offset is zero or not cluster aligned";
    } else if (bm->granularity_bits < BME_MIN_GRANULARITY_BITS ||
               bm->granularity_bits > BME_MAX_GRANULARITY_BITS) {
        why = "granularity_bits out of range 9..31";
    } else if (bm->flags & ~(BME_FLAG_IN_USE | BME_FLAG_AUTO)) {
        why = "unknown or reserved flags set";
    } else if (bm->type != BME_TYPE_DIRTY_TRACKING) {
        why = "unknown bitmap type";
    } else if (bm->name_size > BME_MAX_NAME_SIZE) {
        why = "name longer than 1023 bytes";
    } else if (bm->extra_data_size != 0) {
        why = "extra data is not supported";
    } else if (!mul_ok(bm->table_size, cluster_size, &phys) ||
               phys > BME_MAX_PHYS_SIZE) {
        why = "bitmap data would exceed 512 MiB";
    } else if (!(bm->flags & BME_FLAG_IN_USE) &&
               bm->table_size != qcow2_bitmap_table_size(disk_size,
                                                         bm->granularity_bits,
                                                         cluster_size)) {
        /* QEMU loads consistent bitmaps on every open and insists on
         * the exact size; an in-use one is never read by QEMU. */
        why = "bitmap_table_size does not match the virtual size";
    }
    if (why) {
        return qbm_err(EINVAL, "bitmap directory entry %u at 0x%llx: %s", idx,
                       (unsigned long long)bm->entry_offset, why);
    }
    return 0;
}

int qcow2_bitmap_dir_decode(const uint8_t *buf, uint64_t dir_size,
                            uint64_t dir_offset, uint32_t nb_bitmaps,
                            uint64_t cluster_size, uint64_t disk_size,
                            struct qcow2_bitmap **ret_bitmaps)
{
    struct qcow2_bitmap *bms;
    uint64_t pos = 0;
    uint32_t n = 0, i, j;
    int r;

    bms = qbm_calloc(nb_bitmaps, sizeof(*bms));
    if (!bms) {
        return -ENOMEM;
    }
    while (pos < dir_size) {
        const uint8_t *e = buf + pos;
        struct qcow2_bitmap *bm;
        uint64_t esize;

        if (n == nb_bitmaps) {
            r = qbm_err(EINVAL,
                        "bitmap directory at 0x%llx: more entries "
                        "than the %u the extension announces",
                        (unsigned long long)dir_offset, nb_bitmaps);
            goto fail;
        }
        if (dir_size - pos < BME_ENTRY_HEADER) {
            r = qbm_err(EINVAL,
                        "bitmap directory entry %u at 0x%llx: "
                        "crosses the end of the directory",
                        n, (unsigned long long)(dir_offset + pos));
            goto fail;
        }
        bm = &bms[n];
        bm->entry_offset = dir_offset + pos;
        bm->table_offset = be64_load(e);
        bm->table_size = be32_load(e + 8);
        bm->flags = be32_load(e + 12);
        bm->type = e[16];
        bm->granularity_bits = e[17];
        bm->name_size = be16_load(e + 18);
        bm->extra_data_size = be32_load(e + 20);
        esize = qcow2_bitmap_entry_size(bm);
        if (esize > dir_size - pos) {
            r = qbm_err(EINVAL,
                        "bitmap directory entry %u at 0x%llx: "
                        "crosses the end of the directory",
                        n, (unsigned long long)bm->entry_offset);
            goto fail;
        }
        bm->name = qbm_strndup((const char *)e + BME_ENTRY_HEADER +
                                   bm->extra_data_size,
                               bm->name_size);
        if (!bm->name) {
            r = -ENOMEM;
            n++;
            goto fail;
        }
        n++;
        r = check_entry(bm, n - 1, cluster_size, disk_size);
        if (r < 0) {
            goto fail;
        }
        if (strlen(bm->name) != bm->name_size) {
            r = qbm_err(EINVAL,
                        "bitmap directory entry %u at 0x%llx: name "
                        "contains a NUL byte",
                        n - 1, (unsigned long long)bm->entry_offset);
            goto fail;
        }
        pos += esize;
    }
    if (n != nb_bitmaps) {
        r = qbm_err(EINVAL,
                    "bitmap directory at 0x%llx: %u entries, the "
                    "extension announces %u",
                    (unsigned long long)dir_offset, n, nb_bitmaps);
        goto fail;
    }
    for (i = 0; i < n; i++) {
        for (j = i + 1; j < n; j++) {
            if (bms[i].name_size == bms[j].name_size &&
                memcmp(bms[i].name, bms[j].name, bms[i].name_size) == 0) {
                r = qbm_err(EINVAL,
                            "bitmap directory entry %u at 0x%llx: "
                            "duplicate name '%s'",
                            j, (unsigned long long)bms[j].entry_offset,
                            bms[j].name);
                goto fail;
            }
        }
    }
    *ret_bitmaps = bms;
    return 0;

fail:
    qcow2_bitmaps_free(bms, n);
    return r;
}

void qcow2_bitmap_entry_encode(const struct qcow2_bitmap *bm, uint8_t *buf)
{
    memset(buf, 0, qcow2_bitmap_entry_size(bm));
    be64_store(buf, bm->table_offset);
    be32_store(buf + 8, bm->table_size);
    be32_store(buf + 12, bm->flags);
    buf[16] = bm->type;
    buf[17] = bm->granularity_bits;
    be16_store(buf + 18, bm->name_size);
    be32_store(buf + 20, 0);
    memcpy(buf + BME_ENTRY_HEADER, bm->name, bm->name_size);
}

/*
 * Entries past the end of the file read as zero, a valid (clean) entry:
 * only the part of the table inside the file is read and validated, so a
 * table claimed far past the end costs no reading.
 */
int qcow2_bitmap_table_load(struct qbm_image *img, struct qcow2_bitmap *bm)
{
    uint64_t bytes = (uint64_t)bm->table_size * 8, n = bm->table_size;
    uint64_t file_end, end, i;
    uint8_t *buf;
    uint64_t *table;
    int r;

    if (bm->table) {
        return 0;
    }
    r = qbm_io_size(img->io, &file_end);
    if (r < 0) {
        return r;
    }
    /* A table beyond the largest image is left for the read to refuse. */
    if (add_ok(bm->table_offset, bytes, &end) && end <= QCOW2_MAX_HOST_OFFSET &&
        end > file_end) {
        n = bm->table_offset >= file_end
                ? 0
                : div_round_up(file_end - bm->table_offset, 8);
    }
    buf = qbm_malloc(n * 8);
    table = qbm_calloc(bm->table_size, sizeof(*table));
    if (!buf || !table) {
        free(buf);
        free(table);
        return -ENOMEM;
    }
    r = n ? qbm_image_read_meta(img, buf, n * 8, bm->table_offset,
                                "bitmap table")
          : 0;
    if (r < 0) {
        goto fail;
    }
    for (i = 0; i < n; i++) {
        uint64_t e = be64_load(buf + i * 8);
        uint64_t off = e & BME_TABLE_OFFSET_MASK;
        const char *why = NULL;

        if (e & BME_TABLE_RESERVED) {
            why = "reserved bits set";
        } else if (off && (e & BME_TABLE_ALL_ONES)) {
            why = "all-ones flag together with a data offset";
        } else if (!is_aligned(off, img->cluster_size)) {
            why = "data offset not cluster aligned";
        }
        if (why) {
            r = qbm_err(EINVAL,
                        "bitmap '%s': table at 0x%llx, entry %llu: "
                        "%s",
                        bm->name, (unsigned long long)bm->table_offset,
                        (unsigned long long)i, why);
            goto fail;
        }
        table[i] = e;
    }
    free(buf);
    bm->table = table;
    bm->table_read = (uint32_t)n;
    return 0;

fail:
    free(buf);
    free(table);
    return r;
}

int qcow2_bitmap_read_clusters(struct qbm_image *img, const uint64_t *offs,
                               uint8_t *const *bufs, size_t n)
{
    size_t k;
    int r;

    for (k = 0; k < n; k++) {
        /* What qbm_io_read_meta refuses for a single cluster. */
        if (offs[k] > QCOW2_MAX_HOST_OFFSET - img->cluster_size) {
            return qbm_err(EINVAL,
                           "bitmap data cluster at 0x%llx: beyond the "
                           "largest possible image",
                           (unsigned long long)offs[k]);
        }
    }
    r = qbm_io_read_pieces(img->io, offs, bufs, n, img->cluster_size);
    return r < 0 ? qbm_err_prefix(r, "bitmap data clusters") : 0;
}

/* Clusters read at once: runs of consecutive clusters in one call. */
static uint64_t window_clusters(const struct qbm_image *img)
{
    return img->cluster_size >= QBM_READ_WINDOW
               ? 1
               : QBM_READ_WINDOW / img->cluster_size;
}

int qcow2_bitmap_read_chunks(struct qbm_image *img, struct qcow2_bitmap *bm,
                             qbm_chunk_fn fn, void *opaque)
{
    return qcow2_bitmap_read_chunk_range(img, bm, 0, UINT64_MAX, fn, opaque);
}

int qcow2_bitmap_read_chunk_range(struct qbm_image *img,
                                  struct qcow2_bitmap *bm, uint64_t first,
                                  uint64_t end, qbm_chunk_fn fn, void *opaque)
{
    uint64_t nchunks = qcow2_bitmap_table_size(
        img->hdr.size, bm->granularity_bits, img->cluster_size);
    uint64_t win = window_clusters(img), i = first, start, k;
    uint64_t *offs = NULL;
    uint8_t *buf = NULL, **bufs = NULL;
    size_t n, buf_bytes = 0;
    int r;

    r = qcow2_bitmap_table_load(img, bm);
    if (r < 0) {
        return r;
    }
    /* An in-use bitmap's table may be shorter than the disk needs: the
     * missing part reads as clean. */
    if (nchunks > bm->table_size) {
        nchunks = bm->table_size;
    }
    if (nchunks > end) {
        nchunks = end;
    }
    /* The window's pointers are small (win entries); its buffer is
     * taken when the first data cluster is met. */
    offs = qbm_calloc(win, sizeof(*offs));
    bufs = qbm_calloc(win, sizeof(*bufs));
    if (!offs || !bufs) {
        r = -ENOMEM;
    }
    while (i < nchunks && r == 0) {
        /* Chunks [start, i) hold n data clusters: read them together,
         * then hand every chunk to fn in order. */
        for (start = i, n = 0; i < nchunks && n < win; i++) {
            uint64_t off = bm->table[i] & BME_TABLE_OFFSET_MASK;

            if (off && !buf) {
                n = (size_t)(nchunks - i < win ? nchunks - i : win);
                buf_bytes = n * img->cluster_size;
                buf = qbm_window_alloc(buf_bytes);
                if (!buf) {
                    r = -ENOMEM;
                    break;
                }
                n = 0;
            }
            if (off) {
                offs[n] = off;
                bufs[n] = buf + n * img->cluster_size;
                n++;
            }
        }
        r = r ? r : qcow2_bitmap_read_clusters(img, offs, bufs, n);
        if (r < 0) {
            r = qbm_err_prefix(r, "bitmap '%s'", bm->name);
        }
        for (k = start, n = 0; k < i && r == 0; k++) {
            uint64_t e = bm->table[k];

            if (e & BME_TABLE_OFFSET_MASK) {
                r = fn(opaque, k, bufs[n++]);
            } else {
                r = fn(opaque, k,
                       (e & BME_TABLE_ALL_ONES) ? QBM_CHUNK_ONES : NULL);
            }
        }
    }
    qbm_window_free(buf, buf_bytes);
    free(offs);
    free(bufs);
    return r;
}

int qcow2_bitmap_load(struct qbm_image *img, struct qcow2_bitmap *bm,
                      struct qbm_bmap **ret)
{
    struct qbm_bmap *data;
    uint64_t i, n;
    int r;

    r = qcow2_bitmap_table_load(img, bm);
    if (r < 0) {
        return r;
    }
    r = qbm_bmap_new(img->hdr.size, 1ull << bm->granularity_bits,
                     img->cluster_size, &data);
    if (r < 0) {
        return r;
    }
    /* An in-use bitmap's table may be shorter than the disk needs: the
     * missing part reads as clean. */
    n = data->nchunks < bm->table_size ? data->nchunks : bm->table_size;
    for (i = 0; i < n && r == 0; i++) {
        uint64_t e = bm->table[i], off = e & BME_TABLE_OFFSET_MASK;

        if (off) {
            r = qbm_bmap_set_ref(data, i, img->io, off);
        } else if (e & BME_TABLE_ALL_ONES) {
            data->chunks[i] = QBM_CHUNK_ONES;
        }
    }
    if (r < 0) {
        qbm_bmap_free(data);
        return r;
    }
    *ret = data;
    return 0;
}
