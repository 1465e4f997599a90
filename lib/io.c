/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * I/O backends behind struct qbm_io_ops: a POSIX file with QEMU-compatible
 * locks, and a growable memory buffer (tests, fuzzing).
 */
#include <fcntl.h>
#include <limits.h>
#include <linux/fs.h>
#include <stdlib.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <unistd.h>

#include "internal.h"

int qbm_io_past_capacity(struct qbm_io *io, size_t len, uint64_t off)
{
    return qbm_err(ENOSPC,
                   "write of %zu bytes at 0x%llx: past the end of the "
                   "device (%llu bytes)",
                   len, (unsigned long long)off,
                   (unsigned long long)io->capacity);
}

void qbm_io_close(struct qbm_io *io)
{
    if (io) {
        io->ops->close(io);
    }
}

int qbm_io_read_meta(struct qbm_io *io, void *buf, size_t len, uint64_t off,
                     const char *what)
{
    uint64_t end;
    int r;

    if (!add_ok(off, len, &end) || end > QCOW2_MAX_HOST_OFFSET) {
        return qbm_err(EINVAL,
                       "%s at 0x%llx: beyond the largest possible "
                       "image",
                       what, (unsigned long long)off);
    }
    r = qbm_io_pread(io, buf, len, off);
    if (r < 0) {
        return qbm_err_prefix(r, "%s at 0x%llx", what, (unsigned long long)off);
    }
    return 0;
}

static size_t iov_bytes(const struct iovec *iov, int iovcnt)
{
    size_t n = 0;
    int i;

    for (i = 0; i < iovcnt; i++) {
        n += iov[i].iov_len;
    }
    return n;
}

int qbm_io_preadv(struct qbm_io *io, const struct iovec *iov, int iovcnt,
                  uint64_t off)
{
    int i, r = 0;

    if (io->ops->preadv) {
        return io->ops->preadv(io, iov, iovcnt, off);
    }
    for (i = 0; i < iovcnt && r == 0; i++) {
        r = qbm_io_pread(io, iov[i].iov_base, iov[i].iov_len, off);
        off += iov[i].iov_len;
    }
    return r;
}

int qbm_io_pwritev(struct qbm_io *io, const struct iovec *iov, int iovcnt,
                   uint64_t off)
{
    size_t len = iov_bytes(iov, iovcnt);
    int i, r = 0;

    if (io->capacity && (off > io->capacity || len > io->capacity - off)) {
        return qbm_io_past_capacity(io, len, off);
    }
    if (io->ops->pwritev) {
        return io->ops->pwritev(io, iov, iovcnt, off);
    }
    for (i = 0; i < iovcnt && r == 0; i++) {
        r = qbm_io_pwrite(io, iov[i].iov_base, iov[i].iov_len, off);
        off += iov[i].iov_len;
    }
    return r;
}

int qbm_io_read_pieces(struct qbm_io *io, const uint64_t *offs,
                       uint8_t *const *bufs, size_t n, size_t len)
{
    struct iovec iov[IOV_MAX];
    uint64_t start = 0, end = 0;
    size_t k;
    int cnt = 0, r = 0;

    for (k = 0; k < n && r == 0; k++) {
        if (cnt && end == offs[k] &&
            (uint8_t *)iov[cnt - 1].iov_base + iov[cnt - 1].iov_len ==
                bufs[k]) {
            /* Adjacent in the file and in memory: one buffer. */
            iov[cnt - 1].iov_len += len;
        } else {
            if (cnt && (end != offs[k] || cnt == IOV_MAX)) {
                r = qbm_io_preadv(io, iov, cnt, start);
                cnt = 0;
            }
            if (!cnt) {
                start = offs[k];
            }
            iov[cnt].iov_base = bufs[k];
            iov[cnt].iov_len = len;
            cnt++;
        }
        end = offs[k] + len;
    }
    return r == 0 && cnt ? qbm_io_preadv(io, iov, cnt, start) : r;
}

static int copy_buffered(struct qbm_io *src, uint64_t src_off,
                         struct qbm_io *dst, uint64_t dst_off, size_t len)
{
    size_t chunk = len < (1u << 20) ? len : (1u << 20);
    uint8_t *buf = qbm_malloc(chunk ? chunk : 1);
    int r = 0;

