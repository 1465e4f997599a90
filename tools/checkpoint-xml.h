/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * libvirt's checkpoint and domain XML, read and written with libxml2, for
 * qbm checkpoints (qbm-checkpoints, the one part of qbm that links
 * libxml2). What the files mean for the images is the library's:
 * qbm_checkpoints_check().
 */
#ifndef QBM_CHECKPOINT_XML_H
#define QBM_CHECKPOINT_XML_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* One <disk> of a <domaincheckpoint>. */
struct cx_disk {
    char *name;   /* a target ("vda") or an absolute source path */
    char *bitmap; /* NULL: checkpoint='no' */
};

/* One <domaincheckpoint> file. */
struct cx_checkpoint {
    char *file;
    char *name;
    char *parent; /* NULL: a root */
    int64_t creation_time;
    bool has_disks; /* a <disks> element was present */
    struct cx_disk *disks;
    size_t ndisks;
    void *doc;    /* xmlDoc, kept for its <domain> */
    void *domain; /* the <domain> element (xmlNode), or NULL */
};

/* One <disk> of a <domain>. */
struct cx_domain_disk {
    char *target;
    char *source;  /* file= or dev=; NULL for other kinds and empty drives */
    bool writable; /* device disk or lun, not <readonly/> */
};

struct cx_domain {
    char *name;
    struct cx_domain_disk *disks;
    size_t ndisks;
};

/*
 * Read every regular *.xml file of `dir` (in name order) as a
 * <domaincheckpoint>. On failure a message naming the file (and line)
 * has been printed. Returns 0 or -1; *ret_list, *ret_n are the caller's
 * (cx_checkpoints_free).
 */
int cx_read_dir(const char *dir, struct cx_checkpoint **ret_list,
                size_t *ret_n);
void cx_checkpoints_free(struct cx_checkpoint *list, size_t n);

/* The domain of a file holding a <domain> root element (libvirt's config
 * file, virsh dumpxml), or of a checkpoint's <domain>: name and disks.
 * `node` is an xmlNode; `file` names it in messages. Returns 0 or -1 (a
 * message printed). *ret is the caller's (cx_domain_clear). */
int cx_domain_from_node(const char *file, void *node, struct cx_domain *ret);
/* Parse FILE, whose root must be <domain>: *ret_doc (an xmlDoc, freed with
 * cx_doc_free) and *ret_node (its root). Returns 0 or -1. */
int cx_read_domain_file(const char *file, void **ret_doc, void **ret_node);
void cx_domain_clear(struct cx_domain *dom);
void cx_doc_free(void *doc);

/* A redefinition libvirt accepts (virsh checkpoint-create --redefine). */
struct cx_redefine {
    const char *name;
    const char *parent; /* NULL: a root */
    int64_t creation_time;
    size_t ndisks;
    const char *const *targets;
    const char *const *bitmaps; /* NULL: checkpoint='no' */
    void *domain;               /* the <domain> element to copy (xmlNode) */
};

/*
 * Write `def` as a <domaincheckpoint> to PATH, through a temporary file in
 * the same directory, flushed and renamed. Returns 0 or -1 (a message
 * printed).
 */
int cx_write_redefine(const char *path, const struct cx_redefine *def);

#endif
