/*
 * _glue.c - the Python side of pollpool's C core: the only file of the
 * project that includes Python.h (through the cffi-generated module that
 * includes it: pollpool/_build.py's set_source).
 *
 * It holds what must call the CPython API from a worker thread: the batch
 * hooks for connection-aware handlers (into the cffi callbacks of
 * server.py), the fast path that calls a plain callable straight through the
 * CPython API, and small helpers (dlopen, the parent-death signal).
 */
#include <Python.h> /* already included by cffi's module source: for the reader */
#include <dlfcn.h>
#include <errno.h>
#include "pp_server.h"

/* pp_msg with char data, so that the Python side gets bytes from ffi.unpack. */
typedef struct pp_pymsg { const char *data; size_t len; } pp_pymsg;

static int _pp_py_batch(void *ctx, pp_reply *reply, uint64_t conn_id,
                        const pp_pymsg *msgs, size_t n, const char *block,
                        size_t block_len, char *scratch, size_t cap, size_t *res);
static int _pp_py_open(void *ctx, pp_reply *reply, uint64_t conn_id,
                       const char *host, int port, char *scratch, size_t cap,
                       size_t *res);
static void _pp_py_close(void *ctx, uint64_t conn_id);

/* Replies that fit go through this buffer on the worker's stack. */
#define PP_PY_SCRATCH 16384

/* Queues what Python left in scratch: res[0] bytes holding res[1] replies.
 * Python stages only what fits (server.py's _stage); more would already have
 * overrun the stack, so it is a bug to stop at once, not to carry on. */
static int flush_scratch(pp_reply *reply, const char *scratch, const size_t *res,
                         int status)
{
    if (res[0] > PP_PY_SCRATCH)
        abort();
    if (res[0] > 0 && pp_reply_send_framed(reply, scratch, res[0], res[1]) < 0)
        return -1;
    return status;
}

/* The core's batch hook: one trip into Python (one GIL acquisition) per task
 * rather than one per message.  Python copies the framed replies into scratch
 * with ffi.memmove, which keeps the GIL, and they are queued here after the
 * GIL is released: a C call from Python would release and retake it, and
 * with several workers that hands the GIL to another thread mid-batch. */
int pp_py_batch(void *ctx, pp_reply *reply, const pp_msg *msgs, size_t n)
{
    char scratch[PP_PY_SCRATCH];
    size_t res[2] = {0, 0};
    /* The frames lie back to back: from the first message to the end of the
     * last one is the whole task (less the last delimiter). */
    const char *block = (const char *)msgs[0].data;
    size_t block_len = (size_t)((const char *)msgs[n - 1].data - block) + msgs[n - 1].len;
    int st = _pp_py_batch(ctx, reply, pp_reply_conn_id(reply),
                          (const pp_pymsg *)msgs, n, block, block_len, scratch,
                          sizeof scratch, res);
    return flush_scratch(reply, scratch, res, st);
}

int pp_py_open(void *ctx, pp_reply *reply)
{
    char scratch[PP_PY_SCRATCH];
    size_t res[2] = {0, 0};
    char host[64] = "";
    int port = 0;
    pp_reply_peer(reply, host, sizeof host, &port);
    int st = _pp_py_open(ctx, reply, pp_reply_conn_id(reply), host, port,
                         scratch, sizeof scratch, res);
    return flush_scratch(reply, scratch, res, st);
}

void pp_py_close(void *ctx, uint64_t conn_id)
{
    _pp_py_close(ctx, conn_id);
}

/* The echo handler itself: ffi.addressof() would give cffi's wrapper. */
pp_handler_fn pp_py_echo_fn(void)
{
    return pp_handler_echo;
}

void *pp_py_dlopen(const char *path)
{
    return dlopen(path, RTLD_NOW | RTLD_LOCAL);
}

void *pp_py_dlsym(void *lib, const char *name)
{
    dlerror();
    return dlsym(lib, name);
}

const char *pp_py_dlerror(void)
{
    return dlerror();
}

/* ---- plain callables: straight through the CPython API ---------------------
 * A handler that is a plain callable (message -> bytes-like | None) is called
 * without cffi's callback machinery and without any Python-level wrapper:
 * per task one GIL acquisition, per message one bytes object and one call,
 * and the reply copied from the object into the connection's output.  The
 * interpreted wrapper this replaces cost more than `lambda m: m` itself.
 * Connection-aware handlers keep the cffi path (_pp_py_batch). */
typedef struct pp_pyfast {
    void *fn;       /* PyObject *: the handler; the Server keeps it alive */
    void *report;   /* PyObject *: report(code, conn_id, obj) logs a failure */
    void *attach;   /* PyObject *: attach(future, handle, conn_id) replies
                       with the future's result once it is done */
} pp_pyfast;

