/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * qbm checkpoints: a libvirt domain's checkpoint metadata against its
 * disks' images. The XML is read here (checkpoint-xml.c); the judgement,
 * the orphans and the remedies are the library's qbm_checkpoints_check().
 */
#include <inttypes.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>

#include "checkpoint-xml.h"
#include "qbm-tool.h"

static const char usage[] =
    "Usage: qbm checkpoints [--output=human|json] [--domain-xml FILE]\n"
    "                       [--redefine-dir DIR] [-U] CHECKPOINT_DIR\n"
    "Check a libvirt domain's checkpoints (every *.xml of CHECKPOINT_DIR, as\n"
    "libvirt keeps them or virsh checkpoint-dumpxml writes them) against the\n"
    "bitmaps of its disks' backing chains, list the bitmaps no checkpoint\n"
    "names, and say how to repair each problem. Changes no image.\n"
    "Exit status: 0 all consistent, 2 problems found, 1 could not check.\n\n"
    "      --domain-xml=FILE    the domain's definition (libvirt's config\n"
    "                           file, virsh dumpxml --inactive); default:\n"
    "                           the <domain> of the newest checkpoint\n"
    "      --redefine-dir=DIR   write there a checkpoint definition for each\n"
    "                           orphan bitmap that can be one (for virsh\n"
    "                           checkpoint-create --redefine)\n";

static const char *const state_names[] = {
    [QBM_CHECKPOINT_OK] = "ok",
    [QBM_CHECKPOINT_MISSING] = "missing",
    [QBM_CHECKPOINT_BROKEN] = "broken",
    [QBM_CHECKPOINT_INACTIVE] = "inactive",
    [QBM_CHECKPOINT_INCONSISTENT] = "inconsistent",
    [QBM_CHECKPOINT_UNCHECKED] = "unchecked",
};

static const char *const action_names[] = {
    [QBM_REMEDY_REPAIR] = "repair",
    [QBM_REMEDY_ADD] = "add",
    [QBM_REMEDY_POPULATE] = "populate",
    [QBM_REMEDY_MERGE] = "merge",
    [QBM_REMEDY_ENABLE] = "enable",
    [QBM_REMEDY_REMOVE] = "remove",
    [QBM_REMEDY_DELETE] = "checkpoint-delete",
    [QBM_REMEDY_REDEFINE] = "redefine",
};

struct disk_result {
    char *checkpoint, *target, *bitmap, *image, *detail;
    int state;
};

struct run {
    enum output_format fmt;
    const char *domain;       /* its name, for virsh commands */
    const char *redefine_dir; /* NULL: no redefinitions */
    void *domain_node;        /* copied into each redefinition */
    struct disk_result *disks;
    size_t ndisks;
    struct outbuf orphans, remedies;
    size_t norphans, nremedies;
    bool wrong;    /* a state other than ok/unchecked, or an orphan */
    bool failed;   /* out of memory */
    bool reported; /* a redefinition not written, the message printed */
};

static char *xstrdup(struct run *run, const char *s)
{
    char *d;

    if (!s) {
        return NULL;
    }
    d = strdup(s);
    if (!d) {
        run->failed = true;
    }
    return d;
}

static int on_disk(void *opaque, const char *checkpoint, const char *target,
                   const char *bitmap, const char *image, int state,
                   const char *detail)
{
    struct run *run = opaque;
    struct disk_result *d = realloc(run->disks, (run->ndisks + 1) * sizeof(*d));

    if (!d) {
        run->failed = true;
        return 1;
    }
    run->disks = d;
    d = &run->disks[run->ndisks++];
    d->checkpoint = xstrdup(run, checkpoint);
    d->target = xstrdup(run, target);
    d->bitmap = xstrdup(run, bitmap);
    d->image = xstrdup(run, image);
    d->detail = xstrdup(run, detail);
    d->state = state;
    if (state != QBM_CHECKPOINT_OK && state != QBM_CHECKPOINT_UNCHECKED) {
        run->wrong = true;
    }
    return run->failed;
}

static int on_orphan(void *opaque, const char *target, const char *image,
                     size_t layer, const char *bitmap)
{
    struct run *run = opaque;
    struct outbuf *ob = &run->orphans;

    run->wrong = true;
    if (run->fmt == OUTPUT_JSON) {
        ob_puts(ob, run->norphans ? ", {\"target\": " : "{\"target\": ");
        ob_json_string(ob, target);
        ob_json_field(ob, "image", image);
        ob_printf(ob, ", \"layer\": %zu, \"name\": ", layer);
        ob_json_string(ob, bitmap);
        ob_puts(ob, "}");
    } else {
        ob_printf(ob, "  %s: '%s' in layer %zu (%s)\n", target, bitmap, layer,
                  image);
    }
    run->norphans++;
    return 0;
}

