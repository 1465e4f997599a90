/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * Internal interfaces of libqbm, in the layer order of docs/design.md
 * ("Layers"): first the qcow2 format's constants, which every layer may
 * use, then one section per layer, bottom up, and in it one banner per
 * file with what that file defines:
 *   util    util-error.c: errors, allocation; util-darray.c: growable arrays;
 *           byte order, checked arithmetic
 *   io      io.c: pread/pwrite/flush behind a vtable (file, memory, fault)
 *   qcow2   qcow2-header.c, qcow2-refcount.c, qcow2-compress.c,
 * qcow2-cluster.c, qcow2-snapshot.c: the image's structures;
 * qcow2-header-write.c: crash-safe writes to cluster 0; qcow2-writer.c: fresh
 * qcow2 images bitmap  bitmap-chunks.c: in-memory chunked bitmap; bitmap-dir.c:
 * bitmaps extension, directory and tables, a bitmap's data image   image.c:
 * struct qbm_image (open, validate, reload); image-bitmap.c: bitmap queries;
 * image-meta.c: every structure of an image (the enumerator) and the overlap
 * index chain   chain.c: backing chains; chain-check.c: checkpoint rules;
 *           chain-resolve.c: which layer provides each guest range
 *   txn     txn-alloc.c: a transaction's refcounts and allocator;
 *           txn.c: crash-safe transactions (the commit order)
 *   edit    edit.c: staged bitmap edits and their commit
 *   op      op-consolidate.c, op-restore.c (the backups as restore reads
 *           them), op-rebuild.c (the others have only a public API)
 * A file uses its own layer and the ones before it, never one after; one
 * exception, for data only: struct qbm_image is defined with image.c
 * (it holds a header and the bitmaps extension by value), but the qcow2
 * and bitmap layers take it by pointer and keep their state in it.
 *
 * Internal functions return 0 (or a count) on success and -errno on failure,
 * after recording a message with qbm_err(). The library never prints.
 *
 * Every public call that the library needs itself has an internal body,
 * qbm_impl_<name> for qbm_<name>: the same arguments, except that a handle
 * comes back through a ret_ parameter, and 0 (or a count, or a callback's
 * non-zero value) or -errno as the result. The public function only checks
 * its arguments and converts the result to -1 or NULL at the edge; the
 * library never calls its own public API (it would lose the errno, and
 * go through the exported symbol). Callbacks inside the library follow the
 * same rule: 0 to go on, -errno on failure, a positive value to stop.
 */
#ifndef QBM_INTERNAL_H
#define QBM_INTERNAL_H

#include <errno.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <sys/uio.h>

#include "qbm.h"

#define QBM_PRINTF(a, b) __attribute__((format(printf, a, b)))
#define QBM_UNUSED __attribute__((unused))
#define QBM_ARRAY_SIZE(a) (sizeof(a) / sizeof((a)[0]))

/* ==== qcow2 format constants ============================================== */

/*
 * The qcow2 spec's names and values (QEMU's docs/interop/qcow2.txt, by
 * section), and the limits QEMU applies on open, which qbm applies too.
 */

/* "Header". */
#define QCOW2_MAGIC 0x514649fbu
#define QCOW2_MIN_CLUSTER_BITS 9
#define QCOW2_MAX_CLUSTER_BITS 21
#define QCOW2_V2_HEADER_LEN 72
#define QCOW2_V3_HEADER_LEN 104
#define QCOW2_MAX_BACKING_NAME 1023
#define QCOW2_INCOMPAT_KNOWN 0x1full
#define QCOW2_AUTOCLEAR_KNOWN 0x3ull
/* Where each field of the fixed header starts in cluster 0. Fields are
 * big-endian and contiguous, so each one ends where the next begins: a
 * write of several fields is the span between two names. Version 2
 * headers end where incompatible_features begins. */
enum qcow2_header_field {
    QCOW2_HDR_MAGIC = 0,
    QCOW2_HDR_VERSION = 4,
    QCOW2_HDR_BACKING_FILE_OFFSET = 8,
    QCOW2_HDR_BACKING_FILE_SIZE = 16,
    QCOW2_HDR_CLUSTER_BITS = 20,
    QCOW2_HDR_SIZE = 24,
    QCOW2_HDR_CRYPT_METHOD = 32,
    QCOW2_HDR_L1_SIZE = 36,
    QCOW2_HDR_L1_TABLE_OFFSET = 40,
    QCOW2_HDR_REFCOUNT_TABLE_OFFSET = 48,
    QCOW2_HDR_REFCOUNT_TABLE_CLUSTERS = 56,
    QCOW2_HDR_NB_SNAPSHOTS = 60,
    QCOW2_HDR_SNAPSHOTS_OFFSET = 64,
    QCOW2_HDR_INCOMPATIBLE_FEATURES = 72,
    QCOW2_HDR_COMPATIBLE_FEATURES = 80,
    QCOW2_HDR_AUTOCLEAR_FEATURES = 88,
    QCOW2_HDR_REFCOUNT_ORDER = 96,
    QCOW2_HDR_HEADER_LENGTH = 100,
    QCOW2_HDR_COMPRESSION_TYPE = 104, /* additional field, 1 byte */
};
/* Host offsets are limited to bits 9..55 of table entries. */
#define QCOW2_MAX_HOST_OFFSET (1ull << 56)
/* QEMU's limits on the active L1 table, the refcount table and the number
 * of snapshots. */
#define QCOW2_MAX_L1_BYTES (32u << 20)
#define QCOW2_MAX_REFTABLE_BYTES (8u << 20)
#define QCOW2_MAX_SNAPSHOTS 65536

/* "Header extensions": their type magics. */
#define QCOW2_EXT_END 0x00000000u
#define QCOW2_EXT_BACKING_FORMAT 0xe2792acau
#define QCOW2_EXT_FEATURE_TABLE 0x6803f857u
#define QCOW2_EXT_BITMAPS 0x23852875u
#define QCOW2_EXT_CRYPTO 0x0537be77u
#define QCOW2_EXT_DATA_FILE 0x44415441u

/* "Host cluster management": refcount table entries. */
#define REFT_OFFSET_MASK 0xfffffffffffffe00ull
#define REFT_RESERVED_MASK 0x1ffull

/* "Cluster mapping": L1 and L2 table entries. */
#define L1E_OFFSET_MASK 0x00fffffffffffe00ull
#define L1E_RESERVED_MASK 0x7f000000000001ffull
#define L2E_COPIED (1ull << 63)
#define L2E_COMPRESSED (1ull << 62)
#define L2E_OFFSET_MASK 0x00fffffffffffe00ull
#define L2E_STD_RESERVED_MASK 0x3f000000000001feull
#define L2E_ZERO 0x1ull

/* "Snapshots": the fixed part of a table entry, and QEMU's limit on its
 * extra data. */
#define QCOW2_SN_HEADER_LEN 40
#define QCOW2_SN_MAX_EXTRA 1024

/* "Bitmaps extension", "Bitmap directory", "Bitmap table". */
#define BME_FLAG_IN_USE 0x1u
#define BME_FLAG_AUTO 0x2u
#define BME_FLAG_EXTRA_DATA_COMPATIBLE 0x4u
#define BME_TYPE_DIRTY_TRACKING 1
#define BME_MIN_GRANULARITY_BITS 9
#define BME_MAX_GRANULARITY_BITS 31
#define BME_MAX_NAME_SIZE 1023
#define BME_MAX_TABLE_SIZE 0x8000000u
#define BME_MAX_PHYS_SIZE 0x20000000u /* 512 MiB of bitmap data */
#define BME_MAX_BITMAPS 65535
#define BME_MAX_DIR_SIZE (65535u * 1024u)
#define BME_ENTRY_HEADER 24
#define BME_TABLE_RESERVED 0xff000000000001feull
#define BME_TABLE_OFFSET_MASK 0x00fffffffffffe00ull
#define BME_TABLE_ALL_ONES 0x1ull

/* ==== layer util ========================================================== */

/* ---- util-error.c: errors and allocation
 * -------------------------------------- */

/* Record `errnum` and a message as this thread's last error; returns -errnum
 * (-EIO for a non-positive errnum). */
