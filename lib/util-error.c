/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* Thread-local last error, and allocation wrappers that record ENOMEM. */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>

#include "internal.h"

#ifndef QBM_VERSION
#define QBM_VERSION "0.0.0"
#endif

static __thread char last_msg[1024];
static __thread int last_errno;
#ifndef QBM_NO_TEST_HOOKS
static unsigned long alloc_fail_countdown;
#endif

int qbm_err_set(int errnum, const char *fmt, ...)
{
    va_list ap;

    if (errnum <= 0) {
        errnum = EIO;
    }
    va_start(ap, fmt);
    vsnprintf(last_msg, sizeof(last_msg), fmt, ap);
    va_end(ap);
    last_errno = errnum;
    return -errnum;
}

int qbm_err_prefix(int ret, const char *fmt, ...)
{
    char old[sizeof(last_msg)];
    size_t n;
    va_list ap;
    int len;

    memcpy(old, last_msg, sizeof(old));
    va_start(ap, fmt);
    len = vsnprintf(last_msg, sizeof(last_msg), fmt, ap);
    va_end(ap);
    n = len < 0 ? 0 : (size_t)len;
    if (n + 2 < sizeof(last_msg)) {
        memcpy(last_msg + n, ": ", 2);
        n += 2;
        snprintf(last_msg + n, sizeof(last_msg) - n, "%s", old);
    }
    return ret;
}

int qbm_public_ret_cb(int r, int user_ret)
{
    if (r < 0) {
        return -1;
    }
    if (user_ret) {
        qbm_err(ECANCELED, "stopped by the callback");
        return user_ret;
    }
    return 0;
}

const char *qbm_err_message(void)
{
    return last_msg;
}

int qbm_err_errno(void)
{
    return last_errno;
}

QBM_API const char *qbm_get_error(void)
{
    return qbm_err_message();
}

QBM_API int qbm_get_errno(void)
{
    return last_errno;
}

int qbm_progress_report(struct qbm_progress *p, uint64_t done, uint64_t total)
{
    if (!p || !p->fn) {
        return 0;
    }
    p->user_ret = p->fn(p->opaque, done, total);
    if (p->user_ret) {
        return qbm_err(ECANCELED, "stopped by the progress callback");
    }
    return 0;
}

QBM_API const char *qbm_version(void)
{
    return QBM_VERSION;
}

#ifdef QBM_NO_TEST_HOOKS
/* The installed libraries: no allocation ever fails on purpose. */
static bool alloc_should_fail(void)
{
    return false;
}
#else
void qbm_alloc_fail_after(unsigned long n)
{
    alloc_fail_countdown = n;
}

/* Returns true when the test hook says this allocation must fail. */
static bool alloc_should_fail(void)
{
    if (alloc_fail_countdown == 0) {
        return false;
    }
    if (--alloc_fail_countdown == 0) {
        return true;
    }
    return false;
}
#endif

bool qbm_alloc_hook_fails(size_t n)
{
    if (alloc_should_fail()) {
        qbm_err(ENOMEM, "out of memory allocating %zu bytes", n);
        return true;
    }
    return false;
}

void *qbm_malloc(size_t n)
{
    void *p = alloc_should_fail() ? NULL : malloc(n ? n : 1);

    if (!p) {
        qbm_err(ENOMEM, "out of memory allocating %zu bytes", n);
    }
    return p;
}

void *qbm_calloc(size_t n, size_t size)
{
    void *p = alloc_should_fail() ? NULL : calloc(n ? n : 1, size ? size : 1);

    if (!p) {
        qbm_err(ENOMEM, "out of memory allocating %zu x %zu bytes", n, size);
    }
    return p;
}

void *qbm_realloc(void *old, size_t n)
{
    void *p = alloc_should_fail() ? NULL : realloc(old, n ? n : 1);

    if (!p) {
        qbm_err(ENOMEM, "out of memory allocating %zu bytes", n);
    }
    return p;
}

char *qbm_strndup(const char *s, size_t n)
{
    char *p = qbm_malloc(n + 1);

    if (p) {
        memcpy(p, s, n);
        p[n] = '\0';
    }
    return p;
}
