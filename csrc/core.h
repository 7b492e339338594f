/*
 * core.h - the server's internal structures, shared by loop.c, pool.c,
 * reply.c, listen.c, signals.c and server.c.
 *
 * Ownership is the whole concurrency story.  A connection belongs to the I/O
 * thread, except while a task for it is in flight: then the worker holding the
 * task owns the connection's task buffer, its output buffer and the write side
 * of its fd, and the I/O thread touches none of them (nor closes the fd) until
 * the worker hands the connection back through the completion stack.  At most
 * one task per connection is in flight, which also keeps replies in order.
 */
#ifndef PP_CORE_H
#define PP_CORE_H

#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <sys/socket.h>

#include "backend.h"
#include "buffer.h"
#include "framing.h"
#include "list.h"
#include "outbox.h"
#include "pool.h"
#include "pp_server.h"

typedef struct pp_server pp_server;
struct epoll_event;

#define PP_SCRATCH 16384            /* bytes the I/O thread reads at once */

/* Connection flags, all owned by the I/O thread. */
enum {
    PP_C_IN_FLIGHT = 1 << 0,   /* a task for it is queued or running */
    PP_C_EOF = 1 << 1,         /* the peer shut its write side */
    PP_C_CLOSE = 1 << 2,       /* close once nothing is in flight and out is sent */
    PP_C_BROKEN = 1 << 3,      /* close as soon as nothing is in flight */
    PP_C_LINGER = 1 << 4,      /* our write side is shut; discarding input */
    PP_C_BAD_FRAME = 1 << 5,   /* input has a frame we refuse; read no more */
    PP_C_QUIET = 1 << 6,       /* draining: the last read found nothing new */
    PP_C_GOODBYE = 1 << 7,     /* draining: shutdown message queued */
    PP_C_OPENED = 1 << 9,      /* open event sent: a close event is owed */
    PP_C_RETIRING = 1 << 10,   /* close event in flight; freed when it is back */
    PP_C_DEFERRED = 1 << 11,   /* replies of its are in pp_dimpls (defer.c),
                                  queued on def_head: no task runs until the
                                  last of them is applied */
    PP_C_SETTLE = 1 << 12,     /* on take_deferred()'s list of connections */
    PP_C_PROXY_WAIT = 1 << 13, /* its PROXY header is still to come: nothing
                                  is framed, no event sent, until it is */
    PP_C_SPOKE = 1 << 14,      /* it has sent a whole message */
    PP_C_GRACE = 1 << 15,      /* draining: nothing new, but it has not
                                  spoken yet and drain_grace is running */
};

/* Push state of a connection, guarded by srv->push_mu. */
enum {
    PP_P_REG = 1 << 0,         /* in the registry: takes pushes */
    PP_P_CLOSE_REQ = 1 << 1,   /* close asked from outside: after what is queued */
    PP_P_OVERFLOW = 1 << 2,    /* passed push_limit with on_push_overflow=close */
    PP_P_NOMEM = 1 << 3,       /* (returned by pp__push_take only) pushes lost */
    PP_P_CLOSING = 1 << 4,     /* closing (any reason): no new pushes, for good */
};

typedef struct pp_topic pp_topic;

/* ---- deferred replies (defer.c) ---------------------------------------- */

/* What deferred handles share with their server and outlive it by: the lock
 * that decides a handle's fate, the finished list, a copy of the framing. */
typedef struct pp_hub {
    pthread_mutex_t mu;
    atomic_long refs;           /* the server's one, and one per handle */
    pp_server *srv;             /* mu; NULL once the server is freed */
    pp_link finished;           /* mu: handles finished, for the I/O thread */
    atomic_int has_finished;    /* finished is not empty */
    atomic_int notifying;       /* finishes waking the server after mu */
    pp_framing framing;
    /* Handles applied, kept for reuse with their buffers (each keeps its
     * hub reference): the I/O thread frees them, workers take them, so the
     * allocator's per-thread caches would not serve.  The I/O thread gathers
     * a round's in local, then moves them to pool in one lock; a worker
     * takes a batch into a cache of its own (defer.c). */
    pthread_mutex_t pool_mu;
    struct pp_dimpl *pool;      /* pool_mu */
    size_t npool;
    atomic_size_t npool_hint;   /* npool, read without the lock */
    struct pp_dimpl *local, *local_tail; /* I/O thread */
    size_t nlocal;
} pp_hub;

