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

/* Bumped whenever struct pp_reply or the handler signature changes. */
#define POLLPOOL_ABI_VERSION 1

/* Handler return values.  Any value < 0 is an error: it is counted in the
 * server's stats and the connection is closed after the replies already
 * written for earlier messages are sent; what the failing call itself wrote
 * with pp_reply_write() is discarded, never sent. */
enum {
    PP_KEEP = 0,  /* keep the connection open */
    PP_CLOSE = 1  /* send this reply (if any), then close the connection */
};

typedef struct pp_reply pp_reply;

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

/* A native handler.  ctx is the pointer given when the handler was registered;
 * msg/len is one message without its framing, valid only during the call.
 * Handlers run concurrently on several worker threads and must be thread-safe;
 * calls for one connection never overlap and come in the connection's order.
 * Returns PP_KEEP, PP_CLOSE, or a negative value on error.  Writing no reply
 * and returning PP_KEEP sends nothing for that message. */
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
