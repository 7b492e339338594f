/*
 * loop.c - the I/O thread.
 *
 * One thread owns the listening sockets, every connection's input side and
 * the readiness backend (poll or epoll, backend.h).  It reads, cuts frames, hands whole frames to the pool as
 * one task per connection, flushes output the workers could not send, and
 * closes connections.  It never runs a handler and never blocks outside
 * poll().  Workers hand connections back through a lock-free completion
 * stack; the I/O thread is woken through one fd, and only when it may really
 * be asleep, so a busy loop costs no wake-up syscalls at all.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <time.h>
#ifdef __linux__
#include <linux/sockios.h>
#endif
#include <unistd.h>

#include "core.h"
#include "proxy.h"

#define PP_READ_CHUNK PP_SCRATCH     /* bytes one recv() asks for */
#define PP_DIRECT_ROOM 2048         /* room that takes a read in place */
#define PP_KEEP_BUF (64 * 1024)     /* buffers above this are freed when empty */
#define PP_LINGER_MS 2000           /* how long a closing peer may keep sending */
#define PP_LINGER_POLL_MS 10        /* how often lingering closes are looked at */
#define PP_ACCEPT_RETRY_MS 100      /* pause after EMFILE/ENFILE/ENOMEM */
#define PP_ACCEPTS_PER_ROUND 64     /* per listener, as HAProxy's maxaccept */
#define PP_FORCE_GRACE_MS 200       /* tasks in flight get this long after force */

#define PP_CONN_OF(link, member) PP_CONTAINER(link, pp_conn, member)

int64_t pp__now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* ---- wake-ups ----------------------------------------------------------- */

void pp__loop_wake(pp_server *srv)
{
    /* write() is async-signal-safe; EAGAIN means a wake-up is already pending. */
#ifdef __linux__
    uint64_t one = 1;
    ssize_t rc;
    atomic_fetch_add_explicit(&srv->wakeups, 1, memory_order_relaxed);
    do
        rc = write(srv->wake_wr, &one, sizeof one);
    while (rc < 0 && errno == EINTR);
#else
    char one = 1;
    ssize_t rc;
    atomic_fetch_add_explicit(&srv->wakeups, 1, memory_order_relaxed);
    do
        rc = write(srv->wake_wr, &one, 1);
    while (rc < 0 && errno == EINTR);
#endif
}

static void drain_wake_fd(pp_server *srv)
{
#ifdef __linux__
    /* One read resets an eventfd's whole count. */
    uint64_t count;
    while (read(srv->wake_rd, &count, sizeof count) < 0 && errno == EINTR)
        ;
#else
    unsigned char junk[64];
    while (read(srv->wake_rd, junk, sizeof junk) > 0 || errno == EINTR)
        ;
#endif
}

void pp__loop_complete(pp_server *srv, pp_conn *c)
{
    pp_conn *head = atomic_load_explicit(&srv->done, memory_order_relaxed);
    do
        c->next_done = head;
    while (!atomic_compare_exchange_weak(&srv->done, &head, c));
    /* Only the first completion after the I/O thread armed itself writes to
     * the wake fd: completions that find it awake, or already woken, cost
     * nothing beyond the push above (the load comes before the exchange).
     * Pairs with the store/load in pp__loop_run, all seq_cst: either the
     * I/O thread's load sees this completion, or this load sees the arming,
     * or it sees 0 written by another worker's exchange, which took the
     * arming and wrote the fd. */
    pp__loop_notify(srv);
}

void pp__loop_notify(pp_server *srv)
{
    if (atomic_load(&srv->io_armed) && atomic_exchange(&srv->io_armed, 0))
        pp__loop_wake(srv);
}

/* ---- tasks -------------------------------------------------------------- */

static void batch_add(pp_server *srv, pp_conn *c, int event)
{
    c->event = event;
    c->status = PP_KEEP;
    c->send_error = 0;
    c->flags |= PP_C_IN_FLIGHT;
    c->task_link.next = NULL;
    if (srv->batch_tail)
        srv->batch_tail->next = &c->task_link;
    else
        srv->batch_head = &c->task_link;
    srv->batch_tail = &c->task_link;
    srv->batch_n++;
}

static int has_events(const pp_server *srv)
{
    return srv->cfg.on_open != NULL || srv->cfg.on_close != NULL;
}

/* ---- timer lists -------------------------------------------------------- */

/* Puts c on the timer list its state calls for.  A connection joins a list
 * at the tail, stamped with the current time, and moves to the tail again
 * when its clock restarts (bytes read, output moved), so every list stays
 * sorted and expiry looks at its head only. */
static void conn_timers(pp_server *srv, pp_conn *c)
{
    pp_link *list = NULL;
    int64_t *since = NULL;
    if (c->flags & (PP_C_IN_FLIGHT | PP_C_RETIRING | PP_C_BROKEN)) {
        list = NULL;
    } else if (c->flags & PP_C_PROXY_WAIT) {
        list = &srv->proxy_list; /* from the accept, whatever comes */
    } else if (c->flags & PP_C_LINGER) {
        list = &srv->linger_list;
    } else if (pp__conn_pending(c) > 0) {
        if (srv->stall_ms > 0) {
            list = &srv->send_list;
            since = &c->out_since;
        }
    } else if (srv->idle_ms > 0 && c->in_framed == 0 &&
               !(c->flags & (PP_C_CLOSE | PP_C_DEFERRED))) {
        /* A connection waiting for its deferred reply is not idle:
         * reply_timeout is its clock. */
        list = &srv->idle_list;
        since = &c->last_active;
    }
    if (list == NULL) {
        pp__list_unlink(&c->timer);
        c->timer_list = NULL;
        return;
    }
    if (list != c->timer_list) {
        /* A clock starts when its state begins: idle counts from when the
         * connection had nothing left to do, a stall from when output began
         * to wait. */
        if (since)
            *since = srv->now;
        c->timer_list = list;
        c->timer_key = srv->now;
        pp__list_move_tail(list, &c->timer);
    } else if (since && *since != c->timer_key) {
        c->timer_key = *since;
        pp__list_move_tail(list, &c->timer);
    }
}

/* ---- PROXY protocol ----------------------------------------------------- */

static int cidr_match(const pp_cidr *n, const unsigned char *addr, int family)
{
    if (n->family != family)
        return 0;
    int bits = n->prefix, i = 0;
    for (; bits >= 8; bits -= 8, i++)
        if (addr[i] != n->addr[i])
            return 0;
    if (bits == 0)
        return 1;
    unsigned char mask = (unsigned char)(0xFF << (8 - bits));
    return (addr[i] & mask) == (n->addr[i] & mask);
}

/* A peer from one of the trusted networks; an IPv4-mapped IPv6 peer (a
 * dual-stack listener's IPv4 client) matches the IPv4 ones. */
static int proxy_trusted(const pp_server *srv, const struct sockaddr_storage *ss, socklen_t sl)
{
    const unsigned char *addr;
    int family;
    if (ss->ss_family == AF_INET && sl >= (socklen_t)sizeof(struct sockaddr_in)) {
        addr = (const unsigned char *)&((const struct sockaddr_in *)ss)->sin_addr;
        family = AF_INET;
    } else if (ss->ss_family == AF_INET6 && sl >= (socklen_t)sizeof(struct sockaddr_in6)) {
        const struct in6_addr *a6 = &((const struct sockaddr_in6 *)ss)->sin6_addr;
        addr = (const unsigned char *)a6;
        family = AF_INET6;
        if (IN6_IS_ADDR_V4MAPPED(a6)) {
            addr += 12;
            family = AF_INET;
        }
    } else {
        return 0;
    }
    for (size_t i = 0; i < srv->cfg.ntrusted_proxies; i++)
        if (cidr_match(&srv->trusted[i], addr, family))
            return 1;
    return 0;
}

