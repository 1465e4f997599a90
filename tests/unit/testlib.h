/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * The unit tests' own library, linked into every cmocka program: images
 * made by qbm's fresh-image writer (in memory or as files in a temporary
 * directory), small edits on them, and recorders for the library's
 * callbacks. Every helper fails the running test (cmocka) when something
 * it does fails, so a test reads as the steps it takes.
 */
#ifndef QBM_TESTLIB_H
#define QBM_TESTLIB_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "internal.h"

/* ---- images as bytes --------------------------------------------------- */

/*
 * A fresh image of `size` bytes with 4 KiB clusters, backed by BACKING
 * (a qcow2 file; may be NULL), with `data_clusters` allocated data
 * clusters from guest cluster 16 (64 KiB) on. Returns its bytes (the
 * caller frees them) and their number in *ret_len.
 */
uint8_t *tl_image_bytes(uint64_t size, const char *backing,
                        uint64_t data_clusters, size_t *ret_len);

/*
 * The image BUF (LEN bytes) with bitmap `bitmap` added (enabled, of
 * `granularity`; 0 is the default), bytes [0, dirty) of it set, and
 * committed: a new buffer (the caller frees it), its length in *ret_len.
 */
uint8_t *tl_mem_with_bitmap(const uint8_t *buf, size_t len, const char *bitmap,
                            uint64_t granularity, uint64_t dirty,
                            size_t *ret_len);

/* A copy of the bytes of `img`, an image opened in memory (the caller
 * frees it), their number in *ret_len. */
uint8_t *tl_mem_copy(struct qbm_image *img, size_t *ret_len);

/* The memory image `img` holds exactly the `len` bytes `want`. */
void tl_assert_mem_holds(struct qbm_image *img, const void *want, size_t len);

/* ---- counting the calls made to a file ---------------------------------- */

/*
 * A memory file that counts what goes through it: each read and each
 * write, vectored or not, is one call (a vectored one is one batch), and
 * `read_bytes` and `write_bytes` sum the bytes read and written. Flushes
 * are counted too; size and truncate pass through.
 */
struct tl_count_io {
    struct qbm_io io;
    struct qbm_io *inner;
    uint64_t reads, writes, flushes;
    uint64_t read_bytes, write_bytes;
};

/*
 * The image BUF (LEN bytes, copied) opened through a counting memory
 * file, read-write when `writable`; the file in *ret_io counts from
 * the open on (the open's own reads included), is the image's and is
 * freed with it.
 */
struct qbm_image *tl_open_counted(const uint8_t *buf, size_t len,
                                  bool writable, struct tl_count_io **ret_io);

/* ---- images as files in a temporary directory ------------------------- */

/* A cmocka group setup and teardown: make the directory; remove it and
 * every file in it. */
int tl_dir_setup(void **state);
int tl_dir_teardown(void **state);
/* Remove every file of the directory (also a cmocka test teardown). */
int tl_dir_clean(void **state);

/* NAME in the directory; the result lives until four more calls. */
char *tl_path(const char *name);

/* Write NAME: tl_image_bytes() as a file. */
void tl_write_image(const char *name, uint64_t size, const char *backing,
                    uint64_t data_clusters);

/* No dirty byte, for tl_add_bitmap(). */
#define TL_CLEAN UINT64_MAX

/*
 * Add bitmap `bitmap` to image file NAME in one commit: of `granularity`,
 * enabled or disabled, with the byte at `dirty` set unless it is TL_CLEAN.
 */
void tl_add_bitmap(const char *name, const char *bitmap, uint64_t granularity,
                   bool enabled, uint64_t dirty);

/* Add to image file NAME, in one commit, the bitmaps of the
 * NULL-terminated list: "b" enabled, "-b" disabled (64 KiB granularity). */
void tl_add_bitmaps(const char *name, const char *const *bitmaps);

/* Set the in_use flag of bitmap `bitmap` in image file NAME, as a QEMU
 * that did not close the image leaves it: the flags of its directory
 * entry written in place (qcow2 spec, "Bitmap directory": at byte 12). */
void tl_set_in_use(const char *name, const char *bitmap);

/* The whole file NAME (the caller frees it), its length in *ret_len. */
char *tl_contents(const char *name, size_t *ret_len);
/* File NAME holds exactly the `len` bytes `before`. */
void tl_assert_unchanged(const char *name, const char *before, size_t len);

/* ---- describing what an image holds ------------------------------------ */

/* Append to the string `buf` of `size` bytes, truncating. */
void tl_appendf(char *buf, size_t size, const char *fmt, ...) QBM_PRINTF(3, 4);

/* The extents of bitmap `bitmap` of `img` as "off+len,..." ("" when it
 * is clean), or "absent". */
void tl_extents(struct qbm_image *img, const char *bitmap, char *out,
                size_t len);

/* Bitmap `bitmap` of `img` as "flags granularity extents", or
 * "absent". */
void tl_describe(struct qbm_image *img, const char *bitmap, char *out,
                 size_t len);

/* tl_describe() of bitmap `bitmap` of `img` is `want`. */
void tl_assert_described(struct qbm_image *img, const char *bitmap,
                         const char *want);

/* ---- recording callbacks ----------------------------------------------- */

/* What a qbm_carry_fn or qbm_carry_snapshot_fn reported, one line per
 * call: "action bitmap file" (bitmap "-" when NULL, the file's last path
 * component). */
struct tl_events {
    char line[10][300];
    size_t n;
    int stop; /* returned from every call when non-zero */
};

int tl_record_action(void *opaque, int action, const char *bitmap,
                     const char *file);

/* `ev` holds exactly the lines given, in order (the list ends with
 * NULL). */
void tl_assert_events(const struct tl_events *ev, ...);

#endif
