/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* Decoders of the on-disk structures, on hand-built bytes. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "internal.h"

/* A version 3 header with 512-byte clusters and no extensions. */
static void make_header(uint8_t *b, size_t len)
{
    memset(b, 0, len);
    be32_store(b, QCOW2_MAGIC);
    be32_store(b + 4, 3);
    be32_store(b + 20, 9);
    be64_store(b + 24, 1 << 20);
    be32_store(b + 96, 4);
    be32_store(b + 100, 112);
}

static void test_header_minimal(void **state)
{
    uint8_t b[512];
    struct qcow2_header h;

    make_header(b, sizeof(b));
    assert_int_equal(qcow2_header_decode(b, sizeof(b), 512, &h), 0);
    assert_int_equal(h.version, 3);
    assert_int_equal(h.cluster_size, 512);
    assert_int_equal(h.size, 1 << 20);
    assert_int_equal(h.refcount_order, 4);
    assert_int_equal(h.nb_exts, 0);
    assert_null(h.backing_file);
    qcow2_header_free(&h);
}

static void test_header_v2_defaults(void **state)
{
    uint8_t b[512];
    struct qcow2_header h;

    make_header(b, sizeof(b));
    be32_store(b + 4, 2);
    assert_int_equal(qcow2_header_decode(b, sizeof(b), 512, &h), 0);
    assert_int_equal(h.header_length, 72);
    assert_int_equal(h.refcount_order, 4);
    assert_int_equal(h.incompatible_features, 0);
    qcow2_header_free(&h);
}

static void test_header_extensions(void **state)
{
    uint8_t b[512];
    struct qcow2_header h;

    make_header(b, sizeof(b));
    /* backing format "qcow2", an unknown extension, end, backing name */
    be32_store(b + 112, QCOW2_EXT_BACKING_FORMAT);
    be32_store(b + 116, 5);
    memcpy(b + 120, "qcow2", 5);
    be32_store(b + 128, 0x12345678);
    be32_store(b + 132, 3);
    memcpy(b + 136, "abc", 3);
    /* end marker at 144 */
    memcpy(b + 152, "base.img", 8);
    be64_store(b + 8, 152);
    be32_store(b + 16, 8);
    assert_int_equal(qcow2_header_decode(b, sizeof(b), 512, &h), 0);
    assert_string_equal(h.backing_format, "qcow2");
    assert_string_equal(h.backing_file, "base.img");
    assert_int_equal(h.nb_exts, 2);
    assert_int_equal(h.exts[1].magic, 0x12345678);
    assert_int_equal(h.exts[1].len, 3);
    assert_int_equal(h.exts[1].offset, 128);
    assert_memory_equal(h.exts[1].data, "abc", 3);
    assert_int_equal(h.ext_end, 152);
    qcow2_header_free(&h);
}

/* Each malformation must be refused with EINVAL or EOPNOTSUPP and a
 * message naming the structure (the failure names the case's word). */
static void expect_refused(uint8_t *b, const char *word)
{
    struct qcow2_header h;
    int r = qcow2_header_decode(b, 512, 512, &h);

    if ((r != -EINVAL && r != -EOPNOTSUPP) || !strstr(qbm_get_error(), word)) {
        fail_msg("%s: got %d \"%s\"", word, r, qbm_get_error());
    }
}