enum { PP_D_PENDING = 0, PP_D_FINISHED = 1, PP_D_GONE = 2 };

typedef struct pp_dimpl {
    pp_deferred pub;            /* first: the ABI's view */
    pp_hub *hub;
    struct pp_conn *conn;       /* valid while PENDING or FINISHED */
    uint64_t id, conn_id;
    atomic_int state;           /* PP_D_*; changed under hub->mu */
    int status;                 /* what finish was given */
    /* The writer's (one thread at a time), until finish. */
    pp_buf out;                 /* whole framed replies, then the open one */
    size_t mark;                /* where the open reply's body starts */
    int open, error;
    size_t nreplies;
    pp_buf keep;                /* the connection's task buffer, if the
                                   connection went first: the messages a
                                   batch handler deferred stay readable */
    struct pp_dimpl *kprev, *knext; /* hub->mu: the ring of gone handles of
                                   one task; keep moves to a neighbour when
                                   its holder is freed, so that it lives
                                   until the task's last finish */
    pp_link link;               /* on hub->finished */
    /* The connection's queue, oldest first (the worker's while in flight,
     * else the I/O thread's). */
    struct pp_dimpl *qnext;
    int ready;                  /* I/O thread: finished and taken */
    /* max_deferred > 1: the replies to the task's messages after this one,
     * made while it was pending (by the worker, before the task is back);
     * they join the output right after this handle's own. */
    pp_buf after;
    size_t after_n;
} pp_dimpl;

/* The socket's own peer, kept when a PROXY header replaced it. */
typedef struct pp_balancer {
    struct sockaddr_storage addr;
    socklen_t len;
} pp_balancer;

/* What a task carries besides messages. */
enum { PP_EV_NONE = 0, PP_EV_OPEN = 1, PP_EV_CLOSE = 2 };

typedef struct pp_conn {
    pp_task task_link;          /* first: the pool's queue link */
    /* I/O thread. */
    int fd;
    unsigned flags;
    pp_watch w;                 /* its place in the backend */
    pp_link all;                /* on srv->conns: every open connection */
    pp_link ready;              /* on srv->ready: waiting for queue room */
    pp_link timer;              /* on one of the timer lists, or none */
    pp_link *timer_list;        /* which one */
    int64_t timer_key;          /* ms: when it went there; the lists are
                                   sorted by it, oldest first */
    uint64_t id;
    struct sockaddr_storage peer;
    socklen_t peer_len;
    struct pp_balancer *proxy_peer; /* the balancer, when a PROXY header
                                   named the client (then in peer) */
    pp_buf in;                  /* read, not yet handed to a worker */
    size_t in_framed;           /* bytes at the start of in that are whole frames */
    size_t in_scanned;          /* framer hint for the partial frame after them */
    int64_t linger_deadline;    /* ms, CLOCK_MONOTONIC */
    int64_t last_active;        /* ms: last byte read, or became idle */
    int64_t out_since;          /* ms: pending output last moved (or began) */

    /* Owner of the task: the worker while in flight, else the I/O thread. */
    pp_buf task;                /* whole frames of the current task */
    pp_buf out;                 /* framed replies not yet sent */
    int event;                  /* PP_EV_*: a connection event to deliver first */
    int status;                 /* PP_KEEP, PP_CLOSE or < 0: outcome of the task */
    int send_error;             /* errno of a failed send(), 0 if none */

    pp_segq outq;               /* shared frames sent before out (outbox.h) */

    /* Completion stack link, written by the worker before it publishes. */
    struct pp_conn *next_done;

    /* Deferred replies, oldest first: queued by the worker that deferred
     * (with rest_off, where the messages it did not handle begin in task);
     * the I/O thread's after. */
    pp_dimpl *def_head, *def_tail;
    size_t ndef;
    size_t rest_off;
    struct pp_conn *settle_next; /* take_deferred()'s list (PP_C_SETTLE) */
    pp_link def_timer;          /* on srv->defer_list (reply_timeout) */
    int64_t def_since;          /* ms: when the task came back deferred */

    /* Guarded by srv->push_mu (push.c). */
    pp_segq outbox;             /* pushes not yet taken by the output's owner */
    unsigned push_flags;        /* PP_P_* */
    pp_link push_link;          /* on srv->push_ready */
    pp_link reg_link;           /* on srv->registry */
    pp_topic **topics;          /* subscriptions */
    size_t ntopics, cap_topics;
    /* The I/O thread's, while it walks what pp__push_take_ready() gave. */
    struct pp_conn *push_next;
    /* Any thread reads; set under push_mu, or by the output's owner. */
    atomic_int outbox_has;      /* outbox or requests waiting: take them */
    atomic_size_t push_queued;  /* push bytes queued and not yet sent */
    atomic_size_t out_pending;  /* output bytes as its owner last saw them */
} pp_conn;

