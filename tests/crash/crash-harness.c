/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * Crash harness: apply one edit to an image through the fault-injecting
 * I/O backend, once to count its write and flush points, then once per
 * point and seed with a simulated crash there, writing what the disk would
 * hold afterwards to OUTDIR/crash-POINT-SEED.qcow2 (and the uncrashed
 * result to OUTDIR/after.qcow2). test_crash.py judges them with QEMU.
 *
 * With --fail=ERRNO, instead of crashing, each point in turn fails once
 * with that error and the rest succeeds (a full disk, a transient EIO):
 * the image then left behind (what reads see) goes to
 * OUTDIR/failed-POINT.qcow2 and the commit's message to
 * OUTDIR/failed-POINT.txt.
 *
 * A point that is a vectored write (a batch of clusters) is cut: a prefix
 * of its sectors is written before the crash or the failure. Prints the
 * number of points and how many of the crashes or failures cut a batch.
 *
 * Usage: crash-harness [--fail=ERRNO] INPUT OUTDIR SEEDS OP ARGS...
 *   OP: add NAME GRANULARITY DISABLED | remove NAME... | clear NAME |
 *       enable NAME | disable NAME | rename OLD NEW | merge TARGET SOURCE |
 *       dirty NAME OFFSET LENGTH | salvage NAME |
 *       consolidate INCREMENTAL... (oldest first) | backing NAME FORMAT |
 *       rebuild NAME GRANULARITY FULL [INCREMENTAL...] (oldest first)
 */
#include <stdio.h>
#include <stdlib.h>

#include "internal.h"

static uint8_t *read_file(const char *path, size_t *ret_len)
{
    FILE *f = fopen(path, "rb");
    uint8_t *buf = NULL;
    long len;

    if (!f || fseek(f, 0, SEEK_END) || (len = ftell(f)) < 0 ||
        fseek(f, 0, SEEK_SET)) {
        perror(path);
        exit(2);
    }
    buf = malloc((size_t)len + 1);
    if (!buf || fread(buf, 1, (size_t)len, f) != (size_t)len) {
        perror(path);
        exit(2);
    }
    fclose(f);
    *ret_len = (size_t)len;
    return buf;
}

static void write_file(const char *path, const uint8_t *buf, size_t len)
{
    FILE *f = fopen(path, "wb");

    if (!f || fwrite(buf, 1, len, f) != len || fclose(f)) {
        perror(path);
        exit(2);
    }
}

/* Stage the edit; returns 0 or -1. */
static int apply(struct qbm_image *img, char **op, int nop)
{
    const char *what = op[0];
    int i;

    if (!strcmp(what, "add") && nop == 4) {
        return qbm_bitmap_add(img, op[1], strtoull(op[2], NULL, 0),
                              atoi(op[3]) ? QBM_ADD_DISABLED : 0);
    }
    if (!strcmp(what, "remove") && nop >= 2) {
        for (i = 1; i < nop; i++) {
            if (qbm_bitmap_remove(img, op[i]) < 0) {
                return -1;
            }
        }
        return 0;
    }
    if (!strcmp(what, "clear") && nop == 2) {
        return qbm_bitmap_clear(img, op[1]);
    }
    if (!strcmp(what, "enable") && nop == 2) {
        return qbm_bitmap_enable(img, op[1]);
    }
    if (!strcmp(what, "disable") && nop == 2) {
        return qbm_bitmap_disable(img, op[1]);
    }
    if (!strcmp(what, "rename") && nop == 3) {
        return qbm_bitmap_rename(img, op[1], op[2]);
    }
    if (!strcmp(what, "merge") && nop == 3) {
        return qbm_bitmap_merge(img, op[1], img, op[2]);
    }
    if (!strcmp(what, "dirty") && nop == 4) {
        return qbm_bitmap_set_dirty(img, op[1], strtoull(op[2], NULL, 0),
                                    strtoull(op[3], NULL, 0));
    }
    if (!strcmp(what, "salvage") && nop == 2) {
        return qbm_bitmap_salvage(img, op[1]);
    }
    fprintf(stderr, "crash-harness: bad operation\n");
    exit(2);
}

/* Run the edit with a crash at `point` (0: none), or with only that point
 * failing with fail_err. Returns the io. */