int qbm_err_set(int errnum, const char *fmt, ...) QBM_PRINTF(2, 3);
/* The same, written so that callers and analyzers see a negative result. */
#define qbm_err(errnum, ...)              \
    ({                                    \
        int qbm_e_ = (errnum);            \
        qbm_err_set(qbm_e_, __VA_ARGS__); \
        qbm_e_ > 0 ? -qbm_e_ : -EIO;      \
    })
/* Prefix the current message with "PREFIX: ". Returns `ret` unchanged. */
int qbm_err_prefix(int ret, const char *fmt, ...) QBM_PRINTF(2, 3);
/* The current message (qbm_get_error); valid until the next error. */
const char *qbm_err_message(void);
/* The current errno (qbm_get_errno). */
int qbm_err_errno(void);
/* Convert an internal -errno into the public -1 convention. */
static inline int qbm_public_ret(int r)
{
    return r < 0 ? -1 : r;
}
/* The public result of a call that took a caller's callback, wrapped so
 * that its non-zero value stops the walk (design.md, "Errors"): -1 when
 * the internal result `r` is an error, else the callback's value
 * `user_ret` that stopped it (errno ECANCELED), else 0. */
int qbm_public_ret_cb(int r, int user_ret);
/*
 * A caller's progress callback, wrapped as every callback is (docs/design.md,
 * "Errors"): its non-zero value stops the operation and is kept here for
 * the public call to return. Unlike a walk's stop, it fails inside the
 * library with -ECANCELED, so that the operation's error paths (removing
 * a temporary output, abandoning a transaction) run.
 */
struct qbm_progress {
    qbm_progress_fn fn; /* may be NULL */
    void *opaque;
    int user_ret;
};
/* Report `done` of `total`: 0, or -ECANCELED when the callback stopped.
 * `p` may be NULL. */
int qbm_progress_report(struct qbm_progress *p, uint64_t done, uint64_t total);
/* The public result for the internal result `r`: the callback's value when
 * it stopped the operation, else as qbm_public_ret(). */
static inline int qbm_progress_ret(const struct qbm_progress *p, int r)
{
    return r < 0 && p->user_ret ? p->user_ret : qbm_public_ret(r);
}
/* Allocation helpers that record ENOMEM. */
void *qbm_malloc(size_t n);
void *qbm_calloc(size_t n, size_t size);
void *qbm_realloc(void *p, size_t n);
char *qbm_strndup(const char *s, size_t n);
/* Test hook: make the Nth allocation from now fail (0 = never). */
void qbm_alloc_fail_after(unsigned long n);
/* For allocators that do not use qbm_malloc: true when this one must fail
 * (and the message is set). */
bool qbm_alloc_hook_fails(size_t n);

/* ---- util-darray.c: typed growable arrays -------------------------------- */

#include "util-darray.h"

/* ---- byte order and checked arithmetic (inline) -------------------------- */

static inline uint16_t be16_load(const void *p)
{
    const uint8_t *b = p;
    return (uint16_t)((b[0] << 8) | b[1]);
}
static inline uint32_t be32_load(const void *p)
{
    const uint8_t *b = p;
    return ((uint32_t)b[0] << 24) | ((uint32_t)b[1] << 16) |
           ((uint32_t)b[2] << 8) | b[3];
}
static inline uint64_t be64_load(const void *p)
{
    const uint8_t *b = p;
    return ((uint64_t)be32_load(b) << 32) | be32_load(b + 4);
}
static inline void be16_store(void *p, uint16_t v)
{
    uint8_t *b = p;
    b[0] = v >> 8;
    b[1] = v;
}
static inline void be32_store(void *p, uint32_t v)
{
    uint8_t *b = p;
    b[0] = v >> 24;
    b[1] = v >> 16;
    b[2] = v >> 8;
    b[3] = v;
}
static inline void be64_store(void *p, uint64_t v)
{
    be32_store(p, v >> 32);
    be32_store((uint8_t *)p + 4, (uint32_t)v);
}

/* Overflow-checked helpers: return false on overflow. */
static inline bool add_ok(uint64_t a, uint64_t b, uint64_t *r)
{
    return !__builtin_add_overflow(a, b, r);
}
static inline bool mul_ok(uint64_t a, uint64_t b, uint64_t *r)
{
    return !__builtin_mul_overflow(a, b, r);
}
static inline uint64_t div_round_up(uint64_t a, uint64_t b)
{
    return a / b + (a % b != 0);
}
static inline uint64_t align_down(uint64_t a, uint64_t b)
{
    return a & ~(b - 1);
}
static inline bool is_aligned(uint64_t a, uint64_t b)
{
    return (a & (b - 1)) == 0;
}

/* ==== layer io ============================================================ */

/* ---- io.c: I/O backends -------------------------------------------------- */

struct qbm_io;

struct qbm_io_ops {
    /* Read exactly len bytes; bytes past the end of the file read as 0. */
    int (*pread)(struct qbm_io *io, void *buf, size_t len, uint64_t off);
    int (*pwrite)(struct qbm_io *io, const void *buf, size_t len, uint64_t off);
    int (*flush)(struct qbm_io *io);
    int (*size)(struct qbm_io *io, uint64_t *ret_size);
    /* Optional: set the file's size (a device keeps its own). */
    int (*truncate)(struct qbm_io *io, uint64_t size);
    /* Optional: make the writes to [off, off + len) unable to fail for
     * want of space (a file's holes and growth). */
    int (*reserve)(struct qbm_io *io, uint64_t off, uint64_t len);
    /* Optional: the buffers of iov filled from (or written to) the bytes
     * from off on, in one system call where the backend can (a batch);
     * without, qbm_io_preadv/pwritev call pread/pwrite once per buffer. */
    int (*preadv)(struct qbm_io *io, const struct iovec *iov, int iovcnt,
                  uint64_t off);
    int (*pwritev)(struct qbm_io *io, const struct iovec *iov, int iovcnt,
                   uint64_t off);
    void (*close)(struct qbm_io *io);
};

struct qbm_io {
    const struct qbm_io_ops *ops;
    /* The most the file can hold, or 0 when it grows as written: a block
     * device's size (size() then returns it too). Writes past it fail
     * with ENOSPC before reaching the backend. */
    uint64_t capacity;
};

static inline int qbm_io_pread(struct qbm_io *io, void *buf, size_t len,
                               uint64_t off)
{
    return io->ops->pread(io, buf, len, off);
}
int qbm_io_past_capacity(struct qbm_io *io, size_t len, uint64_t off);
static inline int qbm_io_pwrite(struct qbm_io *io, const void *buf, size_t len,
                                uint64_t off)
{
    if (io->capacity && (off > io->capacity || len > io->capacity - off)) {
        return qbm_io_past_capacity(io, len, off);
    }
    return io->ops->pwrite(io, buf, len, off);
}
static inline int qbm_io_flush(struct qbm_io *io)
{
    return io->ops->flush(io);
}
static inline int qbm_io_size(struct qbm_io *io, uint64_t *ret_size)
{
    return io->ops->size(io, ret_size);
}
/* Set the size of a file (nothing for a device or a backend without). */
static inline int qbm_io_truncate(struct qbm_io *io, uint64_t size)
{
    return io->ops->truncate ? io->ops->truncate(io, size) : 0;
}
/* Reserve the space of [off, off + len) (see qbm_io_ops.reserve). */
static inline int qbm_io_reserve(struct qbm_io *io, uint64_t off, uint64_t len)
{
    return io->ops->reserve ? io->ops->reserve(io, off, len) : 0;
}
/* Vectored read and write: iovcnt buffers (any number; a file backend
 * splits them into batches of IOV_MAX) at consecutive offsets from off. */
int qbm_io_preadv(struct qbm_io *io, const struct iovec *iov, int iovcnt,
                  uint64_t off);
int qbm_io_pwritev(struct qbm_io *io, const struct iovec *iov, int iovcnt,
                   uint64_t off);
/* Read n pieces of len bytes, piece k at offs[k] into bufs[k]: pieces
 * that follow each other in the file in one vectored read (one buffer
 * when they follow each other in memory too). */
int qbm_io_read_pieces(struct qbm_io *io, const uint64_t *offs,
                       uint8_t *const *bufs, size_t n, size_t len);
/* A memory or fault io that behaves as a device of `capacity` bytes: its
 * size is the capacity and nothing is written past it (tests). */
