/*
 * connrate.c - connections per second, one request each: connect, send an
 * optional PROXY v2 header and one line, read the reply line, close.  T
 * threads, each one connection at a time, for D seconds; prints one JSON
 * line: connections, errors, seconds.
 *
 *   connrate --port P [--threads T] [--duration D] [--proxy]
 */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static int port, proxy;
static double duration = 3.0;
static atomic_long done, errors;
static atomic_int stop;

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static int one(void)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0)
        return -1;
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    int one_ = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one_, sizeof one_);
    if (connect(fd, (struct sockaddr *)&sa, sizeof sa) < 0) {
        close(fd);
        return -1;
    }
    /* PROXY v2, PROXY command, TCP over IPv4: 198.18.0.1:1234 -> 198.18.0.2:9000. */
    static const unsigned char hdr[] = {
        0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A,
        0x21, 0x11, 0x00, 0x0C, 198, 18, 0, 1, 198, 18, 0, 2, 0x04, 0xD2, 0x23, 0x28,
        'p', 'i', 'n', 'g', '\n'};
    const unsigned char *msg = proxy ? hdr : hdr + 28;
    size_t len = proxy ? sizeof hdr : 5;
    int rc = -1;
    if (send(fd, msg, len, MSG_NOSIGNAL) == (ssize_t)len) {
        char buf[64];
        size_t got = 0;
        while (got < 5) {
            ssize_t n = recv(fd, buf + got, sizeof buf - got, 0);
            if (n <= 0)
                break;
            got += (size_t)n;
        }
        rc = got == 5 && memcmp(buf, "ping\n", 5) == 0 ? 0 : -1;
    }
    close(fd);
    return rc;
}

static void *worker(void *arg)
{
    (void)arg;
    while (!atomic_load(&stop)) {
        if (one() == 0)
            atomic_fetch_add(&done, 1);
        else
            atomic_fetch_add(&errors, 1);
    }
    return NULL;
}

int main(int argc, char **argv)
{
    int threads = 4;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--port") && i + 1 < argc)
            port = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--threads") && i + 1 < argc)
            threads = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--duration") && i + 1 < argc)
            duration = atof(argv[++i]);
        else if (!strcmp(argv[i], "--proxy"))
            proxy = 1;
        else {
            fprintf(stderr, "usage: connrate --port P [--threads T] [--duration D] [--proxy]\n");
            return 2;
        }
    }
    if (port <= 0 || threads < 1 || threads > 256)
        return 2;
    pthread_t t[256];
    double t0 = now();
    for (int i = 0; i < threads; i++)
        if (pthread_create(&t[i], NULL, worker, NULL) != 0)
            return 1;
    struct timespec ts = {(time_t)duration, (long)((duration - (double)(time_t)duration) * 1e9)};
    nanosleep(&ts, NULL);
    atomic_store(&stop, 1);
    for (int i = 0; i < threads; i++)
        pthread_join(t[i], NULL);
    printf("{\"connections\": %ld, \"errors\": %ld, \"seconds\": %.3f}\n", atomic_load(&done),
           atomic_load(&errors), now() - t0);
    return 0;
}
