/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * The Python module `qbm`: a C extension over libqbm's public API (qbm.h
 * only, like the qbm command). Policy stays in the library; this file
 * converts arguments and results, raises qbm.Error from the library's last
 * error, and makes Python callbacks safe:
 *
 *  - Long calls run with the GIL released. A handle in a call is marked
 *    busy, so another thread, or a callback of the same call, that uses it
 *    meanwhile gets an exception instead of racing the library (a handle
 *    is not thread-safe); a closed handle raises ValueError, never reaches
 *    the library.
 *  - A callback takes the GIL back; when the Python code raises, the
 *    exception is kept, the callback returns non-zero so the library stops
 *    the operation as it does on an error (nothing left behind or switched),
 *    and the call re-raises the exception.
 *
 * Names (bitmap names, file names) cross as bytes: str is encoded with
 * UTF-8 (bitmap names) or the file system encoding (file names), both with
 * surrogateescape, so names that are not valid UTF-8 round-trip.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <stdbool.h>
#include <stdint.h>
#include <string.h>
#include <structmember.h>

#include "qbm.h"

static PyObject *QbmError;
static PyTypeObject ImageType, ChainType, BitmapType, ExtentIterType;
static PyTypeObject ProblemType, FindingType, SpaceInfoType;

/* ---- errors --------------------------------------------------------------
 */

/* Raise qbm.Error(err, msg, filename): an OSError whose strerror and
 * .message are `msg` (bytes that are not UTF-8, from a bitmap name, are
 * replaced), filename the file concerned (may be NULL), and .space
 * `space` (borrowed; NULL: the class's None). Returns NULL. */
static PyObject *raise_errno_space(int err, const char *msg, PyObject *filename,
                                   PyObject *space)
{
    PyObject *exc, *m;

    m = PyUnicode_DecodeUTF8(msg, (Py_ssize_t)strlen(msg), "replace");
    if (!m) {
        return NULL;
    }
    exc = PyObject_CallFunction(QbmError, "iOO", err, m,
                                filename ? filename : Py_None);
    if (exc) {
        if (PyObject_SetAttrString(exc, "message", m) == 0 &&
            (!space || PyObject_SetAttrString(exc, "space", space) == 0)) {
            PyErr_SetObject(QbmError, exc);
        }
        Py_DECREF(exc);
    }
    Py_DECREF(m);
    return NULL;
}

static PyObject *raise_errno(int err, const char *msg, PyObject *filename)
{
    return raise_errno_space(err, msg, filename, NULL);
}

/* Raise qbm.Error from the calling thread's last library error, with
 * .space `space` (borrowed, may be NULL). */
static PyObject *raise_qbm_space(PyObject *filename, PyObject *space)
{
    int err = qbm_get_errno();

    return raise_errno_space(err ? err : EIO, qbm_get_error(), filename, space);
}

static PyObject *raise_qbm(PyObject *filename)
{
    return raise_qbm_space(filename, NULL);
}

/* ---- callbacks -----------------------------------------------------------
 */

/*
 * What a callback of one call shares with it: the Python callable (or a
 * list to append to), and the exception a callback raised, kept while the
 * library unwinds.
 */
struct cb {
    PyObject *fn;
    PyObject *list;
    PyObject *exc_type, *exc_value, *exc_tb;
};

/* Keep the pending exception (a callback failed); the GIL is held. */
static void cb_keep_error(struct cb *c)
{
    if (!c->exc_type) {
        PyErr_Fetch(&c->exc_type, &c->exc_value, &c->exc_tb);
    } else {
        PyErr_Clear();
    }
}

/* After the call, with the GIL: true (and the exception restored) when a
 * callback failed. */
static bool cb_failed(struct cb *c)
{
    if (!c->exc_type) {
        return false;
    }
    PyErr_Restore(c->exc_type, c->exc_value, c->exc_tb);
    c->exc_type = c->exc_value = c->exc_tb = NULL;
    return true;
}

/* Append `item` (a new reference, may be NULL on failure) to c->list. */
static int cb_append(struct cb *c, PyObject *item)
{
    int r = item ? PyList_Append(c->list, item) : -1;

    Py_XDECREF(item);
    if (r < 0) {
        cb_keep_error(c);
        return -1;
    }
    return 0;
}

static PyObject *decode_name(const char *s)
{
    if (!s) {
        Py_RETURN_NONE;
    }
    return PyUnicode_DecodeUTF8(s, (Py_ssize_t)strlen(s), "surrogateescape");
}

static PyObject *decode_path(const char *s)
{
    if (!s) {
        Py_RETURN_NONE;
    }
    return PyUnicode_DecodeFSDefault(s);
}

/* A qbm.SpaceInfo from the library's figures (new reference or NULL). */
static PyObject *space_info_new(const struct qbm_space_info *s)
{
    const uint64_t v[] = { s->bytes, s->end_before, s->end_after, s->capacity };
    PyObject *o = PyStructSequence_New(&SpaceInfoType);
    Py_ssize_t i;

    for (i = 0; o && i < 4; i++) {
        PyObject *n = PyLong_FromUnsignedLongLong((unsigned long long)v[i]);

        if (!n) {
            Py_CLEAR(o);
            break;
        }
        PyStructSequence_SET_ITEM(o, i, n);
    }
    return o;
}

static int progress_cb(void *opaque, uint64_t done, uint64_t total)
{
    struct cb *c = opaque;
    PyGILState_STATE g = PyGILState_Ensure();
    PyObject *r = NULL;
    int ret = 0;

    /* Ctrl-C stops a long copy as an exception from the callback would. */
    if (PyErr_CheckSignals() == 0) {
        r = PyObject_CallFunction(c->fn, "KK", (unsigned long long)done,
                                  (unsigned long long)total);
    }
    if (!r) {
        cb_keep_error(c);
        ret = -1;
    }
    Py_XDECREF(r);
    PyGILState_Release(g);
    return ret;
}

static int problem_cb(void *opaque, int kind, uint64_t offset,
                      const char *message)
{
    struct cb *c = opaque;
    PyGILState_STATE g = PyGILState_Ensure();
    PyObject *p = PyStructSequence_New(&ProblemType);
    int r;

    if (p) {
        PyStructSequence_SET_ITEM(p, 0, PyLong_FromLong(kind));
        PyStructSequence_SET_ITEM(
            p, 1, PyLong_FromUnsignedLongLong((unsigned long long)offset));
        PyStructSequence_SET_ITEM(
            p, 2,
            PyUnicode_DecodeUTF8(message, (Py_ssize_t)strlen(message),
                                 "replace"));
        if (PyErr_Occurred()) {
            Py_CLEAR(p);
        }
    }
    r = cb_append(c, p);
    PyGILState_Release(g);
    return r;
}

static int finding_cb(void *opaque, int rule, const char *bitmap, size_t layer,
                      size_t origin)
{
    struct cb *c = opaque;
    PyGILState_STATE g = PyGILState_Ensure();
    PyObject *p = PyStructSequence_New(&FindingType);
    int r;

    if (p) {
        PyStructSequence_SET_ITEM(p, 0, PyLong_FromLong(rule));
        PyStructSequence_SET_ITEM(p, 1, decode_name(bitmap));
        PyStructSequence_SET_ITEM(p, 2, PyLong_FromSize_t(layer));
        PyStructSequence_SET_ITEM(p, 3, PyLong_FromSize_t(origin));
        if (PyErr_Occurred()) {
            Py_CLEAR(p);
        }
    }
    r = cb_append(c, p);
    PyGILState_Release(g);
    return r;
}

static int extent_list_cb(void *opaque, uint64_t offset, uint64_t length)
{
    struct cb *c = opaque;
    PyGILState_STATE g = PyGILState_Ensure();
    int r = cb_append(c, Py_BuildValue("(KK)", (unsigned long long)offset,
                                       (unsigned long long)length));

    PyGILState_Release(g);
    return r;
}

static int alloc_cb(void *opaque, uint64_t offset, uint64_t length,
                    unsigned status)
{
    struct cb *c = opaque;
    PyGILState_STATE g = PyGILState_Ensure();
    int r = cb_append(c, Py_BuildValue("(KKI)", (unsigned long long)offset,
                                       (unsigned long long)length, status));

    PyGILState_Release(g);
    return r;
}

static int copy_cb(void *opaque, int action, const char *bitmap,
                   uint64_t granularity)
{
    struct cb *c = opaque;
    PyGILState_STATE g = PyGILState_Ensure();
    PyObject *name = decode_name(bitmap);
    int r = cb_append(c, name ? Py_BuildValue("(iNK)", action, name,
                                              (unsigned long long)granularity)
                              : NULL);

    PyGILState_Release(g);
    return r;
}

/* The carry callbacks: (action, bitmap or None, file name). */
static int carry_cb(void *opaque, int action, const char *bitmap,
                    const char *file)
{
    struct cb *c = opaque;
    PyGILState_STATE g = PyGILState_Ensure();
    PyObject *name = decode_name(bitmap), *f = decode_path(file);
    int r;

    if (!name || !f) {
        Py_XDECREF(name);
        Py_XDECREF(f);
        r = cb_append(c, NULL);
    } else {
        r = cb_append(c, Py_BuildValue("(iNN)", action, name, f));
    }
    PyGILState_Release(g);
    return r;
}

/* ---- argument converters ----------------------------------------------
 */

/* O& converter: a bitmap name (str or bytes) as a new bytes object. */
static int conv_name(PyObject *o, void *p)
{
    PyObject **ret = p;
    PyObject *b;

    if (!o) {
        Py_CLEAR(*ret);
        return 1;
    }
    if (PyUnicode_Check(o)) {
        b = PyUnicode_AsEncodedString(o, "utf-8", "surrogateescape");
    } else if (PyBytes_Check(o)) {
        b = Py_NewRef(o);
    } else {
        PyErr_Format(PyExc_TypeError,
                     "a bitmap name must be str or bytes, not %.100s",
                     Py_TYPE(o)->tp_name);
        return 0;
    }
    if (!b) {
        return 0;
    }
    if (strlen(PyBytes_AS_STRING(b)) != (size_t)PyBytes_GET_SIZE(b)) {
        Py_DECREF(b);
        PyErr_SetString(PyExc_ValueError, "embedded null byte in name");
        return 0;
    }
    *ret = b;
    return Py_CLEANUP_SUPPORTED;
}

/* O& converter: an optional bitmap name (None allowed): bytes or NULL. */
static int conv_opt_name(PyObject *o, void *p)
{
    if (o == Py_None) {
        *(PyObject **)p = NULL;
        return 1;
    }
    return conv_name(o, p);
}

/* O& converter: an optional file name (None allowed) as new bytes or
 * NULL. */
static int conv_opt_path(PyObject *o, void *p)
{
    if (o == Py_None) {
        *(PyObject **)p = NULL;
        return 1;
    }
    return PyUnicode_FSConverter(o, p);
}

/* O& converter: a non-negative integer that fits 64 bits ('K' would wrap
 * a negative one silently). */
static int conv_u64(PyObject *o, void *p)
{
    unsigned long long v = PyLong_AsUnsignedLongLong(o);

    if (v == (unsigned long long)-1 && PyErr_Occurred()) {
        return 0;
    }
    *(unsigned long long *)p = v;
    return 1;
}

