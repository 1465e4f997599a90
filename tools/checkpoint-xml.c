/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * libvirt's <domaincheckpoint> and <domain> XML (docs/checkpoint-rules.md,
 * section 7), parsed and written with libxml2: never by hand, so that
 * quoting, entities and encodings are libxml2's business. Entities are
 * not substituted and nothing is fetched from the network.
 */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <libxml/parser.h>
#include <libxml/tree.h>

#include "checkpoint-xml.h"
#include "qbm-tool.h"

/* libvirt reads at most 1 MiB per checkpoint file; a domain with its
 * <domain> inside stays far below this. */
#define CX_MAX_FILE (16u << 20)

/* The first error libxml2 reports while parsing one document. */
static struct {
    int line;
    char message[512];
} first_error;

static void record_error(void *opaque, xmlErrorPtr err)
{
    size_t n;

    if (first_error.line >= 0 || err->level < XML_ERR_ERROR) {
        return;
    }
    first_error.line = err->line;
    snprintf(first_error.message, sizeof(first_error.message), "%s",
             err->message ? err->message : "malformed XML");
    n = strlen(first_error.message);
    while (n && (first_error.message[n - 1] == '\n' ||
                 first_error.message[n - 1] == ' ')) {
        first_error.message[--n] = '\0';
    }
}

