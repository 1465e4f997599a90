/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* qbm info: header, features and bitmaps of an image or a whole chain. */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "qbm-tool.h"

static const char info_usage[] =
    "Usage: qbm info [--chain] [--output=human|json] [-U] IMAGE\n"
    "Show IMAGE's format, geometry, features and bitmaps (name, granularity,\n"
    "flags, consistency and how many bytes each marks dirty).\n\n"
    "  -c, --chain           show every layer of the backing chain, top "
    "first\n";

static const char *const feature_words[] = { "incompatible", "compatible",
                                             "autoclear" };

static const char *bitmaps_state_name(int state)
{
    switch (state) {
    case QBM_BITMAPS_OK:
        return "ok";
    case QBM_BITMAPS_STALE:
        return "stale";
    default:
        return "none";
    }
}

static void json_bool(struct outbuf *ob, const char *key, bool v, bool comma)
{
    ob_printf(ob, "\"%s\": %s%s", key, v ? "true" : "false", comma ? ", " : "");
}

/* Collect per-bitmap dirty byte counts; -1 entries mean "unreadable". */
static int count_dirty(struct qbm_image *img, int64_t **ret)
{
    size_t n = qbm_bitmap_count(img), i;
    int64_t *v = calloc(n ? n : 1, sizeof(*v));

    if (!v) {
        tool_error(qbm_image_filename(img), "out of memory");
        return -1;
    }
    for (i = 0; i < n; i++) {
        uint64_t bytes;

        if (qbm_bitmap_dirty_bytes(img, i, &bytes) < 0) {
            /* A stale in-use copy may be unreadable: report it as unknown;
             * a consistent bitmap that cannot be read is corruption. */
            if (qbm_bitmap_flags(img, i) & QBM_BITMAP_IN_USE) {
                v[i] = -1;
                continue;
            }
            tool_lib_error(qbm_image_filename(img));
            free(v);
            return -1;
        }
        v[i] = (int64_t)bytes;
    }
    *ret = v;
    return 0;
}

/* "snapshots": qemu-img's array (always present here, maybe empty). */
static void snapshots_json(struct outbuf *ob, const struct qbm_image *img)
{
    struct qbm_snapshot_info sn;
    unsigned i;

    ob_puts(ob, ", \"snapshots\": [");
    for (i = 0; i < qbm_image_snapshot_count(img); i++) {
        if (qbm_image_snapshot(img, i, &sn) < 0) {
            continue;
        }
        ob_puts(ob, i ? ", {\"id\": " : "{\"id\": ");
        ob_json_string(ob, sn.id);
        ob_json_field(ob, "name", sn.name);
        ob_printf(ob,
                  ", \"vm-state-size\": %" PRIu64 ", \"date-sec\": %" PRIu32
                  ", \"date-nsec\": %" PRIu32 ", \"vm-clock-sec\": %" PRIu64
                  ", \"vm-clock-nsec\": %" PRIu64,
                  sn.vm_state_size, sn.date_sec, sn.date_nsec,
                  sn.vm_clock_nsec / 1000000000u,
                  sn.vm_clock_nsec % 1000000000u);
        if (sn.icount != QBM_SNAPSHOT_NO_ICOUNT) {
            ob_printf(ob, ", \"icount\": %" PRIu64, sn.icount);
        }
        ob_puts(ob, "}");
    }
    ob_puts(ob, "]");
}

/* Whether the image is encrypted (its header may be damaged). */
static bool is_encrypted(struct qbm_image *img)
{
    struct qbm_encryption_info e;

    return qbm_image_encryption(img, &e) == 0 || qbm_get_errno() != ENOENT;
}

