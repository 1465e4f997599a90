/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* qbm check: bitmaps, refcounts and backing-chain rules; --repair. */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>

#include "qbm-tool.h"

static const char usage[] =
    "Usage: qbm check [--output=human|json] [-r leaks|all] "
    "[--in-use=dirty|remove]\n"
    "                 [--chain] [-U] IMAGE\n"
    "Check IMAGE's bitmaps (in-use ones, a stale extension, their tables)\n"
    "and full refcount consistency; with --chain also every backing layer\n"
    "and the rules a checkpoint spanning layers relies on.\n"
    "Exit status: 0 clean, 2 corruption or bitmap problems, 3 leaked\n"
    "clusters only, 1 the check could not run.\n\n"
    "  -r, --repair=MODE     repair, then check: 'leaks' frees leaked\n"
    "                        clusters only; 'all' (--repair alone) also\n"
    "                        drops a stale bitmaps extension and makes\n"
    "                        in-use bitmaps all dirty and consistent (or\n"
    "                        removes them with --in-use=remove); each step\n"
    "                        crash-safe\n"
    "      --in-use=MODE     with -r all: dirty (default) or remove\n"
    "  -c, --chain           check (and repair) every layer of the backing\n"
    "                        chain\n";

static const char *const kind_names[] = { "", "corruption", "leak", "bitmap" };

struct report {
    struct outbuf *ob;
    enum output_format fmt;
    uint64_t n[4];
    uint64_t shown;
};

/* Listing millions of leaks helps nobody: show the first ones. */
#define MAX_SHOWN 1000

/* One problem; `rule_json` (may be NULL) adds keys to its JSON object. */
static int add_entry(struct report *rep, int kind, uint64_t offset,
                     const char *msg, const char *rule_json)
{
    if (kind < 1 || kind > 3) {
        return 0;
    }
    rep->n[kind]++;
    if (rep->shown++ >= MAX_SHOWN) {
        return 0;
    }
    if (rep->fmt == OUTPUT_JSON) {
        ob_printf(rep->ob,
                  "%s{\"kind\": \"%s\", \"offset\": %" PRIu64 ", \"message\": ",
                  rep->shown > 1 ? ", " : "", kind_names[kind], offset);
        ob_json_string(rep->ob, msg);
        ob_puts(rep->ob, rule_json ? rule_json : "");
        ob_puts(rep->ob, "}");
    } else {
        /* A message may hold a bitmap's name: no control character
         * reaches the terminal. */
        ob_printf(rep->ob, "%s: ",
                  kind == QBM_PROBLEM_CORRUPTION ? "ERROR"
                  : kind == QBM_PROBLEM_LEAK     ? "Leaked"
                                                 : "Bitmap");
        ob_human_string(rep->ob, msg);
        ob_puts(rep->ob, "\n");
    }
    return 0;
}

static int add_problem(void *opaque, int kind, uint64_t offset, const char *msg)
{
    return add_entry(opaque, kind, offset, msg, NULL);
}

struct chain_report {
    struct report *rep;
    struct qbm_chain *ch;
};

static const char *const rule_names[] = { "", "not-in-top", "gap", "disabled",
                                          "in-use" };

/* A broken checkpoint rule (qbm_chain_check) as a bitmap problem, naming
 * the rule and the layer. */
static int add_rule(void *opaque, int rule, const char *bitmap, size_t layer,
                    size_t origin)
{
    struct chain_report *cr = opaque;
    const char *file = qbm_chain_filename(cr->ch, layer);
    struct outbuf js = { 0 };
    char msg[1200];
    int r;

    switch (rule) {
    case QBM_CHAIN_NOT_IN_TOP:
        snprintf(msg, sizeof(msg),
                 "bitmap '%s' is not in the top layer: "
                 "missing from layer %zu (%s) above its copy in layer %zu "
                 "(%s); writes to that layer are not in the checkpoint",
                 bitmap, layer, file, origin,
                 qbm_chain_filename(cr->ch, origin));
        break;
    case QBM_CHAIN_GAP:
        snprintf(msg, sizeof(msg),
                 "bitmap '%s' has a gap at layer %zu: "
                 "missing from layer %zu (%s) between copies above it and "
                 "in layer %zu (%s); writes to that layer are not in the "
                 "checkpoint",
                 bitmap, layer, layer, file, origin,
                 qbm_chain_filename(cr->ch, origin));
        break;
    case QBM_CHAIN_DISABLED:
        snprintf(msg, sizeof(msg),
                 "bitmap '%s' is disabled in layer %zu "
                 "(%s): it records no writes, and libvirt will not use the "
                 "checkpoint",
                 bitmap, layer, file);
        break;
    case QBM_CHAIN_IN_USE:
        snprintf(msg, sizeof(msg),
                 "bitmap '%s' is in use in layer %zu "
                 "(%s): inconsistent, and libvirt will not use the "
                 "checkpoint",
                 bitmap, layer, file);
        break;
    default:
        return 0;
    }
    ob_printf(&js, ", \"rule\": \"%s\", \"bitmap\": ", rule_names[rule]);
    ob_json_string(&js, bitmap);
    ob_printf(&js, ", \"layer\": %zu", layer);
    ob_write(&js, "", 1); /* the terminating NUL */
    if (js.failed) {
        ob_free(&js);
        cr->rep->ob->failed = true;
        return 0;
    }
    r = add_entry(cr->rep, QBM_PROBLEM_BITMAP, 0, msg, js.p);
    ob_free(&js);
    return r;
}