static struct qbm_io *run(const uint8_t *buf, size_t len, uint64_t point,
                          uint32_t seed, char **op, int nop, int fail_err,
                          int *ret_rc)
{
    struct qbm_image *img;
    struct qbm_io *io;
    int r;

    if (qbm_io_fault_open(buf, len, fail_err ? 0 : point, seed, &io) < 0) {
        fprintf(stderr, "crash-harness: %s\n", qbm_get_error());
        exit(2);
    }
    if (fail_err) {
        qbm_io_fault_fail_once(io, point, fail_err);
    }
    r = qbm_image_open_io(io, "crash-test", true, &img);
    if (r < 0) {
        fprintf(stderr, "crash-harness: open: %s\n", qbm_get_error());
        exit(2);
    }
    if (!strcmp(op[0], "consolidate")) {
        struct qbm_image *incs[16];
        int i, n = nop - 1;

        if (n < 1 || n > 16) {
            fprintf(stderr, "crash-harness: 1 to 16 incrementals\n");
            exit(2);
        }
        for (i = 0; i < n; i++) {
            incs[n - 1 - i] = qbm_open(op[1 + i], QBM_OPEN_FORCE_SHARE);
            if (!incs[n - 1 - i]) {
                fprintf(stderr, "crash-harness: %s\n", qbm_get_error());
                exit(2);
            }
        }
        *ret_rc = qbm_consolidate_images(img, incs, (size_t)n, NULL);
        for (i = 0; i < n; i++) {
            qbm_close(incs[i]);
        }
    } else if (!strcmp(op[0], "rebuild") && nop >= 4) {
        struct qbm_image **bk;
        uint64_t size, dirty;
        size_t n = (size_t)(nop - 3);

        if (qbm_backups_open((const char *const *)op + 3, n, false, &bk,
                             &size) < 0) {
            fprintf(stderr, "crash-harness: %s\n", qbm_get_error());
            exit(2);
        }
        if (qbm_rebuild_stage(&img, 1, bk, n, op[1],
                              strtoull(op[2], NULL, 0), NULL, &dirty) < 0) {
            fprintf(stderr, "crash-harness: rebuild: %s\n", qbm_get_error());
            exit(2);
        }
        *ret_rc = qbm_commit(img);
        qbm_backups_close(bk, n);
    } else if (!strcmp(op[0], "backing") && nop == 3) {
        *ret_rc = qbm_image_set_backing(img, op[1], op[2]);
    } else {
        if (apply(img, op, nop) < 0) {
            fprintf(stderr, "crash-harness: edit: %s\n", qbm_get_error());
            exit(2);
        }
        *ret_rc = qbm_commit(img);
    }
    /* Detach the io from the image so qbm_close leaves it to us. */
    img->io = NULL;
    qbm_close(img);
    return io;
}

/* --fail mode: every point fails once in turn. */
static int run_failures(const uint8_t *buf, size_t len, uint64_t npoints,
                        const char *outdir, char **op, int nop, int err)
{
    const uint8_t *live;
    size_t livelen;
    uint64_t point, cuts = 0;
    struct qbm_io *io;
    char path[4096];
    FILE *f;
    int rc;

    for (point = 1; point <= npoints; point++) {
        io = run(buf, len, point, 1, op, nop, err, &rc);
        cuts += qbm_io_fault_cut(io, NULL);
        if (rc == 0) {
            fprintf(stderr,
                    "crash-harness: commit succeeded despite an error "
                    "at point %llu\n",
                    (unsigned long long)point);
            return 1;
        }
        snprintf(path, sizeof(path), "%s/failed-%llu.txt", outdir,
                 (unsigned long long)point);
        f = fopen(path, "w");
        if (!f || fprintf(f, "%s\n", qbm_get_error()) < 0 || fclose(f)) {
            perror(path);
            exit(2);
        }
        live = qbm_io_mem_data(qbm_io_fault_live(io), &livelen);
        snprintf(path, sizeof(path), "%s/failed-%llu.qcow2", outdir,
                 (unsigned long long)point);
        write_file(path, live, livelen);
        qbm_io_close(io);
    }
    printf("%llu %llu\n", (unsigned long long)npoints,
           (unsigned long long)cuts);
    return 0;
}

int main(int argc, char **argv)
{
    uint8_t *buf, *out;
    size_t len, outlen;
    uint64_t npoints, point, cuts = 0;
    uint32_t seed, nseeds;
    struct qbm_io *io;
    char path[4096];
    int rc, fail_err = 0;

    if (argc > 1 && !strncmp(argv[1], "--fail=", 7)) {
        fail_err = atoi(argv[1] + 7);
        argv++;
        argc--;
    }
    if (argc < 5) {
        fprintf(stderr, "usage: crash-harness INPUT OUTDIR SEEDS OP "
                        "ARGS...\n");
        return 2;
    }
    buf = read_file(argv[1], &len);
    nseeds = (uint32_t)atoi(argv[3]);

    io = run(buf, len, 0, 1, argv + 4, argc - 4, 0, &rc);
    if (rc < 0) {
        fprintf(stderr, "crash-harness: commit: %s\n", qbm_get_error());
        return 1;
    }
    npoints = qbm_io_fault_ops(io);
    /* After the final flush nothing is pending: the crash image is the
     * durable state. */
    if (qbm_io_fault_crash_image(io, &out, &outlen) < 0) {
        return 1;
    }
    snprintf(path, sizeof(path), "%s/after.qcow2", argv[2]);
    write_file(path, out, outlen);
    free(out);
    qbm_io_close(io);
    if (fail_err) {
        rc = run_failures(buf, len, npoints, argv[2], argv + 4, argc - 4,
                          fail_err);
        free(buf);
        return rc;
    }

    for (point = 1; point <= npoints; point++) {
        for (seed = 1; seed <= nseeds; seed++) {
            io = run(buf, len, point, seed * 2654435761u, argv + 4,
                     argc - 4, 0, &rc);
            if (rc == 0) {
                fprintf(stderr, "crash-harness: commit succeeded despite a "
                        "crash at point %llu\n", (unsigned long long)point);
                return 1;
            }
            cuts += qbm_io_fault_cut(io, NULL);
            if (qbm_io_fault_crash_image(io, &out, &outlen) < 0) {
                return 1;
            }
            snprintf(path, sizeof(path), "%s/crash-%llu-%u.qcow2", argv[2],
                     (unsigned long long)point, seed);
            write_file(path, out, outlen);
            free(out);
            qbm_io_close(io);
        }
    }
    printf("%llu %llu\n", (unsigned long long)npoints,
           (unsigned long long)cuts);
    free(buf);
    return 0;
}