/* "encrypt": qemu-img's description of an encrypted image. */
static void encrypt_json(struct outbuf *ob, struct qbm_image *img)
{
    struct qbm_encryption_info e;
    unsigned i;

    if (qbm_image_encryption(img, &e) < 0) {
        if (qbm_get_errno() == ENOENT) {
            return;
        }
        /* A damaged LUKS header: say what is known. */
        ob_puts(ob, ", \"encrypt\": {\"format\": \"luks\"}");
        return;
    }
    ob_printf(ob, ", \"encrypt\": {\"format\": \"%s\"", e.format);
    if (strcmp(e.format, "luks") == 0) {
        ob_json_field(ob, "cipher-alg", e.cipher_alg);
        ob_json_field(ob, "cipher-mode", e.cipher_mode);
        ob_json_field(ob, "ivgen-alg", e.ivgen_alg);
        if (e.ivgen_hash_alg[0]) {
            ob_json_field(ob, "ivgen-hash-alg", e.ivgen_hash_alg);
        }
        ob_json_field(ob, "hash-alg", e.hash_alg);
        ob_json_field(ob, "uuid", e.uuid);
        ob_printf(ob,
                  ", \"payload-offset\": %" PRIu64
                  ", \"master-key-iters\": %" PRIu32 ", \"slots\": [",
                  e.payload_offset, e.master_key_iters);
        for (i = 0; i < 8; i++) {
            const struct qbm_luks_slot *sl = &e.slots[i];

            ob_printf(ob, "%s{\"active\": %s", i ? ", " : "",
                      sl->active ? "true" : "false");
            if (sl->active) {
                ob_printf(ob, ", \"iters\": %" PRIu32 ", \"stripes\": %" PRIu32,
                          sl->iters, sl->stripes);
            }
            ob_printf(ob, ", \"key-offset\": %" PRIu64 "}", sl->key_offset);
        }
        ob_puts(ob, "]");
    }
    ob_puts(ob, "}");
}

/*
 * "format-specific": the object qemu-img info writes for a qcow2 image,
 * with the same keys, types and values, so that a consumer of qemu-img's
 * JSON reads qbm's unchanged: version 2 images have only compat,
 * compression-type and refcount-bits; bitmaps are listed only when QEMU
 * sees some (not with a stale extension), data-file-raw only with a data
 * file.
 */
static void format_specific_json(struct outbuf *ob, struct qbm_image *img)
{
    uint64_t incompat = qbm_image_features(img, QBM_FEATURE_INCOMPATIBLE);
    bool v3 = qbm_image_version(img) >= 3;
    size_t i, n = qbm_bitmap_count(img);

    ob_printf(ob,
              ", \"format-specific\": {\"type\": \"qcow2\", \"data\": "
              "{\"compat\": \"%s\", \"compression-type\": \"%s\"",
              v3 ? "1.1" : "0.10", qbm_image_compression_type(img));
    if (v3) {
        ob_puts(ob, ", ");
        json_bool(ob, "lazy-refcounts",
                  qbm_image_features(img, QBM_FEATURE_COMPATIBLE) &
                      QBM_COMPAT_LAZY_REFCOUNTS,
                  false);
    }
    if (v3 && qbm_image_bitmaps_state(img) == QBM_BITMAPS_OK && n) {
        ob_puts(ob, ", \"bitmaps\": [");
        for (i = 0; i < n; i++) {
            unsigned flags = qbm_bitmap_flags(img, i);

            ob_printf(ob, "%s{\"flags\": [%s%s%s], \"name\": ", i ? ", " : "",
                      flags & QBM_BITMAP_IN_USE ? "\"in-use\"" : "",
                      (flags & QBM_BITMAP_IN_USE) && (flags & QBM_BITMAP_AUTO)
                          ? ", "
                          : "",
                      flags & QBM_BITMAP_AUTO ? "\"auto\"" : "");
            ob_json_string(ob, qbm_bitmap_name(img, i));
            ob_printf(ob, ", \"granularity\": %" PRIu64 "}",
                      qbm_bitmap_granularity(img, i));
        }
        ob_puts(ob, "]");
    }
    ob_printf(ob, ", \"refcount-bits\": %u", qbm_image_refcount_bits(img));
    encrypt_json(ob, img);
    if (v3 && (incompat & QBM_INCOMPAT_DATA_FILE)) {
        if (qbm_image_data_file(img)) {
            ob_json_field(ob, "data-file", qbm_image_data_file(img));
        }
        ob_puts(ob, ", ");
        json_bool(ob, "data-file-raw",
                  qbm_image_features(img, QBM_FEATURE_AUTOCLEAR) &
                      QBM_AUTOCLEAR_DATA_FILE_RAW,
                  false);
    }
    if (v3) {
        ob_puts(ob, ", ");
        json_bool(ob, "corrupt", incompat & QBM_INCOMPAT_CORRUPT, true);
        json_bool(ob, "extended-l2", incompat & QBM_INCOMPAT_EXTL2, false);
    }
    ob_puts(ob, "}}");
}

/* Space figures; -1 where they cannot be read (a damaged image: check
 * says why). */
struct space {
    int64_t end;     /* image end offset */
    int64_t bitmaps; /* bytes the bitmaps occupy */
};

static void get_space(struct qbm_image *img, struct space *sp)
{
    uint64_t v;

    sp->end = qbm_image_end_offset(img, &v) < 0 ? -1 : (int64_t)v;
    sp->bitmaps = qbm_image_bitmaps_bytes(img, &v) < 0 ? -1 : (int64_t)v;
}

