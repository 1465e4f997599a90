/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * Staged bitmap edits and their commit. Edits change the in-memory bitmap
 * list (struct qcow2_bitmap); a bitmap whose contents change gets a
 * struct qbm_bmap in bm->data, and the clusters its old copy used are
 * queued to be freed once the new state is live.
 */
#include <stdio.h>
#include <stdlib.h>
#include <sys/stat.h>

#include "internal.h"

/* qemu-img's default granularity: the cluster size within 4 KiB..64 KiB. */
#define DEFAULT_GRAN_MIN 4096u
#define DEFAULT_GRAN_MAX 65536u

static int writable(struct qbm_image *img)
{
    const struct qcow2_header *h = &img->hdr;

    if (img->broken) {
        return qbm_err(EIO, "an earlier commit failed; reopen the image");
    }
    if (!img->rdwr || img->raw) {
        return qbm_err(EROFS, "image not opened for writing");
    }
    if (h->version < 3) {
        return qbm_err(EOPNOTSUPP,
                       "cannot store bitmaps in a version 2 "
                       "(compat=0.10) image; upgrade it with 'qemu-img "
                       "amend -o compat=1.1'");
    }
    if (h->incompatible_features & QBM_INCOMPAT_CORRUPT) {
        return qbm_err(EUCLEAN, "the image is marked corrupt; repair it "
                                "with 'qemu-img check -r all' first");
    }
    if (h->incompatible_features & QBM_INCOMPAT_DIRTY) {
        return qbm_err(EUCLEAN,
                       "the image's refcounts may be stale (dirty "
                       "bit set, lazy refcounts); run 'qemu-img check -r "
                       "all' first");
    }
    if (img->bitmaps_state == QBM_BITMAPS_STALE) {
        return qbm_err(EUCLEAN,
                       "the bitmaps extension is stale (a program "
                       "without bitmap support wrote the image after them); "
                       "drop it with 'qemu-img check -r leaks' first");
    }
    return 0;
}

static int find(struct qbm_image *img, const char *name,
                struct qcow2_bitmap **ret)
{
    struct qcow2_bitmap *bm = qcow2_bitmap_lookup(img, name);

    if (bm) {
        *ret = bm;
        return 0;
    }
    /* Spelled out so that analyzers see the failure is non-zero. */
    qbm_err(ENOENT, "no bitmap named '%s'", name);
    return -ENOENT;
}

static int usable(const struct qcow2_bitmap *bm)
{
    if (bm->flags & BME_FLAG_IN_USE) {
        return qbm_err(EBUSY,
                       "bitmap '%s' is in use (inconsistent: QEMU "
                       "did not store it back); remove it, or repair it "
                       "with qbm check --repair",
                       bm->name);
    }
    return 0;
}

/* Bitmap `name` of a writable image, to change its bits or its state: a
 * bitmap in use is refused. */
static int find_editable(struct qbm_image *img, const char *name,
                         struct qcow2_bitmap **ret)
{
    struct qcow2_bitmap *bm = NULL;
    int r;

    r = writable(img);
    r = r ? r : find(img, name, &bm);
    r = r ? r : usable(bm);
    if (r == 0) {
        *ret = bm;
    }
    return r;
}

static int check_name(struct qbm_image *img, const char *name)
{
    size_t len = strlen(name);
    uint32_t i;

    if (len == 0 || len > BME_MAX_NAME_SIZE) {
        return qbm_err(EINVAL, "bitmap names must be 1 to %u bytes long",
                       BME_MAX_NAME_SIZE);
    }
    for (i = 0; i < img->nb_bitmaps; i++) {
        if (strcmp(img->bitmaps[i].name, name) == 0) {
            return qbm_err(EEXIST, "a bitmap named '%s' already exists", name);
        }
    }
    return 0;
}

static int queue_free(struct qbm_image *img, uint64_t off, uint64_t len)
{
    uint64_t c;

    if (off == 0 || len == 0) {
        return 0;
    }
    for (c = 0; c < div_round_up(len, img->cluster_size); c++) {
        int r =
            qbm_darray_push(&img->pending_free, off + c * img->cluster_size, 0);

        if (r < 0) {
            return r;
        }
    }
    return 0;
}

/* Queue the clusters of the on-disk copy of bm (table and data). */
static int queue_bitmap_clusters(struct qbm_image *img, struct qcow2_bitmap *bm)
{
    uint64_t i;
    int r;

    if (bm->table_offset == 0) {
        return 0; /* added in this session: nothing on disk yet */
    }
    r = queue_free(img, bm->table_offset, (uint64_t)bm->table_size * 8);
    if (r < 0) {
        return r;
    }
    if (qcow2_bitmap_table_load(img, bm) < 0) {
        /* An in-use bitmap may have a broken table: free the table but
         * leak the data clusters rather than free something wrongly. */
        return 0;
    }
    for (i = 0; i < bm->table_size; i++) {
        r = queue_free(img, bm->table[i] & BME_TABLE_OFFSET_MASK,
                       img->cluster_size);
        if (r < 0) {
            return r;
        }
    }
    return 0;
}

