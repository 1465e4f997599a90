/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * Rebuilding disks from backup images (restore) and writing incremental
 * backups of a shut-down VM's disk (extract).
 *
 * Both resolve their input layers into one map (chain-resolve.c) and copy only
 * what the map holds: uncompressed data with copy_file_range (in-kernel,
 * possibly reflinked), compressed clusters through the decompressor. A
 * file output is written under a temporary name in the same directory,
 * flushed, and renamed into place, so a failure or crash never leaves a
 * partial OUTPUT behind. A block device is written in place (there is no
 * name to rename over): every byte of what the output covers is written,
 * with data or with zeros, since the device holds old data.
 */
#include <fcntl.h>
#include <libgen.h>
#include <limits.h>
#include <linux/fs.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/ioctl.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "internal.h"

#define COPY_CHUNK (64u << 20)
/* Read ahead this far past the piece being copied, and start write-back
 * every WRITEBACK bytes, so reading, copying and writing overlap. */
#define READAHEAD (256ull << 20)
#define WRITEBACK (64ull << 20)
/* Zeroing a device: BLKZEROOUT on whole 4 KiB pages, at most ZERO_CHUNK
 * at a time (progress, and a device without WRITE ZEROES has the kernel
 * write the pages); zero buffers of ZERO_BUF bytes elsewhere. */
#define ZERO_ALIGN 4096ull
#define ZERO_CHUNK (1ull << 30)
#define ZERO_BUF (1u << 20)

struct out {
    const char *output; /* as given */
    char *target;       /* where the data goes: OUTPUT, links followed */
    bool exists;        /* a regular file or a device is at target (st) */
    bool device;        /* a block device: written in place */
    bool no_zeroout;    /* BLKZEROOUT refused: write zero buffers */
    uint64_t dev_size;
    uint8_t *zbuf;
    struct stat st;
    char *tmp;
    int fd;
    struct qbm_io *io;
    struct qbm_progress *progress;
    uint64_t done, total;
    /* Overlap: next piece to prefetch and bytes prefetched ahead. */
    size_t ra_next;
    uint64_t ra_bytes;
    uint64_t wb_from, wb_to; /* output range not yet pushed to write-back */
};

/* Ask the kernel to start reading pieces ahead of piece `cur`. */
static void prefetch(struct qbm_image **layers,
                     const struct qcow2_map_extent *map, size_t n, size_t cur,
                     struct out *o)
{
    if (o->ra_next < cur) {
        o->ra_next = cur;
        o->ra_bytes = 0;
    }
    while (o->ra_next < n && o->ra_bytes < READAHEAD) {
        const struct qcow2_map_extent *e = &map[o->ra_next++];
        int fd = qbm_io_fd(qbm_image_data_io(layers[e->layer]));

        if (fd >= 0 && e->type == QCOW2_MAP_DATA) {
            posix_fadvise(fd, (off_t)e->host, (off_t)e->len,
                          POSIX_FADV_WILLNEED);
            o->ra_bytes += e->len;
        }
    }
    if (cur < n && map[cur].type == QCOW2_MAP_DATA) {
        o->ra_bytes =
            o->ra_bytes > map[cur].len ? o->ra_bytes - map[cur].len : 0;
    }
}

/* Output offsets only grow: push what was written to write-back early. */
static void writeback(struct out *o, uint64_t to)
{
    if (to > o->wb_to) {
        o->wb_to = to;
    }
    if (o->wb_to - o->wb_from >= WRITEBACK) {
        sync_file_range(o->fd, (off_t)o->wb_from,
                        (off_t)(o->wb_to - o->wb_from), SYNC_FILE_RANGE_WRITE);
        o->wb_from = o->wb_to;
    }
}

/* ---- interval helpers (sorted, merged [start, end) lists) -------------- */

/* A run of guest clusters [start, end). */
struct interval {
    uint64_t start, end;
};
QBM_DARRAY(intervals, struct interval);

static int iv_add(struct intervals *iv, uint64_t s, uint64_t e)
{
    struct interval x = { s, e };

    if (s >= e) {
        return 0;
    }
    if (iv->n && qbm_darray_last(iv).end >= s) {
        if (e > qbm_darray_last(iv).end) {
            qbm_darray_last(iv).end = e;
        }
        return 0;
    }
    return qbm_darray_push(iv, x, 0);
}

/* ---- copying ------------------------------------------------------------ */

static int copy_range(struct qbm_image *src, uint64_t from, struct out *o,
                      uint64_t to, uint64_t len)
{
    /* The kernel copies between regular files only. Onto a device, reads
     * past the end of the source must become zeros there, as the read
     * fallback does. */
    struct qbm_io *sio = qbm_image_data_io(src);
    int sfd = o->device ? -1 : qbm_io_fd(sio);
    uint8_t *buf = NULL;
    int r = 0;

    while (len > 0 && sfd >= 0) {
        loff_t in = (loff_t)from, outp = (loff_t)to;
        ssize_t n = copy_file_range(sfd, &in, o->fd, &outp,
                                    len < COPY_CHUNK ? len : COPY_CHUNK, 0);

        if (n < 0 && errno == EINTR) {
            continue;
        }
        if (n < 0) {
            break; /* not supported here: fall back to read/write */
        }
        if (n == 0) {
            return 0; /* past the end of the source: reads as zeros */
        }
        from += (uint64_t)n;
        to += (uint64_t)n;
        len -= (uint64_t)n;
    }
    while (len > 0 && r == 0) {
        size_t n = len < COPY_CHUNK ? (size_t)len : COPY_CHUNK;

        if (!buf) {
            buf = qbm_malloc(COPY_CHUNK);
            if (!buf) {
                return -ENOMEM;
            }
        }
        r = qbm_io_pread(sio, buf, n, from);
        r = r ? r : qbm_io_pwrite(o->io, buf, n, to);
        from += n;
        to += n;
        len -= n;
    }
    free(buf);
    return r;
}