void qbm_io_set_capacity(struct qbm_io *io, uint64_t capacity);
void qbm_io_close(struct qbm_io *io);
/* Copy len bytes between ios: in the kernel (copy_file_range) when both are
 * files, else through a buffer. */
int qbm_io_copy(struct qbm_io *src, uint64_t src_off, struct qbm_io *dst,
                uint64_t dst_off, size_t len);
/* A second io on the same open file (a file io only: it shares the file's
 * locks); -EOPNOTSUPP for other backends. */
int qbm_io_dup(struct qbm_io *io, struct qbm_io **ret_io);
/* The file descriptor behind a file io, or -1. */
int qbm_io_fd(struct qbm_io *io);
/* Read `len` bytes of metadata at `off`, refusing what lies past the
 * largest offset a qcow2 image can address; `what` names the structure
 * for messages ("L1 table at 0x...: ..."). */
int qbm_io_read_meta(struct qbm_io *io, void *buf, size_t len, uint64_t off,
                     const char *what);

/* Lock modes for file images (docs/design.md, "Locking"). */
enum qbm_lock_mode {
    QBM_LOCK_NONE,  /* -U: take nothing */
    QBM_LOCK_READ,  /* hold 100, 201, 203; refuse writers (101, 103) */
    QBM_LOCK_WRITE, /* hold 100, 101, 103, 201, 203; refuse readers/writers */
};
int qbm_io_file_open(const char *filename, bool rdwr, enum qbm_lock_mode lock,
                     struct qbm_io **ret_io);
/* Wrap an open descriptor (closed with the io). The one place that tells
 * a block device: its io's capacity is the device's size. */
int qbm_io_file_adopt(int fd, struct qbm_io **ret_io);
/* Take QEMU's locks of `lock` on a file io (as qbm_io_file_open does), for
 * a descriptor opened otherwise (a device opened O_EXCL). */
int qbm_io_file_lock(struct qbm_io *io, enum qbm_lock_mode lock);
/* A growable in-memory file; `buf` is copied. */
int qbm_io_mem_open(const void *buf, size_t len, struct qbm_io **ret_io);
/* Borrow the bytes of a memory io (for tests). */
const uint8_t *qbm_io_mem_data(struct qbm_io *io, size_t *ret_len);
/*
 * Fault injection (tests): a memory file whose crash_at-th write or flush
 * (counting from 1; 0 = never) and everything after fail with EIO.
 */
int qbm_io_fault_open(const void *buf, size_t len, uint64_t crash_at,
                      uint32_t seed, struct qbm_io **ret_io);
/* Writes and flushes done so far. */
uint64_t qbm_io_fault_ops(struct qbm_io *io);
/* Instead of crashing, fail only the at-th write or flush, with -err (a
 * transient error such as ENOSPC: what follows succeeds). */
void qbm_io_fault_fail_once(struct qbm_io *io, uint64_t at, int err);
/* Whether the crash (or the one failure) cut a vectored write: part of the
 * batch, *ret_bytes (may be NULL), was written before it failed. */
bool qbm_io_fault_cut(struct qbm_io *io, uint64_t *ret_bytes);
/* The memory io holding what reads see (borrowed). */
struct qbm_io *qbm_io_fault_live(struct qbm_io *io);
/* What a crash now would leave: the flushed bytes plus a seeded random
 * subset of the unflushed writes, some torn at sector boundaries. */
int qbm_io_fault_crash_image(struct qbm_io *io, uint8_t **ret, size_t *ret_len);

/* ==== layer qcow2 ========================================================= */

/* ---- qcow2-header.c: cluster 0
 * ------------------------------------------------- */

/* One header extension as found in cluster 0 (data is a copy). */
struct qcow2_ext {
    uint32_t magic;
    uint32_t len;
    uint64_t offset; /* of the 8-byte extension header in the file */
    uint8_t *data;
};

struct qcow2_feature_name {
    uint8_t type, bit;
    char name[47];
};

struct qcow2_header {
    uint32_t version;
    uint64_t backing_file_offset;
    uint32_t backing_file_size;
    uint32_t cluster_bits;
    uint64_t size;
    uint32_t crypt_method;
    uint32_t l1_size;
    uint64_t l1_table_offset;
    uint64_t refcount_table_offset;
    uint32_t refcount_table_clusters;
    uint32_t nb_snapshots;
    uint64_t snapshots_offset;
    uint64_t incompatible_features;
    uint64_t compatible_features;
    uint64_t autoclear_features;
    uint32_t refcount_order;
    uint32_t header_length;
    uint8_t compression_type;

    /* Derived and decoded from extensions. */
    uint64_t cluster_size;
    char *backing_file;     /* NULL when none */
    char *backing_format;   /* NULL when no extension */
    char *data_file;        /* NULL when no extension */
    struct qcow2_ext *exts; /* every extension in file order, end excluded */
    size_t nb_exts;
    uint64_t ext_end; /* offset just past the end marker */
    struct qcow2_feature_name *features;
    size_t nb_features;
    /* The name of each feature bit (the first entry of the table with that
     * type and bit and a name), pointing into features, or NULL. */
    const char *feature_names[3][64];
    const struct qcow2_ext *bitmaps_ext; /* points into exts, or NULL */
};

/* Decode and validate cluster 0 (`buf` holds `len` bytes from offset 0;
 * len >= min(file size, cluster size)). */
int qcow2_header_decode(const uint8_t *buf, size_t len, uint64_t file_size,
                        struct qcow2_header *ret_hdr);
void qcow2_header_free(struct qcow2_header *hdr);
/* A feature bit's name: the image's feature table, else the spec's. */
const char *qcow2_feature_name(const struct qcow2_header *h, unsigned type,
                               unsigned bit);

/* ---- qcow2-header-write.c: crash-safe writes to cluster 0 ---------------- */

/* Whether bytes [start, end) lie in one 512-byte sector: a write of them
 * cannot be torn. */
static inline bool qcow2_one_sector(uint64_t start, uint64_t end)
{
    return start / 512 == (end - 1) / 512;
}
/* Write len bytes at off (in cluster 0), then flush. */
int qcow2_header_write(struct qbm_io *io, const void *buf, size_t len,
                       uint64_t off);
/* Write bytes [start, end) of cluster 0 from its copy c0, then flush. */
int qcow2_header_write_span(struct qbm_io *io, const uint8_t *c0,
                            uint64_t start, uint64_t end);

/* Where things are in cluster 0, as it is on disk now. */
struct qcow2_header_layout {
    uint8_t *c0;      /* cluster 0; the caller frees it, also on error */
    uint64_t end_pos; /* the end-of-extensions marker, 0 when there is none */
    uint64_t ext_pos; /* the extension looked for, 0 when absent */
    uint32_t ext_len; /* its length */
    bool ext_last;    /* it lies directly before the end marker */
};
/* Read cluster 0 and find its end marker and the extension `magic`. */
int qcow2_header_layout_read(struct qbm_image *img, uint32_t magic,
                             struct qcow2_header_layout *lay);
/* Check, before anything is written, that the bitmaps extension can be
 * switched to nb bitmaps (lay: found for QCOW2_EXT_BITMAPS). */
int qcow2_header_bitmaps_plan(const struct qbm_image *img,
                              const struct qcow2_header_layout *lay,
                              uint32_t nb);
/* Make the directory at dir_offset live (nb == 0: remove the extension and
 * clear the autoclear bit), one sector-sized write and flush at a time. */
int qcow2_header_bitmaps_switch(struct qbm_image *img,
                                struct qcow2_header_layout *lay, uint32_t nb,
                                uint64_t dir_offset, uint64_t dir_size);

/* ---- qcow2-refcount.c
 * ---------------------------------------------------------- */

/* Load and validate the refcount table (not the blocks). */
int qcow2_refcount_load(struct qbm_image *img);
/* Refcount of host cluster index `cluster`. */
int qcow2_refcount_get(struct qbm_image *img, uint64_t cluster,
                       uint64_t *ret_refcount);
/* Decode entry `idx` of a refcount block of width `bits`. */
uint64_t qcow2_refblock_entry(const uint8_t *block, unsigned bits,
                              uint64_t idx);