#define BYTES(o) ((o) ? PyBytes_AS_STRING(o) : NULL)

/* A sequence of file names as a NULL-free array of C strings; the bytes
 * objects are kept in *ret_keep (a list). */
static const char **path_array(PyObject *seq, size_t *ret_n,
                               PyObject **ret_keep)
{
    PyObject *fast, *keep;
    const char **a;
    Py_ssize_t i, n;

    /* A lone path is a sequence too (of characters): refuse it. */
    if (PyUnicode_Check(seq) || PyBytes_Check(seq)) {
        PyErr_SetString(PyExc_TypeError,
                        "expected a sequence of paths, not a single path");
        return NULL;
    }
    fast = PySequence_Fast(seq, "expected a sequence of paths");
    if (!fast) {
        return NULL;
    }
    n = PySequence_Fast_GET_SIZE(fast);
    keep = PyList_New(0);
    a = PyMem_Calloc((size_t)n + 1, sizeof(*a));
    if (!keep || !a) {
        Py_DECREF(fast);
        Py_XDECREF(keep);
        PyMem_Free(a);
        PyErr_NoMemory();
        return NULL;
    }
    for (i = 0; i < n; i++) {
        PyObject *b = NULL;

        if (!PyUnicode_FSConverter(PySequence_Fast_GET_ITEM(fast, i), &b) ||
            PyList_Append(keep, b) < 0) {
            Py_XDECREF(b);
            Py_DECREF(fast);
            Py_DECREF(keep);
            PyMem_Free(a);
            return NULL;
        }
        a[i] = PyBytes_AS_STRING(b);
        Py_DECREF(b);
    }
    Py_DECREF(fast);
    *ret_n = (size_t)n;
    *ret_keep = keep;
    return a;
}

/* ---- handles -------------------------------------------------------------
 */

typedef struct {
    PyObject_HEAD struct qbm_chain *chain; /* NULL once closed */
    int busy;
    bool writable; /* its top layer */
} ChainObject;

/*
 * An image: opened by qbm.open() (owner NULL: the object owns the handle),
 * or a layer of a chain (owner: the chain, which owns the handle; the
 * layer is usable while the chain is open).
 */
typedef struct {
    PyObject_HEAD struct qbm_image *img; /* NULL once closed */
    ChainObject *owner;
    int busy;
    bool writable;
} ImageObject;

/* Where the busy mark of an image lives: its chain's for a layer. */
static int *image_busy(ImageObject *self)
{
    return self->owner ? &self->owner->busy : &self->busy;
}

/*
 * Take the handle of `self` for one call: NULL with ValueError when it is
 * closed, RuntimeError when a call on it is running (another thread, or a
 * callback of that call). Release with image_leave().
 */
static struct qbm_image *image_enter(ImageObject *self)
{
    int *busy = image_busy(self);

    if (!self->img || (self->owner && !self->owner->chain)) {
        PyErr_SetString(PyExc_ValueError, "operation on a closed image");
        return NULL;
    }
    if (*busy) {
        PyErr_SetString(PyExc_RuntimeError,
                        "image in use by another call (a handle is not "
                        "thread-safe)");
        return NULL;
    }
    *busy = 1;
    return self->img;
}

static void image_leave(ImageObject *self)
{
    *image_busy(self) = 0;
}

static PyObject *image_filename_obj(struct qbm_image *img)
{
    return decode_path(qbm_image_filename(img));
}

/* Raise qbm.Error for a failed call on `img`, naming its file. */
static PyObject *raise_img(struct qbm_image *img)
{
    PyObject *f = image_filename_obj(img);
    PyObject *r;

    if (!f) {
        return NULL;
    }
    r = raise_qbm(f);
    Py_DECREF(f);
    return r;
}

static ImageObject *image_new(struct qbm_image *img, ChainObject *owner,
                              bool writable)
{
    ImageObject *o = PyObject_New(ImageObject, &ImageType);

    if (!o) {
        return NULL;
    }
    o->img = img;
    o->owner = owner;
    Py_XINCREF(owner);
    o->busy = 0;
    o->writable = writable;
    return o;
}

static void Image_dealloc(ImageObject *self)
{
    if (!self->owner) {
        qbm_close(self->img);
    }
    Py_XDECREF(self->owner);
    PyObject_Free(self);
}

PyDoc_STRVAR(Image_close_doc,
             "close()\n--\n\n"
             "Close the image and release its locks; staged edits not "
             "committed are\ndropped. Closing twice is fine. A layer of a "
             "chain is closed with its chain.");

static PyObject *Image_close(ImageObject *self, PyObject *unused)
{
    if (*image_busy(self)) {
        PyErr_SetString(PyExc_RuntimeError,
                        "cannot close an image while a call uses it");
        return NULL;
    }
    if (!self->owner) {
        qbm_close(self->img);
    }
    self->img = NULL;
    Py_RETURN_NONE;
}

static PyObject *Image_enter(ImageObject *self, PyObject *unused)
{
    if (!self->img || (self->owner && !self->owner->chain)) {
        PyErr_SetString(PyExc_ValueError, "operation on a closed image");
        return NULL;
    }
    return Py_NewRef(self);
}

static PyObject *Image_exit(ImageObject *self, PyObject *args)
{
    PyObject *r = Image_close(self, NULL);

    if (!r) {
        return NULL;
    }
    Py_DECREF(r);
    Py_RETURN_FALSE;
}

static PyObject *Image_repr(ImageObject *self)
{
    if (!self->img || (self->owner && !self->owner->chain)) {
        return PyUnicode_FromString("<qbm.Image (closed)>");
    }
    PyObject *f = image_filename_obj(self->img), *r;

    if (!f) {
        return NULL;
    }
    r = PyUnicode_FromFormat("<qbm.Image %R%s>", f,
                             self->writable ? " (writable)" : "");
    Py_DECREF(f);
    return r;
}

/* ---- image properties ----------------------------------------------------
 */

/* A getter body: take the image, compute `expr` into `res`, leave. */
#define IMAGE_GETTER(fname, expr)                            \
    static PyObject *fname(ImageObject *self, void *closure) \
    {                                                        \
        struct qbm_image *img = image_enter(self);           \
        PyObject *res;                                       \
                                                             \
        if (!img) {                                          \
            return NULL;                                     \
        }                                                    \
        res = (expr);                                        \
        image_leave(self);                                   \
        return res;                                          \
    }

IMAGE_GETTER(Image_get_filename, image_filename_obj(img))
IMAGE_GETTER(Image_get_format, decode_name(qbm_image_format(img)))
IMAGE_GETTER(Image_get_version, PyLong_FromUnsignedLong(qbm_image_version(img)))
IMAGE_GETTER(Image_get_virtual_size,
             PyLong_FromUnsignedLongLong(qbm_image_virtual_size(img)))
IMAGE_GETTER(Image_get_cluster_size,
             PyLong_FromUnsignedLongLong(qbm_image_cluster_size(img)))
IMAGE_GETTER(Image_get_refcount_bits,
             PyLong_FromUnsignedLong(qbm_image_refcount_bits(img)))
IMAGE_GETTER(Image_get_compression_type,
             decode_name(qbm_image_compression_type(img)))
IMAGE_GETTER(Image_get_backing_file, decode_path(qbm_image_backing_file(img)))
IMAGE_GETTER(Image_get_backing_format,
             decode_name(qbm_image_backing_format(img)))
IMAGE_GETTER(Image_get_data_file, decode_path(qbm_image_data_file(img)))
IMAGE_GETTER(Image_get_file_size,
             PyLong_FromUnsignedLongLong(qbm_image_file_size(img)))
IMAGE_GETTER(Image_get_capacity,
             PyLong_FromUnsignedLongLong(qbm_image_capacity(img)))
IMAGE_GETTER(Image_get_snapshot_count,
             PyLong_FromUnsignedLong(qbm_image_snapshot_count(img)))
IMAGE_GETTER(Image_get_bitmaps_state,
             PyUnicode_FromString(
                 qbm_image_bitmaps_state(img) == QBM_BITMAPS_OK      ? "ok"
                 : qbm_image_bitmaps_state(img) == QBM_BITMAPS_STALE ? "stale"
                                                                     : "none"))
IMAGE_GETTER(Image_get_writable, PyBool_FromLong(self->writable))

static PyObject *Image_get_closed(ImageObject *self, void *closure)
{
    return PyBool_FromLong(!self->img || (self->owner && !self->owner->chain));
}

/* ---- bitmaps ---------------------------------------------------------------
 */

typedef struct {
    PyObject_HEAD ImageObject *image;
    PyObject *name;
    unsigned long long granularity;
    int enabled, in_use, consistent;
} BitmapObject;

static BitmapObject *bitmap_new(ImageObject *image, struct qbm_image *img,
                                size_t idx)
{
    BitmapObject *b = PyObject_New(BitmapObject, &BitmapType);
    unsigned flags = qbm_bitmap_flags(img, idx);

    if (!b) {
        return NULL;
    }
    b->image = image;
    Py_INCREF(image);
    b->granularity = qbm_bitmap_granularity(img, idx);
    b->enabled = !!(flags & QBM_BITMAP_AUTO);
    b->in_use = !!(flags & QBM_BITMAP_IN_USE);
    b->consistent = qbm_bitmap_consistent(img, idx) > 0;
    b->name = decode_name(qbm_bitmap_name(img, idx));
    if (!b->name) {
        Py_DECREF(b);
        return NULL;
    }
    return b;
}

static void Bitmap_dealloc(BitmapObject *self)
{
    Py_XDECREF(self->image);
    Py_XDECREF(self->name);
    PyObject_Free(self);
}

static PyObject *Bitmap_repr(BitmapObject *self)
{
    return PyUnicode_FromFormat("<qbm.Bitmap %R granularity=%llu%s%s>",
                                self->name, self->granularity,
                                self->enabled ? " enabled" : " disabled",
                                self->in_use ? " in-use" : "");
}

/* Index of bitmap `name` (bytes) of `img`, or -1 with qbm.Error. */
static int find_bitmap(struct qbm_image *img, PyObject *name)
{
    int idx = qbm_bitmap_find(img, PyBytes_AS_STRING(name));

    if (idx < 0) {
        raise_img(img);
    }
    return idx;
}

static PyObject *Bitmap_get_dirty_bytes(BitmapObject *self, void *closure)
{
    PyThreadState *ts;
    struct qbm_image *img = image_enter(self->image);
    PyObject *name = NULL;
    uint64_t bytes = 0;
    int idx, r = -1;

    if (!img) {
        return NULL;
    }
    if (!conv_name(self->name, &name)) {
        image_leave(self->image);
        return NULL;
    }
    idx = find_bitmap(img, name);
    if (idx >= 0) {
        ts = PyEval_SaveThread();
        r = qbm_bitmap_dirty_bytes(img, (size_t)idx, &bytes);
        PyEval_RestoreThread(ts);
        if (r < 0) {
            raise_img(img);
        }
    }
    image_leave(self->image);
    Py_DECREF(name);
    return r < 0 ? NULL : PyLong_FromUnsignedLongLong(bytes);
}

