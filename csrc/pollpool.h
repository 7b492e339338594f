/*
 * pollpool.h - the native handler ABI of pollpool.
 *
 * A native handler is a C function that pollpool's worker threads call once per
 * complete message.  A handler's shared library needs nothing from pollpool at
 * link time: every function below is static inline and goes through the fields
 * of struct pp_reply, which pollpool fills in.
 *
 * Build a handler with:
 *   cc -shared -fPIC -I"$(python -c 'import pollpool; print(pollpool.get_include())')" ...
 */
#ifndef POLLPOOL_H
#define POLLPOOL_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Bumped whenever struct pp_reply or the handler signature changes.  Version 2
 * appends pp_reply.services (pushes from any thread, deferred replies); a
 * library built for version 1 sees the same struct up to there and works
 * unchanged. */
#define POLLPOOL_ABI_VERSION 2
/* The oldest ABI version this header's server still loads. */
#define POLLPOOL_ABI_MIN 1

/* Handler return values.  Any value < 0 is an error: it is counted in the
 * server's stats and the connection is closed after the replies already
 * written for earlier messages are sent; what the failing call itself wrote
 * with pp_reply_write() is discarded, never sent. */
enum {
    PP_KEEP = 0,  /* keep the connection open */
    PP_CLOSE = 1, /* send this reply (if any), then close the connection */
    PP_DEFER = 2  /* ABI 2: the reply comes later, through pp_reply_defer() */
};

typedef struct pp_reply pp_reply;

/* ABI 2.  A reply that comes later (see pp_reply_defer()).  Only the first
 * member is public: use the inline functions below. */
typedef struct pp_deferred pp_deferred;
typedef struct pp_deferred_ops {
    int (*write)(pp_deferred *d, const void *data, size_t len);
    int (*finish)(pp_deferred *d, int status);
} pp_deferred_ops;
struct pp_deferred {
    const pp_deferred_ops *ops; /* static in pollpool: valid for the process */
};

/* What a native handler may do at any time, from any thread (ABI 2): the
 * server's push services.  Owned by pollpool; valid from the first call a
 * handler or hook gets until the server is freed, so a thread of yours that
 * pushes must be stopped before that (in Python: before Server.stop()
 * returns).  Every function copies data, frames it like a reply, and returns
 * without waiting for any socket; pushes from one thread to one connection
 * arrive in the order made.  Fill nothing in yourself: use the inline
 * functions below. */
typedef struct pp_services {
    int abi_version;        /* POLLPOOL_ABI_VERSION of the server, >= 2 */
    void *server;           /* private to pollpool */
    /* 0, or -ENOTCONN (gone, closing, server draining), -ENOBUFS (push_limit),
     * -EMSGSIZE, -ENOMEM */
    int (*send)(void *server, uint64_t conn_id, const void *data, size_t len);
    /* recipients queued, or -errno */
    long (*broadcast)(void *server, const void *data, size_t len);
    long (*publish)(void *server, const void *topic, size_t topic_len,
                    const void *data, size_t len);
    /* 0, -ENOTCONN or -ENOMEM */
    int (*subscribe)(void *server, uint64_t conn_id, const void *topic, size_t topic_len);
    int (*unsubscribe)(void *server, uint64_t conn_id, const void *topic, size_t topic_len);
    /* close once what is queued is sent: 0 or -ENOTCONN */
    int (*close)(void *server, uint64_t conn_id);
    /* takes the reply of the current call over (pp_reply_defer) */
    pp_deferred *(*defer)(pp_reply *reply);
    /* The connection's peer (pp_peer(), pp_proxy_peer(), pp_peer_cred());
     * inside a handler or the open hook only. */
    int (*peer)(const pp_reply *reply, char *host, size_t hostlen, int *port);
    int (*proxy_peer)(const pp_reply *reply, char *host, size_t hostlen, int *port);
    int (*peer_cred)(const pp_reply *reply, int *pid, int *uid, int *gid);
} pp_services;

/* The write side of the reply to one message.  Owned by pollpool and valid only
 * during the handler call that received it; never keep the pointer. */