/* c waits for its PROXY header: once it is whole, the client it names is
 * c's peer (the balancer's address is kept), the bytes after it are the
 * stream's first, and the open event goes.  A bad one cuts c, counted. */
static void conn_proxy(pp_server *srv, pp_conn *c)
{
    pp_proxy_info info;
    const unsigned char *p = pp__buf_begin(&c->in);
    size_t len = pp__buf_size(&c->in);
    long n = pp__proxy_parse(p, len, &info);
    if (n == 0 && !(c->flags & PP_C_EOF))
        return; /* not yet */
    /* Not a header, a partial one and EOF, or a second header after it. */
    if (n <= 0 || pp__proxy_signature(p + n, len - (size_t)n)) {
        pp__stat_add(&srv->stats.proxy_errors, 1);
        c->flags |= PP_C_BROKEN;
        return;
    }
    if (!info.local) {
        pp_balancer *bal = malloc(sizeof *bal);
        if (bal == NULL) {
            pp__stat_add(&srv->stats.nomem_errors, 1);
            c->flags |= PP_C_BROKEN;
            return;
        }
        memcpy(&bal->addr, &c->peer, sizeof bal->addr);
        bal->len = c->peer_len;
        c->proxy_peer = bal;
        memcpy(&c->peer, &info.src, info.src_len);
        c->peer_len = info.src_len;
    }
    pp__buf_consume(&c->in, (size_t)n);
    c->flags &= ~PP_C_PROXY_WAIT;
    pp__list_unlink(&c->timer);
    c->timer_list = NULL;
    if (has_events(srv)) {
        /* What came after the header waits in c->in for the event. */
        c->flags |= PP_C_OPENED;
        batch_add(srv, c, PP_EV_OPEN);
    }
}

/* ---- accepting ---------------------------------------------------------- */

static void listeners_want(pp_server *srv, short want)
{
    for (int i = 0; i < srv->nlisten; i++)
        srv->bk->set(srv, &srv->listen_w[i], want);
}

/* The service's listeners and the health socket, as the drain begins. */
static void listeners_close(pp_server *srv)
{
    for (int i = 0; i < srv->nlisten; i++)
        if (srv->listen_fd[i] >= 0)
            srv->bk->del(srv, &srv->listen_w[i]);
    if (srv->health_fd >= 0)
        srv->bk->del(srv, &srv->health_w);
    srv->health_retry_at = 0;
    pp__listen_close(srv);
}

/* What a failed accept4() on a listener means. */
enum { PP_ACC_AGAIN, PP_ACC_DRAINED, PP_ACC_PAUSE, PP_ACC_SKIP };

static int accept_failed(pp_server *srv, int err)
{
    switch (err) {
    case EINTR:
    case ECONNABORTED:
    case EPROTO:
        return PP_ACC_AGAIN; /* this one, or the next waiting connection */
    case EAGAIN:
#if EAGAIN != EWOULDBLOCK
    case EWOULDBLOCK:
#endif
        return PP_ACC_DRAINED;
    case EMFILE:
    case ENFILE:
    case ENOBUFS:
    case ENOMEM:
        /* The pending connection stays in the backlog and the listener
         * stays readable: polling it now would spin. */
        pp__stat_add(&srv->stats.accept_errors, 1);
        return PP_ACC_PAUSE;
    default:
        pp__stat_add(&srv->stats.accept_errors, 1);
        return PP_ACC_SKIP;
    }
}

/* Health checks: each connection hears one line and is closed, never read.
 * "up ready" while serving (HAProxy's agent-check: up, and out of any drain
 * state an earlier instance left), "drain" once a stop began (its weight
 * goes to 0: no new connections, the open ones stay).  Not held back by
 * max_connections: a full server is still a live one. */
static void health_accept(pp_server *srv, pp_watch *w)
{
    for (int taken = 0; taken < PP_ACCEPTS_PER_ROUND; taken++) {
        int fd = accept4(w->fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) {
            switch (accept_failed(srv, errno)) {
            case PP_ACC_AGAIN:
                continue;
            case PP_ACC_DRAINED:
                pp__watch_drained(w, POLLIN);
                return;
            case PP_ACC_PAUSE: /* retried in a while, as do_accept does */
                w->want = 0;
                srv->health_retry_at = pp__now_ms() + PP_ACCEPT_RETRY_MS;
                return;
            default:
                return;
            }
        }
        static const char up[] = "up ready\n", drain[] = "drain\n";
        const char *msg = srv->leaving ? drain : up;
        size_t len = srv->leaving ? sizeof drain - 1 : sizeof up - 1;
        /* Best effort: a fresh socket's buffer takes a line whole, and a
         * checker that is gone has nothing to hear. */
        ssize_t n = send(fd, msg, len, MSG_NOSIGNAL | MSG_DONTWAIT);
        (void)n;
        pp__stat_add(&srv->stats.health_checks, 1);
        close(fd);
    }
}

static void accept_pause(pp_server *srv, int64_t retry_at)
{
    if (!srv->accept_paused)
        pp__stat_add(&srv->stats.accept_paused, 1);
    srv->accept_paused = 1;
    srv->accept_retry_at = retry_at;
    listeners_want(srv, 0);
}

static void accept_resume(pp_server *srv)
{
    if (!srv->accept_paused || srv->draining)
        return;
    srv->accept_paused = 0;
    srv->accept_retry_at = 0;
    listeners_want(srv, POLLIN);
}

/* Turns one waiting connection away with the framed rejection message.
 * Returns 0, or -1 when there is none to take (the listener is then drained)
 * or accepting failed (then accepting pauses, as in do_accept). */
