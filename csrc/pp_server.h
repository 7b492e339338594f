/*
 * pp_server.h - the C entry points of the pollpool server core.
 *
 * This is what the Python glue and the C test drivers use.  It needs no
 * Python.  Every function returns 0 on success and -errno on failure unless it
 * says otherwise.
 */
#ifndef PP_SERVER_H
#define PP_SERVER_H

#include <stddef.h>
#include <stdint.h>

#include "pollpool.h"

#ifdef __cplusplus
extern "C" {
#endif

enum { PP_FRAMING_RAW = 0, PP_FRAMING_LINE = 1, PP_FRAMING_LENGTH = 2 };

/* What the I/O thread waits with.  poll() is the default; epoll (Linux,
 * edge-triggered) costs per round what is ready rather than what is open. */
enum { PP_BACKEND_POLL = 0, PP_BACKEND_EPOLL = 1 };

#define PP_MAX_DELIMITER 16
#define PP_MAX_LISTENERS 8

/* One message of a batch: valid only during the batch call. */
typedef struct pp_msg {
    const unsigned char *data;
    size_t len;
} pp_msg;

/* A batch handler gets every message a task holds for one connection at once,
 * so a caller that must take a lock per call (the Python GIL) takes it once per
 * batch.  It replies with pp_reply_send() and returns PP_KEEP after handling
 * all n messages, or PP_CLOSE / a negative error after the message that asked
 * for it; messages after that one are not handled. */
typedef int (*pp_batch_fn)(void *ctx, pp_reply *reply, const pp_msg *msgs,
                           size_t n);

#define PP_MAX_DEFERRED 1024 /* largest pp_config.max_deferred */

/* A network a PROXY protocol header is taken from (pp_config). */
typedef struct pp_cidr {
    int family;                 /* AF_INET or AF_INET6 */
    unsigned char addr[16];     /* network order; IPv4 in the first 4 bytes */
    int prefix;                 /* bits: 0..32 or 0..128 */
} pp_cidr;

typedef struct pp_config {
    const char *host;           /* numeric or resolvable; NULL or "" = all IPv4 */
    int port;                   /* 0 = ephemeral */
    int backlog;                /* listen() backlog; <= 0 means 1024 */
    int reuse_port;             /* SO_REUSEPORT: several processes share the
                                   port, the kernel spreads connections */
    int backend;                /* PP_BACKEND_* */
    int threads;                /* worker threads, >= 1 */
    size_t queue_size;          /* tasks waiting for a worker; 0 = 4096 */
    int framing;                /* PP_FRAMING_* */
    unsigned char delimiter[PP_MAX_DELIMITER];
    size_t delimiter_len;       /* line framing: 1..PP_MAX_DELIMITER */
    int header_bytes;           /* length framing: 1, 2, 4 or 8 */
    size_t max_message_size;    /* larger frames close their connection */
    size_t max_connections;     /* 0 = no limit beyond the fd limit */
    size_t output_high_water;   /* pending output above this stops reading */
    double drain_timeout;       /* seconds graceful shutdown may take */
    const unsigned char *shutdown_message; /* copied; NULL = none */
    size_t shutdown_message_len;
    double idle_timeout;        /* close connections silent this long; 0 = never */
    double send_timeout;        /* close when pending output moves not at all
                                   for this long (a peer that stopped reading);
                                   0 = never */
    size_t output_limit;        /* pending output above this closes; 0 = none */
    const unsigned char *reject_message; /* with max_connections: accept the
                                   extra connection, send this framed, close;
                                   NULL = pause accepting instead.  Copied. */
    size_t reject_message_len;
    pp_handler_fn handler;      /* exactly one of handler and batch */
    pp_batch_fn batch;
    void *ctx;                  /* passed to handler, batch and the hooks */
    pp_open_fn on_open;         /* optional connection events (pollpool.h) */
    pp_close_fn on_close;
    void (*worker_exit)(void *ctx); /* optional: each worker thread calls it
                                   as it exits (to free per-thread state) */
    size_t push_limit;          /* bytes of pushes queued per connection;
                                   0 = no limit */
    int push_overflow;          /* PP_PUSH_CLOSE or PP_PUSH_DROP, past it */
    double reply_timeout;       /* seconds a deferred reply may take before
                                   its connection is closed; 0 = no limit */
    /* Optional: the I/O thread calls it when a deferred reply's connection
     * goes (reset, reply_timeout, the drain's end) before the finish, with
     * pp_deferred_id() of the handle, so that the work on it can be
     * cancelled.  The handle itself may be finished and freed meanwhile:
     * the id is all it gets.  Must not block. */
    void (*deferred_gone)(void *ctx, uint64_t deferred_id);
    /* Replies a connection may have deferred at once (0 or 1: one).  Above
     * one, a per-message handler that defers is called again for the next
     * message of the same read, up to this many deferrals; the replies made
     * meanwhile are held behind the pending one, so replies still leave in
     * request order.  Messages read later wait until every reply is in.
     * At most PP_MAX_DEFERRED; per-message handlers only (a batch handler
     * defers once per call). */
    size_t max_deferred;
    /* PROXY protocol (v1 or v2), as a balancer sends it: every connection
     * from a trusted network must begin with one header, within
     * proxy_timeout seconds (0 = 5); the handler then sees the client it
     * names as the peer.  A connection from elsewhere, or a header that is
     * malformed, partial, duplicated or too long, is closed and counted in
     * proxy_errors.  The list is copied; an IPv4-mapped IPv6 peer matches
     * the IPv4 networks. */
    int proxy_protocol;
    double proxy_timeout;
    const pp_cidr *trusted_proxies;
    size_t ntrusted_proxies;
    int proxy_trust_unix;       /* a Unix-socket peer may send the header */
    /* Listening stream sockets to serve instead of binding host:port (TCP
     * or Unix, inherited, from systemd...): each is duplicated, and the
     * duplicate made non-blocking (a flag the caller's descriptor shares);
     * the caller keeps and closes its own.  At most PP_MAX_LISTENERS. */
    const int *listen_fds;
    size_t nlisten_fds;
    /* > 0: a datagram socket connected to systemd's NOTIFY_SOCKET; the I/O
     * thread sends STOPPING=1 on it as the drain begins.  Not closed. */
    int notify_fd;
    /* Leaving (a restart behind a balancer).  A stop first tells the world
     * and keeps serving: for drain_delay seconds (0 = none) the listeners
     * go on accepting and every connection is served as before, while
     * health checks hear "drain" and systemd STOPPING=1, so a balancer
     * stops sending first.  Then the drain begins: the listeners close, and
     * a connection that has not sent a whole message yet gets drain_grace
     * seconds (within drain_timeout) for its first one, which is answered
     * before the goodbye. */
    double drain_delay;
    double drain_grace;
    /* > 0: a listening socket for health checks (duplicated, as listen_fds
     * are).  Each connection to it gets "up ready\n" while serving,
     * "drain\n" once a stop begins (HAProxy's agent-check), and is closed;
     * the socket closes as the drain begins, so a plain TCP check fails
     * from then on. */
    int health_fd;
} pp_config;

/* What a push past push_limit does: close that connection (the default, as
 * Redis does with a slow pub/sub client), or drop the push. */
enum { PP_PUSH_CLOSE = 0, PP_PUSH_DROP = 1 };

/* Counters; a snapshot, each value read atomically but not all at one instant. */
typedef struct pp_stats {
    uint64_t accepted;          /* connections accepted */
    uint64_t active;            /* connections open now */
    uint64_t closed;            /* connections closed */
    uint64_t messages;          /* complete messages handed to the handler */
    uint64_t replies;           /* replies framed */
    uint64_t bytes_in;
    uint64_t bytes_out;
    uint64_t oversize_frames;   /* frames over max_message_size or header capacity */
    uint64_t handler_errors;    /* handler returned < 0 or raised */
    uint64_t accept_errors;     /* accept() failures other than EAGAIN/EINTR */
    uint64_t read_errors;       /* recv() failures (ECONNRESET, ...) */
    uint64_t write_errors;      /* send() failures (EPIPE, ECONNRESET, ...) */
    uint64_t nomem_errors;      /* connections closed because memory ran out */
    uint64_t accept_paused;     /* times accepting paused (EMFILE, max_connections) */
    uint64_t forced_closes;     /* connections cut by a forced or timed-out drain */
    uint64_t rejected;          /* connections turned away at max_connections */
    uint64_t idle_closes;       /* connections closed by idle_timeout */
    uint64_t send_timeouts;     /* connections closed by send_timeout */
    uint64_t output_overflows;  /* connections closed by output_limit */
    uint64_t pushes;            /* frames queued by pushes (per recipient) */
    uint64_t push_bytes;        /* their bytes, framing included */
    uint64_t push_drops;        /* pushes dropped at push_limit */
    uint64_t push_overflow_closes; /* connections closed at push_limit */
    uint64_t wakeups;           /* writes to the I/O thread's wake fd */
    uint64_t deferred;          /* deferred replies pending now */
    uint64_t deferred_total;    /* replies deferred */
    uint64_t reply_timeouts;    /* connections closed by reply_timeout */
    uint64_t deferred_cancelled; /* deferred replies cut by the drain's end */
    uint64_t proxy_errors;      /* connections refused for their PROXY header
                                   (untrusted source, malformed, timeout) */
    uint64_t health_checks;     /* connections to the health socket answered */
} pp_stats;

typedef struct pp_server pp_server;

/* Fills cfg with the defaults: 127.0.0.1:9000, 4 threads, line framing with
 * "\n", 1 MiB messages, 4 MiB output high-water, 10 s drain, 60 s send
 * timeout, 64 MiB output limit, no idle timeout. */
void pp_config_init(pp_config *cfg);

/* Validates cfg, binds and listens, and creates the worker pool; the server
 * does not serve until pp_server_run() or pp_server_start().  On success
 * *out owns everything; free it with pp_server_free().  Returns -EINVAL for a
 * bad configuration, the bind/listen errno, or -ENOMEM. */
int pp_server_new(const pp_config *cfg, pp_server **out);

/* Writes the first listening address as numeric host and port. */
int pp_server_address(const pp_server *srv, char *host, size_t hostlen,
                      int *port);

/* The backend's name ("poll", "epoll"), or NULL if this build lacks it. */
const char *pp_backend_name(int backend);

/* Starts the worker threads (with SIGINT and SIGTERM blocked), so that a
 * caller learns of a thread creation failure before serving; pp_server_run()
 * does it if nobody did.  Not thread-safe against pp_server_run(). */
int pp_server_start_workers(pp_server *srv);

/* Runs the I/O loop on the calling thread until the server has stopped and
 * every worker is gone (or abandoned after a forced stop).  Call at most once. */
int pp_server_run(pp_server *srv);

/* Runs the I/O loop on a new thread that blocks SIGINT and SIGTERM. */
int pp_server_start(pp_server *srv);

/* Waits for the thread of pp_server_start() to finish. */
int pp_server_join(pp_server *srv);

/* Asks the server to shut down: gracefully, or at once if force is nonzero
 * (or a graceful stop is already under way and force is asked again).  Safe
 * from any thread and from a signal handler; returns at once. */
void pp_server_stop(pp_server *srv, int force);

/* A graceful stop with no drain_delay and no "drain" on the health socket:
 * for a server process that a new one replaces on the same listeners (a
 * rolling restart), where nothing outside is to be told that the service
 * is leaving.  Safe from any thread; returns at once. */
void pp_server_retire(pp_server *srv);

/* Nonzero when the calling thread is one of srv's worker threads, i.e. a
 * handler or hook of srv is calling: such a caller must never wait for the
 * server (it would wait for its own task).  Any thread. */
int pp_server_on_worker(const pp_server *srv);

/* Nonzero once the loop has returned. */
int pp_server_done(const pp_server *srv);

/* Nonzero if the last run ended by force or by the drain timeout. */
int pp_server_was_forced(const pp_server *srv);

/* Copies the counters.  Any thread. */
void pp_server_stats(const pp_server *srv, pp_stats *out);

/* The process's file descriptor limit after pp_server_new() raised the soft
 * RLIMIT_NOFILE towards the hard one (as Redis and nginx do at start). */
long pp_server_fd_limit(const pp_server *srv);

/* Frees the server once its loop has returned (or was never run: workers
 * started by pp_server_start_workers() are then stopped first).  Workers
 * still stuck in a handler after a forced stop are left to finish; the last of
 * them frees what they use.  Must not be called while the loop runs. */
void pp_server_free(pp_server *srv);

/* Installs SIGINT and SIGTERM handlers with sigaction that stop srv: the
 * first signal gracefully, the second at once.  Saves the previous handlers.
 * One server at a time; returns -EBUSY if another has them. */
int pp_signals_install(pp_server *srv);

/* Puts back the handlers pp_signals_install() saved. */
void pp_signals_restore(void);

/* Frames one whole reply and appends it; for batch handlers.  Same return as
 * pp_reply_write(). */
int pp_reply_send(pp_reply *reply, const void *data, size_t len);

/* Appends bytes that already hold nreplies whole framed replies (a batch
 * handler that frames its replies itself, e.g. to cross into C once per
 * batch).  Returns 0, or -1 with errno = ENOMEM. */
int pp_reply_send_framed(pp_reply *reply, const void *data, size_t len,
                         size_t nreplies);

/* A batch handler's pp_reply_defer(): the replies not yet sent for this
 * batch's messages before index next become the handle's; the messages from
 * next on (next <= n) are handed to the handler again after the finish.
 * Whole framed replies go in with pp_deferred_write_framed().  Returns NULL
 * with errno ENOMEM, or EINVAL when next is out of range. */
pp_deferred *pp_reply_defer_batch(pp_reply *reply, size_t next);

/* Appends len bytes holding nreplies whole framed replies to a deferred
 * reply with nothing open.  0, -ENOMEM, -EINVAL (a reply is open) or
 * -ENOTCONN. */
int pp_deferred_write_framed(pp_deferred *d, const void *data, size_t len,
                             size_t nreplies);

/* The handle's id: unique for the process, never 0 (see deferred_gone). */
uint64_t pp_deferred_id(const pp_deferred *d);

/* The connection a handle replies to. */
uint64_t pp_deferred_conn_id(const pp_deferred *d);

/* Writes the peer address of the reply's connection as numeric host and
 * port.  Returns 0 or -errno. */
int pp_reply_peer(const pp_reply *reply, char *host, size_t hostlen, int *port);
/* With proxy_protocol: the balancer's address (the socket's own peer), the
 * way pp_reply_peer() gives it; -ENOENT when the header named no client
 * (LOCAL, UNKNOWN) or the PROXY protocol is off. */
int pp_reply_proxy_peer(const pp_reply *reply, char *host, size_t hostlen, int *port);
/* A Unix-socket peer's credentials (SO_PEERCRED): 0, or -EAFNOSUPPORT for
 * a TCP peer, -errno. */
int pp_reply_peer_cred(const pp_reply *reply, int *pid, int *uid, int *gid);

/* ---- talking at any time --------------------------------------------------
 * Every function below may be called from any thread, inside a handler or
 * not, while the server runs (until pp_server_free()).  Data is copied and
 * framed like a reply: once per call, whatever the number of recipients,
 * which share the frame.  A connection's pushes arrive in the order they were
 * queued, each whole, after the replies its current task has produced.  The
 * I/O thread is woken at most once per loop round, however many pushes come. */

/* Queues data to connection id.  Returns 0; -ENOTCONN if it is gone, closing
 * or the server is draining; -ENOBUFS if push_limit refused it (dropped, or
 * the connection is being closed, per push_overflow); -EMSGSIZE (the framing
 * cannot carry len) or -ENOMEM. */
int pp_server_send(pp_server *srv, uint64_t id, const void *data, size_t len);

/* Queues data to every open connection; returns how many took it, or -errno
 * (EMSGSIZE, ENOMEM) before any did. */
long pp_server_broadcast(pp_server *srv, const void *data, size_t len);

/* Queues data to every connection subscribed to topic (tlen bytes, any
 * bytes); returns how many took it, or -errno. */
long pp_server_publish(pp_server *srv, const void *topic, size_t tlen,
                       const void *data, size_t len);

/* Subscribes connection id to topic (again: no effect); -ENOTCONN, -ENOMEM. */
int pp_server_subscribe(pp_server *srv, uint64_t id, const void *topic, size_t tlen);

/* Unsubscribes; not subscribed is no error; -ENOTCONN. */
int pp_server_unsubscribe(pp_server *srv, uint64_t id, const void *topic, size_t tlen);

/* Closes connection id once what was queued for it before is sent (replies
 * of a task in flight included).  0 or -ENOTCONN. */
int pp_server_close_conn(pp_server *srv, uint64_t id);

/* Bytes queued for connection id and not yet sent (pushes and replies, as
 * last seen by the owner of its output), or -ENOTCONN. */
long long pp_server_pending(pp_server *srv, uint64_t id);

/* The built-in echo handler: replies with the message itself. */
int pp_handler_echo(void *ctx, const unsigned char *msg, size_t len,
                    pp_reply *reply);

#ifdef __cplusplus
}
#endif

#endif /* PP_SERVER_H */