void qcow2_refblock_set(uint8_t *block, unsigned bits, uint64_t idx,
                        uint64_t value);
/* The index of the last non-zero entry among the first n of a block, plus
 * one, or 0. */
uint64_t qcow2_refblock_last(const uint8_t *block, unsigned bits, uint64_t n);
/*
 * The image end: the end of the last cluster whose refcount is not 0 (what
 * qemu-img check reports as "Image end offset" on a consistent image).
 * On a block device it is where the image stops, not the device's size;
 * on a file it may lie before or, by a partial last cluster, past the
 * file's end.
 */
int qcow2_refcount_end(struct qbm_image *img, uint64_t *ret_end);

/* ---- qcow2-compress.c
 * ---------------------------------------------------------- */

/* Decompress one cluster: `in` holds `in_len` bytes of a compressed stream
 * (type 0 deflate, 1 zstd); exactly `out_len` bytes must be produced. */
int qcow2_decompress(unsigned type, const uint8_t *in, size_t in_len,
                     uint8_t *out, size_t out_len);

/* ---- qcow2-cluster.c: L1/L2 tables
 * --------------------------------------------- */

/* Validate the active L1 table's header fields (at open). */
int qcow2_l1_load(struct qbm_image *img);
/* Read its entries (img->l1), once, when first needed. */
int qcow2_l1_ensure(struct qbm_image *img);
/* Read the L2 table at l2_off into img->l2_cache. */
int qcow2_read_l2(struct qbm_image *img, uint64_t l2_off);

/* Decoded compressed-cluster descriptor (qcow2 spec, "Compressed
 * Clusters Descriptor"). */
struct qcow2_compressed {
    uint64_t offset;   /* host byte offset of the compressed data */
    uint64_t nb_bytes; /* readable bytes from offset */
};
void qcow2_compressed_decode(uint64_t l2e, unsigned cluster_bits,
                             struct qcow2_compressed *ret);

/* Per-subcluster (or per-cluster) classification. */
enum qcow2_subcluster_type {
    QCOW2_SC_UNALLOCATED, /* falls through to backing */
    QCOW2_SC_DATA,        /* normal data at host offset */
    QCOW2_SC_COMPRESSED,
    QCOW2_SC_ZERO, /* reads as zero, shadows backing */
};

/*
 * Classify guest cluster range: calls fn for maximal runs of equal status in
 * [0, virtual size). Unallocated runs are not reported.
 */
int qcow2_allocation_walk(struct qbm_image *img, qbm_alloc_fn fn, void *opaque);

/*
 * Host mapping of one layer: maximal guest runs with one kind of content.
 * DATA runs are host-contiguous (host = file offset of the first byte, in
 * the external data file when the image has one: qbm_image_data_open()
 * must have opened it); a COMPRESSED run is one cluster (host = its L2
 * entry); ZERO runs read as zeros. Ranges falling through to the backing
 * file are not reported.
 */
enum qcow2_map_type {
    QCOW2_MAP_DATA = 1,
    QCOW2_MAP_ZERO = 2,
    QCOW2_MAP_COMPRESSED = 3,
};
struct qcow2_map_extent {
    uint64_t guest, len, host;
    uint32_t type;
    uint32_t layer; /* set by the resolver */
    uint64_t start; /* COMPRESSED: guest offset of the cluster */
};
typedef int (*qcow2_map_fn)(void *opaque, const struct qcow2_map_extent *e);
int qcow2_map_walk(struct qbm_image *img, qcow2_map_fn fn, void *opaque);
/* Read `len` bytes at guest offset `guest` of a compressed cluster whose
 * L2 entry is `l2e` (the cluster is decompressed into img's cache). */
int qcow2_read_compressed(struct qbm_image *img, uint64_t l2e,
                          uint64_t in_cluster, void *buf, size_t len);

/* ---- qcow2-snapshot.c
 * ---------------------------------------------------------- */

struct qcow2_snapshot {
    uint64_t l1_table_offset;
    uint32_t l1_size;
    uint64_t entry_offset;
    /* What qemu-img info shows (spec, "Snapshots"): the id and name up to
     * a NUL, as QEMU reads them; vm_state_size from the 64-bit extra
     * field when present; icount UINT64_MAX when not recorded. */
    char *id, *name;
    uint32_t date_sec, date_nsec;
    uint64_t vm_clock_nsec, vm_state_size, icount;
};

int qcow2_snapshots_load(struct qbm_image *img);
void qcow2_snapshots_free(struct qcow2_snapshot *sn, uint32_t n);

/* ---- qcow2-crypto.c: the encryption header
 * ------------------------------------------ */

/* The image's encryption as qemu-img info shows it (crypt_method 1: "aes";
 * 2: the LUKS header the encryption header extension points at). */
int qcow2_crypto_info(struct qbm_image *img, struct qbm_encryption_info *ret);

/* ---- qcow2-writer.c: fresh qcow2 images
 * ---------------------------------------- */

/* A run of guest clusters to store: data, or zero flags. Sorted. */
struct qcow2_out_run {
    uint64_t first, count;
    bool data;
};
struct qcow2_writer;
/* Plan the layout; `runs` must stay valid until qcow2_writer_finish. */
int qcow2_writer_plan(struct qbm_io *io, uint64_t size, unsigned cluster_bits,
                      const char *backing, const char *backing_fmt,
                      const struct qcow2_out_run *runs, size_t nruns,
                      struct qcow2_writer **ret);
/* Flush everything else before writing the header (an image written in
 * place, whose header must never point at tables not yet on disk). */
void qcow2_writer_set_ordered(struct qcow2_writer *w);
/* Bytes the image takes: everything the plan writes lies below. */
uint64_t qcow2_writer_end(const struct qcow2_writer *w);
/* Host offset of data run `run`'s first cluster (the rest follow). */
uint64_t qcow2_writer_run_host(const struct qcow2_writer *w, size_t run);
/* Write every metadata structure and the header, then flush. */
int qcow2_writer_finish(struct qcow2_writer *w);
void qcow2_writer_free(struct qcow2_writer *w);

/* ==== layer bitmap ======================================================== */

/* ---- bitmap-chunks.c: in-memory chunked bitmap
 * ------------------------------------ */

/*
 * A bitmap of nbits bits, stored as chunks of chunk_bytes bytes (one per
 * bitmap-table entry, so one chunk = one bitmap data cluster). Each chunk is
 * all-zero (NULL), all-ones (QBM_CHUNK_ONES), a buffer from the arenas, or
 * a reference (QBM_CHUNK_REF): "the bytes of cluster refs[i].offset of
 * refs[i].io", read only when its bits are needed. References let a chunk
 * that is never modified go back to disk without passing through memory:
 * shared with the cluster it came from (same image) or copied file to file.
 * A merge that changes a referenced chunk leaves a pending OR
 * (QBM_CHUNK_OR): "the OR of refs[i] and ors[i]", computed where it is
 * needed: a commit reads both a window at a time and writes the result, so
 * a rewrite of a dense bitmap holds no copy of it (no fresh memory to
 * clear, none for the host of a virtual machine to fault in); any other
 * change loads it into a buffer first.
 * Bit k lives in chunk k / (8 * chunk_bytes), byte (k / 8) % chunk_bytes,
 * value 1 << (k % 8): the on-disk order, so chunks are written out
 * unchanged.
 */
struct qbm_chunk_arena;

struct qbm_chunk_ref {
    struct qbm_io *io;
    uint64_t offset;
};

struct qbm_bmap {
    struct qbm_chunk_arena *arenas; /* where chunk buffers live */
    uint64_t arena_chunks;          /* size of the next arena, in chunks */
    uint64_t nbits;
    uint64_t granularity; /* bytes covered by one bit */
    uint64_t disk_size;   /* bytes covered by the whole bitmap */
    uint64_t chunk_bytes;
    uint64_t nchunks;
    uint8_t **chunks;
    struct qbm_chunk_ref *refs; /* per chunk; allocated with the first */
    struct qbm_chunk_ref *ors;  /* second operands of pending ORs, the same */
    uint8_t *spare;        /* arena buffers to hand out again, a list linked
                            * through their first bytes */
    struct qbm_io **owned; /* ios closed with the bitmap */
    size_t nowned;
};
extern uint8_t qbm_chunk_ones[];
extern uint8_t qbm_chunk_ref[];
extern uint8_t qbm_chunk_or[];
#define QBM_CHUNK_ONES (qbm_chunk_ones)
#define QBM_CHUNK_REF (qbm_chunk_ref)
#define QBM_CHUNK_OR (qbm_chunk_or)