static int reject_one(pp_server *srv, pp_watch *lw)
{
    int fd;
    do
        fd = accept4(lw->fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
    while (fd < 0 && errno == EINTR);
    if (fd < 0) {
        if (errno == EAGAIN || errno == EWOULDBLOCK) {
            pp__watch_drained(lw, POLLIN);
        } else if (errno == EMFILE || errno == ENFILE || errno == ENOBUFS ||
                   errno == ENOMEM) {
            pp__stat_add(&srv->stats.accept_errors, 1);
            accept_pause(srv, pp__now_ms() + PP_ACCEPT_RETRY_MS);
        }
        return -1;
    }
    /* Counted first: the client may read the stats as soon as it sees EOF. */
    pp__stat_add(&srv->stats.rejected, 1);
    /* Best effort: a fresh socket's buffer takes a short message whole. */
    ssize_t n = send(fd, srv->reject_msg, srv->reject_len, MSG_NOSIGNAL | MSG_DONTWAIT);
    (void)n;
    shutdown(fd, SHUT_WR);
    close(fd);
    return 0;
}

static void do_accept(pp_server *srv, pp_watch *lw)
{
    int lfd = lw->fd;
    /* A bounded number per round, taken or refused: clients that connect as
     * fast as the loop accepts must not keep it from serving the ones it
     * has.  The listener is not marked drained, so the next round comes
     * back for the rest at once. */
    for (int taken = 0; taken < PP_ACCEPTS_PER_ROUND; taken++) {
        size_t max = srv->cfg.max_connections;
        if (max && srv->nconns >= max) {
            /* Either say no to each newcomer, or stop accepting until a
             * connection closes and let the backlog hold the rest. */
            if (srv->reject_msg && reject_one(srv, lw) == 0)
                continue;
            if (!srv->reject_msg)
                accept_pause(srv, 0);
            return;
        }
        pp_conn *c = NULL;
        struct sockaddr_storage ss;
        socklen_t sl = sizeof ss;
        int fd = accept4(lfd, (struct sockaddr *)&ss, &sl,
                         SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) {
            switch (accept_failed(srv, errno)) {
            case PP_ACC_AGAIN:
                continue;
            case PP_ACC_DRAINED:
                pp__watch_drained(lw, POLLIN);
                return;
            case PP_ACC_PAUSE:
                accept_pause(srv, pp__now_ms() + PP_ACCEPT_RETRY_MS);
                return;
            default:
                return;
            }
        }
        if (srv->cfg.proxy_protocol &&
            !(ss.ss_family == AF_UNIX ? srv->cfg.proxy_trust_unix : proxy_trusted(srv, &ss, sl))) {
            /* Only a trusted balancer may name the client. */
            pp__stat_add(&srv->stats.proxy_errors, 1);
            close(fd);
            continue;
        }
        int one = 1;
        if (ss.ss_family != AF_UNIX)
            setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        c = calloc(1, sizeof *c);
        if (c != NULL) {
            c->fd = c->w.fd = fd;
            c->w.kind = PP_W_CONN;
            /* The open event, if any, goes first: nothing is read before
             * (but the PROXY header, which says who the peer is). */
            c->w.want = has_events(srv) && !srv->cfg.proxy_protocol ? 0 : POLLIN;
        }
        if (c == NULL || srv->bk->add(srv, &c->w) < 0) {
            /* ENOMEM, or epoll's ENOSPC (max_user_watches). */
            free(c);
            close(fd);
            pp__stat_add(&srv->stats.nomem_errors, 1);
            accept_pause(srv, pp__now_ms() + PP_ACCEPT_RETRY_MS);
            return;
        }
        c->id = ++srv->next_id;
        if (pp__push_register(srv, c) < 0) {
            srv->bk->del(srv, &c->w);
            free(c);
            close(fd);
            pp__stat_add(&srv->stats.nomem_errors, 1);
            accept_pause(srv, pp__now_ms() + PP_ACCEPT_RETRY_MS);
            return;
        }
        pp__list_append(&srv->conns, &c->all);
        c->last_active = srv->now;
        /* accept() reports the address's real length, which may be more
         * than it stored: copy no more than ss holds. */
        if (sl > sizeof ss)
            sl = sizeof ss;
        memcpy(&c->peer, &ss, sl);
        c->peer_len = sl;
        srv->nconns++;
        atomic_fetch_add(&srv->active, 1);
        pp__stat_add(&srv->stats.accepted, 1);
        if (srv->cfg.proxy_protocol) {
            c->flags |= PP_C_PROXY_WAIT; /* the open event follows the header */
            conn_timers(srv, c);
        } else if (has_events(srv)) {
            /* The open event is the connection's first task: its messages
             * are read only once it is back, so they cannot overtake it.
             * Event tasks bypass queue_size: there is one per connection. */
            c->flags |= PP_C_OPENED;
            batch_add(srv, c, PP_EV_OPEN);
        } else {
            conn_timers(srv, c);
        }
    }
}

/* ---- connection state --------------------------------------------------- */

static int conn_can_read(const pp_server *srv, const pp_conn *c)
{
    if (c->flags & PP_C_LINGER)
        return 1;
    /* Closing once its deferred replies are in: read on meanwhile (what
     * comes is dropped with the rest), so that a reset is seen and the
     * handles learn it now, not at their finish. */
    if ((c->flags & (PP_C_DEFERRED | PP_C_CLOSE | PP_C_IN_FLIGHT | PP_C_EOF |
                     PP_C_BROKEN | PP_C_BAD_FRAME)) == (PP_C_DEFERRED | PP_C_CLOSE))
        return pp__conn_pending(c) <= srv->cfg.output_high_water &&
               pp__buf_size(&c->in) < srv->in_limit;
    if (c->flags & (PP_C_EOF | PP_C_CLOSE | PP_C_BROKEN | PP_C_BAD_FRAME))
        return 0;
    /* Output piling up behind a peer that does not read stops its input; the
     * output size is ours to look at only while no task is in flight. */
    /* While a task is in flight the socket is left out of poll(): every
     * fd in the array costs poll() a lookup and a wait-queue entry on each
     * call, and what arrives meanwhile waits in the kernel just as well.
     * Measured: 13% less server CPU per request at pipeline 16. */
    if (c->flags & PP_C_IN_FLIGHT)
        return 0;
    /* Output piling up behind a peer that does not read stops its input. */
    if (pp__conn_pending(c) > srv->cfg.output_high_water)
        return 0;
    return pp__buf_size(&c->in) < srv->in_limit;
}

/* Tells the backend what c waits for now, and puts it on its timer list. */
static void conn_update(pp_server *srv, pp_conn *c)
{
    short ev = 0;
    if (conn_can_read(srv, c))
        ev |= POLLIN;
    if (!(c->flags & PP_C_IN_FLIGHT) && pp__conn_pending(c) > 0)
        ev |= POLLOUT;
    /* Wanting nothing also hides POLLHUP/POLLERR: reported while a task is
     * in flight, they would make the loop spin.  Called even when nothing
     * changed: an edge-triggered backend then reports c again next round if
     * it still has readiness the loop did not use up. */
    srv->bk->set(srv, &c->w, ev);
    conn_timers(srv, c);
}

void pp__conn_free(pp_conn *c)
{
    free(c->proxy_peer);
    pp__segq_free(&c->outq);
    pp__buf_free(&c->in);
    pp__buf_free(&c->task);
    pp__buf_free(&c->out);
    free(c);
}

/* c goes before its deferred replies were applied: each handle learns it
 * (or, finished already, is freed), and whoever works on it is told. */
static void deferred_drop(pp_server *srv, pp_conn *c)
{
    c->flags &= ~PP_C_DEFERRED;
    pp__list_unlink(&c->def_timer);
    srv->ndeferred--;
    uint64_t ids[PP_MAX_DEFERRED];
    size_t n = pp__deferred_drop(srv, c, ids);
    if (srv->cutting)
        pp__stat_add(&srv->stats.deferred_cancelled, n); /* not those finished already */
    for (size_t i = 0; i < n && srv->cfg.deferred_gone; i++)
        srv->cfg.deferred_gone(srv->cfg.ctx, ids[i]);
}

/* Closes c now.  Only while no task is in flight: a worker may still be
 * sending on the fd, and a closed fd number can be reused by the next
 * accept() at once. */
static void conn_close(pp_server *srv, pp_conn *c)
{
    if (c->flags & PP_C_IN_FLIGHT)
        abort();
    if (c->flags & PP_C_DEFERRED)
        deferred_drop(srv, c);
    /* No push reaches it from here on, and what was queued is moot. */
    pp__push_unregister(srv, c);
    pp__list_unlink(&c->ready);
    c->flags &= ~PP_C_LINGER;
    if ((c->flags & PP_C_OPENED) && srv->cfg.on_close) {
        /* The close event goes to a worker like any task, so it comes after
         * the last message's handler.  The peer is cut now; the fd stays
         * ours (no reuse) until the event is back. */
        c->flags = (c->flags & ~PP_C_OPENED) | PP_C_RETIRING;
        shutdown(c->fd, SHUT_RDWR);
        batch_add(srv, c, PP_EV_CLOSE);
        conn_update(srv, c);
        return;
    }
    srv->bk->del(srv, &c->w);
    pp__list_unlink(&c->all);
    pp__list_unlink(&c->timer);
    close(c->fd);
    pp__conn_free(c);
    srv->nconns--;
    atomic_fetch_sub(&srv->active, 1);
    pp__stat_add(&srv->stats.closed, 1);
    if (srv->accept_paused && srv->accept_retry_at == 0)
        accept_resume(srv);
}

/* Nonzero once the peer has acknowledged everything we sent, FIN included:
 * from then on an RST (our close with the peer still sending) can no longer
 * take replies away from it. */
static int conn_all_acked(const pp_conn *c)
{
#ifdef SIOCOUTQ
    int unacked = 0;
    if (ioctl(c->fd, SIOCOUTQ, &unacked) == 0)
        return unacked == 0;
#else
    (void)c;
#endif
    return 0; /* unknown: wait for the peer's EOF or the deadline */
}

static void conn_read(pp_server *srv, pp_conn *c);
static void conn_set_closing(pp_server *srv, pp_conn *c);

/* Shuts our write side, then closes once the peer has everything or closes
 * too.  Closing at once with the peer still sending would answer with RST,
 * and an RST may destroy replies the peer has not received yet. */
static void conn_linger(pp_server *srv, pp_conn *c)
{
    /* Our FIN goes now: nothing may be queued after it. */
    pp__push_unregister(srv, c);
    if (shutdown(c->fd, SHUT_WR) < 0) {
        conn_close(srv, c);
        return;
    }
    c->flags |= PP_C_LINGER;
    pp__buf_reset(&c->in, 0);
    c->in_framed = c->in_scanned = 0;
    conn_read(srv, c);
    if ((c->flags & PP_C_BROKEN) || conn_all_acked(c)) {
        conn_close(srv, c);
        return;
    }
    int64_t now = srv->now;
    /* The drain deadline, if sooner, is enforced by the drain itself. */
    c->linger_deadline = now + PP_LINGER_MS;
    if (srv->linger_check_at == 0 || now + PP_LINGER_POLL_MS < srv->linger_check_at)
        srv->linger_check_at = now + PP_LINGER_POLL_MS;
    conn_update(srv, c);
}

/* c has sent a whole message: what it sends from now on is read until
 * quiet, as for every connection (a drain_grace wait noted by the read
 * that just ended, before this frame was found, is over). */
static inline void conn_spoke(pp_conn *c)
{
    c->flags = (c->flags | PP_C_SPOKE) & ~(unsigned)PP_C_GRACE;
}

/* Finds the whole frames after those already found. */
static void conn_scan(pp_server *srv, pp_conn *c)
{
    const unsigned char *p = pp__buf_begin(&c->in);
    size_t len = pp__buf_size(&c->in);
    /* The worker cuts the messages anyway; here it is enough to know where
     * the last whole frame ends, which one backward search tells. */
    long whole = pp__frame_whole_prefix(&srv->framing, p + c->in_framed,
                                        len - c->in_framed, &c->in_scanned);
    if (whole >= 0) {
        c->in_framed += (size_t)whole;
        if (whole > 0)
            conn_spoke(c);
        return;
    }
    while (c->in_framed < len) {
        pp_frame fr;
        int rc = pp__frame_next(&srv->framing, p + c->in_framed,
                                len - c->in_framed, &c->in_scanned, &fr);
        if (rc == 1) {
            c->in_framed += fr.frame_len;
            conn_spoke(c);
            continue;
        }
        if (rc < 0) {
            /* Frames before the bad one are still answered; then we close. */
            pp__stat_add(&srv->stats.oversize_frames, 1);
            c->flags |= PP_C_BAD_FRAME;
        }
        break;
    }
}

/* Reads what the socket has, up to the input limit. */
static void conn_read(pp_server *srv, pp_conn *c)
{
    if (c->flags & PP_C_LINGER) {
        unsigned char junk[PP_READ_CHUNK];
        /* Bounded, so a peer that floods a closing connection cannot hold
         * the loop; poll() reports the rest next round. */
        for (int round = 0; round < 16; round++) {
            ssize_t n = recv(c->fd, junk, sizeof junk, 0);
            if (n > 0)
                continue;
            if (n < 0 && errno == EINTR)
                continue;
            if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
                pp__watch_drained(&c->w, POLLIN | PP_POLL_URGENT);
                return;
            }
            c->flags |= PP_C_BROKEN; /* EOF or error: done lingering */
            return;
        }
        return;
    }
    while (conn_can_read(srv, c)) {
        /* A connection whose buffer has room gets the bytes in place (no
         * copy).  Others read into the loop's scratch and keep only what
         * came, so a connection with small messages holds buffers the size
         * of its messages, not of a read: 10,000 idle connections cost
         * ~1 KiB each, not ~9. */
        unsigned char *dst = srv->scratch;
        size_t room = sizeof srv->scratch;
        int direct = c->in.cap - c->in.len >= PP_DIRECT_ROOM;
        if (direct) {
            dst = c->in.data + c->in.len;
            room = c->in.cap - c->in.len;
        }
        ssize_t n = recv(c->fd, dst, room, 0);
        if (n > 0) {
            if (direct) {
                c->in.len += (size_t)n;
            } else if (pp__buf_append(&c->in, dst, (size_t)n) < 0) {
                pp__stat_add(&srv->stats.nomem_errors, 1);
                c->flags |= PP_C_BROKEN;
                return;
            }
            /* A read of more than a few small messages says the peer is
             * busy, and will send as much again: room for it now lets the
             * next read land in place.  Only worth it, and only memory
             * spent, for such connections.  Without the room, reads go on
             * through the scratch buffer. */
            if (!direct && (size_t)n >= PP_DIRECT_ROOM / 4)
                (void)pp__buf_reserve(&c->in, PP_DIRECT_ROOM);
            c->last_active = srv->now;
            c->flags &= ~(PP_C_QUIET | PP_C_GRACE);
            pp__stat_add(&srv->stats.bytes_in, (uint64_t)n);
            /* A short read means the socket was empty when recv() looked
             * (TCP copies all it has, up to room): what comes later makes
             * the backend report the socket again, so no recv() has to
             * return EAGAIN.  While draining, only EAGAIN counts as quiet. */
            if ((size_t)n < room && !srv->draining) {
                pp__watch_drained(&c->w, POLLIN);
                break;
            }
            continue;
        }
        if (n == 0) {
            c->flags |= PP_C_EOF;
            break;
        }
        if (errno == EINTR)
            continue;
        if (errno == EAGAIN || errno == EWOULDBLOCK) {
            pp__watch_drained(&c->w, POLLIN | PP_POLL_URGENT);
            /* Quiet means "read until empty once since the stop": an
             * EAGAIN from before the stop says nothing about what came
             * since. */
            if (srv->draining)
                /* One that has not spoken yet waits for its first message
                 * while drain_grace runs (a connection per request). */
                c->flags |= srv->grace_until && !(c->flags & PP_C_SPOKE) ? PP_C_GRACE
                                                                        : PP_C_QUIET;
            break;
        }
        pp__stat_add(&srv->stats.read_errors, 1);
        c->flags |= PP_C_BROKEN;
        return;
    }
    if (c->flags & PP_C_PROXY_WAIT) {
        conn_proxy(srv, c);
        if (c->flags & (PP_C_PROXY_WAIT | PP_C_BROKEN))
            return;
    }
    conn_scan(srv, c);
}