/* Make bm->data hold the bitmap's contents, ready to be modified. */
static int stage_data(struct qbm_image *img, struct qcow2_bitmap *bm, bool load)
{
    struct qbm_bmap *data;
    int r;

    if (bm->data) {
        return 0;
    }
    if (load && bm->table_offset) {
        r = qcow2_bitmap_load(img, bm, &data);
    } else {
        r = qbm_bmap_new(img->hdr.size, 1ull << bm->granularity_bits,
                         img->cluster_size, &data);
    }
    if (r < 0) {
        return r;
    }
    r = queue_bitmap_clusters(img, bm);
    if (r < 0) {
        qbm_bmap_free(data);
        return r;
    }
    bm->data = data;
    img->staged = true;
    return 0;
}

int qbm_impl_bitmap_add(struct qbm_image *img, const char *name, uint64_t gran,
                        unsigned flags)
{
    struct qcow2_bitmap *bms, *bm;
    unsigned bits;
    uint64_t table_size, phys, dir_size = 0;
    uint32_t i;
    int r;

    r = writable(img);
    r = r ? r : check_name(img, name);
    if (r < 0) {
        return r;
    }
    if (flags & ~QBM_ADD_MASK) {
        return qbm_err(EINVAL, "unknown flags 0x%x", flags);
    }
    if (gran == 0) {
        gran = img->cluster_size;
        gran = gran < DEFAULT_GRAN_MIN   ? DEFAULT_GRAN_MIN
               : gran > DEFAULT_GRAN_MAX ? DEFAULT_GRAN_MAX
                                         : gran;
    }
    if (gran & (gran - 1) || gran < (1u << BME_MIN_GRANULARITY_BITS) ||
        gran > (1ull << BME_MAX_GRANULARITY_BITS)) {
        return qbm_err(EINVAL, "granularity must be a power of two from "
                               "512 B to 2 GiB");
    }
    bits = (unsigned)__builtin_ctzll(gran);
    table_size =
        qcow2_bitmap_table_size(img->hdr.size, bits, img->cluster_size);
    if (table_size > BME_MAX_TABLE_SIZE ||
        !mul_ok(table_size, img->cluster_size, &phys) ||
        phys > BME_MAX_PHYS_SIZE) {
        return qbm_err(EFBIG,
                       "a bitmap of granularity %llu for this disk "
                       "would exceed 512 MiB; use a larger granularity",
                       (unsigned long long)gran);
    }
    if (img->nb_bitmaps >= BME_MAX_BITMAPS) {
        return qbm_err(ENOSPC, "the image already has 65535 bitmaps");
    }
    for (i = 0; i < img->nb_bitmaps; i++) {
        dir_size += qcow2_bitmap_entry_size(&img->bitmaps[i]);
    }
    dir_size += ((uint64_t)BME_ENTRY_HEADER + strlen(name) + 7) & ~7ull;
    if (dir_size > BME_MAX_DIR_SIZE) {
        return qbm_err(ENOSPC, "the bitmap directory would exceed its "
                               "maximum size");
    }
    bms = qbm_realloc(img->bitmaps, (img->nb_bitmaps + 1) * sizeof(*bms));
    if (!bms) {
        return -ENOMEM;
    }
    img->bitmaps = bms;
    bm = &bms[img->nb_bitmaps];
    memset(bm, 0, sizeof(*bm));
    bm->name = qbm_strndup(name, strlen(name));
    if (!bm->name) {
        return -ENOMEM;
    }
    bm->name_size = (uint16_t)strlen(name);
    bm->granularity_bits = (uint8_t)bits;
    bm->type = BME_TYPE_DIRTY_TRACKING;
    bm->flags = (flags & QBM_ADD_DISABLED) ? 0 : BME_FLAG_AUTO;
    bm->table_size = (uint32_t)table_size;
    img->nb_bitmaps++;
    r = stage_data(img, bm, false);
    if (r < 0) {
        free(bm->name);
        img->nb_bitmaps--;
        return r;
    }
    return 0;
}

QBM_API int qbm_bitmap_add(struct qbm_image *img, const char *name,
                           uint64_t granularity, unsigned flags)
{
    if (!name) {
        return qbm_public_ret(qbm_err(EINVAL, "no bitmap name"));
    }
    return qbm_public_ret(qbm_impl_bitmap_add(img, name, granularity, flags));
}

int qbm_impl_bitmap_remove(struct qbm_image *img, const char *name)
{
    struct qcow2_bitmap *bm = NULL;
    uint32_t idx;
    int r;

    r = writable(img);
    r = r ? r : find(img, name, &bm);
    r = r ? r : queue_bitmap_clusters(img, bm);
    if (r < 0) {
        return r;
    }
    idx = (uint32_t)(bm - img->bitmaps);
    free(bm->name);
    free(bm->table);
    qbm_bmap_free(bm->data);
    memmove(bm, bm + 1, (img->nb_bitmaps - idx - 1) * sizeof(*bm));
    img->nb_bitmaps--;
    img->staged = true;
    return 0;
}