/* Copy the part [g, g + len) of map extent e to output offset `to`. */
static int copy_piece(struct qbm_image **layers,
                      const struct qcow2_map_extent *e, uint64_t g,
                      uint64_t len, struct out *o, uint64_t to)
{
    struct qbm_image *src = layers[e->layer];
    int r;

    if (e->type == QCOW2_MAP_DATA) {
        r = copy_range(src, e->host + (g - e->guest), o, to, len);
    } else if (e->type == QCOW2_MAP_COMPRESSED) {
        uint8_t *buf = qbm_malloc(len);

        if (!buf) {
            return -ENOMEM;
        }
        r = qcow2_read_compressed(src, e->host, g - e->start, buf, len);
        r = r ? r : qbm_io_pwrite(o->io, buf, len, to);
        free(buf);
    } else {
        return 0; /* zeros: the output reads as zeros there already */
    }
    if (r < 0) {
        return qbm_err_prefix(r, "%s", src->filename);
    }
    o->done += len;
    writeback(o, to + len);
    return qbm_progress_report(o->progress, o->done, o->total);
}

/* Write zeros at [off, off + len) of a device through the page cache. */
static int zero_write(struct out *o, uint64_t off, uint64_t len)
{
    int r = 0;

    if (len && !o->zbuf) {
        o->zbuf = qbm_calloc(1, ZERO_BUF);
        if (!o->zbuf) {
            return -ENOMEM;
        }
    }
    while (len > 0 && r == 0) {
        size_t n = len < ZERO_BUF ? (size_t)len : ZERO_BUF;

        r = qbm_io_pwrite(o->io, o->zbuf, n, off);
        off += n;
        len -= n;
    }
    writeback(o, off);
    return r;
}

/*
 * Make [off, off + len) of the output device read as zeros; `count`: the
 * range is part of the progress total. BLKZEROOUT has the device write
 * zeros (or unmap, only where it guarantees zeros afterwards; where it can
 * do neither, the kernel writes zero pages). A discard is never used: a
 * device may keep the old data after one. The ioctl drops the kernel's
 * cached pages of the range, so it gets whole 4 KiB pages only; the edges
 * are written through the cache as the data beside them is.
 */
static int zero_range(struct out *o, uint64_t off, uint64_t len, bool count)
{
    uint64_t end = off + len;
    uint64_t a = div_round_up(off, ZERO_ALIGN) * ZERO_ALIGN;
    uint64_t b = align_down(end, ZERO_ALIGN);
    int r = 0;

    if (a >= b) {
        a = b = end; /* no whole page: all of it through the cache */
    }
    r = zero_write(o, off, a - off);
    while (r == 0 && a < b) {
        uint64_t n = b - a < ZERO_CHUNK ? b - a : ZERO_CHUNK;
        uint64_t range[2] = { a, n };

        if (o->no_zeroout || ioctl(o->fd, BLKZEROOUT, range) < 0) {
            if (!o->no_zeroout && errno != EINVAL && errno != EOPNOTSUPP &&
                errno != ENOTTY) {
                return qbm_err(errno, "%s: cannot write zeros at 0x%llx: %s",
                               o->output, (unsigned long long)a,
                               strerror(errno));
            }
            /* Refused: a device with blocks larger than 4 KiB. */
            o->no_zeroout = true;
            r = zero_write(o, a, n);
        }
        a += n;
        if (r == 0 && count && a < b) {
            o->done += n;
            len -= n;
            r = qbm_progress_report(o->progress, o->done, o->total);
        }
    }
    r = r ? r : zero_write(o, b, end - b);
    if (r < 0) {
        return qbm_err_prefix(r, "%s", o->output);
    }
    if (count) {
        o->done += len;
        return qbm_progress_report(o->progress, o->done, o->total);
    }
    return 0;
}

static bool is_data(const struct qcow2_map_extent *e)
{
    return e->type == QCOW2_MAP_DATA || e->type == QCOW2_MAP_COMPRESSED;
}

/* ---- output files -------------------------------------------------------- */

/*
 * OUTPUT is looked at before anything is written. Symbolic links are
 * followed, as open() does for qemu-img convert: the file a link points to
 * gets the data and the link stays; a dangling link creates its target.
 * What is found at the end must be a regular file, a block device or
 * nothing. Character devices, fifos, sockets and directories are refused,
 * and the final rename makes sure it never replaces one (or a block
 * device) that appeared in the meantime.
 *
 * The output is written to a temporary file beside the target (the rename
 * must stay within one file system), created with mode 0666 so that the
 * kernel applies the umask (and a directory's default ACL): the library
 * cannot read the umask without changing it, which is not thread-safe. An
 * existing output keeps its permission bits, as when qemu-img convert
 * truncates it in place.
 */

#define MAX_LINKS 40 /* as the kernel's limit on symbolic links in a path */

static const char *kind_name(mode_t mode)
{
    switch (mode & S_IFMT) {
    case S_IFBLK:
        return "block device";
    case S_IFCHR:
        return "character device";
    case S_IFIFO:
        return "fifo";
    case S_IFSOCK:
        return "socket";
    case S_IFDIR:
        return "directory";
    case S_IFLNK:
        return "symbolic link";
    default:
        return "special file";
    }
}

/* The path a symbolic link at `path` points to; relative link text is
 * relative to the link's directory. */
static int follow_link(const char *output, const char *path, char **ret)
{
    char text[PATH_MAX], *dir, *res;
    ssize_t n = readlink(path, text, sizeof(text));
    size_t len;

    if (n < 0 || (size_t)n >= sizeof(text)) {
        int e = n < 0 ? errno : ENAMETOOLONG;

        return qbm_err(e, "%s: cannot read the symbolic link %s: %s", output,
                       path, strerror(e));
    }
    text[n] = '\0';
    dir = qbm_strndup(path, strlen(path));
    if (!dir) {
        return -ENOMEM;
    }
    if (text[0] != '/' && strcmp(dirname(dir), ".") != 0) {
        len = strlen(dir) + 1 + (size_t)n + 1;
        res = qbm_malloc(len);
        if (res) {
            snprintf(res, len, "%s/%s", dir, text);
        }
    } else {
        res = qbm_strndup(text, (size_t)n);
    }
    free(dir);
    if (!res) {
        return -ENOMEM;
    }
    *ret = res;
    return 0;
}