/* A word of a shell command, quoted when it needs to be. */
static void shell_word(struct outbuf *ob, const char *s)
{
    const char *p;

    if (*s && strspn(s, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
                        "0123456789_-./:=@%+,") == strlen(s)) {
        ob_puts(ob, s);
        return;
    }
    ob_puts(ob, "'");
    for (p = s; *p; p++) {
        if (*p == '\'') {
            ob_puts(ob, "'\\''");
        } else {
            ob_write(ob, p, 1);
        }
    }
    ob_puts(ob, "'");
}

/* The command that carries out a remedy, as argv (at most 8 words). */
static size_t remedy_argv(const struct run *run, const struct qbm_remedy *m,
                          const char *file, char *gran, size_t gran_len,
                          const char **argv)
{
    size_t n = 0;

    switch (m->action) {
    case QBM_REMEDY_REPAIR:
        argv[n++] = "qbm";
        argv[n++] = "check";
        argv[n++] = "--repair";
        argv[n++] = m->image;
        break;
    case QBM_REMEDY_ADD:
        snprintf(gran, gran_len, "%" PRIu64, m->granularity);
        argv[n++] = "qbm";
        argv[n++] = "add";
        argv[n++] = "-g";
        argv[n++] = gran;
        argv[n++] = m->image;
        argv[n++] = m->bitmap;
        break;
    case QBM_REMEDY_POPULATE:
    case QBM_REMEDY_ENABLE:
    case QBM_REMEDY_REMOVE:
        argv[n++] = "qbm";
        argv[n++] = action_names[m->action];
        argv[n++] = m->image;
        argv[n++] = m->bitmap;
        break;
    case QBM_REMEDY_MERGE:
        argv[n++] = "qbm";
        argv[n++] = "merge";
        argv[n++] = m->image;
        argv[n++] = m->bitmap;
        argv[n++] = m->source;
        break;
    case QBM_REMEDY_DELETE:
        argv[n++] = "virsh";
        argv[n++] = "checkpoint-delete";
        argv[n++] = run->domain;
        argv[n++] = m->checkpoint;
        argv[n++] = "--metadata";
        break;
    case QBM_REMEDY_REDEFINE:
        argv[n++] = "virsh";
        argv[n++] = "checkpoint-create";
        argv[n++] = run->domain;
        argv[n++] = file;
        argv[n++] = "--redefine";
        break;
    }
    return n;
}

static void json_key(struct outbuf *ob, const char *key, const char *value)
{
    if (value) {
        ob_printf(ob, ", \"%s\": ", key);
        ob_json_string(ob, value);
    }
}

/* Write the redefinition of an orphan into the --redefine-dir; its file
 * name in *ret_file (the caller frees). */
static int write_redefine(struct run *run, const struct qbm_remedy *m,
                          char **ret_file)
{
    struct cx_redefine def = {
        .name = m->checkpoint,
        .parent = m->parent,
        .creation_time = m->creation_time,
        .ndisks = m->ndisks,
        .targets = m->disk_targets,
        .bitmaps = m->disk_bitmaps,
        .domain = run->domain_node,
    };
    char *file;

    if (asprintf(&file, "%s/%s.xml", run->redefine_dir, m->checkpoint) < 0) {
        tool_error(run->redefine_dir, "out of memory");
        return -1;
    }
    if (cx_write_redefine(file, &def) < 0) {
        free(file);
        return -1;
    }
    *ret_file = file;
    return 0;
}