QBM_API int qbm_bitmap_remove(struct qbm_image *img, const char *name)
{
    return qbm_public_ret(qbm_impl_bitmap_remove(img, name));
}

int qbm_impl_bitmap_clear(struct qbm_image *img, const char *name)
{
    struct qcow2_bitmap *bm = NULL;
    int r;

    r = find_editable(img, name, &bm);
    if (r < 0) {
        return r;
    }
    if (bm->data) {
        struct qbm_bmap *empty;

        r = qbm_bmap_new(img->hdr.size, 1ull << bm->granularity_bits,
                         img->cluster_size, &empty);
        if (r < 0) {
            return r;
        }
        qbm_bmap_free(bm->data);
        bm->data = empty;
        return 0;
    }
    return stage_data(img, bm, false);
}

QBM_API int qbm_bitmap_clear(struct qbm_image *img, const char *name)
{
    return qbm_public_ret(qbm_impl_bitmap_clear(img, name));
}

static int set_enabled(struct qbm_image *img, const char *name, bool on)
{
    struct qcow2_bitmap *bm = NULL;
    int r;

    r = find_editable(img, name, &bm);
    if (r < 0) {
        return r;
    }
    bm->flags = on ? (bm->flags | BME_FLAG_AUTO) : (bm->flags & ~BME_FLAG_AUTO);
    img->staged = true;
    return 0;
}

int qbm_impl_bitmap_enable(struct qbm_image *img, const char *name)
{
    return set_enabled(img, name, true);
}

QBM_API int qbm_bitmap_enable(struct qbm_image *img, const char *name)
{
    return qbm_public_ret(qbm_impl_bitmap_enable(img, name));
}

int qbm_impl_bitmap_disable(struct qbm_image *img, const char *name)
{
    return set_enabled(img, name, false);
}

QBM_API int qbm_bitmap_disable(struct qbm_image *img, const char *name)
{
    return qbm_public_ret(qbm_impl_bitmap_disable(img, name));
}

int qbm_impl_bitmap_rename(struct qbm_image *img, const char *old_name,
                           const char *new_name)
{
    struct qcow2_bitmap *bm = NULL;
    char *copy;
    int r;

    r = writable(img);
    r = r ? r : find(img, old_name, &bm);
    if (r == 0 && strcmp(old_name, new_name) != 0) {
        r = check_name(img, new_name);
    }
    if (r < 0) {
        return r;
    }
    copy = qbm_strndup(new_name, strlen(new_name));
    if (!copy) {
        return -ENOMEM;
    }
    free(bm->name);
    bm->name = copy;
    bm->name_size = (uint16_t)strlen(copy);
    img->staged = true;
    return 0;
}

QBM_API int qbm_bitmap_rename(struct qbm_image *img, const char *old_name,
                              const char *new_name)
{
    return qbm_public_ret(qbm_impl_bitmap_rename(img, old_name, new_name));
}

static int set_range_cb(void *opaque, uint64_t off, uint64_t len)
{
    return qbm_bmap_set_range(opaque, off, len);
}

struct merge_ctx {
    struct qbm_bmap *dst;
    struct qbm_extent_state st; /* when granularities differ */
    bool same;
};

static int merge_chunk(void *opaque, uint64_t idx, const uint8_t *data)
{
    struct merge_ctx *m = opaque;

    if (m->same) {
        return qbm_bmap_or_chunk(m->dst, idx, data);
    }
    return qbm_extent_state_chunk(&m->st, idx, data);
}

/* Whether two images are handles of one file (or one block device, maybe
 * through two nodes). */
static bool same_file(struct qbm_image *a, struct qbm_image *b)
{
    int fa = qbm_io_fd(a->io), fb = qbm_io_fd(b->io);
    struct stat sa, sb;

    if (fa < 0 || fb < 0 || fstat(fa, &sa) < 0 || fstat(fb, &sb) < 0) {
        return false;
    }
    if (S_ISBLK(sa.st_mode) && S_ISBLK(sb.st_mode)) {
        return sa.st_rdev == sb.st_rdev;
    }
    return sa.st_dev == sb.st_dev && sa.st_ino == sb.st_ino;
}

/* Read clusters offs[0..n) of src into bufs and OR them into chunks
 * idx[0..n) of dst (see qbm_bmap_or_chunks). */
static int or_window(struct qbm_image *src, struct qbm_bmap *dst,
                     struct qbm_io *src_io, const uint64_t *idx,
                     const uint64_t *offs, uint8_t *const *bufs,
                     uint8_t *const *tbufs, size_t n)
{
    int r = qcow2_bitmap_read_clusters(src, offs, bufs, n);

    return r ? r
             : qbm_bmap_or_chunks(dst, idx, (const uint8_t *const *)bufs, n,
                                  src_io, offs, tbufs);
}

/*
 * Same granularity and cluster size: an empty target chunk becomes a
 * reference to the source's data cluster (shared with it at commit when
 * both are in one image, else copied file to file), so a merge into an
 * empty or sparse bitmap moves no bitmap data through memory; other chunks
 * are ORed.
 */
