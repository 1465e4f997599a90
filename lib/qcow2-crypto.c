/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * The encryption of a qcow2 image, as `qemu-img info` describes it: the
 * header's crypt_method (qcow2 spec, "Header": 1 AES, 2 LUKS) and, for
 * LUKS, the public fields of the LUKS version 1 header the "full disk
 * encryption header pointer" extension points at (LUKS1 on-disk format:
 * cipher, mode and hash names, payload offset, key size, master key
 * digest iterations, UUID, eight key slots). Nothing is decrypted.
 */
#include <stdio.h>
#include <string.h>

#include "internal.h"

#define LUKS_HDR_LEN 592
#define LUKS_SLOTS 8
#define LUKS_SLOT_ACTIVE 0x00ac71f3u
#define LUKS_SECTOR 512

/* A NUL-padded name field of the header, as a C string. */
static void field(char *dst, size_t dstlen, const uint8_t *src, size_t len)
{
    size_t n = strnlen((const char *)src, len);

    if (n >= dstlen) {
        n = dstlen - 1;
    }
    memcpy(dst, src, n);
    dst[n] = '\0';
}

/* QEMU's name of a cipher and key size ("aes" and 32 bytes: "aes-256");
 * XTS splits the key in two. */
static void cipher_alg(char *dst, size_t len, const char *name,
                       uint32_t key_bytes, bool xts)
{
    uint32_t bits = (xts ? key_bytes / 2 : key_bytes) * 8;

    if (strcmp(name, "sm4") == 0) {
        snprintf(dst, len, "%s", name);
    } else {
        snprintf(dst, len, "%s-%u", name, bits);
    }
}

static int luks_info(struct qbm_image *img, uint64_t off, uint64_t len,
                     struct qbm_encryption_info *ret)
{
    static const uint8_t magic[6] = { 'L', 'U', 'K', 'S', 0xba, 0xbe };
    uint8_t b[LUKS_HDR_LEN];
    char mode[33], *dash, *colon;
    unsigned i;
    int r;

    if (len < sizeof(b)) {
        return qbm_err(EINVAL,
                       "encryption header at 0x%llx: %llu bytes, too small "
                       "for a LUKS header",
                       (unsigned long long)off, (unsigned long long)len);
    }
    r = qbm_image_read_meta(img, b, sizeof(b), off, "encryption header");
    if (r < 0) {
        return r;
    }
    if (memcmp(b, magic, sizeof(magic)) != 0 || be16_load(b + 6) != 1) {
        return qbm_err(EINVAL,
                       "encryption header at 0x%llx: not a LUKS version 1 "
                       "header",
                       (unsigned long long)off);
    }
    snprintf(ret->format, sizeof(ret->format), "luks");
    /* cipher-mode "xts-plain64" or "cbc-essiv:sha256": mode, then the IV
     * generator and its hash. */
    field(mode, sizeof(mode), b + 40, 32);
    dash = strchr(mode, '-');
    if (dash) {
        *dash++ = '\0';
        colon = strchr(dash, ':');
        if (colon) {
            *colon++ = '\0';
            snprintf(ret->ivgen_hash_alg, sizeof(ret->ivgen_hash_alg), "%s",
                     colon);
        }
        snprintf(ret->ivgen_alg, sizeof(ret->ivgen_alg), "%s", dash);
    }
    snprintf(ret->cipher_mode, sizeof(ret->cipher_mode), "%s", mode);
    {
        char name[33];

        field(name, sizeof(name), b + 8, 32);
        cipher_alg(ret->cipher_alg, sizeof(ret->cipher_alg), name,
                   be32_load(b + 108), strcmp(mode, "xts") == 0);
    }
    field(ret->hash_alg, sizeof(ret->hash_alg), b + 72, 32);
    ret->payload_offset = (uint64_t)be32_load(b + 104) * LUKS_SECTOR;
    ret->master_key_iters = be32_load(b + 164);
    field(ret->uuid, sizeof(ret->uuid), b + 168, 40);
    for (i = 0; i < LUKS_SLOTS; i++) {
        const uint8_t *k = b + 208 + 48 * i;
        struct qbm_luks_slot *sl = &ret->slots[i];

        sl->active = be32_load(k) == LUKS_SLOT_ACTIVE;
        sl->iters = be32_load(k + 4);
        sl->key_offset = (uint64_t)be32_load(k + 40) * LUKS_SECTOR;
        sl->stripes = be32_load(k + 44);
    }
    return 0;
}

int qcow2_crypto_info(struct qbm_image *img, struct qbm_encryption_info *ret)
{
    struct qbm_encryption_info info;
    bool found = false;
    size_t k;
    int r = 0;

    memset(&info, 0, sizeof(info));
    switch (img->raw ? 0 : img->hdr.crypt_method) {
    case 1:
        snprintf(info.format, sizeof(info.format), "aes");
        break;
    case 2:
        for (k = 0; k < img->hdr.nb_exts && !found; k++) {
            const struct qcow2_ext *e = &img->hdr.exts[k];

            if (e->magic == QCOW2_EXT_CRYPTO && e->len == 16) {
                r = luks_info(img, be64_load(e->data), be64_load(e->data + 8),
                              &info);
                found = true;
            }
        }
        if (!found) {
            r = qbm_err(EINVAL, "LUKS encryption without an encryption "
                                "header extension");
        }
        if (r < 0) {
            return r;
        }
        break;
    default:
        return qbm_err(ENOENT, "the image is not encrypted");
    }
    *ret = info;
    return 0;
}