static int on_remedy(void *opaque, const struct qbm_remedy *m)
{
    struct run *run = opaque;
    struct outbuf *ob = &run->remedies;
    const char *argv[8];
    char gran[32], *file = NULL;
    size_t n, i;

    if (m->action < QBM_REMEDY_REPAIR || m->action > QBM_REMEDY_REDEFINE) {
        return 0;
    }
    if (m->action == QBM_REMEDY_REDEFINE && write_redefine(run, m, &file) < 0) {
        run->reported = true;
        return 1;
    }
    n = remedy_argv(run, m, file, gran, sizeof(gran), argv);
    if (run->fmt == OUTPUT_JSON) {
        ob_printf(ob, "%s{\"action\": \"%s\"", run->nremedies ? ", " : "",
                  action_names[m->action]);
        json_key(ob, "checkpoint", m->checkpoint);
        json_key(ob, "target", m->target);
        json_key(ob, "image", m->image);
        json_key(ob, "bitmap", m->bitmap);
        json_key(ob, "source", m->source);
        if (m->action == QBM_REMEDY_ADD) {
            ob_printf(ob, ", \"granularity\": %" PRIu64, m->granularity);
        }
        if (m->action == QBM_REMEDY_REDEFINE) {
            ob_puts(ob, ", \"parent\": ");
            if (m->parent) {
                ob_json_string(ob, m->parent);
            } else {
                ob_puts(ob, "null");
            }
            ob_printf(ob, ", \"creation-time\": %" PRId64 ", \"disks\": [",
                      m->creation_time);
            for (i = 0; i < m->ndisks; i++) {
                ob_puts(ob, i ? ", {\"target\": " : "{\"target\": ");
                ob_json_string(ob, m->disk_targets[i]);
                ob_puts(ob, ", \"bitmap\": ");
                if (m->disk_bitmaps[i]) {
                    ob_json_string(ob, m->disk_bitmaps[i]);
                } else {
                    ob_puts(ob, "null");
                }
                ob_puts(ob, "}");
            }
            ob_puts(ob, "]");
            json_key(ob, "file", file);
        }
        ob_puts(ob, ", \"command\": [");
        for (i = 0; i < n; i++) {
            if (i) {
                ob_puts(ob, ", ");
            }
            ob_json_string(ob, argv[i]);
        }
        ob_puts(ob, "]}");
    } else {
        ob_puts(ob, " ");
        for (i = 0; i < n; i++) {
            ob_puts(ob, " ");
            shell_word(ob, argv[i]);
        }
        ob_puts(ob, "\n");
    }
    run->nremedies++;
    free(file);
    return 0;
}

/* Checkpoints by creation time, then name: the library's order. */
static int by_time(const void *a, const void *b)
{
    const struct cx_checkpoint *x = *(const struct cx_checkpoint *const *)a;
    const struct cx_checkpoint *y = *(const struct cx_checkpoint *const *)b;

    if (x->creation_time != y->creation_time) {
        return x->creation_time < y->creation_time ? -1 : 1;
    }
    return strcmp(x->name, y->name);
}

static void print_result(struct run *run, struct outbuf *ob,
                         struct cx_checkpoint *const *order, size_t n)
{
    size_t i, j, shown;

    if (run->fmt == OUTPUT_JSON) {
        ob_puts(ob, "{\"domain\": ");
        ob_json_string(ob, run->domain);
        ob_puts(ob, ", \"checkpoints\": [");
    } else {
        ob_printf(ob, "Domain: %s\n", run->domain);
    }
    for (i = 0; i < n; i++) {
        const struct cx_checkpoint *ck = order[i];

        if (run->fmt == OUTPUT_JSON) {
            ob_puts(ob, i ? ", {\"name\": " : "{\"name\": ");
            ob_json_string(ob, ck->name);
            ob_puts(ob, ", \"parent\": ");
            if (ck->parent) {
                ob_json_string(ob, ck->parent);
            } else {
                ob_puts(ob, "null");
            }
            ob_printf(ob, ", \"creation-time\": %" PRId64 ", \"disks\": [",
                      ck->creation_time);
        } else {
            ob_printf(ob, "Checkpoint %s (created %" PRId64 ", %s%s):\n",
                      ck->name, ck->creation_time,
                      ck->parent ? "parent " : "a root",
                      ck->parent ? ck->parent : "");
        }
        for (j = 0, shown = 0; j < run->ndisks; j++) {
            const struct disk_result *d = &run->disks[j];

            if (strcmp(d->checkpoint, ck->name) != 0) {
                continue;
            }
            if (run->fmt == OUTPUT_JSON) {
                ob_puts(ob, shown ? ", {\"target\": " : "{\"target\": ");
                ob_json_string(ob, d->target);
                ob_puts(ob, ", \"image\": ");
                if (d->image) {
                    ob_json_string(ob, d->image);
                } else {
                    ob_puts(ob, "null");
                }
                ob_json_field(ob, "bitmap", d->bitmap);
                ob_printf(ob, ", \"state\": \"%s\", \"detail\": ",
                          state_names[d->state]);
                ob_json_string(ob, d->detail);
                ob_puts(ob, "}");
            } else {
                ob_printf(ob, "  %s (%s, bitmap %s): %s%s%s\n", d->target,
                          d->image ? d->image : "no image", d->bitmap,
                          state_names[d->state], *d->detail ? ": " : "",
                          d->detail);
            }
            shown++;
        }
        if (run->fmt == OUTPUT_JSON) {
            ob_puts(ob, "]}");
        } else if (!shown) {
            ob_puts(ob, "  (no disk recorded by a bitmap)\n");
        }
    }
    if (run->fmt == OUTPUT_JSON) {
        ob_puts(ob, "], \"orphan-bitmaps\": [");
        ob_write(ob, run->orphans.p ? run->orphans.p : "", run->orphans.len);
        ob_puts(ob, "], \"remedies\": [");
        ob_write(ob, run->remedies.p ? run->remedies.p : "", run->remedies.len);
        ob_puts(ob, "]}\n");
        return;
    }
    if (run->norphans) {
        ob_puts(ob, "Orphan bitmaps (no checkpoint names them):\n");
        ob_write(ob, run->orphans.p, run->orphans.len);
    }
    if (run->nremedies) {
        ob_puts(ob, "Remedies, in this order:\n");
        ob_write(ob, run->remedies.p, run->remedies.len);
    }
    if (!run->wrong) {
        ob_puts(ob, "Every checkpoint is consistent.\n");
    }
}