/* Hands c's whole frames to a worker: the input buffer becomes the task
 * buffer, and only the partial frame after them is copied back, so whole
 * messages are never copied on their way to the handler. */
static void conn_dispatch(pp_server *srv, pp_conn *c)
{
    if (pp__pool_queued(&srv->pool) + srv->batch_n >= srv->cfg.queue_size) {
        /* A full queue stops this connection, never drops its messages. */
        if (!pp__linked(&c->ready))
            pp__list_append(&srv->ready, &c->ready);
        return;
    }
    pp_buf whole = c->in;
    size_t tail = pp__buf_size(&whole) - c->in_framed;
    c->in = c->task;
    c->in.off = c->in.len = 0;
    if (tail && pp__buf_append(&c->in, pp__buf_begin(&whole) + c->in_framed,
                               tail) < 0) {
        c->task = c->in;
        c->in = whole;
        pp__stat_add(&srv->stats.nomem_errors, 1);
        c->flags |= PP_C_BROKEN;
        return;
    }
    whole.len = whole.off + c->in_framed;
    c->task = whole;
    c->in_framed = 0;
    batch_add(srv, c, PP_EV_NONE);
}

/* Queues the shutdown message and marks c to close once it is sent. */
static void conn_goodbye(pp_server *srv, pp_conn *c)
{
    c->flags |= PP_C_GOODBYE;
    conn_set_closing(srv, c);
    if (srv->shutdown_msg == NULL)
        return;
    if (pp__frame_append(&srv->framing, &c->out, srv->shutdown_msg,
                         srv->cfg.shutdown_message_len) < 0) {
        pp__stat_add(&srv->stats.nomem_errors, 1);
        return;
    }
}