static int merge_same_layout(struct qbm_image *img, struct qbm_image *src,
                             struct qcow2_bitmap *sbm, struct qbm_bmap *dst)
{
    struct qbm_io *src_io = img->io;
    uint64_t cs = src->cluster_size, win, i, *idx = NULL, *offs = NULL;
    uint8_t *buf = NULL, **bufs = NULL, *tbuf = NULL, **tbufs = NULL;
    size_t n = 0, k;
    int r = 0;

    if (src != img && (src->lock == QBM_LOCK_NONE || same_file(src, img))) {
        /* Read now: nothing keeps an unlocked source from being rewritten
         * before the commit, and a second handle of this very file may
         * refer to clusters it has freed, which the commit may reuse. */
        src_io = NULL;
    } else if (src != img) {
        /* Another image: reference it through a descriptor of our own
         * (keeping its read lock) so the caller may close src before
         * committing. Backends without descriptors are read now. */
        r = qbm_io_dup(src->io, &src_io);
        if (r == 0) {
            r = qbm_bmap_adopt_io(dst, src_io);
        } else if (r == -EOPNOTSUPP) {
            src_io = NULL;
            r = 0;
        }
    }
    r = r ? r : qcow2_bitmap_table_load(src, sbm);
    /* The clusters to OR are read a window at a time, as are the target's
     * referenced clusters they may change (qbm_bmap_or_chunks: into tbuf;
     * those that change become pending ORs of the two clusters). */
    win = cs >= QBM_READ_WINDOW ? 1 : QBM_READ_WINDOW / cs;
    for (i = 0; r == 0 && i < dst->nchunks && i < sbm->table_size; i++) {
        uint64_t e = sbm->table[i], off = e & BME_TABLE_OFFSET_MASK;
        uint8_t *c = dst->chunks[i];

        if (!off) {
            r = qbm_bmap_or_chunk(
                dst, i, (e & BME_TABLE_ALL_ONES) ? QBM_CHUNK_ONES : NULL);
            continue;
        }
        if (c == QBM_CHUNK_ONES ||
            ((c == QBM_CHUNK_REF || c == QBM_CHUNK_OR) &&
             dst->refs[i].io == src->io && dst->refs[i].offset == off) ||
            (c == QBM_CHUNK_OR && dst->ors[i].io == src_io &&
             dst->ors[i].offset == off)) {
            continue; /* already all ones, or holds the very same cluster */
        }
        if (!c && src_io) {
            r = qbm_bmap_set_ref(dst, i, src_io, off);
            continue;
        }
        if (!buf) {
            buf = qbm_window_alloc(win * cs);
            tbuf = qbm_window_alloc(win * cs);
            idx = qbm_malloc(win * sizeof(*idx));
            offs = qbm_malloc(win * sizeof(*offs));
            bufs = qbm_malloc(win * sizeof(*bufs));
            tbufs = qbm_malloc(win * sizeof(*tbufs));
            if (!buf || !tbuf || !idx || !offs || !bufs || !tbufs) {
                r = -ENOMEM;
                break;
            }
            for (k = 0; k < win; k++) {
                bufs[k] = buf + k * cs;
                tbufs[k] = tbuf + k * cs;
            }
        }
        idx[n] = i;
        offs[n] = off;
        if (++n == win) {
            r = or_window(src, dst, src_io, idx, offs, bufs, tbufs, n);
            n = 0;
        }
    }
    if (r == 0 && n) {
        r = or_window(src, dst, src_io, idx, offs, bufs, tbufs, n);
    }
    qbm_window_free(buf, buf ? win * cs : 0);
    qbm_window_free(tbuf, tbuf ? win * cs : 0);
    free(idx);
    free(offs);
    free(bufs);
    free(tbufs);
    return r;
}

/* OR a stored bitmap into dst, streaming its data clusters one at a time
 * (no copy of the source is built). */
static int merge_stream(struct qbm_image *img, struct qbm_image *src,
                        struct qcow2_bitmap *sbm, struct qbm_bmap *dst)
{
    struct merge_ctx m = { .dst = dst };
    uint64_t gran = 1ull << sbm->granularity_bits;
    int r = 0;

    m.same = gran == dst->granularity &&
             src->cluster_size == dst->chunk_bytes &&
             src->hdr.size == dst->disk_size;
    m.st.fn = set_range_cb;
    m.st.opaque = dst;
    m.st.granularity = gran;
    m.st.disk_size = src->hdr.size;
    m.st.chunk_bytes = src->cluster_size;
    m.st.bits_per_chunk = src->cluster_size * 8;
    m.st.nbits = div_round_up(src->hdr.size, gran);
    if (m.same) {
        return merge_same_layout(img, src, sbm, dst);
    }
    r = qcow2_bitmap_read_chunks(src, sbm, merge_chunk, &m);
    if (r == 0 && !m.same) {
        r = qbm_extent_state_finish(&m.st);
    }
    return r;
}

int qbm_impl_bitmap_merge(struct qbm_image *img, const char *target,
                          struct qbm_image *src, const char *src_name)
{
    struct qcow2_bitmap *dst = NULL, *sbm = NULL;
    int r;