/* The domain disk whose source is `path` (a checkpoint may name a disk by
 * its source instead of its target). */
static const char *target_of(const struct cx_domain *dom, const char *name)
{
    size_t i;

    if (name[0] != '/') {
        return name;
    }
    for (i = 0; i < dom->ndisks; i++) {
        if (dom->disks[i].source && (strcmp(dom->disks[i].source, name) == 0 ||
                                     same_file(dom->disks[i].source, name))) {
            return dom->disks[i].target;
        }
    }
    return name;
}

/* The checkpoints, their disks and the domain's disks into `set`. */
static int fill_set(struct qbm_checkpoints *set, const struct cx_domain *dom,
                    struct qbm_chain *const *chains, struct cx_checkpoint *cks,
                    size_t ncks)
{
    size_t i, j;

    for (i = 0; i < dom->ndisks; i++) {
        if (qbm_checkpoints_add_target(set, dom->disks[i].target, chains[i]) <
            0) {
            tool_lib_error(dom->disks[i].target);
            return -1;
        }
    }
    for (i = 0; i < ncks; i++) {
        const struct cx_checkpoint *ck = &cks[i];
        int r =
            qbm_checkpoints_add(set, ck->name, ck->parent, ck->creation_time);

        /* Without <disks>, libvirt gives a bitmap to every writable disk
         * that has an image (virDomainCheckpointAlignDisks). */
        for (j = 0; r == 0 && !ck->has_disks && j < dom->ndisks; j++) {
            if (dom->disks[j].writable && dom->disks[j].source) {
                r = qbm_checkpoints_add_disk(set, ck->name,
                                             dom->disks[j].target, ck->name);
            }
        }
        for (j = 0; r == 0 && j < ck->ndisks; j++) {
            r = qbm_checkpoints_add_disk(set, ck->name,
                                         target_of(dom, ck->disks[j].name),
                                         ck->disks[j].bitmap);
        }
        if (r < 0) {
            tool_lib_error(ck->file);
            return -1;
        }
    }
    return 0;
}

static void run_free(struct run *run)
{
    size_t i;

    for (i = 0; i < run->ndisks; i++) {
        free(run->disks[i].checkpoint);
        free(run->disks[i].target);
        free(run->disks[i].bitmap);
        free(run->disks[i].image);
        free(run->disks[i].detail);
    }
    free(run->disks);
    ob_free(&run->orphans);
    ob_free(&run->remedies);
}