static void json_int_or_null(struct outbuf *ob, const char *key, int64_t v)
{
    if (v < 0) {
        ob_printf(ob, ", \"%s\": null", key);
    } else {
        ob_printf(ob, ", \"%s\": %" PRId64, key, v);
    }
}

static void info_json(struct outbuf *ob, struct qbm_image *img,
                      const char *name, const int64_t *dirty,
                      const struct space *sp)
{
    bool raw = strcmp(qbm_image_format(img), "raw") == 0;
    const char *backing = qbm_image_backing_file(img);
    uint64_t incompat = qbm_image_features(img, QBM_FEATURE_INCOMPATIBLE);
    uint64_t actual;
    unsigned w, bit;
    bool first;
    size_t i;

    ob_puts(ob, "{\"filename\": ");
    ob_json_string(ob, name);
    ob_printf(ob,
              ", \"format\": \"%s\", \"virtual-size\": %" PRIu64
              ", \"file-size\": %" PRIu64,
              qbm_image_format(img), qbm_image_virtual_size(img),
              qbm_image_file_size(img));
    if (qbm_image_allocated_size(img, &actual) == 0) {
        ob_printf(ob, ", \"actual-size\": %" PRIu64, actual);
    }
    ob_printf(ob, ", \"block-device\": %s",
              qbm_image_capacity(img) ? "true" : "false");
    if (raw) {
        ob_puts(ob, ", \"dirty-flag\": false}");
        return;
    }
    json_int_or_null(ob, "image-end-offset", sp->end);
    json_int_or_null(ob, "bitmaps-size", sp->bitmaps);
    ob_printf(ob,
              ", \"cluster-size\": %" PRIu64 ", \"compat\": \"%s\", "
              "\"refcount-bits\": %u, \"compression-type\": \"%s\", ",
              qbm_image_cluster_size(img),
              qbm_image_version(img) >= 3 ? "1.1" : "0.10",
              qbm_image_refcount_bits(img), qbm_image_compression_type(img));
    json_bool(ob, "extended-l2", incompat & QBM_INCOMPAT_EXTL2, true);
    json_bool(ob, "lazy-refcounts",
              qbm_image_features(img, QBM_FEATURE_COMPATIBLE) &
                  QBM_COMPAT_LAZY_REFCOUNTS,
              true);
    json_bool(ob, "corrupt", incompat & QBM_INCOMPAT_CORRUPT, true);
    json_bool(ob, "dirty-flag", incompat & QBM_INCOMPAT_DIRTY, false);
    if (is_encrypted(img)) {
        ob_puts(ob, ", \"encrypted\": true");
    }
    if (backing) {
        char *full = qbm_image_backing_path(img);

        ob_json_field(ob, "backing-filename", backing);
        if (full) {
            ob_json_field(ob, "full-backing-filename", full);
            free(full);
        }
    }
    if (qbm_image_backing_format(img)) {
        ob_json_field(ob, "backing-filename-format",
                      qbm_image_backing_format(img));
    }
    if (qbm_image_data_file(img)) {
        ob_json_field(ob, "data-file", qbm_image_data_file(img));
    }
    snapshots_json(ob, img);
    format_specific_json(ob, img);
    for (w = 0; w < 3; w++) {
        ob_printf(ob, ", \"%s-features\": %" PRIu64, feature_words[w],
                  qbm_image_features(img, w));
    }
    ob_puts(ob, ", \"feature-names\": [");
    first = true;
    for (w = 0; w < 3; w++) {
        uint64_t word = qbm_image_features(img, w);

        for (bit = 0; bit < 64; bit++) {
            const char *fname;
            char tmp[64];

            if (!(word & (1ull << bit))) {
                continue;
            }
            fname = qbm_image_feature_name(img, w, bit);
            if (!fname) {
                snprintf(tmp, sizeof(tmp), "%s bit %u", feature_words[w], bit);
                fname = tmp;
            }
            ob_puts(ob, first ? "" : ", ");
            ob_json_string(ob, fname);
            first = false;
        }
    }
    ob_printf(ob, "], \"bitmaps-state\": \"%s\", \"bitmaps\": [",
              bitmaps_state_name(qbm_image_bitmaps_state(img)));
    for (i = 0; i < qbm_bitmap_count(img); i++) {
        unsigned flags = qbm_bitmap_flags(img, i);

        ob_puts(ob, i ? ", {\"name\": " : "{\"name\": ");
        ob_json_string(ob, qbm_bitmap_name(img, i));
        ob_printf(ob, ", \"granularity\": %" PRIu64 ", \"flags\": [%s%s%s], ",
                  qbm_bitmap_granularity(img, i),
                  flags & QBM_BITMAP_IN_USE ? "\"in-use\"" : "",
                  (flags & QBM_BITMAP_IN_USE) && (flags & QBM_BITMAP_AUTO)
                      ? ", "
                      : "",
                  flags & QBM_BITMAP_AUTO ? "\"auto\"" : "");
        json_bool(ob, "consistent", qbm_bitmap_consistent(img, i), true);
        if (dirty[i] < 0) {
            ob_puts(ob, "\"dirty-bytes\": null}");
        } else {
            ob_printf(ob, "\"dirty-bytes\": %" PRId64 "}", dirty[i]);
        }
    }
    ob_puts(ob, "]}");
}