    r = find_editable(img, target, &dst);
    if (r < 0) {
        return r;
    }
    r = find(src, src_name, &sbm);
    r = r ? r : usable(sbm);
    if (r == 0 && src->bitmaps_state == QBM_BITMAPS_STALE) {
        r = qbm_err(EUCLEAN, "the source's bitmaps are stale");
    }
    if (r == 0 && src->hdr.size != img->hdr.size) {
        r = qbm_err(EINVAL,
                    "the source image's virtual size (%llu) differs "
                    "from the target's (%llu)",
                    (unsigned long long)src->hdr.size,
                    (unsigned long long)img->hdr.size);
    }
    r = r ? r : stage_data(img, dst, true);
    if (r < 0) {
        return r;
    }
    if (sbm->data) {
        return qbm_bmap_extents(sbm->data, set_range_cb, dst->data);
    }
    return merge_stream(img, src, sbm, dst->data);
}

QBM_API int qbm_bitmap_merge(struct qbm_image *img, const char *target,
                             struct qbm_image *src, const char *src_name)
{
    return qbm_public_ret(qbm_impl_bitmap_merge(img, target, src, src_name));
}

int qbm_impl_bitmap_set_dirty(struct qbm_image *img, const char *name,
                              uint64_t offset, uint64_t length)
{
    struct qcow2_bitmap *bm = NULL;
    int r;

    r = find_editable(img, name, &bm);
    r = r ? r : stage_data(img, bm, true);
    return r ? r : qbm_bmap_set_range(bm->data, offset, length);
}

QBM_API int qbm_bitmap_set_dirty(struct qbm_image *img, const char *name,
                                 uint64_t offset, uint64_t length)
{
    return qbm_public_ret(qbm_impl_bitmap_set_dirty(img, name, offset, length));
}

struct populate_ctx {
    struct qbm_bmap *bm;
};

static int populate_cb(void *opaque, uint64_t off, uint64_t len,
                       unsigned status)
{
    struct populate_ctx *ctx = opaque;

    return qbm_bmap_set_range(ctx->bm, off, len);
}

int qbm_impl_bitmap_populate(struct qbm_image *img, const char *name,
                             struct qbm_image *layer)
{
    struct qcow2_bitmap *bm = NULL;
    struct populate_ctx ctx;
    int r;

    r = find_editable(img, name, &bm);
    r = r ? r : stage_data(img, bm, true);
    if (r < 0) {
        return r;
    }
    ctx.bm = bm->data;
    /* Ranges past the bitmap's disk are clipped by set_range. */
    return qbm_impl_image_allocation(layer, populate_cb, &ctx);
}

QBM_API int qbm_bitmap_populate(struct qbm_image *img, const char *name,
                                struct qbm_image *layer)
{
    return qbm_public_ret(qbm_impl_bitmap_populate(img, name, layer));
}

int qbm_impl_bitmap_salvage(struct qbm_image *img, const char *name)
{
    struct qcow2_bitmap *bm = NULL;
    int r;

    r = writable(img);
    r = r ? r : find(img, name, &bm);
    if (r < 0) {
        return r;
    }
    if (!(bm->flags & BME_FLAG_IN_USE)) {
        return qbm_err(EINVAL, "bitmap '%s' is not in use", name);
    }
    /* The stale table may be unreadable: start from nothing. */
    r = stage_data(img, bm, false);
    r = r ? r : qbm_bmap_set_range(bm->data, 0, img->hdr.size);
    if (r == 0) {
        bm->flags &= ~BME_FLAG_IN_USE;
    }
    return r;
}

QBM_API int qbm_bitmap_salvage(struct qbm_image *img, const char *name)
{
    return qbm_public_ret(qbm_impl_bitmap_salvage(img, name));
}

/* ---- commit ------------------------------------------------------------ */

/*
 * A commit runs in two phases (docs/design.md, "Space"): first every
 * cluster is allocated (data, tables, the directory, and in the allocator
 * the refcount blocks and a grown table they need), so that the space the
 * edit needs is known and checked before anything is written; then the new
 * clusters are written and the transaction commits.
 */

/* How a commit runs. */
enum commit_mode {
    COMMIT_WRITE,      /* the real thing */
    COMMIT_PLAN,       /* allocate and check, write nothing */
    COMMIT_PLAN_WORST, /* the same, every chunk of a staged bitmap dirty */
};

/* The new table of a staged bitmap, planned before anything is written. */
struct new_table {
    struct qcow2_bitmap *bm;
    uint8_t *tbl; /* big-endian entries, whole clusters */
    uint64_t offset;
    uint64_t clusters;
    uint8_t *tail; /* the last chunk's set bits, when it is all ones */
};

/* Where each data cluster of bm->data and its new table go. */
static int plan_bitmap(struct qbm_image *img, struct qbm_txn *txn,
                       struct new_table *nt, bool worst)
{
    struct qbm_bmap *d = nt->bm->data;
    uint64_t cs = img->cluster_size, i, off = 0, n = 0, left = 0;
    bool run;
    int r = 0;