struct pp_reply {
    /* Appends len bytes to the reply; 0 on success, -1 (errno = ENOMEM or
     * EMSGSIZE) on failure.  Filled in by pollpool. */
    int (*write)(pp_reply *reply, const void *data, size_t len);
    /* The connection's id: unique for the server's lifetime, never 0. */
    uint64_t conn_id;
    /* Private to pollpool. */
    void *impl;
    /* ABI 2: the server's push services (see pp_services). */
    const pp_services *services;
};

/* Appends len bytes to the reply of the current message; data is copied, so the
 * caller keeps ownership.  Several calls build one reply; framing (delimiter or
 * length prefix) is added once, after the handler returns.  Returns 0, or -1
 * with errno set (ENOMEM, or EMSGSIZE when the reply exceeds what the framing
 * can carry).  Call it only from the handler that received reply. */
static inline int pp_reply_write(pp_reply *reply, const void *data, size_t len)
{
    return reply->write(reply, data, len);
}

/* Returns the id of the connection the current message came from: unique for
 * the lifetime of the server, never 0.  Useful as a key for per-connection state. */
static inline uint64_t pp_reply_conn_id(const pp_reply *reply)
{
    return reply->conn_id;
}

/* ABI 2.  The server's services, to keep and use from any thread (see
 * pp_services for how long).  Call only with a reply of this call. */
static inline const pp_services *pp_reply_services(const pp_reply *reply)
{
    return reply->services;
}

/* Queues data, framed like a reply, to connection conn_id: 0 or -errno as in
 * pp_services.send.  Any thread. */
static inline int pp_push(const pp_services *s, uint64_t conn_id, const void *data,
                          size_t len)
{
    return s->send(s->server, conn_id, data, len);
}

/* Queues data to every open connection; returns how many took it. */
static inline long pp_broadcast(const pp_services *s, const void *data, size_t len)
{
    return s->broadcast(s->server, data, len);
}

/* Queues data to every connection subscribed to topic; returns how many. */
static inline long pp_publish(const pp_services *s, const void *topic, size_t topic_len,
                              const void *data, size_t len)
{
    return s->publish(s->server, topic, topic_len, data, len);
}

/* Subscribes or unsubscribes connection conn_id to or from topic. */
static inline int pp_subscribe(const pp_services *s, uint64_t conn_id, const void *topic,
                               size_t topic_len)
{
    return s->subscribe(s->server, conn_id, topic, topic_len);
}

static inline int pp_unsubscribe(const pp_services *s, uint64_t conn_id,
                                 const void *topic, size_t topic_len)
{
    return s->unsubscribe(s->server, conn_id, topic, topic_len);
}

/* Closes connection conn_id once what is queued for it is sent. */
static inline int pp_close_conn(const pp_services *s, uint64_t conn_id)
{
    return s->close(s->server, conn_id);
}

/* ---- who is at the other end (ABI 2) --------------------------------------
 * Inside a handler or the open hook.  pp_peer(): the client's numeric
 * address and port, the one a PROXY header named when the server takes
 * them (Server(proxy_protocol=True)); 0, or -EAFNOSUPPORT for a Unix-socket
 * client.  pp_proxy_peer(): the balancer that sent that header; -ENOENT
 * when there was none, or it named no client (a health check).
 * pp_peer_cred(): a Unix-socket client's pid, uid and gid (SO_PEERCRED);
 * -EAFNOSUPPORT for a TCP client.  hostlen of 46 holds any address. */
static inline int pp_peer(const pp_reply *reply, char *host, size_t hostlen, int *port)
{
    return reply->services->peer(reply, host, hostlen, port);
}

static inline int pp_proxy_peer(const pp_reply *reply, char *host, size_t hostlen, int *port)
{
    return reply->services->proxy_peer(reply, host, hostlen, port);
}

static inline int pp_peer_cred(const pp_reply *reply, int *pid, int *uid, int *gid)
{
    return reply->services->peer_cred(reply, pid, uid, gid);
}

