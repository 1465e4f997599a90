/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * libqbm - offline access to the persistent dirty bitmaps of qcow2 images.
 *
 * Conventions (see docs/design.md):
 *  - Handles are opaque. qbm_*_close(NULL) is a no-op.
 *  - Calls that can fail return -1 (or NULL); the reason is then available
 *    from qbm_get_error() and qbm_get_errno() in the same thread.
 *  - Output parameters are named ret_* and are left untouched on failure.
 *  - Strings returned by the library are borrowed: they live as long as the
 *    handle they came from, unless stated otherwise.
 *  - Offsets and lengths are bytes, as uint64_t.
 *  - Threads: a handle is used by one thread at a time; different handles
 *    may be used by different threads at once; the last error is per
 *    thread (docs/api.md, which also states the soname policy).
 */
#ifndef QBM_H
#define QBM_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(__GNUC__)
#define QBM_API __attribute__((visibility("default")))
#else
#define QBM_API
#endif

/*
 * The version of this header, the same as meson's project version (the
 * suite `lint` checks it); qbm_version() gives the library's at run time.
 */
#define QBM_VERSION_MAJOR 0
#define QBM_VERSION_MINOR 1
#define QBM_VERSION_MICRO 0
/* True when this header is at least MAJOR.MINOR.MICRO. */
#define QBM_CHECK_VERSION(major, minor, micro)                        \
    (QBM_VERSION_MAJOR > (major) ||                                   \
     (QBM_VERSION_MAJOR == (major) && QBM_VERSION_MINOR > (minor)) || \
     (QBM_VERSION_MAJOR == (major) && QBM_VERSION_MINOR == (minor) && \
      QBM_VERSION_MICRO >= (micro)))

struct qbm_image;
struct qbm_chain;

/* ---- errors ---------------------------------------------------------- */

/*
 * The message of the last failed call in this thread: one phrase, no file
 * name prefix, no trailing newline. Borrowed; valid until the next failing
 * call in this thread. Never NULL (empty string when there was no error).
 */
QBM_API const char *qbm_get_error(void);

/* The errno value of the last failed call in this thread (0 if none). */
QBM_API int qbm_get_errno(void);

/* The library version as "MAJOR.MINOR.MICRO"; static storage. */
QBM_API const char *qbm_version(void);

/* ---- opening images -------------------------------------------------- */

/* Open for writing (not yet supported by every call; see qbm(1)). */
#define QBM_OPEN_RDWR 0x1u
/*
 * Do not take QEMU-compatible image locks (qemu-img -U / --force-share).
 * Only valid for read-only opens.
 */
#define QBM_OPEN_FORCE_SHARE 0x2u
/* A file without the qcow2 magic is opened as a raw layer (read-only). */
#define QBM_OPEN_ANY_FORMAT 0x4u
#define QBM_OPEN_MASK 0x7u

/*
 * Open a qcow2 image file. Read-only opens take the shared lock bytes QEMU
 * takes for a reader that does not allow writers (bytes 100, 201 and 203)
 * and fail with EBUSY when a process holds the image for writing, unless
 * QBM_OPEN_FORCE_SHARE is given.
 *
 * The header, its extensions, the refcount table, the L1 table, the internal
 * snapshot table and the bitmap directory are read and validated; a
 * structure that QEMU would refuse makes the open fail with EINVAL and a
 * message naming the structure and its file offset.
 *
 * Returns a new handle owned by the caller (free with qbm_close), or NULL.
 * The backing file is not opened: see qbm_chain_open().
 */
QBM_API struct qbm_image *qbm_open(const char *filename, unsigned flags);

/*
 * Open an image held in memory (for fuzzing and tests). The bytes are
 * copied; `name` is used in messages and may be NULL. No locks are taken.
 */
QBM_API struct qbm_image *qbm_open_memory(const void *buf, size_t len,
                                          const char *name, unsigned flags);

/* Close the image and release its locks. NULL is fine. */
QBM_API void qbm_close(struct qbm_image *img);

/* ---- image properties (all borrowed / plain values) ------------------- */

/* The file name as given to qbm_open(). */
QBM_API const char *qbm_image_filename(const struct qbm_image *img);
/* "qcow2" or "raw" (raw only inside chains). */
QBM_API const char *qbm_image_format(const struct qbm_image *img);
/* qcow2 version: 2 or 3 (0 for raw). */
QBM_API unsigned qbm_image_version(const struct qbm_image *img);
QBM_API uint64_t qbm_image_virtual_size(const struct qbm_image *img);
/* Cluster size in bytes (0 for raw). */
QBM_API uint64_t qbm_image_cluster_size(const struct qbm_image *img);
/* Refcount width in bits: 1..64 (0 for raw). */
QBM_API unsigned qbm_image_refcount_bits(const struct qbm_image *img);
/* "zlib" or "zstd" (NULL for raw). */
QBM_API const char *qbm_image_compression_type(const struct qbm_image *img);
/* The backing file name as stored in the image, or NULL when none. */
QBM_API const char *qbm_image_backing_file(const struct qbm_image *img);
/*
 * The backing file name resolved as QEMU resolves it (relative names are
 * joined with the directory part of this image's file name as given).
 * Returns a new string the caller frees, or NULL: errno ENOENT when there
 * is no backing file, EOPNOTSUPP for json: or protocol names.
 */
QBM_API char *qbm_image_backing_path(const struct qbm_image *img);
/* The backing format extension's value, or NULL when absent. */
QBM_API const char *qbm_image_backing_format(const struct qbm_image *img);
/* The external data file name, or NULL when absent. */
QBM_API const char *qbm_image_data_file(const struct qbm_image *img);
/* Host size of the image file in bytes; for a block device, the device's
 * size (BLKGETSIZE64). */
QBM_API uint64_t qbm_image_file_size(const struct qbm_image *img);
/*
 * The most the image can hold: the size of the block device it lives on,
 * or 0 when it is a file, which grows as it is written.
 */
QBM_API uint64_t qbm_image_capacity(const struct qbm_image *img);
/*
 * The image end offset: the end of the last host cluster whose refcount is
 * not 0, as `qemu-img check` reports it ("Image end offset") for a
 * consistent image. On a block device this is where the image stops (new
 * clusters go to free clusters below it first, then past it up to the
 * device's size). Sets *ret_end and returns 0, or -1. Raw layers: the
 * file size.
 */
QBM_API int qbm_image_end_offset(struct qbm_image *img, uint64_t *ret_end);
/*
 * The bytes the bitmaps occupy on disk: their directory, tables and data
 * clusters, each cluster counted once (bitmaps may share data clusters).
 * Sets *ret_bytes and returns 0, or -1.
 */
QBM_API int qbm_image_bitmaps_bytes(struct qbm_image *img, uint64_t *ret_bytes);
/* Number of internal snapshots. */
QBM_API unsigned qbm_image_snapshot_count(const struct qbm_image *img);

/* An internal snapshot's table entry, as `qemu-img info` shows it. */
struct qbm_snapshot_info {
    const char *id;         /* borrowed: valid until the image is closed */
    const char *name;       /* or reloaded (qbm_commit); cut at a NUL */
    uint64_t vm_state_size; /* bytes of saved VM state (0: disk only) */
    uint64_t vm_clock_nsec; /* guest clock when taken */
    uint64_t icount;        /* QBM_SNAPSHOT_NO_ICOUNT when not recorded */
    uint32_t date_sec;      /* host time when taken */
    uint32_t date_nsec;
};
#define QBM_SNAPSHOT_NO_ICOUNT UINT64_MAX
/*
 * Fill *ret with snapshot idx (0 .. qbm_image_snapshot_count() - 1, in
 * table order). Returns 0, or -1 (EINVAL: no such snapshot; *ret is
 * untouched).
 */
QBM_API int qbm_image_snapshot(const struct qbm_image *img, size_t idx,
                               struct qbm_snapshot_info *ret);
