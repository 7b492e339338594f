/* epoll_echo: the "hand-written C" reference for the benchmarks.
 *
 * One thread, level-triggered epoll, non-blocking sockets.  Like the Python
 * peers it splits the stream into lines and calls a handler per message (here
 * an inlined echo that appends the line and its '\n' to the output buffer),
 * then writes all replies of one read with a single send().  When the peer
 * does not read, output above a high-water mark stops reading that connection
 * until it drains, so memory stays bounded.
 *
 * usage: epoll_echo [PORT]      (default 0: ephemeral)
 * prints "listening on 127.0.0.1:PORT" once bound.
 *
 * Build: cc -O2 -Wall -Wextra -Werror -o epoll_echo epoll_echo.c
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

#define READ_CHUNK (64 * 1024)
#define MAX_LINE (1 << 20)
#define HIGH_WATER (4 << 20)

typedef struct {
    int fd;
    int events;             /* what epoll currently watches */
    char *in;               /* partial line carried over between reads */
    size_t in_len, in_cap;
    char *out;              /* replies not yet sent: out[out_off, out_len) */
    size_t out_off, out_len, out_cap;
} conn;

static int ep;

static int reserve(char **buf, size_t *cap, size_t need)
{
    if (need <= *cap)
        return 0;
    size_t n = *cap ? *cap : 4096;
    while (n < need)
        n *= 2;
    char *p = realloc(*buf, n);
    if (!p)
        return -1;
    *buf = p;
    *cap = n;
    return 0;
}

static void conn_close(conn *c)
{
    close(c->fd); /* leaves the epoll set */
    free(c->in);
    free(c->out);
    free(c);
}

static void set_events(conn *c, int events)
{
    if (events == c->events)
        return;
    struct epoll_event ev = {.events = (uint32_t)events, .data.ptr = c};
    if (epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev) < 0) {
        perror("epoll_ctl");
        abort();
    }
    c->events = events;
}

/* The handler: echo.  Appends the reply, framed, to the output buffer. */
static int handle(conn *c, const char *msg, size_t len)
{
    if (c->out_off == c->out_len)
        c->out_off = c->out_len = 0;
    if (reserve(&c->out, &c->out_cap, c->out_len + len + 1) < 0)
        return -1;
    memcpy(c->out + c->out_len, msg, len);
    c->out[c->out_len + len] = '\n';
    c->out_len += len + 1;
    return 0;
}

/* Sends what it can; returns -1 if the connection must close. */
static int flush(conn *c)
{
    while (c->out_off < c->out_len) {
        ssize_t n = send(c->fd, c->out + c->out_off, c->out_len - c->out_off, MSG_NOSIGNAL);
        if (n > 0) {
            c->out_off += (size_t)n;
        } else if (n < 0 && errno == EINTR) {
            continue;
        } else if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            break;
        } else {
            return -1;
        }
    }
    size_t pending = c->out_len - c->out_off;
    if (pending == 0)
        c->out_off = c->out_len = 0;
    int ev = pending ? EPOLLOUT : 0;
    if (pending < HIGH_WATER)
        ev |= EPOLLIN;
    set_events(c, ev);
    return 0;
}

/* Splits data (appended to any carried partial line) into lines. */
static int on_data(conn *c, const char *data, size_t n)
{
    const char *p = data, *end = data + n;
    if (c->in_len) {
        const char *nl = memchr(p, '\n', n);
        if (!nl) {
            if (c->in_len + n > MAX_LINE || reserve(&c->in, &c->in_cap, c->in_len + n) < 0)
                return -1;
            memcpy(c->in + c->in_len, p, n);
            c->in_len += n;
            return 0;
        }
        size_t k = (size_t)(nl - p);
        if (reserve(&c->in, &c->in_cap, c->in_len + k) < 0)
            return -1;
        memcpy(c->in + c->in_len, p, k);
        if (handle(c, c->in, c->in_len + k) < 0)
            return -1;
        c->in_len = 0;
        p = nl + 1;
    }
    while (p < end) {
        const char *nl = memchr(p, '\n', (size_t)(end - p));
        if (!nl) {
            size_t k = (size_t)(end - p);
            if (k > MAX_LINE || reserve(&c->in, &c->in_cap, k) < 0)
                return -1;
            memcpy(c->in, p, k);
            c->in_len = k;
            break;
        }
        if (handle(c, p, (size_t)(nl - p)) < 0)
            return -1;
        p = nl + 1;
    }
    return 0;
}

static char rbuf[READ_CHUNK];

static void on_event(conn *c, uint32_t events)
{
    if (events & (EPOLLIN | EPOLLHUP | EPOLLERR)) {
        if (c->events & EPOLLIN) {
            ssize_t n = read(c->fd, rbuf, sizeof rbuf);
            if (n == 0 || (n < 0 && errno != EAGAIN && errno != EINTR)) {
                conn_close(c);
                return;
            }
            if (n > 0 && on_data(c, rbuf, (size_t)n) < 0) {
                conn_close(c);
                return;
            }
        } else if (events & (EPOLLHUP | EPOLLERR)) {
            conn_close(c);
            return;
        }
    }
    if (flush(c) < 0)
        conn_close(c);
}

int main(int argc, char **argv)
{
    int port = argc > 1 ? atoi(argv[1]) : 0;
    signal(SIGPIPE, SIG_IGN);
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
    int lfd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    int one = 1;
    setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t sl = sizeof sa;
    if (lfd < 0 || bind(lfd, (struct sockaddr *)&sa, sizeof sa) < 0 || listen(lfd, 4096) < 0 ||
        getsockname(lfd, (struct sockaddr *)&sa, &sl) < 0) {
        perror("epoll_echo: listen");
        return 1;
    }
    ep = epoll_create1(EPOLL_CLOEXEC);
    struct epoll_event lev = {.events = EPOLLIN, .data.ptr = NULL};
    if (ep < 0 || epoll_ctl(ep, EPOLL_CTL_ADD, lfd, &lev) < 0) {
        perror("epoll_echo: epoll");
        return 1;
    }
    printf("listening on 127.0.0.1:%d\n", ntohs(sa.sin_port));
    fflush(stdout);

    struct epoll_event evs[512];
    for (;;) {
        int n = epoll_wait(ep, evs, 512, -1);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            perror("epoll_wait");
            return 1;
        }
        for (int i = 0; i < n; i++) {
            conn *c = evs[i].data.ptr;
            if (c) {
                on_event(c, evs[i].events);
                continue;
            }
            for (;;) { /* accept everything pending */
                int fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
                if (fd < 0) {
                    if (errno == EINTR || errno == ECONNABORTED)
                        continue;
                    if (errno != EAGAIN && errno != EWOULDBLOCK)
                        perror("accept4"); /* EMFILE: retried on the next event */
                    break;
                }
                setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
                conn *nc = calloc(1, sizeof *nc);
                struct epoll_event ev = {.events = EPOLLIN, .data.ptr = nc};
                if (!nc || epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev) < 0) {
                    free(nc);
                    close(fd);
                    continue;
                }
                nc->fd = fd;
                nc->events = EPOLLIN;
            }
        }
    }
}
