/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* The unit tests' own library (testlib.h). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <dirent.h>
#include <unistd.h>

#include <cmocka.h>

#include "testlib.h"

uint8_t *tl_image_bytes(uint64_t size, const char *backing,
                        uint64_t data_clusters, size_t *ret_len)
{
    struct qcow2_out_run run = { 16, data_clusters, true };
    struct qbm_io *io;
    struct qcow2_writer *w;
    const uint8_t *b;
    uint8_t *copy;

    assert_int_equal(qbm_io_mem_open(NULL, 0, &io), 0);
    assert_int_equal(qcow2_writer_plan(io, size, 12, backing,
                                       backing ? "qcow2" : NULL,
                                       data_clusters ? &run : NULL,
                                       data_clusters ? 1 : 0, &w),
                     0);
    assert_int_equal(qcow2_writer_finish(w), 0);
    qcow2_writer_free(w);
    b = qbm_io_mem_data(io, ret_len);
    copy = malloc(*ret_len);
    assert_non_null(copy);
    memcpy(copy, b, *ret_len);
    qbm_io_close(io);
    return copy;
}

uint8_t *tl_mem_copy(struct qbm_image *img, size_t *ret_len)
{
    const uint8_t *b = qbm_io_mem_data(img->io, ret_len);
    uint8_t *copy = malloc(*ret_len);

    assert_non_null(copy);
    memcpy(copy, b, *ret_len);
    return copy;
}

uint8_t *tl_mem_with_bitmap(const uint8_t *buf, size_t len, const char *bitmap,
                            uint64_t granularity, uint64_t dirty,
                            size_t *ret_len)
{
    struct qbm_image *img = qbm_open_memory(buf, len, "mem", QBM_OPEN_RDWR);
    uint8_t *copy;

    assert_non_null(img);
    assert_int_equal(qbm_bitmap_add(img, bitmap, granularity, 0), 0);
    assert_int_equal(qbm_bitmap_set_dirty(img, bitmap, 0, dirty), 0);
    assert_int_equal(qbm_commit(img), 0);
    copy = tl_mem_copy(img, ret_len);
    qbm_close(img);
    return copy;
}

void tl_assert_mem_holds(struct qbm_image *img, const void *want, size_t len)
{
    size_t now_len;
    const uint8_t *now = qbm_io_mem_data(img->io, &now_len);

    assert_int_equal(now_len, len);
    assert_memory_equal(now, want, len);
}

static struct tl_count_io *counted(struct qbm_io *io)
{
    return (struct tl_count_io *)io;
}

static int count_pread(struct qbm_io *io, void *buf, size_t len, uint64_t off)
{
    counted(io)->reads++;
    counted(io)->read_bytes += len;
    return qbm_io_pread(counted(io)->inner, buf, len, off);
}

static int count_pwrite(struct qbm_io *io, const void *buf, size_t len,
                        uint64_t off)
{
    counted(io)->writes++;
    counted(io)->write_bytes += len;
    return qbm_io_pwrite(counted(io)->inner, buf, len, off);
}

static uint64_t iov_bytes(const struct iovec *iov, int n)
{
    uint64_t sum = 0;
    int i;

    for (i = 0; i < n; i++) {
        sum += iov[i].iov_len;
    }
    return sum;
}

static int count_preadv(struct qbm_io *io, const struct iovec *iov, int n,
                        uint64_t off)
{
    counted(io)->reads++;
    counted(io)->read_bytes += iov_bytes(iov, n);
    return qbm_io_preadv(counted(io)->inner, iov, n, off);
}

static int count_pwritev(struct qbm_io *io, const struct iovec *iov, int n,
                         uint64_t off)
{
    counted(io)->writes++;
    counted(io)->write_bytes += iov_bytes(iov, n);
    return qbm_io_pwritev(counted(io)->inner, iov, n, off);
}

static int count_flush(struct qbm_io *io)
{
    counted(io)->flushes++;
    return qbm_io_flush(counted(io)->inner);
}

