/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* struct qbm_image: opening, validating and describing one image. */
#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>

#include "internal.h"

static void image_unload(struct qbm_image *img);

static void image_free(struct qbm_image *img)
{
    if (!img) {
        return;
    }
    image_unload(img);
    if (img->io) {
        qbm_io_close(img->io);
    }
    qbm_io_close(img->data_io);
    free(img->filename);
    free(img);
}

static int load_bitmaps(struct qbm_image *img)
{
    const struct qcow2_ext *ext = img->hdr.bitmaps_ext;
    uint8_t *buf;
    int r;

    if (!ext) {
        img->bitmaps_state = QBM_BITMAPS_NONE;
        return 0;
    }
    r = qcow2_bitmaps_ext_decode(ext->data, ext->len, ext->offset,
                                 &img->bm_ext);
    if (r < 0) {
        return r;
    }
    /* Without the autoclear bit (or in a v2 image, which cannot carry it)
     * the extension is inconsistent and QEMU ignores it: a program without
     * bitmap support wrote the image after the bitmaps were stored (qcow2
     * spec, "Header": autoclear_features bit 0, and "Bitmaps extension"). */
    if (img->hdr.version < 3 ||
        !(img->hdr.autoclear_features & QBM_AUTOCLEAR_BITMAPS)) {
        img->bitmaps_state = QBM_BITMAPS_STALE;
        return 0;
    }
    img->bitmaps_state = QBM_BITMAPS_OK;
    if (!is_aligned(img->bm_ext.dir_offset, img->cluster_size) ||
        img->bm_ext.dir_offset == 0) {
        return qbm_err(EINVAL,
                       "bitmap directory at 0x%llx: offset not "
                       "cluster aligned",
                       (unsigned long long)img->bm_ext.dir_offset);
    }
    buf = qbm_malloc(img->bm_ext.dir_size);
    if (!buf) {
        return -ENOMEM;
    }
    r = qbm_image_read_meta(img, buf, img->bm_ext.dir_size,
                            img->bm_ext.dir_offset, "bitmap directory");
    if (r == 0) {
        r = qcow2_bitmap_dir_decode(buf, img->bm_ext.dir_size,
                                    img->bm_ext.dir_offset,
                                    img->bm_ext.nb_bitmaps, img->cluster_size,
                                    img->hdr.size, &img->bitmaps);
    }
    free(buf);
    if (r < 0) {
        return r;
    }
    img->nb_bitmaps = img->bm_ext.nb_bitmaps;
    return 0;
}

/* Release everything loaded from the file (not the io or the name). */
static void image_unload(struct qbm_image *img)
{
    qcow2_header_free(&img->hdr);
    qcow2_bitmaps_free(img->bitmaps, img->nb_bitmaps);
    img->bitmaps = NULL;
    img->nb_bitmaps = 0;
    free(img->l1);
    free(img->reftable);
    qcow2_snapshots_free(img->snapshots, img->nb_snapshots);
    free(img->l2_cache);
    free(img->refblock_cache);
    free(img->zcache);
    img->zcache = NULL;
    qbm_darray_free(&img->pending_free);
    img->l1 = NULL;
    img->reftable = NULL;
    img->snapshots = NULL;
    img->l2_cache = NULL;
    img->refblock_cache = NULL;
    img->nb_snapshots = 0;
    img->snapshots_size = 0;
    img->staged = false;
    memset(&img->bm_ext, 0, sizeof(img->bm_ext));
    img->bitmaps_state = QBM_BITMAPS_NONE;
}

/* Read and validate every structure we use, from the image's io. */
static int image_load(struct qbm_image *img)
{
    struct qbm_io *io = img->io;
    uint8_t first[QCOW2_V3_HEADER_LEN];
    uint8_t *cluster0 = NULL;
    uint32_t cluster_bits;
    uint64_t cs;
    int r;

    r = qbm_io_size(io, &img->file_size);
    if (r < 0) {
        return r;
    }
    r = qbm_io_pread(io, first, sizeof(first), 0);
    if (r < 0) {
        return r;
    }
    if (img->file_size < QCOW2_V2_HEADER_LEN ||
        be32_load(first + QCOW2_HDR_MAGIC) != QCOW2_MAGIC) {
        return qbm_err(EINVAL, "not a qcow2 image");
    }
    /* Cluster 0 holds the header and its extensions; read it whole. */
    cluster_bits = be32_load(first + QCOW2_HDR_CLUSTER_BITS);
    if (cluster_bits < QCOW2_MIN_CLUSTER_BITS ||
        cluster_bits > QCOW2_MAX_CLUSTER_BITS) {
        return qbm_err(EINVAL,
                       "header at 0x0: cluster_bits %u out of range "
                       "9..21",
                       cluster_bits);
    }
    cs = 1ull << cluster_bits;
    cluster0 = qbm_malloc(cs);
    if (!cluster0) {
        return -ENOMEM;
    }
    /* Bytes past the end of the file read as zeros, like QEMU. */
    r = qbm_io_pread(io, cluster0, cs, 0);
    if (r == 0) {
        r = qcow2_header_decode(cluster0, cs, img->file_size, &img->hdr);
    }
    free(cluster0);
    if (r < 0) {
        return r;
    }
    img->cluster_bits = img->hdr.cluster_bits;
    img->cluster_size = img->hdr.cluster_size;
    img->refcount_bits = 1u << img->hdr.refcount_order;
    img->extl2 = img->hdr.incompatible_features & QBM_INCOMPAT_EXTL2;
    img->l2_entry_size = img->extl2 ? 16 : 8;
    img->l2_entries = img->cluster_size / img->l2_entry_size;

    r = qcow2_refcount_load(img);
    if (r == 0) {
        r = qcow2_l1_load(img);
    }
    if (r == 0) {
        r = qcow2_snapshots_load(img);
    }
    if (r == 0) {
        r = load_bitmaps(img);
    }
    return r;
}