    if (!buf) {
        return -ENOMEM;
    }
    while (len > 0 && r == 0) {
        size_t n = len < chunk ? len : chunk;

        r = qbm_io_pread(src, buf, n, src_off);
        r = r ? r : qbm_io_pwrite(dst, buf, n, dst_off);
        src_off += n;
        dst_off += n;
        len -= n;
    }
    free(buf);
    return r;
}

int qbm_io_copy(struct qbm_io *src, uint64_t src_off, struct qbm_io *dst,
                uint64_t dst_off, size_t len)
{
    int sfd = qbm_io_fd(src), dfd = qbm_io_fd(dst);

    while (sfd >= 0 && dfd >= 0 && len > 0) {
        loff_t in = (loff_t)src_off, out = (loff_t)dst_off;
        ssize_t n = copy_file_range(sfd, &in, dfd, &out, len, 0);

        if (n < 0 && errno == EINTR) {
            continue;
        }
        if (n <= 0) {
            /* Not supported between these files, or the source ends
             * early (past its end it reads as zeros): the rest goes
             * through memory. */
            break;
        }
        src_off += (uint64_t)n;
        dst_off += (uint64_t)n;
        len -= (size_t)n;
    }
    return len ? copy_buffered(src, src_off, dst, dst_off, len) : 0;
}

/* ---- file backend ----------------------------------------------------- */

struct file_io {
    struct qbm_io io;
    int fd;
    bool device; /* a block device: io.capacity is its size */
};

static const struct qbm_io_ops file_ops;

int qbm_io_fd(struct qbm_io *io)
{
    return io && io->ops == &file_ops ? ((struct file_io *)io)->fd : -1;
}

static int file_pread(struct qbm_io *io, void *buf, size_t len, uint64_t off)
{
    struct file_io *f = (struct file_io *)io;
    uint8_t *p = buf;

    while (len > 0) {
        ssize_t n = pread(f->fd, p, len, (off_t)off);

        if (n < 0) {
            if (errno == EINTR) {
                continue;
            }
            return qbm_err(errno, "read of %zu bytes at 0x%llx failed: %s", len,
                           (unsigned long long)off, strerror(errno));
        }
        if (n == 0) {
            /* Past the end of the file: qcow2 treats it as zeros. */
            memset(p, 0, len);
            return 0;
        }
        p += n;
        len -= (size_t)n;
        off += (uint64_t)n;
    }
    return 0;
}

static int file_pwrite(struct qbm_io *io, const void *buf, size_t len,
                       uint64_t off)
{
    struct file_io *f = (struct file_io *)io;
    const uint8_t *p = buf;

    while (len > 0) {
        ssize_t n = pwrite(f->fd, p, len, (off_t)off);

        if (n < 0) {
            if (errno == EINTR) {
                continue;
            }
            return qbm_err(errno, "write of %zu bytes at 0x%llx failed: %s",
                           len, (unsigned long long)off, strerror(errno));
        }
        p += n;
        len -= (size_t)n;
        off += (uint64_t)n;
    }
    return 0;
}

/*
 * preadv/pwritev over any number of buffers: batches of IOV_MAX, resumed
 * after a short transfer. A read that meets the end of the file zeroes
 * what is left, as file_pread does.
 */