enum { PP_FAST_RAISED = 0, PP_FAST_BAD_TYPE = 1, PP_FAST_TOO_LONG = 2,
       PP_FAST_OVERFLOW = 3, PP_FAST_NOMEM = 4 };

/* Calls report(code, conn_id, obj) with the GIL held; obj may be NULL. */
static void fast_report(pp_pyfast *f, int code, uint64_t conn_id, PyObject *obj)
{
    PyObject *report = f->report;
    PyObject *c = PyLong_FromLong(code);
    PyObject *id = PyLong_FromUnsignedLongLong(conn_id);
    if (c != NULL && id != NULL) {
        PyObject *r = PyObject_CallFunctionObjArgs(report, c, id, obj ? obj : Py_None, NULL);
        if (r == NULL)
            PyErr_WriteUnraisable(report);
        else
            Py_DECREF(r);
    } else {
        PyErr_Clear();
    }
    Py_XDECREF(c);
    Py_XDECREF(id);
}

/* Reports the exception being raised, with its traceback, and clears it. */
static void fast_report_raised(pp_pyfast *f, uint64_t conn_id)
{
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    PyErr_NormalizeException(&type, &value, &tb);
    if (value != NULL && tb != NULL)
        PyException_SetTraceback(value, tb);
    fast_report(f, PP_FAST_RAISED, conn_id, value);
    Py_XDECREF(type);
    Py_XDECREF(value);
    Py_XDECREF(tb);
}

/* The worker's Python thread state, made on its first task and kept: a
 * PyGILState_Ensure/Release pair on a thread without one creates and
 * destroys a thread state every time, which costs more than the handler.
 * Released with the GIL between tasks, deleted as the worker exits. */
static __thread PyThreadState *pp_fast_tstate;

static void fast_enter(void)
{
    if (pp_fast_tstate == NULL)
        (void)PyGILState_Ensure(); /* never released: the thread keeps it */
    else
        PyEval_RestoreThread(pp_fast_tstate);
}

static void fast_leave(void)
{
    pp_fast_tstate = PyEval_SaveThread();
}

/* The pool's worker_exit hook: the thread state goes with its thread. */
void pp_py_fast_worker_exit(void *ctx)
{
    (void)ctx;
    if (pp_fast_tstate == NULL)
        return;
    PyEval_RestoreThread(pp_fast_tstate);
    pp_fast_tstate = NULL;
    PyGILState_Release(PyGILState_UNLOCKED); /* last one: deletes it */
}

int pp_py_fast_batch(void *ctx, pp_reply *reply, const pp_msg *msgs, size_t n)
{
    pp_pyfast *f = ctx;
    PyObject *fn = f->fn;
    uint64_t conn_id = pp_reply_conn_id(reply);
    int status = PP_KEEP;
    fast_enter();
    for (size_t i = 0; i < n; i++) {
        PyObject *m = PyBytes_FromStringAndSize((const char *)msgs[i].data,
                                                (Py_ssize_t)msgs[i].len);
        PyObject *out = m ? PyObject_CallFunctionObjArgs(fn, m, NULL) : NULL;
        Py_XDECREF(m);
        if (out == NULL) {
            fast_report_raised(f, conn_id);
            status = -1;
            break;
        }
        if (out == Py_None) {
            Py_DECREF(out);
            continue;
        }
        PyObject *copy = NULL;
        const char *p = NULL;
        Py_ssize_t len = 0;
        if (PyBytes_Check(out)) {
            p = PyBytes_AsString(out);
            len = PyBytes_Size(out);
        } else if (PyByteArray_Check(out)) {
            p = PyByteArray_AsString(out);
            len = PyByteArray_Size(out);
        } else if (PyMemoryView_Check(out)) {
            copy = PyObject_Bytes(out);
            if (copy == NULL) {
                Py_DECREF(out);
                fast_report_raised(f, conn_id);
                status = -1;
                break;
            }
            p = PyBytes_AsString(copy);
            len = PyBytes_Size(copy);
        } else if (PyObject_HasAttrString(out, "add_done_callback")) {
            /* A future: its result is this message's reply, and the
             * messages after it wait for it. */
            pp_deferred *d = pp_reply_defer_batch(reply, i + 1);
            if (d == NULL) {
                Py_DECREF(out);
                fast_report(f, PP_FAST_NOMEM, conn_id, NULL);
                status = -1;
                break;
            }
            PyObject *h = PyLong_FromVoidPtr(d);
            PyObject *id = h ? PyLong_FromUnsignedLongLong(conn_id) : NULL;
            PyObject *r = id ? PyObject_CallFunctionObjArgs(f->attach, out, h, id, NULL) : NULL;
            Py_XDECREF(h);
            Py_XDECREF(id);
            Py_DECREF(out);
            if (r == NULL) {
                pp_deferred_finish(d, -1); /* not attached: close, as a raise */
                fast_report_raised(f, conn_id);
            }
            Py_XDECREF(r);
            status = PP_DEFER;
            break;
        } else {
            fast_report(f, PP_FAST_BAD_TYPE, conn_id, out);
            Py_DECREF(out);
            status = -1;
            break;
        }
        /* Framed into the connection's output; the GIL stays held (this is
         * C: nothing here lets it go, and a send is rare and short). */
        int rc = pp_reply_send(reply, p, (size_t)len);
        int err = errno;
        Py_XDECREF(copy);
        Py_DECREF(out);
        if (rc < 0) {
            PyObject *size = PyLong_FromSsize_t(len);
            fast_report(f, err == EMSGSIZE ? PP_FAST_TOO_LONG :
                           err == ENOBUFS ? PP_FAST_OVERFLOW : PP_FAST_NOMEM,
                        conn_id, size);
            Py_XDECREF(size);
            status = -1;
            break;
        }
    }
    fast_leave();
    return status;
}