/*
 * Bytes the image file occupies on the host file system (st_blocks * 512;
 * an external data file not included): what `qemu-img info` (7.2) calls
 * actual-size. Returns 0, or -1 (ENOTSUP for an image opened from memory;
 * the errno of fstat()).
 */
QBM_API int qbm_image_allocated_size(const struct qbm_image *img,
                                     uint64_t *ret);

/* A LUKS key slot, as `qemu-img info` shows it. */
struct qbm_luks_slot {
    int active;          /* 1 when the slot holds a key */
    uint32_t iters;      /* PBKDF2 iterations (active slots) */
    uint32_t stripes;    /* anti-forensic stripes (active slots) */
    uint64_t key_offset; /* bytes from the start of the LUKS header */
};
/* An encrypted image's encryption, as `qemu-img info` shows it. */
struct qbm_encryption_info {
    char format[8]; /* "aes" (qcow2's legacy encryption) or "luks" */
    /* LUKS only ("" and 0 for "aes"), with QEMU's names: */
    char cipher_alg[48];     /* "aes-256", "serpent-128", "sm4", ... */
    char cipher_mode[33];    /* "xts", "cbc", "ecb", "ctr" */
    char ivgen_alg[33];      /* "plain64", "plain", "essiv" */
    char ivgen_hash_alg[33]; /* with "essiv", else "" */
    char hash_alg[33];       /* "sha256", ... */
    char uuid[41];
    uint64_t payload_offset; /* bytes */
    uint32_t master_key_iters;
    struct qbm_luks_slot slots[8];
};
/*
 * Fill *ret with the image's encryption (qcow2 crypt_method 1, or 2 with
 * its LUKS header, read from the file). Returns 0, or -1: ENOENT when the
 * image is not encrypted, EINVAL when the LUKS header is damaged.
 */
QBM_API int qbm_image_encryption(struct qbm_image *img,
                                 struct qbm_encryption_info *ret);

/* Feature words from the header (0 for v2 and raw). */
#define QBM_FEATURE_INCOMPATIBLE 0
#define QBM_FEATURE_COMPATIBLE 1
#define QBM_FEATURE_AUTOCLEAR 2
QBM_API uint64_t qbm_image_features(const struct qbm_image *img,
                                    unsigned which);
/*
 * The name of feature bit `bit` of word `which`, from the image's feature
 * name table when it has one, else the name the format specification gives,
 * else NULL. Borrowed.
 */
QBM_API const char *qbm_image_feature_name(const struct qbm_image *img,
                                           unsigned which, unsigned bit);

/* Incompatible feature bits (qcow2 specification, "Header"). */
#define QBM_INCOMPAT_DIRTY 0x1u
#define QBM_INCOMPAT_CORRUPT 0x2u
#define QBM_INCOMPAT_DATA_FILE 0x4u
#define QBM_INCOMPAT_COMPRESSION 0x8u
#define QBM_INCOMPAT_EXTL2 0x10u
/* Compatible feature bits. */
#define QBM_COMPAT_LAZY_REFCOUNTS 0x1u
/* Autoclear feature bits. */
#define QBM_AUTOCLEAR_BITMAPS 0x1u
#define QBM_AUTOCLEAR_DATA_FILE_RAW 0x2u

/*
 * State of the bitmaps extension as a whole:
 *  QBM_BITMAPS_NONE   no bitmaps extension;
 *  QBM_BITMAPS_OK     extension present and the autoclear "bitmaps" bit set;
 *  QBM_BITMAPS_STALE  extension present but the autoclear bit is clear (a
 *                     program without bitmap support wrote the image) or the
 *                     image is version 2: QEMU ignores every bitmap.
 */
#define QBM_BITMAPS_NONE 0
#define QBM_BITMAPS_OK 1
#define QBM_BITMAPS_STALE 2
QBM_API int qbm_image_bitmaps_state(const struct qbm_image *img);

/* ---- bitmaps ---------------------------------------------------------- */

/* Bitmap flags, as stored in the directory entry. */
#define QBM_BITMAP_IN_USE 0x1u
#define QBM_BITMAP_AUTO 0x2u

/*
 * Number of bitmaps listed in the directory (0 when none, and also 0 when
 * the extension is stale: see qbm_image_bitmaps_state).
 */
QBM_API size_t qbm_bitmap_count(const struct qbm_image *img);
/* Index of the bitmap named `name`, or -1 (errno ENOENT) when absent. */
QBM_API int qbm_bitmap_find(const struct qbm_image *img, const char *name);
/* Properties of bitmap `idx` (0 <= idx < qbm_bitmap_count). */
QBM_API const char *qbm_bitmap_name(const struct qbm_image *img, size_t idx);
QBM_API uint64_t qbm_bitmap_granularity(const struct qbm_image *img,
                                        size_t idx);
QBM_API unsigned qbm_bitmap_flags(const struct qbm_image *img, size_t idx);
/*
 * Whether the on-disk contents can be trusted: false when the bitmap is
 * in use (QEMU had it open for writing and did not store it back).
 */
QBM_API int qbm_bitmap_consistent(const struct qbm_image *img, size_t idx);

/*
 * Count the bytes of the virtual disk marked dirty in bitmap `idx`, clipped
 * to the virtual size. Reads the bitmap table and the data clusters only.
 * Returns 0 and sets *ret_bytes, or -1.
 */
QBM_API int qbm_bitmap_dirty_bytes(struct qbm_image *img, size_t idx,
                                   uint64_t *ret_bytes);

/*
 * Called once per extent, in increasing offset order, adjacent extents
 * merged. Return 0 to go on, anything else to stop the walk (that value is
 * then returned by the walker, with errno ECANCELED).
 */
typedef int (*qbm_extent_fn)(void *opaque, uint64_t offset, uint64_t length);

/*
 * Walk the dirty extents of bitmap `idx` (clipped to the virtual size).
 * Returns 0 when done, -1 on error, or the callback's non-zero value.
 */
QBM_API int qbm_bitmap_extents(struct qbm_image *img, size_t idx,
                               qbm_extent_fn fn, void *opaque);

/*
 * Walk the dirty extents of bitmap `idx` that meet the guest range
 * [offset, offset + length), clipped to it and to the virtual size. Only
 * the bitmap table entries covering the range are read, so a caller can
 * walk a bitmap piecewise in bounded memory (stop the walk after a batch
 * of extents, then go on from the end of the last one: an extent reported
 * whole ends at a clean bit or the range's end).
 * Returns 0 when done, -1 on error, or the callback's non-zero value.
 */
QBM_API int qbm_bitmap_extents_range(struct qbm_image *img, size_t idx,
                                     uint64_t offset, uint64_t length,
                                     qbm_extent_fn fn, void *opaque);

/* ---- editing ---------------------------------------------------------- */

/*
 * Edits need an image opened with QBM_OPEN_RDWR (which takes QEMU's writer
 * locks and fails with EBUSY while QEMU or another qbm uses the image). They
 * are staged in memory: the accessors above show the staged state at once,
 * and nothing reaches the file until qbm_commit() writes every staged edit
 * in one crash-safe transaction. Closing without committing discards them.
 *
 * Edits are refused (EINVAL / EOPNOTSUPP, with a message) on version 2
 * images, images with the dirty or corrupt bit set, images whose bitmaps
 * extension is stale, and in-use bitmaps (except remove and rename).
 * All return 0 or -1.
 */
#define QBM_ADD_DISABLED 0x1u
#define QBM_ADD_MASK 0x1u

/*
 * Add an empty bitmap. granularity: a power of two from 512 B to 2 GiB, or
 * 0 for qemu-img's default (the cluster size, clamped to 4 KiB..64 KiB).
 * Enabled (flag auto) unless QBM_ADD_DISABLED.
 */