static inline size_t pp__min_size(size_t a, size_t b)
{
    return a < b ? a : b;
}

/* Output not yet sent: the shared segments, then the open reply buffer.
 * Called by the owner of c's output. */
static inline size_t pp__conn_pending(const pp_conn *c)
{
    return c->outq.bytes + pp__buf_size(&c->out);
}

/* I/O-thread counters: one writer (the I/O thread). */
typedef struct pp_iostats {
    _Atomic uint64_t accepted, closed, bytes_in, bytes_out, oversize_frames;
    _Atomic uint64_t accept_errors, read_errors, write_errors, accept_paused;
    _Atomic uint64_t forced_closes, nomem_errors, rejected, idle_closes;
    _Atomic uint64_t send_timeouts, output_overflows;
    _Atomic uint64_t reply_timeouts, deferred_cancelled, handler_errors;
    _Atomic uint64_t proxy_errors;
    _Atomic uint64_t health_checks;
    _Atomic uint64_t deferred_retired; /* handles applied or dropped: with the
                                   workers' deferred_total, what is pending */
    _Atomic uint64_t replies;
} pp_iostats;

/* Push counters, written under push_mu. */
typedef struct pp_pushstats {
    _Atomic uint64_t pushes, push_bytes, push_drops, push_overflow_closes;
} pp_pushstats;

struct pp_server {
    pp_config cfg;
    pp_framing framing;
    unsigned char *shutdown_msg;
    unsigned char *reject_msg;  /* framed, ready to send */
    size_t reject_len;
    long fd_limit;
    int64_t now;                /* ms, read once per loop round */
    int64_t idle_ms, stall_ms;  /* idle_timeout, send_timeout; 0 = none */
    size_t in_limit;            /* stop reading a connection holding this much */
    unsigned char scratch[PP_SCRATCH]; /* the I/O thread's read buffer */

    int listen_fd[PP_MAX_LISTENERS];
    int nlisten;
    int wake_rd, wake_wr;       /* eventfd (same fd twice) or self-pipe */

    /* I/O thread. */
    const pp_backend *bk;
    pp_watch wake_w;
    pp_watch listen_w[PP_MAX_LISTENERS];
    pp_link fired;              /* watches the backend reported this round */
    /* poll backend */
    struct pollfd *pfds;
    pp_watch **watches;         /* parallel to pfds */
    size_t npfds, cap_pfds;
    /* epoll backend */
    int epfd;
    struct epoll_event *evs;
    int cap_evs;
    pp_link pending;            /* ready watches to report next round */