/* qbm: FILE:LINE: message */
static void line_error(const char *file, long line, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static void line_error(const char *file, long line, const char *fmt, ...)
{
    va_list ap;

    fprintf(stderr, "qbm: %s:%ld: ", file, line);
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
}

static int read_all(const char *file, char **ret_buf, size_t *ret_len)
{
    struct stat st;
    char *buf;
    size_t len = 0;
    int fd = open(file, O_RDONLY | O_CLOEXEC);

    if (fd < 0) {
        tool_error(file, "%s", strerror(errno));
        return -1;
    }
    if (fstat(fd, &st) < 0 || !S_ISREG(st.st_mode) ||
        st.st_size > CX_MAX_FILE) {
        tool_error(file, "%s",
                   S_ISREG(st.st_mode) ? "file too large"
                                       : "not a regular file");
        close(fd);
        return -1;
    }
    buf = malloc((size_t)st.st_size + 1);
    if (!buf) {
        tool_error(file, "out of memory");
        close(fd);
        return -1;
    }
    while (len < (size_t)st.st_size) {
        ssize_t n = read(fd, buf + len, (size_t)st.st_size - len);

        if (n < 0 && errno == EINTR) {
            continue;
        }
        if (n <= 0) {
            tool_error(file, "%s",
                       n < 0 ? strerror(errno) : "file shrank while read");
            free(buf);
            close(fd);
            return -1;
        }
        len += (size_t)n;
    }
    close(fd);
    *ret_buf = buf;
    *ret_len = len;
    return 0;
}

/* Parse FILE; malformed XML is refused naming the file and line. */
static xmlDocPtr parse_file(const char *file)
{
    xmlDocPtr doc;
    char *buf;
    size_t len;

    if (read_all(file, &buf, &len) < 0) {
        return NULL;
    }
    first_error.line = -1;
    xmlSetStructuredErrorFunc(NULL, record_error);
    doc = xmlReadMemory(buf, (int)len, file, NULL,
                        XML_PARSE_NONET | XML_PARSE_NOCDATA);
    xmlSetStructuredErrorFunc(NULL, NULL);
    free(buf);
    if (!doc || first_error.line >= 0) {
        line_error(file, first_error.line > 0 ? first_error.line : 1,
                   "malformed XML: %s",
                   first_error.line >= 0 ? first_error.message
                                         : "cannot parse");
        xmlFreeDoc(doc);
        return NULL;
    }
    if (!xmlDocGetRootElement(doc)) {
        line_error(file, 1, "no root element");
        xmlFreeDoc(doc);
        return NULL;
    }
    return doc;
}

static bool is_element(xmlNodePtr n, const char *name)
{
    return n->type == XML_ELEMENT_NODE &&
           strcmp((const char *)n->name, name) == 0;
}

static xmlNodePtr child(xmlNodePtr parent, const char *name)
{
    xmlNodePtr n;

    for (n = parent->children; n; n = n->next) {
        if (is_element(n, name)) {
            return n;
        }
    }
    return NULL;
}

/* The text of an element, blanks trimmed: a new string, or NULL (out of
 * memory, message printed). */
static char *text_of(const char *file, xmlNodePtr n)
{
    xmlChar *c = xmlNodeGetContent(n);
    const char *s = c ? (const char *)c : "";
    size_t len;
    char *r;

    while (*s == ' ' || *s == '\t' || *s == '\n' || *s == '\r') {
        s++;
    }
    len = strlen(s);
    while (len && strchr(" \t\n\r", s[len - 1])) {
        len--;
    }
    r = strndup(s, len);
    xmlFree(c);
    if (!r) {
        tool_error(file, "out of memory");
    }
    return r;
}

/* An attribute's value as a new string, NULL when absent; *failed on
 * allocation failure. */
static char *attr_of(xmlNodePtr n, const char *name, bool *failed)
{
    xmlChar *v = xmlGetProp(n, (const xmlChar *)name);
    char *r;

    if (!v) {
        return NULL;
    }
    r = strdup((const char *)v);
    xmlFree(v);
    if (!r) {
        *failed = true;
    }
    return r;
}

static int parse_disks(const char *file, xmlNodePtr disks,
                       struct cx_checkpoint *ck)
{
    xmlNodePtr n;
    size_t i;

    for (n = disks->children; n; n = n->next) {
        struct cx_disk *d;
        bool failed = false;
        char *mode;

        if (!is_element(n, "disk")) {
            continue;
        }
        d = realloc(ck->disks, (ck->ndisks + 1) * sizeof(*d));
        if (!d) {
            tool_error(file, "out of memory");
            return -1;
        }
        ck->disks = d;
        d = &ck->disks[ck->ndisks];
        memset(d, 0, sizeof(*d));
        d->name = attr_of(n, "name", &failed);
        mode = attr_of(n, "checkpoint", &failed);
        if (!failed && (!mode || strcmp(mode, "bitmap") == 0)) {
            d->bitmap = attr_of(n, "bitmap", &failed);
            if (!failed && !d->bitmap) {
                d->bitmap = strdup(ck->name);
                failed = !d->bitmap;
            }
        }
        ck->ndisks++;
        if (failed) {
            free(mode);
            tool_error(file, "out of memory");
            return -1;
        }
        if (!d->name || !*d->name) {
            free(mode);
            line_error(file, xmlGetLineNo(n), "a <disk> without name");
            return -1;
        }
        if (mode && strcmp(mode, "bitmap") != 0 && strcmp(mode, "no") != 0) {
            line_error(file, xmlGetLineNo(n),
                       "disk '%s': checkpoint='%s' "
                       "is neither 'bitmap' nor 'no'",
                       d->name, mode);
            free(mode);
            return -1;
        }
        free(mode);
        if (d->bitmap && !*d->bitmap) {
            line_error(file, xmlGetLineNo(n), "disk '%s': empty bitmap name",
                       d->name);
            return -1;
        }
        for (i = 0; i + 1 < ck->ndisks; i++) {
            if (strcmp(ck->disks[i].name, d->name) == 0) {
                line_error(file, xmlGetLineNo(n),
                           "disk '%s' is listed "
                           "twice",
                           d->name);
                return -1;
            }
        }
    }
    return 0;
}

/* A whole number of seconds, as libvirt writes creationTime. */
static bool parse_seconds(const char *s, int64_t *ret)
{
    char *end;
    long long v;

    if (!*s || *s == '-' || *s == '+' || *s == ' ') {
        return false;
    }
    errno = 0;
    v = strtoll(s, &end, 10);
    if (errno || *end) {
        return false;
    }
    *ret = v;
    return true;
}

static int parse_checkpoint(const char *file, struct cx_checkpoint *ck)
{
    xmlDocPtr doc = parse_file(file);
    xmlNodePtr root, n, m;
    char *s;

    ck->file = strdup(file);
    if (!ck->file) {
        tool_error(file, "out of memory");
        xmlFreeDoc(doc);
        return -1;
    }
    if (!doc) {
        return -1;
    }
    ck->doc = doc;
    root = xmlDocGetRootElement(doc);
    if (!is_element(root, "domaincheckpoint")) {
        line_error(file, xmlGetLineNo(root),
                   "the root element is <%s>, not "
                   "<domaincheckpoint>",
                   (const char *)root->name);
        return -1;
    }
    n = child(root, "name");
    if (!n) {
        line_error(file, xmlGetLineNo(root), "no <name>");
        return -1;
    }
    ck->name = text_of(file, n);
    if (!ck->name) {
        return -1;
    }
    if (!qbm_checkpoint_name_valid(ck->name)) {
        line_error(file, xmlGetLineNo(n),
                   "'%s' is not a checkpoint name "
                   "libvirt accepts",
                   ck->name);
        return -1;
    }
    n = child(root, "parent");
    if (n) {
        m = child(n, "name");
        if (!m) {
            line_error(file, xmlGetLineNo(n), "<parent> without <name>");
            return -1;
        }
        ck->parent = text_of(file, m);
        if (!ck->parent) {
            return -1;
        }
    }
    n = child(root, "creationTime");
    if (!n) {
        line_error(file, xmlGetLineNo(root), "no <creationTime>");
        return -1;
    }
    s = text_of(file, n);
    if (!s) {
        return -1;
    }
    if (!parse_seconds(s, &ck->creation_time)) {
        line_error(file, xmlGetLineNo(n),
                   "<creationTime> '%s' is not a "
                   "number of seconds",
                   s);
        free(s);
        return -1;
    }
    free(s);
    n = child(root, "disks");
    if (n) {
        ck->has_disks = true;
        if (parse_disks(file, n, ck) < 0) {
            return -1;
        }
    }
    ck->domain = child(root, "domain");
    return 0;
}

void cx_checkpoints_free(struct cx_checkpoint *list, size_t n)
{
    size_t i, j;

    for (i = 0; i < n; i++) {
        for (j = 0; j < list[i].ndisks; j++) {
            free(list[i].disks[j].name);
            free(list[i].disks[j].bitmap);
        }
        free(list[i].disks);
        free(list[i].file);
        free(list[i].name);
        free(list[i].parent);
        xmlFreeDoc(list[i].doc);
    }
    free(list);
}

static int by_name(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

int cx_read_dir(const char *dir, struct cx_checkpoint **ret_list, size_t *ret_n)
{
    struct cx_checkpoint *list = NULL;
    char **names = NULL;
    size_t n = 0, i, nck = 0;
    struct dirent *de;
    DIR *d = opendir(dir);
    int r = 0;

    if (!d) {
        tool_error(dir, "%s", strerror(errno));
        return -1;
    }
    while ((de = readdir(d))) {
        size_t len = strlen(de->d_name);
        char **p;

        if (len < 5 || strcmp(de->d_name + len - 4, ".xml") != 0 ||
            de->d_name[0] == '.') {
            continue;
        }
        p = realloc(names, (n + 1) * sizeof(*p));
        if (!p || asprintf(&p[n], "%s/%s", dir, de->d_name) < 0) {
            names = p ? p : names;
            r = -1;
            tool_error(dir, "out of memory");
            break;
        }
        names = p;
        n++;
    }
    closedir(d);
    if (r == 0 && n) {
        qsort(names, n, sizeof(*names), by_name);
        list = calloc(n, sizeof(*list));
        if (!list) {
            tool_error(dir, "out of memory");
            r = -1;
        }
    }
    for (i = 0; i < n && r == 0; i++) {
        struct stat st;

        if (stat(names[i], &st) == 0 && !S_ISREG(st.st_mode)) {
            continue;
        }
        r = parse_checkpoint(names[i], &list[nck++]);
    }
    for (i = 0; i < n; i++) {
        free(names[i]);
    }
    free(names);
    if (r < 0) {
        cx_checkpoints_free(list, nck);
        return -1;
    }
    *ret_list = list;
    *ret_n = nck;
    return 0;
}

int cx_read_domain_file(const char *file, void **ret_doc, void **ret_node)
{
    xmlDocPtr doc = parse_file(file);
    xmlNodePtr root;

    if (!doc) {
        return -1;
    }
    root = xmlDocGetRootElement(doc);
    if (!is_element(root, "domain")) {
        line_error(file, xmlGetLineNo(root),
                   "the root element is <%s>, not "
                   "<domain>",
                   (const char *)root->name);
        xmlFreeDoc(doc);
        return -1;
    }
    *ret_doc = doc;
    *ret_node = root;
    return 0;
}

void cx_doc_free(void *doc)
{
    xmlFreeDoc(doc);
}

void cx_domain_clear(struct cx_domain *dom)
{
    size_t i;

    for (i = 0; i < dom->ndisks; i++) {
        free(dom->disks[i].target);
        free(dom->disks[i].source);
    }
    free(dom->disks);
    free(dom->name);
    memset(dom, 0, sizeof(*dom));
}

static int parse_domain_disk(const char *file, xmlNodePtr n,
                             struct cx_domain *dom)
{
    struct cx_domain_disk *d;
    bool failed = false;
    char *type, *device;
    xmlNodePtr t = child(n, "target"), s = child(n, "source");
    size_t i;

    d = realloc(dom->disks, (dom->ndisks + 1) * sizeof(*d));
    if (!d) {
        tool_error(file, "out of memory");
        return -1;
    }
    dom->disks = d;
    d = &dom->disks[dom->ndisks++];
    memset(d, 0, sizeof(*d));
    type = attr_of(n, "type", &failed);
    device = attr_of(n, "device", &failed);
    d->target = t ? attr_of(t, "dev", &failed) : NULL;
    /* Only a file or a block device is an image qbm can open. */
    if (s && (!type || strcmp(type, "file") == 0)) {
        d->source = attr_of(s, "file", &failed);
    } else if (s && strcmp(type, "block") == 0) {
        d->source = attr_of(s, "dev", &failed);
    }
    d->writable = (!device || strcmp(device, "disk") == 0 ||
                   strcmp(device, "lun") == 0) &&
                  !child(n, "readonly");
    free(type);
    free(device);
    if (failed) {
        tool_error(file, "out of memory");
        return -1;
    }
    if (!d->target || !*d->target) {
        line_error(file, xmlGetLineNo(n),
                   "a domain <disk> without <target "
                   "dev=...>");
        return -1;
    }
    for (i = 0; i + 1 < dom->ndisks; i++) {
        if (strcmp(dom->disks[i].target, d->target) == 0) {
            line_error(file, xmlGetLineNo(n),
                       "domain disk '%s' is listed "
                       "twice",
                       d->target);
            return -1;
        }
    }
    return 0;
}

int cx_domain_from_node(const char *file, void *node, struct cx_domain *ret)
{
    struct cx_domain dom = { 0 };
    xmlNodePtr root = node, n, devices;

    n = child(root, "name");
    if (!n) {
        line_error(file, xmlGetLineNo(root), "<domain> without <name>");
        return -1;
    }
    dom.name = text_of(file, n);
    if (!dom.name) {
        return -1;
    }
    devices = child(root, "devices");
    for (n = devices ? devices->children : NULL; n; n = n->next) {
        if (is_element(n, "disk") && parse_domain_disk(file, n, &dom) < 0) {
            cx_domain_clear(&dom);
            return -1;
        }
    }
    *ret = dom;
    return 0;
}

/* ---- writing --------------------------------------------------------------
 */

static xmlNodePtr add_text(xmlNodePtr parent, const char *name,
                           const char *text)
{
    /* xmlNewTextChild escapes the text. */
    return xmlNewTextChild(parent, NULL, (const xmlChar *)name,
                           (const xmlChar *)text);
}

static xmlDocPtr build_redefine(const struct cx_redefine *def)
{
    xmlDocPtr doc = xmlNewDoc((const xmlChar *)"1.0");
    xmlNodePtr root, n, disks, copy;
    char secs[32];
    bool ok;
    size_t i;

    if (!doc) {
        return NULL;
    }
    root = xmlNewDocNode(doc, NULL, (const xmlChar *)"domaincheckpoint", NULL);
    if (!root) {
        xmlFreeDoc(doc);
        return NULL;
    }
    xmlDocSetRootElement(doc, root);
    ok = add_text(root, "name", def->name) != NULL;
    if (ok && def->parent) {
        n = xmlNewChild(root, NULL, (const xmlChar *)"parent", NULL);
        ok = n && add_text(n, "name", def->parent);
    }
    snprintf(secs, sizeof(secs), "%" PRId64, def->creation_time);
    ok = ok && add_text(root, "creationTime", secs);
    disks = ok ? xmlNewChild(root, NULL, (const xmlChar *)"disks", NULL) : NULL;
    ok = ok && disks;
    for (i = 0; ok && i < def->ndisks; i++) {
        n = xmlNewChild(disks, NULL, (const xmlChar *)"disk", NULL);
        ok = n &&
             xmlNewProp(n, (const xmlChar *)"name",
                        (const xmlChar *)def->targets[i]) &&
             xmlNewProp(n, (const xmlChar *)"checkpoint",
                        (const xmlChar *)(def->bitmaps[i] ? "bitmap" : "no"));
        if (ok && def->bitmaps[i]) {
            ok = xmlNewProp(n, (const xmlChar *)"bitmap",
                            (const xmlChar *)def->bitmaps[i]) != NULL;
        }
    }
    if (ok && def->domain) {
        copy = xmlDocCopyNode(def->domain, doc, 1);
        ok = copy && xmlAddChild(root, copy);
        if (copy && !ok) {
            xmlFreeNode(copy);
        }
    }
    if (!ok) {
        xmlFreeDoc(doc);
        return NULL;
    }
    return doc;
}

int cx_write_redefine(const char *path, const struct cx_redefine *def)
{
    xmlDocPtr doc = build_redefine(def);
    xmlChar *mem = NULL;
    char *tmp = NULL, *slash;
    int size = 0, fd = -1, r = -1;
    size_t done = 0;
    mode_t mask;

    if (doc) {
        xmlDocDumpFormatMemoryEnc(doc, &mem, &size, "UTF-8", 1);
    }
    xmlFreeDoc(doc);
    if (!mem) {
        tool_error(path, "out of memory");
        return -1;
    }
    /* .NAME.qbm-XXXXXX beside PATH, flushed, then renamed over it. */
    slash = strrchr(path, '/');
    if (asprintf(&tmp, "%.*s.%s.qbm-XXXXXX",
                 slash ? (int)(slash - path + 1) : 0, path,
                 slash ? slash + 1 : path) < 0) {
        tmp = NULL;
        tool_error(path, "out of memory");
        goto out;
    }
    fd = mkstemp(tmp);
    if (fd < 0) {
        tool_error(path, "cannot create a temporary file: %s", strerror(errno));
        goto out;
    }
    while (done < (size_t)size) {
        ssize_t n = write(fd, mem + done, (size_t)size - done);

        if (n < 0 && errno == EINTR) {
            continue;
        }
        if (n < 0) {
            tool_error(path, "%s", strerror(errno));
            goto out;
        }
        done += (size_t)n;
    }
    /* mkstemp made it 0600: as any new file, 0666 minus the umask. */
    mask = umask(0);
    umask(mask);
    if (fchmod(fd, 0666 & ~mask) < 0 || fsync(fd) < 0) {
        tool_error(path, "%s", strerror(errno));
        goto out;
    }
    if (close(fd) < 0) {
        fd = -1;
        tool_error(path, "%s", strerror(errno));
        goto out;
    }
    fd = -1;
    if (rename(tmp, path) < 0) {
        tool_error(path, "%s", strerror(errno));
        goto out;
    }
    r = 0;
out:
    if (fd >= 0) {
        close(fd);
    }
    if (r < 0 && tmp) {
        unlink(tmp);
    }
    free(tmp);
    xmlFree(mem);
    return r;
}