static void conn_flush(pp_server *srv, pp_conn *c)
{
    uint64_t sent = 0;
    int rc = pp__conn_flush(c, &sent);
    pp__stat_add(&srv->stats.bytes_out, sent);
    if (sent)
        c->out_since = srv->now;
    if (rc < 0) {
        pp__stat_add(&srv->stats.write_errors, 1);
        c->flags |= PP_C_BROKEN;
    } else if (pp__conn_pending(c) == 0) {
        pp__buf_reset(&c->out, PP_KEEP_BUF);
    } else {
        pp__watch_drained(&c->w, POLLOUT); /* EAGAIN */
    }
    atomic_store_explicit(&c->out_pending, pp__conn_pending(c), memory_order_relaxed);
}

static void conn_progress(pp_server *srv, pp_conn *c);
static void conn_take_pushes(pp_server *srv, pp_conn *c);

/* c is to close once its output is sent: from here no push is taken for it,
 * so none can put the close off or, after our FIN, fail and cut it; the
 * pushes queued before still go out. */
static void conn_set_closing(pp_server *srv, pp_conn *c)
{
    if (c->flags & PP_C_CLOSE)
        return;
    c->flags |= PP_C_CLOSE;
    pp__push_refuse(srv, c);
    if (atomic_load_explicit(&c->outbox_has, memory_order_relaxed))
        conn_take_pushes(srv, c);
}

/* Takes c's pushes into its output and acts on requests from other threads
 * (close, overflow).  Only while no task is in flight: the worker owns the
 * output then, and on_complete() looks again. */
static void conn_take_pushes(pp_server *srv, pp_conn *c)
{
    unsigned req = pp__push_take(srv, c, 1);
    if (req & PP_P_NOMEM) {
        pp__stat_add(&srv->stats.nomem_errors, 1);
        c->flags |= PP_C_BROKEN;
    }
    if (req & PP_P_OVERFLOW)
        c->flags |= PP_C_BROKEN; /* counted by the producer */
    if (req & PP_P_CLOSE_REQ)
        c->flags |= PP_C_CLOSE; /* pushes are refused already: CLOSING is set */
}

/* Every connection with pushes or requests since the last round: sent at
 * once, so a push costs the I/O thread one sendmsg() per recipient. */
static void take_pushes(pp_server *srv)
{
    pp_conn *c = pp__push_take_ready(srv);
    while (c != NULL) {
        pp_conn *next = c->push_next; /* progress may free c, and only c */
        c->push_next = NULL;
        if (!(c->flags & (PP_C_IN_FLIGHT | PP_C_RETIRING | PP_C_LINGER))) {
            conn_take_pushes(srv, c);
            if (!(c->flags & PP_C_BROKEN) && pp__conn_pending(c) > 0)
                conn_flush(srv, c);
            conn_progress(srv, c);
        }
        c = next;
    }
}

/* Decides what c needs next, after anything happened to it.  The one place
 * where a connection moves between reading, working, flushing and closing. */
static void conn_progress(pp_server *srv, pp_conn *c)
{
    if (c->flags & PP_C_IN_FLIGHT) {
        conn_update(srv, c);
        return;
    }
    if (c->flags & PP_C_BROKEN) {
        conn_close(srv, c);
        return;
    }
    if (c->flags & (PP_C_LINGER | PP_C_DEFERRED)) {
        /* Deferred: no task runs, no goodbye, no close (an EOF or a close
         * asked waits for the reply) until the finish; reading goes on, so
         * that a reset is seen. */
        conn_update(srv, c);
        return;
    }
    /* Output above the high-water mark holds back the next task as well as
     * reading: each task may add as much output again. */
    /* Pushes queued before this task go before its replies, and a close
     * asked before it means the task is not run. */
    if (c->in_framed > 0 && atomic_load_explicit(&c->outbox_has, memory_order_relaxed)) {
        conn_take_pushes(srv, c);
        if (c->flags & PP_C_BROKEN) {
            conn_close(srv, c);
            return;
        }
    }
    if (!(c->flags & PP_C_CLOSE) && c->in_framed > 0 &&
        pp__conn_pending(c) <= srv->cfg.output_high_water) {
        conn_dispatch(srv, c);
        if (c->flags & PP_C_BROKEN) {
            conn_close(srv, c);
            return;
        }
        if ((c->flags & PP_C_IN_FLIGHT) || pp__linked(&c->ready)) {
            conn_update(srv, c);
            return;
        }
    }
    if (srv->draining && !(c->flags & PP_C_CLOSE)) {
        /* Answer everything the peer sent before the stop: read until the
         * socket is empty once, then say goodbye. */
        if (!(c->flags & (PP_C_QUIET | PP_C_EOF | PP_C_BAD_FRAME | PP_C_GRACE)) &&
            conn_can_read(srv, c)) {
            conn_read(srv, c);
            /* The read left c quiet, at EOF, broken or unable to read more,
             * so this recursion goes one level deep at most. */
            conn_progress(srv, c);
            return;
        }
        if ((c->flags & (PP_C_QUIET | PP_C_EOF | PP_C_BAD_FRAME)) &&
            c->in_framed == 0) {
            conn_goodbye(srv, c);
            conn_flush(srv, c);
            if (c->flags & PP_C_BROKEN) {
                conn_close(srv, c);
                return;
            }
        }
    }
    /* Closing: once the output is out and either nothing whole is left to
     * answer, or the handler asked to close (what came after is dropped). */
    if (pp__conn_pending(c) == 0 &&
        (c->in_framed == 0 || (c->flags & PP_C_CLOSE)) &&
        (c->flags & (PP_C_CLOSE | PP_C_EOF | PP_C_BAD_FRAME))) {
        if (c->flags & PP_C_EOF)
            conn_close(srv, c);
        else
            conn_linger(srv, c);
        return;
    }
    conn_update(srv, c);
}

static void deferred_apply(pp_server *srv, pp_conn *c);