static PyMemberDef Bitmap_members[] = {
    { "name", T_OBJECT, offsetof(BitmapObject, name), READONLY,
      "The bitmap's name (str; bytes that are not UTF-8 as surrogates)." },
    { "granularity", T_ULONGLONG, offsetof(BitmapObject, granularity), READONLY,
      "Bytes of guest data per bit." },
    { "enabled", T_BOOL, offsetof(BitmapObject, enabled), READONLY,
      "Whether QEMU records writes in it (the 'auto' flag)." },
    { "in_use", T_BOOL, offsetof(BitmapObject, in_use), READONLY,
      "The 'in-use' flag: QEMU did not store it back (inconsistent)." },
    { "consistent", T_BOOL, offsetof(BitmapObject, consistent), READONLY,
      "Whether its contents can be trusted (not in use, extension not "
      "stale)." },
    { "image", T_OBJECT, offsetof(BitmapObject, image), READONLY,
      "The image it was listed from." },
    { NULL },
};

static PyGetSetDef Bitmap_getset[] = {
    { "dirty_bytes", (getter)Bitmap_get_dirty_bytes, NULL,
      "Bytes of the virtual disk marked dirty, read now from the image "
      "(bitmap table and data clusters only).",
      NULL },
    { NULL },
};

static PyObject *Image_get_bitmaps(ImageObject *self, void *closure)
{
    struct qbm_image *img = image_enter(self);
    PyObject *list;
    size_t i, n;

    if (!img) {
        return NULL;
    }
    n = qbm_bitmap_count(img);
    list = PyList_New((Py_ssize_t)n);
    for (i = 0; list && i < n; i++) {
        PyObject *b = (PyObject *)bitmap_new(self, img, i);

        if (!b) {
            Py_CLEAR(list);
            break;
        }
        PyList_SET_ITEM(list, (Py_ssize_t)i, b);
    }
    image_leave(self);
    return list;
}

PyDoc_STRVAR(Image_bitmap_doc,
             "bitmap(name)\n--\n\n"
             "The bitmap named `name`; qbm.Error (errno ENOENT) when there "
             "is none.");

static PyObject *Image_bitmap(ImageObject *self, PyObject *args)
{
    PyObject *name = NULL, *res = NULL;
    struct qbm_image *img;
    int idx;

    if (!PyArg_ParseTuple(args, "O&:bitmap", conv_name, &name)) {
        return NULL;
    }
    img = image_enter(self);
    if (img) {
        idx = find_bitmap(img, name);
        res = idx < 0 ? NULL : (PyObject *)bitmap_new(self, img, (size_t)idx);
        image_leave(self);
    }
    Py_DECREF(name);
    return res;
}

/* ---- extents: an iterator reading the bitmap a batch at a time --------
 */

#define EXTENT_BATCH 4096

typedef struct {
    PyObject_HEAD ImageObject *image;
    PyObject *name; /* bytes */
    uint64_t pos;   /* where the next batch starts */
    bool done;      /* the last batch reached the end */
    bool fetching;  /* a batch is being read, the GIL released */
    size_t n, next; /* extents in buf, next one to return */
    uint64_t buf[EXTENT_BATCH][2];
} ExtentIterObject;

static int batch_cb(void *opaque, uint64_t offset, uint64_t length)
{
    ExtentIterObject *it = opaque;

    it->buf[it->n][0] = offset;
    it->buf[it->n][1] = length;
    it->n++;
    return it->n == EXTENT_BATCH ? 1 : 0;
}

static void ExtentIter_dealloc(ExtentIterObject *self)
{
    Py_XDECREF(self->image);
    Py_XDECREF(self->name);
    PyObject_Free(self);
}

/* Fill buf with the next batch: -1 with an exception, else 0. */
static int extent_fetch(ExtentIterObject *self)
{
    PyThreadState *ts;
    struct qbm_image *img = image_enter(self->image);
    int idx, r;

    if (!img) {
        return -1;
    }
    idx = find_bitmap(img, self->name);
    if (idx < 0) {
        image_leave(self->image);
        return -1;
    }
    self->n = self->next = 0;
    self->fetching = true;
    ts = PyEval_SaveThread();
    r = qbm_bitmap_extents_range(img, (size_t)idx, self->pos,
                                 UINT64_MAX - self->pos, batch_cb, self);
    PyEval_RestoreThread(ts);
    self->fetching = false;
    if (r < 0) {
        raise_img(img);
        image_leave(self->image);
        return -1;
    }
    image_leave(self->image);
    /* Stopped only when the batch is full: a whole extent ends at a clean
     * bit (or the disk's end), so the next batch starts there. */
    self->done = r == 0;
    if (self->n) {
        self->pos = self->buf[self->n - 1][0] + self->buf[self->n - 1][1];
    }
    return 0;
}

static PyObject *ExtentIter_next(ExtentIterObject *self)
{
    if (self->fetching) {
        PyErr_SetString(PyExc_RuntimeError, "iterator already running");
        return NULL;
    }
    if (self->next == self->n) {
        if (self->done) {
            return NULL;
        }
        if (extent_fetch(self) < 0) {
            self->done = true;
            self->n = self->next = 0;
            return NULL;
        }
        if (self->n == 0) {
            return NULL;
        }
    }
    self->next++;
    return Py_BuildValue("(KK)",
                         (unsigned long long)self->buf[self->next - 1][0],
                         (unsigned long long)self->buf[self->next - 1][1]);
}

PyDoc_STRVAR(
    Image_extents_doc,
    "extents(name)\n--\n\n"
    "An iterator over the dirty extents of bitmap `name`: (offset, length) "
    "tuples\nin bytes, in increasing order, adjacent ones merged, clipped "
    "to the virtual\nsize. The bitmap is read a batch of extents at a time "
    "(bounded memory);\nthe bitmap must still exist when the next batch is "
    "read.");

static PyObject *Image_extents(ImageObject *self, PyObject *args)
{
    PyObject *name = NULL;
    ExtentIterObject *it;
    struct qbm_image *img;
    int idx;

    if (!PyArg_ParseTuple(args, "O&:extents", conv_name, &name)) {
        return NULL;
    }
    /* Fail at once for a closed image or an unknown name. */
    img = image_enter(self);
    if (!img) {
        Py_DECREF(name);
        return NULL;
    }
    idx = find_bitmap(img, name);
    image_leave(self);
    if (idx < 0) {
        Py_DECREF(name);
        return NULL;
    }
    it = PyObject_New(ExtentIterObject, &ExtentIterType);
    if (!it) {
        Py_DECREF(name);
        return NULL;
    }
    it->image = self;
    Py_INCREF(self);
    it->name = name;
    it->pos = 0;
    it->done = false;
    it->fetching = false;
    it->n = it->next = 0;
    return (PyObject *)it;
}

/* ---- edits ---------------------------------------------------------------
 */

/* Run `call` on the image with the GIL released; None or qbm.Error. */
#define IMAGE_CALL(self, img, r, call)                \
    do {                                              \
        (img) = image_enter(self);                    \
        if (img) {                                    \
            PyThreadState *ts_ = PyEval_SaveThread(); \
            (r) = (call);                             \
            PyEval_RestoreThread(ts_);                \
            if ((r) < 0) {                            \
                raise_img(img);                       \
            }                                         \
            image_leave(self);                        \
        }                                             \
    } while (0)

PyDoc_STRVAR(
    Image_add_doc,
    "add(name, granularity=None, enabled=True)\n--\n\n"
    "Stage a new empty bitmap. granularity: a power of two from 512 B to 2 "
    "GiB,\nor None for qemu-img's default (the cluster size, clamped to "
    "4..64 KiB).");

static PyObject *Image_add(ImageObject *self, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = { "name", "granularity", "enabled", NULL };
    PyObject *name = NULL, *gran = Py_None;
    unsigned long long g = 0;
    struct qbm_image *img;
    int enabled = 1, r = -1;

    if (!PyArg_ParseTupleAndKeywords(args, kw, "O&|Op:add", kwlist, conv_name,
                                     &name, &gran, &enabled)) {
        return NULL;
    }
    if (gran != Py_None) {
        g = PyLong_AsUnsignedLongLong(gran);
        if (g == (unsigned long long)-1 && PyErr_Occurred()) {
            Py_DECREF(name);
            return NULL;
        }
        if (g == 0) {
            Py_DECREF(name);
            PyErr_SetString(PyExc_ValueError,
                            "granularity must be positive (None: default)");
            return NULL;
        }
    }
    IMAGE_CALL(self, img, r,
               qbm_bitmap_add(img, PyBytes_AS_STRING(name), g,
                              enabled ? 0 : QBM_ADD_DISABLED));
    Py_DECREF(name);
    if (!img || r < 0) {
        return NULL;
    }
    Py_RETURN_NONE;
}

/* The edits that take one name. */
#define NAME_EDIT(fname, pyname, call)                                 \
    static PyObject *fname(ImageObject *self, PyObject *args)          \
    {                                                                  \
        PyObject *name = NULL;                                         \
        struct qbm_image *img;                                         \
        int r = -1;                                                    \
                                                                       \
        if (!PyArg_ParseTuple(args, "O&:" pyname, conv_name, &name)) { \
            return NULL;                                               \
        }                                                              \
        IMAGE_CALL(self, img, r, call(img, PyBytes_AS_STRING(name)));  \
        Py_DECREF(name);                                               \
        if (!img || r < 0) {                                           \
            return NULL;                                               \
        }                                                              \
        Py_RETURN_NONE;                                                \
    }

NAME_EDIT(Image_remove, "remove", qbm_bitmap_remove)
NAME_EDIT(Image_clear, "clear", qbm_bitmap_clear)
NAME_EDIT(Image_enable, "enable", qbm_bitmap_enable)
NAME_EDIT(Image_disable, "disable", qbm_bitmap_disable)
NAME_EDIT(Image_salvage, "salvage", qbm_bitmap_salvage)

static PyObject *Image_rename(ImageObject *self, PyObject *args)
{
    PyObject *old = NULL, *new = NULL;
    struct qbm_image *img;
    int r = -1;

    if (!PyArg_ParseTuple(args, "O&O&:rename", conv_name, &old, conv_name,
                          &new)) {
        return NULL;
    }
    IMAGE_CALL(
        self, img, r,
        qbm_bitmap_rename(img, PyBytes_AS_STRING(old), PyBytes_AS_STRING(new)));
    Py_DECREF(old);
    Py_DECREF(new);
    if (!img || r < 0) {
        return NULL;
    }
    Py_RETURN_NONE;
}

PyDoc_STRVAR(Image_mark_doc,
             "mark(name, offset, length)\n--\n\n"
             "Stage guest bytes [offset, offset + length) as dirty in "
             "bitmap `name`.");

static PyObject *Image_mark(ImageObject *self, PyObject *args)
{
    PyObject *name = NULL;
    unsigned long long off, len;
    struct qbm_image *img;
    int r = -1;

    if (!PyArg_ParseTuple(args, "O&O&O&:mark", conv_name, &name, conv_u64, &off,
                          conv_u64, &len)) {
        return NULL;
    }
    IMAGE_CALL(self, img, r,
               qbm_bitmap_set_dirty(img, PyBytes_AS_STRING(name), off, len));
    Py_DECREF(name);
    if (!img || r < 0) {
        return NULL;
    }
    Py_RETURN_NONE;
}