static int file_rwv(struct qbm_io *io, const struct iovec *iov, int iovcnt,
                    uint64_t off, bool write)
{
    struct file_io *f = (struct file_io *)io;
    struct iovec cur[IOV_MAX];

    while (iovcnt > 0) {
        int n = iovcnt < IOV_MAX ? iovcnt : IOV_MAX, i = 0;

        memcpy(cur, iov, (size_t)n * sizeof(*cur));
        while (i < n) {
            ssize_t got = write ? pwritev(f->fd, cur + i, n - i, (off_t)off)
                                : preadv(f->fd, cur + i, n - i, (off_t)off);

            if (got < 0 && errno == EINTR) {
                continue;
            }
            if (got < 0 || (got == 0 && write)) {
                int e = got < 0 ? errno : EIO;

                return qbm_err(e, "%s of %zu bytes at 0x%llx failed: %s",
                               write ? "write" : "read",
                               iov_bytes(cur + i, n - i),
                               (unsigned long long)off, strerror(e));
            }
            if (got == 0) {
                /* Past the end of the file: qcow2 treats it as zeros. */
                for (; i < n; i++) {
                    memset(cur[i].iov_base, 0, cur[i].iov_len);
                }
                break;
            }
            off += (uint64_t)got;
            while (i < n && (size_t)got >= cur[i].iov_len) {
                got -= (ssize_t)cur[i].iov_len;
                i++;
            }
            if (got > 0) {
                cur[i].iov_base = (uint8_t *)cur[i].iov_base + got;
                cur[i].iov_len -= (size_t)got;
            }
        }
        iov += n;
        iovcnt -= n;
    }
    return 0;
}

static int file_preadv(struct qbm_io *io, const struct iovec *iov, int iovcnt,
                       uint64_t off)
{
    return file_rwv(io, iov, iovcnt, off, false);
}

static int file_pwritev(struct qbm_io *io, const struct iovec *iov, int iovcnt,
                        uint64_t off)
{
    return file_rwv(io, iov, iovcnt, off, true);
}

static int file_flush(struct qbm_io *io)
{
    struct file_io *f = (struct file_io *)io;

    if (fdatasync(f->fd) < 0) {
        return qbm_err(errno, "flush failed: %s", strerror(errno));
    }
    return 0;
}

static int file_size(struct qbm_io *io, uint64_t *ret_size)
{
    struct file_io *f = (struct file_io *)io;
    struct stat st;

    if (f->device) {
        /* A device is as large as it is: st_size would be 0. */
        *ret_size = io->capacity;
        return 0;
    }
    if (fstat(f->fd, &st) < 0) {
        return qbm_err(errno, "stat failed: %s", strerror(errno));
    }
    *ret_size = (uint64_t)st.st_size;
    return 0;
}

static int file_truncate(struct qbm_io *io, uint64_t size)
{
    struct file_io *f = (struct file_io *)io;

    if (f->device) {
        return 0; /* a device keeps its size */
    }
    if (ftruncate(f->fd, (off_t)size) < 0) {
        return qbm_err(errno, "cannot truncate to %llu bytes: %s",
                       (unsigned long long)size, strerror(errno));
    }
    return 0;
}

static int file_reserve(struct qbm_io *io, uint64_t off, uint64_t len)
{
    struct file_io *f = (struct file_io *)io;
    int r;

    if (f->device || len == 0) {
        return 0; /* the capacity was checked by the caller */
    }
    /* Blocks for the holes and the growth, so that the writes that follow
     * cannot meet ENOSPC (file systems without fallocate: they may). */
    do {
        r = fallocate(f->fd, 0, (off_t)off, (off_t)len) < 0 ? errno : 0;
    } while (r == EINTR);
    if (r == EOPNOTSUPP || r == ENOSYS) {
        return 0;
    }
    if (r) {
        return qbm_err(r, "cannot reserve %llu bytes at 0x%llx: %s",
                       (unsigned long long)len, (unsigned long long)off,
                       strerror(r));
    }
    return 0;
}

static void file_close(struct qbm_io *io)
{
    struct file_io *f = (struct file_io *)io;

    /* Closing the only descriptor of the open file description releases
     * its OFD locks. */
    close(f->fd);
    free(f);
}

static const struct qbm_io_ops file_ops = {
    .pread = file_pread,
    .pwrite = file_pwrite,
    .flush = file_flush,
    .size = file_size,
    .truncate = file_truncate,
    .reserve = file_reserve,
    .preadv = file_preadv,
    .pwritev = file_pwritev,
    .close = file_close,
};

/*
 * QEMU's image locking (block/file-posix.c; docs/design.md, "Locking"):
 * permission i is "held" via a shared lock on byte 100 + i and "not shared"
 * via a shared lock on byte 200 + i. Conflicts are found by testing with a
 * write lock, which OFD locks of our own description never block.
 */