static int count_size(struct qbm_io *io, uint64_t *ret_size)
{
    return qbm_io_size(counted(io)->inner, ret_size);
}

static int count_truncate(struct qbm_io *io, uint64_t size)
{
    return qbm_io_truncate(counted(io)->inner, size);
}

static void count_close(struct qbm_io *io)
{
    qbm_io_close(counted(io)->inner);
    free(io);
}

static const struct qbm_io_ops count_ops = {
    .pread = count_pread,
    .pwrite = count_pwrite,
    .preadv = count_preadv,
    .pwritev = count_pwritev,
    .flush = count_flush,
    .size = count_size,
    .truncate = count_truncate,
    .close = count_close,
};

struct qbm_image *tl_open_counted(const uint8_t *buf, size_t len,
                                  bool writable, struct tl_count_io **ret_io)
{
    struct tl_count_io *c = calloc(1, sizeof(*c));
    struct qbm_image *img;

    assert_non_null(c);
    c->io.ops = &count_ops;
    assert_int_equal(qbm_io_mem_open(buf, len, &c->inner), 0);
    assert_int_equal(qbm_image_open_io(&c->io, "mem", writable, &img), 0);
    *ret_io = c;
    return img;
}

static char dir[] = "/tmp/qbm-unit-XXXXXX";

int tl_dir_setup(void **state)
{
    assert_non_null(mkdtemp(dir));
    return 0;
}

int tl_dir_clean(void **state)
{
    DIR *d = opendir(dir);
    struct dirent *e;

    assert_non_null(d);
    while ((e = readdir(d))) {
        if (strcmp(e->d_name, ".") && strcmp(e->d_name, "..")) {
            unlink(tl_path(e->d_name));
        }
    }
    closedir(d);
    return 0;
}

int tl_dir_teardown(void **state)
{
    tl_dir_clean(state);
    rmdir(dir);
    return 0;
}

char *tl_path(const char *name)
{
    static char buf[4][256];
    static unsigned next;
    char *p = buf[next++ % 4];

    snprintf(p, sizeof(buf[0]), "%s/%s", dir, name);
    return p;
}

void tl_write_image(const char *name, uint64_t size, const char *backing,
                    uint64_t data_clusters)
{
    size_t len;
    uint8_t *b = tl_image_bytes(size, backing, data_clusters, &len);
    FILE *f = fopen(tl_path(name), "wb");

    assert_non_null(f);
    assert_int_equal(fwrite(b, 1, len, f), len);
    assert_int_equal(fclose(f), 0);
    free(b);
}

void tl_add_bitmap(const char *name, const char *bitmap, uint64_t granularity,
                   bool enabled, uint64_t dirty)
{
    struct qbm_image *img = qbm_open(tl_path(name), QBM_OPEN_RDWR);

    assert_non_null(img);
    assert_int_equal(qbm_bitmap_add(img, bitmap, granularity,
                                    enabled ? 0 : QBM_ADD_DISABLED),
                     0);
    if (dirty != TL_CLEAN) {
        assert_int_equal(qbm_bitmap_set_dirty(img, bitmap, dirty, 1), 0);
    }
    assert_int_equal(qbm_commit(img), 0);
    qbm_close(img);
}

void tl_add_bitmaps(const char *name, const char *const *bitmaps)
{
    struct qbm_image *img = qbm_open(tl_path(name), QBM_OPEN_RDWR);

    assert_non_null(img);
    for (; *bitmaps; bitmaps++) {
        bool off = **bitmaps == '-';

        assert_int_equal(qbm_bitmap_add(img, *bitmaps + off, 65536,
                                        off ? QBM_ADD_DISABLED : 0),
                         0);
    }
    assert_int_equal(qbm_commit(img), 0);
    qbm_close(img);
}

