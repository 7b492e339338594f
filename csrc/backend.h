/*
 * backend.h - the readiness API under the I/O loop, one small file per OS API
 * (backend_poll.c, backend_epoll.c), as Redis's ae.c does it.
 *
 * The loop sees level-triggered semantics from every backend: a watch is
 * reported in every round in which it is ready for something it wants
 * (POLLHUP and POLLERR count whenever it wants anything), and a watch that
 * wants nothing is never reported.  An edge-triggered backend keeps what the
 * kernel said in w->ready and reports from that, so the loop must tell it
 * when a syscall found a direction used up (pp__watch_drained), and must
 * call set() again on every watch it handled and keeps (even with the same
 * want): that is when readiness left over is queued for the next round.
 */
#ifndef PP_BACKEND_H
#define PP_BACKEND_H

#include <poll.h>
#include <stdint.h>

#include "list.h"

typedef struct pp_server pp_server;

enum { PP_W_WAKE = 0, PP_W_LISTEN = 1, PP_W_CONN = 2, PP_W_HEALTH = 3 };

typedef struct pp_watch {
    int fd;
    short want;        /* POLLIN | POLLOUT wanted now; 0 = none */
    short ready;       /* epoll: readiness not known to be used up */
    short revents;     /* what this round reports */
    unsigned char kind;  /* PP_W_* */
    unsigned char index; /* listener number for PP_W_LISTEN */
    uint32_t slot;     /* poll: index in the pollfd array */
    pp_link queue;     /* on the backend's pending list or the fired list */
} pp_watch;

typedef struct pp_backend {
    const char *name;
    int edge;          /* edge-triggered: each eventfd write is reported */
    /* Sets up the backend's state in srv. */
    int (*init)(pp_server *srv);
    void (*destroy)(pp_server *srv);
    /* Starts watching w->fd for w->want.  0 or -errno (-ENOMEM). */
    int (*add)(pp_server *srv, pp_watch *w);
    /* Changes what w wants.  Cannot fail. */
    void (*set)(pp_server *srv, pp_watch *w, short want);
    /* Stops watching w; call before its fd is closed. */
    void (*del)(pp_server *srv, pp_watch *w);
    /* Waits up to timeout ms (-1 forever, 0 not at all) and appends every
     * reported watch to srv->fired with w->revents set.  Returns the number
     * reported or -errno (-EINTR, -ENOMEM). */
    int (*wait)(pp_server *srv, int timeout);
} pp_backend;

extern const pp_backend pp__backend_poll;
#ifdef __linux__
extern const pp_backend pp__backend_epoll;
#endif

/* Readiness to read that a short read does not use up, only EAGAIN: TCP
 * urgent data (a read stops short at the urgent mark).  epoll reports it. */
#define PP_POLL_URGENT POLLPRI

/* A syscall on w's fd found this direction (POLLIN or POLLOUT) used up: it
 * returned EAGAIN (then pass POLLIN | PP_POLL_URGENT), or read less than it
 * asked for. */
static inline void pp__watch_drained(pp_watch *w, short ev)
{
    w->ready = (short)(w->ready & ~ev);
}

#endif