QBM_API int qbm_bitmap_add(struct qbm_image *img, const char *name,
                           uint64_t granularity, unsigned flags);
QBM_API int qbm_bitmap_remove(struct qbm_image *img, const char *name);
QBM_API int qbm_bitmap_clear(struct qbm_image *img, const char *name);
QBM_API int qbm_bitmap_enable(struct qbm_image *img, const char *name);
QBM_API int qbm_bitmap_disable(struct qbm_image *img, const char *name);
QBM_API int qbm_bitmap_rename(struct qbm_image *img, const char *old_name,
                              const char *new_name);
/*
 * OR bitmap `src_name` of `src` (which may be `img` itself, or another
 * image of the same virtual size) into bitmap `target` of `img`. Different
 * granularities convert as QEMU does: a target bit is set when any guest
 * byte it covers is dirty in the source.
 */
QBM_API int qbm_bitmap_merge(struct qbm_image *img, const char *target,
                             struct qbm_image *src, const char *src_name);
/* Flags of qbm_bitmap_copy(): what to do with a name `img` has already
 * (without either, it is refused with EEXIST). */
#define QBM_COPY_MERGE 0x1u   /* OR into it, keeping its granularity, state */
#define QBM_COPY_REPLACE 0x2u /* remove it, then copy */
#define QBM_COPY_MASK 0x3u

/* What qbm_bitmap_copy() staged, or skipped, reported per bitmap. */
enum qbm_copy_action {
    QBM_COPY_COPIED = 1,   /* created with the source's granularity, state
                            * and contents */
    QBM_COPY_MERGED = 2,   /* ORed into `img`'s bitmap of that name */
    QBM_COPY_REPLACED = 3, /* `img`'s bitmap of that name removed, then
                            * copied */
    QBM_COPY_SKIPPED = 4,  /* in use in the source: not copied (only when
                            * no names are given) */
};

/*
 * Called once per bitmap, in the order they are staged, with the action
 * (an enum qbm_copy_action), the bitmap's name (borrowed for the call)
 * and the source bitmap's granularity. Return 0 to go on, anything else
 * to stop: qbm_bitmap_copy() then returns that value (errno ECANCELED).
 */
typedef int (*qbm_copy_fn)(void *opaque, int action, const char *bitmap,
                           uint64_t granularity);

/*
 * Stage in `img` a copy of bitmaps of `src` (another image, any virtual
 * size qbm_bitmap_merge accepts): the bitmaps `names[0..n)` in that order,
 * or, when `names` is NULL, every bitmap of `src` in directory order, its
 * in-use ones skipped (QBM_COPY_SKIPPED). A copy has the source's name,
 * granularity, enabled state and contents. A name missing from `src`
 * (ENOENT), an in-use bitmap named, or a name `img` has already without
 * QBM_COPY_MERGE or QBM_COPY_REPLACE (EEXIST) stops the call with an
 * error; the message names the image concerned. `src` is only read; its
 * data is referenced, not copied, until qbm_commit(img) (see
 * qbm_bitmap_merge). On failure the edits staged so far stay in `img`:
 * close it without committing.
 * Returns 0, -1 on error, or the callback's non-zero value.
 */
QBM_API int qbm_bitmap_copy(struct qbm_image *img, struct qbm_image *src,
                            const char *const *names, size_t n, unsigned flags,
                            qbm_copy_fn fn, void *opaque);
/* Mark guest bytes [offset, offset + length) dirty in bitmap `name`. */
QBM_API int qbm_bitmap_set_dirty(struct qbm_image *img, const char *name,
                                 uint64_t offset, uint64_t length);
/*
 * OR into bitmap `name` every range that `layer` itself provides (data or
 * zero flags, from its L1/L2 tables), converted to the bitmap's
 * granularity. `layer` may be `img` itself or another image (its ranges
 * past img's virtual size are ignored).
 */
QBM_API int qbm_bitmap_populate(struct qbm_image *img, const char *name,
                                struct qbm_image *layer);
/*
 * Recovery of an in-use (inconsistent) bitmap: mark every bit dirty and
 * make it consistent again, keeping its name, granularity and flags (the
 * next backup from it is a full one, but the checkpoint survives).
 */
QBM_API int qbm_bitmap_salvage(struct qbm_image *img, const char *name);
/*
 * Write every staged edit in one transaction: new clusters, flush, switch
 * the header's bitmaps extension, flush, free replaced clusters, flush. A
 * crash leaves the old or the new state (plus, at worst, leaked clusters).
 *
 * Every cluster the commit needs (data, tables, directory, refcount blocks,
 * a grown refcount table) is placed before anything is written, free
 * clusters first, then past the image end. On a block device that cannot
 * hold the image end this gives, the commit is refused with ENOSPC ("not
 * enough space on DEVICE: the edit needs N bytes past the image end M; the
 * device has S") and nothing is written; on a file the space is reserved
 * first (fallocate), so a full file system refuses the same way. An error
 * met before the switch (ENOSPC, EIO) gives the old refcounts back and
 * cuts the file back to its old size; the message then ends with "the
 * image was not changed". An error at or after the switch says which
 * state the image holds. On failure the handle refuses further edits;
 * reopen the image. Returns 0 or -1.
 */
QBM_API int qbm_commit(struct qbm_image *img);

/* Plan as if every data cluster of each staged bitmap were dirty: the
 * most the staged bitmaps can take once QEMU has written to the whole
 * disk (for an added bitmap: what it can grow to). */
#define QBM_PLAN_WORST_CASE 0x1u
#define QBM_PLAN_MASK 0x1u

/*
 * A dry run of qbm_commit(): the same checks and the same placement of
 * every new cluster, nothing written, the staged edits kept. Sets
 * *ret_bytes to the bytes of new clusters the commit would write and
 * *ret_end to the image end offset once they are written (before the
 * clusters it replaces are freed), and returns 0; or fails as the commit
 * would before writing, -1, the outputs untouched. One exception: when
 * every check passes and only the block device is too small for *ret_end
 * (without QBM_PLAN_WORST_CASE), the outputs are set all the same and -1
 * returned with errno ENOSPC, the message "not enough space on DEVICE:
 * the edit needs *ret_end - M bytes past the image end M; the device has
 * S" (M: qbm_image_end_offset(), S: qbm_image_capacity()). A manager
 * extends the device to at least *ret_end and plans again. No image ends
 * at 0, so a caller that sets *ret_end to 0 first tells the cases apart.
 */
QBM_API int qbm_commit_plan(struct qbm_image *img, unsigned flags,
                            uint64_t *ret_bytes, uint64_t *ret_end);

/* ---- consistency check and repair -------------------------------------- */

/* Kinds of problems qbm_check() reports. */
#define QBM_PROBLEM_CORRUPTION 1 /* refcount too low, bad structure */
#define QBM_PROBLEM_LEAK 2       /* refcount too high: harmless */
#define QBM_PROBLEM_BITMAP 3     /* in-use bitmap, stale extension */

/* Called once per problem; `offset` is the file offset concerned (or 0).
 * The message is borrowed for the call. Return 0 to go on. */
typedef int (*qbm_problem_fn)(void *opaque, int kind, uint64_t offset,
                              const char *message);

/*
 * Check every structure of an opened image: the bitmaps (in-use ones, a
 * stale extension, table entries) and full refcount consistency, counting
 * the references of the header, refcount structures, active and snapshot
 * L1/L2 tables, data clusters (compressed ones by the sectors they span),
 * the snapshot table, the encryption header and the bitmaps. Returns 0
 * when the check ran (problems went to fn), -1 when it could not run.
 */
QBM_API int qbm_check(struct qbm_image *img, qbm_problem_fn fn, void *opaque);