void tl_set_in_use(const char *name, const char *bitmap)
{
    struct qbm_image *img = qbm_open(tl_path(name), 0);
    const struct qcow2_bitmap *bm;
    uint8_t be[4];
    FILE *f;

    assert_non_null(img);
    bm = qcow2_bitmap_lookup(img, bitmap);
    assert_non_null(bm);
    be32_store(be, bm->flags | BME_FLAG_IN_USE);
    f = fopen(tl_path(name), "r+b");
    assert_non_null(f);
    assert_int_equal(fseek(f, (long)bm->entry_offset + 12, SEEK_SET), 0);
    assert_int_equal(fwrite(be, 1, 4, f), 4);
    assert_int_equal(fclose(f), 0);
    qbm_close(img);
}

char *tl_contents(const char *name, size_t *ret_len)
{
    FILE *f = fopen(tl_path(name), "rb");
    char *p;
    long len;

    assert_non_null(f);
    assert_int_equal(fseek(f, 0, SEEK_END), 0);
    len = ftell(f);
    assert_true(len > 0);
    rewind(f);
    p = malloc((size_t)len);
    assert_non_null(p);
    assert_int_equal(fread(p, 1, (size_t)len, f), (size_t)len);
    fclose(f);
    *ret_len = (size_t)len;
    return p;
}

void tl_assert_unchanged(const char *name, const char *before, size_t len)
{
    size_t now_len;
    char *now = tl_contents(name, &now_len);

    assert_int_equal(now_len, len);
    assert_memory_equal(now, before, len);
    free(now);
}

void tl_appendf(char *buf, size_t size, const char *fmt, ...)
{
    size_t used = strlen(buf);
    va_list ap;

    va_start(ap, fmt);
    vsnprintf(buf + used, size - used, fmt, ap);
    va_end(ap);
}

struct text {
    char *p;
    size_t len;
};

static int put_extent(void *opaque, uint64_t off, uint64_t len)
{
    struct text *t = opaque;

    tl_appendf(t->p, t->len, "%llu+%llu,", (unsigned long long)off,
               (unsigned long long)len);
    return 0;
}

void tl_extents(struct qbm_image *img, const char *bitmap, char *out,
                size_t len)
{
    struct text t = { out, len };
    int idx = qbm_bitmap_find(img, bitmap);

    if (idx < 0) {
        snprintf(out, len, "absent");
        return;
    }
    out[0] = '\0';
    assert_int_equal(qbm_bitmap_extents(img, (size_t)idx, put_extent, &t), 0);
}

void tl_describe(struct qbm_image *img, const char *bitmap, char *out,
                 size_t len)
{
    char ext[200];
    int idx = qbm_bitmap_find(img, bitmap);

    if (idx < 0) {
        snprintf(out, len, "absent");
        return;
    }
    tl_extents(img, bitmap, ext, sizeof(ext));
    snprintf(out, len, "%u %llu %s", qbm_bitmap_flags(img, (size_t)idx),
             (unsigned long long)qbm_bitmap_granularity(img, (size_t)idx), ext);
}

void tl_assert_described(struct qbm_image *img, const char *bitmap,
                         const char *want)
{
    char got[300];

    tl_describe(img, bitmap, got, sizeof(got));
    assert_string_equal(got, want);
}

int tl_record_action(void *opaque, int action, const char *bitmap,
                     const char *file)
{
    struct tl_events *ev = opaque;
    const char *slash = strrchr(file, '/');

    assert_true(ev->n < QBM_ARRAY_SIZE(ev->line));
    snprintf(ev->line[ev->n++], sizeof(ev->line[0]), "%d %s %s", action,
             bitmap ? bitmap : "-", slash ? slash + 1 : file);
    return ev->stop;
}

void tl_assert_events(const struct tl_events *ev, ...)
{
    const char *want[QBM_ARRAY_SIZE(ev->line)];
    size_t n = 0, i;
    va_list ap;

    va_start(ap, ev);
    while (n < QBM_ARRAY_SIZE(want) && (want[n] = va_arg(ap, const char *))) {
        n++;
    }
    va_end(ap);
    assert_int_equal(ev->n, n);
    for (i = 0; i < n; i++) {
        assert_string_equal(ev->line[i], want[i]);
    }
}