/*
 * Take a second image for a call on `self` (a merge source, a populate
 * layer): NULL (with an exception) when it is closed or busy, `img` itself
 * when it is the same handle. `*ret_taken` says whether to leave it.
 */
static struct qbm_image *other_enter(ImageObject *self, struct qbm_image *img,
                                     PyObject *other, bool *ret_taken)
{
    *ret_taken = false;
    if (!other || other == Py_None || other == (PyObject *)self) {
        return img;
    }
    if (!PyObject_TypeCheck(other, &ImageType)) {
        PyErr_Format(PyExc_TypeError, "expected a qbm.Image, not %.100s",
                     Py_TYPE(other)->tp_name);
        return NULL;
    }
    if (((ImageObject *)other)->img == img) {
        return img;
    }
    *ret_taken = true;
    return image_enter((ImageObject *)other);
}

PyDoc_STRVAR(
    Image_merge_doc,
    "merge(target, *sources, source_image=None)\n--\n\n"
    "Stage OR-ing each bitmap of `sources` into bitmap `target`. The "
    "sources are\nbitmaps of this image, or of `source_image` (an open "
    "qbm.Image of the same\nvirtual size). Granularities convert as QEMU "
    "does.");

static PyObject *Image_merge(ImageObject *self, PyObject *args, PyObject *kw)
{
    PyThreadState *ts;
    PyObject *target = NULL, *src_obj = NULL, *res = NULL;
    struct qbm_image *img, *src = NULL;
    bool taken = false;
    Py_ssize_t i, n = PyTuple_GET_SIZE(args);

    if (kw) {
        Py_ssize_t nkw = PyDict_GET_SIZE(kw);

        src_obj = PyDict_GetItemString(kw, "source_image");
        if (nkw > (src_obj ? 1 : 0)) {
            PyErr_SetString(PyExc_TypeError,
                            "merge() takes only the keyword source_image");
            return NULL;
        }
    }
    if (n < 1) {
        PyErr_SetString(PyExc_TypeError, "merge() needs a target bitmap");
        return NULL;
    }
    if (!conv_name(PyTuple_GET_ITEM(args, 0), &target)) {
        return NULL;
    }
    img = image_enter(self);
    if (!img) {
        Py_DECREF(target);
        return NULL;
    }
    src = other_enter(self, img, src_obj, &taken);
    for (i = 1; src && i < n; i++) {
        PyObject *s = NULL;
        int r;

        if (!conv_name(PyTuple_GET_ITEM(args, i), &s)) {
            goto out;
        }
        ts = PyEval_SaveThread();
        r = qbm_bitmap_merge(img, PyBytes_AS_STRING(target), src,
                             PyBytes_AS_STRING(s));
        PyEval_RestoreThread(ts);
        Py_DECREF(s);
        if (r < 0) {
            raise_img(img);
            goto out;
        }
    }
    if (src) {
        res = Py_NewRef(Py_None);
    }
out:
    if (taken && src) {
        image_leave((ImageObject *)src_obj);
    }
    image_leave(self);
    Py_DECREF(target);
    return res;
}

PyDoc_STRVAR(
    Image_populate_doc,
    "populate(name, layer=None)\n--\n\n"
    "Stage OR-ing into bitmap `name` every range that `layer` (an open "
    "qbm.Image;\nNone: this image) itself provides, data or zero flags, "
    "from its L1/L2\ntables.");

static PyObject *Image_populate(ImageObject *self, PyObject *args, PyObject *kw)
{
    PyThreadState *ts;
    static char *kwlist[] = { "name", "layer", NULL };
    PyObject *name = NULL, *layer_obj = Py_None, *res = NULL;
    struct qbm_image *img, *layer;
    bool taken;
    int r;

    if (!PyArg_ParseTupleAndKeywords(args, kw, "O&|O:populate", kwlist,
                                     conv_name, &name, &layer_obj)) {
        return NULL;
    }
    img = image_enter(self);
    if (!img) {
        Py_DECREF(name);
        return NULL;
    }
    layer = other_enter(self, img, layer_obj, &taken);
    if (layer) {
        ts = PyEval_SaveThread();
        r = qbm_bitmap_populate(img, PyBytes_AS_STRING(name), layer);
        PyEval_RestoreThread(ts);
        if (r < 0) {
            raise_img(img);
        } else {
            res = Py_NewRef(Py_None);
        }
        if (taken) {
            image_leave((ImageObject *)layer_obj);
        }
    }
    image_leave(self);
    Py_DECREF(name);
    return res;
}

PyDoc_STRVAR(Image_commit_doc,
             "commit()\n--\n\n"
             "Write every staged edit in one crash-safe transaction. On "
             "failure the\nimage refuses further edits: close and reopen "
             "it.");

static PyObject *Image_commit(ImageObject *self, PyObject *unused)
{
    struct qbm_image *img;
    int r = -1;

    IMAGE_CALL(self, img, r, qbm_commit(img));
    if (!img || r < 0) {
        return NULL;
    }
    Py_RETURN_NONE;
}

PyDoc_STRVAR(Image_end_offset_doc,
             "end_offset()\n--\n\n"
             "The image end offset: the end of the last cluster in use, as "
             "qemu-img\ncheck reports it (\"Image end offset\"); on a "
             "block device, where the\nimage stops.");

static PyObject *Image_end_offset(ImageObject *self, PyObject *unused)
{
    struct qbm_image *img;
    uint64_t end = 0;
    int r = -1;

    IMAGE_CALL(self, img, r, qbm_image_end_offset(img, &end));
    if (!img || r < 0) {
        return NULL;
    }
    return PyLong_FromUnsignedLongLong((unsigned long long)end);
}

/* qbm_commit_plan() with the figures around it: 0 or -1; on a device
 * too small (ENOSPC) *ret_figures is true and *ret holds them all. */
static int image_plan(struct qbm_image *img, unsigned flags,
                      struct qbm_space_info *ret, bool *ret_figures)
{
    int r;

    if (qbm_image_end_offset(img, &ret->end_before) < 0) {
        return -1;
    }
    /* No image ends at 0: the plan sets it only with its figures. */
    ret->end_after = 0;
    r = qbm_commit_plan(img, flags, &ret->bytes, &ret->end_after);
    ret->capacity = qbm_image_capacity(img);
    *ret_figures = r == 0 || (qbm_get_errno() == ENOSPC && ret->end_after);
    return r;
}

PyDoc_STRVAR(
    Image_commit_plan_doc,
    "commit_plan(*, worst_case=False)\n--\n\n"
    "A dry run of commit(): the same checks and placement, nothing "
    "written, the\nstaged edits kept. Returns qbm.SpaceInfo(bytes, "
    "end_before, end_after,\ncapacity): the bytes of new clusters, the "
    "image end offset now and once\nthey are written, and the device's "
    "size (0 for a file). worst_case=True\nplans as if every staged "
    "bitmap were all dirty (what it can grow to).\nqbm.Error with errno "
    "ENOSPC when the device is too small, its .space then\nthe "
    "qbm.SpaceInfo all the same (extend the device to .space.end_after).");

static PyObject *Image_commit_plan(ImageObject *self, PyObject *args,
                                   PyObject *kw)
{
    static char *kwlist[] = { "worst_case", NULL };
    struct qbm_space_info s = { 0 };
    struct qbm_image *img;
    PyObject *space, *f;
    bool figures = false;
    PyThreadState *ts;
    int worst = 0, r;

    if (!PyArg_ParseTupleAndKeywords(args, kw, "|$p:commit_plan", kwlist,
                                     &worst)) {
        return NULL;
    }
    img = image_enter(self);
    if (!img) {
        return NULL;
    }
    ts = PyEval_SaveThread();
    r = image_plan(img, worst ? QBM_PLAN_WORST_CASE : 0, &s, &figures);
    PyEval_RestoreThread(ts);
    space = figures ? space_info_new(&s) : NULL;
    if (r < 0 && (space || !figures)) {
        f = image_filename_obj(img);
        if (f) {
            raise_qbm_space(f, space);
            Py_DECREF(f);
        }
        Py_CLEAR(space);
    }
    image_leave(self);
    return space;
}

/* ---- check, repair, allocation, backing ----------------------------------
 */

PyDoc_STRVAR(
    Image_check_doc,
    "check(backing=False)\n--\n\n"
    "Check every structure of the image (bitmaps and full refcount "
    "consistency);\nwith backing=True also follow its backing chain for a "
    "loop. Returns a list\nof qbm.Problem(kind, offset, message), kind one "
    "of PROBLEM_CORRUPTION,\nPROBLEM_LEAK, PROBLEM_BITMAP; empty when "
    "clean.");

static PyObject *Image_check(ImageObject *self, PyObject *args, PyObject *kw)
{
    PyThreadState *ts;
    static char *kwlist[] = { "backing", NULL };
    struct cb c = { 0 };
    struct qbm_image *img;
    int backing = 0, r;

    if (!PyArg_ParseTupleAndKeywords(args, kw, "|p:check", kwlist, &backing)) {
        return NULL;
    }
    c.list = PyList_New(0);
    if (!c.list) {
        return NULL;
    }
    img = image_enter(self);
    if (!img) {
        Py_DECREF(c.list);
        return NULL;
    }
    ts = PyEval_SaveThread();
    r = qbm_check(img, problem_cb, &c);
    if (r == 0 && backing) {
        r = qbm_check_backing(img, problem_cb, &c);
    }
    PyEval_RestoreThread(ts);
    if (cb_failed(&c)) {
        Py_CLEAR(c.list);
    } else if (r != 0) {
        raise_img(img);
        Py_CLEAR(c.list);
    }
    image_leave(self);
    return c.list;
}

PyDoc_STRVAR(
    Image_repair_doc,
    "repair(*, in_use=None, stale=False, leaks=False)\n--\n\n"
    "Repair what is asked, each step its own crash-safe transaction: "
    "in_use=\n'dirty' makes in-use bitmaps all dirty and consistent, "
    "'remove' removes\nthem; stale=True drops a stale bitmaps extension; "
    "leaks=True gives leaked\nclusters back. Refuses images with "
    "corruption (qemu-img check -r all's\njob). Needs a writable image.");

static PyObject *Image_repair(ImageObject *self, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = { "in_use", "stale", "leaks", NULL };
    const char *in_use = NULL;
    int stale = 0, leaks = 0, r = -1;
    unsigned flags = 0;
    struct qbm_image *img;

    if (!PyArg_ParseTupleAndKeywords(args, kw, "|$zpp:repair", kwlist, &in_use,
                                     &stale, &leaks)) {
        return NULL;
    }
    if (in_use && strcmp(in_use, "dirty") == 0) {
        flags |= QBM_REPAIR_IN_USE_DIRTY;
    } else if (in_use && strcmp(in_use, "remove") == 0) {
        flags |= QBM_REPAIR_IN_USE_REMOVE;
    } else if (in_use) {
        PyErr_SetString(PyExc_ValueError,
                        "in_use must be None, 'dirty' or 'remove'");
        return NULL;
    }
    flags |= (stale ? QBM_REPAIR_STALE : 0) | (leaks ? QBM_REPAIR_LEAKS : 0);
    IMAGE_CALL(self, img, r, qbm_repair(img, flags));
    if (!img || r < 0) {
        return NULL;
    }
    Py_RETURN_NONE;
}