static void test_header_refusals(void **state)
{
    /* Up to two fields changed in the minimal header: at `off`, `width`
     * bytes (1, 4 or 8; 0 ends the list), big-endian. */
    static const struct {
        const char *word;
        struct {
            unsigned off, width;
            uint64_t value;
        } set[2];
    } cases[] = {
        { "magic", { { 0, 1, 0 } } },
        { "version", { { 4, 4, 4 } } },
        { "cluster_bits", { { 20, 4, 8 } } },
        { "header_length", { { 100, 4, 100 } } },
        { "header_length", { { 100, 4, 116 } } },
        { "incompatible", { { 72, 8, 1ull << 5 } } },
        /* the type byte says zlib */
        { "compression",
          { { 72, 8, QBM_INCOMPAT_COMPRESSION }, { 100, 4, 112 } } },
        /* with 512-byte clusters */
        { "extended L2", { { 72, 8, QBM_INCOMPAT_EXTL2 } } },
        { "bitmaps extension",
          { { 112, 4, QCOW2_EXT_BITMAPS }, { 116, 4, 23 } } },
        { "header extension", { { 112, 4, 0x77 }, { 116, 4, 1000 } } },
        { "backing format",
          { { 112, 4, QCOW2_EXT_BACKING_FORMAT }, { 116, 4, 16 } } },
        { "backing file name", { { 8, 8, 500 }, { 16, 4, 100 } } },
        { "refcount_order", { { 96, 4, 7 } } },
    };
    uint8_t b[512];
    size_t i, j;

    for (i = 0; i < QBM_ARRAY_SIZE(cases); i++) {
        make_header(b, sizeof(b));
        for (j = 0; j < 2 && cases[i].set[j].width; j++) {
            unsigned off = cases[i].set[j].off;
            uint64_t v = cases[i].set[j].value;

            if (cases[i].set[j].width == 1) {
                b[off] = (uint8_t)v;
            } else if (cases[i].set[j].width == 4) {
                be32_store(b + off, (uint32_t)v);
            } else {
                be64_store(b + off, v);
            }
        }
        expect_refused(b, cases[i].word);
    }
}

static void test_feature_names(void **state)
{
    uint8_t b[512];
    struct qcow2_header h;

    make_header(b, sizeof(b));
    be32_store(b + 112, QCOW2_EXT_FEATURE_TABLE);
    be32_store(b + 116, 48);
    b[120] = 0;  /* incompatible */
    b[121] = 7;  /* bit 7 */
    memcpy(b + 122, "shiny", 5);
    assert_int_equal(qcow2_header_decode(b, sizeof(b), 512, &h), 0);
    assert_string_equal(qcow2_feature_name(&h, 0, 7), "shiny");
    assert_string_equal(qcow2_feature_name(&h, 0, 1), "corrupt bit");
    assert_string_equal(qcow2_feature_name(&h, 2, 0), "bitmaps");
    assert_null(qcow2_feature_name(&h, 1, 5));
    qcow2_header_free(&h);

    /* The first named entry for a bit wins; unnamed entries and entries
     * of unknown types or bits past 63 name nothing. */
    be32_store(b + 116, 5 * 48);
    memset(b + 120 + 48, 0, 4 * 48);
    b[168] = 0; /* incompatible bit 7 again: not used */
    b[169] = 7;
    memcpy(b + 170, "dull", 4);
    b[216] = 1; /* compatible bit 5, no name */
    b[217] = 5;
    b[264] = 1; /* compatible bit 5, named */
    b[265] = 5;
    memcpy(b + 266, "five", 4);
    b[312] = 3; /* unknown type */
    b[313] = 5;
    memcpy(b + 314, "odd", 3);
    assert_int_equal(qcow2_header_decode(b, sizeof(b), 512, &h), 0);
    assert_string_equal(qcow2_feature_name(&h, 0, 7), "shiny");
    assert_string_equal(qcow2_feature_name(&h, 1, 5), "five");
    assert_null(qcow2_feature_name(&h, 3, 5));
    assert_null(qcow2_feature_name(&h, 1, 64));
    qcow2_header_free(&h);
    /* An unknown incompatible bit is refused by the table's name. */
    be64_store(b + 72, 1ull << 7);
    expect_refused(b, "shiny");
}