int qbm_bmap_new(uint64_t disk_size, uint64_t granularity, uint64_t chunk_bytes,
                 struct qbm_bmap **ret);
void qbm_bmap_free(struct qbm_bmap *bm);
/* Mark guest bytes [off, off+len) (clipped to disk_size) dirty. */
int qbm_bmap_set_range(struct qbm_bmap *bm, uint64_t off, uint64_t len);
/* Bit `bit`: 1 or 0, or -errno when a referenced cluster cannot be read. */
int qbm_bmap_get(const struct qbm_bmap *bm, uint64_t bit);
/* Make empty chunk idx a reference to the cluster at `offset` of `io`, which
 * must stay open as long as the bitmap (see qbm_bmap_adopt_io). */
int qbm_bmap_set_ref(struct qbm_bmap *bm, uint64_t idx, struct qbm_io *io,
                     uint64_t offset);
/* The bitmap closes `io` when it is freed (also when this fails). */
int qbm_bmap_adopt_io(struct qbm_bmap *bm, struct qbm_io *io);
/* Read a referenced chunk or a pending OR into memory (no-op for other
 * chunks). */
int qbm_bmap_load_chunk(struct qbm_bmap *bm, uint64_t idx);
/* OR a chunk in on-disk form (NULL, QBM_CHUNK_ONES or bytes) into chunk
 * idx of a bitmap of the same granularity and chunk size. */
int qbm_bmap_or_chunk(struct qbm_bmap *bm, uint64_t idx, const uint8_t *data);
/* Memory for a window of clusters read at once (NULL: ENOMEM recorded). */
uint8_t *qbm_window_alloc(size_t bytes);
void qbm_window_free(uint8_t *p, size_t bytes);
/*
 * qbm_bmap_or_chunk for chunks idx[0..n) (strictly increasing) with
 * data[0..n); the chunks among them on disk (references, pending ORs) are
 * read in batches (consecutive clusters of one io in one vectored read)
 * and stay as they are when data adds no bit. With src_io, data[k] are the
 * bytes of cluster src_offs[k] of src_io (which must stay open as long as
 * the bitmap): they are read into scratch[k] (one chunk each), and a
 * reference that data changes becomes a pending OR, not a buffer (a
 * pending OR that it changes is loaded). Without, src_offs and scratch are
 * not used.
 */
int qbm_bmap_or_chunks(struct qbm_bmap *bm, const uint64_t *idx,
                       const uint8_t *const *data, size_t n,
                       struct qbm_io *src_io, const uint64_t *src_offs,
                       uint8_t *const *scratch);
/* The bytes of chunks idx[0..n), each a reference or a pending OR, into
 * bufs[0..n) (tmps: scratch for the second operands, one chunk each), in
 * runs of consecutive clusters of one io. */
int qbm_bmap_read_chunks(const struct qbm_bmap *bm, const uint64_t *idx,
                         uint8_t *const *bufs, uint8_t *const *tmps, size_t n);
/* Install a new zeroed buffer as chunk idx (which must be empty). */
uint8_t *qbm_bmap_new_chunk(struct qbm_bmap *bm, uint64_t idx);
/* Walk dirty guest extents (merged, clipped to disk_size). */
int qbm_bmap_extents(const struct qbm_bmap *bm, qbm_extent_fn fn, void *opaque);
int qbm_bmap_dirty_bytes(const struct qbm_bmap *bm, uint64_t *ret_bytes);

/*
 * Extent walking over chunk data: turns a chunk's bits into guest extents.
 * `st` carries the pending extent across chunks so adjacent extents merge.
 */
struct qbm_extent_state {
    qbm_extent_fn fn;
    void *opaque;
    uint64_t pending_off, pending_len;
    uint64_t granularity, disk_size, bits_per_chunk, chunk_bytes, nbits;
    uint64_t dirty_bytes;
};
int qbm_extent_state_chunk(struct qbm_extent_state *st, uint64_t chunk_index,
                           const uint8_t *data);
int qbm_extent_state_finish(struct qbm_extent_state *st);
/* Feed chunks [first, end) of `bm` (end clipped) to `st`, whose geometry
 * must be the bitmap's; then finish it. */
int qbm_bmap_walk_range(const struct qbm_bmap *bm, uint64_t first, uint64_t end,
                        struct qbm_extent_state *st);

/* ---- bitmap-dir.c: bitmaps extension, directory, tables ------------------ */

struct qcow2_bitmap {
    /* Staged edits (write path): new contents to store at commit. */
    struct qbm_bmap *data; /* non-NULL: rewrite data and table at commit */
    bool table_bad;        /* in-use bitmap whose table cannot be read */
    uint64_t table_offset;
    uint32_t table_size;
    uint32_t flags;
    uint8_t type;
    uint8_t granularity_bits;
    uint32_t extra_data_size;
    char *name; /* NUL-terminated copy */
    uint16_t name_size;
    uint64_t entry_offset; /* file offset of the directory entry */
    uint64_t *table;       /* loaded lazily, NULL until then */
    uint32_t table_read;   /* entries read from the file: the rest (past
                            * its end) are 0 */
};

struct qcow2_bitmaps_ext {
    uint32_t nb_bitmaps;
    uint64_t dir_size;
    uint64_t dir_offset;
};

/* Decode the 24-byte bitmaps extension. */
int qcow2_bitmaps_ext_decode(const uint8_t *data, uint32_t len,
                             uint64_t ext_offset,
                             struct qcow2_bitmaps_ext *ret);
/* Decode and validate a whole directory (dir_size bytes at dir_offset,
 * already read into `buf`). Returns the entries (caller frees with
 * qcow2_bitmaps_free). `cluster_size` and `disk_size` drive QEMU's
 * per-entry checks. */
int qcow2_bitmap_dir_decode(const uint8_t *buf, uint64_t dir_size,
                            uint64_t dir_offset, uint32_t nb_bitmaps,
                            uint64_t cluster_size, uint64_t disk_size,
                            struct qcow2_bitmap **ret_bitmaps);
void qcow2_bitmaps_free(struct qcow2_bitmap *bms, uint32_t n);
/* Encode a directory entry for bm into buf (qcow2_bitmap_entry_size bytes). */
void qcow2_bitmap_entry_encode(const struct qcow2_bitmap *bm, uint8_t *buf);
/* Encoded size of one entry. */
uint64_t qcow2_bitmap_entry_size(const struct qcow2_bitmap *bm);
/* Table size QEMU requires for a disk of `disk_size` bytes. */
uint64_t qcow2_bitmap_table_size(uint64_t disk_size, unsigned gran_bits,
                                 uint64_t cluster_size);
/* Load (once) and validate a bitmap's table. */
int qcow2_bitmap_table_load(struct qbm_image *img, struct qcow2_bitmap *bm);

/* Bitmap data is read in windows of this many bytes (at least a cluster):
 * a run of consecutive clusters costs one system call. */
#define QBM_READ_WINDOW (256u << 10)
/* Read data clusters offs[0..n) of img into bufs (see qbm_io_read_pieces),
 * refusing offsets past the largest image. */
int qcow2_bitmap_read_clusters(struct qbm_image *img, const uint64_t *offs,
                               uint8_t *const *bufs, size_t n);
/*
 * Stream a bitmap's on-disk data without building a qbm_bmap: for every
 * chunk in order, with its bytes (NULL = all zero, QBM_CHUNK_ONES = all
 * ones). Used by dump and dirty-byte counting so memory stays at one
 * window (QBM_READ_WINDOW).
 */
typedef int (*qbm_chunk_fn)(void *opaque, uint64_t chunk_index,
                            const uint8_t *data);
int qcow2_bitmap_read_chunks(struct qbm_image *img, struct qcow2_bitmap *bm,
                             qbm_chunk_fn fn, void *opaque);
/* The same for chunks [first, end) only (end clipped to the table). */
int qcow2_bitmap_read_chunk_range(struct qbm_image *img,
                                  struct qcow2_bitmap *bm, uint64_t first,
                                  uint64_t end, qbm_chunk_fn fn, void *opaque);