    pp_link conns;              /* every open connection */
    size_t nconns;
    uint64_t next_id;
    pp_link ready;              /* complete messages, waiting for queue room */
    /* Timer lists, each sorted by timer_key because a connection only ever
     * joins at the tail with the current time: checking the head is enough,
     * so timers cost O(1) per event and per expiry, never a scan. */
    pp_link idle_list;          /* idle_timeout applies */
    pp_link send_list;          /* output pending: send_timeout applies */
    pp_link linger_list;        /* closing, waiting for the peer */
    pp_link defer_list;         /* deferred, by def_since: reply_timeout */
    pp_link proxy_list;         /* waiting for a PROXY header: proxy_timeout */
    int64_t proxy_ms;
    pp_cidr *trusted;           /* cfg.trusted_proxies, copied */
    int64_t reply_ms;           /* reply_timeout; 0 = none */
    size_t ndeferred;           /* connections with PP_C_DEFERRED */
    size_t max_deferred;        /* cfg.max_deferred, at least 1 */
    int deferred_cut;           /* the drain's end cut deferred replies */
    int cutting;                /* cut_deferred() is at work */
    pp_task *batch_head, *batch_tail; /* tasks to push at the end of this round */
    size_t batch_n;
    int accept_paused;          /* listeners not polled: EMFILE or max_connections */
    int64_t accept_retry_at;    /* ms; when to try again after EMFILE, 0 = none */
    int draining;
    int64_t drain_deadline;     /* ms */
    int leaving;                /* a stop began; the drain begins at leave_until */
    int64_t leave_until;        /* ms */
    int64_t grace_until;        /* ms; drain_grace's end, 0 = over */
    int health_fd;              /* -1 = none */
    int64_t health_retry_at;    /* ms; after EMFILE on the health socket */
    pp_watch health_w;
    int forcing;
    int64_t force_deadline;     /* ms: how long to wait for tasks in flight */
    int64_t linger_check_at;    /* ms: next scan for expired lingering closes */
    pp_iostats stats;

    /* Shared between threads. */
    _Atomic(pp_conn *) done;    /* completion stack, pushed by workers */
    atomic_int io_armed;        /* the I/O thread may be asleep in poll() */
    atomic_int stop_level;      /* 0 running, 1 graceful, 2 force */
    atomic_int retiring;        /* pp_server_retire(): leave without telling */
    atomic_int finished;        /* loop returned */
    atomic_int forced;          /* last run ended by force or timeout */
    atomic_int running;         /* the loop was entered */
    atomic_int_fast64_t active; /* open connections */

    _Atomic uint64_t wakeups;   /* wake fd writes, from any thread */
    atomic_int push_pending;    /* push_ready is not empty */

    /* push.c: guarded by push_mu. */
    pthread_mutex_t push_mu;
    pp_link push_ready;         /* connections with pushes or requests to take */
    pp_link registry;           /* every connection that takes pushes */
    pp_conn **by_id;            /* open addressing, by id */
    size_t by_id_cap, by_id_n;
    pp_topic **topics;          /* open addressing, by name */
    size_t topics_cap, topics_n;
    int push_closed;            /* draining: pushes are refused */
    int push_mu_init;
    pp_pushstats push_stats;
    pp_services services;       /* what native handlers push through */
    pp_hub *hub;                /* deferred replies (defer.c) */

    pthread_t io_thread;
    int io_thread_started;

    pp_pool pool;
};

/* loop.c */
int pp__loop_run(pp_server *srv);
/* Called by a worker when it is done with c's task: hands c back. */
void pp__loop_complete(pp_server *srv, pp_conn *c);
/* Wakes the I/O thread; async-signal-safe. */
void pp__loop_wake(pp_server *srv);

/* Wakes the I/O thread if it may be asleep (pairs with its arming), else
 * nothing: producers of completions and pushes call it. */
void pp__loop_notify(pp_server *srv);