/* The repairs made in one file, shown in its report. */
struct repairs {
    struct outbuf human, json;
    size_t n;
};

static const char *const repair_names[] = {
    "",
    "stale-extension",
    "autoclear-bit",
    "in-use-dirty",
    "in-use-removed",
    "leaks",
};

/* What qbm_repair_report() did, and what it means for the next backup. */
static int repair_said(void *opaque, int action, const char *bitmap,
                       uint64_t count, uint64_t bytes)
{
    struct repairs *rp = opaque;
    char *shown = bitmap ? human_string(bitmap) : NULL;
    char msg[256];

    if (action < QBM_REPAIRED_STALE || action > QBM_REPAIRED_LEAKS ||
        (bitmap && !shown)) {
        free(shown);
        return 0;
    }
    switch (action) {
    case QBM_REPAIRED_STALE:
        snprintf(msg, sizeof(msg),
                 "stale bitmaps extension dropped: QEMU ignored its "
                 "bitmaps; their clusters are freed as leaks");
        break;
    case QBM_REPAIRED_AUTOCLEAR:
        snprintf(msg, sizeof(msg),
                 "autoclear bit 'bitmaps' cleared: it was set without a "
                 "bitmaps extension");
        break;
    case QBM_REPAIRED_IN_USE_DIRTY:
        snprintf(msg, sizeof(msg),
                 "was in use, now all dirty: the next "
                 "incremental from it will be a full copy");
        break;
    case QBM_REPAIRED_IN_USE_REMOVED:
        snprintf(msg, sizeof(msg),
                 "was in use, now removed: its checkpoint is gone, so the "
                 "next backup must be a full one");
        break;
    case QBM_REPAIRED_LEAKS:
        snprintf(msg, sizeof(msg),
                 "%" PRIu64 " leaked cluster(s) freed (%" PRIu64 " bytes)",
                 count, bytes);
        break;
    }
    ob_puts(&rp->human, "Repaired: ");
    if (bitmap) {
        ob_printf(&rp->human, "bitmap '%s': ", shown);
    }
    ob_printf(&rp->human, "%s\n", msg);
    ob_printf(&rp->json, "%s{\"action\": \"%s\"", rp->n ? ", " : "",
              repair_names[action]);
    if (bitmap) {
        ob_puts(&rp->json, ", \"bitmap\": ");
        ob_json_string(&rp->json, bitmap);
    }
    if (action == QBM_REPAIRED_LEAKS) {
        ob_printf(&rp->json, ", \"clusters\": %" PRIu64 ", \"bytes\": %" PRIu64,
                  count, bytes);
    }
    ob_puts(&rp->json, ", \"message\": ");
    if (bitmap) {
        /* The whole line, as a person reads it. */
        struct outbuf line = { 0 };

        ob_printf(&line, "bitmap '%s': %s", bitmap, msg);
        ob_write(&line, "", 1);
        ob_json_string(&rp->json, line.failed ? msg : line.p);
        ob_free(&line);
    } else {
        ob_json_string(&rp->json, msg);
    }
    ob_puts(&rp->json, "}");
    rp->n++;
    free(shown);
    return 0;
}

static void repairs_free(struct repairs *rp)
{
    ob_free(&rp->human);
    ob_free(&rp->json);
}