#define LOCK_PERM_BASE 100
#define LOCK_SHARED_BASE 200
#define PERM_CONSISTENT_READ 0
#define PERM_WRITE 1
#define PERM_WRITE_UNCHANGED 2
#define PERM_RESIZE 3

static int lock_byte(int fd, int byte)
{
    struct flock fl = {
        .l_type = F_RDLCK,
        .l_whence = SEEK_SET,
        .l_start = byte,
        .l_len = 1,
    };

    if (fcntl(fd, F_OFD_SETLK, &fl) < 0) {
        return -errno;
    }
    return 0;
}

/* Returns 1 when another open file description holds `byte`. */
static int byte_taken(int fd, int byte)
{
    struct flock fl = {
        .l_type = F_WRLCK,
        .l_whence = SEEK_SET,
        .l_start = byte,
        .l_len = 1,
    };

    if (fcntl(fd, F_OFD_GETLK, &fl) < 0) {
        return -errno;
    }
    return fl.l_type != F_UNLCK;
}

static const char *perm_name(int perm)
{
    switch (perm) {
    case PERM_CONSISTENT_READ:
        return "consistent read";
    case PERM_WRITE:
        return "write";
    case PERM_WRITE_UNCHANGED:
        return "write unchanged";
    default:
        return "resize";
    }
}

static int apply_locks(int fd, enum qbm_lock_mode mode)
{
    /* held: permissions we use; unshared: permissions we forbid others. */
    static const int read_held[] = { PERM_CONSISTENT_READ };
    static const int read_unshared[] = { PERM_WRITE, PERM_RESIZE };
    static const int write_held[] = { PERM_CONSISTENT_READ, PERM_WRITE,
                                      PERM_RESIZE };
    static const int write_unshared[] = { PERM_WRITE, PERM_RESIZE };
    const int *held, *unshared;
    size_t nheld, nunshared, i;
    int r;

    if (mode == QBM_LOCK_NONE) {
        return 0;
    }
    if (mode == QBM_LOCK_READ) {
        held = read_held;
        nheld = QBM_ARRAY_SIZE(read_held);
        unshared = read_unshared;
        nunshared = QBM_ARRAY_SIZE(read_unshared);
    } else {
        held = write_held;
        nheld = QBM_ARRAY_SIZE(write_held);
        unshared = write_unshared;
        nunshared = QBM_ARRAY_SIZE(write_unshared);
    }
    for (i = 0; i < nheld; i++) {
        r = lock_byte(fd, LOCK_PERM_BASE + held[i]);
        if (r < 0) {
            return qbm_err(-r, "cannot lock the image: %s", strerror(-r));
        }
    }
    for (i = 0; i < nunshared; i++) {
        r = lock_byte(fd, LOCK_SHARED_BASE + unshared[i]);
        if (r < 0) {
            return qbm_err(-r, "cannot lock the image: %s", strerror(-r));
        }
    }
    /* Someone who forbids a permission we hold? */
    for (i = 0; i < nheld; i++) {
        r = byte_taken(fd, LOCK_SHARED_BASE + held[i]);
        if (r < 0) {
            return qbm_err(-r, "cannot test image locks: %s", strerror(-r));
        }
        if (r) {
            return qbm_err(EBUSY,
                           "failed to get shared \"%s\" lock: another "
                           "process (QEMU?) is using the image",
                           perm_name(held[i]));
        }
    }
    /* Someone who holds a permission we forbid? */
    for (i = 0; i < nunshared; i++) {
        r = byte_taken(fd, LOCK_PERM_BASE + unshared[i]);
        if (r < 0) {
            return qbm_err(-r, "cannot test image locks: %s", strerror(-r));
        }
        if (r) {
            return qbm_err(EBUSY,
                           "failed to get \"%s\" lock: another process "
                           "(QEMU?) has the image open for %s; use -U to "
                           "read it anyway",
                           perm_name(unshared[i]),
                           unshared[i] == PERM_WRITE ? "writing" : "resizing");
        }
    }
    return 0;
}

/* A file io on fd (owned by it once this succeeds); a block device's
 * size comes from the device, as the size of what it can hold. */