static void test_refblock_widths(void **state)
{
    static const unsigned widths[] = { 1, 2, 4, 8, 16, 32, 64 };
    uint8_t block[512];
    size_t w;
    uint64_t i;

    for (w = 0; w < sizeof(widths) / sizeof(widths[0]); w++) {
        unsigned bits = widths[w];
        uint64_t n = 512 * 8 / bits, max = bits == 64 ? UINT64_MAX
                                                      : (1ull << bits) - 1;

        memset(block, 0, sizeof(block));
        for (i = 0; i < n; i++) {
            qcow2_refblock_set(block, bits, i, (i * 7 + 3) & max);
        }
        for (i = 0; i < n; i++) {
            assert_int_equal(qcow2_refblock_entry(block, bits, i),
                             (i * 7 + 3) & max);
        }
    }
    /* Layout facts: 4-bit entries 1,1,...,0 pack LSB first as 11 11 11 01;
     * 16-bit entries are big-endian. */
    memset(block, 0, sizeof(block));
    for (i = 0; i < 7; i++) {
        qcow2_refblock_set(block, 4, i, 1);
    }
    assert_int_equal(block[0], 0x11);
    assert_int_equal(block[3], 0x01);
    memset(block, 0, sizeof(block));
    qcow2_refblock_set(block, 16, 1, 0x0102);
    assert_int_equal(block[2], 0x01);
    assert_int_equal(block[3], 0x02);
    memset(block, 0, sizeof(block));
    qcow2_refblock_set(block, 1, 9, 1);
    assert_int_equal(block[1], 0x02);
}

static void test_compressed_descriptor(void **state)
{
    struct qcow2_compressed cd;

    /* 64 KiB clusters: offset 0x50000, 69 sectors (qcow2 spec,
     * "Compressed Clusters Descriptor"). */
    qcow2_compressed_decode(0x5100000000050000ull, 16, &cd);
    assert_int_equal(cd.offset, 0x50000);
    assert_int_equal(cd.nb_bytes, 69 * 512);
    /* An unaligned start shortens the readable bytes. */
    qcow2_compressed_decode((2ull << 54) | 0x50010, 16, &cd);
    assert_int_equal(cd.offset, 0x50010);
    assert_int_equal(cd.nb_bytes, 3 * 512 - 0x10);
    /* 512-byte clusters: x = 61, one sector-count bit. */
    qcow2_compressed_decode((1ull << 61) | 0x1200, 9, &cd);
    assert_int_equal(cd.offset, 0x1200);
    assert_int_equal(cd.nb_bytes, 1024);
    /* 2 MiB clusters: x = 49. */
    qcow2_compressed_decode((5ull << 49) | 0x400000, 21, &cd);
    assert_int_equal(cd.offset, 0x400000);
    assert_int_equal(cd.nb_bytes, 6 * 512);
}

/* One directory entry, "b0" at 0x10000: 32 bytes as in the notes. */
static size_t make_entry(uint8_t *e, uint64_t table, uint32_t size,
                         uint32_t flags, uint8_t type, uint8_t gran,
                         const char *name, uint32_t extra)
{
    size_t len = (24 + extra + strlen(name) + 7) & ~7u;

    memset(e, 0, len);
    be64_store(e, table);
    be32_store(e + 8, size);
    be32_store(e + 12, flags);
    e[16] = type;
    e[17] = gran;
    be16_store(e + 18, (uint16_t)strlen(name));
    be32_store(e + 20, extra);
    memcpy(e + 24 + extra, name, strlen(name));
    return len;
}