/* Describe the refusal of `target` (of type `mode`) as OUTPUT. */
static int refuse_kind(const struct out *o, mode_t mode)
{
    int e = S_ISDIR(mode) ? EISDIR : EOPNOTSUPP;
    const char *hint = S_ISDIR(mode) ? "name the file to write"
                                     : "only a regular file or a block "
                                       "device can be written";

    if (strcmp(o->target, o->output) == 0) {
        return qbm_err(e, "%s: not a regular file (%s); %s", o->output,
                       kind_name(mode), hint);
    }
    return qbm_err(e, "%s: links to %s, not a regular file (%s); %s", o->output,
                   o->target, kind_name(mode), hint);
}

/* Find what OUTPUT names, following symbolic links; refuse anything but
 * a regular file, a block device or nothing. */
static int out_check(struct out *o, const char *output)
{
    char *path = qbm_strndup(output, strlen(output));
    int hops, r;

    o->output = output;
    if (!path) {
        return -ENOMEM;
    }
    for (hops = 0;; hops++) {
        char *next;

        if (lstat(path, &o->st) < 0) {
            if (errno != ENOENT) {
                r = qbm_err(errno, "%s: cannot access: %s", output,
                            strerror(errno));
                goto fail;
            }
            o->exists = false;
            break;
        }
        if (!S_ISLNK(o->st.st_mode)) {
            o->exists = true;
            break;
        }
        if (hops == MAX_LINKS) {
            r = qbm_err(ELOOP, "%s: too many levels of symbolic links", output);
            goto fail;
        }
        r = follow_link(output, path, &next);
        if (r < 0) {
            goto fail;
        }
        free(path);
        path = next;
    }
    o->target = path;
    o->device = o->exists && S_ISBLK(o->st.st_mode);
    if (o->exists && !S_ISREG(o->st.st_mode) && !o->device) {
        return refuse_kind(o, o->st.st_mode);
    }
    if (!o->exists && path[0] && path[strlen(path) - 1] == '/') {
        return qbm_err(EISDIR, "%s: cannot create: names a directory", output);
    }
    return 0;

fail:
    free(path);
    return r;
}

/* Open a new file named `tmpl` with its last six X replaced, as mkostemp
 * does but with the caller's mode (mkostemp always uses 0600). */
static int open_temp(char *tmpl, mode_t mode)
{
    static const char set[] = "abcdefghijklmnopqrstuvwxyz"
                              "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
    char *x = tmpl + strlen(tmpl) - 6;
    int tries, i, fd;

    for (tries = 0; tries < 100; tries++) {
        uint64_t v;

        if (getrandom(&v, sizeof(v), GRND_NONBLOCK) != sizeof(v)) {
            struct timespec ts;

            clock_gettime(CLOCK_MONOTONIC, &ts);
            v = (uint64_t)ts.tv_nsec * 0x9e3779b97f4a7c15ull ^
                (uint64_t)getpid() << 32 ^ (uint64_t)tries;
        }
        for (i = 0; i < 6; i++) {
            x[i] = set[v % (sizeof(set) - 1)];
            v /= sizeof(set) - 1;
        }
        fd = open(tmpl, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, mode);
        if (fd >= 0 || errno != EEXIST) {
            return fd;
        }
    }
    errno = EEXIST;
    return -1;
}

/*
 * Open the block device at the target for writing in place. O_EXCL makes
 * the kernel refuse a device that is mounted, or part of a device-mapper
 * or MD device, or held so by another program; QEMU's write locks refuse
 * one that QEMU (a running VM) has open. The node must still be the device
 * out_check() found.
 */
static int out_open_device(struct out *o)
{
    struct stat st;
    int fd, r;

    fd = open(o->target, O_RDWR | O_EXCL | O_CLOEXEC);
    if (fd < 0 && errno == EBUSY) {
        return qbm_err(EBUSY,
                       "%s: the device is in use (mounted, or held "
                       "by another program or device); it was left as it is",
                       o->output);
    }
    if (fd < 0) {
        return qbm_err(errno, "%s: cannot open: %s", o->output,
                       strerror(errno));
    }
    if (fstat(fd, &st) < 0 || !S_ISBLK(st.st_mode) ||
        st.st_rdev != o->st.st_rdev) {
        close(fd);
        return qbm_err(EAGAIN, "%s: changed while the inputs were read",
                       o->output);
    }
    /* The file io finds the device and its size (BLKGETSIZE64). */
    r = qbm_io_file_adopt(fd, &o->io);
    if (r < 0) {
        close(fd);
        return qbm_err_prefix(r, "%s", o->output);
    }
    o->fd = fd;
    o->dev_size = o->io->capacity;
    r = qbm_io_file_lock(o->io, QBM_LOCK_WRITE);
    if (r < 0) {
        qbm_io_close(o->io);
        o->io = NULL;
        return qbm_err_prefix(r, "%s", o->output);
    }
    return 0;
}

/* A device must hold the whole output: checked before anything is written
 * to it. A larger device keeps what it holds past the output. */
static int out_room(const struct out *o, uint64_t need)
{
    if (o->device && o->dev_size < need) {
        return qbm_err(ENOSPC,
                       "%s: device too small: it holds %llu bytes, the output "
                       "needs %llu; it was left as it is",
                       o->output, (unsigned long long)o->dev_size,
                       (unsigned long long)need);
    }
    return 0;
}

