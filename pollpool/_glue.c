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
