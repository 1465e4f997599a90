/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * The option parsing every subcommand shares: GNU argument order (options
 * anywhere, `--` ends them, as qemu-img), the common options (-f, -q, -U,
 * -n, -p, --output, --help) and one-line misuse messages.
 */
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "qbm-tool.h"

bool tool_quiet;

/* The common options, each offered when its TOOL_OPT_* bit is set. */
static const struct {
    unsigned bit;
    const char *shorts;
    struct option opt;
    const char *help;
} common_opts[] = {
    { TOOL_OPT_FORMAT,
      "f:",
      { "format", required_argument, NULL, 'f' },
      "  -f, --format=qcow2    the image format (only qcow2 is supported)\n" },
    { TOOL_OPT_OUTPUT,
      "",
      { "output", required_argument, NULL, TOOL_KEY_OUTPUT },
      "      --output=FORMAT   human (default) or json\n" },
    { TOOL_OPT_SHARE,
      "U",
      { "force-share", no_argument, NULL, 'U' },
      "  -U, --force-share     do not take QEMU's image locks\n" },
    { TOOL_OPT_DRY_RUN,
      "n",
      { "dry-run", no_argument, NULL, 'n' },
      "  -n, --dry-run         say what would change, change nothing\n" },
    { TOOL_OPT_PROGRESS,
      "p",
      { NULL, 0, NULL, 'p' },
      "  -p                    show progress on stderr\n" },
    { 0,
      "q",
      { "quiet", no_argument, NULL, 'q' },
      "  -q, --quiet           print nothing but errors and warnings\n" },
    { 0,
      "h",
      { "help", no_argument, NULL, 'h' },
      "  -h, --help            show this help\n" },
};

#define N_COMMON (sizeof(common_opts) / sizeof(common_opts[0]))

static void hint(const char *cmd)
{
    if (cmd) {
        fprintf(stderr, "Try 'qbm help %s'.\n", cmd);
    } else {
        fputs("Try 'qbm --help'.\n", stderr);
    }
}

int usage_error(const char *cmd, const char *fmt, ...)
{
    va_list ap;

    va_start(ap, fmt);
    tool_verror(cmd, fmt, ap);
    va_end(ap);
    hint(cmd);
    return EXIT_USAGE;
}

bool parse_format(const char *cmd, const char *opt, const char *arg)
{
    if (strcmp(arg, "qcow2") == 0) {
        return true;
    }
    usage_error(cmd, "%s %s: only qcow2 images are supported", opt, arg);
    return false;
}

/*
 * Join the command's options and the common ones it takes into one table.
 * A command option whose value is also a common one's would be
 * unreachable: that is a programming error, caught on the first run.
 */
static void build_tables(struct tool_args *a)
{
    size_t n = 0, s = 0, i, j;

    a->shorts[s++] = ':'; /* report a missing argument as ':' */
    for (i = 0; a->opts && a->opts[i].name; i++) {
        for (j = 0; j < N_COMMON; j++) {
            if (a->opts[i].val == common_opts[j].opt.val) {
                fprintf(stderr,
                        "qbm: %s: internal error: --%s collides "
                        "with a common option\n",
                        a->cmd, a->opts[i].name);
                abort();
            }
        }
        if (n + 1 >= TOOL_MAX_OPTIONS) {
            break;
        }
        a->all[n++] = a->opts[i];
    }
    s += (size_t)snprintf(a->shorts + s, sizeof(a->shorts) - s, "%s",
                          a->shortopts ? a->shortopts : "");
    for (j = 0; j < N_COMMON; j++) {
        if (common_opts[j].bit && !(a->common & common_opts[j].bit)) {
            continue;
        }
        if (common_opts[j].opt.name && n + 1 < TOOL_MAX_OPTIONS) {
            a->all[n++] = common_opts[j].opt;
        }
        s += (size_t)snprintf(a->shorts + s, sizeof(a->shorts) - s, "%s",
                              common_opts[j].shorts);
    }
    if (n + 1 >= TOOL_MAX_OPTIONS || s >= sizeof(a->shorts) - 1) {
        fprintf(stderr, "qbm: %s: internal error: too many options\n", a->cmd);
        abort();
    }
    memset(&a->all[n], 0, sizeof(a->all[n]));
}