PyDoc_STRVAR(
    Image_allocation_doc,
    "allocation()\n--\n\n"
    "The ranges this layer itself provides, as a list of (offset, length, "
    "status)\nwith status a mask of ALLOC_DATA and ALLOC_ZERO; ranges not "
    "listed fall\nthrough to the backing file.");

static PyObject *Image_allocation(ImageObject *self, PyObject *unused)
{
    PyThreadState *ts;
    struct cb c = { 0 };
    struct qbm_image *img;
    int r;

    c.list = PyList_New(0);
    if (!c.list) {
        return NULL;
    }
    img = image_enter(self);
    if (!img) {
        Py_DECREF(c.list);
        return NULL;
    }
    ts = PyEval_SaveThread();
    r = qbm_image_allocation(img, alloc_cb, &c);
    PyEval_RestoreThread(ts);
    if (cb_failed(&c)) {
        Py_CLEAR(c.list);
    } else if (r != 0) {
        raise_img(img);
        Py_CLEAR(c.list);
    }
    image_leave(self);
    return c.list;
}

PyDoc_STRVAR(
    Image_copy_doc,
    "copy(source_image, names=None, *, merge=False, replace=False)\n--\n\n"
    "Stage copies of bitmaps of `source_image` (another open qbm.Image): "
    "those\nnamed, in that order, or every consistent one (in-use ones "
    "skipped). A name\nthis image has already is refused (EEXIST), unless "
    "merge=True (OR into it)\nor replace=True. Returns the list of "
    "(action, name, granularity), action\none of COPY_COPIED, COPY_MERGED, "
    "COPY_REPLACED, COPY_SKIPPED.");

static PyObject *Image_copy(ImageObject *self, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = { "source_image", "names", "merge", "replace",
                              NULL };
    PyObject *src_obj, *names = Py_None, *keep = NULL;
    const char **a = NULL;
    struct qbm_image *img, *src;
    struct cb c = { 0 };
    int merge = 0, replace = 0, r;
    PyThreadState *ts;
    bool taken;
    size_t n = 0;

    if (!PyArg_ParseTupleAndKeywords(args, kw, "O!|O$pp:copy", kwlist,
                                     &ImageType, &src_obj, &names, &merge,
                                     &replace)) {
        return NULL;
    }
    if (names != Py_None) {
        PyObject *fast;
        Py_ssize_t i;

        if (PyUnicode_Check(names) || PyBytes_Check(names)) {
            PyErr_SetString(PyExc_TypeError, "names must be a sequence");
            return NULL;
        }
        fast = PySequence_Fast(names, "names must be a sequence");
        keep = fast ? PyList_New(0) : NULL;
        a = keep ? PyMem_Calloc((size_t)PySequence_Fast_GET_SIZE(fast) + 1,
                                sizeof(*a))
                 : NULL;
        for (i = 0; a && i < PySequence_Fast_GET_SIZE(fast); i++) {
            PyObject *b = NULL;

            if (!conv_name(PySequence_Fast_GET_ITEM(fast, i), &b) ||
                PyList_Append(keep, b) < 0) {
                Py_XDECREF(b);
                PyMem_Free(a);
                a = NULL;
                break;
            }
            a[i] = PyBytes_AS_STRING(b);
            Py_DECREF(b);
            n++;
        }
        Py_XDECREF(fast);
        if (!a) {
            if (!PyErr_Occurred()) {
                PyErr_NoMemory();
            }
            Py_XDECREF(keep);
            return NULL;
        }
    }
    c.list = PyList_New(0);
    img = c.list ? image_enter(self) : NULL;
    src = img ? other_enter(self, img, src_obj, &taken) : NULL;
    if (src) {
        ts = PyEval_SaveThread();
        r = qbm_bitmap_copy(img, src, a, n,
                            (merge ? QBM_COPY_MERGE : 0) |
                                (replace ? QBM_COPY_REPLACE : 0),
                            copy_cb, &c);
        PyEval_RestoreThread(ts);
        if (cb_failed(&c)) {
            Py_CLEAR(c.list);
        } else if (r != 0) {
            raise_img(img);
            Py_CLEAR(c.list);
        }
        if (taken) {
            image_leave((ImageObject *)src_obj);
        }
    } else {
        Py_CLEAR(c.list);
    }
    if (img) {
        image_leave(self);
    }
    PyMem_Free(a);
    Py_XDECREF(keep);
    return c.list;
}

PyDoc_STRVAR(
    Image_carry_commit_doc,
    "carry_commit(top, *, mark_written=False, fill_gaps=False)\n--\n\n"
    "Stage in this image (the base of `top`'s chain, opened for writing) "
    "the\nbitmaps of the layers above it that qemu-img commit writes into "
    "it. Returns\nthe list of (action, bitmap, layer), action one of "
    "CARRY_COPIED,\nCARRY_MERGED, CARRY_GAP, CARRY_FILLED, CARRY_MARKED. "
    "commit() writes them.");

static PyObject *Image_carry_commit(ImageObject *self, PyObject *args,
                                    PyObject *kw)
{
    static char *kwlist[] = { "top", "mark_written", "fill_gaps", NULL };
    PyObject *top = NULL;
    int mark = 0, fill = 0, r;
    struct qbm_image *img;
    struct cb c = { 0 };
    PyThreadState *ts;

    if (!PyArg_ParseTupleAndKeywords(args, kw, "O&|$pp:carry_commit", kwlist,
                                     PyUnicode_FSConverter, &top, &mark,
                                     &fill)) {
        return NULL;
    }
    c.list = PyList_New(0);
    img = c.list ? image_enter(self) : NULL;
    if (img) {
        ts = PyEval_SaveThread();
        r = qbm_carry_commit(img, PyBytes_AS_STRING(top),
                             (mark ? QBM_CARRY_MARK_WRITTEN : 0) |
                                 (fill ? QBM_CARRY_FILL_GAPS : 0),
                             carry_cb, &c);
        PyEval_RestoreThread(ts);
        if (cb_failed(&c)) {
            Py_CLEAR(c.list);
        } else if (r != 0) {
            raise_img(img);
            Py_CLEAR(c.list);
        }
        image_leave(self);
    } else {
        Py_CLEAR(c.list);
    }
    Py_DECREF(top);
    return c.list;
}

PyDoc_STRVAR(Image_set_backing_doc,
             "set_backing(backing, format)\n--\n\n"
             "Make `backing` (format e.g. 'qcow2' or 'raw') the image's "
             "backing file,\ncrash-safely. Needs a writable image.");