/* push.c */
/* Adds c to the registry (accept); -ENOMEM.  I/O thread. */
int pp__push_register(pp_server *srv, pp_conn *c);
/* Takes c out of the registry and its topics, dropping its outbox: pushes to
 * it fail from here on.  I/O thread; idempotent. */
void pp__push_unregister(pp_server *srv, pp_conn *c);
/* Fills srv->services (pollpool.h's pp_services). */
void pp__push_services_init(pp_server *srv);
/* Refuses every push to c from now on (it is closing); those queued before
 * still go out.  The owner of c's output. */
void pp__push_refuse(pp_server *srv, pp_conn *c);
/* Refuses every push from now on (the drain began).  I/O thread. */
void pp__push_close(pp_server *srv);
/* The connections with pushes or requests waiting, chained by push_next, or
 * NULL; one lock, and none when nothing waits.  I/O thread. */
pp_conn *pp__push_take_ready(pp_server *srv);
/* Moves c's outbox into its output, after what the output holds.  Returns the
 * requests waiting (PP_P_CLOSE_REQ, PP_P_OVERFLOW; PP_P_NOMEM if pushes were
 * lost), cleared when requests is nonzero.  The owner of c's output. */
unsigned pp__push_take(pp_server *srv, pp_conn *c, int requests);

/* loop.c: frees what a connection owns, and it (its fd is the caller's). */
void pp__conn_free(struct pp_conn *c);

/* defer.c */
/* Creates the hub; -ENOMEM.  After the framing is set up. */
int pp__hub_new(pp_server *srv);
/* The server lets go of its hub: every handle still attached to a
 * connection is settled first (pp__server_destroy). */
void pp__hub_release(pp_server *srv);
/* A new handle for c's current task (the worker that owns it). */
pp_dimpl *pp__deferred_new(pp_server *srv, struct pp_conn *c);
/* Frees a handle nobody else can reach. */
void pp__deferred_free(pp_dimpl *d);
/* The I/O thread is done with d (applied, or dropped after its finish):
 * kept for reuse.  pp__deferred_recycled() hands a round's to the workers. */
void pp__deferred_recycle(pp_server *srv, pp_dimpl *d);
void pp__deferred_recycled(pp_server *srv);
/* A worker thread's exit: its cache of handles is freed. */
void pp__deferred_thread_exit(void);
/* Takes the finished list (one lock, none when it is empty): chained by
 * link.next, NULL-terminated, in finish order.  I/O thread. */
pp_dimpl *pp__deferred_take(pp_server *srv);
/* c's connection is going before its queued handles were applied: decides
 * for each, under the lock, between a finish that already came (the handle
 * is freed) and one still to come (it will find the handle gone).  Writes
 * the ids of the gone ones to gone_ids (room for c->ndef, at most
 * PP_MAX_DEFERRED) for cfg.deferred_gone and returns their count.  c->task
 * moves into the gone handles, kept until the last of them is finished.
 * Empties c's queue.  I/O thread, or the destroyer. */
size_t pp__deferred_drop(pp_server *srv, struct pp_conn *c, uint64_t *gone_ids);

/* reply.c */
/* pp_services.defer: pollpool.h's pp_reply_defer(). */
pp_deferred *pp__reply_defer(pp_reply *r);
/* Runs the handler on every message of c's task; called by the worker that
 * owns the task. */
void pp__task_run(void *srv, pp_worker *w, pp_task *t);
/* Sends as much of c's output as the socket takes now.  Returns 0 (all sent
 * or EAGAIN) or -errno.  Called by the owner of c's output. */
int pp__conn_flush(pp_conn *c, uint64_t *sent);

/* listen.c */
int pp__listen(pp_server *srv);
/* Serves duplicates of n listening stream sockets instead. */
int pp__listen_fds(pp_server *srv, const int *fds, size_t n);
int pp__health_open(pp_server *srv, int fd);
void pp__listen_close(pp_server *srv);

/* server.c */
void pp__server_destroy(pp_server *srv);

int64_t pp__now_ms(void);

#endif