static int file_io_new(int fd, const struct stat *st, struct qbm_io **ret_io)
{
    struct file_io *f;
    uint64_t dev_size = 0;

    if (S_ISBLK(st->st_mode) && ioctl(fd, BLKGETSIZE64, &dev_size) < 0) {
        return qbm_err(errno, "cannot get the size of the device: %s",
                       strerror(errno));
    }
    f = qbm_calloc(1, sizeof(*f));
    if (!f) {
        return -ENOMEM;
    }
    f->io.ops = &file_ops;
    f->fd = fd;
    if (S_ISBLK(st->st_mode)) {
        f->device = true;
        f->io.capacity = dev_size;
    }
    *ret_io = &f->io;
    return 0;
}

int qbm_io_file_adopt(int fd, struct qbm_io **ret_io)
{
    struct stat st;

    if (fstat(fd, &st) < 0) {
        return qbm_err(errno, "cannot stat: %s", strerror(errno));
    }
    return file_io_new(fd, &st, ret_io);
}

int qbm_io_file_lock(struct qbm_io *io, enum qbm_lock_mode lock)
{
    int fd = qbm_io_fd(io);

    return fd < 0 ? -EOPNOTSUPP : apply_locks(fd, lock);
}

int qbm_io_dup(struct qbm_io *io, struct qbm_io **ret_io)
{
    int fd = qbm_io_fd(io), r;

    if (fd < 0) {
        return -EOPNOTSUPP;
    }
    /* A duplicate shares the open file description, and with it the OFD
     * locks: they stay as long as either descriptor is open. */
    fd = fcntl(fd, F_DUPFD_CLOEXEC, 0);
    if (fd < 0) {
        return qbm_err(errno, "cannot duplicate a descriptor: %s",
                       strerror(errno));
    }
    r = qbm_io_file_adopt(fd, ret_io);
    if (r < 0) {
        close(fd);
    }
    return r;
}

int qbm_io_file_open(const char *filename, bool rdwr, enum qbm_lock_mode lock,
                     struct qbm_io **ret_io)
{
    struct stat st;
    int fd, r;

    fd = open(filename, (rdwr ? O_RDWR : O_RDONLY) | O_CLOEXEC);
    if (fd < 0) {
        return qbm_err(errno, "cannot open: %s", strerror(errno));
    }
    if (fstat(fd, &st) < 0) {
        r = qbm_err(errno, "cannot stat: %s", strerror(errno));
        close(fd);
        return r;
    }
    if (S_ISDIR(st.st_mode)) {
        close(fd);
        return qbm_err(EISDIR, "is a directory");
    }
    /* Device nodes take QEMU's lock bytes as files do (OFD locks work on
     * any inode; QEMU locks the node it opened). */
    r = apply_locks(fd, lock);
    r = r ? r : file_io_new(fd, &st, ret_io);
    if (r < 0) {
        close(fd);
    }
    return r;
}

/* ---- memory backend --------------------------------------------------- */

QBM_DARRAY(mem_bytes, uint8_t);

struct mem_io {
    struct qbm_io io;
    struct mem_bytes data; /* the file: data.n bytes */
};

/*
 * Memory images are for tests and fuzzing: their size is capped, and a
 * write starting far past the end is refused, as a corrupt offset rather
 * than a growing file (zero-filling gigabytes would only make a fuzzer run
 * out of memory instead of reporting the bug that produced the offset).
 */
#define MEM_IO_MAX (1ull << 32)
#define MEM_IO_MAX_JUMP (1ull << 30)

static int mem_pread(struct qbm_io *io, void *buf, size_t len, uint64_t off)
{
    struct mem_io *m = (struct mem_io *)io;
    size_t avail = 0;

    if (off < m->data.n) {
        avail = m->data.n - (size_t)off;
        if (avail > len) {
            avail = len;
        }
        memcpy(buf, m->data.v + off, avail);
    }
    memset((uint8_t *)buf + avail, 0, len - avail);
    return 0;
}