/* The oldest of c's deferred replies is finished and taken. */
static inline int deferred_head_ready(const pp_conn *c)
{
    return c->def_head != NULL && c->def_head->ready;
}

static void on_complete(pp_server *srv, pp_conn *c)
{
    c->flags &= ~PP_C_IN_FLIGHT;
    if (c->flags & PP_C_RETIRING) {
        conn_close(srv, c); /* the close event was the last task */
        return;
    }
    if (c->def_head != NULL) {
        /* The task deferred.  The messages after the deferred ones stay in
         * task, untouched (a batch handler may still be reading them), until
         * the last finish. */
        if (c->status == PP_DEFER)
            c->status = PP_KEEP;
        pp__buf_consume(&c->task, c->rest_off);
        c->flags |= PP_C_DEFERRED;
        srv->ndeferred++;
        c->def_since = srv->now;
        if (srv->reply_ms > 0)
            pp__list_append(&srv->defer_list, &c->def_timer);
    } else {
        pp__buf_reset(&c->task, PP_KEEP_BUF);
    }
    if (c->send_error)
        c->flags |= PP_C_BROKEN;
    else if (c->status != PP_KEEP && c->def_head == NULL)
        conn_set_closing(srv, c); /* PP_CLOSE or an error: send what is there */
    /* With replies pending, a close that came after them (a later message's
     * PP_CLOSE or error) waits in status: until they are in, pushes (the
     * finisher's, say) still go before them. */
    if (srv->forcing)
        c->flags |= PP_C_BROKEN;
    /* Requests and pushes that came while the task ran go after its replies. */
    if (atomic_load_explicit(&c->outbox_has, memory_order_relaxed))
        conn_take_pushes(srv, c);
    c->last_active = c->out_since = srv->now;
    size_t pending = pp__conn_pending(c);
    if (c->status == -ENOBUFS) {
        c->flags |= PP_C_BROKEN; /* the worker stopped at output_limit, counted */
    } else if (pending == 0) {
        pp__buf_reset(&c->out, PP_KEEP_BUF);
    } else if (srv->cfg.output_limit &&
               pending - pp__min_size(pending, atomic_load_explicit(
                             &c->push_queued, memory_order_relaxed)) > srv->cfg.output_limit) {
        /* Replies only: pushes have push_limit. */
        /* Reading already stops at the high-water mark; only a handler whose
         * replies dwarf its input gets here (the worker checks as it goes,
         * every 64 KiB of output). */
        pp__stat_add(&srv->stats.output_overflows, 1);
        c->flags |= PP_C_BROKEN;
    }
    if (deferred_head_ready(c) && !(c->flags & PP_C_BROKEN)) {
        deferred_apply(srv, c); /* finished before the task was even back */
        return;
    }
    conn_progress(srv, c);
}

/* Moves what src holds to the end of c's output. */
static void out_join(pp_server *srv, pp_conn *c, pp_buf *src)
{
    if (pp__buf_size(src) == 0)
        return;
    if (pp__buf_size(&c->out) == 0) {
        pp_buf t = c->out; /* the handle's buffer becomes the output */
        c->out = *src;
        *src = t;
    } else if (pp__buf_append(&c->out, pp__buf_begin(src), pp__buf_size(src)) < 0) {
        pp__stat_add(&srv->stats.nomem_errors, 1);
        c->flags |= PP_C_BROKEN;
    }
}

/* c's oldest deferred replies are finished: they join the output, each
 * followed by the replies held behind it, up to the first still pending;
 * once none is, the messages that waited run. */
static void deferred_apply(pp_server *srv, pp_conn *c)
{
    /* Pushes made while the replies were pending went out as they came;
     * those made just before the finish (by its own handler, say) go before
     * the reply too, whichever thread took them. */
    if (atomic_load_explicit(&c->outbox_has, memory_order_relaxed))
        conn_take_pushes(srv, c);
    while (deferred_head_ready(c)) {
        pp_dimpl *d = c->def_head;
        c->def_head = d->qnext;
        if (c->def_head == NULL)
            c->def_tail = NULL;
        c->ndef--;
        pp__stat_add(&srv->stats.deferred_retired, 1);
        int st = d->status;
        out_join(srv, c, &d->out);
        pp__stat_add(&srv->stats.replies, d->nreplies);
        if (st == PP_KEEP) {
            out_join(srv, c, &d->after);
            pp__stat_add(&srv->stats.replies, d->after_n);
        }
        pp__deferred_recycle(srv, d);
        if (st < 0)
            pp__stat_add(&srv->stats.handler_errors, 1);
        if (st != PP_KEEP) {
            /* Close after this reply: the later ones are moot. */
            conn_set_closing(srv, c);
            if (c->def_head != NULL)
                deferred_drop(srv, c);
            break;
        }
    }
    c->last_active = c->out_since = srv->now;
    size_t pending = pp__conn_pending(c);
    if (srv->cfg.output_limit && !(c->flags & PP_C_BROKEN) &&
        pending - pp__min_size(pending, atomic_load_explicit(
                      &c->push_queued, memory_order_relaxed)) > srv->cfg.output_limit) {
        /* Held replies joined: the limit on_complete() checks, on them too. */
        pp__stat_add(&srv->stats.output_overflows, 1);
        c->flags |= PP_C_BROKEN;
    }
    if (c->def_head != NULL) {
        /* Waiting for the next one: what is in goes out now. */
        if (!(c->flags & PP_C_BROKEN) && pp__conn_pending(c) > 0)
            conn_flush(srv, c);
        conn_progress(srv, c);
        return;
    }
    if (c->flags & PP_C_DEFERRED) {
        c->flags &= ~PP_C_DEFERRED;
        pp__list_unlink(&c->def_timer);
        srv->ndeferred--;
    }
    if (c->status != PP_KEEP) {
        c->status = PP_KEEP;
        conn_set_closing(srv, c); /* the task's own close, after its replies */
    }
    if (!(c->flags & (PP_C_BROKEN | PP_C_CLOSE)) && pp__buf_size(&c->task) > 0) {
        /* The rest of the task goes back to a worker, which sends these
         * replies with the ones it makes (bypassing queue_size, like events:
         * the connection had its place already). */
        batch_add(srv, c, PP_EV_NONE);
        conn_update(srv, c);
        return;
    }
    pp__buf_reset(&c->task, PP_KEEP_BUF);
    if (!(c->flags & PP_C_BROKEN) && pp__conn_pending(c) > 0)
        conn_flush(srv, c);
    conn_progress(srv, c);
}

/* Every handle finished since the last round.  Marked first, applied
 * after: applying one connection's replies may drop (and free) handles of
 * its that are further down the taken chain. */
static void take_deferred(pp_server *srv)
{
    pp_dimpl *d = pp__deferred_take(srv);
    pp_conn *settle = NULL;
    while (d != NULL) {
        pp_dimpl *next = (pp_dimpl *)(void *)d->link.next;
        d->link.next = NULL;
        d->ready = 1;
        pp_conn *c = d->conn;
        /* In flight: the task that deferred is not back yet; on_complete()
         * applies it. */
        if (!(c->flags & (PP_C_IN_FLIGHT | PP_C_SETTLE))) {
            c->flags |= PP_C_SETTLE;
            c->settle_next = settle;
            settle = c;
        }
        d = next;
    }
    while (settle != NULL) {
        pp_conn *c = settle;
        settle = c->settle_next; /* applying may free c, and only c */
        c->settle_next = NULL;
        c->flags &= ~PP_C_SETTLE;
        if (deferred_head_ready(c))
            deferred_apply(srv, c);
    }
}