    nt->clusters = div_round_up(d->nchunks * 8, cs);
    nt->tbl = qbm_calloc(nt->clusters, cs);
    if (!nt->tbl) {
        return -ENOMEM;
    }
    for (i = 0; i < d->nchunks && r == 0; i++) {
        const uint8_t *c = d->chunks[i];
        bool shared = false;

        if (!c && !worst) {
            continue;
        }
        if (c == QBM_CHUNK_REF && d->refs[i].io == img->io) {
            /* Unmodified data of this image: share the cluster. */
            r = qbm_txn_share(txn, d->refs[i].offset, &shared);
        }
        if (shared) {
            be64_store(nt->tbl + i * 8, d->refs[i].offset);
        } else {
            n++; /* an entry left 0 gets a new cluster below */
        }
    }
    /*
     * The new clusters in one run, in table order, so that they go out in
     * one vectored write (write_bitmap): first fit, in a hole large enough
     * or at the end. The image never grows for it: without such a hole
     * they are placed one by one, first fit, as before (on a file and a
     * device alike). Runs longer than half a refcount block's range are
     * split (qbm_txn_alloc_run), which only matters for narrow clusters
     * with wide refcounts.
     */
    run = true;
    for (i = 0; i < d->nchunks && r == 0 && n; i++) {
        if ((!d->chunks[i] && !worst) || be64_load(nt->tbl + i * 8)) {
            continue;
        }
        if (left == 0) {
            r = run ? qbm_txn_alloc_run(txn, n, &off, &left)
                    : qbm_txn_alloc(txn, 1, &off);
            /* One cluster for more: no hole; the rest one by one. */
            run = run && (left > 1 || n == 1);
            left = left ? left : 1;
            if (r < 0) {
                break;
            }
        }
        be64_store(nt->tbl + i * 8, off);
        off += cs;
        left--;
        n--;
    }
    return r ? r : qbm_txn_alloc(txn, nt->clusters, &nt->offset);
}

/*
 * Writes of new clusters gathered into batches: buffers for consecutive
 * clusters go out in one vectored write, copies of consecutive clusters of
 * one file in one copy.
 */
#define BATCH_IOV 1024

struct batch {
    struct qbm_txn *txn;
    struct iovec iov[BATCH_IOV];
    int n;
    uint64_t off, len;        /* the pending write */
    struct qbm_io *src;       /* the pending copy: from src */
    uint64_t src_off, to, cp; /* ... at src_off, to `to`, cp bytes */
    /* Pending ORs, computed a window at a time: chunks ors[0..nor) of the
     * bitmap being written are in orbuf, ors[pos] is the next. */
    uint8_t *orbuf, *ortmp, **orbufs, **ortmps;
    uint64_t *ors;
    size_t win, nor, pos, orbytes;
};

static int batch_flush(struct batch *b)
{
    int r = 0;

    if (b->n) {
        r = qbm_txn_writev(b->txn, b->iov, b->n, b->off);
        b->n = 0;
    }
    if (r == 0 && b->cp) {
        r = qbm_txn_copy(b->txn, b->src, b->src_off, b->cp, b->to);
        b->cp = 0;
    }
    return r;
}

static int batch_write(struct batch *b, const void *buf, size_t len,
                       uint64_t off)
{
    int r = 0;

    if (b->n && (b->off + b->len != off || b->n == BATCH_IOV)) {
        r = batch_flush(b);
    }
    if (b->n == 0) {
        b->off = off;
        b->len = 0;
    }
    b->iov[b->n].iov_base = (void *)buf;
    b->iov[b->n++].iov_len = len;
    b->len += len;
    return r;
}

static int batch_copy(struct batch *b, struct qbm_io *src, uint64_t src_off,
                      size_t len, uint64_t off)
{
    int r = 0;

    if (b->cp && b->src == src && b->src_off + b->cp == src_off &&
        b->to + b->cp == off) {
        b->cp += len;
        return 0;
    }
    if (b->cp) {
        r = batch_flush(b);
    }
    b->src = src;
    b->src_off = src_off;
    b->to = off;
    b->cp = len;
    return r;
}

/* Compute the next window of pending ORs of d, from chunk i on: the
 * buffers are written out first, as the batch may still point into them. */
static int or_fill(struct batch *b, const struct qbm_bmap *d, uint64_t i)
{
    size_t k, cs = d->chunk_bytes;
    int r = batch_flush(b);

    if (r == 0 && !b->orbuf) {
        b->win = cs >= QBM_READ_WINDOW ? 1 : QBM_READ_WINDOW / cs;
        b->orbytes = b->win * cs;
        b->orbuf = qbm_window_alloc(b->win * cs);
        b->ortmp = qbm_window_alloc(b->win * cs);
        b->orbufs = qbm_malloc(b->win * sizeof(*b->orbufs));
        b->ortmps = qbm_malloc(b->win * sizeof(*b->ortmps));
        b->ors = qbm_malloc(b->win * sizeof(*b->ors));
        if (!b->orbuf || !b->ortmp || !b->orbufs || !b->ortmps || !b->ors) {
            return -ENOMEM;
        }
        for (k = 0; k < b->win; k++) {
            b->orbufs[k] = b->orbuf + k * cs;
            b->ortmps[k] = b->ortmp + k * cs;
        }
    }
    for (b->nor = 0, b->pos = 0; r == 0 && i < d->nchunks && b->nor < b->win;
         i++) {
        if (d->chunks[i] == QBM_CHUNK_OR) {
            b->ors[b->nor++] = i;
        }
    }
    return r ? r
             : qbm_bmap_read_chunks(d, b->ors, b->orbufs, b->ortmps, b->nor);
}