/* A whole bitmap as a new qbm_bmap whose data chunks reference the
 * image's clusters (nothing is read until a chunk's bits are needed). */
int qcow2_bitmap_load(struct qbm_image *img, struct qcow2_bitmap *bm,
                      struct qbm_bmap **ret);

/* ==== layer image ========================================================= */

/* ---- image.c: struct qbm_image ------------------------------------------- */

/* Host offsets (of clusters), a growable array. */
QBM_DARRAY(qbm_offsets, uint64_t);

struct qbm_image {
    char *filename;
    bool raw;
    bool rdwr;
    struct qbm_io *io;
    enum qbm_lock_mode lock; /* io's locks; the data file gets them too */
    /* The external data file (incompatible feature bit 2), read only,
     * once qbm_image_data_open() has opened it; NULL before and for
     * images without one. */
    struct qbm_io *data_io;
    uint64_t file_size;
    struct qcow2_header hdr;

    /* Geometry. */
    uint32_t cluster_bits;
    uint64_t cluster_size;
    uint32_t refcount_bits;
    uint32_t l2_entry_size; /* 8 or 16 */
    uint64_t l2_entries;    /* per table */
    bool extl2;

    uint64_t *l1;      /* the entries the virtual size needs */
    uint64_t *keep_l1; /* reload: the old table, reused if unmoved */
    uint64_t keep_l1_offset;
    uint32_t keep_l1_size;
    uint64_t *reftable; /* reftable_entries entries */
    uint64_t reftable_entries;

    struct qcow2_snapshot *snapshots;
    uint32_t nb_snapshots;
    uint64_t snapshots_size; /* bytes of the snapshot table */

    int bitmaps_state; /* QBM_BITMAPS_* */
    struct qcow2_bitmaps_ext bm_ext;
    struct qcow2_bitmap *bitmaps;
    uint32_t nb_bitmaps;

    /* Write path: staged edits not yet committed (edit.c). */
    bool staged;
    bool broken;  /* a failed commit left the handle unusable */
    bool changed; /* a failed commit got past its switch (txn.c sets it) */
    struct qbm_offsets pending_free; /* host clusters to free after commit */

    /* One-block caches (cleared by writers). */
    uint8_t *l2_cache;
    uint64_t l2_cache_offset;
    uint8_t *refblock_cache;
    uint64_t refblock_cache_offset;
    uint8_t *zcache; /* last decompressed cluster */
    uint64_t zcache_l2e;
};

/* Open an image on an existing io (takes ownership of io, also on error). */
int qbm_image_open_io(struct qbm_io *io, const char *filename, bool rdwr,
                      struct qbm_image **ret_img);
/* Open a raw layer (virtual size = file size). */
int qbm_image_open_raw(struct qbm_io *io, const char *filename,
                       struct qbm_image **ret_img);
/* qbm_io_read_meta on the image's file. */
static inline int qbm_image_read_meta(struct qbm_image *img, void *buf,
                                      size_t len, uint64_t off,
                                      const char *what)
{
    return qbm_io_read_meta(img->io, buf, len, off, what);
}

/* How qbm_image_open_format() reads a file. */
enum qbm_format {
    QBM_FORMAT_QCOW2, /* must be qcow2 */
    QBM_FORMAT_RAW,   /* a raw layer, whatever it holds */
    QBM_FORMAT_PROBE, /* qcow2 when it starts with the magic, else raw */
};
/*
 * Open the file behind `io` (taking ownership of io, also on error) as
 * `format`. This is the only place where the qcow2 magic decides a format
 * (QEMU probes the same way for a backing file without a format).
 */
int qbm_image_open_format(struct qbm_io *io, const char *filename,
                          enum qbm_format format, bool rdwr,
                          struct qbm_image **ret_img);
/* qbm_open, qbm_close, qbm_image_allocation (see qbm.h). */
int qbm_impl_open(const char *filename, unsigned flags,
                  struct qbm_image **ret_img);
void qbm_impl_close(struct qbm_image *img);
int qbm_impl_image_allocation(struct qbm_image *img, qbm_alloc_fn fn,
                              void *opaque);
/* qbm_image_end_offset (see qbm.h). */
int qbm_impl_image_end_offset(struct qbm_image *img, uint64_t *ret_end);
/* Reload every structure of an open image from its io (after a commit). */
int qbm_image_reload(struct qbm_image *img);
/*
 * Open the external data file of an image that has one (qcow2 spec,
 * "Header": incompatible feature bit 2; "Header extensions": external data
 * file name), read only and locked as the image is (shared read locks, or
 * none for an image opened with -U), once; 0 at once for other images.
 * The name is opened as QEMU opens it: as a local file name, never parsed
 * for a protocol, a relative one from the working directory. Guest data that
 * qcow2_map_walk() reports as DATA is then read from qbm_image_data_io(), at
 * the L2 entries' host offsets.
 */
int qbm_image_data_open(struct qbm_image *img);
/* Where an image's guest data clusters live: its data file, or itself. */
static inline struct qbm_io *qbm_image_data_io(struct qbm_image *img)
{
    return img->data_io ? img->data_io : img->io;
}

/* ---- image-bitmap.c: bitmap queries
 * -------------------------------------------- */

/* The directory entry of bitmap `name` (staged state), or NULL; no error is
 * recorded. */
struct qcow2_bitmap *qcow2_bitmap_lookup(const struct qbm_image *img,
                                         const char *name);
/* qbm_bitmap_find: the index, or -ENOENT with a message. */
int qbm_impl_bitmap_find(const struct qbm_image *img, const char *name);
bool qbm_impl_bitmap_consistent(const struct qbm_image *img, size_t idx);
/* qbm_image_bitmaps_bytes (see qbm.h). */
int qbm_impl_image_bitmaps_bytes(struct qbm_image *img, uint64_t *ret_bytes);
int qbm_impl_bitmap_extents(struct qbm_image *img, size_t idx, qbm_extent_fn fn,
                            void *opaque);
/* A caller's qbm_extent_fn wrapped for an internal walk: its value is kept
 * in `user_ret`, and any non-zero one stops the walk (returns 1). */
struct qbm_extent_wrap {
    qbm_extent_fn fn;
    void *opaque;
    int user_ret;
};
int qbm_extent_wrap_cb(void *opaque, uint64_t off, uint64_t len);

/* ---- image-meta.c: where the metadata lies ------------------------------- */

/* What a structure found by qcow2_meta_walk() is. */
enum qcow2_meta_kind {
    QCOW2_META_HEADER, /* cluster 0 */
    QCOW2_META_REFTABLE,
    QCOW2_META_REFBLOCK, /* owner: the refcount table */
    QCOW2_META_L1,       /* the active L1 table */
    QCOW2_META_SNAPSHOT_TABLE,
    QCOW2_META_SNAPSHOT_L1, /* owner: the snapshot's table entry */
    QCOW2_META_L2,          /* owner: an L1 table, active or not */
    QCOW2_META_DATA,        /* owner: an L2 table (QCOW2_META_WALK_DATA) */
    QCOW2_META_COMPRESSED,  /* the 512-byte sectors compressed data
                             * spans; owner: an L2 table (idem) */
    QCOW2_META_CRYPTO,      /* encryption header */
    QCOW2_META_BITMAP_DIR,
    QCOW2_META_STALE_BITMAP_DIR, /* not live (QEMU ignores it), no bitmaps */
    QCOW2_META_BITMAP_TABLE,     /* owner: the bitmap's directory entry */
    QCOW2_META_BITMAP_DATA,      /* owner: a bitmap table */
};

/* One structure, reported once per reference to it. */
struct qcow2_meta {
    enum qcow2_meta_kind kind;
    const char *what; /* its name in messages: "L2 table" */
    uint64_t offset;  /* in the file */
    uint64_t length;  /* bytes; 0 for an empty table */
    bool misaligned;  /* a refcount block or L2 table whose offset is
                       * not cluster aligned: not followed */
    uint64_t owner;   /* file offset of the structure pointing here */
    uint64_t index;   /* its entry that does (table index, snapshot or
                       * bitmap number), or UINT64_MAX */
    uint32_t refs;    /* the references this report stands for: 1, or for
                       * the data clusters of an L2 table that several L1
                       * entries share (walked once), their number */
};