static int mem_pwrite(struct qbm_io *io, const void *buf, size_t len,
                      uint64_t off)
{
    struct mem_io *m = (struct mem_io *)io;
    uint64_t end;
    int r;

    if (!add_ok(off, len, &end) || end > MEM_IO_MAX) {
        return qbm_err(EFBIG,
                       "write at 0x%llx: past the memory image limit "
                       "(4 GiB)",
                       (unsigned long long)off);
    }
    if (off > m->data.n + MEM_IO_MAX_JUMP) {
        return qbm_err(EFBIG,
                       "write at 0x%llx: more than 1 GiB past the end "
                       "of the memory image (0x%zx)",
                       (unsigned long long)off, m->data.n);
    }
    if (end > m->data.n) {
        /* Doubling for appends; a jump gets what it needs, not twice. */
        r = qbm_darray_reserve(&m->data, (size_t)end - m->data.n, MEM_IO_MAX);
        if (r < 0) {
            return r;
        }
        memset(m->data.v + m->data.n, 0, (size_t)end - m->data.n);
        m->data.n = (size_t)end;
    }
    memcpy(m->data.v + off, buf, len);
    return 0;
}

static int mem_flush(struct qbm_io *io)
{
    return 0;
}

static int mem_size(struct qbm_io *io, uint64_t *ret_size)
{
    *ret_size = io->capacity ? io->capacity : ((struct mem_io *)io)->data.n;
    return 0;
}

static int mem_truncate(struct qbm_io *io, uint64_t size)
{
    struct mem_io *m = (struct mem_io *)io;
    uint8_t zero = 0;

    if (io->capacity) {
        return 0;
    }
    if (size < m->data.n) {
        m->data.n = (size_t)size;
        return 0;
    }
    return size > m->data.n ? mem_pwrite(io, &zero, 0, size) : 0;
}

static void mem_close(struct qbm_io *io)
{
    struct mem_io *m = (struct mem_io *)io;

    qbm_darray_free(&m->data);
    free(m);
}

static const struct qbm_io_ops mem_ops = {
    .pread = mem_pread,
    .pwrite = mem_pwrite,
    .flush = mem_flush,
    .size = mem_size,
    .truncate = mem_truncate,
    .close = mem_close,
};

int qbm_io_mem_open(const void *buf, size_t len, struct qbm_io **ret_io)
{
    struct mem_io *m = qbm_calloc(1, sizeof(*m));

    if (!m) {
        return -ENOMEM;
    }
    m->io.ops = &mem_ops;
    if (len > 0) {
        /* Exactly the bytes given: growth starts with the first write
         * past them. */
        m->data.v = qbm_malloc(len);
        if (!m->data.v) {
            free(m);
            return -ENOMEM;
        }
        memcpy(m->data.v, buf, len);
        m->data.n = m->data.cap = len;
    }
    *ret_io = &m->io;
    return 0;
}

const uint8_t *qbm_io_mem_data(struct qbm_io *io, size_t *ret_len)
{
    struct mem_io *m = (struct mem_io *)io;

    *ret_len = m->data.n;
    return m->data.v;
}

/* ---- fault-injecting backend ------------------------------------------ */

/*
 * A memory file that counts writes and flushes and "crashes" at the Nth:
 * that operation and every later one fail with EIO. What a crash leaves on
 * disk is the flushed state plus any subset of the writes made since the
 * last flush, each possibly torn at 512-byte sector boundaries (sectors
 * themselves are written atomically, as disks guarantee).
 */
struct pending_write {
    uint64_t off;
    size_t len;
    uint8_t *data;
};
QBM_DARRAY(pending_writes, struct pending_write);

struct fault_io {
    struct qbm_io io;
    struct qbm_io *live;           /* what reads see */
    struct qbm_io *durable;        /* what survives a crash for sure */
    struct pending_writes pending; /* since the last flush */
    uint64_t ops, crash_at;
    uint64_t cut_bytes; /* of the vectored write the crash (or the failure)
                         * cut: what it wrote before failing */
    bool cut;
    bool crashed;
    int fail_err; /* fail_once: only crash_at fails, with this error */
    uint32_t seed;
};

static int fault_check(struct fault_io *f)
{
    if (f->crashed) {
        return qbm_err(EIO, "simulated crash");
    }
    f->ops++;
    if (f->fail_err) {
        return f->ops == f->crash_at
                   ? qbm_err(f->fail_err, "simulated error: %s",
                             strerror(f->fail_err))
                   : 0;
    }
    if (f->crash_at && f->ops >= f->crash_at) {
        f->crashed = true;
        return qbm_err(EIO, "simulated crash");
    }
    return 0;
}