int qbm_image_reload(struct qbm_image *img)
{
    uint64_t *l1 = img->l1; /* may be NULL: not read yet */
    uint64_t l1_off = img->hdr.l1_table_offset;
    uint32_t l1_size = img->hdr.l1_size;
    int r;

    /* Bitmap edits never move the L1 table: keep it rather than read
     * what can be megabytes again. */
    img->l1 = NULL;
    image_unload(img);
    img->keep_l1 = l1;
    img->keep_l1_offset = l1_off;
    img->keep_l1_size = l1_size;
    r = image_load(img);
    free(img->keep_l1);
    img->keep_l1 = NULL;
    if (r < 0) {
        img->broken = true;
    }
    return r;
}

/* A raw file has no metadata: only its size, which is the disk's. */
static int raw_load(struct qbm_image *img)
{
    int r = qbm_io_size(img->io, &img->file_size);

    if (r < 0) {
        return r;
    }
    img->hdr.size = img->file_size;
    return 0;
}

/* A handle on `io`, which it owns (closed on failure too), loaded as a
 * qcow2 image or as a raw file. */
static int image_open(struct qbm_io *io, const char *filename, bool rdwr,
                      bool raw, struct qbm_image **ret_img)
{
    struct qbm_image *img = qbm_calloc(1, sizeof(*img));
    int r;

    if (!img) {
        qbm_io_close(io);
        return -ENOMEM;
    }
    img->io = io;
    img->rdwr = rdwr;
    img->raw = raw;
    /* see qbm_impl_open */
    img->lock = rdwr && !raw ? QBM_LOCK_WRITE : QBM_LOCK_READ;
    img->filename = qbm_strndup(filename, strlen(filename));
    if (!img->filename) {
        image_free(img);
        return -ENOMEM;
    }
    r = raw ? raw_load(img) : image_load(img);
    if (r < 0) {
        image_free(img);
        return r;
    }
    *ret_img = img;
    return 0;
}

int qbm_image_open_io(struct qbm_io *io, const char *filename, bool rdwr,
                      struct qbm_image **ret_img)
{
    return image_open(io, filename, rdwr, false, ret_img);
}

int qbm_image_open_raw(struct qbm_io *io, const char *filename,
                       struct qbm_image **ret_img)
{
    return image_open(io, filename, false, true, ret_img);
}

int qbm_image_open_format(struct qbm_io *io, const char *filename,
                          enum qbm_format format, bool rdwr,
                          struct qbm_image **ret_img)
{
    uint8_t magic[4];
    int r;

    if (format == QBM_FORMAT_PROBE) {
        r = qbm_io_pread(io, magic, sizeof(magic), QCOW2_HDR_MAGIC);
        if (r < 0) {
            qbm_io_close(io);
            return r;
        }
        format =
            be32_load(magic) == QCOW2_MAGIC ? QBM_FORMAT_QCOW2 : QBM_FORMAT_RAW;
    }
    if (format == QBM_FORMAT_RAW) {
        return qbm_image_open_raw(io, filename, ret_img);
    }
    return qbm_image_open_io(io, filename, rdwr, ret_img);
}

int qbm_impl_open(const char *filename, unsigned flags,
                  struct qbm_image **ret_img)
{
    struct qbm_io *io;
    enum qbm_lock_mode lock;
    bool rdwr = flags & QBM_OPEN_RDWR;
    int r;