static int misuse(struct tool_args *a, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

/* The command's usage, then the common options it takes. */
static void print_help(const struct tool_args *a)
{
    size_t j;

    fputs(a->usage, stdout);
    for (j = 0; j < N_COMMON; j++) {
        if (!common_opts[j].bit || (a->common & common_opts[j].bit)) {
            fputs(common_opts[j].help, stdout);
        }
    }
}

/* The long option that ARG ("--name" or "--name=value") names exactly. */
static const struct option *find_long(const struct tool_args *a,
                                      const char *arg)
{
    size_t len = strcspn(arg + 2, "=");
    size_t i;

    for (i = 0; a->all[i].name; i++) {
        if (strlen(a->all[i].name) == len &&
            strncmp(a->all[i].name, arg + 2, len) == 0) {
            return &a->all[i];
        }
    }
    return NULL;
}

/* How many long options ARG ("--na") abbreviates. */
static size_t prefix_matches(const struct tool_args *a, const char *arg)
{
    size_t len = strcspn(arg + 2, "="), i, n = 0;

    for (i = 0; a->all[i].name; i++) {
        n += strncmp(a->all[i].name, arg + 2, len) == 0;
    }
    return n;
}

/* getopt said '?' or ':': say what, in one line, as GNU tools do. */
static int bad_option(struct tool_args *a, int c)
{
    /* A long option's element is behind optind by now; a short option in
     * a group may still be in the middle of it, so name it by optopt. */
    const char *elem =
        optind > 0 && optind <= a->argc ? a->argv[optind - 1] : "";
    bool is_long = strncmp(elem, "--", 2) == 0 && elem[2];
    const struct option *o;

    if (c == ':') {
        if (is_long) {
            return misuse(a, "option '%.*s' requires an argument",
                          (int)strcspn(elem, "="), elem);
        }
        return misuse(a, "option requires an argument -- '%c'", optopt);
    }
    if (is_long) {
        o = find_long(a, elem);
        if (o && o->has_arg == no_argument && strchr(elem, '=')) {
            return misuse(a, "option '--%s' doesn't allow an argument",
                          o->name);
        }
        if (!o) {
            return misuse(a, "%s option '%.*s'",
                          prefix_matches(a, elem) > 1 ? "ambiguous"
                                                      : "unrecognized",
                          (int)strcspn(elem, "="), elem);
        }
    }
    return misuse(a, "invalid option -- '%c'", optopt);
}

static int misuse(struct tool_args *a, const char *fmt, ...)
{
    va_list ap;

    va_start(ap, fmt);
    tool_verror(a->cmd, fmt, ap);
    va_end(ap);
    hint(a->cmd);
    a->status = EXIT_USAGE;
    return TOOL_GETOPT_EXIT;
}

int tool_getopt(struct tool_args *a, int argc, char **argv)
{
    int c;

    if (!a->started) {
        a->started = true;
        a->argc = argc;
        a->argv = argv;
        a->output = OUTPUT_HUMAN;
        build_tables(a);
        opterr = 0;
        optind = 1;
    }
    for (;;) {
        c = getopt_long(argc, argv, a->shorts, a->all, NULL);
        switch (c) {
        case -1:
            goto operands;
        case '?':
        case ':':
            return bad_option(a, c);
        case 'h':
            print_help(a);
            a->status = 0;
            return TOOL_GETOPT_EXIT;
        case 'q':
            tool_quiet = true;
            break;
        case 'f':
            if (!parse_format(a->cmd, "-f", optarg)) {
                a->status = EXIT_USAGE;
                return TOOL_GETOPT_EXIT;
            }
            a->format_given = true;
            break;
        case TOOL_KEY_OUTPUT:
            if (!parse_output(optarg, &a->output)) {
                return misuse(a, "--output must be human or json");
            }
            break;
        case 'U':
            a->open_flags |= QBM_OPEN_FORCE_SHARE;
            break;
        case 'n':
            a->dry_run = true;
            break;
        case 'p':
            a->progress = true;
            break;
        default:
            return c; /* the command's own */
        }
    }
operands:
    a->args = argv + optind;
    a->nargs = argc - optind;
    if (a->nargs < a->min_args ||
        (a->max_args >= 0 && a->nargs > a->max_args)) {
        return misuse(a, "expected %s", a->args_hint);
    }
    if (tool_quiet) {
        a->progress = false;
    }
    return TOOL_GETOPT_DONE;
}

int tool_parse(struct tool_args *a, int argc, char **argv)
{
    int c = tool_getopt(a, argc, argv);

    if (c > 0) {
        /* A value in the command's table without a case for it. */
        misuse(a, "option not handled");
        return a->status;
    }
    return c == TOOL_GETOPT_DONE ? -1 : a->status;
}

struct qbm_image *tool_open(const char *file, unsigned flags)
{
    struct qbm_image *img = qbm_open(file, flags);

    if (!img) {
        tool_lib_error(file);
    }
    return img;
}

struct qbm_chain *tool_chain_open(const char *file, unsigned flags)
{
    struct qbm_chain *ch = qbm_chain_open(file, flags);

    if (!ch) {
        tool_lib_error(file);
    }
    return ch;
}
