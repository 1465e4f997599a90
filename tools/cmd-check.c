/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* qbm check: bitmaps, refcounts and backing-chain rules; --repair. */
#include <getopt.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>

#include "qbm-tool.h"

static const char usage[] =
    "Usage: qbm check [--output=human|json] [--repair] "
    "[--in-use=dirty|remove]\n"
    "                 [--chain] [-U] IMAGE\n"
    "Check IMAGE's bitmaps (in-use ones, a stale extension, their tables)\n"
    "and full refcount consistency; with --chain also every backing layer\n"
    "and the rules a checkpoint spanning layers relies on.\n"
    "Exit status: 0 clean, 2 corruption or bitmap problems, 3 leaked\n"
    "clusters only, 1 the check could not run.\n\n"
    "  -r, --repair         in-use bitmaps become all dirty and consistent\n"
    "                       (or are removed with --in-use=remove), a stale\n"
    "                       bitmaps extension is dropped, leaked clusters\n"
    "                       are freed; each step crash-safe\n"
    "      --in-use=MODE    dirty (default) or remove\n"
    "  -c, --chain          check every layer of the backing chain\n"
    "      --output=FORMAT  human (default) or json\n"
    "  -U, --force-share    do not take QEMU's image locks (no --repair)\n"
    "  -h, --help           show this help\n";

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
        ob_printf(rep->ob, "%s: %s\n",
                  kind == QBM_PROBLEM_CORRUPTION ? "ERROR"
                  : kind == QBM_PROBLEM_LEAK     ? "Leaked"
                                                 : "Bitmap",
                  msg);
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

static int check_one(struct qbm_image *img, const char *name, struct outbuf *ob,
                     enum output_format fmt, struct qbm_chain *ch)
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
        if (have_end) {
            ob_printf(ob, ", \"image-end-offset\": %" PRIu64, end);
        }
        ob_puts(ob, "}");
    } else {
        ob_printf(ob, "image: %s\n", name);
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

static int repair_file(const char *file, unsigned flags)
{
    struct qbm_image *img = qbm_open(file, QBM_OPEN_RDWR);
    int r;

    if (!img) {
        tool_lib_error(file);
        return -1;
    }
    r = qbm_repair(img, flags);
    if (r < 0) {
        tool_error(file, "repair failed: %s", qbm_get_error());
    }
    qbm_close(img);
    return r;
}

int cmd_check(int argc, char **argv)
{
    static const struct option opts[] = {
        { "repair", no_argument, NULL, 'r' },
        { "in-use", required_argument, NULL, 'i' },
        { "chain", no_argument, NULL, 'c' },
        { "output", required_argument, NULL, 'o' },
        { "force-share", no_argument, NULL, 'U' },
        { "help", no_argument, NULL, 'h' },
        { NULL, 0, NULL, 0 },
    };
    enum output_format fmt = OUTPUT_HUMAN;
    struct outbuf ob = { 0 };
    unsigned in_use = QBM_REPAIR_IN_USE_DIRTY, open_flags = 0;
    bool repair = false, chain = false;
    struct qbm_chain *ch = NULL;
    const char *file;
    int c, ret = 0, r;
    size_t i;

    while ((c = getopt_long(argc, argv, "+rcUh", opts, NULL)) != -1) {
        switch (c) {
        case 'r':
            repair = true;
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
        case 'o':
            if (!parse_output(optarg, &fmt)) {
                return usage_error("check", "--output must be human or "
                                            "json");
            }
            break;
        case 'U':
            open_flags |= QBM_OPEN_FORCE_SHARE;
            break;
        case 'h':
            fputs(usage, stdout);
            return 0;
        default:
            return usage_error("check", "invalid option");
        }
    }
    if (argc - optind != 1) {
        return usage_error("check", "expected one IMAGE argument");
    }
    if (repair && open_flags) {
        return usage_error("check", "--repair cannot be used with -U");
    }
    file = argv[optind];

    if (repair) {
        unsigned flags = in_use | QBM_REPAIR_STALE | QBM_REPAIR_LEAKS;

        if (chain) {
            ch = qbm_chain_open(file, QBM_OPEN_FORCE_SHARE);
            if (!ch) {
                tool_lib_error(file);
                return 1;
            }
            for (i = 0; i < qbm_chain_length(ch); i++) {
                if (strcmp(qbm_image_format(qbm_chain_layer(ch, i)), "qcow2") ==
                        0 &&
                    repair_file(qbm_chain_filename(ch, i), flags) < 0) {
                    qbm_chain_close(ch);
                    return 1;
                }
            }
            qbm_chain_close(ch);
            ch = NULL;
        } else if (repair_file(file, flags) < 0) {
            return 1;
        }
    }

    if (chain) {
        ch = qbm_chain_open(file, open_flags);
        if (!ch) {
            tool_lib_error(file);
            return 1;
        }
        if (fmt == OUTPUT_JSON) {
            ob_puts(&ob, "[");
        }
        for (i = 0; i < qbm_chain_length(ch); i++) {
            if (i) {
                ob_puts(&ob, fmt == OUTPUT_JSON ? ", " : "\n");
            }
            r = check_one(qbm_chain_layer(ch, i), qbm_chain_filename(ch, i),
                          &ob, fmt, i == 0 ? ch : NULL);
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
        struct qbm_image *img = qbm_open(file, open_flags);

        if (!img) {
            tool_lib_error(file);
            return 1;
        }
        ret = check_one(img, file, &ob, fmt, NULL);
        if (ret >= 0 && fmt == OUTPUT_JSON) {
            ob_puts(&ob, "\n");
        }
        qbm_close(img);
        if (ret < 0) {
            ret = 1;
        }
    }
    if (ret == 1) {
        ob_free(&ob);
        return 1;
    }
    if (ob_flush(&ob)) {
        return 1;
    }
    return ret;
}