/*
 * Follow the backing chain of `img` from its file name as
 * qbm_chain_open() does, taking no locks, and report a chain that loops
 * back (QEMU cannot open such an image at all) as one
 * QBM_PROBLEM_CORRUPTION at offset 8, the header's backing_file_offset
 * field, with the message of the failed open. A backing file that is
 * missing or cannot be opened is not reported: a standalone incremental
 * backup may name one that lives elsewhere. Images without a backing
 * file, or not opened from a file, have nothing to check. Only the chain
 * is opened; `img` stays the caller's and is not changed.
 * Returns 0 when the check ran (a loop went to fn), -1 when it could not
 * (ENOMEM), or fn's non-zero value (errno ECANCELED).
 */
QBM_API int qbm_check_backing(struct qbm_image *img, qbm_problem_fn fn,
                              void *opaque);

#define QBM_REPAIR_IN_USE_DIRTY 0x1u  /* in-use bitmaps become all dirty */
#define QBM_REPAIR_IN_USE_REMOVE 0x2u /* in-use bitmaps are removed */
#define QBM_REPAIR_STALE 0x4u         /* drop a stale bitmaps extension */
#define QBM_REPAIR_LEAKS 0x8u         /* give leaked clusters back */
#define QBM_REPAIR_MASK 0xfu

/*
 * Repair what `flags` asks for, each step its own crash-safe transaction
 * (bitmaps first, then leaks, which include the clusters the first steps
 * freed). Refuses images with corruption (refcounts lower than the
 * references): that is qemu-img check -r all's job. The image must be
 * opened with QBM_OPEN_RDWR. Returns 0 or -1.
 */
QBM_API int qbm_repair(struct qbm_image *img, unsigned flags);

/* What qbm_repair_report() says it did, once each step is durable. */
enum qbm_repair_action {
    /* A stale bitmaps extension was dropped (QEMU ignored its bitmaps;
     * their clusters became leaks, freed by QBM_REPAIR_LEAKS). */
    QBM_REPAIRED_STALE = 1,
    /* The autoclear bitmaps bit was set without an extension: cleared. */
    QBM_REPAIRED_AUTOCLEAR = 2,
    /* `bitmap` was in use: now consistent and all dirty, so the next
     * incremental backup from it copies the whole disk. */
    QBM_REPAIRED_IN_USE_DIRTY = 3,
    /* `bitmap` was in use: removed (its checkpoint is gone). */
    QBM_REPAIRED_IN_USE_REMOVED = 4,
    /* `count` leaked clusters were freed (`bytes` of the file). */
    QBM_REPAIRED_LEAKS = 5,
};
/* One repair made: `bitmap` (borrowed for the call) for the in-use
 * actions, else NULL; `count` and `bytes` for QBM_REPAIRED_LEAKS, else 0.
 * Return 0 to go on; anything else stops before the next step. */
typedef int (*qbm_repair_fn)(void *opaque, int action, const char *bitmap,
                             uint64_t count, uint64_t bytes);
/*
 * qbm_repair(), calling fn (may be NULL) for every repair it made, after
 * the step that made it is durable. Returns 0, -1, or fn's non-zero value
 * (errno ECANCELED; the steps already made stay).
 */
QBM_API int qbm_repair_report(struct qbm_image *img, unsigned flags,
                              qbm_repair_fn fn, void *opaque);

/* ---- backups ------------------------------------------------------------ */

/*
 * Progress of long operations: `done` of `total` bytes copied. Return 0 to
 * go on, anything else to stop: the operation then fails as it does on an
 * error (nothing is left behind or switched; see each call) and returns
 * that value, with errno ECANCELED.
 */
typedef int (*qbm_progress_fn)(void *opaque, uint64_t done, uint64_t total);

#define QBM_OUTPUT_RAW 0
#define QBM_OUTPUT_QCOW2 1
/* ORed into qbm_restore()'s `format`: open the inputs (and their data
 * files) without QEMU's locks, as qemu-img -U (read only). */
#define QBM_RESTORE_FORCE_SHARE 0x100

/*
 * Rebuild a disk from images[0] (the full backup: qcow2, or raw) and
 * images[1..n) (incremental backups, qcow2, oldest first): each guest
 * range comes from the newest image that holds it (data, compressed data
 * or zero flags; each image's own layer only, backing pointers are not
 * followed). Everything is verified before anything is written (readable
 * images, same virtual size, no image twice, OUTPUT a regular file, a
 * block device or nothing). OUTPUT is written under a temporary name,
 * flushed and renamed into place: on failure no OUTPUT is left behind. A
 * new OUTPUT gets mode 0666 minus the umask, an existing one keeps its
 * permission bits; a symbolic link is followed (a dangling one creates its
 * target) and kept; a character device, fifo, socket or directory is
 * refused and never replaced, even when it appears while the output is
 * written. A block device (opened O_EXCL, with QEMU's write locks) is
 * written in place, every byte of the output with data or zeros, and
 * flushed; one smaller than the output is refused unchanged, and a failure
 * while writing leaves it partly written. Raw output is sparse in a file
 * and fills the first virtual-size bytes of a device; qcow2 output is a
 * fresh image with 64 KiB clusters. `checkpoint` (qcow2 only, not onto a
 * block device, may be NULL): name of an empty enabled bitmap to create so
 * that incremental backups can resume. An image with an external data
 * file is read through it (opened read only, with shared locks, a relative
 * name from the working directory as QEMU does; a missing one fails before
 * OUTPUT is made); the same holds for qbm_extract() and the incrementals
 * of qbm_consolidate(). `format` is QBM_OUTPUT_RAW or QBM_OUTPUT_QCOW2,
 * maybe ORed with QBM_RESTORE_FORCE_SHARE.
 * Returns 0, -1, or the progress callback's non-zero value.
 */
QBM_API int qbm_restore(const char *const *images, size_t n, const char *output,
                        int format, const char *checkpoint,
                        qbm_progress_fn progress, void *opaque);

#define QBM_EXTRACT_CHAIN 0x1u /* dirty set: the union over the chain */
#define QBM_EXTRACT_FULL 0x2u  /* copy everything allocated */
/* Read IMAGE's chain without QEMU's locks, as qemu-img -U; not taken by
 * qbm_extract_rotate(), which edits IMAGE. */
#define QBM_EXTRACT_FORCE_SHARE 0x8u
#define QBM_EXTRACT_MASK 0xbu

/*
 * Offline incremental backup: write to OUTPUT a fresh qcow2 image holding
 * the clusters of IMAGE (read through its backing chain) that `bitmap`
 * marks dirty, with zero flags where the disk reads as zeros, so that
 * qbm_restore() over the previous backups reproduces the disk. `backing`
 * (may be NULL) is recorded as OUTPUT's backing file (format qcow2), so
 * QEMU can open the backup chain directly. With QBM_EXTRACT_FULL, every
 * allocated cluster is copied and `bitmap` may be NULL. Refuses in-use
 * bitmaps, and OUTPUT naming IMAGE or one of its backing files. OUTPUT
 * appears only once complete, and is treated as by qbm_restore(); on a
 * block device the image is written from offset 0 and the device must
 * hold its whole layout. Returns 0, -1, or the progress callback's
 * non-zero value.
 */
QBM_API int qbm_extract(const char *image, const char *bitmap,
                        const char *output, unsigned flags, const char *backing,
                        qbm_progress_fn progress, void *opaque);

/* Flags of qbm_extract_rotate(), besides those of qbm_extract(). */
#define QBM_EXTRACT_DISABLE_OLD 0x4u /* see below; not libvirt's */
#define QBM_EXTRACT_ROTATE_MASK 0x7u /* no QBM_EXTRACT_FORCE_SHARE */

