/*
 * backend_epoll.c - Linux epoll, edge-triggered.
 *
 * Each fd is registered once, for everything it can ever want; the kernel
 * then reports changes (data arrived, room to write), and w->ready remembers
 * them until a syscall comes back with EAGAIN.  Reporting from w->ready and
 * w->want gives the loop the level-triggered view it expects, while turning a
 * connection's interest off and on (once per request: no reading while its
 * task is in flight) costs no syscall at all.  A watch whose interest comes
 * back with readiness already known goes on the pending list and is reported
 * by the next wait, which then does not sleep.
 *
 * The peer's FIN is remembered apart (EPOLLRDHUP, never used up): the loop
 * takes a short read for "the socket is empty" and lets no recv() return
 * EAGAIN, and when the data and the FIN arrive together the read that gets
 * the data is short, yet no later edge would announce the EOF behind it.
 * TCP urgent data is the other case where a read stops short of what is
 * there (at the urgent mark): EPOLLPRI counts as readable until a recv()
 * returns EAGAIN.
 *
 * The cost of a round is the number of ready fds, not of open ones, which is
 * the point: 10,000 idle connections cost nothing per round.
 *
 * Measured against level-triggered epoll (interest following want, an
 * EPOLL_CTL_DEL and _ADD per request; benchmarks/results/
 * 2026-11-27-epoll-et-vs-lt.md), native echo, 50 connections, 64 B, pinned:
 * edge-triggered spent 6.15 us of server CPU per request at pipeline 1 and
 * 0.42 at pipeline 16, level-triggered 7.90 and 0.58.
 */
#ifdef __linux__
#include <errno.h>
#include <stdlib.h>
#include <sys/epoll.h>
#include <unistd.h>

#include "core.h"

_Static_assert(EPOLLIN == POLLIN && EPOLLOUT == POLLOUT && EPOLLPRI == POLLPRI &&
               EPOLLERR == POLLERR && EPOLLHUP == POLLHUP,
               "epoll and poll event bits differ");

#define PP_EP_MAX_EVENTS 1024
#define PP_EP_EVENTS (EPOLLIN | EPOLLPRI | EPOLLOUT | EPOLLERR | EPOLLHUP | EPOLLRDHUP)

/* What w is ready for as the loop sees it: after the peer's FIN, reading is
 * always possible (it returns the rest, then 0). */
static short readiness(const pp_watch *w)
{
    short r = (short)(w->ready & (POLLIN | POLLOUT | POLLERR | POLLHUP));
    if (w->ready & (short)(EPOLLRDHUP | EPOLLPRI))
        r |= POLLIN;
    return r;
}

static int bep_init(pp_server *srv)
{
    srv->epfd = epoll_create1(EPOLL_CLOEXEC);
    if (srv->epfd < 0)
        return -errno;
    srv->cap_evs = 64;
    srv->evs = malloc((size_t)srv->cap_evs * sizeof *srv->evs);
    if (srv->evs == NULL) {
        close(srv->epfd);
        srv->epfd = -1;
        return -ENOMEM;
    }
    pp__list_init(&srv->pending);
    return 0;
}

static void bep_destroy(pp_server *srv)
{
    if (srv->epfd >= 0)
        close(srv->epfd);
    srv->epfd = -1;
    free(srv->evs);
    srv->evs = NULL;
}

/* Reports w next round if it is ready for something it wants. */
static void consider(pp_server *srv, pp_watch *w)
{
    if (w->want && (readiness(w) & (w->want | POLLHUP | POLLERR)) &&
        !pp__linked(&w->queue))
        pp__list_append(&srv->pending, &w->queue);
}

static int bep_add(pp_server *srv, pp_watch *w)
{
    struct epoll_event ev = {0};
    ev.events = EPOLLIN | EPOLLET;
    if (w->kind == PP_W_CONN)
        ev.events |= EPOLLOUT | EPOLLRDHUP | EPOLLPRI;
    ev.data.ptr = w;
    /* The kernel reports an fd that is ready already at once, so nothing
     * that happened before this call is missed. */
    w->ready = 0;
    if (epoll_ctl(srv->epfd, EPOLL_CTL_ADD, w->fd, &ev) < 0)
        return -errno;
    return 0;
}

static void bep_set(pp_server *srv, pp_watch *w, short want)
{
    w->want = want;
    consider(srv, w);
}

static void bep_del(pp_server *srv, pp_watch *w)
{
    pp__list_unlink(&w->queue);
    /* Closing the fd would not unregister it while a forked child still
     * holds a copy, and the next event would name freed memory. */
    struct epoll_event ev = {0};
    epoll_ctl(srv->epfd, EPOLL_CTL_DEL, w->fd, &ev);
}

static int report_pending(pp_server *srv)
{
    int reported = 0;
    pp_link *l;
    while ((l = pp__list_first(&srv->pending)) != NULL) {
        pp__list_unlink(l);
        pp_watch *w = PP_CONTAINER(l, pp_watch, queue);
        short act = w->want ? (short)(readiness(w) & (w->want | POLLHUP | POLLERR)) : 0;
        if (act == 0)
            continue; /* stays known in w->ready for when it is wanted */
        w->revents = act;
        pp__list_append(&srv->fired, l);
        reported++;
    }
    return reported;
}

static int bep_wait(pp_server *srv, int timeout)
{
    if (!pp__list_empty(&srv->pending))
        timeout = 0;
    int n = epoll_wait(srv->epfd, srv->evs, srv->cap_evs, timeout);
    if (n < 0)
        return -errno;
    for (int i = 0; i < n; i++) {
        pp_watch *w = srv->evs[i].data.ptr;
        w->ready |= (short)(srv->evs[i].events & PP_EP_EVENTS);
        if (!pp__linked(&w->queue))
            pp__list_append(&srv->pending, &w->queue);
    }
    if (n == srv->cap_evs && srv->cap_evs < PP_EP_MAX_EVENTS) {
        /* More may be waiting: take more per call from now on. */
        struct epoll_event *e = realloc(srv->evs, (size_t)srv->cap_evs * 2 * sizeof *e);
        if (e != NULL) {
            srv->evs = e;
            srv->cap_evs *= 2;
        }
    }
    return report_pending(srv);
}

const pp_backend pp__backend_epoll = {
    .name = "epoll",
    .edge = 1,
    .init = bep_init,
    .destroy = bep_destroy,
    .add = bep_add,
    .set = bep_set,
    .del = bep_del,
    .wait = bep_wait,
};
#endif