static PyObject *Image_set_backing(ImageObject *self, PyObject *args)
{
    PyObject *backing = NULL;
    const char *format;
    struct qbm_image *img;
    int r = -1;

    if (!PyArg_ParseTuple(args, "O&s:set_backing", PyUnicode_FSConverter,
                          &backing, &format)) {
        return NULL;
    }
    IMAGE_CALL(self, img, r,
               qbm_image_set_backing(img, PyBytes_AS_STRING(backing), format));
    Py_DECREF(backing);
    if (!img || r < 0) {
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyMethodDef Image_methods[] = {
    { "close", (PyCFunction)Image_close, METH_NOARGS, Image_close_doc },
    { "__enter__", (PyCFunction)Image_enter, METH_NOARGS, NULL },
    { "__exit__", (PyCFunction)Image_exit, METH_VARARGS, NULL },
    { "bitmap", (PyCFunction)Image_bitmap, METH_VARARGS, Image_bitmap_doc },
    { "extents", (PyCFunction)Image_extents, METH_VARARGS, Image_extents_doc },
    { "add", (PyCFunction)(void (*)(void))Image_add,
      METH_VARARGS | METH_KEYWORDS, Image_add_doc },
    { "remove", (PyCFunction)Image_remove, METH_VARARGS,
      "remove(name)\n--\n\nStage the removal of bitmap `name`." },
    { "clear", (PyCFunction)Image_clear, METH_VARARGS,
      "clear(name)\n--\n\nStage clearing every bit of bitmap `name`." },
    { "enable", (PyCFunction)Image_enable, METH_VARARGS,
      "enable(name)\n--\n\nStage making bitmap `name` record writes." },
    { "disable", (PyCFunction)Image_disable, METH_VARARGS,
      "disable(name)\n--\n\nStage making bitmap `name` stop recording." },
    { "salvage", (PyCFunction)Image_salvage, METH_VARARGS,
      "salvage(name)\n--\n\nStage making in-use bitmap `name` all dirty and "
      "consistent again." },
    { "rename", (PyCFunction)Image_rename, METH_VARARGS,
      "rename(old, new)\n--\n\nStage renaming bitmap `old` to `new`." },
    { "mark", (PyCFunction)Image_mark, METH_VARARGS, Image_mark_doc },
    { "merge", (PyCFunction)(void (*)(void))Image_merge,
      METH_VARARGS | METH_KEYWORDS, Image_merge_doc },
    { "populate", (PyCFunction)(void (*)(void))Image_populate,
      METH_VARARGS | METH_KEYWORDS, Image_populate_doc },
    { "commit", (PyCFunction)Image_commit, METH_NOARGS, Image_commit_doc },
    { "commit_plan", (PyCFunction)(void (*)(void))Image_commit_plan,
      METH_VARARGS | METH_KEYWORDS, Image_commit_plan_doc },
    { "end_offset", (PyCFunction)Image_end_offset, METH_NOARGS,
      Image_end_offset_doc },
    { "check", (PyCFunction)(void (*)(void))Image_check,
      METH_VARARGS | METH_KEYWORDS, Image_check_doc },
    { "repair", (PyCFunction)(void (*)(void))Image_repair,
      METH_VARARGS | METH_KEYWORDS, Image_repair_doc },
    { "allocation", (PyCFunction)Image_allocation, METH_NOARGS,
      Image_allocation_doc },
    { "set_backing", (PyCFunction)Image_set_backing, METH_VARARGS,
      Image_set_backing_doc },
    { "copy", (PyCFunction)(void (*)(void))Image_copy,
      METH_VARARGS | METH_KEYWORDS, Image_copy_doc },
    { "carry_commit", (PyCFunction)(void (*)(void))Image_carry_commit,
      METH_VARARGS | METH_KEYWORDS, Image_carry_commit_doc },
    { NULL },
};

static PyGetSetDef Image_getset[] = {
    { "filename", (getter)Image_get_filename, NULL,
      "The file name as given (a layer: as its chain resolved it).", NULL },
    { "format", (getter)Image_get_format, NULL,
      "'qcow2', or 'raw' (a raw layer of a chain).", NULL },
    { "version", (getter)Image_get_version, NULL,
      "qcow2 version: 2 or 3 (0 for raw).", NULL },
    { "virtual_size", (getter)Image_get_virtual_size, NULL,
      "Virtual disk size in bytes.", NULL },
    { "cluster_size", (getter)Image_get_cluster_size, NULL,
      "Cluster size in bytes (0 for raw).", NULL },
    { "refcount_bits", (getter)Image_get_refcount_bits, NULL,
      "Refcount width in bits.", NULL },
    { "compression_type", (getter)Image_get_compression_type, NULL,
      "'zlib' or 'zstd' (None for raw).", NULL },
    { "backing_file", (getter)Image_get_backing_file, NULL,
      "The backing file name as stored, or None.", NULL },
    { "backing_format", (getter)Image_get_backing_format, NULL,
      "The backing format as stored, or None.", NULL },
    { "data_file", (getter)Image_get_data_file, NULL,
      "The external data file name, or None.", NULL },
    { "file_size", (getter)Image_get_file_size, NULL,
      "Host size of the image file in bytes.", NULL },
    { "capacity", (getter)Image_get_capacity, NULL,
      "The most the image can hold: the size of the block device it lives "
      "on,\nor 0 for a file (which grows).",
      NULL },
    { "snapshot_count", (getter)Image_get_snapshot_count, NULL,
      "Number of internal snapshots.", NULL },
    { "bitmaps_state", (getter)Image_get_bitmaps_state, NULL,
      "The bitmaps extension: 'none', 'ok' or 'stale' (QEMU ignores every "
      "bitmap).",
      NULL },
    { "bitmaps", (getter)Image_get_bitmaps, NULL,
      "The bitmaps, in directory order, as a list of qbm.Bitmap (staged "
      "edits\nincluded).",
      NULL },
    { "writable", (getter)Image_get_writable, NULL,
      "Whether the image was opened for writing.", NULL },
    { "closed", (getter)Image_get_closed, NULL,
      "Whether the image (or its chain) is closed.", NULL },
    { NULL },
};

/* ---- chains --------------------------------------------------------------
 */

static struct qbm_chain *chain_enter(ChainObject *self)
{
    if (!self->chain) {
        PyErr_SetString(PyExc_ValueError, "operation on a closed chain");
        return NULL;
    }
    if (self->busy) {
        PyErr_SetString(PyExc_RuntimeError,
                        "chain in use by another call (a handle is not "
                        "thread-safe)");
        return NULL;
    }
    self->busy = 1;
    return self->chain;
}

static void chain_leave(ChainObject *self)
{
    self->busy = 0;
}

static PyObject *raise_chain(struct qbm_chain *chain)
{
    PyObject *f = decode_path(qbm_chain_filename(chain, 0));
    PyObject *r;

    if (!f) {
        return NULL;
    }
    r = raise_qbm(f);
    Py_DECREF(f);
    return r;
}

static void Chain_dealloc(ChainObject *self)
{
    qbm_chain_close(self->chain);
    PyObject_Free(self);
}

static PyObject *Chain_close(ChainObject *self, PyObject *unused)
{
    if (self->busy) {
        PyErr_SetString(PyExc_RuntimeError,
                        "cannot close a chain while a call uses it");
        return NULL;
    }
    qbm_chain_close(self->chain);
    self->chain = NULL;
    Py_RETURN_NONE;
}

static PyObject *Chain_enter(ChainObject *self, PyObject *unused)
{
    if (!self->chain) {
        PyErr_SetString(PyExc_ValueError, "operation on a closed chain");
        return NULL;
    }
    return Py_NewRef(self);
}

static PyObject *Chain_exit(ChainObject *self, PyObject *args)
{
    PyObject *r = Chain_close(self, NULL);

    if (!r) {
        return NULL;
    }
    Py_DECREF(r);
    Py_RETURN_FALSE;
}

static Py_ssize_t Chain_len(ChainObject *self)
{
    if (!self->chain) {
        PyErr_SetString(PyExc_ValueError, "operation on a closed chain");
        return -1;
    }
    return (Py_ssize_t)qbm_chain_length(self->chain);
}

static PyObject *Chain_get_layers(ChainObject *self, void *closure)
{
    struct qbm_chain *chain = chain_enter(self);
    PyObject *list;
    size_t i, n;

    if (!chain) {
        return NULL;
    }
    n = qbm_chain_length(chain);
    list = PyList_New((Py_ssize_t)n);
    for (i = 0; list && i < n; i++) {
        /* The top layer is writable when the chain was opened so. */
        PyObject *o = (PyObject *)image_new(qbm_chain_layer(chain, i), self,
                                            i == 0 && self->writable);

        if (!o) {
            Py_CLEAR(list);
            break;
        }
        PyList_SET_ITEM(list, (Py_ssize_t)i, o);
    }
    chain_leave(self);
    return list;
}

static PyObject *Chain_get_filenames(ChainObject *self, void *closure)
{
    struct qbm_chain *chain = chain_enter(self);
    PyObject *list;
    size_t i, n;

    if (!chain) {
        return NULL;
    }
    n = qbm_chain_length(chain);
    list = PyList_New((Py_ssize_t)n);
    for (i = 0; list && i < n; i++) {
        PyObject *o = decode_path(qbm_chain_filename(chain, i));

        if (!o) {
            Py_CLEAR(list);
            break;
        }
        PyList_SET_ITEM(list, (Py_ssize_t)i, o);
    }
    chain_leave(self);
    return list;
}

PyDoc_STRVAR(
    Chain_extents_doc,
    "extents(name)\n--\n\n"
    "The union of the bitmaps named `name` over every layer that has one, "
    "as a\nlist of (offset, length) tuples in increasing order (how a "
    "checkpoint that\nspans layers is read). qbm.Error with errno ENOENT "
    "when no layer has it,\nEBUSY when a copy is in use (inconsistent).");

static PyObject *Chain_extents(ChainObject *self, PyObject *args)
{
    PyThreadState *ts;
    PyObject *name = NULL;
    struct qbm_chain *chain;
    struct cb c = { 0 };
    int r, consistent = 1;

    if (!PyArg_ParseTuple(args, "O&:extents", conv_name, &name)) {
        return NULL;
    }
    c.list = PyList_New(0);
    chain = c.list ? chain_enter(self) : NULL;
    if (!chain) {
        Py_XDECREF(c.list);
        Py_DECREF(name);
        return NULL;
    }
    ts = PyEval_SaveThread();
    r = qbm_chain_bitmap_extents(chain, PyBytes_AS_STRING(name), extent_list_cb,
                                 &c, &consistent);
    PyEval_RestoreThread(ts);
    if (cb_failed(&c)) {
        Py_CLEAR(c.list);
    } else if (r != 0) {
        raise_chain(chain);
        Py_CLEAR(c.list);
    } else if (!consistent) {
        PyObject *f = decode_path(qbm_chain_filename(chain, 0));

        Py_CLEAR(c.list);
        if (f) {
            raise_errno(EBUSY, "a copy of the bitmap is in use (inconsistent)",
                        f);
            Py_DECREF(f);
        }
    }
    chain_leave(self);
    Py_DECREF(name);
    return c.list;
}

PyDoc_STRVAR(
    Chain_check_doc,
    "check()\n--\n\n"
    "Judge every bitmap of the chain by libvirt's checkpoint rules. Returns "
    "a list\nof qbm.Finding(rule, bitmap, layer, origin): `rule` one of "
    "CHAIN_NOT_IN_TOP,\nCHAIN_GAP, CHAIN_DISABLED, CHAIN_IN_USE broken by "
    "layer `layer` (0 = top),\njudged from the bitmap's deepest copy in "
    "layer `origin`. Empty: libvirt\naccepts every bitmap.");

static PyObject *Chain_check(ChainObject *self, PyObject *unused)
{
    PyThreadState *ts;
    struct qbm_chain *chain;
    struct cb c = { 0 };
    int r;

    c.list = PyList_New(0);
    chain = c.list ? chain_enter(self) : NULL;
    if (!chain) {
        Py_XDECREF(c.list);
        return NULL;
    }
    ts = PyEval_SaveThread();
    r = qbm_chain_check(chain, finding_cb, &c);
    PyEval_RestoreThread(ts);
    if (cb_failed(&c)) {
        Py_CLEAR(c.list);
    } else if (r != 0) {
        raise_chain(chain);
        Py_CLEAR(c.list);
    }
    chain_leave(self);
    return c.list;
}

static PyObject *Chain_get_closed(ChainObject *self, void *closure)
{
    return PyBool_FromLong(!self->chain);
}

static PyObject *Chain_repr(ChainObject *self)
{
    if (!self->chain) {
        return PyUnicode_FromString("<qbm.Chain (closed)>");
    }
    return PyUnicode_FromFormat("<qbm.Chain %s, %zu layers>",
                                qbm_chain_filename(self->chain, 0),
                                qbm_chain_length(self->chain));
}

static PyMethodDef Chain_methods[] = {
    { "close", (PyCFunction)Chain_close, METH_NOARGS,
      "close()\n--\n\nClose every layer and release their locks." },
    { "__enter__", (PyCFunction)Chain_enter, METH_NOARGS, NULL },
    { "__exit__", (PyCFunction)Chain_exit, METH_VARARGS, NULL },
    { "extents", (PyCFunction)Chain_extents, METH_VARARGS, Chain_extents_doc },
    { "check", (PyCFunction)Chain_check, METH_NOARGS, Chain_check_doc },
    { NULL },
};

static PyGetSetDef Chain_getset[] = {
    { "layers", (getter)Chain_get_layers, NULL,
      "The layers as qbm.Image objects, 0 = top; usable while the chain is "
      "open.",
      NULL },
    { "filenames", (getter)Chain_get_filenames, NULL,
      "The resolved file name of each layer (the top one as given).", NULL },
    { "closed", (getter)Chain_get_closed, NULL, "Whether the chain is closed.",
      NULL },
    { NULL },
};

static PySequenceMethods Chain_as_sequence = {
    .sq_length = (lenfunc)Chain_len,
};

/* ---- module functions ----------------------------------------------------
 */

PyDoc_STRVAR(
    qbm_open_doc,
    "open(path, write=False, force_share=False)\n--\n\n"
    "Open a qcow2 image and return a qbm.Image (a context manager that "
    "closes it).\nA read-only open takes QEMU's shared read locks and fails "
    "with errno EBUSY\nwhile a process writes the image, unless "
    "force_share=True (qemu-img -U,\nno locks, read-only only). "
    "write=True takes QEMU's writer locks.");

static PyObject *mod_open(PyObject *mod, PyObject *args, PyObject *kw)
{
    PyThreadState *ts;
    static char *kwlist[] = { "path", "write", "force_share", NULL };
    PyObject *path = NULL, *res;
    int write = 0, share = 0;
    struct qbm_image *img;
    unsigned flags;

    if (!PyArg_ParseTupleAndKeywords(args, kw, "O&|pp:open", kwlist,
                                     PyUnicode_FSConverter, &path, &write,
                                     &share)) {
        return NULL;
    }
    flags = (write ? QBM_OPEN_RDWR : 0) | (share ? QBM_OPEN_FORCE_SHARE : 0);
    ts = PyEval_SaveThread();
    img = qbm_open(PyBytes_AS_STRING(path), flags);
    PyEval_RestoreThread(ts);
    if (!img) {
        PyObject *f = PyUnicode_DecodeFSDefaultAndSize(PyBytes_AS_STRING(path),
                                                       PyBytes_GET_SIZE(path));

        Py_DECREF(path);
        if (f) {
            raise_qbm(f);
            Py_DECREF(f);
        }
        return NULL;
    }
    Py_DECREF(path);
    res = (PyObject *)image_new(img, NULL, write);
    if (!res) {
        qbm_close(img);
    }
    return res;
}

PyDoc_STRVAR(
    qbm_open_chain_doc,
    "open_chain(path, write=False, force_share=False)\n--\n\n"
    "Open an image and, following backing file names, every image below it "
    "(as\nQEMU resolves them; a raw backing file ends the chain). Returns a "
    "qbm.Chain\n(a context manager). write=True opens the top layer for "
    "writing; backing\nfiles are always read-only.");

static PyObject *mod_open_chain(PyObject *mod, PyObject *args, PyObject *kw)
{
    PyThreadState *ts;
    static char *kwlist[] = { "path", "write", "force_share", NULL };
    PyObject *path = NULL;
    int write = 0, share = 0;
    struct qbm_chain *chain;
    ChainObject *o;
    unsigned flags;

    if (!PyArg_ParseTupleAndKeywords(args, kw, "O&|pp:open_chain", kwlist,
                                     PyUnicode_FSConverter, &path, &write,
                                     &share)) {
        return NULL;
    }
    flags = (write ? QBM_OPEN_RDWR : 0) | (share ? QBM_OPEN_FORCE_SHARE : 0);
    ts = PyEval_SaveThread();
    chain = qbm_chain_open(PyBytes_AS_STRING(path), flags);
    PyEval_RestoreThread(ts);
    if (!chain) {
        PyObject *f = PyUnicode_DecodeFSDefaultAndSize(PyBytes_AS_STRING(path),
                                                       PyBytes_GET_SIZE(path));

        Py_DECREF(path);
        if (f) {
            raise_qbm(f);
            Py_DECREF(f);
        }
        return NULL;
    }
    Py_DECREF(path);
    o = PyObject_New(ChainObject, &ChainType);
    if (!o) {
        qbm_chain_close(chain);
        return NULL;
    }
    o->chain = chain;
    o->busy = 0;
    o->writable = write;
    return (PyObject *)o;
}

/* The result of a call that took a progress callback: None, the
 * callback's exception, or qbm.Error naming `file`. */
static PyObject *progress_result(int r, struct cb *c, PyObject *file)
{
    PyObject *f;

    if (cb_failed(c)) {
        return NULL;
    }
    if (r != 0) {
        f = file ? PyUnicode_DecodeFSDefaultAndSize(PyBytes_AS_STRING(file),
                                                    PyBytes_GET_SIZE(file))
                 : NULL;
        raise_qbm(f);
        Py_XDECREF(f);
        return NULL;
    }
    Py_RETURN_NONE;
}

static int check_progress(PyObject *progress)
{
    if (progress != Py_None && !PyCallable_Check(progress)) {
        PyErr_SetString(PyExc_TypeError, "progress must be callable or None");
        return -1;
    }
    return 0;
}

PyDoc_STRVAR(
    qbm_restore_doc,
    "restore(images, output, format='raw', checkpoint=None, "
    "progress=None)\n--\n\n"
    "Rebuild a disk into `output` from images[0] (the full backup) and the "
    "incremental\nbackups images[1:], oldest first. format: 'raw' (sparse) "
    "or 'qcow2';\ncheckpoint (qcow2 only): an empty enabled bitmap to "
    "create. progress(done,\ntotal) is called as bytes are copied; an "
    "exception it raises stops the\nrestore (no output is left behind) and "
    "propagates.");

static PyObject *mod_restore(PyObject *mod, PyObject *args, PyObject *kw)
{
    PyThreadState *ts;
    static char *kwlist[] = { "images",     "output",   "format",
                              "checkpoint", "progress", NULL };
    PyObject *images, *output = NULL, *ckpt = NULL, *progress = Py_None;
    PyObject *keep = NULL, *res;
    const char *format = "raw", **a;
    struct cb c = { 0 };
    int fmt, r;
    size_t n;

    if (!PyArg_ParseTupleAndKeywords(args, kw, "OO&|sO&O:restore", kwlist,
                                     &images, PyUnicode_FSConverter, &output,
                                     &format, conv_opt_name, &ckpt,
                                     &progress)) {
        return NULL;
    }
    if (strcmp(format, "raw") == 0) {
        fmt = QBM_OUTPUT_RAW;
    } else if (strcmp(format, "qcow2") == 0) {
        fmt = QBM_OUTPUT_QCOW2;
    } else {
        PyErr_SetString(PyExc_ValueError, "format must be 'raw' or 'qcow2'");
        fmt = -1;
    }
    a = fmt < 0 || check_progress(progress) < 0 ? NULL
                                                : path_array(images, &n, &keep);
    if (!a) {
        Py_DECREF(output);
        Py_XDECREF(ckpt);
        return NULL;
    }
    c.fn = progress;
    ts = PyEval_SaveThread();
    r = qbm_restore(a, n, PyBytes_AS_STRING(output), fmt, BYTES(ckpt),
                    progress == Py_None ? NULL : progress_cb, &c);
    PyEval_RestoreThread(ts);
    res = progress_result(r, &c, NULL);
    PyMem_Free(a);
    Py_DECREF(keep);
    Py_DECREF(output);
    Py_XDECREF(ckpt);
    return res;
}

PyDoc_STRVAR(
    qbm_extract_doc,
    "extract(image, output, bitmap=None, *, chain=False, full=False, "
    "backing=None,\nprogress=None)\n--\n\n"
    "Offline incremental backup: write to `output` a fresh qcow2 image "
    "holding the\nclusters of `image` (read through its backing chain) that "
    "`bitmap` marks dirty\n(chain=True: the bitmap's union over the chain; "
    "full=True: every allocated\ncluster, bitmap may be None). `backing` is "
    "recorded as output's backing file.\nAn exception raised by "
    "progress(done, total) stops it (no output is left\nbehind) and "
    "propagates.");

static PyObject *mod_extract(PyObject *mod, PyObject *args, PyObject *kw)
{
    PyThreadState *ts;
    static char *kwlist[] = { "image", "output",  "bitmap",   "chain",
                              "full",  "backing", "progress", NULL };
    PyObject *image = NULL, *output = NULL, *bitmap = NULL, *backing = NULL;
    PyObject *progress = Py_None, *res;
    int chain = 0, full = 0, r;
    struct cb c = { 0 };
    PyObject *bitmap_obj = Py_None;
    unsigned flags;

    if (!PyArg_ParseTupleAndKeywords(
            args, kw, "O&O&|O$ppO&O:extract", kwlist, PyUnicode_FSConverter,
            &image, PyUnicode_FSConverter, &output, &bitmap_obj, &chain, &full,
            conv_opt_path, &backing, &progress)) {
        return NULL;
    }
    if ((bitmap_obj != Py_None && !conv_name(bitmap_obj, &bitmap)) ||
        check_progress(progress) < 0) {
        Py_DECREF(image);
        Py_DECREF(output);
        Py_XDECREF(backing);
        return NULL;
    }
    flags = (chain ? QBM_EXTRACT_CHAIN : 0) | (full ? QBM_EXTRACT_FULL : 0);
    c.fn = progress;
    ts = PyEval_SaveThread();
    r = qbm_extract(PyBytes_AS_STRING(image), BYTES(bitmap),
                    PyBytes_AS_STRING(output), flags, BYTES(backing),
                    progress == Py_None ? NULL : progress_cb, &c);
    PyEval_RestoreThread(ts);
    res = progress_result(r, &c, NULL);
    Py_DECREF(image);
    Py_DECREF(output);
    Py_XDECREF(bitmap);
    Py_XDECREF(backing);
    return res;
}

PyDoc_STRVAR(
    qbm_consolidate_doc,
    "consolidate(full, incrementals, progress=None)\n--\n\n"
    "Fold incremental backups (oldest first) into the full backup `full` in "
    "place,\nswitching its L1 table in one atomic write. An exception "
    "raised by\nprogress(done, total) stops it before the switch (the data "
    "of `full` stays as\nit was; its enabled bitmaps may keep the marks "
    "made first) and propagates.");

static PyObject *mod_consolidate(PyObject *mod, PyObject *args, PyObject *kw)
{
    PyThreadState *ts;
    static char *kwlist[] = { "full", "incrementals", "progress", NULL };
    PyObject *full = NULL, *incs, *progress = Py_None, *keep = NULL, *res;
    struct cb c = { 0 };
    const char **a;
    size_t n;
    int r;

    if (!PyArg_ParseTupleAndKeywords(args, kw, "O&O|O:consolidate", kwlist,
                                     PyUnicode_FSConverter, &full, &incs,
                                     &progress)) {
        return NULL;
    }
    a = check_progress(progress) < 0 ? NULL : path_array(incs, &n, &keep);
    if (!a) {
        Py_DECREF(full);
        return NULL;
    }
    c.fn = progress;
    ts = PyEval_SaveThread();
    r = qbm_consolidate(PyBytes_AS_STRING(full), a, n,
                        progress == Py_None ? NULL : progress_cb, &c);
    PyEval_RestoreThread(ts);
    res = progress_result(r, &c, NULL);
    PyMem_Free(a);
    Py_DECREF(keep);
    Py_DECREF(full);
    return res;
}

PyDoc_STRVAR(
    qbm_carry_snapshot_doc,
    "carry_snapshot(base, top, *, disable_base=False, dry_run=False)\n--\n\n"
    "Continue the checkpoints of `base` in `top`, an external snapshot of "
    "it taken\nwithout bitmap handling: each enabled bitmap of base is "
    "created in top and\nmarked with top's own clusters, in one "
    "transaction; disable_base=True then\ndisables them in base (the "
    "checkpoints moved up). Returns the list of\n(action, bitmap or None, "
    "image), action one of CARRY_SNAPSHOT_*.\n"
    "dry_run=True runs the same stages and checks, writes nothing, and "
    "returns\n(top, base) instead: the qbm.SpaceInfo of each image's "
    "commit (base's all\nzero when it is not to change); qbm.Error with "
    "errno ENOSPC when a device\nis too small, its .space then that "
    "(top, base) pair all the same.");

static PyObject *mod_carry_snapshot(PyObject *mod, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = { "base", "top", "disable_base", "dry_run", NULL };
    PyObject *base = NULL, *top = NULL, *res = NULL;
    struct qbm_space_info ti, bi;
    int disable = 0, dry = 0, r, err;
    struct cb c = { 0 };
    PyThreadState *ts;
    unsigned flags;

    if (!PyArg_ParseTupleAndKeywords(
            args, kw, "O&O&|$pp:carry_snapshot", kwlist, PyUnicode_FSConverter,
            &base, PyUnicode_FSConverter, &top, &disable, &dry)) {
        return NULL;
    }
    flags = disable ? QBM_CARRY_SNAPSHOT_DISABLE_BASE : 0;
    c.list = PyList_New(0);
    if (c.list) {
        ts = PyEval_SaveThread();
        /* No image ends at 0: the plan sets them only with its figures. */
        ti.end_after = 0;
        r = dry ? qbm_carry_snapshot_plan(PyBytes_AS_STRING(base),
                                          PyBytes_AS_STRING(top), flags,
                                          carry_cb, &c, &ti, &bi)
                : qbm_carry_snapshot(PyBytes_AS_STRING(base),
                                     PyBytes_AS_STRING(top), flags, carry_cb,
                                     &c);
        err = qbm_get_errno();
        PyEval_RestoreThread(ts);
        if (cb_failed(&c)) {
            /* The callback's exception is raised. */
        } else if (r != 0 && !(dry && r < 0 && err == ENOSPC && ti.end_after)) {
            raise_qbm(NULL);
        } else if (!dry) {
            res = Py_NewRef(c.list);
        } else {
            PyObject *t = space_info_new(&ti);
            PyObject *b = t ? space_info_new(&bi) : NULL;

            res = b ? PyTuple_Pack(2, t, b) : NULL;
            Py_XDECREF(t);
            Py_XDECREF(b);
            if (res && r < 0) {
                /* A device too small: the figures ride on the error. */
                raise_qbm_space(NULL, res);
                Py_CLEAR(res);
            }
        }
        Py_DECREF(c.list);
    }
    Py_DECREF(base);
    Py_DECREF(top);
    return res;
}

static PyObject *mod_version(PyObject *mod, PyObject *unused)
{
    return PyUnicode_FromString(qbm_version());
}

static PyMethodDef module_methods[] = {
    { "open", (PyCFunction)(void (*)(void))mod_open,
      METH_VARARGS | METH_KEYWORDS, qbm_open_doc },
    { "open_chain", (PyCFunction)(void (*)(void))mod_open_chain,
      METH_VARARGS | METH_KEYWORDS, qbm_open_chain_doc },
    { "restore", (PyCFunction)(void (*)(void))mod_restore,
      METH_VARARGS | METH_KEYWORDS, qbm_restore_doc },
    { "extract", (PyCFunction)(void (*)(void))mod_extract,
      METH_VARARGS | METH_KEYWORDS, qbm_extract_doc },
    { "consolidate", (PyCFunction)(void (*)(void))mod_consolidate,
      METH_VARARGS | METH_KEYWORDS, qbm_consolidate_doc },
    { "carry_snapshot", (PyCFunction)(void (*)(void))mod_carry_snapshot,
      METH_VARARGS | METH_KEYWORDS, qbm_carry_snapshot_doc },
    { "version", (PyCFunction)mod_version, METH_NOARGS,
      "version()\n--\n\nThe libqbm version, 'MAJOR.MINOR.MICRO'." },
    { NULL },
};

/* ---- types and module ----------------------------------------------------
 */

static PyStructSequence_Field problem_fields[] = {
    { "kind", "PROBLEM_CORRUPTION, PROBLEM_LEAK or PROBLEM_BITMAP" },
    { "offset", "the file offset concerned (or 0)" },
    { "message", "one phrase naming the structure and what is wrong" },
    { NULL },
};

static PyStructSequence_Desc problem_desc = {
    "qbm.Problem",
    "A problem found by Image.check().",
    problem_fields,
    3,
};

static PyStructSequence_Field finding_fields[] = {
    { "rule", "CHAIN_NOT_IN_TOP, CHAIN_GAP, CHAIN_DISABLED or CHAIN_IN_USE" },
    { "bitmap", "the bitmap's name" },
    { "layer", "the layer that breaks the rule (0 = top)" },
    { "origin", "the layer of the bitmap's deepest copy" },
    { NULL },
};

static PyStructSequence_Desc finding_desc = {
    "qbm.Finding",
    "A checkpoint rule broken, found by Chain.check().",
    finding_fields,
    4,
};

static PyStructSequence_Field space_info_fields[] = {
    { "bytes", "bytes of new clusters the commit writes" },
    { "end_before", "the image end offset before it" },
    { "end_after", "the image end offset once they are written" },
    { "capacity", "the block device's size, or 0 for a file" },
    { NULL },
};

static PyStructSequence_Desc space_info_desc = {
    "qbm.SpaceInfo",
    "What a commit needs (Image.commit_plan(), carry_snapshot(dry_run=True)).",
    space_info_fields,
    4,
};

static PyTypeObject ImageType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "qbm.Image",
    .tp_basicsize = sizeof(ImageObject),
    .tp_dealloc = (destructor)Image_dealloc,
    .tp_repr = (reprfunc)Image_repr,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "An open qcow2 image (from qbm.open() or Chain.layers).",
    .tp_methods = Image_methods,
    .tp_getset = Image_getset,
};

static PyTypeObject ChainType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "qbm.Chain",
    .tp_basicsize = sizeof(ChainObject),
    .tp_dealloc = (destructor)Chain_dealloc,
    .tp_repr = (reprfunc)Chain_repr,
    .tp_as_sequence = &Chain_as_sequence,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "An open backing chain (from qbm.open_chain()).",
    .tp_methods = Chain_methods,
    .tp_getset = Chain_getset,
};