/*
 * qbm_extract() of `bitmap`, then the next checkpoint: once OUTPUT is
 * durable, an empty enabled bitmap `next` with the granularity of IMAGE's
 * `bitmap` is added to IMAGE (its top layer) in one transaction. `bitmap`
 * stays enabled, as libvirt keeps every checkpoint's bitmap recording;
 * with QBM_EXTRACT_DISABLE_OLD it is disabled in the same transaction (the
 * older model, in which only the newest checkpoint records; libvirt uses
 * no chain with a disabled copy). What would refuse that transaction (IMAGE
 * lacking `bitmap`, `next` taken or not a valid name, an image qbm cannot
 * edit or that another process holds) refuses the call before OUTPUT is
 * written. If it fails after OUTPUT was written anyway, the message says
 * so; OUTPUT stays. With QBM_EXTRACT_FULL, `bitmap` only gives the
 * granularity (and is the one disabled).
 * Returns 0, -1, or the progress callback's non-zero value.
 */
QBM_API int qbm_extract_rotate(const char *image, const char *bitmap,
                               const char *next, const char *output,
                               unsigned flags, const char *backing,
                               qbm_progress_fn progress, void *opaque);

/*
 * Fold incremental backups (qcow2, oldest first) into the full backup
 * FULL in place ("rolling full"). Each changed cluster is written to a new
 * cluster and the L1 table is switched in one atomic write, so a crash
 * leaves FULL either as it was or with every incremental folded in. FULL's
 * enabled bitmaps are marked with what changes. FULL must be a plain
 * version 3 qcow2 (no internal snapshots, backing file, extended L2,
 * external data or encryption). A progress callback that stops the fold
 * leaves FULL's data as it was (its enabled bitmaps may keep the marks made
 * first, and the file may be longer). Returns 0, -1, or the progress
 * callback's non-zero value.
 */
QBM_API int qbm_consolidate(const char *full, const char *const *incs, size_t n,
                            qbm_progress_fn progress, void *opaque);

/* Flags of qbm_rebuild(). */
#define QBM_REBUILD_DRY_RUN 0x1u /* compare and count, write nothing */
#define QBM_REBUILD_MASK 0x1u

/*
 * Recover a checkpoint from the last backup: make bitmap `name` of IMAGE
 * an enabled, consistent bitmap in which exactly the granules are set
 * whose content (IMAGE read through its backing chain) differs from what
 * backups[0..n) restore to, under qbm_restore()'s rules (backups[0] the
 * full, qcow2 or raw, then qcow2 incrementals, oldest first). IMAGE, its
 * backing files and the backups may have external data files (read as
 * qbm_restore() reads them). A bitmap `name` already there is replaced, in use
 * or not; `granularity` 0 takes its granularity, or qbm_bitmap_add()'s default
 * when there is none. Ranges that read as zeros on both sides (unallocated,
 * zero flags) are equal without being read; data is read once on each side.
 * IMAGE is opened for writing (QEMU's writer locks: refused while a VM uses
 * it), its backing files and the backups read-locked; the change is one
 * crash-safe transaction. Refused, with nothing written: a virtual size
 * differing from the backups', IMAGE given as a backup, an input missing
 * or corrupt, a granularity qbm_bitmap_add() refuses. With
 * QBM_REBUILD_DRY_RUN nothing is written. `progress` (may be NULL) counts
 * the bytes read; its non-zero value stops the comparison and nothing is
 * written. *ret_dirty_bytes (may be NULL): the bytes set, clipped to the
 * virtual size. Returns 0, -1, or the progress callback's non-zero value.
 */
QBM_API int qbm_rebuild(const char *image, const char *name,
                        uint64_t granularity, const char *const *backups,
                        size_t n, unsigned flags, qbm_progress_fn progress,
                        void *opaque, uint64_t *ret_dirty_bytes);

/*
 * Compare IMAGE (read through its backing chain; qcow2 or raw) with what
 * backups[0..n) restore to (as qbm_rebuild()) and call fn for each extent
 * of 512-byte sectors whose content differs, in increasing order, adjacent
 * ones merged, clipped to the virtual size. With `bitmap` (a bitmap of
 * IMAGE's top layer; refused when in use), only the parts of those
 * extents that it marks clean: writes it missed, a corrupt backup, or a
 * wrong bitmap. Everything is opened read-only with read locks (refused
 * while a VM writes IMAGE), or with QBM_VERIFY_FORCE_SHARE without locks,
 * as qemu-img -U (IMAGE, its backing files and the backups: a disk a VM
 * writes meanwhile may compare as anything). fn gets `opaque`; progress (may be
 * NULL) counts the bytes read and gets `progress_opaque`. Returns 0 (fn
 * saw every difference, maybe none), -1 when the comparison could not be
 * made, or the non-zero value of fn or of progress that stopped it (errno
 * ECANCELED).
 */
#define QBM_VERIFY_FORCE_SHARE 0x1u
#define QBM_VERIFY_MASK 0x1u
QBM_API int qbm_verify(const char *image, const char *const *backups, size_t n,
                       const char *bitmap, unsigned flags, qbm_extent_fn fn,
                       void *opaque, qbm_progress_fn progress,
                       void *progress_opaque);

/*
 * Make `backing` (with format `format`, e.g. "qcow2" or "raw") the backing
 * file of the image, crash-safely (the name is written to a free part of
 * cluster 0, then the pointer switched in one write). The image must be
 * opened with QBM_OPEN_RDWR. Returns 0 or -1.
 */
QBM_API int qbm_image_set_backing(struct qbm_image *img, const char *backing,
                                  const char *format);

/* ---- carrying bitmaps over a commit ------------------------------------ */

/* Flags of qbm_carry_commit(). */
#define QBM_CARRY_MARK_WRITTEN 0x1u     /* see below */
#define QBM_CARRY_FILL_GAPS 0x2u        /* see below */
#define QBM_CARRY_INCLUDE_DISABLED 0x4u /* see below; not libvirt's */
#define QBM_CARRY_MASK 0x7u

/* What qbm_carry_commit() staged, or skipped, reported per bitmap and
 * layer; `layer` is the file named below. */
enum qbm_carry_action {
    QBM_CARRY_COPIED = 1, /* created in BASE from `layer`'s copy */
    QBM_CARRY_MERGED = 2, /* `layer`'s copy ORed into BASE's */
    QBM_CARRY_GAP = 3,    /* not carried at all: `layer` lacks it */
    QBM_CARRY_FILLED = 4, /* `layer` lacks it; its clusters were marked */
    QBM_CARRY_MARKED = 5, /* MARK_WRITTEN: `layer` is BASE */
    /* not carried at all: `layer`'s copy is disabled */
    QBM_CARRY_DISABLED = 6,
    /* not carried at all: `layer`'s copy is in use (inconsistent); with
     * MARK_WRITTEN also an in-use bitmap of BASE left unmarked */
    QBM_CARRY_IN_USE = 7,
};

/*
 * Called once per action (an enum qbm_carry_action), in the order they are
 * staged. `bitmap` and
 * `layer` (a file name of TOP's chain as qbm_chain_filename() gives it, or
 * BASE's name as given to qbm_open) are borrowed for the call. Return 0 to
 * go on, anything else to stop: qbm_carry_commit() then returns that value
 * (errno ECANCELED) with part of the edits staged.
 */
typedef int (*qbm_carry_fn)(void *opaque, int action, const char *bitmap,
                            const char *layer);