static const char *yesno(bool v)
{
    return v ? "yes" : "no";
}

static void info_human(struct outbuf *ob, struct qbm_image *img,
                       const char *name, const int64_t *dirty,
                       const struct space *sp)
{
    const char *backing = qbm_image_backing_file(img);
    uint64_t incompat = qbm_image_features(img, QBM_FEATURE_INCOMPATIBLE);
    char size[32];
    unsigned w, bit;
    size_t i;

    format_size(size, sizeof(size), qbm_image_virtual_size(img));
    ob_puts(ob, "image: ");
    ob_human_string(ob, name);
    ob_printf(ob,
              "\nfile format: %s\n"
              "virtual size: %s (%" PRIu64 " bytes)\n"
              "file size: %" PRIu64 " bytes%s\n",
              qbm_image_format(img), size, qbm_image_virtual_size(img),
              qbm_image_file_size(img),
              qbm_image_capacity(img) ? " (block device)" : "");
    if (strcmp(qbm_image_format(img), "raw") == 0) {
        return;
    }
    if (sp->end < 0) {
        ob_puts(ob, "image end offset: unknown (refcounts unreadable)\n");
    } else {
        ob_printf(ob, "image end offset: %" PRId64 "\n", sp->end);
    }
    ob_printf(ob, "cluster size: %" PRIu64 "\n", qbm_image_cluster_size(img));
    if (backing) {
        char *full = qbm_image_backing_path(img);

        ob_puts(ob, "backing file: ");
        ob_human_string(ob, backing);
        if (full && strcmp(full, backing) != 0) {
            ob_puts(ob, " (actual path: ");
            ob_human_string(ob, full);
            ob_puts(ob, ")");
        }
        ob_puts(ob, "\n");
        free(full);
    }
    if (qbm_image_backing_format(img)) {
        ob_puts(ob, "backing file format: ");
        ob_human_string(ob, qbm_image_backing_format(img));
        ob_puts(ob, "\n");
    }
    if (qbm_image_data_file(img)) {
        ob_puts(ob, "data file: ");
        ob_human_string(ob, qbm_image_data_file(img));
        ob_puts(ob, "\n");
    }
    ob_printf(
        ob,
        "format version: %u (compat %s)\nrefcount bits: %u\n"
        "compression type: %s\nextended l2: %s\nlazy refcounts: %s\n"
        "corrupt: %s\ndirty flag: %s\nsnapshots: %u\nfeatures:",
        qbm_image_version(img), qbm_image_version(img) >= 3 ? "1.1" : "0.10",
        qbm_image_refcount_bits(img), qbm_image_compression_type(img),
        yesno(incompat & QBM_INCOMPAT_EXTL2),
        yesno(qbm_image_features(img, QBM_FEATURE_COMPATIBLE) &
              QBM_COMPAT_LAZY_REFCOUNTS),
        yesno(incompat & QBM_INCOMPAT_CORRUPT),
        yesno(incompat & QBM_INCOMPAT_DIRTY), qbm_image_snapshot_count(img));
    for (w = 0; w < 3; w++) {
        uint64_t word = qbm_image_features(img, w);
        bool first = true;

        ob_printf(ob, "%s %s 0x%" PRIx64, w ? "," : "", feature_words[w], word);
        for (bit = 0; bit < 64; bit++) {
            const char *fname;

            if (!(word & (1ull << bit))) {
                continue;
            }
            fname = qbm_image_feature_name(img, w, bit);
            if (fname) {
                ob_printf(ob, "%s%s", first ? " (" : ", ", fname);
            } else {
                ob_printf(ob, "%sbit %u", first ? " (" : ", ", bit);
            }
            first = false;
        }
        if (!first) {
            ob_puts(ob, ")");
        }
    }
    ob_puts(ob, "\n");
    switch (qbm_image_bitmaps_state(img)) {
    case QBM_BITMAPS_NONE:
        ob_puts(ob, "bitmaps: none\n");
        return;
    case QBM_BITMAPS_STALE:
        ob_puts(ob, "bitmaps: stale (the bitmaps extension is present but "
                    "the autoclear \"bitmaps\" bit is clear: a program "
                    "without bitmap support wrote the image, and QEMU "
                    "ignores all of its bitmaps)\n");
        return;
    default:
        break;
    }
    ob_puts(ob, "bitmaps: ok\n");
    if (sp->bitmaps >= 0) {
        format_size(size, sizeof(size), (uint64_t)sp->bitmaps);
        ob_printf(ob, "bitmaps size: %" PRId64 " bytes (%s)\n", sp->bitmaps,
                  size);
    }
    for (i = 0; i < qbm_bitmap_count(img); i++) {
        unsigned flags = qbm_bitmap_flags(img, i);

        ob_puts(ob, "    ");
        ob_human_string(ob, qbm_bitmap_name(img, i));
        ob_printf(ob,
                  ":\n        granularity: %" PRIu64 "\n"
                  "        flags:%s%s%s\n        consistent: %s\n",
                  qbm_bitmap_granularity(img, i),
                  flags & QBM_BITMAP_IN_USE ? " in-use" : "",
                  flags & QBM_BITMAP_AUTO ? " auto" : "",
                  flags ? "" : " (none: disabled)",
                  qbm_bitmap_consistent(img, i)
                      ? "yes"
                      : "no (in-use: QEMU did not store it back; its "
                        "contents are stale)");
        if (dirty[i] < 0) {
            ob_puts(ob, "        dirty bytes: unknown (table unreadable)\n");
        } else {
            format_size(size, sizeof(size), (uint64_t)dirty[i]);
            ob_printf(ob, "        dirty bytes: %" PRId64 " (%s)\n", dirty[i],
                      size);
        }
    }
}