static int fault_pread(struct qbm_io *io, void *buf, size_t len, uint64_t off)
{
    struct fault_io *f = (struct fault_io *)io;

    if (f->crashed) {
        return qbm_err(EIO, "simulated crash");
    }
    return qbm_io_pread(f->live, buf, len, off);
}

/* Record an unflushed write and apply it to what reads see. */
static int fault_record(struct fault_io *f, const void *buf, size_t len,
                        uint64_t off)
{
    struct pending_write *w;
    int r = qbm_darray_reserve(&f->pending, 1, 0);

    if (r < 0) {
        return r;
    }
    w = &f->pending.v[f->pending.n];
    w->data = qbm_malloc(len ? len : 1);
    if (!w->data) {
        return -ENOMEM;
    }
    memcpy(w->data, buf, len);
    w->off = off;
    w->len = len;
    f->pending.n++;
    return qbm_io_pwrite(f->live, buf, len, off);
}

static int fault_pwrite(struct qbm_io *io, const void *buf, size_t len,
                        uint64_t off)
{
    struct fault_io *f = (struct fault_io *)io;
    int r = fault_check(f);

    return r < 0 ? r : fault_record(f, buf, len, off);
}

static uint32_t xorshift(uint32_t *s);

/*
 * A vectored write is one operation, as one pwritev call. When the crash
 * (or the one failure) falls on it, a disk may have written part of the
 * batch: a seeded prefix of whole sectors (at least one, never all of it)
 * lands before the error, possibly ending inside one of the buffers.
 */
static int fault_pwritev(struct qbm_io *io, const struct iovec *iov, int iovcnt,
                         uint64_t off)
{
    struct fault_io *f = (struct fault_io *)io;
    size_t total = iov_bytes(iov, iovcnt), keep = 0;
    int i, r;

    if (f->crashed) {
        return qbm_err(EIO, "simulated crash");
    }
    r = fault_check(f);
    if (r < 0 && total > 512) {
        uint32_t s = f->seed ^ (uint32_t)(f->ops * 2654435761u);
        uint64_t sectors = div_round_up(total, 512);

        keep = (size_t)(1 + xorshift(&s) % (sectors - 1)) * 512;
        f->cut = true;
        f->cut_bytes = keep;
    }
    for (i = 0; i < iovcnt && (r == 0 || keep > 0); i++) {
        size_t n = iov[i].iov_len;
        int w;

        if (r < 0) {
            n = n < keep ? n : keep;
            keep -= n;
        }
        w = fault_record(f, iov[i].iov_base, n, off);
        if (w < 0) {
            return w;
        }
        off += iov[i].iov_len;
    }
    if (r < 0 && f->cut) {
        return qbm_err(-r, "simulated %s after %llu of %zu bytes",
                       f->crashed ? "crash" : strerror(-r),
                       (unsigned long long)f->cut_bytes, total);
    }
    return r;
}

static void drop_pending(struct fault_io *f)
{
    size_t i;

    for (i = 0; i < f->pending.n; i++) {
        free(f->pending.v[i].data);
    }
    f->pending.n = 0;
}

static int fault_flush(struct qbm_io *io)
{
    struct fault_io *f = (struct fault_io *)io;
    size_t i;
    int r = fault_check(f);

    if (r < 0) {
        return r;
    }
    for (i = 0; i < f->pending.n; i++) {
        const struct pending_write *w = &f->pending.v[i];

        r = qbm_io_pwrite(f->durable, w->data, w->len, w->off);
        if (r < 0) {
            return r;
        }
    }
    drop_pending(f);
    return 0;
}

static int fault_size(struct qbm_io *io, uint64_t *ret_size)
{
    return qbm_io_size(((struct fault_io *)io)->live, ret_size);
}

static int fault_truncate(struct qbm_io *io, uint64_t size)
{
    struct fault_io *f = (struct fault_io *)io;
    int r;

    if (f->crashed) {
        return qbm_err(EIO, "simulated crash");
    }
    r = qbm_io_truncate(f->live, size);
    return r ? r : qbm_io_truncate(f->durable, size);
}