/*
 * Stage in `base` (opened with QBM_OPEN_RDWR) the bitmaps of the layers
 * of TOP's backing chain above it, the layers `qemu-img commit` writes
 * into it, which itself keeps only the bitmaps the base already has.
 * `base` must be in TOP's chain (the same file, by device and inode) and
 * every layer above it must have its virtual size; otherwise nothing is
 * staged.
 *
 * As libvirt after a block commit (qemuBlockBitmapsHandleCommitFinish), a
 * bitmap is carried when it passes the rules of qbm_chain_check() over the
 * layers from TOP down to BASE: TOP has a copy, the layers that have one
 * follow each other with none missing (no gap, below), and every copy
 * records (is enabled) and is consistent. Its copies above BASE are then
 * ORed into BASE's bitmap of that name, which is created, enabled, with
 * the granularity of the topmost copy when BASE lacks it. Any other bitmap
 * is not carried at all, reported once per layer that stops it
 * (QBM_CARRY_GAP, QBM_CARRY_DISABLED, QBM_CARRY_IN_USE), so that BASE gets
 * no copy that looks whole while it is not. Unlike libvirt, which judges
 * the whole chain, the layers below BASE play no part: a gap, disabled or
 * in-use copy there stays for a check of the chain to report, and BASE's
 * copy misses no write of the committed layers once that is repaired.
 *
 * QBM_CARRY_INCLUDE_DISABLED (not valid for libvirt, which uses no chain
 * with a disabled copy): disabled copies no longer stop a bitmap, and
 * BASE's copy is enabled when the topmost copy is, disabled otherwise.
 *
 * A gap is a layer, among the ones above BASE and BASE itself, that lacks
 * a bitmap although a layer above it has the bitmap and one below it too
 * (BASE or a layer of its own backing chain included), or that lies above
 * the topmost copy while that copy is enabled: writes made to it were
 * recorded nowhere. These are the QBM_CHAIN_GAP and QBM_CHAIN_NOT_IN_TOP
 * findings of qbm_chain_check(), the latter only under an enabled copy (a
 * disabled copy with nothing above it is a finished checkpoint), as they
 * stand before anything is staged. Such a bitmap is not carried at all (one
 * QBM_CARRY_GAP per gap layer), so the gap stays visible to a check of
 * the chain instead of being folded into a bitmap that looks whole. With
 * QBM_CARRY_FILL_GAPS it is carried, and every gap layer's own allocation
 * (qbm_bitmap_populate) is ORed into BASE's copy: a superset of what was
 * written there, as long as that layer still holds its data (a top layer
 * that `qemu-img commit` has emptied does not).
 *
 * QBM_CARRY_MARK_WRITTEN: then OR every layer's own allocation above BASE
 * into each enabled bitmap of BASE (what the commit copies, for a commit
 * done by a tool that does not update bitmaps; needs the layers to still
 * hold their data).
 *
 * Nothing is written: qbm_commit(base) writes the staged edits, closing
 * it without committing drops them. The layers are opened (with read
 * locks) and closed inside the call; staged copies of their bitmap data
 * keep a descriptor of their own, and the lock with it, until then.
 * `top` and `base` stay the caller's. On failure the edits staged so far
 * stay in `base`: close it without committing.
 * Returns 0, -1 on error, or the callback's non-zero value.
 */
QBM_API int qbm_carry_commit(struct qbm_image *base, const char *top,
                             unsigned flags, qbm_carry_fn fn, void *opaque);

/* ---- carrying bitmaps over an external snapshot -------------------------- */

/* Flags of qbm_carry_snapshot(). */
#define QBM_CARRY_SNAPSHOT_DISABLE_BASE 0x1u /* see below; not libvirt's */
#define QBM_CARRY_SNAPSHOT_DRY_RUN 0x2u      /* stage and report only */
#define QBM_CARRY_SNAPSHOT_MASK 0x3u

/* What qbm_carry_snapshot() did, reported per bitmap; `image` is the file
 * concerned, named as given. */
enum qbm_carry_snapshot_action {
    QBM_CARRY_SNAPSHOT_ADDED = 1,   /* created in TOP and marked */
    QBM_CARRY_SNAPSHOT_MARKED = 2,  /* TOP had it already: marked */
    QBM_CARRY_SNAPSHOT_SKIPPED = 3, /* disabled in BASE: not carried */
    /* TOP's edits are committed (in a dry run, would be); bitmap NULL */
    QBM_CARRY_SNAPSHOT_TOP_DONE = 4,
    QBM_CARRY_SNAPSHOT_DISABLED = 5, /* DISABLE_BASE: disabled in BASE */
    /* BASE's edits are committed (or would be); bitmap NULL */
    QBM_CARRY_SNAPSHOT_BASE_DONE = 6,
    /* in use (inconsistent) in `image`, BASE or TOP: not carried */
    QBM_CARRY_SNAPSHOT_IN_USE = 7,
};

/*
 * Called once per action (an enum qbm_carry_snapshot_action), in order.
 * `bitmap` and `image` are borrowed for the call. Return 0 to go on,
 * anything else to stop: qbm_carry_snapshot() then returns that value
 * (errno ECANCELED); what was committed before (see the _DONE actions)
 * stays committed.
 */
typedef int (*qbm_carry_snapshot_fn)(void *opaque, int action,
                                     const char *bitmap, const char *image);

/*
 * Continue BASE's checkpoints in TOP, an external snapshot of BASE (TOP's
 * backing file is BASE's file) taken without bitmap handling, as libvirt
 * does when it takes one (qemuSnapshotDiskBitmapsPropagate): every
 * enabled, consistent bitmap of BASE, in directory order, is created in
 * TOP with its name and granularity, enabled (a bitmap TOP has already is
 * kept as it is), and TOP's own allocation (qbm_bitmap_populate) is ORed
 * into it, a superset of the writes since the snapshot. BASE's copies
 * stay as they are, recording. The checkpoint then spans the chain
 * (qbm_chain_bitmap_extents) and QEMU keeps recording in TOP. Disabled
 * bitmaps of BASE are not carried (QBM_CARRY_SNAPSHOT_SKIPPED), nor those
 * in use in BASE or in TOP (QBM_CARRY_SNAPSHOT_IN_USE: their bits are not
 * known); the others are.
 *
 * TOP is opened for writing, BASE read-locked, and TOP's edits committed
 * in one transaction. With QBM_CARRY_SNAPSHOT_DISABLE_BASE (not valid for
 * libvirt, which uses no chain with a disabled copy), then, and only once
 * TOP's edits are durable (a crash in between leaves both copies
 * recording, never neither), BASE is reopened for writing and the bitmaps
 * carried are disabled in it, in a second transaction: the checkpoints
 * moved up, for a tool that reads their union over the chain itself.
 * QBM_CARRY_SNAPSHOT_DRY_RUN stages and reports the
 * same, images opened the same way, and runs each commit's checks and
 * placement (qbm_commit_plan(): a device too small refuses with ENOSPC),
 * but commits nothing; TOP's device too small does not stop it before
 * BASE's plan (see qbm_carry_snapshot_plan()).
 *
 * Both images are opened and closed inside the call, from the file names
 * given (used in messages as given). On failure nothing more is written;
 * TOP's commit stays when BASE's step fails (QBM_CARRY_SNAPSHOT_TOP_DONE
 * was reported).
 * Returns 0, -1 on error, or the callback's non-zero value.
 */
QBM_API int qbm_carry_snapshot(const char *base, const char *top,
                               unsigned flags, qbm_carry_snapshot_fn fn,
                               void *opaque);

/* What one image's commit needs, as qbm_commit_plan() places it. */
struct qbm_space_info {
    uint64_t bytes;      /* new clusters it writes (bytes) */
    uint64_t end_before; /* the image end offset before it */
    uint64_t end_after;  /* the image end once they are written */
    uint64_t capacity;   /* the device's size (qbm_image_capacity()), or 0 */
};

/*
 * A dry run of qbm_carry_snapshot() (QBM_CARRY_SNAPSHOT_DRY_RUN implied):
 * the same stages, reports and checks, nothing written. Sets *ret_top to
 * what TOP's commit needs and *ret_base to what BASE's needs (all zero
 * when BASE is not to be changed: no QBM_CARRY_SNAPSHOT_DISABLE_BASE, or
 * nothing carried), and returns 0; -1 when the run would fail before
 * writing; or the callback's non-zero value. The outputs are untouched
 * unless it returns 0, with one exception: when every check passes and
 * only a device is too small (TOP's, BASE's or both: a TOP too small
 * does not stop BASE's plan, but its QBM_CARRY_SNAPSHOT_TOP_DONE is not
 * reported), both outputs are set all the same and -1 returned with
 * errno ENOSPC, the message naming each image that does not fit with
 * qbm_commit_plan()'s figures ("FILE: not enough space on FILE: the edit
 * needs end_after - end_before bytes past the image end end_before; the
 * device has capacity", TOP first). No image ends at 0, so a caller that
 * sets ret_top->end_after to 0 first tells the cases apart.
 */