static void take_completions(pp_server *srv)
{
    pp_conn *list = atomic_exchange(&srv->done, NULL);
    /* Reverse the stack so connections are handled in completion order. */
    pp_conn *fifo = NULL;
    while (list) {
        pp_conn *next = list->next_done;
        list->next_done = fifo;
        fifo = list;
        list = next;
    }
    while (fifo) {
        pp_conn *next = fifo->next_done;
        fifo->next_done = NULL;
        on_complete(srv, fifo);
        fifo = next;
    }
}

static void dispatch_ready(pp_server *srv)
{
    pp_link *l;
    while ((l = pp__list_first(&srv->ready)) != NULL &&
           pp__pool_queued(&srv->pool) + srv->batch_n < srv->cfg.queue_size) {
        pp__list_unlink(l);
        conn_progress(srv, PP_CONN_OF(l, ready));
    }
}

static void push_batch(pp_server *srv)
{
    if (srv->batch_n == 0)
        return;
    pp__pool_push(&srv->pool, srv->batch_head, srv->batch_tail, srv->batch_n);
    srv->batch_head = srv->batch_tail = NULL;
    srv->batch_n = 0;
}

/* ---- timers and shutdown ------------------------------------------------ */

/* Closes lingering connections whose peer has everything, or whose time is
 * up.  Asking the kernel whether the peer acknowledged everything takes an
 * ioctl per lingering connection, so it happens every PP_LINGER_POLL_MS, and
 * only over the lingering ones. */
static void expire_lingers(pp_server *srv, int64_t now)
{
    if (pp__list_empty(&srv->linger_list)) {
        srv->linger_check_at = 0;
        return;
    }
    if (now < srv->linger_check_at)
        return;
    pp_link *l = pp__list_first(&srv->linger_list);
    while (l != NULL && l != &srv->linger_list) {
        pp_link *next = l->next;
        pp_conn *c = PP_CONN_OF(l, timer);
        if (c->linger_deadline <= now || conn_all_acked(c))
            conn_close(srv, c);
        l = next;
    }
    srv->linger_check_at = pp__list_empty(&srv->linger_list) ? 0 : now + PP_LINGER_POLL_MS;
}

/* The connection at the head of a timer list whose time is up, or NULL. */
static pp_conn *expired(pp_link *list, int64_t limit, int64_t now)
{
    pp_link *l = pp__list_first(list);
    if (l == NULL)
        return NULL;
    pp_conn *c = PP_CONN_OF(l, timer);
    return now - c->timer_key >= limit ? c : NULL;
}

/* Closes connections silent for idle_timeout, and those whose pending output
 * has not moved for send_timeout (a peer that stopped reading).  Only the
 * heads of the sorted lists are looked at. */
static void check_timers(pp_server *srv, int64_t now)
{
    pp_conn *c;
    pp_link *l;
    while (srv->reply_ms > 0 && (l = pp__list_first(&srv->defer_list)) != NULL &&
           now - (c = PP_CONN_OF(l, def_timer))->def_since >= srv->reply_ms) {
        pp__list_unlink(l);
        pp__stat_add(&srv->stats.reply_timeouts, 1);
        c->flags |= PP_C_BROKEN;
        conn_progress(srv, c);
    }
    while ((c = expired(&srv->proxy_list, srv->proxy_ms, now)) != NULL) {
        pp__list_unlink(&c->timer);
        c->timer_list = NULL;
        pp__stat_add(&srv->stats.proxy_errors, 1); /* no header in time */
        c->flags |= PP_C_BROKEN;
        conn_progress(srv, c);
    }
    while ((c = expired(&srv->send_list, srv->stall_ms, now)) != NULL) {
        pp__list_unlink(&c->timer);
        c->timer_list = NULL;
        pp__stat_add(&srv->stats.send_timeouts, 1);
        c->flags |= PP_C_BROKEN;
        conn_progress(srv, c);
    }
    while ((c = expired(&srv->idle_list, srv->idle_ms, now)) != NULL) {
        pp__list_unlink(&c->timer);
        c->timer_list = NULL;
        pp__stat_add(&srv->stats.idle_closes, 1);
        conn_set_closing(srv, c); /* lingers: not on the idle list again */
        conn_progress(srv, c);
    }
}

/* When the head of a timer list expires; 0 if the list is empty. */
static int64_t list_deadline(const pp_link *list, int64_t limit)
{
    pp_link *l = pp__list_first(list);
    return l ? PP_CONN_OF(l, timer)->timer_key + limit : 0;
}

static void begin_drain(pp_server *srv)
{
    srv->draining = 1;
    srv->accept_retry_at = 0; /* accepting is over: no retry to wake for */
    int64_t now = pp__now_ms();
    srv->drain_deadline = now + (int64_t)(srv->cfg.drain_timeout * 1000.0);
    /* Connections that have not spoken yet get the grace for their first
     * message (conn_read); set before the first reads below. */
    srv->grace_until = srv->cfg.drain_grace > 0.0
                           ? now + (int64_t)(srv->cfg.drain_grace * 1000.0) : 0;
    /* No new connections from here on, and no new pushes; those queued
     * before go out with the rest. */
    listeners_close(srv);
    srv->accept_paused = 1;
    pp__push_close(srv);
    take_pushes(srv);
    pp_link *l = pp__list_first(&srv->conns);
    while (l != NULL && l != &srv->conns) {
        pp_link *next = l->next; /* progress may free c, and only c */
        conn_progress(srv, PP_CONN_OF(l, all));
        l = next;
    }
}

/* A stop begins: health checks hear "drain" and systemd STOPPING=1 at
 * once; the drain itself (listeners closed) drain_delay later, while
 * everything is served as before, so a balancer stops sending first. */
static void begin_leave(pp_server *srv)
{
    if (atomic_load(&srv->retiring)) {
        /* Replaced on the same listeners: the service is not leaving, and
         * the health socket stays with the new server process. */
        if (!srv->draining)
            begin_drain(srv);
        srv->leaving = 1;
        return;
    }
    srv->leaving = 1;
    if (srv->cfg.notify_fd > 0) {
        /* systemd (Type=notify): the service is going.  A datagram: all of
         * it or nothing, and a full or gone manager is no reason to wait. */
        static const char msg[] = "STOPPING=1";
        (void)send(srv->cfg.notify_fd, msg, sizeof msg - 1, MSG_NOSIGNAL | MSG_DONTWAIT);
    }
    int64_t delay = (int64_t)(srv->cfg.drain_delay * 1000.0);
    srv->leave_until = pp__now_ms() + delay;
    if (delay <= 0 && !srv->draining)
        begin_drain(srv);
}

/* drain_grace is over: connections that never spoke get their goodbye. */
static void end_grace(pp_server *srv)
{
    srv->grace_until = 0;
    pp_link *l = pp__list_first(&srv->conns);
    while (l != NULL && l != &srv->conns) {
        pp_link *next = l->next; /* progress may free c, and only c */
        pp_conn *c = PP_CONN_OF(l, all);
        if (c->flags & PP_C_GRACE) {
            c->flags = (c->flags & ~PP_C_GRACE) | PP_C_QUIET;
            conn_progress(srv, c);
        }
        l = next;
    }
}

/* The drain's end: every deferred reply still pending is cancelled. */
static void cut_deferred(pp_server *srv)
{
    srv->deferred_cut = 1;
    srv->cutting = 1;
    pp_link *l = pp__list_first(&srv->conns);
    while (l != NULL && l != &srv->conns) {
        pp_link *next = l->next;
        pp_conn *c = PP_CONN_OF(l, all);
        if (c->flags & PP_C_DEFERRED) {
            c->flags |= PP_C_BROKEN;
            conn_progress(srv, c); /* deferred_drop() counts what it cancels */
        }
        l = next;
    }
    srv->cutting = 0;
}