static void or_free(struct batch *b)
{
    qbm_window_free(b->orbuf, b->orbytes);
    qbm_window_free(b->ortmp, b->orbytes);
    free(b->orbufs);
    free(b->ortmps);
    free(b->ors);
}

/* Write the data clusters and the table plan_bitmap placed; `ones` holds
 * a cluster of set bits. Every buffer stays valid until the batch is
 * flushed. */
static int write_bitmap(struct qbm_image *img, struct batch *b,
                        struct new_table *nt, const uint8_t *ones)
{
    struct qcow2_bitmap *bm = nt->bm;
    struct qbm_bmap *d = bm->data;
    uint64_t cs = img->cluster_size, bpc = cs * 8, i;
    int r = 0;

    b->nor = b->pos = 0; /* windows of pending ORs are per bitmap */
    for (i = 0; i < d->nchunks && r == 0; i++) {
        const uint8_t *c = d->chunks[i];
        uint64_t off = be64_load(nt->tbl + i * 8);

        if (!c) {
            continue;
        }
        if (c == QBM_CHUNK_REF) {
            const struct qbm_chunk_ref *ref = &d->refs[i];

            if (ref->io != img->io || ref->offset != off) {
                /* Copied without reading it here. */
                r = batch_copy(b, ref->io, ref->offset, cs, off);
            }
            continue;
        }
        if (c == QBM_CHUNK_OR) {
            if (b->pos == b->nor) {
                r = or_fill(b, d, i);
                if (r < 0) {
                    break;
                }
            }
            if (b->pos == b->nor || b->ors[b->pos] != i) {
                r = qbm_err(EIO, "internal: pending OR %llu out of order",
                            (unsigned long long)i);
                break;
            }
            c = b->orbufs[b->pos++];
        }
        if (c == QBM_CHUNK_ONES) {
            /* QEMU never writes the all-ones table entry: write the bits,
             * leaving those past the end of the disk zero. */
            uint64_t nb = d->nbits - i * bpc;

            c = ones;
            if (nb < bpc) {
                nt->tail = qbm_calloc(1, cs);
                if (!nt->tail) {
                    return -ENOMEM;
                }
                memset(nt->tail, 0xff, nb / 8);
                if (nb % 8) {
                    nt->tail[nb / 8] = (uint8_t)((1u << (nb % 8)) - 1);
                }
                c = nt->tail;
            }
        }
        r = batch_write(b, c, cs, off);
    }
    if (r == 0) {
        /* Readers look at table_size entries only; like QEMU, leave the
         * rest of the last cluster unwritten (fewer bytes to flush). */
        r = batch_write(b, nt->tbl, div_round_up(d->nchunks * 8, 512) * 512,
                        nt->offset);
    }
    if (r) {
        return r;
    }
    bm->table_offset = nt->offset;
    bm->table_size = (uint32_t)d->nchunks;
    bm->flags &= ~BME_FLAG_IN_USE;
    return 0;
}

static void free_tables(struct new_table *nts, size_t n)
{
    size_t i;

    for (i = 0; nts && i < n; i++) {
        free(nts[i].tbl);
        free(nts[i].tail);
    }
    free(nts);
}

static int commit_run(struct qbm_image *img, enum commit_mode mode,
                      struct qbm_space *ret_space)
{
    struct qbm_txn *txn = NULL;
    struct new_table *nts = NULL;
    struct qbm_space sp;
    uint64_t dir_size = 0, dir_off = 0, pos, i, nclusters = 0;
    size_t nt = 0;
    uint8_t *buf = NULL, *ones = NULL;
    struct batch *b = NULL;
    int r;