QBM_API int qbm_carry_snapshot_plan(const char *base, const char *top,
                                    unsigned flags, qbm_carry_snapshot_fn fn,
                                    void *opaque,
                                    struct qbm_space_info *ret_top,
                                    struct qbm_space_info *ret_base);

/* ---- allocation map of one layer -------------------------------------- */

/* Allocation status of a range in one layer (qcow2 spec, "Cluster mapping"). */
#define QBM_ALLOC_DATA 0x1u /* data stored in this layer (maybe compressed) */
#define QBM_ALLOC_ZERO 0x2u /* reads as zeros, shadows the backing file */

typedef int (*qbm_alloc_fn)(void *opaque, uint64_t offset, uint64_t length,
                            unsigned status);

/*
 * Walk the ranges this layer itself provides (data or zero flags), in
 * increasing order, adjacent ranges with the same status merged. Ranges
 * not reported fall through to the backing file. Cost follows the L1 table
 * and the allocated L2 tables, not the virtual size.
 * Returns 0, -1 on error, or the callback's non-zero value.
 */
QBM_API int qbm_image_allocation(struct qbm_image *img, qbm_alloc_fn fn,
                                 void *opaque);

/* ---- backing chains -------------------------------------------------- */

/*
 * Open `filename` and, following backing file names, every image below it.
 * Relative backing names are resolved against the directory of the name of
 * the image that refers to them, as given (as QEMU does); json: names are
 * refused; loops and chains deeper than 256 are refused. A raw backing
 * file ends the chain and is opened as a layer of format "raw". `flags` as
 * for qbm_open(); backing files are always opened read-only.
 * Returns a new handle (free with qbm_chain_close), or NULL.
 */
QBM_API struct qbm_chain *qbm_chain_open(const char *filename, unsigned flags);
QBM_API void qbm_chain_close(struct qbm_chain *chain);
/* Number of layers (>= 1). */
QBM_API size_t qbm_chain_length(const struct qbm_chain *chain);
/* Layer `idx`, 0 = top (the image given). Borrowed from the chain. */
QBM_API struct qbm_image *qbm_chain_layer(const struct qbm_chain *chain,
                                          size_t idx);
/* The resolved file name of layer `idx` (layer 0: as given). Borrowed. */
QBM_API const char *qbm_chain_filename(const struct qbm_chain *chain,
                                       size_t idx);

/*
 * Walk the union of the bitmaps named `name` over every layer that has one,
 * merged into extents in increasing order (how a checkpoint that spans
 * layers is read). Fails with ENOENT when no layer has such a bitmap.
 * *ret_consistent (may be NULL) is set to 0 when any of them is in use.
 * Returns 0, -1, or the callback's non-zero value.
 */
QBM_API int qbm_chain_bitmap_extents(struct qbm_chain *chain, const char *name,
                                     qbm_extent_fn fn, void *opaque,
                                     int *ret_consistent);

/* ---- checkpoint rules across a chain ------------------------------------ */

/*
 * A checkpoint that spans the layers of a chain (made by external
 * snapshots) is one bitmap of the same name in each layer, from the top
 * down to the one where it began. libvirt uses it only when the top layer
 * has a copy, the layers that have one follow each other from the top
 * with no layer missing in between (the run may end above the bottom),
 * and every copy records writes and is consistent
 * (qemuBlockBitmapChainIsValid). What breaks that, found by
 * qbm_chain_check() per bitmap and layer:
 */
enum qbm_chain_rule {
    /* `layer` lacks the bitmap, and so does every layer above it: the
     * checkpoint does not reach the top (reported for each such layer). */
    QBM_CHAIN_NOT_IN_TOP = 1,
    /* `layer` lacks the bitmap under a layer that has it: writes made to
     * it while it was the top are in no copy. */
    QBM_CHAIN_GAP = 2,
    /* `layer`'s copy is disabled: it does not record writes. */
    QBM_CHAIN_DISABLED = 3,
    /* `layer`'s copy is in use (inconsistent: the image was not closed
     * cleanly, or a running QEMU holds it). */
    QBM_CHAIN_IN_USE = 4,
};

/*
 * Called once per finding: `rule` (an enum qbm_chain_rule) broken by layer
 * `layer` (0 = top) for bitmap `bitmap`, judged from its deepest copy, in
 * layer `origin` (>= layer). Names are borrowed for the call; file names
 * come from qbm_chain_filename(). Return 0 to go on, anything else to
 * stop.
 */
typedef int (*qbm_chain_rule_fn)(void *opaque, int rule, const char *bitmap,
                                 size_t layer, size_t origin);

/*
 * Check the checkpoint rules over every layer of `chain` (as opened; the
 * chain is not changed). Each bitmap found in any layer is judged once,
 * from its deepest copy: every layer above that copy must have the bitmap
 * (else QBM_CHAIN_NOT_IN_TOP or QBM_CHAIN_GAP for that layer), and every
 * copy must be enabled (else QBM_CHAIN_DISABLED) and not in use (else
 * QBM_CHAIN_IN_USE). A bitmap with no finding is one libvirt accepts.
 * Findings come by origin layer from the top down, each origin's bitmaps
 * in directory order, then by layer from the top down, then in the order
 * of enum qbm_chain_rule. The state of each image on its own is
 * qbm_check()'s part (it reports in-use bitmaps too).
 * Returns 0 when done, -1 on error, or fn's non-zero value (errno
 * ECANCELED).
 */
QBM_API int qbm_chain_check(struct qbm_chain *chain, qbm_chain_rule_fn fn,
                            void *opaque);

/* ---- checkpoints of a libvirt domain ------------------------------------- */

/*
 * libvirt keeps a domain's checkpoints as metadata (name, parent, creation
 * time, and per disk the bitmap that records it) apart from the images,
 * and uses a checkpoint of a disk only while its bitmap passes the rules
 * of qbm_chain_check() over the disk's chain. A struct qbm_checkpoints
 * holds that metadata and the domain's disks; qbm_checkpoints_check()
 * judges every checkpoint disk, finds the bitmaps no checkpoint names,
 * and says how to repair each problem. Reading libvirt's XML is the
 * caller's part.
 */
struct qbm_checkpoints;

/*
 * Whether `name` is a checkpoint name libvirt accepts,
 * [A-Za-z0-9_-][A-Za-z0-9_.-]* (docs/checkpoint-rules.md, section 7):
 * 1 or 0; NULL is not one. Records no error.
 */
QBM_API int qbm_checkpoint_name_valid(const char *name);

/* A new, empty set (free with qbm_checkpoints_free), or NULL. */
QBM_API struct qbm_checkpoints *qbm_checkpoints_new(void);
/* Free the set; the chains given to it stay the caller's. NULL is fine. */
QBM_API void qbm_checkpoints_free(struct qbm_checkpoints *set);

/*
 * Add checkpoint `name` with its `parent` (NULL for a root) and creation
 * time (seconds since the epoch). Strings are copied. Fails with EEXIST
 * when the set has that name already, EINVAL for an empty name.
 * Returns 0 or -1.
 */
QBM_API int qbm_checkpoints_add(struct qbm_checkpoints *set, const char *name,
                                const char *parent, int64_t creation_time);

