/* listen.c - binding and listening sockets (IPv4 and IPv6). */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "core.h"

static int listen_one(const struct addrinfo *ai, int port, int backlog,
                      int reuse_port)
{
    struct sockaddr_storage ss;
    if (ai->ai_addrlen > sizeof ss)
        return -EAFNOSUPPORT;
    memcpy(&ss, ai->ai_addr, ai->ai_addrlen);
    /* With port 0, every address of the host shares the first one's port. */
    if (port) {
        if (ss.ss_family == AF_INET)
            ((struct sockaddr_in *)&ss)->sin_port = htons((uint16_t)port);
        else if (ss.ss_family == AF_INET6)
            ((struct sockaddr_in6 *)&ss)->sin6_port = htons((uint16_t)port);
    }
    int fd = socket(ai->ai_family, ai->ai_socktype | SOCK_NONBLOCK | SOCK_CLOEXEC,
                    ai->ai_protocol);
    if (fd < 0)
        return -errno;
    int one = 1;
    if (setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one) < 0)
        goto fail;
#ifdef SO_REUSEPORT
    if (reuse_port && setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof one) < 0)
        goto fail;
#else
    if (reuse_port) {
        errno = ENOPROTOOPT;
        goto fail;
    }
#endif
    /* Without V6ONLY, "::" would take the IPv4 port too and the IPv4 bind of
     * the same host name would fail. */
    if (ai->ai_family == AF_INET6 &&
        setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &one, sizeof one) < 0)
        goto fail;
    if (bind(fd, (struct sockaddr *)&ss, ai->ai_addrlen) < 0)
        goto fail;
    if (listen(fd, backlog) < 0)
        goto fail;
    return fd;
fail:;
    int e = errno;
    close(fd);
    return -e;
}

static int bound_port(int fd)
{
    struct sockaddr_storage ss;
    socklen_t sl = sizeof ss;
    if (getsockname(fd, (struct sockaddr *)&ss, &sl) < 0)
        return -errno;
    if (ss.ss_family == AF_INET)
        return ntohs(((struct sockaddr_in *)&ss)->sin_port);
    return ntohs(((struct sockaddr_in6 *)&ss)->sin6_port);
}

int pp__listen(pp_server *srv)
{
    const char *host = srv->cfg.host && *srv->cfg.host ? srv->cfg.host : NULL;
    char port[16];
    snprintf(port, sizeof port, "%d", srv->cfg.port);
    struct addrinfo hints = {0}, *res = NULL;
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV;
    int rc = getaddrinfo(host, port, &hints, &res);
    if (rc != 0)
        return rc == EAI_SYSTEM ? -errno : (rc == EAI_MEMORY ? -ENOMEM : -EADDRNOTAVAIL);

    int first_err = 0, chosen = srv->cfg.port;
    srv->nlisten = 0;
    for (struct addrinfo *ai = res; ai && srv->nlisten < PP_MAX_LISTENERS; ai = ai->ai_next) {
        if (ai->ai_family != AF_INET && ai->ai_family != AF_INET6)
            continue;
        int fd = listen_one(ai, chosen, srv->cfg.backlog, srv->cfg.reuse_port);
        if (fd < 0) {
            /* A family the machine lacks is skipped if another one binds;
             * anything else (EADDRINUSE, EACCES) fails the whole server. */
            if (fd != -EAFNOSUPPORT && fd != -EADDRNOTAVAIL) {
                rc = fd;
                goto fail;
            }
            if (!first_err)
                first_err = fd;
            continue;
        }
        srv->listen_fd[srv->nlisten++] = fd;
        if (chosen == 0) {
            chosen = bound_port(fd);
            if (chosen < 0) {
                rc = chosen;
                goto fail;
            }
        }
    }
    freeaddrinfo(res);
    if (srv->nlisten == 0)
        return first_err ? first_err : -EADDRNOTAVAIL;
    return 0;
fail:
    freeaddrinfo(res);
    pp__listen_close(srv);
    return rc;
}

/* A duplicate of the caller's listening stream socket, non-blocking (a
 * flag the caller's descriptor shares), or -errno. */
static int take_listener(int given)
{
    int type = 0, acc = 0;
    socklen_t tl = sizeof type, al = sizeof acc;
    if (getsockopt(given, SOL_SOCKET, SO_TYPE, &type, &tl) < 0 ||
        getsockopt(given, SOL_SOCKET, SO_ACCEPTCONN, &acc, &al) < 0)
        return -errno; /* EBADF, or ENOTSOCK for a pipe or a file */
    if (type != SOCK_STREAM || !acc)
        return -EINVAL; /* a datagram socket, or one not listening */
    int fd = fcntl(given, F_DUPFD_CLOEXEC, 3);
    if (fd < 0)
        return -errno;
    int fl = fcntl(fd, F_GETFL);
    if (fl < 0 || fcntl(fd, F_SETFL, fl | O_NONBLOCK) < 0) {
        int e = errno;
        close(fd);
        return -e;
    }
    return fd;
}

int pp__listen_fds(pp_server *srv, const int *fds, size_t n)
{
    srv->nlisten = 0;
    for (size_t i = 0; i < n; i++) {
        int fd = take_listener(fds[i]);
        if (fd < 0) {
            pp__listen_close(srv);
            return fd;
        }
        srv->listen_fd[srv->nlisten++] = fd;
    }
    return 0;
}

int pp__health_open(pp_server *srv, int given)
{
    int fd = take_listener(given);
    if (fd < 0)
        return fd;
    srv->health_fd = fd;
    return 0;
}

void pp__listen_close(pp_server *srv)
{
    for (int i = 0; i < srv->nlisten; i++) {
        if (srv->listen_fd[i] >= 0)
            close(srv->listen_fd[i]);
        srv->listen_fd[i] = -1;
    }
    if (srv->health_fd >= 0)
        close(srv->health_fd);
    srv->health_fd = -1;
}