static int check_one(struct qbm_image *img, const char *name, struct outbuf *ob,
                     enum output_format fmt, struct qbm_chain *ch,
                     const struct repairs *rp)
{
    struct outbuf body = { 0 };
    struct report rep = { &body, fmt, { 0 }, 0 };
    struct chain_report cr = { &rep, ch };
    bool raw = strcmp(qbm_image_format(img), "raw") == 0;
    uint64_t end = 0;
    /* As qemu-img check: where the image ends (on a device, not where the
     * device ends). Damaged refcounts: not reported. */
    bool have_end = !raw && qbm_image_end_offset(img, &end) == 0;

    if (qbm_check(img, add_problem, &rep) < 0 ||
        (ch ? qbm_chain_check(ch, add_rule, &cr)
            : qbm_check_backing(img, add_problem, &rep)) < 0) {
        tool_lib_error(name);
        ob_free(&body);
        return -1;
    }
    if (fmt == OUTPUT_JSON) {
        ob_puts(ob, "{\"filename\": ");
        ob_json_string(ob, name);
        ob_printf(ob,
                  ", \"format\": \"%s\", \"corruptions\": %" PRIu64
                  ", \"leaks\": %" PRIu64 ", \"bitmap-problems\": %" PRIu64
                  ", \"problems\": [",
                  qbm_image_format(img), rep.n[QBM_PROBLEM_CORRUPTION],
                  rep.n[QBM_PROBLEM_LEAK], rep.n[QBM_PROBLEM_BITMAP]);
        ob_write(ob, body.p ? body.p : "", body.len);
        ob_puts(ob, "]");
        if (rp) {
            ob_puts(ob, ", \"repairs\": [");
            ob_write(ob, rp->json.p ? rp->json.p : "", rp->json.len);
            ob_puts(ob, "]");
            ob->failed |= rp->json.failed;
        }
        if (have_end) {
            ob_printf(ob, ", \"image-end-offset\": %" PRIu64, end);
        }
        ob_puts(ob, "}");
    } else {
        ob_puts(ob, "image: ");
        ob_human_string(ob, name);
        ob_puts(ob, "\n");
        if (rp) {
            ob_write(ob, rp->human.p ? rp->human.p : "", rp->human.len);
            ob->failed |= rp->human.failed;
        }
        ob_write(ob, body.p ? body.p : "", body.len);
        if (rep.shown > MAX_SHOWN) {
            ob_printf(ob, "(%" PRIu64 " more problems not listed)\n",
                      rep.shown - MAX_SHOWN);
        }
        if (rep.shown == 0) {
            ob_puts(ob, "No problems were found.\n");
        } else {
            ob_printf(ob,
                      "%" PRIu64 " corruption(s), %" PRIu64 " leaked "
                      "cluster(s), %" PRIu64 " bitmap problem(s).\n",
                      rep.n[QBM_PROBLEM_CORRUPTION], rep.n[QBM_PROBLEM_LEAK],
                      rep.n[QBM_PROBLEM_BITMAP]);
        }
        if (have_end) {
            ob_printf(ob, "Image end offset: %" PRIu64 "\n", end);
        }
    }
    ob_free(&body);
    if (rep.n[QBM_PROBLEM_CORRUPTION] || rep.n[QBM_PROBLEM_BITMAP]) {
        return 2;
    }
    return rep.n[QBM_PROBLEM_LEAK] ? 3 : 0;
}

static int repair_file(const char *file, unsigned flags, struct repairs *rp)
{
    struct qbm_image *img = edit_open(file);
    int r;

    if (!img) {
        return -1;
    }
    r = qbm_repair_report(img, flags, repair_said, rp);
    if (r < 0) {
        tool_error(file, "repair failed: %s", qbm_get_error());
    }
    qbm_close(img);
    return r;
}