static int out_create(struct out *o)
{
    char *d = qbm_strndup(o->target, strlen(o->target));
    char *b = qbm_strndup(o->target, strlen(o->target));
    mode_t mode = o->exists ? (o->st.st_mode & 0777) : 0666;
    size_t len;
    int r;

    if (o->device) {
        free(d);
        free(b);
        return out_open_device(o);
    }
    if (!d || !b) {
        free(d);
        free(b);
        return -ENOMEM;
    }
    /* dirname and basename may modify their argument: one copy each. */
    len = strlen(o->target) * 2 + 32;
    o->tmp = qbm_malloc(len);
    if (o->tmp) {
        snprintf(o->tmp, len, "%s/.%s.qbm-XXXXXX", dirname(d), basename(b));
    }
    free(d);
    free(b);
    if (!o->tmp) {
        return -ENOMEM;
    }
    o->fd = open_temp(o->tmp, mode);
    if (o->fd < 0) {
        r = strcmp(o->target, o->output) == 0
                ? qbm_err(errno, "%s: cannot create: %s", o->output,
                          strerror(errno))
                : qbm_err(errno, "%s: cannot create %s: %s", o->output,
                          o->target, strerror(errno));
        free(o->tmp);
        o->tmp = NULL;
        return r;
    }
    /* The umask may have taken bits off the old mode; give them back (a
     * file system without permissions may refuse: the file then stays
     * at most as open as the umask allows). */
    if (o->exists) {
        (void)fchmod(o->fd, mode);
    }
    r = qbm_io_file_adopt(o->fd, &o->io);
    if (r < 0) {
        close(o->fd);
        unlink(o->tmp);
        free(o->tmp);
        o->tmp = NULL;
    }
    return r;
}

static void out_abort(struct out *o)
{
    if (o->io) {
        qbm_io_close(o->io);
        o->io = NULL;
    }
    if (o->tmp) {
        unlink(o->tmp);
        free(o->tmp);
        o->tmp = NULL;
    }
}

static void out_free(struct out *o)
{
    out_abort(o);
    free(o->target);
    o->target = NULL;
    free(o->zbuf);
    o->zbuf = NULL;
}

/* The file system cannot do what a renameat2 flag asks. */
static bool unsupported(int e)
{
    return e == EINVAL || e == ENOSYS || e == EOPNOTSUPP || e == ENOTSUP;
}

/* OUTPUT turned into something that is not a regular file after
 * out_check(): nothing may be replaced. */
static int refuse_changed(const struct out *o, mode_t mode)
{
    return qbm_err(EEXIST,
                   "%s: became a %s while the output was written; "
                   "it was left as it is and the output discarded",
                   o->target, kind_name(mode));
}

/* Replace a regular file at the target, checking just before: for file
 * systems without RENAME_EXCHANGE. What replaces the target between the
 * lstat() and the rename() is replaced in its turn; only someone who can
 * write the target's directory can do that, and a directory is safe
 * anyway (rename() never puts a file over one). */
static int rename_checked(struct out *o)
{
    struct stat st;

    if (lstat(o->target, &st) == 0 && !S_ISREG(st.st_mode)) {
        return refuse_changed(o, st.st_mode);
    }
    if (rename(o->tmp, o->target) < 0) {
        return qbm_err(errno, "%s: cannot rename into place: %s", o->output,
                       strerror(errno));
    }
    return 0;
}

/*
 * Publish over an existing target without ever replacing anything but a
 * regular file: swap the two names atomically, then look at what was at
 * the target. A regular file is deleted; anything else is swapped back,
 * the node itself untouched. A crash in between leaves the old file under
 * the temporary name (the output is complete by then). Returns 1 when the
 * target is gone.
 */
static int rename_over(struct out *o)
{
    struct stat st;

    if (renameat2(AT_FDCWD, o->tmp, AT_FDCWD, o->target, RENAME_EXCHANGE) < 0) {
        if (errno == ENOENT) {
            return 1;
        }
        if (unsupported(errno)) {
            return rename_checked(o);
        }
        return qbm_err(errno, "%s: cannot rename into place: %s", o->output,
                       strerror(errno));
    }
    if (lstat(o->tmp, &st) < 0 || S_ISREG(st.st_mode)) {
        unlink(o->tmp);
        return 0;
    }
    if (renameat2(AT_FDCWD, o->tmp, AT_FDCWD, o->target, RENAME_EXCHANGE) < 0) {
        /* Cannot happen short of someone else renaming these names too:
         * keep the node, and say where it is. */
        int e = errno;
        int r = qbm_err(e,
                        "%s: became a %s while the output was written, "
                        "and it could not be put back: it is now named "
                        "%s: %s",
                        o->target, kind_name(st.st_mode), o->tmp, strerror(e));

        free(o->tmp);
        o->tmp = NULL;
        return r;
    }
    return refuse_changed(o, st.st_mode);
}

/* Publish where nothing is: never replaces. Returns 1 when something
 * appeared at the target. */
static int rename_new(struct out *o)
{
    if (renameat2(AT_FDCWD, o->tmp, AT_FDCWD, o->target, RENAME_NOREPLACE) ==
        0) {
        return 0;
    }
    if (unsupported(errno)) {
        /* link() never replaces either (NFS has no RENAME_NOREPLACE). */
        if (link(o->tmp, o->target) == 0) {
            unlink(o->tmp);
            return 0;
        }
        if (errno != EEXIST) {
            return rename_checked(o); /* no hard links either (FAT) */
        }
    }
    if (errno == EEXIST) {
        return 1;
    }
    return qbm_err(errno, "%s: cannot rename into place: %s", o->output,
                   strerror(errno));
}