static void fault_close(struct qbm_io *io)
{
    struct fault_io *f = (struct fault_io *)io;

    drop_pending(f);
    qbm_darray_free(&f->pending);
    qbm_io_close(f->live);
    qbm_io_close(f->durable);
    free(f);
}

static const struct qbm_io_ops fault_ops = {
    .pread = fault_pread,
    .pwrite = fault_pwrite,
    .pwritev = fault_pwritev,
    .flush = fault_flush,
    .size = fault_size,
    .truncate = fault_truncate,
    .close = fault_close,
};

int qbm_io_fault_open(const void *buf, size_t len, uint64_t crash_at,
                      uint32_t seed, struct qbm_io **ret_io)
{
    struct fault_io *f = qbm_calloc(1, sizeof(*f));
    int r;

    if (!f) {
        return -ENOMEM;
    }
    f->io.ops = &fault_ops;
    f->crash_at = crash_at;
    f->seed = seed ? seed : 1;
    r = qbm_io_mem_open(buf, len, &f->live);
    if (r == 0) {
        r = qbm_io_mem_open(buf, len, &f->durable);
    }
    if (r < 0) {
        fault_close(&f->io);
        return r;
    }
    *ret_io = &f->io;
    return 0;
}

uint64_t qbm_io_fault_ops(struct qbm_io *io)
{
    return ((struct fault_io *)io)->ops;
}

bool qbm_io_fault_cut(struct qbm_io *io, uint64_t *ret_bytes)
{
    struct fault_io *f = (struct fault_io *)io;

    if (f->cut && ret_bytes) {
        *ret_bytes = f->cut_bytes;
    }
    return f->cut;
}

struct qbm_io *qbm_io_fault_live(struct qbm_io *io)
{
    return ((struct fault_io *)io)->live;
}

void qbm_io_fault_fail_once(struct qbm_io *io, uint64_t at, int err)
{
    struct fault_io *f = (struct fault_io *)io;

    f->crash_at = at;
    f->fail_err = err;
}

void qbm_io_set_capacity(struct qbm_io *io, uint64_t capacity)
{
    io->capacity = capacity;
    if (io->ops == &fault_ops) {
        struct fault_io *f = (struct fault_io *)io;

        f->live->capacity = capacity;
        f->durable->capacity = capacity;
    }
}

static uint32_t xorshift(uint32_t *s)
{
    *s ^= *s << 13;
    *s ^= *s >> 17;
    *s ^= *s << 5;
    return *s;
}

int qbm_io_fault_crash_image(struct qbm_io *io, uint8_t **ret, size_t *ret_len)
{
    struct fault_io *f = (struct fault_io *)io;
    struct qbm_io *out;
    const uint8_t *data;
    uint32_t s = f->seed;
    size_t len, i;
    int r;

    data = qbm_io_mem_data(f->durable, &len);
    r = qbm_io_mem_open(data, len, &out);
    if (r < 0) {
        return r;
    }
    for (i = 0; i < f->pending.n && r == 0; i++) {
        const struct pending_write *w = &f->pending.v[i];
        uint64_t sec = w->off / 512 * 512, end = w->off + w->len;

        switch (xorshift(&s) % 3) {
        case 0: /* lost */
            break;
        case 1: /* complete */
            r = qbm_io_pwrite(out, w->data, w->len, w->off);
            break;
        default: /* torn: a random subset of its sectors */
            for (; sec < end && r == 0; sec += 512) {
                uint64_t a = sec < w->off ? w->off : sec;
                uint64_t b = sec + 512 < end ? sec + 512 : end;

                if (xorshift(&s) & 1) {
                    r = qbm_io_pwrite(out, w->data + (a - w->off),
                                      (size_t)(b - a), a);
                }
            }
            break;
        }
    }
    if (r == 0) {
        data = qbm_io_mem_data(out, &len);
        *ret = qbm_malloc(len ? len : 1);
        if (*ret) {
            memcpy(*ret, data, len);
            *ret_len = len;
        } else {
            r = -ENOMEM;
        }
    }
    qbm_io_close(out);
    return r;
}