int cmd_checkpoints(int argc, char **argv)
{
    static const struct option opts[] = {
        { "domain-xml", required_argument, NULL, 'd' },
        { "redefine-dir", required_argument, NULL, 'r' },
        { NULL, 0, NULL, 0 },
    };
    struct tool_args a = {
        .cmd = "checkpoints",
        .usage = usage,
        .opts = opts,
        .common = TOOL_OPT_OUTPUT | TOOL_OPT_SHARE,
        .min_args = 1,
        .max_args = 1,
        .args_hint = "one CHECKPOINT_DIR argument",
    };
    struct run run = { .fmt = OUTPUT_HUMAN };
    const char *domain_xml = NULL, *dir, *domain_file;
    struct cx_checkpoint *cks = NULL, **order = NULL;
    struct qbm_chain **chains = NULL;
    struct qbm_checkpoints *set = NULL;
    struct cx_domain dom = { 0 };
    struct outbuf ob = { 0 };
    unsigned open_flags = QBM_OPEN_ANY_FORMAT;
    void *domain_doc = NULL;
    size_t ncks = 0, i;
    int c, ret = 1, r;

    while ((c = tool_getopt(&a, argc, argv)) > 0) {
        switch (c) {
        case 'd':
            domain_xml = optarg;
            break;
        case 'r':
            run.redefine_dir = optarg;
            break;
        }
    }
    if (c < 0) {
        return a.status;
    }
    run.fmt = a.output;
    open_flags |= a.open_flags;
    dir = a.args[0];
    if (run.redefine_dir && same_file(run.redefine_dir, dir)) {
        return usage_error("checkpoints",
                           "--redefine-dir must not be the "
                           "checkpoint directory (libvirt reads it only at "
                           "start; use virsh checkpoint-create --redefine)");
    }

    if (cx_read_dir(dir, &cks, &ncks) < 0) {
        return 1;
    }
    order = calloc(ncks ? ncks : 1, sizeof(*order));
    if (!order) {
        tool_error(dir, "out of memory");
        goto out;
    }
    for (i = 0; i < ncks; i++) {
        order[i] = &cks[i];
    }
    qsort(order, ncks, sizeof(*order), by_time);

    /* Which image each disk target is. */
    if (domain_xml) {
        if (cx_read_domain_file(domain_xml, &domain_doc, &run.domain_node) <
            0) {
            goto out;
        }
        domain_file = domain_xml;
    } else if (ncks == 0) {
        tool_error(dir, "no checkpoint here, and no --domain-xml to tell "
                        "the domain's disks");
        goto out;
    } else {
        const struct cx_checkpoint *newest = order[ncks - 1];

        if (!newest->domain) {
            tool_error(newest->file,
                       "the newest checkpoint has no <domain> "
                       "(dumped with --no-domain?): give --domain-xml");
            goto out;
        }
        run.domain_node = newest->domain;
        domain_file = newest->file;
    }
    if (cx_domain_from_node(domain_file, run.domain_node, &dom) < 0) {
        goto out;
    }
    run.domain = dom.name;
    chains = calloc(dom.ndisks ? dom.ndisks : 1, sizeof(*chains));
    if (!chains) {
        tool_error(dir, "out of memory");
        goto out;
    }
    for (i = 0; i < dom.ndisks; i++) {
        /* Read-only and empty drives hold no checkpoint. */
        if (!dom.disks[i].source || !dom.disks[i].writable) {
            continue;
        }
        chains[i] = qbm_chain_open(dom.disks[i].source, open_flags);
        if (!chains[i]) {
            tool_lib_error(dom.disks[i].source);
            goto out;
        }
    }

    set = qbm_checkpoints_new();
    if (!set) {
        tool_lib_error(dir);
        goto out;
    }
    if (fill_set(set, &dom, chains, cks, ncks) < 0) {
        goto out;
    }
    r = qbm_checkpoints_check(set,
                              run.redefine_dir ? QBM_CHECKPOINTS_REDEFINE : 0,
                              on_disk, on_orphan, on_remedy, &run);
    if (r < 0 || (r && !run.failed && !run.reported)) {
        tool_lib_error(dir);
        goto out;
    }
    if (run.failed || run.orphans.failed || run.remedies.failed) {
        tool_error(dir, "out of memory");
        goto out;
    }
    if (run.reported) {
        goto out;
    }
    print_result(&run, &ob, order, ncks);
    ret = ob_flush(&ob) ? 1 : run.wrong ? 2 : 0;
out:
    ob_free(&ob);
    qbm_checkpoints_free(set);
    for (i = 0; chains && i < dom.ndisks; i++) {
        qbm_chain_close(chains[i]);
    }
    free(chains);
    cx_domain_clear(&dom);
    cx_doc_free(domain_doc);
    cx_checkpoints_free(cks, ncks);
    free(order);
    run_free(&run);
    return ret;
}