/* Return 0 to go on, a positive value to stop, or -errno. */
typedef int (*qcow2_meta_fn)(void *opaque, const struct qcow2_meta *m);
/* A bad entry at file offset `at` of structure m (reserved bits, an
 * unaligned L2 or data offset), or m cannot be read (a bitmap table). */
typedef int (*qcow2_meta_problem_fn)(void *opaque, const struct qcow2_meta *m,
                                     uint64_t at, const char *msg);

/* Also read every L2 table and report the data clusters. */
#define QCOW2_META_WALK_DATA 0x1u

/*
 * Report every structure of img, in this order: header, refcount table
 * and blocks, active L1 table (each L2 table after its entry, then its
 * data), snapshot table, each snapshot's L1 table likewise, encryption
 * header, bitmap directory, each bitmap's table and data clusters. An L2
 * table is reported once per L1 entry pointing to it, but its data (and
 * its bad entries) only after the first such entry, once, each data
 * cluster with `refs` the number of those entries in all L1 tables.
 * Bitmaps added in this session (no table on disk yet) are left out; every
 * bitmap table is loaded. Tables are read only up to the end of the file.
 * Returns 0, -errno, or the first positive value of fn or problem_fn
 * (optional).
 */
int qcow2_meta_walk(struct qbm_image *img, unsigned flags, qcow2_meta_fn fn,
                    qcow2_meta_problem_fn problem_fn, void *opaque);

/*
 * An index of every metadata structure of an image by host cluster: what a
 * transaction must never allocate over, whatever the refcounts say.
 */
struct qcow2_meta_index;

/* Build the index of img's structures (and of the clusters its staged edits
 * replace, live until the commit). Loads every bitmap table. */
int qcow2_meta_index_build(struct qbm_image *img,
                           struct qcow2_meta_index **ret);
void qcow2_meta_index_free(struct qcow2_meta_index *mi);
/* The name of the structure host cluster `cluster` holds, or NULL. */
const char *qcow2_meta_index_find(const struct qcow2_meta_index *mi,
                                  uint64_t cluster);
/* Refuse (EUCLEAN) a refcount table with reserved bits set, or whose
 * blocks are misaligned, past the end of the file, or over another
 * structure of the index. */
int qcow2_meta_index_check_refcounts(const struct qcow2_meta_index *mi);

/* ==== layer chain ========================================================= */

/* ---- chain.c: backing chains --------------------------------------------- */

struct qbm_chain {
    struct qbm_image **layers; /* 0 = top */
    char **names;              /* resolved file names */
    size_t n;
};

int qbm_impl_chain_open(const char *filename, unsigned flags,
                        struct qbm_chain **ret_chain);
void qbm_impl_chain_close(struct qbm_chain *chain);
/* qbm_image_backing_path: *ret_path is a new string. */
int qbm_impl_image_backing_path(const struct qbm_image *img, char **ret_path);
int qbm_impl_chain_bitmap_extents(struct qbm_chain *chain, const char *name,
                                  qbm_extent_fn fn, void *opaque,
                                  int *ret_consistent);

/* ---- chain-check.c: checkpoint rules across layers ----------------------- */

/* The bit of enum qbm_chain_rule `r` in a qbm_chain_rules() result. */
#define QBM_CHAIN_BIT(r) (1u << (r))

/*
 * The rules for bitmap `name` over layers[0..n) (0 = top): rules[k] gets
 * the set of QBM_CHAIN_BIT(enum qbm_chain_rule) that layer k breaks, or 0.
 * Only the deepest copy (the origin) and the layers above it can break
 * one. A layer lacking the bitmap breaks exactly one: QBM_CHAIN_NOT_IN_TOP
 * when every layer above it lacks it too, QBM_CHAIN_GAP when it lies under
 * a layer that has it. A copy breaks QBM_CHAIN_DISABLED when it does not
 * record and QBM_CHAIN_IN_USE when it is in use, in any layer. Returns the
 * origin's index, or n when no layer has the bitmap.
 */
size_t qbm_chain_rules(struct qbm_image *const *layers, size_t n,
                       const char *name, unsigned *rules);

/* ---- chain-resolve.c: which layer provides each guest range
 * -------------------- */

/*
 * Resolve layers[0..n) (newest first) into one map: for every guest range
 * in [0, size), the extent of the newest layer that provides it. Ranges
 * no layer provides are absent (they read as zeros). Returns a sorted
 * array the caller frees.
 */
int qbm_resolve(struct qbm_image **layers, size_t n, uint64_t size,
                struct qcow2_map_extent **ret, size_t *ret_n);

/* ==== layer txn =========================================================== */

/* ---- txn-alloc.c: a transaction's refcounts and allocator ---------------- */

/*
 * A working copy of the refcount table and of the blocks it touches: what
 * the refcounts will be after the commit. Nothing is written before
 * qbm_alloc_write().
 */
struct qbm_alloc;

/* Copy img's refcount table and index its metadata (qcow2_meta_index_build),
 * refusing a broken refcount table (qcow2_meta_index_check_refcounts). */
int qbm_alloc_new(struct qbm_image *img, struct qbm_alloc **ret);
void qbm_alloc_free(struct qbm_alloc *a);
/* Allocate n contiguous free clusters (first fit; growing the refcount
 * table if needed); returns their host offset. */
int qbm_alloc_clusters(struct qbm_alloc *a, uint64_t n, uint64_t *ret_offset);
/* Allocate a run of up to n contiguous clusters (n itself unless n exceeds
 * half the clusters of a refcount block's range), first fit, where a hole
 * below the image end or the end itself takes it without leaving free
 * clusters behind; else one cluster. *ret_n says how many. */
int qbm_alloc_run(struct qbm_alloc *a, uint64_t n, uint64_t *ret_offset,
                  uint64_t *ret_n);
/* 0 when [off, off + len) lies in clusters allocated here, else -EFAULT. */
int qbm_alloc_check_owned(const struct qbm_alloc *a, uint64_t off, size_t len);
/* qbm_txn_share. */
int qbm_alloc_share(struct qbm_alloc *a, uint64_t off, bool *ret_shared);
/* Queue [off, off + len) to lose `refs` references per cluster when
 * qbm_alloc_apply_releases() runs. */
int qbm_alloc_release_later(struct qbm_alloc *a, uint64_t off, uint64_t len,
                            uint64_t refs);
/* The refcount of the cluster at `offset` in the working copy. */
int qbm_alloc_refcount(struct qbm_alloc *a, uint64_t offset, uint64_t *ret);
/* Write the changed sectors of the refcount blocks (no flush). */
int qbm_alloc_write(struct qbm_alloc *a);
/* Hook new blocks into the table, or a new table into the header; flush. */
int qbm_alloc_hook(struct qbm_alloc *a);
/* Apply the queued releases to the working copy. */
int qbm_alloc_apply_releases(struct qbm_alloc *a);

/* The space a transaction needs (bytes). */
struct qbm_space {
    uint64_t bytes;      /* new clusters it writes: data, tables, directory,
                          * refcount blocks, a grown refcount table */
    uint64_t end_before; /* the image end before it */
    uint64_t end_after;  /* the image end with them (before the replaced
                          * clusters are freed) */
};
/* What the allocations so far need. */
void qbm_alloc_space(struct qbm_alloc *a, struct qbm_space *ret);
/* Reserve the space of every new cluster in the file (qbm_io_reserve). */
int qbm_alloc_reserve(struct qbm_alloc *a);
/* Undo the refcount writes of a commit that failed before its switch:
 * unhook new refcount blocks (or the grown table), then write the old
 * bytes of the live blocks back; flush. */
int qbm_alloc_rollback(struct qbm_alloc *a);

/* ---- txn.c: crash-safe transactions -------------------------------------- */

/*
 * A transaction allocates clusters through the refcount structures, writes
 * new clusters, then commits by switching one pointer in cluster 0, and
 * only then frees what was replaced (docs/design.md, "Crash-safe
 * transactions"):
 *   1. new data/table/directory clusters written to free clusters
 *   2. refcount increments (and any new refblocks / grown reftable) written
 *   3. flush; new refblocks hooked into the reftable; flush
 *   4. the header's bitmaps extension switched; flush
 *   5. refcounts of replaced clusters decremented; flush
 * A crash at any point leaves the old or the new state plus leaked clusters.
 */