/* Cuts every connection.  A connection whose task is still in flight only
 * gets shut down: its fd stays open until the worker hands it back. */
static void begin_force(pp_server *srv)
{
    srv->forcing = 1;
    srv->accept_retry_at = 0;
    atomic_store(&srv->forced, 1);
    srv->force_deadline = pp__now_ms() + PP_FORCE_GRACE_MS;
    pp__push_close(srv);
    if (!srv->draining) {
        listeners_close(srv);
        srv->draining = 1;
    }
    pp_link *l = pp__list_first(&srv->conns);
    while (l != NULL && l != &srv->conns) {
        pp_link *next = l->next;
        pp_conn *c = PP_CONN_OF(l, all);
        pp__stat_add(&srv->stats.forced_closes, 1);
        if (c->flags & PP_C_IN_FLIGHT) {
            shutdown(c->fd, SHUT_RDWR);
            c->flags |= PP_C_BROKEN;
            conn_update(srv, c);
        } else {
            conn_close(srv, c);
        }
        l = next;
    }
}

static int wait_timeout(pp_server *srv, int64_t now)
{
    int64_t until = -1;
#define PP_SOONER(t) do { if ((t) > 0 && (until < 0 || (t) < until)) until = (t); } while (0)
    if (srv->forcing)
        PP_SOONER(srv->force_deadline);
    else if (srv->draining)
        PP_SOONER(srv->drain_deadline);
    else if (srv->leaving)
        PP_SOONER(srv->leave_until);
    if (srv->draining && !srv->forcing)
        PP_SOONER(srv->grace_until);
    PP_SOONER(srv->health_retry_at);
    PP_SOONER(srv->accept_retry_at);
    PP_SOONER(srv->linger_check_at);
    if (srv->stall_ms > 0)
        PP_SOONER(list_deadline(&srv->send_list, srv->stall_ms));
    if (srv->idle_ms > 0)
        PP_SOONER(list_deadline(&srv->idle_list, srv->idle_ms));
    PP_SOONER(list_deadline(&srv->proxy_list, srv->proxy_ms));
    if (srv->reply_ms > 0 && !pp__list_empty(&srv->defer_list))
        PP_SOONER(PP_CONN_OF(pp__list_first(&srv->defer_list), def_timer)->def_since +
                  srv->reply_ms);
#undef PP_SOONER
    if (until < 0)
        return -1;
    if (until <= now)
        return 0;
    return until - now > 60000 ? 60000 : (int)(until - now);
}

/* Handles what the backend reported for one connection. */
static void conn_event(pp_server *srv, pp_conn *c, short re)
{
    if (re & POLLNVAL)
        abort(); /* a connection's fd was closed behind our back */
    if (re & POLLOUT)
        conn_flush(srv, c);
    /* Every reported event leads to a syscall that either makes progress or
     * fails and breaks the connection: nothing spins. */
    if ((re & (POLLIN | POLLHUP | POLLERR)) && !(c->flags & PP_C_BROKEN)) {
        if (conn_can_read(srv, c))
            conn_read(srv, c);
        else if (re & (POLLERR | POLLHUP))
            c->flags |= PP_C_BROKEN;
    }
    conn_progress(srv, c);
}

/* ---- the loop ----------------------------------------------------------- */

int pp__loop_run(pp_server *srv)
{
    int rc = 0;
    for (;;) {
        int level = atomic_load(&srv->stop_level);
        if (level >= 1 && !srv->leaving)
            begin_leave(srv);
        if (level >= 2 && !srv->forcing)
            begin_force(srv);
        int64_t now = srv->now = pp__now_ms();
        if (srv->leaving && !srv->draining && now >= srv->leave_until)
            begin_drain(srv);
        if (srv->grace_until && now >= srv->grace_until && !srv->forcing)
            end_grace(srv);
        if (srv->health_retry_at && now >= srv->health_retry_at && srv->health_fd >= 0) {
            srv->health_retry_at = 0;
            srv->health_w.want = POLLIN;
            srv->bk->set(srv, &srv->health_w, POLLIN);
        }
        if (srv->forcing && now >= srv->force_deadline)
            break;
        if (srv->draining && !srv->forcing && now >= srv->drain_deadline) {
            /* Peers that got everything but keep their side open are not a
             * failed drain; anything else still open is cut. */
            srv->linger_check_at = now;
            expire_lingers(srv, now);
            if (srv->nconns == 0)
                break;
            if (srv->ndeferred > 0 && !srv->deferred_cut) {
                /* Replies that did not come in time are cancelled, their
                 * connections closed (the replies before them were sent):
                 * the drain's part that waits on the application ends, the
                 * rest gets a short grace for their close events. */
                cut_deferred(srv);
                srv->drain_deadline = now + PP_FORCE_GRACE_MS;
                continue;
            }
            begin_force(srv);
            continue;
        }
        if (srv->accept_retry_at && now >= srv->accept_retry_at)
            accept_resume(srv);
        expire_lingers(srv, now);
        check_timers(srv, now);
        if (srv->draining && srv->nconns == 0)
            break;

        /* Whatever this round (or the stop handling above) made ready goes to
         * the workers before we may sleep. */
        dispatch_ready(srv);
        push_batch(srv);

        int timeout = wait_timeout(srv, now);
        /* Announce the sleep, then look once more: a completion pushed before
         * the announcement is seen here, one pushed after it writes the fd. */
        atomic_store(&srv->io_armed, 1);
        if (atomic_load(&srv->done) != NULL || atomic_load(&srv->push_pending) ||
            atomic_load(&srv->hub->has_finished) ||
            atomic_load(&srv->stop_level) != level)
            timeout = 0;
        int n = srv->bk->wait(srv, timeout);
        atomic_store(&srv->io_armed, 0);
        srv->now = pp__now_ms(); /* the wait may have slept long */
        if (n < 0) {
            if (n == -EINTR)
                continue;
            if (n == -ENOMEM) {
                struct timespec ts = {0, 10 * 1000000L};
                nanosleep(&ts, NULL);
                continue;
            }
            rc = n;
            break;
        }

        take_completions(srv);
        take_deferred(srv);
        pp__deferred_recycled(srv);
        take_pushes(srv);
        pp_link *l;
        while ((l = pp__list_first(&srv->fired)) != NULL) {
            pp__list_unlink(l);
            pp_watch *w = PP_CONTAINER(l, pp_watch, queue);
            short re = w->revents;
            w->revents = 0;
            switch (w->kind) {
            case PP_W_CONN:
                conn_event(srv, PP_CONN_OF(w, w), re);
                break;
            case PP_W_WAKE:
                /* Edge-triggered, every write to the eventfd is an edge of
                 * its own: its count need not be read back to see the next
                 * one, and a read per wake-up is saved. */
                if (!srv->bk->edge)
                    drain_wake_fd(srv);
                pp__watch_drained(w, POLLIN);
                break;
            case PP_W_HEALTH:
                if (re & POLLIN)
                    health_accept(srv, w);
                srv->bk->set(srv, w, w->want);
                break;
            default:
                if (re & POLLIN)
                    do_accept(srv, w);
                srv->bk->set(srv, w, w->want); /* see conn_update */
                break;
            }
        }
    }
    push_batch(srv);
    return rc;
}