/* ---- coroutine handlers: the hand-off to an asyncio loop -------------------
 * A coroutine handler's tasks never take the GIL on a worker: the batch hook
 * defers the whole task (pp_reply_defer_batch), appends one item (handle,
 * connection, messages) to the inbox and, if the loop is waiting, writes its
 * eventfd once.  The loop's reader (server.py's _AsyncRunner) takes every
 * item queued since in one call, runs the coroutines, and finishes each
 * handle with the framed replies (pp_py_finish): one hand-off per batch of
 * tasks, and the replies go out through the C core. */
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/eventfd.h>

enum { PP_AI_MESSAGES = 0, PP_AI_OPEN = 1, PP_AI_CLOSE = 2, PP_AI_CANCEL = 3 };

typedef struct pp_pyitem {
    int kind;               /* PP_AI_* */
    uint64_t conn_id;
    uint64_t handle_id;     /* the handle's id; for CANCEL, the one gone */
    pp_deferred *handle;    /* MESSAGES, OPEN; NULL otherwise */
    const char *block;      /* MESSAGES: from the first message to the end of the last */
    size_t block_len;
    size_t n;               /* messages */
    pp_pymsg *msgs;         /* n of them (malloc'd with the item list) */
    char host[64];          /* OPEN: the peer */
    int port;
    char proxy_host[64];    /* OPEN: the balancer, "" if none */
    int proxy_port;
    int has_cred, pid, uid, gid; /* OPEN: a Unix peer's credentials */
} pp_pyitem;

typedef struct pp_pyloop {
    pthread_mutex_t mu;
    pp_pyitem *items;       /* mu: queued */
    size_t n, cap;
    int armed;              /* mu: the loop waits for the eventfd */
    int efd;
    int lines;              /* line framing: Python splits the block itself */
} pp_pyloop;

pp_pyloop *pp_py_aloop_new(int lines)
{
    pp_pyloop *q = calloc(1, sizeof *q);
    if (q == NULL)
        return NULL;
    q->efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (q->efd < 0 || pthread_mutex_init(&q->mu, NULL) != 0) {
        if (q->efd >= 0)
            close(q->efd);
        free(q);
        return NULL;
    }
    q->armed = 1;
    q->lines = lines;
    return q;
}

int pp_py_aloop_fd(pp_pyloop *q)
{
    return q->efd;
}

static void items_free(pp_pyitem *items, size_t n)
{
    for (size_t i = 0; i < n; i++)
        free(items[i].msgs);
    free(items);
}

/* Only once no thread can queue (the server is freed). Handles still in it
 * are finished as gone. */
void pp_py_aloop_free(pp_pyloop *q)
{
    for (size_t i = 0; i < q->n; i++)
        if (q->items[i].handle != NULL)
            pp_deferred_finish(q->items[i].handle, -1);
    items_free(q->items, q->n);
    close(q->efd);
    pthread_mutex_destroy(&q->mu);
    free(q);
}

/* Appends an item (copied); 0 or -ENOMEM.  Any thread but the loop's. */
static int aloop_put(pp_pyloop *q, const pp_pyitem *it)
{
    pthread_mutex_lock(&q->mu);
    if (q->n == q->cap) {
        size_t cap = q->cap ? q->cap * 2 : 64;
        pp_pyitem *v = realloc(q->items, cap * sizeof *v);
        if (v == NULL) {
            pthread_mutex_unlock(&q->mu);
            return -ENOMEM;
        }
        q->items = v;
        q->cap = cap;
    }
    q->items[q->n++] = *it;
    if (q->armed) {
        q->armed = 0;
        uint64_t one = 1;
        ssize_t k;
        do
            k = write(q->efd, &one, sizeof one);
        while (k < 0 && errno == EINTR);
        /* EAGAIN: the counter is full, so the loop is woken anyway. */
    }
    pthread_mutex_unlock(&q->mu);
    return 0;
}