/* Flush, publish under the final name, and make the rename durable. */
static int out_publish(struct out *o)
{
    bool exists = o->exists;
    char *copy;
    int r, tries, dfd;

    /* fdatasync: on a block device the same as fsync, which writes the
     * device's cache back. */
    r = qbm_io_flush(o->io);
    if (r < 0) {
        qbm_err_prefix(r, "%s", o->output);
    }
    qbm_io_close(o->io);
    o->io = NULL;
    if (o->device) {
        return r; /* written in place: nothing to publish */
    }
    /* The target may come and go under us: try again a few times. */
    for (tries = 0; r == 0; tries++) {
        if (tries == 4) {
            r = qbm_err(EAGAIN,
                        "%s: keeps changing; the output was "
                        "discarded",
                        o->target);
            break;
        }
        r = exists ? rename_over(o) : rename_new(o);
        if (r != 1) {
            break;
        }
        r = 0;
        exists = !exists;
    }
    if (r < 0) {
        out_abort(o);
        return r;
    }
    free(o->tmp);
    o->tmp = NULL;
    copy = qbm_strndup(o->target, strlen(o->target));
    if (copy) {
        dfd = open(dirname(copy), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
        if (dfd >= 0) {
            fsync(dfd);
            close(dfd);
        }
        free(copy);
    }
    return 0;
}

/* Write `map` as a raw disk of `size` bytes: data where it has data, holes
 * (a file) or zeros (a device, from its start; what lies past `size` is
 * left alone) elsewhere. */
static int write_raw(struct qbm_image **layers,
                     const struct qcow2_map_extent *map, size_t n,
                     uint64_t size, struct out *o)
{
    uint64_t pos = 0;
    size_t i;
    int r;

    if (o->device) {
        r = out_room(o, size);
        for (i = 0; i < n && r == 0; i++) {
            if (!is_data(&map[i])) {
                continue; /* zeroed with the gaps */
            }
            if (map[i].guest > pos) {
                r = zero_range(o, pos, map[i].guest - pos, true);
            }
            prefetch(layers, map, n, i, o);
            r = r ? r
                  : copy_piece(layers, &map[i], map[i].guest, map[i].len, o,
                               map[i].guest);
            pos = map[i].guest + map[i].len;
        }
        return r || pos >= size ? r : zero_range(o, pos, size - pos, true);
    }
    if (ftruncate(o->fd, (off_t)size) < 0) {
        return qbm_err(errno, "%s: cannot size the output: %s", o->output,
                       strerror(errno));
    }
    for (i = 0; i < n; i++) {
        prefetch(layers, map, n, i, o);
        r = copy_piece(layers, &map[i], map[i].guest, map[i].len, o,
                       map[i].guest);
        if (r < 0) {
            return r;
        }
    }
    return 0;
}

/*
 * Write `map` as a fresh qcow2 image. Only guest clusters inside `want`
 * (NULL: everywhere) are stored: as data when the map has data there, else
 * as zero flags when `zeros` (an incremental must override what older
 * backups hold), else not at all.
 */
static int write_qcow2(struct qbm_image **layers,
                       const struct qcow2_map_extent *map, size_t n,
                       uint64_t size, unsigned cluster_bits,
                       const struct intervals *want, bool zeros,
                       const char *backing, struct out *o)
{
    uint64_t cs = 1ull << cluster_bits;
    struct intervals data = { 0 }, all = { 0 };
    struct qcow2_out_run *runs = NULL;
    struct qcow2_writer *w = NULL;
    size_t nruns = 0, i, j, k, m;
    int r = 0;

    /* Clusters holding data, restricted to what is wanted. */
    for (i = 0, j = 0; i < n && r == 0; i++) {
        uint64_t s = map[i].guest / cs;
        uint64_t e = div_round_up(map[i].guest + map[i].len, cs);

        if (!is_data(&map[i])) {
            continue;
        }
        if (!want) {
            r = iv_add(&data, s, e);
            continue;
        }
        while (j < want->n && want->v[j].end <= s) {
            j++;
        }
        for (k = j; k < want->n && want->v[k].start < e && r == 0; k++) {
            r = iv_add(&data, s > want->v[k].start ? s : want->v[k].start,
                       e < want->v[k].end ? e : want->v[k].end);
        }
    }
    /* Runs: data clusters, and the wanted clusters between them as zero
     * runs when asked for. */
    if (r == 0 && zeros && want) {
        for (k = 0; k < want->n && r == 0; k++) {
            r = iv_add(&all, want->v[k].start, want->v[k].end);
        }
    }
    if (r == 0) {
        runs = qbm_calloc(2 * (data.n + all.n) + 1, sizeof(*runs));
        if (!runs) {
            r = -ENOMEM;
        }
    }
    for (i = 0, k = 0; r == 0 && (i < data.n || k < all.n);) {
        /* Walk both lists; data wins where they overlap. */
        uint64_t ds = i < data.n ? data.v[i].start : UINT64_MAX;

        if (k < all.n && all.v[k].start < ds) {
            uint64_t ze = all.v[k].end < ds ? all.v[k].end : ds;

            runs[nruns++] =
                (struct qcow2_out_run){ all.v[k].start, ze - all.v[k].start,
                                        false };
            all.v[k].start = ze;
            if (all.v[k].start >= all.v[k].end) {
                k++;
            }
            continue;
        }
        runs[nruns++] =
            (struct qcow2_out_run){ data.v[i].start,
                                    data.v[i].end - data.v[i].start, true };
        while (k < all.n && all.v[k].end <= data.v[i].end) {
            k++;
        }
        if (k < all.n && all.v[k].start < data.v[i].end) {
            all.v[k].start = data.v[i].end;
        }
        i++;
    }
    if (r == 0) {
        r = qcow2_writer_plan(o->io, size, cluster_bits, backing,
                              backing ? "qcow2" : NULL, runs, nruns, &w);
    }
    if (r == 0) {
        r = out_room(o, qcow2_writer_end(w));
    }
    if (r == 0 && o->device) {
        /* In place: first make the device no qcow2 image (a previous one
         * would otherwise open over half-written tables after a failure),
         * and write the new header only once the rest is on disk. */
        r = zero_range(o, 0, cs, false);
        if (r == 0) {
            r = qbm_io_flush(o->io);
            if (r < 0) {
                qbm_err_prefix(r, "%s", o->output);
            }
        }
        qcow2_writer_set_ordered(w);
    }
    /* Copy each data run's pieces (one pass over the sorted map); the
     * first pass only counts, for progress. On a device, the parts of the
     * run's clusters that no piece covers (zeros inside a cluster, past
     * the virtual size) are zeroed. */
    for (int pass = 0; pass < 2; pass++) {
        for (k = 0, m = 0; r == 0 && k < nruns; k++) {
            uint64_t gs = runs[k].first * cs;
            uint64_t ge = (runs[k].first + runs[k].count) * cs;
            uint64_t host = qcow2_writer_run_host(w, k), pos = gs;

            if (!runs[k].data) {
                continue;
            }
            while (m < n && map[m].guest + map[m].len <= gs) {
                m++;
            }
            for (j = m; j < n && map[j].guest < ge && r == 0; j++) {
                uint64_t s = map[j].guest > gs ? map[j].guest : gs;
                uint64_t e = map[j].guest + map[j].len < ge
                                 ? map[j].guest + map[j].len
                                 : ge;

                if (!is_data(&map[j])) {
                    continue;
                }
                if (pass == 0) {
                    o->total += e - s;
                    continue;
                }
                if (o->device && s > pos) {
                    r = zero_range(o, host + pos - gs, s - pos, false);
                }
                prefetch(layers, map, n, j, o);
                r = r ? r
                      : copy_piece(layers, &map[j], s, e - s, o, host + s - gs);
                pos = e;
            }
            if (r == 0 && pass == 1 && o->device && pos < ge) {
                r = zero_range(o, host + pos - gs, ge - pos, false);
            }
        }
    }
    if (r == 0) {
        r = qcow2_writer_finish(w);
    }
    qcow2_writer_free(w);
    free(runs);
    qbm_darray_free(&data);
    qbm_darray_free(&all);
    return r;
}

static uint64_t data_bytes(const struct qcow2_map_extent *map, size_t n)
{
    uint64_t t = 0;
    size_t i;

    for (i = 0; i < n; i++) {
        t += is_data(&map[i]) ? map[i].len : 0;
    }
    return t;
}

/* ---- restore ---------------------------------------------------------------
 */

/* Open a backup image: qcow2 (its own layer only), or raw for the full. */
static int open_backup(const char *file, bool allow_raw, bool force_share,
                       struct qbm_image **ret)
{
    struct qbm_image *img;
    struct qbm_io *io;
    int r;

    r = qbm_io_file_open(file, false,
                         force_share ? QBM_LOCK_NONE : QBM_LOCK_READ, &io);
    r = r ? r : qbm_image_open_format(io, file, QBM_FORMAT_PROBE, false, &img);
    if (r == 0 && force_share) {
        img->lock = QBM_LOCK_NONE; /* its data file too */
    }
    if (r == 0 && img->raw && !allow_raw) {
        qbm_impl_close(img);
        r = qbm_err(EINVAL, "not a qcow2 image (incremental backups must "
                            "be qcow2)");
    }
    if (r < 0) {
        return qbm_err_prefix(r, "%s", file);
    }
    *ret = img;
    return 0;
}

/* Two nodes of one block device (/dev/vg/lv and /dev/dm-3, or a node
 * made with mknod) are different inodes of the same device. */
static bool same_stat(const struct stat *sa, const struct stat *sb)
{
    if (S_ISBLK(sa->st_mode) && S_ISBLK(sb->st_mode)) {
        return sa->st_rdev == sb->st_rdev;
    }
    return sa->st_dev == sb->st_dev && sa->st_ino == sb->st_ino;
}

static bool same_inode(const char *a, const char *b)
{
    struct stat sa, sb;

    return stat(a, &sa) == 0 && stat(b, &sb) == 0 && same_stat(&sa, &sb);
}

/* ---- reading backups, shared with op-rebuild.c ----------------------------
 */

/*
 * What restore reads, for the comparisons of op-rebuild.c: the backup
 * images opened under restore's rules, and the bytes of a piece of a map
 * extent from the same sources copy_piece() copies them from (keep the
 * two together).
 */

int qbm_backups_open(const char *const *images, size_t n, bool force_share,
                     struct qbm_image ***ret_layers, uint64_t *ret_size)
{
    struct qbm_image **layers;
    uint64_t size = 0;
    size_t i, j;
    int r = 0;

    if (n == 0) {
        return qbm_err(EINVAL, "no backup images given");
    }
    layers = qbm_calloc(n, sizeof(*layers));
    if (!layers) {
        return -ENOMEM;
    }
    for (i = 0; i < n && r == 0; i++) {
        for (j = 0; j < i && r == 0; j++) {
            if (same_inode(images[i], images[j])) {
                r = qbm_err(EINVAL, "%s is given twice", images[i]);
            }
        }
        /* The newest image goes first in the resolver's order. */
        r = r ? r
              : open_backup(images[i], i == 0, force_share, &layers[n - 1 - i]);
        if (r == 0) {
            uint64_t s = layers[n - 1 - i]->hdr.size;

            if (i == 0) {
                size = s;
            } else if (s != size) {
                r = qbm_err(EINVAL,
                            "%s: virtual size %llu differs from the "
                            "full backup's %llu",
                            images[i], (unsigned long long)s,
                            (unsigned long long)size);
            }
        }
    }
    if (r < 0) {
        qbm_backups_close(layers, n);
        return r;
    }
    *ret_layers = layers;
    *ret_size = size;
    return 0;
}

void qbm_backups_close(struct qbm_image **layers, size_t n)
{
    size_t i;

    for (i = 0; layers && i < n; i++) {
        qbm_impl_close(layers[i]);
    }
    free(layers);
}

int qbm_map_read(struct qbm_image **layers, const struct qcow2_map_extent *e,
                 uint64_t g, size_t len, void *buf)
{
    struct qbm_image *src = layers[e->layer];
    int r;

    if (e->type == QCOW2_MAP_DATA) {
        r = qbm_io_pread(qbm_image_data_io(src), buf, len,
                         e->host + (g - e->guest));
    } else if (e->type == QCOW2_MAP_COMPRESSED) {
        r = qcow2_read_compressed(src, e->host, g - e->start, buf, len);
    } else {
        memset(buf, 0, len);
        return 0;
    }
    return r < 0 ? qbm_err_prefix(r, "%s", src->filename) : 0;
}

void qbm_map_prefetch(struct qbm_image **layers,
                      const struct qcow2_map_extent *e, uint64_t g,
                      uint64_t len)
{
    int fd = qbm_io_fd(qbm_image_data_io(layers[e->layer]));

    if (fd >= 0 && e->type == QCOW2_MAP_DATA) {
        posix_fadvise(fd, (off_t)(e->host + (g - e->guest)), (off_t)len,
                      POSIX_FADV_WILLNEED);
    }
}

static int restore(const char *const *images, size_t n, const char *output,
                   int format, bool force_share, const char *checkpoint,
                   struct qbm_progress *progress)
{
    struct qbm_image **layers = NULL;
    struct qcow2_map_extent *map = NULL;
    struct out o = { .fd = -1, .progress = progress };
    size_t nmap = 0, i;
    uint64_t size = 0;
    int r = 0;

    if (n == 0) {
        r = qbm_err(EINVAL, "no backup images given");
    }
    if (checkpoint && format != QBM_OUTPUT_QCOW2) {
        r = qbm_err(EINVAL, "a checkpoint needs qcow2 output");
    }
    /* Verify everything before writing anything. */
    r = r ? r : out_check(&o, output);
    if (r == 0 && o.device && checkpoint) {
        /* Adding the bitmap opens the written image as an image. */
        r = qbm_err(EOPNOTSUPP,
                    "%s: --checkpoint onto a block device is not supported "
                    "yet; it was left as it is",
                    output);
    }
    for (i = 0; i < n && r == 0; i++) {
        if (same_inode(images[i], output)) {
            r = qbm_err(EINVAL, "%s: the output would overwrite an input",
                        images[i]);
        }
    }
    r = r ? r : qbm_backups_open(images, n, force_share, &layers, &size);
    if (r == 0) {
        r = qbm_resolve(layers, n, size, &map, &nmap);
    }
    if (r == 0) {
        /* Raw onto a device: every byte is written, with data or zeros. */
        o.total = format == QBM_OUTPUT_QCOW2 ? 0
                  : o.device                 ? size
                                             : data_bytes(map, nmap);
        r = out_create(&o);
    }
    if (r == 0) {
        r = format == QBM_OUTPUT_QCOW2 ? write_qcow2(layers, map, nmap, size,
                                                     16, NULL, false, NULL, &o)
                                       : write_raw(layers, map, nmap, size, &o);
    }
    if (r == 0 && checkpoint) {
        struct qbm_image *img = NULL;

        r = qbm_io_flush(o.io);
        r = r ? r : qbm_impl_open(o.tmp, QBM_OPEN_RDWR, &img);
        r = r ? r : qbm_impl_bitmap_add(img, checkpoint, 0, 0);
        r = r ? r : qbm_impl_commit(img);
        qbm_impl_close(img);
    }
    if (r == 0) {
        r = out_publish(&o);
    }
    out_free(&o);
    qbm_backups_close(layers, n);
    free(map);
    return r;
}

QBM_API int qbm_restore(const char *const *images, size_t n, const char *output,
                        int format, const char *checkpoint,
                        qbm_progress_fn progress, void *opaque)
{
    struct qbm_progress p = { progress, opaque, 0 };
    bool force_share = format & QBM_RESTORE_FORCE_SHARE;

    format &= ~QBM_RESTORE_FORCE_SHARE;
    if (!images || !output ||
        (format != QBM_OUTPUT_RAW && format != QBM_OUTPUT_QCOW2)) {
        return qbm_public_ret(qbm_err(EINVAL, "invalid arguments"));
    }
    return qbm_progress_ret(
        &p, restore(images, n, output, format, force_share, checkpoint, &p));
}

/* ---- extract
 * ----------------------------------------------------------------- */

struct want_ctx {
    struct intervals *iv;
    uint64_t cs;
};

static int want_cb(void *opaque, uint64_t off, uint64_t len)
{
    struct want_ctx *w = opaque;

    return iv_add(w->iv, off / w->cs, div_round_up(off + len, w->cs));
}

static int extract(const char *image, const char *bitmap, const char *output,
                   unsigned flags, const char *backing,
                   struct qbm_progress *progress)
{
    struct qbm_chain *ch = NULL;
    struct qbm_image **layers = NULL;
    struct qcow2_map_extent *map = NULL;
    struct out o = { .fd = -1, .progress = progress };
    struct intervals want = { 0 };
    size_t nmap = 0, n, i;
    unsigned bits = 16;
    uint64_t size;
    int r = 0, consistent = 1;
    bool out_failed = false; /* the message names OUTPUT, not IMAGE */

    if ((flags & QBM_EXTRACT_FULL) && backing) {
        return qbm_err_prefix(qbm_err(EINVAL, "a full backup has no backing "
                                              "file"),
                              "%s", image);
    }
    r = out_check(&o, output);
    if (r < 0) {
        out_free(&o);
        return r;
    }
    if (same_inode(image, output)) {
        out_free(&o);
        return qbm_err_prefix(qbm_err(EINVAL, "the output would overwrite "
                                              "the image"),
                              "%s", image);
    }
    r = qbm_impl_chain_open(
        image, flags & QBM_EXTRACT_FORCE_SHARE ? QBM_OPEN_FORCE_SHARE : 0, &ch);
    if (r < 0) {
        out_free(&o);
        return qbm_err_prefix(r, "%s", image);
    }
    n = ch->n;
    size = ch->layers[0]->hdr.size;
    /* Nor a backing file: a device is written while the chain is read,
     * and a file renamed over would replace it under the image. */
    for (i = 1; o.exists && i < n && r == 0; i++) {
        int fd = qbm_io_fd(ch->layers[i]->io);
        struct stat st;

        if (fd >= 0 && fstat(fd, &st) == 0 && same_stat(&st, &o.st)) {
            r = qbm_err(EINVAL,
                        "the output would overwrite %s, a backing "
                        "file of the image",
                        ch->layers[i]->filename);
        }
    }
    layers = r ? NULL : qbm_calloc(n, sizeof(*layers));
    if (r == 0 && !layers) {
        r = -ENOMEM;
    }
    for (i = 0; r == 0 && i < n; i++) {
        layers[i] = ch->layers[i];
    }
    if (r == 0 && !(flags & QBM_EXTRACT_FULL)) {
        struct qbm_image *top = layers[0];
        const struct qcow2_bitmap *bm = qcow2_bitmap_lookup(top, bitmap);
        struct want_ctx wc = { &want, 0 };
        uint64_t gran;

        if (!bm && !(flags & QBM_EXTRACT_CHAIN)) {
            r = qbm_err(ENOENT, "no bitmap named '%s'", bitmap);
        } else {
            gran = bm ? 1ull << bm->granularity_bits : 65536;
            bits = gran <= 4096    ? 12
                   : gran >= 65536 ? 16
                                   : (unsigned)__builtin_ctzll(gran);
            wc.cs = 1ull << bits;
            if (flags & QBM_EXTRACT_CHAIN) {
                r = qbm_impl_chain_bitmap_extents(ch, bitmap, want_cb, &wc,
                                                  &consistent);
            } else {
                size_t idx = (size_t)(bm - top->bitmaps);

                consistent = qbm_impl_bitmap_consistent(top, idx);
                r = consistent ? qbm_impl_bitmap_extents(top, idx, want_cb, &wc)
                               : 0;
            }
            if (r == 0 && !consistent) {
                r = qbm_err(EBUSY,
                            "bitmap '%s' is in use (inconsistent); "
                            "repair it first with 'qbm check --repair'",
                            bitmap);
            }
        }
    }
    if (r == 0) {
        r = qbm_resolve(layers, n, size, &map, &nmap);
        out_failed = r < 0; /* or rather: its message names the layer */
    }
    if (r == 0) {
        r = out_create(&o);
        out_failed = r < 0;
    }
    if (r == 0) {
        r = write_qcow2(layers, map, nmap, size, bits,
                        (flags & QBM_EXTRACT_FULL) ? NULL : &want,
                        !(flags & QBM_EXTRACT_FULL), backing, &o);
    }
    if (r == 0) {
        r = out_publish(&o);
        out_failed = r < 0;
    }
    if (r < 0 && !out_failed) {
        qbm_err_prefix(r, "%s", image);
    }
    out_free(&o);
    qbm_darray_free(&want);
    free(map);
    free(layers);
    qbm_impl_chain_close(ch);
    return r;
}

QBM_API int qbm_extract(const char *image, const char *bitmap,
                        const char *output, unsigned flags, const char *backing,
                        qbm_progress_fn progress, void *opaque)
{
    struct qbm_progress p = { progress, opaque, 0 };

    if (!image || !output || (flags & ~QBM_EXTRACT_MASK) ||
        (!bitmap && !(flags & QBM_EXTRACT_FULL))) {
        return qbm_public_ret(qbm_err(EINVAL, "invalid arguments"));
    }
    return qbm_progress_ret(&p,
                            extract(image, bitmap, output, flags, backing, &p));
}

/*
 * The next checkpoint, staged in IMAGE opened for writing: `next` added,
 * enabled, with the granularity of IMAGE's `bitmap`, which stays enabled
 * (libvirt's model: every checkpoint records) unless DISABLE_OLD. Committed
 * only when `commit`; otherwise closing drops it, and this only finds
 * what would refuse it (a name taken or invalid, an image that cannot be
 * edited).
 */
static int rotate(const char *image, const char *bitmap, const char *next,
                  unsigned flags, bool commit)
{
    struct qbm_image *img = NULL;
    const struct qcow2_bitmap *bm;
    int r;

    r = qbm_impl_open(image, QBM_OPEN_RDWR, &img);
    if (r < 0) {
        return r;
    }
    bm = qcow2_bitmap_lookup(img, bitmap);
    if (!bm) {
        r = qbm_err(ENOENT, "no bitmap named '%s' in this layer to rotate",
                    bitmap);
    } else {
        r = qbm_impl_bitmap_add(img, next, 1ull << bm->granularity_bits, 0);
    }
    if (r == 0 && (flags & QBM_EXTRACT_DISABLE_OLD)) {
        r = qbm_impl_bitmap_disable(img, bitmap);
    }
    if (r == 0 && commit) {
        r = qbm_impl_commit(img);
    }
    qbm_impl_close(img);
    return r;
}

static int extract_rotate(const char *image, const char *bitmap,
                          const char *next, const char *output, unsigned flags,
                          const char *backing, struct qbm_progress *progress)
{
    char msg[1024];
    int r;

    /* Whatever would refuse the rotation refuses the backup, before it is
     * written. */
    r = rotate(image, bitmap, next, flags, false);
    if (r < 0) {
        return qbm_err_prefix(r, "%s: cannot start checkpoint '%s'", image,
                              next);
    }
    r = extract(image, bitmap, output, flags & QBM_EXTRACT_MASK, backing,
                progress);
    if (r < 0) {
        return r;
    }
    /* OUTPUT is durable: only now may the next checkpoint start. */
    r = rotate(image, bitmap, next, flags, true);
    if (r < 0) {
        snprintf(msg, sizeof(msg), "%s", qbm_err_message());
        return qbm_err(-r,
                       "%s: the backup was written, but starting checkpoint "
                       "'%s' failed: %s",
                       image, next, msg);
    }
    return 0;
}

QBM_API int qbm_extract_rotate(const char *image, const char *bitmap,
                               const char *next, const char *output,
                               unsigned flags, const char *backing,
                               qbm_progress_fn progress, void *opaque)
{
    struct qbm_progress p = { progress, opaque, 0 };

    if (!image || !bitmap || !next || !output ||
        (flags & ~QBM_EXTRACT_ROTATE_MASK)) {
        return qbm_public_ret(qbm_err(EINVAL, "invalid arguments"));
    }
    return qbm_progress_ret(
        &p, extract_rotate(image, bitmap, next, output, flags, backing, &p));
}