    if (!filename || (flags & ~QBM_OPEN_MASK) ||
        (rdwr && (flags & QBM_OPEN_FORCE_SHARE))) {
        return qbm_err(EINVAL, "invalid arguments to qbm_open");
    }
    lock = rdwr                             ? QBM_LOCK_WRITE
           : (flags & QBM_OPEN_FORCE_SHARE) ? QBM_LOCK_NONE
                                            : QBM_LOCK_READ;
    r = qbm_io_file_open(filename, rdwr, lock, &io);
    if (r < 0) {
        return r;
    }
    /* Raw files are only ever read. */
    r = qbm_image_open_format(io, filename,
                              (flags & QBM_OPEN_ANY_FORMAT) && !rdwr
                                  ? QBM_FORMAT_PROBE
                                  : QBM_FORMAT_QCOW2,
                              rdwr, ret_img);
    if (r == 0) {
        (*ret_img)->lock = lock;
    }
    return r;
}

/*
 * block/qcow2.c hands the stored name to bdrv_open_child() as it is, so a
 * relative name is opened from the process's working directory, unlike a
 * backing file name, which QEMU joins with the image's directory (checked
 * with qemu-io 7.2: run from another directory, it fails to open the
 * image, or reads another file of that name). Nor is the name parsed:
 * qemu-io 7.2 (Debian 12's) opens "file:x", "nbd:h:1" and "json:{...}"
 * as local files of those names. Reading the same file QEMU reads
 * matters more than convenience: a backup of the wrong disk would
 * succeed silently. The message for a missing file says where it was
 * looked for.
 */
int qbm_image_data_open(struct qbm_image *img)
{
    const char *name = img->hdr.data_file;
    char cwd[4096];
    int r;

    if (img->raw || img->data_io ||
        !(img->hdr.incompatible_features & QBM_INCOMPAT_DATA_FILE)) {
        return 0;
    }
    if (!name || !name[0]) {
        return qbm_err(EINVAL, "the image has an external data file but no "
                               "data file name (QEMU needs a data-file "
                               "option for it)");
    }
    /* Read only: qbm reads guest data, it never writes a data file. */
    r = qbm_io_file_open(
        name, false, img->lock == QBM_LOCK_NONE ? QBM_LOCK_NONE : QBM_LOCK_READ,
        &img->data_io);
    if (r < 0) {
        img->data_io = NULL;
        if (name[0] != '/' && getcwd(cwd, sizeof(cwd))) {
            return qbm_err_prefix(r,
                                  "external data file %s (a relative "
                                  "name, opened from the working "
                                  "directory %s, as QEMU opens it)",
                                  name, cwd);
        }
        return qbm_err_prefix(r, "external data file %s", name);
    }
    return 0;
}

QBM_API struct qbm_image *qbm_open(const char *filename, unsigned flags)
{
    struct qbm_image *img = NULL;

    return qbm_impl_open(filename, flags, &img) < 0 ? NULL : img;
}

QBM_API struct qbm_image *qbm_open_memory(const void *buf, size_t len,
                                          const char *name, unsigned flags)
{
    struct qbm_image *img;
    struct qbm_io *io;
    int r;

    if ((!buf && len) || (flags & ~QBM_OPEN_MASK)) {
        qbm_err(EINVAL, "invalid arguments to qbm_open_memory");
        return NULL;
    }
    r = qbm_io_mem_open(buf, len, &io);
    if (r < 0) {
        return NULL;
    }
    r = qbm_image_open_io(io, name ? name : "(memory)", flags & QBM_OPEN_RDWR,
                          &img);
    return r < 0 ? NULL : img;
}

void qbm_impl_close(struct qbm_image *img)
{
    image_free(img);
}

QBM_API void qbm_close(struct qbm_image *img)
{
    qbm_impl_close(img);
}

/* ---- accessors --------------------------------------------------------- */

QBM_API const char *qbm_image_filename(const struct qbm_image *img)
{
    return img->filename;
}

QBM_API const char *qbm_image_format(const struct qbm_image *img)
{
    return img->raw ? "raw" : "qcow2";
}

QBM_API unsigned qbm_image_version(const struct qbm_image *img)
{
    return img->raw ? 0 : img->hdr.version;
}

QBM_API uint64_t qbm_image_virtual_size(const struct qbm_image *img)
{
    return img->hdr.size;
}

QBM_API uint64_t qbm_image_cluster_size(const struct qbm_image *img)
{
    return img->cluster_size;
}

QBM_API unsigned qbm_image_refcount_bits(const struct qbm_image *img)
{
    return img->refcount_bits;
}

QBM_API const char *qbm_image_compression_type(const struct qbm_image *img)
{
    if (img->raw) {
        return NULL;
    }
    return img->hdr.compression_type == 1 ? "zstd" : "zlib";
}

QBM_API const char *qbm_image_backing_file(const struct qbm_image *img)
{
    return img->hdr.backing_file;
}

QBM_API const char *qbm_image_backing_format(const struct qbm_image *img)
{
    return img->hdr.backing_format;
}