static int describe(struct outbuf *ob, enum output_format fmt,
                    struct qbm_image *img, const char *name)
{
    int64_t *dirty = NULL;
    struct space sp;

    if (count_dirty(img, &dirty) < 0) {
        return -1;
    }
    get_space(img, &sp);
    if (fmt == OUTPUT_JSON) {
        info_json(ob, img, name, dirty, &sp);
    } else {
        info_human(ob, img, name, dirty, &sp);
    }
    free(dirty);
    return 0;
}

int cmd_info(int argc, char **argv)
{
    static const struct option opts[] = {
        { "chain", no_argument, NULL, 'c' },
        { "backing-chain", no_argument, NULL, 'c' },
        { NULL, 0, NULL, 0 },
    };
    struct tool_args a = {
        .cmd = "info",
        .usage = info_usage,
        .shortopts = "c",
        .opts = opts,
        .common = TOOL_OPT_READ,
        .min_args = 1,
        .max_args = 1,
        .args_hint = "one IMAGE argument",
    };
    enum output_format fmt;
    struct outbuf ob = { 0 };
    bool chain = false;
    unsigned flags;
    const char *file;
    int c, ret = 0;

    while ((c = tool_getopt(&a, argc, argv)) > 0) {
        switch (c) {
        case 'c':
            chain = true;
            break;
        }
    }
    if (c < 0) {
        return a.status;
    }
    fmt = a.output;
    flags = a.open_flags;
    file = a.args[0];
    if (chain) {
        struct qbm_chain *ch = tool_chain_open(file, flags);
        size_t i;

        if (!ch) {
            return 1;
        }
        if (fmt == OUTPUT_JSON) {
            ob_puts(&ob, "[");
        }
        for (i = 0; i < qbm_chain_length(ch) && ret == 0; i++) {
            if (i) {
                ob_puts(&ob, fmt == OUTPUT_JSON ? ", " : "\n");
            }
            if (describe(&ob, fmt, qbm_chain_layer(ch, i),
                         qbm_chain_filename(ch, i)) < 0) {
                ret = 1;
            }
        }
        if (fmt == OUTPUT_JSON) {
            ob_puts(&ob, "]\n");
        }
        qbm_chain_close(ch);
    } else {
        struct qbm_image *img = tool_open(file, flags);

        if (!img) {
            return 1;
        }
        if (describe(&ob, fmt, img, file) < 0) {
            ret = 1;
        } else if (fmt == OUTPUT_JSON) {
            ob_puts(&ob, "\n");
        }
        qbm_close(img);
    }
    if (ret) {
        ob_free(&ob);
        return ret;
    }
    return ob_flush(&ob);
}