/* The loop's reader: every item queued since the last call (*out, to pass
 * to pp_py_aloop_release), and the loop is armed again.  Returns the count. */
size_t pp_py_aloop_take(pp_pyloop *q, pp_pyitem **out)
{
    uint64_t v;
    ssize_t k;
    do
        k = read(q->efd, &v, sizeof v);
    while (k < 0 && errno == EINTR);
    pthread_mutex_lock(&q->mu);
    *out = q->items;
    size_t n = q->n;
    q->items = NULL;
    q->n = q->cap = 0;
    q->armed = 1;
    pthread_mutex_unlock(&q->mu);
    return n;
}

void pp_py_aloop_release(pp_pyitem *items, size_t n)
{
    items_free(items, n);
}

int pp_py_async_batch(void *ctx, pp_reply *reply, const pp_msg *msgs, size_t n)
{
    pp_pyloop *q = ctx;
    pp_pyitem it = {.kind = PP_AI_MESSAGES, .conn_id = pp_reply_conn_id(reply), .n = n};
    if (!q->lines) { /* lines are cut in Python from the block, at C speed */
        it.msgs = malloc(n * sizeof *it.msgs);
        if (it.msgs == NULL)
            return -1;
        memcpy(it.msgs, msgs, n * sizeof *it.msgs);
    }
    it.block = (const char *)msgs[0].data;
    it.block_len = (size_t)((const char *)msgs[n - 1].data - it.block) + msgs[n - 1].len;
    /* The messages stay where they are until the finish (the core keeps
     * them for the handle, even when the connection goes first). */
    it.handle = pp_reply_defer_batch(reply, n);
    if (it.handle == NULL) {
        free(it.msgs);
        return -1;
    }
    it.handle_id = pp_deferred_id(it.handle);
    if (aloop_put(q, &it) < 0) {
        free(it.msgs);
        pp_deferred_finish(it.handle, -1);
    }
    return PP_DEFER;
}

int pp_py_async_open(void *ctx, pp_reply *reply)
{
    pp_pyloop *q = ctx;
    pp_pyitem it = {.kind = PP_AI_OPEN, .conn_id = pp_reply_conn_id(reply)};
    pp_reply_peer(reply, it.host, sizeof it.host, &it.port);
    if (pp_reply_proxy_peer(reply, it.proxy_host, sizeof it.proxy_host, &it.proxy_port) < 0)
        it.proxy_host[0] = '\0';
    it.has_cred = pp_reply_peer_cred(reply, &it.pid, &it.uid, &it.gid) == 0;
    it.handle = pp_reply_defer(reply);
    if (it.handle == NULL)
        return -1;
    it.handle_id = pp_deferred_id(it.handle);
    if (aloop_put(q, &it) < 0)
        pp_deferred_finish(it.handle, -1);
    return PP_DEFER;
}

void pp_py_async_close(void *ctx, uint64_t conn_id)
{
    pp_pyitem it = {.kind = PP_AI_CLOSE, .conn_id = conn_id};
    (void)aloop_put(ctx, &it); /* ENOMEM: on_disconnect is lost, logged by nobody */
}

/* The I/O thread: a handle's connection went first: cancel its coroutine. */
void pp_py_async_gone(void *ctx, uint64_t handle_id)
{
    pp_pyitem it = {.kind = PP_AI_CANCEL, .handle_id = handle_id};
    (void)aloop_put(ctx, &it);
}

/* Ends a deferred reply with len bytes holding count framed replies: one
 * call from Python.  0 or -errno (ENOTCONN: the connection is gone). */
int pp_py_finish(pp_deferred *d, const char *data, size_t len, size_t count, int status)
{
    if (len > 0) {
        int rc = pp_deferred_write_framed(d, data, len, count);
        if (rc < 0 && status >= 0)
            status = rc;
    }
    return pp_deferred_finish(d, status);
}

/* A forked server process asks for sig when its parent dies, so that no
 * child outlives a supervisor killed without a chance to stop it. */
#ifdef __linux__
#include <sys/prctl.h>
#endif
int pp_py_parent_death_signal(int sig)
{
#ifdef __linux__
    return prctl(PR_SET_PDEATHSIG, (unsigned long)sig) == 0 ? 0 : -errno;
#else
    (void)sig;
    return -ENOSYS;
#endif
}