    r = writable(img);
    if (r < 0) {
        return r;
    }
    if (!img->staged) {
        /* Nothing to write; a dry run still reports where the image ends. */
        memset(ret_space, 0, sizeof(*ret_space));
        r = mode == COMMIT_WRITE
                ? 0
                : qbm_impl_image_end_offset(img, &ret_space->end_before);
        ret_space->end_after = ret_space->end_before;
        return r;
    }
    r = qbm_txn_begin(img, &txn);
    if (r < 0) {
        return r;
    }
    nts = qbm_calloc(img->nb_bitmaps + 1, sizeof(*nts));
    r = nts ? 0 : -ENOMEM;
    /* 1. Where everything goes. */
    for (i = 0; i < img->nb_bitmaps && r == 0; i++) {
        if (img->bitmaps[i].data) {
            nts[nt].bm = &img->bitmaps[i];
            r = plan_bitmap(img, txn, &nts[nt++], mode == COMMIT_PLAN_WORST);
        }
    }
    for (i = 0; i < img->nb_bitmaps; i++) {
        dir_size += qcow2_bitmap_entry_size(&img->bitmaps[i]);
    }
    if (r == 0 && img->nb_bitmaps) {
        nclusters = div_round_up(dir_size, img->cluster_size);
        r = qbm_txn_alloc(txn, nclusters, &dir_off);
    }
    if (r == 0 && img->bitmaps_state == QBM_BITMAPS_OK) {
        r = qbm_txn_free_later(txn, img->bm_ext.dir_offset,
                               img->bm_ext.dir_size);
    }
    for (i = 0; i < img->pending_free.n && r == 0; i++) {
        r = qbm_txn_free_later(txn, img->pending_free.v[i], img->cluster_size);
    }
    /* 2. Does it fit (and the header switch work)? The worst case is
     * only a figure: the edit itself may well fit. A plan checks the
     * device's capacity after, with its figures (qbm_impl_commit_plan). */
    if (r == 0 && mode == COMMIT_PLAN_WORST) {
        qbm_txn_space(txn, &sp);
    } else if (r == 0) {
        r = qbm_txn_prepare(txn, img->nb_bitmaps, mode != COMMIT_WRITE, &sp);
    }
    if (r < 0 || mode != COMMIT_WRITE) {
        if (r == 0) {
            *ret_space = sp;
        }
        goto out;
    }
    /* 3. Write the new clusters, in batches. */
    b = qbm_calloc(1, sizeof(*b));
    ones = qbm_malloc(img->cluster_size);
    r = b && ones ? 0 : -ENOMEM;
    if (r == 0) {
        b->txn = txn;
        memset(ones, 0xff, img->cluster_size);
    }
    for (i = 0; i < nt && r == 0; i++) {
        r = write_bitmap(img, b, &nts[i], ones);
    }
    if (r == 0 && img->nb_bitmaps) {
        buf = qbm_calloc(nclusters, img->cluster_size);
        r = buf ? 0 : -ENOMEM;
        for (i = 0, pos = 0; i < img->nb_bitmaps && r == 0; i++) {
            qcow2_bitmap_entry_encode(&img->bitmaps[i], buf + pos);
            pos += qcow2_bitmap_entry_size(&img->bitmaps[i]);
        }
        r = r ? r
              : batch_write(b, buf, div_round_up(dir_size, 512) * 512, dir_off);
    }
    r = r ? r : batch_flush(b);
    if (b) {
        or_free(b);
    }
    free(b);
    free(ones);
    free(buf);
    if (r < 0) {
        /* The abort gives the old state back; the staged one is gone. */
        img->broken = true;
        goto out;
    }
    /* 4. The commit proper (it consumes txn). */
    *ret_space = sp;
    r = qbm_txn_commit(txn, img->nb_bitmaps, dir_off, dir_size);
    txn = NULL;
    if (r < 0) {
        img->broken = true;
    } else {
        r = qbm_image_reload(img);
    }
out:
    qbm_txn_abort(txn);
    free_tables(nts, nt);
    return r;
}

int qbm_impl_commit(struct qbm_image *img)
{
    struct qbm_space sp;

    return commit_run(img, COMMIT_WRITE, &sp);
}

QBM_API int qbm_commit(struct qbm_image *img)
{
    int r;

    img->changed = false;
    r = qbm_impl_commit(img);
    if (r < 0 && !img->changed) {
        char msg[1024];

        snprintf(msg, sizeof(msg), "%s", qbm_err_message());
        qbm_err_set(-r, "%s; the image was not changed", msg);
    }
    return qbm_public_ret(r);
}

int qbm_impl_commit_plan(struct qbm_image *img, unsigned flags,
                         uint64_t *ret_bytes, uint64_t *ret_end)
{
    struct qbm_space sp;
    int r;

    if (flags & ~QBM_PLAN_MASK) {
        return qbm_err(EINVAL, "unknown flags 0x%x", flags);
    }
    r = commit_run(
        img, (flags & QBM_PLAN_WORST_CASE) ? COMMIT_PLAN_WORST : COMMIT_PLAN,
        &sp);
    if (r < 0) {
        return r;
    }
    /* A device too small still gets the figures: by them its manager
     * knows how far to extend it. The worst case is only a figure. */
    *ret_bytes = sp.bytes;
    *ret_end = sp.end_after;
    return (flags & QBM_PLAN_WORST_CASE) ? 0 : qbm_txn_check_capacity(img, &sp);
}

int qbm_impl_commit_space(struct qbm_image *img, struct qbm_space *ret)
{
    return commit_run(img, COMMIT_PLAN, ret);
}

QBM_API int qbm_commit_plan(struct qbm_image *img, unsigned flags,
                            uint64_t *ret_bytes, uint64_t *ret_end)
{
    return qbm_public_ret(qbm_impl_commit_plan(img, flags, ret_bytes, ret_end));
}