QBM_API const char *qbm_image_data_file(const struct qbm_image *img)
{
    return img->hdr.data_file;
}

QBM_API uint64_t qbm_image_file_size(const struct qbm_image *img)
{
    return img->file_size;
}

QBM_API uint64_t qbm_image_capacity(const struct qbm_image *img)
{
    return img->io ? img->io->capacity : 0;
}

int qbm_impl_image_end_offset(struct qbm_image *img, uint64_t *ret_end)
{
    if (img->raw) {
        *ret_end = img->file_size;
        return 0;
    }
    return qcow2_refcount_end(img, ret_end);
}

QBM_API int qbm_image_end_offset(struct qbm_image *img, uint64_t *ret_end)
{
    return qbm_public_ret(qbm_impl_image_end_offset(img, ret_end));
}

QBM_API unsigned qbm_image_snapshot_count(const struct qbm_image *img)
{
    return img->nb_snapshots;
}

QBM_API int qbm_image_snapshot(const struct qbm_image *img, size_t idx,
                               struct qbm_snapshot_info *ret)
{
    const struct qcow2_snapshot *sn;

    if (!img || !ret || idx >= img->nb_snapshots) {
        qbm_err(EINVAL, "no snapshot %zu", idx);
        return -1;
    }
    sn = &img->snapshots[idx];
    ret->id = sn->id;
    ret->name = sn->name;
    ret->vm_state_size = sn->vm_state_size;
    ret->vm_clock_nsec = sn->vm_clock_nsec;
    ret->icount = sn->icount;
    ret->date_sec = sn->date_sec;
    ret->date_nsec = sn->date_nsec;
    return 0;
}

QBM_API int qbm_image_encryption(struct qbm_image *img,
                                 struct qbm_encryption_info *ret)
{
    if (!img || !ret) {
        return qbm_public_ret(qbm_err(EINVAL, "invalid arguments"));
    }
    return qbm_public_ret(qcow2_crypto_info(img, ret));
}

QBM_API int qbm_image_allocated_size(const struct qbm_image *img, uint64_t *ret)
{
    struct stat st;
    int fd;

    if (!img || !ret) {
        qbm_err(EINVAL, "no image");
        return -1;
    }
    fd = qbm_io_fd(img->io);
    if (fd < 0) {
        qbm_err(ENOTSUP, "%s: not opened from a file", img->filename);
        return -1;
    }
    if (fstat(fd, &st) < 0) {
        qbm_err(errno, "%s: cannot stat: %s", img->filename, strerror(errno));
        return -1;
    }
    *ret = (uint64_t)st.st_blocks * 512;
    return 0;
}

QBM_API uint64_t qbm_image_features(const struct qbm_image *img, unsigned which)
{
    switch (which) {
    case QBM_FEATURE_INCOMPATIBLE:
        return img->hdr.incompatible_features;
    case QBM_FEATURE_COMPATIBLE:
        return img->hdr.compatible_features;
    case QBM_FEATURE_AUTOCLEAR:
        return img->hdr.autoclear_features;
    default:
        return 0;
    }
}

QBM_API const char *qbm_image_feature_name(const struct qbm_image *img,
                                           unsigned which, unsigned bit)
{
    if (which > QBM_FEATURE_AUTOCLEAR || bit > 63) {
        return NULL;
    }
    return qcow2_feature_name(&img->hdr, which, bit);
}

QBM_API int qbm_image_bitmaps_state(const struct qbm_image *img)
{
    return img->bitmaps_state;
}

int qbm_impl_image_allocation(struct qbm_image *img, qbm_alloc_fn fn,
                              void *opaque)
{
    if (img->raw) {
        return img->hdr.size ? fn(opaque, 0, img->hdr.size, QBM_ALLOC_DATA) : 0;
    }
    return qcow2_allocation_walk(img, fn, opaque);
}

/* Wraps a user callback so that "stop" is told apart from errors. */
struct alloc_wrap {
    qbm_alloc_fn fn;
    void *opaque;
    int user_ret;
};

static int alloc_wrap_cb(void *opaque, uint64_t off, uint64_t len,
                         unsigned status)
{
    struct alloc_wrap *w = opaque;

    w->user_ret = w->fn(w->opaque, off, len, status);
    return w->user_ret ? 1 : 0;
}

QBM_API int qbm_image_allocation(struct qbm_image *img, qbm_alloc_fn fn,
                                 void *opaque)
{
    struct alloc_wrap w = { fn, opaque, 0 };
    int r;

    if (!fn) {
        qbm_err(EINVAL, "no callback");
        return -1;
    }
    r = qbm_impl_image_allocation(img, alloc_wrap_cb, &w);
    return qbm_public_ret_cb(r, w.user_ret);
}