static PyTypeObject BitmapType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "qbm.Bitmap",
    .tp_basicsize = sizeof(BitmapObject),
    .tp_dealloc = (destructor)Bitmap_dealloc,
    .tp_repr = (reprfunc)Bitmap_repr,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "A bitmap of an image, as listed by Image.bitmaps.",
    .tp_members = Bitmap_members,
    .tp_getset = Bitmap_getset,
};

static PyTypeObject ExtentIterType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "qbm.ExtentIterator",
    .tp_basicsize = sizeof(ExtentIterObject),
    .tp_dealloc = (destructor)ExtentIter_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "The dirty extents of a bitmap, read a batch at a time.",
    .tp_iter = PyObject_SelfIter,
    .tp_iternext = (iternextfunc)ExtentIter_next,
};

PyDoc_STRVAR(module_doc,
             "Offline access to the persistent dirty bitmaps of qcow2 images "
             "(libqbm).\n\n"
             "    with qbm.open('disk.qcow2', write=True) as img:\n"
             "        img.add('ck1')\n"
             "        img.commit()\n"
             "        for offset, length in img.extents('ck0'):\n"
             "            ...\n\n"
             "Errors raise qbm.Error, an OSError with .errno and .message (the "
             "library's\nmessage) and .filename.");

static struct PyModuleDef qbm_module = {
    PyModuleDef_HEAD_INIT, "qbm", module_doc, -1, module_methods,
};