int cmd_check(int argc, char **argv)
{
    static const struct option opts[] = {
        { "repair", optional_argument, NULL, 'r' },
        { "in-use", required_argument, NULL, 'i' },
        { "chain", no_argument, NULL, 'c' },
        { NULL, 0, NULL, 0 },
    };
    struct tool_args a = {
        .cmd = "check",
        .usage = usage,
        .shortopts = "r:c",
        .opts = opts,
        .common = TOOL_OPT_READ,
        .min_args = 1,
        .max_args = 1,
        .args_hint = "one IMAGE argument",
    };
    enum output_format fmt;
    struct outbuf ob = { 0 };
    unsigned in_use = QBM_REPAIR_IN_USE_DIRTY, open_flags;
    unsigned repair = 0; /* QBM_REPAIR_* to do */
    bool chain = false;
    struct qbm_chain *ch = NULL;
    struct repairs *rps = NULL; /* one per layer repaired */
    size_t nrps = 0;
    const char *file;
    int c, ret = 0, r;
    size_t i;

    while ((c = tool_getopt(&a, argc, argv)) > 0) {
        switch (c) {
        case 'r':
            /* As qemu-img check -r: leaks, or all (--repair alone). */
            if (!optarg || strcmp(optarg, "all") == 0) {
                repair = QBM_REPAIR_STALE | QBM_REPAIR_LEAKS;
            } else if (strcmp(optarg, "leaks") == 0) {
                repair = QBM_REPAIR_LEAKS;
            } else {
                return usage_error("check", "-r must be leaks or all");
            }
            break;
        case 'i':
            if (strcmp(optarg, "dirty") == 0) {
                in_use = QBM_REPAIR_IN_USE_DIRTY;
            } else if (strcmp(optarg, "remove") == 0) {
                in_use = QBM_REPAIR_IN_USE_REMOVE;
            } else {
                return usage_error("check", "--in-use must be dirty or "
                                            "remove");
            }
            break;
        case 'c':
            chain = true;
            break;
        }
    }
    if (c < 0) {
        return a.status;
    }
    fmt = a.output;
    open_flags = a.open_flags;
    if (repair && open_flags) {
        return usage_error("check", "-r (--repair) cannot be used with -U");
    }
    if (repair & QBM_REPAIR_STALE) {
        repair |= in_use;
    }
    file = a.args[0];

    if (repair) {
        if (chain) {
            ch = tool_chain_open(file, QBM_OPEN_FORCE_SHARE);
            if (!ch) {
                return 1;
            }
            nrps = qbm_chain_length(ch);
            rps = calloc(nrps, sizeof(*rps));
            if (!rps) {
                tool_error(file, "out of memory");
                qbm_chain_close(ch);
                return 1;
            }
            for (i = 0; i < nrps; i++) {
                if (strcmp(qbm_image_format(qbm_chain_layer(ch, i)), "qcow2") ==
                        0 &&
                    repair_file(qbm_chain_filename(ch, i), repair, &rps[i]) <
                        0) {
                    ret = 1;
                    break;
                }
            }
            qbm_chain_close(ch);
            ch = NULL;
        } else {
            nrps = 1;
            rps = calloc(1, sizeof(*rps));
            if (!rps) {
                tool_error(file, "out of memory");
                return 1;
            }
            if (repair_file(file, repair, rps) < 0) {
                ret = 1;
            }
        }
        if (ret) {
            goto out;
        }
    }

    if (chain) {
        ch = tool_chain_open(file, open_flags);
        if (!ch) {
            ret = 1;
            goto out;
        }
        if (fmt == OUTPUT_JSON) {
            ob_puts(&ob, "[");
        }
        for (i = 0; i < qbm_chain_length(ch); i++) {
            if (i) {
                ob_puts(&ob, fmt == OUTPUT_JSON ? ", " : "\n");
            }
            r = check_one(qbm_chain_layer(ch, i), qbm_chain_filename(ch, i),
                          &ob, fmt, i == 0 ? ch : NULL,
                          i < nrps ? &rps[i] : NULL);
            if (r < 0) {
                ret = 1;
                break;
            }
            /* Worst first: corruption 2, then leaks 3, then clean 0. */
            if (r == 2 || (r == 3 && ret == 0)) {
                ret = r;
            }
        }
        if (fmt == OUTPUT_JSON) {
            ob_puts(&ob, "]\n");
        }
        qbm_chain_close(ch);
    } else {
        struct qbm_image *img = tool_open(file, open_flags);

        if (!img) {
            ret = 1;
            goto out;
        }
        ret = check_one(img, file, &ob, fmt, NULL, rps);
        if (ret >= 0 && fmt == OUTPUT_JSON) {
            ob_puts(&ob, "\n");
        }
        qbm_close(img);
        if (ret < 0) {
            ret = 1;
        }
    }
    if (ret != 1 && ob_flush(&ob)) {
        ret = 1;
    }
out:
    ob_free(&ob);
    for (i = 0; i < nrps; i++) {
        repairs_free(&rps[i]);
    }
    free(rps);
    return ret;
}