/*
 * Add to checkpoint `checkpoint` its disk `target` (a domain disk target
 * such as "vda") recorded by bitmap `bitmap`, or NULL when the checkpoint
 * does not cover the disk (libvirt's checkpoint='no'). Strings are copied.
 * Fails with ENOENT when there is no such checkpoint, EEXIST when it has
 * the target already. Returns 0 or -1.
 */
QBM_API int qbm_checkpoints_add_disk(struct qbm_checkpoints *set,
                                     const char *checkpoint, const char *target,
                                     const char *bitmap);

/*
 * Add a disk of the domain: its `target` and the backing chain of its
 * image (borrowed: it must stay open until the set is freed), or NULL when
 * the disk has no image to read (a network disk, an empty drive). Disks
 * are reported, and listed in redefinitions, in the order added. Fails
 * with EEXIST when the target was added already. Returns 0 or -1.
 */
QBM_API int qbm_checkpoints_add_target(struct qbm_checkpoints *set,
                                       const char *target,
                                       struct qbm_chain *chain);

/* The state of one disk of one checkpoint. */
enum qbm_checkpoint_state {
    QBM_CHECKPOINT_OK = 0,
    /* no layer of the disk's chain has the bitmap */
    QBM_CHECKPOINT_MISSING = 1,
    /* the top layer lacks it, or a layer between two copies does
     * (QBM_CHAIN_NOT_IN_TOP, QBM_CHAIN_GAP) */
    QBM_CHECKPOINT_BROKEN = 2,
    /* a copy is disabled (QBM_CHAIN_DISABLED) */
    QBM_CHECKPOINT_INACTIVE = 3,
    /* a copy is in use (QBM_CHAIN_IN_USE) */
    QBM_CHECKPOINT_INCONSISTENT = 4,
    /* not judged: the domain has no such disk, or no image for it */
    QBM_CHECKPOINT_UNCHECKED = 5,
};

/*
 * Called for each disk a checkpoint records with a bitmap: checkpoints by
 * creation time (then name), disks in the order they were added. `image`
 * is the top file of the disk's chain (NULL when unchecked); `state` an
 * enum qbm_checkpoint_state, the worst that applies (missing, broken,
 * inconsistent, inactive, in that order); `detail` one phrase naming
 * every finding and its layer ("" when ok). All borrowed for the call.
 * Return 0 to go on, anything else to stop.
 */
typedef int (*qbm_checkpoint_disk_fn)(void *opaque, const char *checkpoint,
                                      const char *target, const char *bitmap,
                                      const char *image, int state,
                                      const char *detail);

/*
 * Called for each bitmap in a layer of a disk's chain that no checkpoint
 * names for that disk, nor for another disk that shares that layer (file
 * names compared as the chains give them): disks in order, layers from the
 * top, bitmaps in directory order. `image` is the layer's file (layer 0 =
 * top). Borrowed.
 */
typedef int (*qbm_orphan_fn)(void *opaque, const char *target,
                             const char *image, size_t layer,
                             const char *bitmap);

/* A step of a repair, as qbm_checkpoints_check() proposes it. */
enum qbm_remedy_action {
    /* in use: make every in-use bitmap of `image` all dirty and
     * consistent (qbm_repair with QBM_REPAIR_IN_USE_DIRTY) */
    QBM_REMEDY_REPAIR = 1,
    /* broken: add `bitmap`, enabled, `granularity` bytes per bit, to the
     * layer `image` that lacks it... */
    QBM_REMEDY_ADD = 2,
    /* ...and mark in it every cluster the layer holds itself
     * (qbm_bitmap_populate): a superset of the writes made to it since
     * the checkpoint, as the layer was made after it */
    QBM_REMEDY_POPULATE = 3,
    /* inactive: OR `source` (the bitmap of a later checkpoint, which
     * recorded while this copy did not) into `bitmap` of `image`... */
    QBM_REMEDY_MERGE = 4,
    /* ...and make `bitmap` of `image` record again */
    QBM_REMEDY_ENABLE = 5,
    /* remove `bitmap` from `image` (an orphan, or a copy of a checkpoint
     * that is deleted) */
    QBM_REMEDY_REMOVE = 6,
    /* delete the metadata of `checkpoint`, which cannot be repaired (virsh
     * checkpoint-delete --metadata); its copies are then removed */
    QBM_REMEDY_DELETE = 7,
    /* define checkpoint `checkpoint` for an orphan bitmap valid under the
     * rules (virsh checkpoint-create --redefine): `parent`, creation time,
     * and for every disk of the domain, in order, `bitmap` or NULL */
    QBM_REMEDY_REDEFINE = 8,
};

/*
 * One remedy, borrowed for the call. Fields that do not apply to the
 * action are NULL or 0. Later versions may add fields at the end.
 */
struct qbm_remedy {
    int action;             /* enum qbm_remedy_action */
    const char *checkpoint; /* the checkpoint repaired, deleted or defined;
                             * NULL for an orphan's REMOVE */
    const char *target;     /* the disk (image steps) */
    const char *image;      /* the file to change (image steps) */
    const char *bitmap;     /* the bitmap to change (image steps) */
    const char *source;     /* MERGE: the bitmap ORed in */
    uint64_t granularity;   /* ADD */
    const char *parent;     /* REDEFINE: NULL for a root */
    int64_t creation_time;  /* REDEFINE */
    size_t ndisks;          /* REDEFINE: every disk of the domain */
    const char *const *disk_targets;
    const char *const *disk_bitmaps; /* NULL entry: not covered */
};

typedef int (*qbm_remedy_fn)(void *opaque, const struct qbm_remedy *remedy);

/* Propose a redefinition for each orphan bitmap that could be a
 * checkpoint, instead of its removal. */
#define QBM_CHECKPOINTS_REDEFINE 0x1u
#define QBM_CHECKPOINTS_MASK 0x1u

/*
 * Judge the set: each checkpoint disk by the rules of qbm_chain_check()
 * (disk_fn), the orphan bitmaps (orphan_fn), then the remedies (remedy_fn)
 * in the order to apply them: REPAIR, then per checkpoint ADD and POPULATE
 * for each layer lacking the bitmap and MERGE and ENABLE for each disabled
 * copy, then DELETE and the REMOVEs of the deleted checkpoints' copies,
 * then per orphan REMOVE or (QBM_CHECKPOINTS_REDEFINE) REDEFINE. Any
 * callback may be NULL. Nothing is changed: the chains are only read.
 *
 * What can be repaired is, and every repair only adds dirty bits or makes
 * a copy record, so a backup from a repaired checkpoint misses no write:
 * an in-use copy becomes all dirty; a layer lacking the bitmap gets a copy
 * marked with every cluster it holds (it was made after the checkpoint);
 * a disabled copy gets the bitmaps of the later checkpoints of that disk
 * in its layer ORed in (libvirt before 6.5 disabled a checkpoint's bitmap
 * when it made the next one) and is enabled. A checkpoint is deleted when
 * a disk's bitmap is missing, a layer lacking it cannot hold bitmaps (raw
 * or qcow2 version 2), or a disabled copy in the top layer, not in use,
 * has no later checkpoint recording in that layer (its writes since it
 * stopped are in no bitmap).
 *
 * An orphan can be redefined when its name is one libvirt accepts and no
 * checkpoint has, and it passes the rules on some disk: the checkpoint
 * then covers the disks where it does (the others' copies are removed),
 * its parent is the newest checkpoint not deleted (or the orphan
 * redefined before it), and its creation time the current time, after
 * every other.
 *
 * Returns 0, -1 on error, or a callback's non-zero value (errno
 * ECANCELED).
 */
QBM_API int qbm_checkpoints_check(struct qbm_checkpoints *set, unsigned flags,
                                  qbm_checkpoint_disk_fn disk_fn,
                                  qbm_orphan_fn orphan_fn,
                                  qbm_remedy_fn remedy_fn, void *opaque);

#ifdef __cplusplus
}
#endif

#endif /* QBM_H */