PyMODINIT_FUNC PyInit_qbm(void);

PyMODINIT_FUNC PyInit_qbm(void)
{
    static const struct {
        const char *name;
        long value;
    } consts[] = {
        { "PROBLEM_CORRUPTION", QBM_PROBLEM_CORRUPTION },
        { "PROBLEM_LEAK", QBM_PROBLEM_LEAK },
        { "PROBLEM_BITMAP", QBM_PROBLEM_BITMAP },
        { "CHAIN_NOT_IN_TOP", QBM_CHAIN_NOT_IN_TOP },
        { "CHAIN_GAP", QBM_CHAIN_GAP },
        { "CHAIN_DISABLED", QBM_CHAIN_DISABLED },
        { "CHAIN_IN_USE", QBM_CHAIN_IN_USE },
        { "ALLOC_DATA", QBM_ALLOC_DATA },
        { "ALLOC_ZERO", QBM_ALLOC_ZERO },
        { "COPY_COPIED", QBM_COPY_COPIED },
        { "COPY_MERGED", QBM_COPY_MERGED },
        { "COPY_REPLACED", QBM_COPY_REPLACED },
        { "COPY_SKIPPED", QBM_COPY_SKIPPED },
        { "CARRY_COPIED", QBM_CARRY_COPIED },
        { "CARRY_MERGED", QBM_CARRY_MERGED },
        { "CARRY_GAP", QBM_CARRY_GAP },
        { "CARRY_FILLED", QBM_CARRY_FILLED },
        { "CARRY_MARKED", QBM_CARRY_MARKED },
        { "CARRY_SNAPSHOT_ADDED", QBM_CARRY_SNAPSHOT_ADDED },
        { "CARRY_SNAPSHOT_MARKED", QBM_CARRY_SNAPSHOT_MARKED },
        { "CARRY_SNAPSHOT_SKIPPED", QBM_CARRY_SNAPSHOT_SKIPPED },
        { "CARRY_SNAPSHOT_TOP_DONE", QBM_CARRY_SNAPSHOT_TOP_DONE },
        { "CARRY_SNAPSHOT_DISABLED", QBM_CARRY_SNAPSHOT_DISABLED },
        { "CARRY_SNAPSHOT_BASE_DONE", QBM_CARRY_SNAPSHOT_BASE_DONE },
    };
    PyObject *m, *error_dict;
    size_t i;

    if (PyType_Ready(&ImageType) < 0 || PyType_Ready(&ChainType) < 0 ||
        PyType_Ready(&BitmapType) < 0 || PyType_Ready(&ExtentIterType) < 0) {
        return NULL;
    }
    if (!ProblemType.tp_name &&
        PyStructSequence_InitType2(&ProblemType, &problem_desc) < 0) {
        return NULL;
    }
    if (!FindingType.tp_name &&
        PyStructSequence_InitType2(&FindingType, &finding_desc) < 0) {
        return NULL;
    }
    if (!SpaceInfoType.tp_name &&
        PyStructSequence_InitType2(&SpaceInfoType, &space_info_desc) < 0) {
        return NULL;
    }
    m = PyModule_Create(&qbm_module);
    if (!m) {
        return NULL;
    }
    /* .space on every instance, None unless a plan set it. */
    error_dict = Py_BuildValue("{sO}", "space", Py_None);
    if (!error_dict) {
        Py_DECREF(m);
        return NULL;
    }
    QbmError = PyErr_NewExceptionWithDoc(
        "qbm.Error",
        "A libqbm call failed: an OSError whose errno and strerror are the "
        "library's\n(strerror: its one-phrase message, also as .message), "
        "and filename the\nimage or file concerned; space: None, or the "
        "figures of a plan refused\nonly because a device is too small "
        "(Image.commit_plan(): a qbm.SpaceInfo;\ncarry_snapshot(dry_run="
        "True): the (top, base) pair).",
        PyExc_OSError, error_dict);
    Py_DECREF(error_dict);
    if (!QbmError || PyModule_AddObjectRef(m, "Error", QbmError) < 0 ||
        PyModule_AddObjectRef(m, "Image", (PyObject *)&ImageType) < 0 ||
        PyModule_AddObjectRef(m, "Chain", (PyObject *)&ChainType) < 0 ||
        PyModule_AddObjectRef(m, "Bitmap", (PyObject *)&BitmapType) < 0 ||
        PyModule_AddObjectRef(m, "ExtentIterator",
                              (PyObject *)&ExtentIterType) < 0 ||
        PyModule_AddObjectRef(m, "Problem", (PyObject *)&ProblemType) < 0 ||
        PyModule_AddObjectRef(m, "Finding", (PyObject *)&FindingType) < 0 ||
        PyModule_AddObjectRef(m, "SpaceInfo", (PyObject *)&SpaceInfoType) < 0 ||
        PyModule_AddStringConstant(m, "__version__", qbm_version()) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    for (i = 0; i < sizeof(consts) / sizeof(consts[0]); i++) {
        if (PyModule_AddIntConstant(m, consts[i].name, consts[i].value) < 0) {
            Py_DECREF(m);
            return NULL;
        }
    }
    return m;
}