/* ---- deferred replies (ABI 2) -------------------------------------------
 * A handler that must wait for something (another service, a timer, work on
 * a thread of yours) need not hold its worker thread: inside the call it
 * takes the reply over with pp_reply_defer(), returns PP_DEFER, and the
 * worker moves on to other connections.  Later, from any thread, it writes
 * the reply with pp_deferred_write() and ends it with pp_deferred_finish()
 * exactly once.  Meanwhile the connection's later messages wait (replies
 * stay in request order, as with Redis's blocked clients): the next handler
 * call for it comes after the finish.  A server with max_deferred = N > 1
 * calls the handler for the next messages of the same read meanwhile, up to
 * N replies pending at once; replies it makes at once are held behind the
 * pending ones, so they still leave in request order.  Pushes and close
 * requests work as ever.  The server's reply_timeout, if set, closes a
 * connection whose reply takes longer.  The handle is never the server's to free: finish it, even
 * after the connection or the server is gone (it then returns -ENOTCONN). */

/* Inside a handler (or the open hook): the reply to the current message
 * becomes the returned handle's, with anything pp_reply_write() already
 * wrote; return PP_DEFER (any other return is taken as PP_DEFER once the
 * reply is deferred).  Writing to reply after this fails with EINVAL.
 * Returns NULL with errno = ENOMEM (the handler may then reply at once). */
static inline pp_deferred *pp_reply_defer(pp_reply *reply)
{
    return reply->services->defer(reply);
}

/* Appends len bytes to the deferred reply; data is copied.  Any thread, one
 * at a time per handle.  Returns 0, -ENOMEM, -EMSGSIZE (more than the framing
 * can carry: the reply is void, finish will close the connection) or
 * -ENOTCONN (the connection is gone: stop working on it, then finish). */
static inline int pp_deferred_write(pp_deferred *d, const void *data, size_t len)
{
    return d->ops->write(d, data, len);
}

/* Ends the deferred reply and frees the handle, whatever it returns.  status
 * is what the handler would have returned: PP_KEEP sends the reply; PP_CLOSE
 * sends it, then closes; < 0 is an error: the reply is discarded, counted in
 * handler_errors, and the connection closed after the replies before it.
 * Returns 0 once the reply is queued, or -ENOTCONN if the connection (or the
 * server) is gone.  Any thread; never blocks on a socket. */
static inline int pp_deferred_finish(pp_deferred *d, int status)
{
    return d->ops->finish(d, status);
}

/* A native handler.  ctx is the pointer given when the handler was registered;
 * msg/len is one message without its framing, valid only during the call.
 * Handlers run concurrently on several worker threads and must be thread-safe;
 * calls for one connection never overlap and come in the connection's order.
 * Returns PP_KEEP, PP_CLOSE, PP_DEFER (after pp_reply_defer()), or a negative
 * value on error.  Writing no reply and returning PP_KEEP sends nothing for
 * that message. */
typedef int (*pp_handler_fn)(void *ctx, const unsigned char *msg, size_t len,
                             pp_reply *reply);

/* Optional per-connection hooks, run on worker threads in the connection's
 * order: open once before its first message, close once after its last
 * (also when the server shuts down).  open may write a greeting with
 * pp_reply_write() and returns PP_KEEP, PP_CLOSE, or < 0 to refuse the
 * connection (close still follows).  close gets only the connection's id: by
 * then the peer may be gone, so it cannot reply.  For a handler loaded with
 * NativeHandler.from_library(path, "name"), pollpool looks for these as
 * "name_open" and "name_close". */
typedef int (*pp_open_fn)(void *ctx, pp_reply *reply);
typedef void (*pp_close_fn)(void *ctx, uint64_t conn_id);

/* Put POLLPOOL_EXPORT_ABI_VERSION; at file scope in a handler library: pollpool
 * then refuses to load it if it was built against another ABI version. */
#if defined(__GNUC__)
#define POLLPOOL_EXPORT __attribute__((visibility("default")))
#else
#define POLLPOOL_EXPORT
#endif
#define POLLPOOL_EXPORT_ABI_VERSION \
    POLLPOOL_EXPORT const int pollpool_abi_version = POLLPOOL_ABI_VERSION

#ifdef __cplusplus
}
#endif

#endif /* POLLPOOL_H */