struct qbm_txn;

int qbm_txn_begin(struct qbm_image *img, struct qbm_txn **ret);
void qbm_txn_abort(struct qbm_txn *txn);
/* Allocate n contiguous free clusters; returns their host offset. */
int qbm_txn_alloc(struct qbm_txn *txn, uint64_t n, uint64_t *ret_offset);
/* Allocate the first run of up to n clusters (qbm_alloc_run): n clusters
 * in few runs, each placed first fit; *ret_n says how many it holds. */
int qbm_txn_alloc_run(struct qbm_txn *txn, uint64_t n, uint64_t *ret_offset,
                      uint64_t *ret_n);
/* Write into clusters allocated by this transaction. */
int qbm_txn_write(struct qbm_txn *txn, const void *buf, size_t len,
                  uint64_t off);
/* The same with the buffers of iov at consecutive offsets from off, in one
 * vectored write (a batch). */
int qbm_txn_writev(struct qbm_txn *txn, const struct iovec *iov, int iovcnt,
                   uint64_t off);
/*
 * Let the new state refer to the live cluster at `off` too: its refcount
 * goes up by one now, durable before the switch, and the old state's
 * reference is released after it as usual. *ret_shared is false when the
 * cluster cannot be shared (refcount 0 or at the width's maximum): the
 * caller copies it instead. Returns 0 or -errno.
 */
int qbm_txn_share(struct qbm_txn *txn, uint64_t off, bool *ret_shared);
/* Copy len bytes at src_off of src into clusters allocated by txn. */
int qbm_txn_copy(struct qbm_txn *txn, struct qbm_io *src, uint64_t src_off,
                 size_t len, uint64_t off);
/* Queue the clusters [off, off + len) to lose `refs` references each after
 * the commit (leak repair drops a whole excess in one step). */
int qbm_txn_release_later(struct qbm_txn *txn, uint64_t off, uint64_t len,
                          uint64_t refs);
/* Queue the clusters [off, off + len) to be freed after the commit; offset
 * 0 means "nothing" here (the header is never freed this way). */
int qbm_txn_free_later(struct qbm_txn *txn, uint64_t off, uint64_t len);
/*
 * Commit: write refcounts, then make the new bitmap directory live
 * (nb_bitmaps == 0 removes the extension and clears the autoclear bit),
 * then free. Consumes txn.
 */
int qbm_txn_commit(struct qbm_txn *txn, uint32_t nb_bitmaps,
                   uint64_t dir_offset, uint64_t dir_size);
/* nb_bitmaps value for a commit that only frees (leak repair). */
#define QBM_TXN_KEEP_HEADER UINT32_MAX
/*
 * Commit whose switch is one write of `len` bytes at `off` in cluster 0,
 * which must stay inside one 512-byte sector (so it cannot be torn).
 */
int qbm_txn_commit_write(struct qbm_txn *txn, const void *buf, size_t len,
                         uint64_t off);
/* Current refcount of a host cluster as the transaction sees it. */
int qbm_txn_refcount(struct qbm_txn *txn, uint64_t offset, uint64_t *ret);
/*
 * Once every cluster is allocated, before anything is written: check that
 * the header can be switched to nb_bitmaps (QBM_TXN_KEEP_HEADER: no
 * switch) and report what the transaction needs (*ret, may be NULL). Then,
 * unless `dry` (a plan, which checks the capacity itself with the figures
 * it returns), refuse as qbm_txn_check_capacity() does and reserve the
 * space in the file (fallocate; on failure the abort cuts the file back).
 */
int qbm_txn_prepare(struct qbm_txn *txn, uint32_t nb_bitmaps, bool dry,
                    struct qbm_space *ret);
/* ENOSPC ("not enough space on DEV: the edit needs N bytes past the image
 * end M; the device has S", figures from *sp) when the image end *sp gives
 * is past the capacity of img's block device; else 0. */
int qbm_txn_check_capacity(const struct qbm_image *img,
                           const struct qbm_space *sp);
/* What the allocations so far need, nothing checked. */
void qbm_txn_space(struct qbm_txn *txn, struct qbm_space *ret);

/* ==== layer edit ========================================================== */

/* ---- edit.c: staged bitmap edits and their commit ------------------------ */

/* The public edits of qbm.h, with -errno results. */
int qbm_impl_bitmap_add(struct qbm_image *img, const char *name,
                        uint64_t granularity, unsigned flags);
int qbm_impl_bitmap_remove(struct qbm_image *img, const char *name);
int qbm_impl_bitmap_clear(struct qbm_image *img, const char *name);
int qbm_impl_bitmap_enable(struct qbm_image *img, const char *name);
int qbm_impl_bitmap_disable(struct qbm_image *img, const char *name);
int qbm_impl_bitmap_rename(struct qbm_image *img, const char *old_name,
                           const char *new_name);
int qbm_impl_bitmap_merge(struct qbm_image *img, const char *target,
                          struct qbm_image *src, const char *src_name);
int qbm_impl_bitmap_set_dirty(struct qbm_image *img, const char *name,
                              uint64_t offset, uint64_t length);
int qbm_impl_bitmap_populate(struct qbm_image *img, const char *name,
                             struct qbm_image *layer);
int qbm_impl_bitmap_salvage(struct qbm_image *img, const char *name);
int qbm_impl_commit(struct qbm_image *img);
int qbm_impl_commit_plan(struct qbm_image *img, unsigned flags,
                         uint64_t *ret_bytes, uint64_t *ret_end);
/* qbm_commit_plan()'s checks and placement, all the figures (*ret), the
 * device's capacity not checked (qbm_txn_check_capacity() does). */
int qbm_impl_commit_space(struct qbm_image *img, struct qbm_space *ret);

/* ==== layer op ============================================================ */

/* ---- op-consolidate.c -------------------------------------------------------
 */

/* Fold `layers` (newest first) into the opened full `img`. */
int qbm_consolidate_images(struct qbm_image *img, struct qbm_image **layers,
                           size_t n, struct qbm_progress *progress);

/* ---- op-restore.c: the backups as restore reads them ----------------------
 */

/*
 * Open backup images[0..n) (the full, qcow2 or raw, then qcow2
 * incrementals, oldest first) under restore's rules: each readable, given
 * once, of one virtual size (*ret_size), read-locked or, with force_share,
 * without locks (-U). *ret_layers is newest first, as qbm_resolve() takes
 * them; free it with qbm_backups_close().
 */
int qbm_backups_open(const char *const *images, size_t n, bool force_share,
                     struct qbm_image ***ret_layers, uint64_t *ret_size);
/* Close the n layers and free the array; NULL is fine. */
void qbm_backups_close(struct qbm_image **layers, size_t n);
/* Read [g, g + len) of map extent e (of layers[e->layer]) into buf, as
 * copy_piece() copies it: data (from the layer's external data file when
 * it has one: qbm_image_data_io()), decompressed data, or zeros. */
int qbm_map_read(struct qbm_image **layers, const struct qcow2_map_extent *e,
                 uint64_t g, size_t len, void *buf);
/* Ask the kernel to read [g, g + len) of e ahead (data extents only). */
void qbm_map_prefetch(struct qbm_image **layers,
                      const struct qcow2_map_extent *e, uint64_t g,
                      uint64_t len);

/* ---- op-rebuild.c: a disk against its backups ----------------------------
 */

/*
 * Stage in disk[0] (opened for writing; disk[0..nd) its backing chain)
 * bitmap `name`, enabled, replacing one of that name, with exactly the
 * granules set where the disk's content differs from what the backups
 * bk[0..nb) (newest first, as qbm_backups_open gives them) restore to.
 * granularity 0: the replaced bitmap's, else qbm_bitmap_add's default.
 * *ret_dirty: the bytes set. Nothing is written: the caller commits.
 */
int qbm_rebuild_stage(struct qbm_image **disk, size_t nd, struct qbm_image **bk,
                      size_t nb, const char *name, uint64_t granularity,
                      struct qbm_progress *progress, uint64_t *ret_dirty);

#endif /* QBM_INTERNAL_H */
