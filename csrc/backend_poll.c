/*
 * backend_poll.c - poll(): one pollfd per watch in a dense array.
 *
 * The array is what poll() needs, and the kernel walks all of it on every
 * call: the cost per round grows with open connections, busy or not.  A watch
 * that wants nothing keeps its slot with a negative fd, which poll() skips
 * without reporting POLLHUP or POLLERR for it.
 */
#include <errno.h>
#include <stdlib.h>

#include "core.h"

static int bpoll_init(pp_server *srv)
{
    srv->cap_pfds = 64;
    srv->npfds = 0;
    srv->pfds = calloc(srv->cap_pfds, sizeof *srv->pfds);
    srv->watches = calloc(srv->cap_pfds, sizeof *srv->watches);
    if (srv->pfds == NULL || srv->watches == NULL) {
        free(srv->pfds);
        free(srv->watches);
        srv->pfds = NULL;
        srv->watches = NULL;
        return -ENOMEM;
    }
    return 0;
}

static void bpoll_destroy(pp_server *srv)
{
    free(srv->pfds);
    free(srv->watches);
    srv->pfds = NULL;
    srv->watches = NULL;
    srv->npfds = srv->cap_pfds = 0;
}

static int bpoll_add(pp_server *srv, pp_watch *w)
{
    if (srv->npfds == srv->cap_pfds) {
        size_t cap = srv->cap_pfds * 2;
        struct pollfd *p = realloc(srv->pfds, cap * sizeof *p);
        if (p == NULL)
            return -ENOMEM;
        srv->pfds = p;
        pp_watch **ws = realloc(srv->watches, cap * sizeof *ws);
        if (ws == NULL)
            return -ENOMEM;
        srv->watches = ws;
        srv->cap_pfds = cap;
    }
    size_t i = srv->npfds++;
    srv->pfds[i] = (struct pollfd){.fd = w->want ? w->fd : -1, .events = w->want};
    srv->watches[i] = w;
    w->slot = (uint32_t)i;
    return 0;
}

static void bpoll_set(pp_server *srv, pp_watch *w, short want)
{
    struct pollfd *p = &srv->pfds[w->slot];
    w->want = want;
    p->events = want;
    p->fd = want ? w->fd : -1;
}

/* Moves the last slot into the freed one: O(1). */
static void bpoll_del(pp_server *srv, pp_watch *w)
{
    pp__list_unlink(&w->queue);
    size_t i = w->slot, last = --srv->npfds;
    if (i != last) {
        srv->pfds[i] = srv->pfds[last];
        srv->watches[i] = srv->watches[last];
        srv->watches[i]->slot = (uint32_t)i;
    }
    srv->watches[last] = NULL;
}

static int bpoll_wait(pp_server *srv, int timeout)
{
    int n = poll(srv->pfds, srv->npfds, timeout);
    if (n < 0)
        return -errno;
    /* poll() says how many slots have events: stop looking after the last. */
    int found = 0;
    for (size_t i = 0; i < srv->npfds && found < n; i++) {
        struct pollfd *p = &srv->pfds[i];
        if (p->revents == 0)
            continue;
        pp_watch *w = srv->watches[i];
        w->revents = p->revents;
        p->revents = 0;
        pp__list_append(&srv->fired, &w->queue);
        found++;
    }
    return found;
}

const pp_backend pp__backend_poll = {
    .name = "poll",
    .init = bpoll_init,
    .destroy = bpoll_destroy,
    .add = bpoll_add,
    .set = bpoll_set,
    .del = bpoll_del,
    .wait = bpoll_wait,
};
