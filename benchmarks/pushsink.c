/*
 * pushsink.c - the receiving side of the push benchmarks (benchmarks/push.py).
 *
 * Opens NCONN connections, says "connected" on stdout, then counts the
 * line-framed messages the server pushes.  Every message starts with
 * "<t_ns>:<source>:<seq>:" (t_ns from CLOCK_MONOTONIC, which the server shares
 * on this machine): the sink measures delivery latency and checks that each
 * source's messages arrive in order on every connection, none lost or
 * repeated.  In chat mode each connection also sends such lines at RATE per
 * second (source = its index), for the server to fan out to its room.
 *
 *   pushsink HOST PORT NCONN EXPECT TIMEOUT_S [RATE DURATION_S]
 *
 * Stops when EXPECT messages have arrived in all (0: at the end of the chat
 * duration plus a second to drain), or at TIMEOUT_S.  Prints one JSON line.
 * PUSHSINK_STALLED=N opens N more connections, with 4 KiB receive buffers,
 * that are greeted and then never read again: slow subscribers.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAX_SOURCES 1024
#define BUF 65536
#define LAT_BUCKETS 200000 /* microseconds, 0..200 ms; the last one is "more" */

typedef struct conn {
    int fd;
    size_t len;
    unsigned char buf[2048];
    uint32_t *next_seq;         /* per source, lazily allocated */
    uint64_t sent;
} conn;

static int64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static uint64_t lat_hist[LAT_BUCKETS];
static uint64_t delivered, bad_order, bad_format, lat_n;
static int64_t first_ns, last_ns;

static void on_message(conn *c, const unsigned char *p, size_t n, int64_t now)
{
    char tmp[96];
    size_t k = n < sizeof tmp - 1 ? n : sizeof tmp - 1;
    memcpy(tmp, p, k);
    tmp[k] = 0;
    long long t;
    unsigned src, seq;
    if (sscanf(tmp, "%lld:%u:%u:", &t, &src, &seq) != 3 || src >= MAX_SOURCES) {
        bad_format++;
        return;
    }
    if (c->next_seq == NULL) {
        c->next_seq = calloc(MAX_SOURCES, sizeof *c->next_seq);
        if (c->next_seq == NULL)
            abort();
    }
    if (seq != c->next_seq[src])
        bad_order++;
    c->next_seq[src] = seq + 1;
    delivered++;
    if (first_ns == 0)
        first_ns = now;
    last_ns = now;
    int64_t us = (now - t) / 1000;
    if (us < 0)
        us = 0;
    lat_hist[us < LAT_BUCKETS ? us : LAT_BUCKETS - 1]++;
    lat_n++;
}

static double percentile(double q)
{
    uint64_t want = (uint64_t)(q * (double)lat_n), seen = 0;
    for (size_t i = 0; i < LAT_BUCKETS; i++) {
        seen += lat_hist[i];
        if (seen > want)
            return (double)i;
    }
    return (double)LAT_BUCKETS;
}