static void test_bitmap_dir(void **state)
{
    uint8_t d[256];
    struct qcow2_bitmap *bms;
    uint64_t disk = 1 << 30, ts;
    size_t n;

    ts = qcow2_bitmap_table_size(disk, 16, 65536);
    assert_int_equal(ts, 1);
    assert_int_equal(qcow2_bitmap_table_size((1ull << 40) + 1, 9, 512),
                     (((1ull << 31) + 1 + 7) / 8 + 511) / 512);
    n = make_entry(d, 0x10000, 1, BME_FLAG_AUTO, 1, 16, "b0", 0);
    assert_int_equal(n, 32);
    n += make_entry(d + n, 0x20000, 1, BME_FLAG_IN_USE, 1, 17, "second", 0);
    assert_int_equal(qcow2_bitmap_dir_decode(d, n, 0x30000, 2, 65536, disk,
                                             &bms), 0);
    assert_string_equal(bms[0].name, "b0");
    assert_int_equal(bms[1].granularity_bits, 17);
    assert_int_equal(bms[1].entry_offset, 0x30020);
    {
        uint8_t enc[64];

        qcow2_bitmap_entry_encode(&bms[0], enc);
        assert_memory_equal(enc, d, 32);
    }
    qcow2_bitmaps_free(bms, 2);

    /* Refusals. */
    n = make_entry(d, 0x10000, 1, 0x4, 1, 16, "b0", 0);
    assert_int_equal(qcow2_bitmap_dir_decode(d, n, 0, 1, 65536, disk, &bms),
                     -EINVAL);
    assert_non_null(strstr(qbm_get_error(), "flags"));
    n = make_entry(d, 0x10000, 1, 0, 2, 16, "b0", 0);
    assert_int_equal(qcow2_bitmap_dir_decode(d, n, 0, 1, 65536, disk, &bms),
                     -EINVAL);
    n = make_entry(d, 0x10000, 1, 0, 1, 8, "b0", 0);
    assert_int_equal(qcow2_bitmap_dir_decode(d, n, 0, 1, 65536, disk, &bms),
                     -EINVAL);
    n = make_entry(d, 0x10001, 1, 0, 1, 16, "b0", 0);
    assert_int_equal(qcow2_bitmap_dir_decode(d, n, 0, 1, 65536, disk, &bms),
                     -EINVAL);
    n = make_entry(d, 0x10000, 2, 0, 1, 16, "b0", 0); /* wrong size */
    assert_int_equal(qcow2_bitmap_dir_decode(d, n, 0, 1, 65536, disk, &bms),
                     -EINVAL);
    n = make_entry(d, 0x10000, 2, BME_FLAG_IN_USE, 1, 16, "b0", 0);
    assert_int_equal(qcow2_bitmap_dir_decode(d, n, 0, 1, 65536, disk, &bms),
                     0); /* tolerated when in use, as QEMU does */
    qcow2_bitmaps_free(bms, 1);
    n = make_entry(d, 0x10000, 1, 0, 1, 16, "b0", 8);
    assert_int_equal(qcow2_bitmap_dir_decode(d, n, 0, 1, 65536, disk, &bms),
                     -EINVAL);
    n = make_entry(d, 0x10000, 1, 0, 1, 16, "b0", 0);
    assert_int_equal(qcow2_bitmap_dir_decode(d, n, 0, 2, 65536, disk, &bms),
                     -EINVAL); /* count mismatch */
    assert_int_equal(qcow2_bitmap_dir_decode(d, n - 8, 0, 1, 65536, disk,
                                             &bms), -EINVAL);
    n += make_entry(d + n, 0x20000, 1, 0, 1, 16, "b0", 0);
    assert_int_equal(qcow2_bitmap_dir_decode(d, n, 0, 2, 65536, disk, &bms),
                     -EINVAL);
    assert_non_null(strstr(qbm_get_error(), "duplicate"));
}

static void test_bitmaps_ext(void **state)
{
    uint8_t e[24] = { 0 };
    struct qcow2_bitmaps_ext x;

    be32_store(e, 2);
    be64_store(e + 8, 64);
    be64_store(e + 16, 0x100000);
    assert_int_equal(qcow2_bitmaps_ext_decode(e, 24, 0x1f8, &x), 0);
    assert_int_equal(x.nb_bitmaps, 2);
    assert_int_equal(x.dir_offset, 0x100000);
    be32_store(e + 4, 1);
    assert_int_equal(qcow2_bitmaps_ext_decode(e, 24, 0x1f8, &x), -EINVAL);
    assert_non_null(strstr(qbm_get_error(), "0x1f8"));
    be32_store(e + 4, 0);
    be32_store(e, 0);
    assert_int_equal(qcow2_bitmaps_ext_decode(e, 24, 0x1f8, &x), -EINVAL);
    be32_store(e, 1);
    be64_store(e + 8, 0);
    assert_int_equal(qcow2_bitmaps_ext_decode(e, 24, 0x1f8, &x), -EINVAL);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_header_minimal),
        cmocka_unit_test(test_header_v2_defaults),
        cmocka_unit_test(test_header_extensions),
        cmocka_unit_test(test_header_refusals),
        cmocka_unit_test(test_feature_names),
        cmocka_unit_test(test_refblock_widths),
        cmocka_unit_test(test_compressed_descriptor),
        cmocka_unit_test(test_bitmap_dir),
        cmocka_unit_test(test_bitmaps_ext),
    };

    return cmocka_run_group_tests(tests, NULL, NULL);
}
