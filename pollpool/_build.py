"""The cffi builder for ``pollpool._native``: the C core plus the Python glue.

Only the build imports this file (``setup.py`` names it in ``cffi_modules``).
"""

from __future__ import annotations

import os

from cffi import FFI

_HERE = os.path.dirname(os.path.abspath(__file__))
_CSRC = os.path.join(os.path.dirname(_HERE), "csrc")
if not os.path.isdir(_CSRC):  # building from an sdist laid out differently
    _CSRC = os.path.join(_HERE, "csrc")

CDEF = """
#define PP_FRAMING_RAW 0
#define PP_FRAMING_LINE 1
#define PP_FRAMING_LENGTH 2
#define PP_BACKEND_POLL 0
#define PP_BACKEND_EPOLL 1
#define PP_MAX_DELIMITER 16
#define PP_MAX_DEFERRED 1024
#define PP_MAX_LISTENERS 8
#define POLLPOOL_ABI_VERSION 2
#define POLLPOOL_ABI_MIN 1
#define PP_DEFER 2

typedef struct pp_reply pp_reply;
typedef int (*pp_handler_fn)(void *ctx, const unsigned char *msg, size_t len,
                             pp_reply *reply);
typedef struct pp_msg pp_msg;
typedef int (*pp_open_fn)(void *ctx, pp_reply *reply);
typedef void (*pp_close_fn)(void *ctx, uint64_t conn_id);
typedef int (*pp_batch_fn)(void *ctx, pp_reply *reply, const pp_msg *msgs,
                           size_t n);

typedef struct pp_cidr {
    int family;
    unsigned char addr[16];
    int prefix;
} pp_cidr;

typedef struct pp_config {
    const char *host;
    int port;
    int backlog;
    int reuse_port;
    int backend;
    int threads;
    size_t queue_size;
    int framing;
    unsigned char delimiter[16];
    size_t delimiter_len;
    int header_bytes;
    size_t max_message_size;
    size_t max_connections;
    size_t output_high_water;
    double drain_timeout;
    const unsigned char *shutdown_message;
    size_t shutdown_message_len;
    double idle_timeout;
    double send_timeout;
    size_t output_limit;
    const unsigned char *reject_message;
    size_t reject_message_len;
    pp_handler_fn handler;
    pp_batch_fn batch;
    void *ctx;
    pp_open_fn on_open;
    pp_close_fn on_close;
    void (*worker_exit)(void *ctx);
    size_t push_limit;
    int push_overflow;
    double reply_timeout;
    void (*deferred_gone)(void *ctx, uint64_t deferred_id);
    size_t max_deferred;
    int proxy_protocol;
    double proxy_timeout;
    const pp_cidr *trusted_proxies;
    size_t ntrusted_proxies;
    int proxy_trust_unix;
    const int *listen_fds;
    size_t nlisten_fds;
    int notify_fd;
    double drain_delay;
    double drain_grace;
    int health_fd;
} pp_config;

typedef struct pp_stats {
    uint64_t accepted;
    uint64_t active;
    uint64_t closed;
    uint64_t messages;
    uint64_t replies;
    uint64_t bytes_in;
    uint64_t bytes_out;
    uint64_t oversize_frames;
    uint64_t handler_errors;
    uint64_t accept_errors;
    uint64_t read_errors;
    uint64_t write_errors;
    uint64_t nomem_errors;
    uint64_t accept_paused;
    uint64_t forced_closes;
    uint64_t rejected;
    uint64_t idle_closes;
    uint64_t send_timeouts;
    uint64_t output_overflows;
    uint64_t pushes;
    uint64_t push_bytes;
    uint64_t push_drops;
    uint64_t push_overflow_closes;
    uint64_t wakeups;
    uint64_t deferred;
    uint64_t deferred_total;
    uint64_t reply_timeouts;
    uint64_t deferred_cancelled;
    uint64_t proxy_errors;
    uint64_t health_checks;
} pp_stats;

typedef struct pp_deferred pp_deferred;

typedef struct pp_server pp_server;

void pp_config_init(pp_config *cfg);
const char *pp_backend_name(int backend);
int pp_server_new(const pp_config *cfg, pp_server **out);
int pp_server_address(const pp_server *srv, char *host, size_t hostlen,
                      int *port);
int pp_server_start_workers(pp_server *srv);
int pp_server_run(pp_server *srv);
void pp_server_stop(pp_server *srv, int force);
void pp_server_retire(pp_server *srv);
int pp_server_was_forced(const pp_server *srv);
int pp_server_on_worker(const pp_server *srv);
long pp_server_fd_limit(const pp_server *srv);
int pp_reply_peer(const pp_reply *reply, char *host, size_t hostlen, int *port);
int pp_reply_proxy_peer(const pp_reply *reply, char *host, size_t hostlen, int *port);
int pp_reply_peer_cred(const pp_reply *reply, int *pid, int *uid, int *gid);
void pp_server_stats(const pp_server *srv, pp_stats *out);
void pp_server_free(pp_server *srv);
int pp_signals_install(pp_server *srv);
void pp_signals_restore(void);
int pp_handler_echo(void *ctx, const unsigned char *msg, size_t len,
                    pp_reply *reply);
int pp_server_send(pp_server *srv, uint64_t id, const void *data, size_t len);
long pp_server_broadcast(pp_server *srv, const void *data, size_t len);
long pp_server_publish(pp_server *srv, const void *topic, size_t tlen,
                       const void *data, size_t len);
int pp_server_subscribe(pp_server *srv, uint64_t id, const void *topic, size_t tlen);
int pp_server_unsubscribe(pp_server *srv, uint64_t id, const void *topic, size_t tlen);
int pp_server_close_conn(pp_server *srv, uint64_t id);
long long pp_server_pending(pp_server *srv, uint64_t id);
pp_deferred *pp_reply_defer_batch(pp_reply *reply, size_t next);
uint64_t pp_deferred_id(const pp_deferred *d);
#define PP_PUSH_CLOSE 0
#define PP_PUSH_DROP 1

/* Python glue (defined in the source below). */
typedef struct pp_pymsg { const char *data; size_t len; } pp_pymsg;
int pp_reply_send_framed(pp_reply *reply, const char *data, size_t len,
                         size_t nreplies);
extern "Python" int _pp_py_batch(void *ctx, pp_reply *reply, uint64_t conn_id,
                                 const pp_pymsg *msgs, size_t n,
                                 const char *block, size_t block_len,
                                 char *scratch, size_t cap, size_t *res);
extern "Python" int _pp_py_open(void *ctx, pp_reply *reply, uint64_t conn_id,
                                const char *host, int port,
                                char *scratch, size_t cap, size_t *res);
extern "Python" void _pp_py_close(void *ctx, uint64_t conn_id);
int pp_py_batch(void *ctx, pp_reply *reply, const pp_msg *msgs, size_t n);
int pp_py_open(void *ctx, pp_reply *reply);
void pp_py_close(void *ctx, uint64_t conn_id);
pp_handler_fn pp_py_echo_fn(void);
void *pp_py_dlopen(const char *path);
void *pp_py_dlsym(void *lib, const char *name);
const char *pp_py_dlerror(void);
int pp_py_parent_death_signal(int sig);
typedef struct pp_pyfast {
    void *fn;
    void *report;
    void *attach;
} pp_pyfast;
int pp_py_fast_batch(void *ctx, pp_reply *reply, const pp_msg *msgs, size_t n);
void pp_py_fast_worker_exit(void *ctx);
typedef struct pp_pyitem {
    int kind;
    uint64_t conn_id;
    uint64_t handle_id;
    pp_deferred *handle;
    const char *block;
    size_t block_len;
    size_t n;
    pp_pymsg *msgs;
    char host[64];
    int port;
    char proxy_host[64];
    int proxy_port;
    int has_cred, pid, uid, gid;
} pp_pyitem;
typedef struct pp_pyloop pp_pyloop;
pp_pyloop *pp_py_aloop_new(int lines);
int pp_py_aloop_fd(pp_pyloop *q);
void pp_py_aloop_free(pp_pyloop *q);
size_t pp_py_aloop_take(pp_pyloop *q, pp_pyitem **out);
void pp_py_aloop_release(pp_pyitem *items, size_t n);
int pp_py_async_batch(void *ctx, pp_reply *reply, const pp_msg *msgs, size_t n);
int pp_py_async_open(void *ctx, pp_reply *reply);
void pp_py_async_close(void *ctx, uint64_t conn_id);
void pp_py_async_gone(void *ctx, uint64_t handle_id);
int pp_py_finish(pp_deferred *d, const char *data, size_t len, size_t count,
                 int status);
"""

# The glue's C source lives in _glue.c beside this file; cffi compiles it into
# the module, after its own #include of Python.h.
with open(os.path.join(_HERE, "_glue.c")) as _f:
    GLUE = _f.read()


SOURCES = sorted(
    os.path.join(_CSRC, name) for name in os.listdir(_CSRC) if name.endswith(".c")
)

ffi = FFI()
ffi.cdef(CDEF)
ffi.set_source(
    "pollpool._native",
    GLUE,
    # Relative to the project root, where setup.py runs: setuptools refuses
    # absolute paths in a wheel build.
    sources=[os.path.relpath(s, os.path.dirname(_HERE)) for s in SOURCES],
    include_dirs=[_CSRC],
    define_macros=[("_GNU_SOURCE", "1")],
    extra_compile_args=["-std=gnu11", "-O2", "-Wall", "-fvisibility=hidden"],
    libraries=["pthread", "dl"],
)

if __name__ == "__main__":
    ffi.compile(verbose=True)