int main(int argc, char **argv)
{
    if (argc < 6) {
        fprintf(stderr, "usage: pushsink HOST PORT NCONN EXPECT TIMEOUT_S [RATE DURATION_S]\n");
        return 2;
    }
    const char *host = argv[1];
    int port = atoi(argv[2]);
    int nconn = atoi(argv[3]);
    uint64_t expect = strtoull(argv[4], NULL, 10);
    double timeout_s = atof(argv[5]);
    double rate = argc > 7 ? atof(argv[6]) : 0.0;   /* messages/s per connection */
    double duration = argc > 7 ? atof(argv[7]) : 0.0;
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
    conn *cs = calloc((size_t)nconn, sizeof *cs);
    int ep = epoll_create1(0);
    if (cs == NULL || ep < 0)
        return 1;
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    inet_pton(AF_INET, host, &sa.sin_addr);
    const char *stalled_env = getenv("PUSHSINK_STALLED");
    int stalled = stalled_env ? atoi(stalled_env) : 0;
    for (int i = 0; i < stalled; i++) {
        int fd = socket(AF_INET, SOCK_STREAM, 0);
        int small = 4096;
        setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &small, sizeof small);
        if (fd < 0 || connect(fd, (struct sockaddr *)&sa, sizeof sa) < 0) {
            fprintf(stderr, "connect stalled %d: %s\n", i, strerror(errno));
            return 1;
        }
        char greeting[16];
        if (recv(fd, greeting, sizeof greeting, 0) <= 0)
            return 1;
        /* kept open, never read again */
    }
    for (int i = 0; i < nconn; i++) {
        int fd = socket(AF_INET, SOCK_STREAM, 0);
        if (fd < 0 || connect(fd, (struct sockaddr *)&sa, sizeof sa) < 0) {
            fprintf(stderr, "connect %d: %s\n", i, strerror(errno));
            return 1;
        }
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        fcntl(fd, F_SETFL, O_NONBLOCK);
        cs[i].fd = fd;
        struct epoll_event ev = {.events = EPOLLIN, .data.u32 = (uint32_t)i};
        epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev);
    }
    /* Every connection greets with one line ("ready"): then it counts. */
    int greeted = 0;
    struct epoll_event evs[256];
    unsigned char rbuf[BUF];
    while (greeted < nconn) {
        int n = epoll_wait(ep, evs, 256, 10000);
        if (n <= 0) {
            fprintf(stderr, "only %d of %d greeted\n", greeted, nconn);
            return 1;
        }
        for (int j = 0; j < n; j++) {
            conn *c = &cs[evs[j].data.u32];
            ssize_t k = recv(c->fd, rbuf, sizeof rbuf, 0);
            if (k <= 0)
                continue;
            unsigned char *nl = memchr(rbuf, '\n', (size_t)k);
            if (nl == NULL || c->len == SIZE_MAX)
                continue;
            greeted++;
            c->len = (size_t)(rbuf + k - (nl + 1));
            memcpy(c->buf, nl + 1, c->len);
        }
    }
    printf("connected\n");
    fflush(stdout);
    int64_t start = now_ns();
    int64_t deadline = start + (int64_t)(timeout_s * 1e9);
    int64_t chat_end = start + (int64_t)(duration * 1e9);
    int64_t next_send = start;
    int64_t send_every = rate > 0 ? (int64_t)(1e9 / (rate * nconn)) : 0;
    int sender = 0;
    uint64_t sent_total = 0;
    for (;;) {
        int64_t now = now_ns();
        if (now > deadline)
            break;
        if (expect && delivered >= expect)
            break;
        if (!expect && rate > 0 && now > chat_end + 1000000000LL)
            break;
        /* Chat: round robin over the connections at the rate asked. */
        while (rate > 0 && now < chat_end && next_send <= now) {
            conn *c = &cs[sender];
            char line[80];
            int n = snprintf(line, sizeof line, "%lld:%d:%llu:", (long long)now_ns(), sender,
                             (unsigned long long)c->sent);
            while (n < 63)
                line[n++] = '.';
            line[n++] = '\n';
            if (send(c->fd, line, (size_t)n, MSG_NOSIGNAL) == n) {
                c->sent++;
                sent_total++;
            }
            sender = (sender + 1) % nconn;
            next_send += send_every;
        }
        int wait_ms = 1;
        int n = epoll_wait(ep, evs, 256, wait_ms);
        now = now_ns();
        for (int j = 0; j < n; j++) {
            conn *c = &cs[evs[j].data.u32];
            for (;;) {
                ssize_t k = recv(c->fd, rbuf, sizeof rbuf, 0);
                if (k <= 0)
                    break;
                size_t off = 0;
                while (off < (size_t)k) {
                    unsigned char *nl = memchr(rbuf + off, '\n', (size_t)k - off);
                    size_t piece = nl ? (size_t)(nl - (rbuf + off)) : (size_t)k - off;
                    /* Only the head of a message is parsed: keep what fits. */
                    size_t keep = sizeof c->buf - c->len < piece ? sizeof c->buf - c->len
                                                                 : piece;
                    memcpy(c->buf + c->len, rbuf + off, keep);
                    c->len += keep;
                    if (nl == NULL) {
                        off = (size_t)k;
                        break;
                    }
                    on_message(c, c->buf, c->len, now);
                    c->len = 0;
                    off += piece + 1;
                }
                if ((size_t)k < sizeof rbuf)
                    break;
            }
        }
    }
    double secs = (double)(last_ns - first_ns) / 1e9;
    printf("{\"delivered\": %llu, \"sent\": %llu, \"seconds\": %.6f, \"per_s\": %.1f, "
           "\"p50_us\": %.0f, \"p99_us\": %.0f, \"bad_order\": %llu, \"bad_format\": %llu}\n",
           (unsigned long long)delivered, (unsigned long long)sent_total, secs,
           secs > 0 ? (double)delivered / secs : 0.0, percentile(0.5), percentile(0.99),
           (unsigned long long)bad_order, (unsigned long long)bad_format);
    return 0;
}
