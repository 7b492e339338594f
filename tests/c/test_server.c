/* test_server.c - the whole server through its public C entry points only
 * (pp_server.h): real sockets on 127.0.0.1, client threads with blocking
 * sockets and receive/send timeouts, so a bug shows up as a failed check,
 * never as a hang.  Each test runs in a forked child with alarm() as a
 * watchdog, so a failure, a leak found at exit or a hang is reported under
 * the test's name and the tests after it still run. */
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <semaphore.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <sys/un.h>
#include <stdlib.h>
#include <string.h>
#include <arpa/inet.h>
#include <fcntl.h>
#include <sys/ioctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "check.h"
#include "pp_server.h"

#define RECV_TIMEOUT_S 15

static int scale_pct(void)
{
    const char *s = getenv("PP_TEST_SCALE");
    int v = s ? atoi(s) : 100;
    return v > 0 ? v : 100;
}

/* n scaled by PP_TEST_SCALE, at least lo. */
static size_t scaled(size_t n, size_t lo)
{
    size_t v = n * (size_t)scale_pct() / 100;
    return v < lo ? lo : v;
}


/* ---- framing on the client side ---------------------------------------- */

typedef struct wire {
    int framing;               /* PP_FRAMING_* */
    const char *delim;         /* line */
    size_t delim_len;
    int header_bytes;          /* length */
} wire;

static const wire LINE_LF = {PP_FRAMING_LINE, "\n", 1, 0};
static const wire LINE_CRLF = {PP_FRAMING_LINE, "\r\n", 2, 0};
static const wire LENGTH4 = {PP_FRAMING_LENGTH, NULL, 0, 4};
static const wire RAW = {PP_FRAMING_RAW, NULL, 0, 0};

typedef struct bytes {
    unsigned char *p;
    size_t n, cap;
} bytes;

static void bytes_put(bytes *b, const void *p, size_t n)
{
    if (b->n + n > b->cap) {
        size_t cap = b->cap ? b->cap : 1024;
        while (cap < b->n + n)
            cap *= 2;
        b->p = realloc(b->p, cap);
        CHECK(b->p != NULL);
        b->cap = cap;
    }
    if (n)
        memcpy(b->p + b->n, p, n);
    b->n += n;
}

static void bytes_free(bytes *b)
{
    free(b->p);
    memset(b, 0, sizeof *b);
}

static void frame_put(bytes *b, const wire *w, const void *msg, size_t n)
{
    if (w->framing == PP_FRAMING_LENGTH) {
        unsigned char h[8];
        uint64_t v = n;
        for (int i = w->header_bytes; i-- > 0; v >>= 8)
            h[i] = (unsigned char)v;
        bytes_put(b, h, (size_t)w->header_bytes);
    }
    bytes_put(b, msg, n);
    if (w->framing == PP_FRAMING_LINE)
        bytes_put(b, w->delim, w->delim_len);
}

/* The backend every test runs on: PP_TEST_BACKEND=poll|epoll. */
static int test_backend(void)
{
    const char *b = getenv("PP_TEST_BACKEND");
    if (b == NULL || strcmp(b, "poll") == 0)
        return PP_BACKEND_POLL;
    if (strcmp(b, "epoll") == 0)
        return PP_BACKEND_EPOLL;
    fprintf(stderr, "unknown PP_TEST_BACKEND %s\n", b);
    exit(2);
}

static void config_for(pp_config *cfg, const wire *w)
{
    pp_config_init(cfg);
    cfg->backend = test_backend();
    cfg->host = "127.0.0.1";
    cfg->port = 0;
    cfg->framing = w->framing;
    if (w->framing == PP_FRAMING_LINE) {
        memcpy(cfg->delimiter, w->delim, w->delim_len);
        cfg->delimiter_len = w->delim_len;
    }
    if (w->framing == PP_FRAMING_LENGTH)
        cfg->header_bytes = w->header_bytes;
    cfg->drain_timeout = 10.0;
}

/* ---- the test handler -------------------------------------------------- */

typedef struct hstate {
    atomic_int jitter;         /* sleep a little per message, to mix up workers */
    atomic_uint_fast64_t calls;
    sem_t entered, gate;       /* for "block" */
    atomic_int in_block;
    atomic_int double_rc;      /* 0 or -errno of the failed pp_reply_write */
} hstate;

static hstate H;

static int is(const unsigned char *m, size_t n, const char *s)
{
    return n == strlen(s) && memcmp(m, s, n) == 0;
}

/* Uppercases the message and replies with it, written in several pieces so
 * one reply is built from many pp_reply_write() calls.  Commands:
 * "quit" replies "BYE" and closes, "fail" returns an error, "silent" sends
 * no reply, "id" replies with the connection id, "block" waits for the test. */
static int upper_handler(void *ctx, const unsigned char *msg, size_t len,
                         pp_reply *reply)
{
    hstate *h = ctx;
    atomic_fetch_add(&h->calls, 1);
    CHECK(pp_reply_conn_id(reply) != 0);
    if (is(msg, len, "quit"))
        return pp_reply_write(reply, "BYE", 3) < 0 ? -1 : PP_CLOSE;
    if (is(msg, len, "slowquit")) {
        /* Long enough for the client's next messages to arrive and be
         * read while this task is in flight. */
        usleep(150 * 1000);
        return pp_reply_write(reply, "BYE", 3) < 0 ? -1 : PP_CLOSE;
    }
    if (is(msg, len, "fail"))
        return -5;
    if (is(msg, len, "slowfail")) {
        usleep(150 * 1000);
        return -5;
    }
    if (is(msg, len, "silent"))
        return PP_KEEP;
    if (is(msg, len, "bigquit")) {
        /* 1 MiB, then close: the whole of it must reach a slow reader. */
        static unsigned char mib[1 << 20];
        memset(mib, 'B', sizeof mib);
        return pp_reply_write(reply, mib, sizeof mib) < 0 ? -1 : PP_CLOSE;
    }
    if (is(msg, len, "partialfail")) {
        /* Half a reply, then an error: none of it may leave. */
        CHECK_EQ(pp_reply_write(reply, "BALANCE=", 8), 0);
        return -5;
    }
    if (is(msg, len, "id")) {
        char s[32];
        int n = snprintf(s, sizeof s, "%llu", (unsigned long long)pp_reply_conn_id(reply));
        return pp_reply_write(reply, s, (size_t)n) < 0 ? -1 : PP_KEEP;
    }
    if (len >= 7 && memcmp(msg, "double:", 7) == 0) {
        /* The reply is twice the payload: too big for a 1-byte header once
         * the payload passes 127 bytes. */
        int a = pp_reply_write(reply, msg + 7, len - 7);
        int ea = a < 0 ? errno : 0;
        int b = pp_reply_write(reply, msg + 7, len - 7);
        int eb = b < 0 ? errno : 0;
        atomic_store(&h->double_rc, a < 0 ? -ea : b < 0 ? -eb : 0);
        return PP_KEEP;
    }
    if (is(msg, len, "block")) {
        atomic_fetch_add(&h->in_block, 1);
        sem_post(&h->entered);
        while (sem_wait(&h->gate) != 0)
            CHECK(errno == EINTR);
        atomic_fetch_sub(&h->in_block, 1);
        return pp_reply_write(reply, "UNBLOCKED", 9) < 0 ? -1 : PP_KEEP;
    }
    if (atomic_load_explicit(&h->jitter, memory_order_relaxed)) {
        uint64_t x = len;
        for (size_t i = 0; i < len && i < 32; i++)
            x = x * 31 + msg[i];
        if (x % 4 == 0)
            usleep((useconds_t)(x % 700));
    }
    unsigned char tmp[97];     /* odd size: pieces do not align with anything */
    size_t off = 0;
    if (len == 0)
        return pp_reply_write(reply, "", 0) < 0 ? -1 : PP_KEEP;
    while (off < len) {
        size_t n = len - off < sizeof tmp ? len - off : sizeof tmp;
        for (size_t i = 0; i < n; i++) {
            unsigned char c = msg[off + i];
            tmp[i] = c >= 'a' && c <= 'z' ? (unsigned char)(c - 32) : c;
        }
        if (pp_reply_write(reply, tmp, n) < 0)
            return -1;
        off += n;
    }
    return PP_KEEP;
}

/* config_for() serving upper_handler, with the shutdown message bye unless
 * it is NULL. */
static void config_upper(pp_config *cfg, const wire *w, const char *bye)
{
    config_for(cfg, w);
    cfg->handler = upper_handler;
    cfg->ctx = &H;
    if (bye != NULL) {
        cfg->shutdown_message = (const unsigned char *)bye;
        cfg->shutdown_message_len = strlen(bye);
    }
}

/* The batch flavour (what the Python glue uses): every message of a task
 * at once, one pp_reply_send() per reply; "quit" replies "BYE" and closes. */
static int batch_upper(void *ctx, pp_reply *reply, const pp_msg *msgs, size_t n)
{
    hstate *h = ctx;
    CHECK(n > 0);
    for (size_t i = 0; i < n; i++) {
        atomic_fetch_add(&h->calls, 1);
        if (is(msgs[i].data, msgs[i].len, "quit"))
            return pp_reply_send(reply, "BYE", 3) < 0 ? -1 : PP_CLOSE;
        unsigned char *tmp = malloc(msgs[i].len ? msgs[i].len : 1);
        CHECK(tmp);
        for (size_t j = 0; j < msgs[i].len; j++) {
            unsigned char c = msgs[i].data[j];
            tmp[j] = c >= 'a' && c <= 'z' ? (unsigned char)(c - 32) : c;
        }
        int rc = pp_reply_send(reply, tmp, msgs[i].len);
        free(tmp);
        if (rc < 0)
            return -1;
    }
    return PP_KEEP;
}

static void upper_bytes(unsigned char *p, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (p[i] >= 'a' && p[i] <= 'z')
            p[i] = (unsigned char)(p[i] - 32);
}

/* ---- server and client helpers ---------------------------------------- */

static pp_server *server_up(const pp_config *cfg, int *port)
{
    pp_server *srv = NULL;
    int rc = pp_server_new(cfg, &srv);
    CHECKF(rc == 0, "pp_server_new: %s", strerror(-rc));
    CHECK(srv != NULL);
    char host[64];
    CHECK_EQ(pp_server_address(srv, host, sizeof host, port), 0);
    CHECKF(strcmp(host, "127.0.0.1") == 0, "address %s", host);
    CHECK(*port > 0 && *port < 65536);
    CHECK_EQ(pp_server_start(srv), 0);
    return srv;
}

/* Graceful stop, join, and the counters as they ended. */
static void server_down(pp_server *srv, pp_stats *st)
{
    pp_server_stop(srv, 0);
    CHECK_EQ(pp_server_join(srv), 0);
    CHECK(pp_server_done(srv));
    CHECK(!pp_server_was_forced(srv));
    pp_server_stats(srv, st);
    CHECK_EQ(st->active, 0);
    CHECK_EQ(st->accepted, st->closed);
    pp_server_free(srv);
}

static void set_timeouts(int fd, int rcv_ms, int snd_ms)
{
    struct timeval tv = {rcv_ms / 1000, (rcv_ms % 1000) * 1000};
    CHECK(setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv) == 0);
    struct timeval tv2 = {snd_ms / 1000, (snd_ms % 1000) * 1000};
    CHECK(setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv2, sizeof tv2) == 0);
}

/* bufsize > 0 sets SO_RCVBUF and SO_SNDBUF before connecting, so the
 * window the peer sees is small from the start. */
static int client_connect_buf(int port, int bufsize)
{
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    CHECKF(fd >= 0, "socket: %s", strerror(errno));
    if (bufsize > 0) {
        CHECK(setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &bufsize, sizeof bufsize) == 0);
        CHECK(setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &bufsize, sizeof bufsize) == 0);
    }
    set_timeouts(fd, RECV_TIMEOUT_S * 1000, RECV_TIMEOUT_S * 1000);
    struct sockaddr_in sa = {0};
    sa.sin_family = AF_INET;
    sa.sin_port = htons((uint16_t)port);
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    CHECKF(connect(fd, (struct sockaddr *)&sa, sizeof sa) == 0, "connect: %s",
           strerror(errno));
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    return fd;
}

static int client_connect(int port)
{
    return client_connect_buf(port, 0);
}

static void send_all(int fd, const void *p, size_t n)
{
    const unsigned char *c = p;
    while (n > 0) {
        ssize_t k = send(fd, c, n, MSG_NOSIGNAL);
        if (k < 0 && errno == EINTR)
            continue;
        CHECKF(k > 0, "send: %s", k < 0 ? strerror(errno) : "0");
        c += k;
        n -= (size_t)k;
    }
}

static void send_str(int fd, const wire *w, const char *s)
{
    bytes b = {0};
    frame_put(&b, w, s, strlen(s));
    send_all(fd, b.p, b.n);
    bytes_free(&b);
}

/* Reads exactly n bytes; fails the test on timeout, error or early EOF. */
static void recv_exact(int fd, void *p, size_t n)
{
    unsigned char *c = p;
    while (n > 0) {
        ssize_t k = recv(fd, c, n, 0);
        if (k < 0 && errno == EINTR)
            continue;
        CHECKF(k > 0, "recv with %zu bytes to go: %s", n,
               k < 0 ? strerror(errno) : "EOF");
        c += k;
        n -= (size_t)k;
    }
}

/* Reads one framed reply and compares it with want. */
static void expect_reply(int fd, const wire *w, const char *want)
{
    bytes b = {0};
    frame_put(&b, w, want, strlen(want));
    unsigned char *got = malloc(b.n);
    CHECK(got);
    recv_exact(fd, got, b.n);
    CHECKF(memcmp(got, b.p, b.n) == 0, "reply differs from \"%s\": \"%.*s\"", want,
           (int)b.n, (const char *)got);
    free(got);
    bytes_free(&b);
}

/* The peer closed its side: recv() returns 0 (not a timeout).  A reset
 * after all expected bytes arrived would also be an orderly-enough close,
 * but the server lingers precisely so that it is not one. */
static void expect_eof(int fd)
{
    unsigned char c;
    ssize_t k;
    do
        k = recv(fd, &c, 1, 0);
    while (k < 0 && errno == EINTR);
    CHECKF(k == 0, "expected EOF, got %s",
           k > 0 ? "data" : strerror(errno));
}

/* Cut: EOF or a reset (a refused peer's unread bytes turn the close into
 * one), never data, never a timeout. */
static void expect_cut(int fd)
{
    unsigned char c;
    ssize_t k;
    do
        k = recv(fd, &c, 1, 0);
    while (k < 0 && errno == EINTR);
    CHECKF(k == 0 || (k < 0 && errno == ECONNRESET), "expected a close, got %s",
           k > 0 ? "data" : strerror(errno));
}

/* Nothing arrives within ms milliseconds. */
static void expect_silence(int fd, int ms)
{
    set_timeouts(fd, ms, RECV_TIMEOUT_S * 1000);
    unsigned char c;
    ssize_t k = recv(fd, &c, 1, 0);
    CHECKF(k < 0 && (errno == EAGAIN || errno == EWOULDBLOCK),
           "expected nothing, got %s", k > 0 ? "data" : k == 0 ? "EOF" : strerror(errno));
    set_timeouts(fd, RECV_TIMEOUT_S * 1000, RECV_TIMEOUT_S * 1000);
}

/* ---- pipelining clients ------------------------------------------------ */

/* One client: a writer thread sends the framed requests in random pieces
 * while the reader reads the replies in random pieces and compares every
 * byte with what it expects. */
typedef struct session {
    int port;
    const wire *w;
    size_t nmsg;
    size_t min_len, max_len;
    int upper;                 /* handler uppercases */
    int half_close;            /* shutdown(SHUT_WR) after the last request, expect EOF */
    int max_piece;             /* largest write */
    uint64_t seed;
    int id;
    /* filled in */
    bytes out, expect;
    int fd;
} session;

static void session_build(session *s)
{
    uint64_t rng = s->seed;
    unsigned char *msg = malloc(s->max_len + 64);
    CHECK(msg);
    static const char alpha[] = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_";
    for (size_t i = 0; i < s->nmsg; i++) {
        /* Numbered, so a reordered or lost reply names itself. */
        int hn = snprintf((char *)msg, 64, "c%d-m%zu:", s->id, i);
        size_t len = (size_t)check_range(&rng, s->min_len, s->max_len);
        if (len < (size_t)hn)
            len = (size_t)hn;
        for (size_t j = (size_t)hn; j < len; j++) {
            if (s->w->framing == PP_FRAMING_LINE)
                msg[j] = (unsigned char)alpha[check_rand(&rng) % 64];
            else
                msg[j] = (unsigned char)check_rand(&rng);
        }
        if (s->w->framing == PP_FRAMING_RAW) {
            bytes_put(&s->out, msg, len);
        } else {
            frame_put(&s->out, s->w, msg, len);
            if (s->upper)
                upper_bytes(msg, len);
            frame_put(&s->expect, s->w, msg, len);
        }
    }
    if (s->w->framing == PP_FRAMING_RAW) {
        /* Raw: the reply stream is the request stream, transformed. */
        bytes_put(&s->expect, s->out.p, s->out.n);
        if (s->upper)
            upper_bytes(s->expect.p, s->expect.n);
    }
    free(msg);
}

static void *session_writer(void *arg)
{
    session *s = arg;
    uint64_t rng = s->seed ^ 0xabcdef;
    size_t off = 0;
    while (off < s->out.n) {
        size_t piece = (size_t)check_range(&rng, 1, (uint64_t)s->max_piece);
        if (check_rand(&rng) % 8 == 0)
            piece = 1;          /* single bytes split frames everywhere */
        if (piece > s->out.n - off)
            piece = s->out.n - off;
        send_all(s->fd, s->out.p + off, piece);
        off += piece;
    }
    if (s->half_close)
        CHECK(shutdown(s->fd, SHUT_WR) == 0);
    return NULL;
}

static void session_read(session *s)
{
    uint64_t rng = s->seed ^ 0x1234;
    unsigned char *got = malloc(s->expect.n ? s->expect.n : 1);
    CHECK(got);
    size_t off = 0;
    while (off < s->expect.n) {
        size_t want = (size_t)check_range(&rng, 1, 20000);
        if (want > s->expect.n - off)
            want = s->expect.n - off;
        ssize_t k = recv(s->fd, got + off, want, 0);
        if (k < 0 && errno == EINTR)
            continue;
        CHECKF(k > 0, "client %d: recv at %zu of %zu: %s", s->id, off, s->expect.n,
               k < 0 ? strerror(errno) : "EOF");
        CHECKF(memcmp(got + off, s->expect.p + off, (size_t)k) == 0,
               "client %d: reply bytes differ near offset %zu of %zu", s->id, off,
               s->expect.n);
        off += (size_t)k;
    }
    free(got);
}

static void *session_main(void *arg)
{
    session *s = arg;
    s->fd = client_connect(s->port);
    pthread_t wt;
    CHECK(pthread_create(&wt, NULL, session_writer, s) == 0);
    session_read(s);
    CHECK(pthread_join(wt, NULL) == 0);
    if (s->half_close)
        expect_eof(s->fd);
    close(s->fd);
    return NULL;
}

/* Runs n sessions at once and waits for them. */
static void run_sessions(session *ss, size_t n)
{
    pthread_t *t = calloc(n, sizeof *t);
    CHECK(t);
    for (size_t i = 0; i < n; i++) {
        session_build(&ss[i]);
        CHECK(pthread_create(&t[i], NULL, session_main, &ss[i]) == 0);
    }
    for (size_t i = 0; i < n; i++)
        CHECK(pthread_join(t[i], NULL) == 0);
    free(t);
}

static void sessions_free(session *ss, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        bytes_free(&ss[i].out);
        bytes_free(&ss[i].expect);
    }
}

/* Waits until the counter at offset off of pp_stats equals n (exact) or
 * reaches it. */
static void wait_stat(pp_server *srv, size_t off, const char *name, uint64_t n,
                      int exact)
{
    int64_t until = now_ms() + 10000;
    pp_stats st;
    for (;;) {
        pp_server_stats(srv, &st);
        uint64_t v;
        memcpy(&v, (const char *)&st + off, sizeof v);
        if (exact ? v == n : v >= n)
            return;
        CHECKF(now_ms() < until, "%s stays %llu, expected %s%llu", name,
               (unsigned long long)v, exact ? "" : "at least ",
               (unsigned long long)n);
        sleep_ms(2);
    }
}

#define WAIT_STAT(srv, field, n, exact) \
    wait_stat(srv, offsetof(pp_stats, field), #field, n, exact)

static void wait_active(pp_server *srv, uint64_t n)
{
    WAIT_STAT(srv, active, n, 1);
}

/* ---- tests ------------------------------------------------------------- */

static void test_config_validation(void)
{
    alarm(60);
    pp_config cfg;
    pp_server *srv = (pp_server *)0x1;
    config_for(&cfg, &LINE_LF);
    cfg.threads = 0;
    CHECK_EQ(pp_server_new(&cfg, &srv), -EINVAL);
    config_for(&cfg, &LINE_LF);
    cfg.delimiter_len = 0;
    CHECK_EQ(pp_server_new(&cfg, &srv), -EINVAL);
    config_for(&cfg, &LENGTH4);
    cfg.header_bytes = 3;
    CHECK_EQ(pp_server_new(&cfg, &srv), -EINVAL);
    config_for(&cfg, &LINE_LF);
    cfg.max_message_size = 0;
    CHECK_EQ(pp_server_new(&cfg, &srv), -EINVAL);
    config_for(&cfg, &LINE_LF);
    cfg.handler = NULL;
    CHECK_EQ(pp_server_new(&cfg, &srv), -EINVAL);
    config_for(&cfg, &LINE_LF);
    cfg.port = 70000;
    CHECK_EQ(pp_server_new(&cfg, &srv), -EINVAL);
    config_for(&cfg, &LINE_LF);
    cfg.backend = 99;
    CHECK_EQ(pp_server_new(&cfg, &srv), -EINVAL);
    config_for(&cfg, &LINE_LF);
    cfg.max_deferred = PP_MAX_DEFERRED + 1;
    CHECK_EQ(pp_server_new(&cfg, &srv), -EINVAL);
    config_for(&cfg, &LINE_LF);
    cfg.handler = NULL;
    cfg.batch = batch_upper;
    cfg.max_deferred = 2; /* a batch handler defers once per call */
    CHECK_EQ(pp_server_new(&cfg, &srv), -EINVAL);
    CHECK(pp_backend_name(99) == NULL);
    CHECK(strcmp(pp_backend_name(PP_BACKEND_POLL), "poll") == 0);
    CHECK(srv == (pp_server *)0x1);            /* untouched on failure */

    /* A port in use is the bind errno. */
    config_for(&cfg, &LINE_LF);
    pp_server *a = NULL, *b = NULL;
    CHECK_EQ(pp_server_new(&cfg, &a), 0);
    char host[64];
    int port;
    CHECK_EQ(pp_server_address(a, host, sizeof host, &port), 0);
    cfg.port = port;
    CHECK_EQ(pp_server_new(&cfg, &b), -EADDRINUSE);
    /* Created but never run: frees cleanly, and the port is free again. */
    pp_server_free(a);
    CHECK_EQ(pp_server_new(&cfg, &b), 0);
    pp_server_free(b);

    /* SO_REUSEPORT: servers that all ask for it share a port; one that does
     * not is refused it. */
    config_for(&cfg, &LINE_LF);
    cfg.reuse_port = 1;
    CHECK_EQ(pp_server_new(&cfg, &a), 0);
    CHECK_EQ(pp_server_address(a, host, sizeof host, &port), 0);
    cfg.port = port;
    CHECK_EQ(pp_server_new(&cfg, &b), 0);
    pp_server *c = NULL;
    cfg.reuse_port = 0;
    CHECK_EQ(pp_server_new(&cfg, &c), -EADDRINUSE);
    pp_server_free(a);
    pp_server_free(b);
}

/* Several clients pipeline numbered messages of random sizes in random
 * pieces; every reply comes back byte-exact and in order, in every framing,
 * with the echo handler and with a handler that builds its reply from many
 * writes and sleeps at random so workers finish out of order. */
enum { ECHO = 0, UPPER = 1, BATCH = 2 };

static void use_handler(pp_config *cfg, int mode)
{
    if (mode == UPPER) {
        cfg->handler = upper_handler;
        cfg->ctx = &H;
    } else if (mode == BATCH) {
        cfg->handler = NULL;
        cfg->batch = batch_upper;
        cfg->ctx = &H;
    }
}

static void test_pipelined_order(const wire *w, int mode)
{
    alarm(60);
    pp_config cfg;
    config_for(&cfg, w);
    cfg.threads = 4;
    use_handler(&cfg, mode);
    int upper = mode != ECHO;
    atomic_store(&H.jitter, mode == UPPER);
    int port;
    pp_server *srv = server_up(&cfg, &port);
    enum { NCLIENT = 4 };
    session ss[NCLIENT];
    size_t nmsg = scaled(1000, 100);
    for (int i = 0; i < NCLIENT; i++)
        ss[i] = (session){.port = port, .w = w, .nmsg = nmsg, .min_len = 0,
                          .max_len = i == 0 ? 3000 : 60, .upper = upper,
                          .max_piece = i == 1 ? 7 : 4096,
                          .seed = 1000 + (uint64_t)i, .id = i};
    run_sessions(ss, NCLIENT);
    atomic_store(&H.jitter, 0);
    pp_stats st;
    wait_active(srv, 0);
    server_down(srv, &st);
    CHECK_EQ(st.accepted, NCLIENT);
    CHECK_EQ(st.closed, NCLIENT);
    uint64_t bytes = 0;
    for (int i = 0; i < NCLIENT; i++)
        bytes += ss[i].out.n;
    CHECK_EQ(st.bytes_in, bytes);
    if (w->framing != PP_FRAMING_RAW) {
        CHECK_EQ(st.messages, NCLIENT * nmsg);
        CHECK_EQ(st.replies, NCLIENT * nmsg);
        uint64_t outn = 0;
        for (int i = 0; i < NCLIENT; i++)
            outn += ss[i].expect.n;
        CHECK_EQ(st.bytes_out, outn);
    } else {
        CHECK(st.messages >= NCLIENT);
        CHECK_EQ(st.replies, st.messages);
        CHECK_EQ(st.bytes_out, bytes);
    }
    CHECK_EQ(st.oversize_frames, 0);
    CHECK_EQ(st.handler_errors, 0);
    CHECK_EQ(st.read_errors + st.write_errors + st.nomem_errors, 0);
    sessions_free(ss, NCLIENT);
}

/* The peer sends 1000 messages, shuts its write side, and still gets all
 * 1000 replies and then an orderly EOF. */
static void test_half_close(const wire *w)
{
    alarm(60);
    pp_config cfg;
    config_for(&cfg, w);
    cfg.threads = 3;
    int port;
    pp_server *srv = server_up(&cfg, &port);
    session s = {.port = port, .w = w, .nmsg = 1000, .min_len = 1, .max_len = 40,
                 .half_close = 1, .max_piece = 512, .seed = 77, .id = 0};
    run_sessions(&s, 1);
    /* And once more where everything, EOF included, arrives in one burst. */
    session s2 = {.port = port, .w = w, .nmsg = 1000, .min_len = 1, .max_len = 40,
                  .half_close = 1, .max_piece = 1 << 20, .seed = 78, .id = 1};
    run_sessions(&s2, 1);
    pp_stats st;
    wait_active(srv, 0);
    server_down(srv, &st);
    CHECK_EQ(st.accepted, 2);
    CHECK_EQ(st.messages, 2000);
    CHECK_EQ(st.replies, 2000);
    sessions_free(&s, 1);
    sessions_free(&s2, 1);
}

/* PP_CLOSE: the reply is sent, then the connection closes; messages after
 * "quit" are not handled.  An error return closes only its connection and
 * is counted; "silent" sends nothing; connection ids are unique and stable. */
static void test_handler_close_and_errors(const wire *w)
{
    alarm(60);
    pp_config cfg;
    config_upper(&cfg, w, NULL);
    cfg.threads = 2;
    int port;
    pp_server *srv = server_up(&cfg, &port);
    uint64_t calls0 = atomic_load(&H.calls);

    int a = client_connect(port), b = client_connect(port), c = client_connect(port);
    /* Pipelined in one write: quit's reply comes, then EOF, and "after" is
     * never handled. */
    bytes req = {0};
    frame_put(&req, w, "one", 3);
    frame_put(&req, w, "silent", 6);
    frame_put(&req, w, "two", 3);
    frame_put(&req, w, "quit", 4);
    frame_put(&req, w, "after", 5);
    send_all(a, req.p, req.n);
    bytes_free(&req);
    expect_reply(a, w, "ONE");
    expect_reply(a, w, "TWO");
    expect_reply(a, w, "BYE");
    expect_eof(a);
    close(a);

    /* The error closes b after the replies before it. */
    send_str(b, w, "x");
    send_str(b, w, "fail");
    expect_reply(b, w, "X");
    expect_eof(b);
    close(b);

    /* c is unaffected by both; its id is the same for every message and
     * differs from a fresh connection's. */
    send_str(c, w, "id");
    char id1[32] = {0}, id2[32] = {0}, id3[32] = {0};
    unsigned char hdr[4];
    size_t n;
    if (w->framing == PP_FRAMING_LENGTH) {
        recv_exact(c, hdr, 4);
        n = (size_t)hdr[2] << 8 | hdr[3];
        CHECK(n > 0 && n < 32);
        recv_exact(c, id1, n);
        send_str(c, w, "id");
        recv_exact(c, hdr, 4);
        CHECK_EQ((size_t)hdr[2] << 8 | hdr[3], n);
        recv_exact(c, id2, n);
    } else {
        /* Read up to the delimiter byte by byte. */
        for (n = 0; n < 31; n++) {
            recv_exact(c, &id1[n], 1);
            if (id1[n] == w->delim[w->delim_len - 1])
                break;
        }
        id1[n + 1 - w->delim_len] = 0;
        send_str(c, w, "id");
        expect_reply(c, w, id1);
        strcpy(id2, id1);
    }
    CHECK(strcmp(id1, id2) == 0);
    CHECK(strtoull(id1, NULL, 10) != 0);
    int d = client_connect(port);
    send_str(d, w, "id");
    if (w->framing == PP_FRAMING_LENGTH) {
        recv_exact(d, hdr, 4);
        n = (size_t)hdr[2] << 8 | hdr[3];
        CHECK(n > 0 && n < 32);
        recv_exact(d, id3, n);
    } else {
        for (n = 0; n < 31; n++) {
            recv_exact(d, &id3[n], 1);
            if (id3[n] == w->delim[w->delim_len - 1])
                break;
        }
        id3[n + 1 - w->delim_len] = 0;
    }
    CHECK(strcmp(id1, id3) != 0);
    send_str(c, w, "still here");
    expect_reply(c, w, "STILL HERE");
    close(c);
    close(d);

    pp_stats st;
    wait_active(srv, 0);
    server_down(srv, &st);
    CHECK_EQ(st.accepted, 4);
    CHECK_EQ(st.handler_errors, 1);
    /* a: one silent two quit; b: x fail; c: id id "still here"; d: id */
    CHECK_EQ(st.messages, 4 + 2 + 3 + 1);
    CHECK_EQ(atomic_load(&H.calls) - calls0, 10);
    CHECK_EQ(st.replies, 3 + 1 + 3 + 1);
}

/* A frame over max_message_size closes its connection only (after the
 * replies to the frames before it) and is counted. */
static void test_oversize_line(void)
{
    alarm(60);
    pp_config cfg;
    config_for(&cfg, &LINE_LF);
    cfg.max_message_size = 100;
    cfg.threads = 2;
    int port;
    pp_server *srv = server_up(&cfg, &port);
    int good = client_connect(port), bad = client_connect(port);
    send_str(good, &LINE_LF, "before");
    expect_reply(good, &LINE_LF, "before");

    char line[101];
    memset(line, 'L', 100);
    line[100] = 0;
    send_str(bad, &LINE_LF, "ok");
    send_str(bad, &LINE_LF, line);              /* exactly max: fine */
    char big[300];
    memset(big, 'B', sizeof big);
    send_all(bad, big, sizeof big);             /* no delimiter, too long */
    expect_reply(bad, &LINE_LF, "ok");
    expect_reply(bad, &LINE_LF, line);
    expect_eof(bad);
    close(bad);

    send_str(good, &LINE_LF, "after");
    expect_reply(good, &LINE_LF, "after");
    close(good);
    pp_stats st;
    wait_active(srv, 0);
    server_down(srv, &st);
    CHECK_EQ(st.oversize_frames, 1);
    CHECK_EQ(st.accepted, 2);
    CHECK_EQ(st.messages, 4);
}

/* A length header announcing 4 GiB (4-byte header) or 2^63 (8-byte header)
 * is refused from the header alone: the connection closes at once, without
 * waiting for a body that will never come and without allocating it. */
static void test_oversize_length_header(int hb)
{
    alarm(60);
    wire w = {PP_FRAMING_LENGTH, NULL, 0, hb};
    pp_config cfg;
    config_for(&cfg, &w);
    cfg.threads = 2;
    int port;
    pp_server *srv = server_up(&cfg, &port);
    int good = client_connect(port), bad = client_connect(port);
    send_str(good, &w, "hello");
    unsigned char h[8];
    if (hb == 4)
        memset(h, 0xff, 4);
    else {
        memset(h, 0, 8);
        h[0] = 0x80;
    }
    int64_t t0 = now_ms();
    send_all(bad, h, (size_t)hb);
    expect_eof(bad);
    CHECKF(now_ms() - t0 < 5000, "took %lld ms", (long long)(now_ms() - t0));
    close(bad);
    expect_reply(good, &w, "hello");
    close(good);
    pp_stats st;
    wait_active(srv, 0);
    server_down(srv, &st);
    CHECK_EQ(st.oversize_frames, 1);
    CHECK_EQ(st.messages, 1);
}

/* The shutdown message arrives framed, after the replies to everything sent
 * before the stop, and then EOF. */
static void test_shutdown_message(const wire *w)
{
    alarm(60);
    pp_config cfg;
    config_for(&cfg, w);
    cfg.threads = 3;
    static const unsigned char bye[] = "server going down";
    cfg.shutdown_message = bye;
    cfg.shutdown_message_len = sizeof bye - 1;
    int port;
    pp_server *srv = server_up(&cfg, &port);
    enum { N = 3, PIPE = 200 };
    int fd[N];
    for (int i = 0; i < N; i++) {
        fd[i] = client_connect(port);
        send_str(fd[i], w, "warm up");
        expect_reply(fd[i], w, "warm up");
    }
    /* Client 0 leaves PIPE requests unanswered in flight when the stop
     * comes; the others are idle. */
    bytes req = {0}, want = {0};
    for (int i = 0; i < PIPE; i++) {
        char m[32];
        int n = snprintf(m, sizeof m, "pending %d", i);
        frame_put(&req, w, m, (size_t)n);
        frame_put(&want, w, m, (size_t)n);
    }
    send_all(fd[0], req.p, req.n);
    int64_t t0 = now_ms();
    pp_server_stop(srv, 0);
    unsigned char *got = malloc(want.n);
    CHECK(got);
    recv_exact(fd[0], got, want.n);
    CHECK(memcmp(got, want.p, want.n) == 0);
    free(got);
    /* Typically a few ms (about 100 under valgrind): a drain that takes
     * seconds waited for a timer instead of being woken (a lost wake-up). */
    CHECKF(now_ms() - t0 < 1500, "pending replies took %lld ms after the stop",
           (long long)(now_ms() - t0));
    for (int i = 0; i < N; i++) {
        expect_reply(fd[i], w, (const char *)bye);
        expect_eof(fd[i]);
        close(fd[i]);
    }
    CHECK_EQ(pp_server_join(srv), 0);
    CHECK(!pp_server_was_forced(srv));
    pp_stats st;
    pp_server_stats(srv, &st);
    CHECK_EQ(st.accepted, N);
    CHECK_EQ(st.closed, N);
    CHECK_EQ(st.messages, N + PIPE);
    CHECK_EQ(st.replies, N + PIPE);
    pp_server_free(srv);
    bytes_free(&req);
    bytes_free(&want);

    /* Nobody can connect once the server is gone. */
    int s = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in sa = {0};
    sa.sin_family = AF_INET;
    sa.sin_port = htons((uint16_t)port);
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    CHECK(connect(s, (struct sockaddr *)&sa, sizeof sa) < 0 && errno == ECONNREFUSED);
    close(s);
}

/* A graceful stop answers what the peer sent before it, even the part the
 * server had not read yet because the connection's input was full (behind a
 * slow handler), and only then says goodbye. */
static void test_stop_answers_unread_input(void)
{
    alarm(60);
    pp_config cfg;
    config_upper(&cfg, &LINE_LF, "bye");
    cfg.max_message_size = 1024;       /* a small input limit */
    int port;
    pp_server *srv = server_up(&cfg, &port);
    int fd = client_connect(port);
    send_str(fd, &LINE_LF, "block");
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    ts.tv_sec += 10;
    CHECK(sem_timedwait(&H.entered, &ts) == 0);
    /* More than the server reads ahead for one connection (its input limit
     * is about 66 KiB here), so the rest waits in the server's kernel
     * buffer until the handler returns.  All of it must have left this
     * socket before the stop: bytes still in our own send queue are ones
     * the server cannot know were sent. */
    bytes req = {0}, want = {0};
    frame_put(&want, &LINE_LF, "UNBLOCKED", 9);
    size_t n = 0;
    while (req.n < 100 * 1024) {
        char m[64];
        int k = snprintf(m, sizeof m, "request number %zu padding padding", n++);
        frame_put(&req, &LINE_LF, m, (size_t)k);
        upper_bytes((unsigned char *)m, (size_t)k);
        frame_put(&want, &LINE_LF, m, (size_t)k);
    }
    frame_put(&want, &LINE_LF, "bye", 3);
    send_all(fd, req.p, req.n);
    int64_t until = now_ms() + 5000;
    for (;;) {
        int outq = -1;
        CHECK(ioctl(fd, TIOCOUTQ, &outq) == 0);
        if (outq == 0)
            break;
        CHECKF(now_ms() < until, "%d bytes never left the client", outq);
        sleep_ms(5);
    }
    pp_server_stop(srv, 0);
    sleep_ms(50);
    sem_post(&H.gate);
    unsigned char *got = malloc(want.n);
    CHECK(got);
    size_t off = 0;
    while (off < want.n) {
        ssize_t k = recv(fd, got + off, want.n - off, 0);
        CHECKF(k > 0, "recv at %zu of %zu: %s", off, want.n, k < 0 ? strerror(errno) : "EOF");
        off += (size_t)k;
    }
    size_t i = 0;
    while (i < want.n && got[i] == want.p[i])
        i++;
    CHECKF(i == want.n, "replies differ at byte %zu of %zu: \"%.40s\"", i, want.n,
           (const char *)got + i);
    expect_eof(fd);
    close(fd);
    free(got);
    CHECK_EQ(pp_server_join(srv), 0);
    CHECK(!pp_server_was_forced(srv));
    pp_stats st;
    pp_server_stats(srv, &st);
    CHECK_EQ(st.messages, n + 1);
    pp_server_free(srv);
    bytes_free(&req);
    bytes_free(&want);
}

/* PP_CLOSE (or an error) from a task while more whole messages arrived
 * behind it: those are dropped and the connection still closes at once,
 * instead of hanging until the drain timeout. */
static void test_close_with_messages_behind(void)
{
    alarm(60);
    pp_config cfg;
    config_upper(&cfg, &LINE_LF, NULL);
    int port;
    pp_server *srv = server_up(&cfg, &port);
    for (int round = 0; round < 2; round++) {
        int fd = client_connect(port);
        send_str(fd, &LINE_LF, "first");
        expect_reply(fd, &LINE_LF, "FIRST");
        send_str(fd, &LINE_LF, round == 0 ? "slowquit" : "slowfail");
        sleep_ms(30);
        send_str(fd, &LINE_LF, "behind one");
        send_str(fd, &LINE_LF, "behind two");
        set_timeouts(fd, 5000, 5000);
        if (round == 0)
            expect_reply(fd, &LINE_LF, "BYE");
        int64_t t0 = now_ms();
        expect_eof(fd);
        CHECKF(now_ms() - t0 < 3000, "EOF took %lld ms", (long long)(now_ms() - t0));
        close(fd);
    }
    pp_stats st;
    wait_active(srv, 0);
    server_down(srv, &st);
    CHECK_EQ(st.accepted, 2);
    CHECK_EQ(st.messages, 4);
    CHECK_EQ(st.handler_errors, 1);
}

/* PP_CLOSE while the peer is still sending: the server must not answer the
 * unread input with a reset, which would destroy the reply in flight
 * (hence its lingering close). */
static void test_close_while_peer_sends(void)
{
    alarm(60);
    pp_config cfg;
    config_upper(&cfg, &LINE_LF, NULL);
    int port;
    pp_server *srv = server_up(&cfg, &port);
    for (int round = 0; round < 5; round++) {
        int fd = client_connect(port);
        send_str(fd, &LINE_LF, "quit");
        /* Keep sending after quit, without reading, for a while. */
        char junk[16384];
        memset(junk, 'j', sizeof junk);
        for (size_t i = 63; i < sizeof junk; i += 64)
            junk[i] = '\n';
        set_timeouts(fd, RECV_TIMEOUT_S * 1000, 200);
        for (int i = 0; i < 64; i++) {
            ssize_t k = send(fd, junk, sizeof junk, MSG_NOSIGNAL);
            if (k < 0)
                break;                 /* EAGAIN once the server stops taking it */
        }
        set_timeouts(fd, RECV_TIMEOUT_S * 1000, RECV_TIMEOUT_S * 1000);
        expect_reply(fd, &LINE_LF, "BYE");
        expect_eof(fd);
        close(fd);
    }
    pp_stats st;
    wait_active(srv, 0);
    server_down(srv, &st);
    CHECK_EQ(st.accepted, 5);
}

/* A graceful stop with idle connections and no shutdown message just closes
 * them; the listener is gone at once. */
static void test_stop_closes_idle(void)
{
    alarm(60);
    pp_config cfg;
    config_for(&cfg, &LINE_LF);
    int port;
    pp_server *srv = server_up(&cfg, &port);
    int a = client_connect(port);
    send_str(a, &LINE_LF, "hi");
    expect_reply(a, &LINE_LF, "hi");
    int64_t t0 = now_ms();
    pp_server_stop(srv, 0);
    expect_eof(a);
    close(a);
    CHECK_EQ(pp_server_join(srv), 0);
    CHECKF(now_ms() - t0 < 5000, "stop took %lld ms", (long long)(now_ms() - t0));
    pp_stats st;
    pp_server_stats(srv, &st);
    CHECK_EQ(st.closed, 1);
    pp_server_free(srv);
    /* Stopping a server that never started, and twice, is harmless. */
    pp_server *s2 = NULL;
    config_for(&cfg, &LINE_LF);
    CHECK_EQ(pp_server_new(&cfg, &s2), 0);
    pp_server_stop(s2, 0);
    pp_server_stop(s2, 1);
    pp_server_free(s2);
}

/* What one connection to port hears until EOF ("" if refused: returns -1). */
static int hear(int port, char *buf, size_t cap)
{
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    CHECK(fd >= 0);
    set_timeouts(fd, RECV_TIMEOUT_S * 1000, RECV_TIMEOUT_S * 1000);
    struct sockaddr_in sa = {0};
    sa.sin_family = AF_INET;
    sa.sin_port = htons((uint16_t)port);
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (connect(fd, (struct sockaddr *)&sa, sizeof sa) < 0) {
        CHECKF(errno == ECONNREFUSED, "connect: %s", strerror(errno));
        close(fd);
        buf[0] = '\0';
        return -1;
    }
    size_t n = 0;
    for (;;) {
        CHECK(n < cap);
        ssize_t k = recv(fd, buf + n, cap - 1 - n, 0);
        if (k < 0 && errno == EINTR)
            continue;
        if (k < 0 && errno == ECONNRESET)
            break; /* queued as the last holder closed: a failed check */
        CHECKF(k >= 0, "recv: %s", strerror(errno));
        if (k == 0)
            break;
        n += (size_t)k;
    }
    buf[n] = '\0';
    close(fd);
    return (int)n;
}

/* Polls the health socket until it says want ("" = until it refuses). */
static void hear_until(int port, const char *want)
{
    char buf[64];
    for (int i = 0; i < 2000; i++) {
        int n = hear(port, buf, sizeof buf);
        if ((*want == '\0' && n < 0) || (n >= 0 && strcmp(buf, want) == 0))
            return;
        struct timespec ts = {0, 5 * 1000000L};
        nanosleep(&ts, NULL);
    }
    CHECKF(0, "health never said \"%s\" (last \"%s\")", want, buf);
}

/* Leaving behind a balancer, through the public entry points: the health
 * socket says "up ready", then "drain" from the stop on while drain_delay
 * keeps the service accepting and serving; then both close together, and a
 * connection that never spoke gets drain_grace for its first message,
 * answered before the goodbye. */
static void test_leaving(void)
{
    alarm(60);
    int hfd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    CHECK(hfd >= 0);
    struct sockaddr_in sa = {0};
    sa.sin_family = AF_INET;
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    CHECK(bind(hfd, (struct sockaddr *)&sa, sizeof sa) == 0);
    CHECK(listen(hfd, 64) == 0);
    socklen_t sl = sizeof sa;
    CHECK(getsockname(hfd, (struct sockaddr *)&sa, &sl) == 0);
    int hport = ntohs(sa.sin_port);

    pp_config cfg;
    config_upper(&cfg, &LINE_LF, "bye");
    cfg.health_fd = hfd;
    cfg.drain_delay = 0.4;
    cfg.drain_grace = 20.0;
    int port;
    pp_server *srv = server_up(&cfg, &port);
    close(hfd); /* the core holds its own duplicate */
    char buf[64];
    CHECK_EQ(hear(hport, buf, sizeof buf), 9);
    CHECK(strcmp(buf, "up ready\n") == 0);
    int silent = client_connect(port);
    int spoke = client_connect(port);
    send_str(spoke, &LINE_LF, "one");
    expect_reply(spoke, &LINE_LF, "ONE");
    wait_active(srv, 2);

    pp_server_stop(srv, 0);
    hear_until(hport, "drain\n");
    int late = client_connect(port); /* accepted during the delay */
    send_str(late, &LINE_LF, "newcomer");
    expect_reply(late, &LINE_LF, "NEWCOMER");
    hear_until(hport, "");
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sa.sin_port = htons((uint16_t)port);
    CHECK(connect(fd, (struct sockaddr *)&sa, sizeof sa) < 0 && errno == ECONNREFUSED);
    close(fd);
    /* Spoken: the goodbye at once.  Silent: its grace. */
    expect_reply(spoke, &LINE_LF, "bye");
    expect_eof(spoke);
    expect_reply(late, &LINE_LF, "bye");
    expect_eof(late);
    send_str(silent, &LINE_LF, "at last");
    expect_reply(silent, &LINE_LF, "AT LAST");
    expect_reply(silent, &LINE_LF, "bye");
    expect_eof(silent);
    close(spoke);
    close(late);
    close(silent);
    CHECK_EQ(pp_server_join(srv), 0);
    CHECK(!pp_server_was_forced(srv));
    pp_stats st;
    pp_server_stats(srv, &st);
    CHECK(st.health_checks >= 3);
    CHECK_EQ(st.accepted, 3);
    pp_server_free(srv);

    /* Retiring (replaced by another process on the same listeners): no
     * delay and no "drain", the drain at once. */
    hfd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    CHECK(hfd >= 0);
    sa.sin_port = 0;
    CHECK(bind(hfd, (struct sockaddr *)&sa, sizeof sa) == 0);
    CHECK(listen(hfd, 64) == 0);
    sl = sizeof sa;
    CHECK(getsockname(hfd, (struct sockaddr *)&sa, &sl) == 0);
    hport = ntohs(sa.sin_port);
    config_upper(&cfg, &LINE_LF, "bye");
    cfg.health_fd = hfd;
    cfg.drain_delay = 3600.0;
    srv = server_up(&cfg, &port);
    close(hfd);
    int kept = client_connect(port);
    send_str(kept, &LINE_LF, "x");
    expect_reply(kept, &LINE_LF, "X");
    pp_server_retire(srv);
    expect_reply(kept, &LINE_LF, "bye");
    expect_eof(kept);
    close(kept);
    CHECK_EQ(pp_server_join(srv), 0); /* not an hour later */
    CHECK(hear(hport, buf, sizeof buf) < 0);
    pp_server_stats(srv, &st);
    CHECK_EQ(st.health_checks, 0);
    pp_server_free(srv);

    /* Bad values are refused. */
    config_for(&cfg, &LINE_LF);
    cfg.drain_delay = -1;
    pp_server *bad = NULL;
    CHECK_EQ(pp_server_new(&cfg, &bad), -EINVAL);
    config_for(&cfg, &LINE_LF);
    cfg.health_fd = 1000000; /* not open */
    CHECK_EQ(pp_server_new(&cfg, &bad), -EBADF);
}

/* Idle timers under churn: connections go silent at random moments while
 * others keep talking.  Every silent one is closed by the idle timeout, no
 * talking one ever is, and the counts add up: the sorted timer lists stay
 * consistent through moves, expiries and closes (ASan, TSan, valgrind). */
static void test_idle_timers(void)
{
    alarm(120);
    pp_config cfg;
    config_for(&cfg, &LINE_LF);
    cfg.idle_timeout = 0.4;
    int port;
    pp_server *srv = server_up(&cfg, &port);
    enum { CHATTY = 12, QUITTERS = 36, N = CHATTY + QUITTERS, ROUNDS = 30 };
    int fd[N], quit_after[N];
    uint64_t rng = 42;
    for (int i = 0; i < N; i++) {
        fd[i] = client_connect(port);
        /* Quitters stop talking after a random number of rounds (0: never
         * say anything); chatty ones talk every round. */
        quit_after[i] = i < CHATTY ? ROUNDS : (int)check_range(&rng, 0, ROUNDS - 1);
    }
    char msg[32];
    for (int r = 0; r < ROUNDS; r++) {
        for (int i = 0; i < N; i++) {
            if (r >= quit_after[i])
                continue;
            snprintf(msg, sizeof msg, "c%d-r%d", i, r);
            /* A reply, not EOF: talking keeps a connection open. */
            send_str(fd[i], &LINE_LF, msg);
            expect_reply(fd[i], &LINE_LF, msg);
        }
        sleep_ms(20);
    }
    /* The quitters were closed for being silent, the chatty ones are still
     * open now; they too go once silent. */
    for (int i = CHATTY; i < N; i++)
        expect_eof(fd[i]);
    pp_stats st;
    pp_server_stats(srv, &st);
    CHECKF(st.idle_closes >= QUITTERS, "idle_closes %llu", (unsigned long long)st.idle_closes);
    for (int i = 0; i < CHATTY; i++)
        expect_eof(fd[i]);
    wait_active(srv, 0);
    for (int i = 0; i < N; i++)
        close(fd[i]);
    server_down(srv, &st);
    CHECK_EQ(st.idle_closes, N);
    CHECK_EQ(st.accepted, N);
    CHECK_EQ(st.closed, N);
}

/* Waits until upper_handler has entered a "block" message. */
static void wait_entered(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    ts.tv_sec += 10;
    CHECKF(sem_timedwait(&H.entered, &ts) == 0, "the handler never started");
}

/* At max_connections with a reject message, a full server waits quietly: the
 * listener's readiness is used up when nobody is waiting (edge-triggered
 * epoll would otherwise report it every round). */
static void test_full_server_rejecting_stays_quiet(void)
{
    alarm(60);
    pp_config cfg;
    config_for(&cfg, &LINE_LF);
    cfg.max_connections = 1;
    static const unsigned char busy[] = "busy";
    cfg.reject_message = busy;
    cfg.reject_message_len = 4;
    int port;
    pp_server *srv = server_up(&cfg, &port);
    int a = client_connect(port);
    send_str(a, &LINE_LF, "a");
    expect_reply(a, &LINE_LF, "a");
    for (int round = 0; round < 2; round++) {
        int64_t cpu0 = cpu_ms(), t0 = now_ms();
        sleep_ms(500);
        int64_t cpu = cpu_ms() - cpu0, wall = now_ms() - t0;
        CHECKF(cpu * 2 < wall, "a full server spins: %lld ms CPU in %lld ms",
               (long long)cpu, (long long)wall);
        int b = client_connect(port); /* turned away, then quiet again */
        expect_reply(b, &LINE_LF, "busy");
        expect_eof(b);
        close(b);
    }
    close(a);
    wait_active(srv, 0);
    pp_stats st;
    server_down(srv, &st);
    CHECK_EQ(st.rejected, 2);
}

/* A message that arrives while the connection's task runs, before a stop, is
 * answered: the drain reads until empty once after the stop, whatever reads
 * before it found (an EAGAIN from before says nothing about later bytes). */
static void test_stop_answers_what_came_during_a_task(void)
{
    alarm(60);
    pp_config cfg;
    config_upper(&cfg, &LINE_LF, "bye");
    int port;
    pp_server *srv = server_up(&cfg, &port);
    int fd = client_connect(port);
    /* Exactly one read's worth, so that the read after it meets EAGAIN. */
    size_t fill = 16384 - 6 - 1;
    char *m = malloc(fill + 1);
    CHECK(m);
    memset(m, 'a', fill);
    m[fill] = 0;
    bytes req = {0};
    frame_put(&req, &LINE_LF, m, fill);
    frame_put(&req, &LINE_LF, "block", 5);
    CHECK_EQ(req.n, 16384);
    send_all(fd, req.p, req.n);
    wait_entered();
    send_str(fd, &LINE_LF, "after");           /* sent before the stop */
    sleep_ms(100);
    pp_server_stop(srv, 0);
    sleep_ms(50);
    sem_post(&H.gate);
    memset(m, 'A', fill);
    expect_reply(fd, &LINE_LF, m);
    expect_reply(fd, &LINE_LF, "UNBLOCKED");
    expect_reply(fd, &LINE_LF, "AFTER");
    expect_reply(fd, &LINE_LF, "bye");
    expect_eof(fd);
    close(fd);
    CHECK_EQ(pp_server_join(srv), 0);
    pp_server_free(srv);
    free(m);
    bytes_free(&req);
}

/* While every worker is busy and tasks wait in the queue, the loop still
 * accepts and reads: it may put off looking at every socket until the queue
 * is empty, but only for a bounded time, so a handler that never returns
 * does not stop the rest of the server. */
static void test_serves_sockets_behind_a_stuck_queue(void)
{
    alarm(60);
    pp_config cfg;
    config_upper(&cfg, &LINE_LF, NULL);
    cfg.threads = 1;
    int port;
    pp_server *srv = server_up(&cfg, &port);
    int a = client_connect(port);
    send_str(a, &LINE_LF, "block");
    wait_entered();                            /* the only worker is stuck */
    int b = client_connect(port);
    send_str(b, &LINE_LF, "b");
    WAIT_STAT(srv, bytes_in, 6 + 2, 0);        /* b's task is queued now */
    int c = client_connect(port);
    send_str(c, &LINE_LF, "c");
    WAIT_STAT(srv, bytes_in, 6 + 2 + 2, 0);    /* read with the queue full */
    int d = client_connect(port);
    WAIT_STAT(srv, accepted, 4, 0);
    sem_post(&H.gate);
    expect_reply(a, &LINE_LF, "UNBLOCKED");
    expect_reply(b, &LINE_LF, "B");
    expect_reply(c, &LINE_LF, "C");
    send_str(d, &LINE_LF, "d");
    expect_reply(d, &LINE_LF, "D");
    close(a);
    close(b);
    close(c);
    close(d);
    wait_active(srv, 0);
    pp_stats st;
    server_down(srv, &st);
    CHECK_EQ(st.messages, 4);
}

/* TCP urgent data: a read stops short at the urgent mark, so the bytes after
 * it are there although the read was short.  They are answered at once. */
static void test_urgent_data_does_not_stall(void)
{
    alarm(60);
    pp_config cfg;
    config_upper(&cfg, &LINE_LF, NULL);
    int port;
    pp_server *srv = server_up(&cfg, &port);
    int fd = client_connect(port);
    send_str(fd, &LINE_LF, "block");
    wait_entered();
    CHECK(send(fd, "hello\n", 6, 0) == 6);
    sleep_ms(20);
    CHECK(send(fd, "X", 1, MSG_OOB) == 1);     /* out of band: not in the stream */
    sleep_ms(20);
    CHECK(send(fd, "world\n", 6, 0) == 6);
    sleep_ms(50);
    sem_post(&H.gate);
    expect_reply(fd, &LINE_LF, "UNBLOCKED");
    expect_reply(fd, &LINE_LF, "HELLO");
    expect_reply(fd, &LINE_LF, "WORLD");      /* without another message */
    close(fd);
    wait_active(srv, 0);
    pp_stats st;
    server_down(srv, &st);
}

/* The drain deadline comes while the last connection lingers and becomes
 * closable in that very round: the loop ends there, it does not go round
 * without anything left to do. */
static void test_drain_deadline_with_a_lingering_peer(void)
{
    alarm(60);
    pp_config cfg;
    config_upper(&cfg, &LINE_LF, "bye");
    /* As long as a lingering close may wait (PP_LINGER_MS): the linger of
     * the goodbye then ends in the same round as the drain. */
    cfg.drain_timeout = 2.0;
    int port;
    pp_server *srv = server_up(&cfg, &port);
    int fd = client_connect_buf(port, 2048);
    size_t n = 10000;
    char *m = malloc(n + 1);
    CHECK(m);
    memset(m, 'a', n);
    m[n] = 0;
    send_str(fd, &LINE_LF, m);           /* the reply is not read: it waits */
    sleep_ms(200);
    int64_t t0 = now_ms(), cpu0 = cpu_ms();
    pp_server_stop(srv, 0);
    while (!pp_server_done(srv) && now_ms() - t0 < 10000)
        sleep_ms(20);
    int64_t wall = now_ms() - t0, cpu = cpu_ms() - cpu0;
    CHECKF(pp_server_done(srv), "the drain never ended (%lld ms)", (long long)wall);
    CHECKF(cpu * 2 < wall, "the drain spun: %lld ms CPU in %lld ms", (long long)cpu,
           (long long)wall);
    CHECK_EQ(pp_server_join(srv), 0);
    pp_server_free(srv);
    close(fd);
    free(m);
}

/* A forced stop while handlers are stuck: join returns promptly, the run is
 * marked forced, pp_server_free() leaves the stuck workers what they use,
 * and the last of them frees it when the handlers finally return (LSan and
 * valgrind check that nothing leaks; ASan/TSan that nothing is used after
 * being freed). */
static void test_forced_stop_with_stuck_handlers(void)
{
    alarm(60);
    pp_config cfg;
    config_upper(&cfg, &LINE_LF, NULL);
    cfg.threads = 4;
    int port;
    pp_server *srv = server_up(&cfg, &port);
    enum { NSTUCK = 2 };
    int fd[NSTUCK];
    for (int i = 0; i < NSTUCK; i++) {
        fd[i] = client_connect(port);
        send_str(fd[i], &LINE_LF, "block");
    }
    for (int i = 0; i < NSTUCK; i++) {
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        ts.tv_sec += 10;
        CHECK(sem_timedwait(&H.entered, &ts) == 0);
    }
    int other = client_connect(port);
    send_str(other, &LINE_LF, "ping");
    expect_reply(other, &LINE_LF, "PING");

    int64_t t0 = now_ms();
    pp_server_stop(srv, 1);
    CHECK_EQ(pp_server_join(srv), 0);
    CHECKF(now_ms() - t0 < 5000, "forced stop took %lld ms", (long long)(now_ms() - t0));
    CHECK(pp_server_was_forced(srv));
    pp_stats st;
    pp_server_stats(srv, &st);
    CHECK_EQ(st.accepted, NSTUCK + 1);
    CHECK(st.forced_closes >= 1);
    pp_server_free(srv);
    /* The clients see their connections end (EOF or reset), not a hang. */
    for (int i = 0; i < NSTUCK; i++) {
        char c;
        ssize_t k = recv(fd[i], &c, 1, 0);
        CHECKF(k == 0 || (k < 0 && errno == ECONNRESET), "stuck client %d: %zd %s", i,
               k, strerror(errno));
    }
    char c;
    ssize_t k = recv(other, &c, 1, 0);
    CHECK(k == 0 || (k < 0 && errno == ECONNRESET));
    CHECK_EQ(atomic_load(&H.in_block), NSTUCK);
    /* Release both at once: the workers race to be the last one out. */
    for (int i = 0; i < NSTUCK; i++)
        sem_post(&H.gate);
    int64_t until = now_ms() + 10000;
    while (atomic_load(&H.in_block) > 0) {
        CHECK(now_ms() < until);
        sleep_ms(1);
    }
    sleep_ms(300);                 /* let the orphaned workers finish freeing */
    for (int i = 0; i < NSTUCK; i++)
        close(fd[i]);
    close(other);
}

/* A client that sends without ever reading cannot make the server buffer
 * without bound: once its replies pile up, the server stops reading it, so
 * the client's sends stall after a bounded amount.  Other clients carry on. */
static void test_nonreader_is_bounded(void)
{
    alarm(60);
    pp_config cfg;
    config_for(&cfg, &LINE_LF);
    cfg.threads = 2;
    cfg.max_message_size = 64 * 1024;
    cfg.output_high_water = 256 * 1024;
    int port;
    pp_server *srv = server_up(&cfg, &port);
    int hog = client_connect_buf(port, 4096);
    set_timeouts(hog, 500, 500);
    /* What the kernel may legitimately absorb: the server's receive buffer
     * can autotune up to tcp_rmem's maximum.  Past that, it is the server. */
    size_t chunk = 64 * 1024, sent = 0, limit = (size_t)32 << 20;
    FILE *f = fopen("/proc/sys/net/ipv4/tcp_rmem", "r");
    unsigned long rmin, rdef, rmax;
    if (f && fscanf(f, "%lu %lu %lu", &rmin, &rdef, &rmax) == 3)
        limit += rmax;
    else
        limit += (size_t)32 << 20;
    if (f)
        fclose(f);
    char *buf = malloc(chunk);
    CHECK(buf);
    for (size_t i = 0; i < chunk; i++)
        buf[i] = i % 128 == 127 ? '\n' : 'h';
    for (;;) {
        ssize_t k = send(hog, buf, chunk, MSG_NOSIGNAL);
        if (k < 0 && errno == EINTR)
            continue;
        if (k < 0) {
            CHECKF(errno == EAGAIN || errno == EWOULDBLOCK, "send: %s", strerror(errno));
            break;
        }
        sent += (size_t)k;
        CHECKF(sent < limit, "server kept reading a client that never reads: %zu bytes",
               sent);
    }
    free(buf);
    printf("  non-reader stalled after %zu KiB\n", sent >> 10);
    /* The server still serves others while the hog is stalled. */
    int ok = client_connect(port);
    send_str(ok, &LINE_LF, "alive");
    expect_reply(ok, &LINE_LF, "alive");
    close(ok);
    close(hog);
    pp_stats st;
    wait_active(srv, 0);
    server_down(srv, &st);
    CHECK_EQ(st.accepted, 2);
}

/* A peer that resets while replies are being written costs only its own
 * connection. */
static void test_peer_reset(void)
{
    alarm(60);
    pp_config cfg;
    config_for(&cfg, &LINE_LF);
    cfg.threads = 4;
    int port;
    pp_server *srv = server_up(&cfg, &port);
    bytes req = {0};
    char line[2000];
    memset(line, 'r', sizeof line);
    for (int i = 0; i < 300; i++)
        frame_put(&req, &LINE_LF, line, sizeof line);
    for (int round = 0; round < 10; round++) {
        int fd = client_connect(port);
        send_all(fd, req.p, req.n);
        if (round % 2) {
            char c;
            recv_exact(fd, &c, 1);
        }
        struct linger lg = {1, 0};          /* close() sends RST */
        CHECK(setsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, sizeof lg) == 0);
        close(fd);
    }
    bytes_free(&req);
    int ok = client_connect(port);
    send_str(ok, &LINE_LF, "survived");
    expect_reply(ok, &LINE_LF, "survived");
    close(ok);
    pp_stats st;
    wait_active(srv, 0);
    server_down(srv, &st);
    CHECK_EQ(st.accepted, 11);
}

/* max_connections: the next client waits in the backlog until one closes. */
static void test_max_connections(void)
{
    alarm(60);
    pp_config cfg;
    config_for(&cfg, &LINE_LF);
    cfg.max_connections = 2;
    int port;
    pp_server *srv = server_up(&cfg, &port);
    int a = client_connect(port), b = client_connect(port);
    send_str(a, &LINE_LF, "a");
    expect_reply(a, &LINE_LF, "a");
    send_str(b, &LINE_LF, "b");
    expect_reply(b, &LINE_LF, "b");
    int c = client_connect(port);                 /* completes in the backlog */
    send_str(c, &LINE_LF, "c");
    expect_silence(c, 300);
    pp_stats st;
    pp_server_stats(srv, &st);
    CHECK_EQ(st.accepted, 2);
    CHECK(st.accept_paused >= 1);
    close(a);
    expect_reply(c, &LINE_LF, "c");
    close(b);
    close(c);
    wait_active(srv, 0);
    server_down(srv, &st);
    CHECK_EQ(st.accepted, 3);
}

/* Out of file descriptors (as libuv's test-emfile): accept() fails with
 * EMFILE; the server must not spin on the still-readable listener, and must
 * accept the waiting client once descriptors are free again. */
static void test_emfile(void)
{
    alarm(60);
    pp_config cfg;
    config_for(&cfg, &LINE_LF);
    cfg.threads = 2;
    int port;
    pp_server *srv = server_up(&cfg, &port);
    int first = client_connect(port);
    send_str(first, &LINE_LF, "first");
    expect_reply(first, &LINE_LF, "first");

    struct rlimit old;
    CHECK(getrlimit(RLIMIT_NOFILE, &old) == 0);
    /* Fill the table, leaving exactly one descriptor for the client socket. */
    int fds[4096], nfds = 0;
    int probe = dup(0);
    CHECK(probe >= 0);
    close(probe);
    struct rlimit lim = old;
    lim.rlim_cur = (rlim_t)probe + 40;
    CHECK(lim.rlim_cur <= old.rlim_max);
    CHECK(setrlimit(RLIMIT_NOFILE, &lim) == 0);
    int fd;
    while (nfds < 4096 && (fd = open("/dev/null", O_RDONLY | O_CLOEXEC)) >= 0)
        fds[nfds++] = fd;
    CHECK(errno == EMFILE);
    close(fds[--nfds]);
    int c = client_connect(port);                 /* takes the last descriptor */
    send_str(c, &LINE_LF, "waiting");

    int64_t cpu0 = cpu_ms(), t0 = now_ms();
    sleep_ms(800);
    int64_t wall = now_ms() - t0, cpu = cpu_ms() - cpu0;
    pp_stats st;
    pp_server_stats(srv, &st);
    CHECKF(st.accept_errors >= 1, "accept never failed (%llu accepted)",
           (unsigned long long)st.accepted);
    CHECK(st.accept_paused >= 1);
    CHECKF(cpu * 2 < wall, "the server spins at EMFILE: %lld ms CPU in %lld ms",
           (long long)cpu, (long long)wall);

    for (int i = 0; i < nfds; i++)
        close(fds[i]);
    CHECK(setrlimit(RLIMIT_NOFILE, &old) == 0);
    expect_reply(c, &LINE_LF, "waiting");
    send_str(first, &LINE_LF, "still");
    expect_reply(first, &LINE_LF, "still");
    close(c);
    close(first);
    wait_active(srv, 0);
    server_down(srv, &st);
    CHECK_EQ(st.accepted, 2);
}

/* Empty messages are messages: an empty line echoes as an empty line, a
 * zero-length frame as a zero-length frame.  A partial frame at EOF is
 * dropped after the whole ones are answered. */
static void test_empty_and_partial(const wire *w)
{
    alarm(60);
    pp_config cfg;
    config_for(&cfg, w);
    int port;
    pp_server *srv = server_up(&cfg, &port);
    int a = client_connect(port);
    bytes req = {0};
    frame_put(&req, w, "", 0);
    frame_put(&req, w, "x", 1);
    frame_put(&req, w, "", 0);
    send_all(a, req.p, req.n);
    unsigned char *got = malloc(req.n);
    CHECK(got);
    recv_exact(a, got, req.n);
    CHECK(memcmp(got, req.p, req.n) == 0);
    free(got);
    /* A whole message, then half of one, then EOF. */
    bytes tail = {0};
    frame_put(&tail, w, "whole", 5);
    size_t whole = tail.n;
    frame_put(&tail, w, "partial", 7);
    send_all(a, tail.p, tail.n - 2);
    CHECK(shutdown(a, SHUT_WR) == 0);
    got = malloc(whole);
    CHECK(got);
    recv_exact(a, got, whole);
    CHECK(memcmp(got, tail.p, whole) == 0);
    free(got);
    expect_eof(a);
    close(a);
    bytes_free(&req);
    bytes_free(&tail);
    /* Connections that send nothing, or only part of a frame, and go. */
    for (int i = 0; i < 40; i++) {
        int c = client_connect(port);
        if (i % 2)
            send_all(c, "pa", 2);
        close(c);
    }
    pp_stats st;
    wait_active(srv, 0);
    server_down(srv, &st);
    CHECK_EQ(st.accepted, 41);
    CHECK_EQ(st.messages, 4);
}

/* A reply larger than a 1-byte length header can carry: the handler's
 * write fails with EMSGSIZE as pollpool.h promises, nothing half-framed goes
 * out, and only that connection is closed, after its earlier replies. */
static void test_reply_too_big_for_header(void)
{
    alarm(60);
    wire w1 = {PP_FRAMING_LENGTH, NULL, 0, 1};
    pp_config cfg;
    config_upper(&cfg, &w1, NULL);
    int port;
    pp_server *srv = server_up(&cfg, &port);
    int a = client_connect(port), b = client_connect(port);
    char m[7 + 200 + 1];
    memcpy(m, "double:", 7);
    memset(m + 7, 'd', 100);
    m[107] = 0;                                   /* 200-byte reply: fits */
    send_str(a, &w1, m);
    char want[256];
    memset(want, 'd', 200);
    want[200] = 0;
    expect_reply(a, &w1, want);
    CHECK_EQ(atomic_load(&H.double_rc), 0);
    memset(m + 7, 'e', 200);
    m[207] = 0;                                   /* 400-byte reply: cannot fit */
    send_str(a, &w1, "first");
    send_str(a, &w1, m);
    send_str(a, &w1, "never");
    expect_reply(a, &w1, "FIRST");
    expect_eof(a);
    close(a);
    send_str(b, &w1, "fine");
    expect_reply(b, &w1, "FINE");
    close(b);
    pp_stats st;
    wait_active(srv, 0);
    server_down(srv, &st);
    CHECK(st.handler_errors + st.oversize_frames >= 1);
    CHECKF(atomic_load(&H.double_rc) == -EMSGSIZE,
           "pp_reply_write() of a reply too big for the header returned %d, "
           "pollpool.h promises -1 with errno EMSGSIZE", atomic_load(&H.double_rc));
}

/* The batch handler's PP_CLOSE: the reply goes out, later messages do not
 * reach the handler, the connection closes. */
static void test_batch_close(void)
{
    alarm(60);
    pp_config cfg;
    config_for(&cfg, &LINE_LF);
    use_handler(&cfg, BATCH);
    int port;
    pp_server *srv = server_up(&cfg, &port);
    uint64_t calls0 = atomic_load(&H.calls);
    int a = client_connect(port);
    send_all(a, "a\nb\nquit\nc\nd\n", 14);
    expect_reply(a, &LINE_LF, "A");
    expect_reply(a, &LINE_LF, "B");
    expect_reply(a, &LINE_LF, "BYE");
    expect_eof(a);
    close(a);
    pp_stats st;
    wait_active(srv, 0);
    server_down(srv, &st);
    CHECK_EQ(atomic_load(&H.calls) - calls0, 3);
    CHECK_EQ(st.replies, 3);
}

/* serve_forever's path: pp_server_run() on this thread, stopped from
 * another; it may run only once. */
typedef struct stopper {
    pp_server *srv;
    int port;
    int use_signal;            /* stop with SIGTERM instead of pp_server_stop */
} stopper;

static void *stopper_main(void *arg)
{
    stopper *sp = arg;
    int fd = client_connect(sp->port);
    for (int i = 0; i < 20; i++) {
        send_str(fd, &LINE_LF, "ping");
        expect_reply(fd, &LINE_LF, "ping");
    }
    if (sp->use_signal)
        CHECK(kill(getpid(), SIGTERM) == 0);
    else
        pp_server_stop(sp->srv, 0);
    expect_eof(fd);
    close(fd);
    return NULL;
}

static atomic_int prev_sigint_calls;

static void prev_sigint(int sig)
{
    (void)sig;
    atomic_fetch_add(&prev_sigint_calls, 1);
}

static void test_run_on_caller_thread(int use_signal)
{
    alarm(60);
    pp_config cfg;
    config_for(&cfg, &LINE_LF);
    pp_server *srv = NULL;
    CHECK_EQ(pp_server_new(&cfg, &srv), 0);
    CHECK_EQ(pp_server_start_workers(srv), 0);
    CHECK_EQ(pp_server_start_workers(srv), 0);    /* idempotent */
    char host[64];
    int port;
    CHECK_EQ(pp_server_address(srv, host, sizeof host, &port), 0);
    struct sigaction mine = {0}, cur;
    if (use_signal) {
        mine.sa_handler = prev_sigint;
        sigemptyset(&mine.sa_mask);
        CHECK(sigaction(SIGINT, &mine, NULL) == 0);
        CHECK_EQ(pp_signals_install(srv), 0);
        CHECK_EQ(pp_signals_install(srv), -EBUSY);
    }
    stopper sp = {srv, port, use_signal};
    pthread_t t;
    CHECK(pthread_create(&t, NULL, stopper_main, &sp) == 0);
    CHECK_EQ(pp_server_run(srv), 0);
    CHECK(pthread_join(t, NULL) == 0);
    if (use_signal) {
        pp_signals_restore();
        CHECK(sigaction(SIGINT, NULL, &cur) == 0);
        CHECK(cur.sa_handler == prev_sigint);     /* the previous one is back */
        CHECK(sigaction(SIGTERM, NULL, &cur) == 0);
        CHECK(cur.sa_handler == SIG_DFL);
        CHECK_EQ(atomic_load(&prev_sigint_calls), 0);
        signal(SIGINT, SIG_DFL);
    }
    CHECK(pp_server_done(srv));
    CHECK(!pp_server_was_forced(srv));
    CHECK(pp_server_run(srv) < 0);                /* only once */
    pp_stats st;
    pp_server_stats(srv, &st);
    CHECK_EQ(st.messages, 20);
    CHECK_EQ(st.closed, 1);
    pp_server_free(srv);
}

/* Two signals: the first drains (stuck here behind a handler), the second
 * stops at once. */
static void test_second_signal_forces(void)
{
    alarm(60);
    pp_config cfg;
    config_upper(&cfg, &LINE_LF, NULL);
    cfg.drain_timeout = 60;
    pp_server *srv = NULL;
    CHECK_EQ(pp_server_new(&cfg, &srv), 0);
    char host[64];
    int port;
    CHECK_EQ(pp_server_address(srv, host, sizeof host, &port), 0);
    CHECK_EQ(pp_signals_install(srv), 0);
    CHECK_EQ(pp_server_start(srv), 0);
    int fd = client_connect(port);
    send_str(fd, &LINE_LF, "block");
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    ts.tv_sec += 10;
    CHECK(sem_timedwait(&H.entered, &ts) == 0);
    CHECK(kill(getpid(), SIGINT) == 0);
    sleep_ms(200);
    CHECK(!pp_server_done(srv));                  /* draining, held by the handler */
    int64_t t0 = now_ms();
    CHECK(kill(getpid(), SIGINT) == 0);
    CHECK_EQ(pp_server_join(srv), 0);
    CHECKF(now_ms() - t0 < 3000, "second signal took %lld ms", (long long)(now_ms() - t0));
    CHECK(pp_server_was_forced(srv));
    pp_signals_restore();
    pp_server_free(srv);
    sem_post(&H.gate);
    int64_t until = now_ms() + 10000;
    while (atomic_load(&H.in_block) > 0) {
        CHECK(now_ms() < until);
        sleep_ms(1);
    }
    sleep_ms(100);
    close(fd);
}

/* The drain timeout bounds a graceful stop that a stuck handler holds up. */
static void test_drain_timeout(void)
{
    alarm(60);
    pp_config cfg;
    config_upper(&cfg, &LINE_LF, NULL);
    cfg.drain_timeout = 0.3;
    int port;
    pp_server *srv = server_up(&cfg, &port);
    int fd = client_connect(port), idle = client_connect(port);
    send_str(idle, &LINE_LF, "idle");
    expect_reply(idle, &LINE_LF, "IDLE");
    send_str(fd, &LINE_LF, "block");
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    ts.tv_sec += 10;
    CHECK(sem_timedwait(&H.entered, &ts) == 0);
    int64_t t0 = now_ms();
    pp_server_stop(srv, 0);
    expect_eof(idle);                             /* idle ones go at once */
    CHECK_EQ(pp_server_join(srv), 0);
    int64_t took = now_ms() - t0;
    CHECKF(took >= 250 && took < 3000, "drain with a 0.3 s timeout took %lld ms",
           (long long)took);
    CHECK(pp_server_was_forced(srv));
    pp_stats st;
    pp_server_stats(srv, &st);
    CHECK(st.forced_closes >= 1);
    pp_server_free(srv);
    sem_post(&H.gate);
    int64_t until = now_ms() + 10000;
    while (atomic_load(&H.in_block) > 0) {
        CHECK(now_ms() < until);
        sleep_ms(1);
    }
    sleep_ms(100);
    close(fd);
    close(idle);
}

/* 16 clients, messages of 1..8 KiB in random pieces, 4 workers, and several
 * rounds of new/start/stop/free. */
/* Connection events: open strictly before a connection's first message,
 * close once after its last, never a message outside them, even with 8
 * workers, clients that reset, and a stop with connections still open. */
#define EV_MAX 4096
static atomic_int ev_state[EV_MAX];    /* 0 never seen, 1 open, 2 closed */
static atomic_int ev_opens, ev_closes, ev_bad;

static int ev_open(void *ctx, pp_reply *reply)
{
    (void)ctx;
    uint64_t id = pp_reply_conn_id(reply);
    CHECK(id > 0 && id < EV_MAX);
    int expected = 0;
    if (!atomic_compare_exchange_strong(&ev_state[id], &expected, 1))
        atomic_fetch_add(&ev_bad, 1);
    atomic_fetch_add(&ev_opens, 1);
    return pp_reply_write(reply, "hi", 2) < 0 ? -1 : PP_KEEP;
}

static void ev_close(void *ctx, uint64_t id)
{
    (void)ctx;
    CHECK(id > 0 && id < EV_MAX);
    int expected = 1;
    if (!atomic_compare_exchange_strong(&ev_state[id], &expected, 2))
        atomic_fetch_add(&ev_bad, 1);
    atomic_fetch_add(&ev_closes, 1);
}

static int ev_echo(void *ctx, const unsigned char *msg, size_t len, pp_reply *reply)
{
    uint64_t id = pp_reply_conn_id(reply);
    if (id >= EV_MAX || atomic_load(&ev_state[id]) != 1)
        atomic_fetch_add(&ev_bad, 1);
    return pp_handler_echo(ctx, msg, len, reply);
}

typedef struct { int port; int k; } ev_arg;

static void *ev_client(void *arg)
{
    ev_arg *a = arg;
    uint64_t rng = 0xe7e7 + (uint64_t)a->k;
    for (int round = 0; round < 5; round++) {
        int fd = client_connect(a->port);
        expect_reply(fd, &LINE_LF, "hi");
        int n = (int)check_range(&rng, 0, 20);
        for (int i = 0; i < n; i++)
            send_str(fd, &LINE_LF, "ping");
        if (check_rand(&rng) % 3 == 0) {
            struct linger lg = {1, 0}; /* RST, maybe before the replies */
            setsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, sizeof lg);
        } else {
            for (int i = 0; i < n; i++)
                expect_reply(fd, &LINE_LF, "ping");
        }
        close(fd);
    }
    return NULL;
}

/* pollpool.h: an error sends only the replies for earlier messages.  A
 * handler that wrote part of a reply and then failed has none of it sent,
 * framed or counted; the same holds for an open hook that greets and fails. */
static int partial_open_fail(void *ctx, pp_reply *reply)
{
    (void)ctx;
    CHECK_EQ(pp_reply_write(reply, "HELLO", 5), 0);
    return -1;
}

static atomic_int partial_closes;

static void partial_close(void *ctx, uint64_t conn_id)
{
    (void)ctx;
    (void)conn_id;
    atomic_fetch_add(&partial_closes, 1);
}

static void test_failed_handler_sends_no_partial_reply(const wire *w)
{
    alarm(60);
    pp_config cfg;
    config_upper(&cfg, w, NULL);
    cfg.threads = 2;
    int port;
    pp_server *srv = server_up(&cfg, &port);
    int a = client_connect(port);
    bytes req = {0};
    frame_put(&req, w, "one", 3);
    frame_put(&req, w, "partialfail", 11);
    frame_put(&req, w, "after", 5);
    send_all(a, req.p, req.n);
    bytes_free(&req);
    expect_reply(a, w, "ONE");
    expect_eof(a); /* "BALANCE=" would arrive before the EOF */
    close(a);
    pp_stats st;
    wait_active(srv, 0);
    server_down(srv, &st);
    CHECK_EQ(st.handler_errors, 1);
    CHECK_EQ(st.messages, 2);
    CHECK_EQ(st.replies, 1);
    CHECK_EQ(st.bytes_out, w->framing == PP_FRAMING_LENGTH ? 4 + 3 : 3 + w->delim_len);

    config_upper(&cfg, w, NULL);
    cfg.on_open = partial_open_fail;
    cfg.on_close = partial_close;
    srv = server_up(&cfg, &port);
    a = client_connect(port);
    expect_eof(a); /* not "HELLO" */
    close(a);
    wait_active(srv, 0);
    server_down(srv, &st);
    CHECK_EQ(st.handler_errors, 1);
    CHECK_EQ(st.replies, 0);
    CHECK_EQ(st.bytes_out, 0);
    CHECK_EQ(atomic_load(&partial_closes), 1);
}

/* max_message_size near SIZE_MAX: the input limit saturates instead of
 * wrapping to a few KiB, which stalled a 100,000-byte frame forever. */
static void test_huge_max_size_does_not_wrap(void)
{
    alarm(60);
    wire w = {PP_FRAMING_LENGTH, NULL, 0, 8};
    pp_config cfg;
    config_for(&cfg, &w);
    cfg.max_message_size = SIZE_MAX;
    int port;
    pp_server *srv = server_up(&cfg, &port);
    int a = client_connect(port);
    size_t n = 100000;
    char *msg = malloc(n + 1);
    CHECK(msg);
    for (size_t i = 0; i < n; i++)
        msg[i] = (char)('a' + i % 26);
    msg[n] = 0;
    send_str(a, &w, msg);
    expect_reply(a, &w, msg);
    free(msg);
    close(a);
    pp_stats st;
    wait_active(srv, 0);
    server_down(srv, &st);
    CHECK_EQ(st.messages, 1);
    CHECK_EQ(st.oversize_frames, 0);
}

/* Workers started for a loop that never runs (a caller interrupted between
 * the two) are stopped by pp_server_free(), which also closes the listener:
 * nothing is left waiting and the port refuses connections. */
static void test_free_without_run(void)
{
    alarm(30);
    pp_config cfg;
    config_for(&cfg, &LINE_LF);
    pp_server *srv = NULL;
    CHECK_EQ(pp_server_new(&cfg, &srv), 0);
    char host[64];
    int port;
    CHECK_EQ(pp_server_address(srv, host, sizeof host, &port), 0);
    CHECK_EQ(pp_server_start_workers(srv), 0);
    CHECK(!pp_server_on_worker(srv));
    pp_server_free(srv);
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    CHECK(fd >= 0);
    struct sockaddr_in sa = {0};
    sa.sin_family = AF_INET;
    sa.sin_port = htons((uint16_t)port);
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    CHECK(connect(fd, (struct sockaddr *)&sa, sizeof sa) < 0 && errno == ECONNREFUSED);
    close(fd);
}

/* pp_server_on_worker() is true on the server's own workers only. */
static pp_server *on_worker_srv;

static int on_worker_handler(void *ctx, const unsigned char *msg, size_t len,
                             pp_reply *reply)
{
    (void)ctx;
    (void)msg;
    (void)len;
    return pp_reply_write(reply, pp_server_on_worker(on_worker_srv) ? "1" : "0", 1);
}

static void test_on_worker(void)
{
    alarm(30);
    pp_config cfg;
    config_for(&cfg, &LINE_LF);
    cfg.handler = on_worker_handler;
    int port;
    on_worker_srv = server_up(&cfg, &port);
    CHECK(!pp_server_on_worker(on_worker_srv));
    int a = client_connect(port);
    send_str(a, &LINE_LF, "x");
    expect_reply(a, &LINE_LF, "1");
    close(a);
    pp_stats st;
    wait_active(on_worker_srv, 0);
    server_down(on_worker_srv, &st);
}

/* ---- pushes ------------------------------------------------------------- */

/* Reads one length-4 frame into buf (cap bytes); returns its length. */
static size_t recv_frame4(int fd, unsigned char *buf, size_t cap)
{
    unsigned char h[4];
    recv_exact(fd, h, 4);
    size_t n = (size_t)h[0] << 24 | (size_t)h[1] << 16 | (size_t)h[2] << 8 | h[3];
    CHECKF(n <= cap, "frame of %zu bytes: torn or garbage", n);
    recv_exact(fd, buf, n);
    return n;
}

/* The id of the connection fd, asked with "id" (upper_handler). */
static uint64_t ask_id(int fd)
{
    send_str(fd, &LENGTH4, "id");
    char buf[64];
    size_t n = recv_frame4(fd, (unsigned char *)buf, sizeof buf - 1);
    buf[n] = 0;
    return strtoull(buf, NULL, 10);
}

enum { PUSH_THREADS = 4 };

typedef struct pusher {
    pp_server *srv;
    const uint64_t *ids;
    size_t nids, count;
    int thread;
    uint64_t seed;
} pusher;

/* Pushes count numbered messages, of random sizes up to 64 KiB, to every id:
 * "P<thread>:<seq>:" and filler. */
static void *pusher_main(void *arg)
{
    pusher *p = arg;
    size_t cap = 65536;
    unsigned char *msg = malloc(cap);
    CHECK(msg);
    uint64_t rng = p->seed;
    for (size_t k = 0; k < p->count; k++) {
        int hn = snprintf((char *)msg, 64, "P%d:%zu:", p->thread, k);
        size_t len = (size_t)check_range(&rng, (uint64_t)hn, check_rand(&rng) % 8 ? 512 : cap);
        memset(msg + hn, 'p', len - (size_t)hn);
        for (size_t i = 0; i < p->nids; i++)
            CHECK_EQ(pp_server_send(p->srv, p->ids[i], msg, len), 0);
    }
    free(msg);
    return NULL;
}

typedef struct pushee {
    int port;
    size_t nreq, npush;        /* replies to expect; pushes per thread */
    int fd;
    uint64_t id;
    pthread_barrier_t *ready;
} pushee;

/* Pipelines numbered requests while reading: every reply once and in order,
 * every push once and in its thread's order, no frame torn. */
static void *pushee_writer(void *arg)
{
    pushee *e = arg;
    char m[32];
    for (size_t i = 0; i < e->nreq; i++) {
        snprintf(m, sizeof m, "r%zu", i);
        send_str(e->fd, &LENGTH4, m);
    }
    return NULL;
}

static void *pushee_main(void *arg)
{
    pushee *e = arg;
    e->fd = client_connect(e->port);
    e->id = ask_id(e->fd);
    pthread_barrier_wait(e->ready);
    pthread_t wt;
    CHECK_EQ(pthread_create(&wt, NULL, pushee_writer, e), 0);
    size_t next_reply = 0, next_push[PUSH_THREADS] = {0};
    unsigned char *buf = malloc(65536);
    CHECK(buf);
    while (next_reply < e->nreq || next_push[0] < e->npush || next_push[1] < e->npush ||
           next_push[2] < e->npush || next_push[3] < e->npush) {
        size_t n = recv_frame4(e->fd, buf, 65536);
        buf[n < 65535 ? n : 65535] = 0;
        if (buf[0] == 'R') {
            char want[32];
            int wn = snprintf(want, sizeof want, "R%zu", next_reply);
            CHECKF(n == (size_t)wn && memcmp(buf, want, n) == 0,
                   "conn %llu: reply %.20s, expected %s", (unsigned long long)e->id,
                   (const char *)buf, want);
            next_reply++;
        } else {
            int t = -1;
            size_t k = 0;
            CHECKF(sscanf((const char *)buf, "P%d:%zu:", &t, &k) == 2 && t >= 0 &&
                   t < PUSH_THREADS, "conn %llu: torn frame %.20s",
                   (unsigned long long)e->id, (const char *)buf);
            CHECKF(k == next_push[t], "conn %llu: push %d:%zu, expected %zu",
                   (unsigned long long)e->id, t, k, next_push[t]);
            for (size_t i = (size_t)snprintf(NULL, 0, "P%d:%zu:", t, k); i < n; i++)
                CHECKF(buf[i] == 'p', "conn %llu: push %d:%zu torn at %zu",
                       (unsigned long long)e->id, t, k, i);
            next_push[t]++;
        }
    }
    free(buf);
    CHECK_EQ(pthread_join(wt, NULL), 0);
    return NULL;
}

/* Must-show 2 of the push issue, in C: clients pipelining numbered requests
 * while 4 threads push numbered messages of random sizes up to 64 KiB to
 * all of them. */
static void test_push_from_threads(void)
{
    alarm(150);
    enum { NCLIENT = 12 };
    pp_config cfg;
    config_upper(&cfg, &LENGTH4, NULL);
    cfg.threads = 3;
    cfg.push_limit = 0; /* this test wants every push delivered */
    int port;
    pp_server *srv = server_up(&cfg, &port);
    pthread_barrier_t ready;
    CHECK_EQ(pthread_barrier_init(&ready, NULL, NCLIENT + 1), 0);
    size_t npush = scaled(150, 20), nreq = scaled(400, 40);
    pushee es[NCLIENT];
    pthread_t th[NCLIENT];
    for (int i = 0; i < NCLIENT; i++) {
        es[i] = (pushee){.port = port, .nreq = nreq, .npush = npush, .ready = &ready};
        CHECK_EQ(pthread_create(&th[i], NULL, pushee_main, &es[i]), 0);
    }
    pthread_barrier_wait(&ready);
    uint64_t ids[NCLIENT];
    for (int i = 0; i < NCLIENT; i++)
        ids[i] = es[i].id;
    pusher ps[PUSH_THREADS];
    pthread_t pt[PUSH_THREADS];
    for (int t = 0; t < PUSH_THREADS; t++) {
        ps[t] = (pusher){srv, ids, NCLIENT, npush, t, 77 + (uint64_t)t};
        CHECK_EQ(pthread_create(&pt[t], NULL, pusher_main, &ps[t]), 0);
    }
    for (int t = 0; t < PUSH_THREADS; t++)
        CHECK_EQ(pthread_join(pt[t], NULL), 0);
    for (int i = 0; i < NCLIENT; i++)
        CHECK_EQ(pthread_join(th[i], NULL), 0);
    pp_stats st;
    pp_server_stats(srv, &st);
    CHECK_EQ(st.pushes, (uint64_t)NCLIENT * PUSH_THREADS * npush);
    CHECK_EQ(st.push_drops + st.push_overflow_closes, 0);
    printf("  %llu pushes, %llu wake-ups\n", (unsigned long long)st.pushes,
           (unsigned long long)st.wakeups);
    for (int i = 0; i < NCLIENT; i++)
        close(es[i].fd);
    pthread_barrier_destroy(&ready);
    wait_active(srv, 0);
    server_down(srv, &st);
}

/* One publish to many subscribers: one shared frame, every subscriber gets
 * it in order, and the publish wakes the I/O thread at most once. */
static void test_publish_and_broadcast(void)
{
    alarm(120);
    enum { NSUB = 40, NPUB = 50 };
    pp_config cfg;
    config_upper(&cfg, &LENGTH4, NULL);
    int port;
    pp_server *srv = server_up(&cfg, &port);
    int fds[NSUB + 1];
    uint64_t ids[NSUB + 1];
    for (int i = 0; i <= NSUB; i++) {
        fds[i] = client_connect(port);
        ids[i] = ask_id(fds[i]);
        if (i < NSUB)
            CHECK_EQ(pp_server_subscribe(srv, ids[i], "news", 4), 0);
    }
    CHECK_EQ(pp_server_subscribe(srv, ids[0], "news", 4), 0); /* twice: once */
    CHECK_EQ(pp_server_subscribe(srv, 999999, "news", 4), -ENOTCONN);
    CHECK_EQ(pp_server_publish(srv, "none", 4, "x", 1), 0);
    char m[32];
    for (int k = 0; k < NPUB; k++) {
        snprintf(m, sizeof m, "news %d", k);
        pp_stats a, b;
        pp_server_stats(srv, &a);
        CHECK_EQ(pp_server_publish(srv, "news", 4, m, strlen(m)), NSUB);
        pp_server_stats(srv, &b);
        CHECKF(b.wakeups - a.wakeups <= 1, "a publish woke the loop %llu times",
               (unsigned long long)(b.wakeups - a.wakeups));
    }
    for (int i = 0; i < NSUB; i++)
        for (int k = 0; k < NPUB; k++) {
            snprintf(m, sizeof m, "news %d", k);
            expect_reply(fds[i], &LENGTH4, m);
        }
    /* Unsubscribed: no more news; the last connection never subscribed. */
    CHECK_EQ(pp_server_unsubscribe(srv, ids[1], "news", 4), 0);
    CHECK_EQ(pp_server_publish(srv, "news", 4, "late", 4), NSUB - 1);
    CHECK_EQ(pp_server_broadcast(srv, "all", 3), NSUB + 1);
    for (int i = 0; i <= NSUB; i++) {
        if (i != 1 && i < NSUB)
            expect_reply(fds[i], &LENGTH4, "late");
        expect_reply(fds[i], &LENGTH4, "all");
    }
    pp_stats st;
    pp_server_stats(srv, &st);
    CHECK_EQ(st.pushes, (uint64_t)NSUB * NPUB + (NSUB - 1) + NSUB + 1);
    /* A connection that goes: pushes to it fail, its topics forget it. */
    close(fds[2]);
    int64_t until = now_ms() + 10000;
    while (pp_server_send(srv, ids[2], "x", 1) == 0)
        CHECK(now_ms() < until);
    CHECK_EQ(pp_server_send(srv, ids[2], "x", 1), -ENOTCONN);
    CHECK_EQ(pp_server_publish(srv, "news", 4, "after", 5), NSUB - 2);
    for (int i = 0; i <= NSUB; i++)
        if (i != 2)
            close(fds[i]);
    wait_active(srv, 0);
    server_down(srv, &st);
}

/* A subscriber that never reads is closed (or its pushes dropped) at
 * push_limit, and its queue never grows past it. */
static void test_push_limit(int drop)
{
    alarm(60);
    pp_config cfg;
    config_upper(&cfg, &LENGTH4, NULL);
    cfg.push_limit = 256 * 1024;
    cfg.push_overflow = drop ? PP_PUSH_DROP : PP_PUSH_CLOSE;
    int port;
    pp_server *srv = server_up(&cfg, &port);
    int slow = client_connect_buf(port, 4096), fast = client_connect(port);
    uint64_t slow_id = ask_id(slow), fast_id = ask_id(fast);
    static unsigned char msg[16384];
    memset(msg, 'm', sizeof msg);
    int refused = 0;
    for (int k = 0; k < 400; k++) {
        int rc = pp_server_send(srv, slow_id, msg, sizeof msg);
        if (rc < 0) {
            CHECKF(rc == -ENOBUFS || (!drop && rc == -ENOTCONN), "send: %d", rc);
            refused++;
        }
        long long pending = pp_server_pending(srv, slow_id);
        CHECKF(pending < 0 || pending <= 256 * 1024 + 65536, "pending %lld", pending);
        CHECK_EQ(pp_server_send(srv, fast_id, "f", 1), 0);
        unsigned char b[8];
        CHECK_EQ(recv_frame4(fast, b, sizeof b), 1);
    }
    CHECK(refused > 0);
    pp_stats st;
    pp_server_stats(srv, &st);
    if (drop) {
        CHECK(st.push_drops > 0);
        CHECK_EQ(st.push_overflow_closes, 0);
        CHECK(pp_server_pending(srv, slow_id) >= 0); /* still open */
    } else {
        CHECK_EQ(st.push_overflow_closes, 1);
        wait_stat(srv, offsetof(pp_stats, closed), "closed", 1, 1);
        CHECK_EQ(pp_server_send(srv, slow_id, "x", 1), -ENOTCONN);
    }
    close(slow);
    close(fast);
    wait_active(srv, 0);
    server_down(srv, &st);
}

/* close from another thread while the connection's task is in flight: the
 * task's replies, then what was pushed, then EOF. */
static void test_close_from_another_thread(void)
{
    alarm(60);
    pp_config cfg;
    config_upper(&cfg, &LENGTH4, NULL);
    int port;
    pp_server *srv = server_up(&cfg, &port);
    int a = client_connect(port);
    uint64_t id = ask_id(a);
    send_str(a, &LENGTH4, "block");
    while (sem_wait(&H.entered) != 0)
        CHECK(errno == EINTR);
    send_str(a, &LENGTH4, "after"); /* not part of the task in flight */
    CHECK_EQ(pp_server_send(srv, id, "pushed", 6), 0);
    CHECK_EQ(pp_server_close_conn(srv, id), 0);
    CHECK_EQ(pp_server_send(srv, id, "too late", 8), -ENOTCONN);
    sem_post(&H.gate);
    expect_reply(a, &LENGTH4, "UNBLOCKED");
    expect_reply(a, &LENGTH4, "pushed");
    expect_eof(a); /* "after" came after the close: not handled */
    close(a);
    pp_stats st;
    wait_active(srv, 0);
    server_down(srv, &st);
}

/* Pushes queued before a stop are delivered, before the shutdown message;
 * pushes after it are refused. */
static void test_pushes_then_stop(void)
{
    alarm(60);
    pp_config cfg;
    config_upper(&cfg, &LENGTH4, "bye");
    int port;
    pp_server *srv = server_up(&cfg, &port);
    int a = client_connect(port);
    uint64_t id = ask_id(a);
    char m[32];
    for (int k = 0; k < 100; k++) {
        snprintf(m, sizeof m, "push %d", k);
        CHECK_EQ(pp_server_send(srv, id, m, strlen(m)), 0);
    }
    pp_server_stop(srv, 0);
    for (int k = 0; k < 100; k++) {
        snprintf(m, sizeof m, "push %d", k);
        expect_reply(a, &LENGTH4, m);
    }
    expect_reply(a, &LENGTH4, "bye");
    expect_eof(a);
    CHECK_EQ(pp_server_send(srv, id, "x", 1), -ENOTCONN);
    close(a);
    CHECK_EQ(pp_server_join(srv), 0);
    CHECK(!pp_server_was_forced(srv));
    pp_server_free(srv);
}

typedef struct spammer {
    pp_server *srv;
    uint64_t id;
    atomic_int stop;
    atomic_int accepted, refused;
} spammer;

static void *spam_main(void *arg)
{
    spammer *sp = arg;
    while (!atomic_load(&sp->stop)) {
        int rc = pp_server_send(sp->srv, sp->id, "push", 4);
        if (rc == 0)
            atomic_fetch_add(&sp->accepted, 1);
        else
            atomic_fetch_add(&sp->refused, 1);
        usleep(200);
    }
    return NULL;
}

/* A reply of 1 MiB and PP_CLOSE to a slow reader, with pushes coming all
 * the while: the reply arrives whole, then EOF (never a reset), and pushes
 * are refused from the close on; none is queued behind our FIN. */
static void test_pushes_to_a_closing_connection(void)
{
    alarm(60);
    pp_config cfg;
    config_upper(&cfg, &LENGTH4, NULL);
    int port;
    pp_server *srv = server_up(&cfg, &port);
    int a = client_connect_buf(port, 8192);
    spammer sp = {.srv = srv, .id = ask_id(a)};
    pthread_t th;
    CHECK_EQ(pthread_create(&th, NULL, spam_main, &sp), 0);
    usleep(5000);
    send_str(a, &LENGTH4, "bigquit");
    size_t big = 0, pushes = 0;
    unsigned char *buf = malloc(1 << 20);
    CHECK(buf);
    for (;;) {
        unsigned char h[4];
        ssize_t k = recv(a, h, 1, MSG_PEEK);
        if (k == 0)
            break; /* EOF */
        CHECKF(k == 1, "recv: %s", k < 0 ? strerror(errno) : "?");
        usleep(100); /* a slow reader */
        size_t n = recv_frame4(a, buf, 1 << 20);
        if (n == 4 && memcmp(buf, "push", 4) == 0) {
            pushes++;
        } else {
            CHECK_EQ(n, 1 << 20);
            CHECK(buf[0] == 'B' && buf[n - 1] == 'B');
            big++;
        }
    }
    CHECK_EQ(big, 1);
    atomic_store(&sp.stop, 1);
    CHECK_EQ(pthread_join(th, NULL), 0);
    CHECK(atomic_load(&sp.refused) > 0);
    CHECK_EQ(pushes, (size_t)atomic_load(&sp.accepted));
    close(a);
    free(buf);
    pp_stats st;
    wait_active(srv, 0);
    server_down(srv, &st);
    CHECK_EQ(st.write_errors, 0);
}

/* output_limit is about replies: pushes waiting for a slow reader (bounded
 * by push_limit) do not make a small reply pass it. */
static void test_output_limit_counts_replies_only(void)
{
    alarm(60);
    pp_config cfg;
    config_upper(&cfg, &LENGTH4, NULL);
    cfg.output_limit = 256 * 1024;
    cfg.push_limit = 8 << 20;
    int port;
    pp_server *srv = server_up(&cfg, &port);
    int a = client_connect_buf(port, 4096);
    uint64_t id = ask_id(a);
    static unsigned char msg[16384];
    memset(msg, 'q', sizeof msg);
    for (int k = 0; k < 64; k++) /* 1 MiB of pushes */
        CHECK_EQ(pp_server_send(srv, id, msg, sizeof msg), 0);
    send_str(a, &LENGTH4, "hi");
    usleep(200 * 1000);
    pp_stats st;
    pp_server_stats(srv, &st);
    CHECK_EQ(st.output_overflows, 0);
    unsigned char *buf = malloc(sizeof msg);
    CHECK(buf);
    for (int k = 0; k < 64; k++)
        CHECK_EQ(recv_frame4(a, buf, sizeof msg), sizeof msg);
    CHECK_EQ(recv_frame4(a, buf, sizeof msg), 2);
    CHECK(memcmp(buf, "HI", 2) == 0);
    free(buf);
    close(a);
    wait_active(srv, 0);
    server_down(srv, &st);
    CHECK_EQ(st.output_overflows, 0);
}

/* Empty raw pushes are accepted and send nothing; a drain after them is a
 * clean close, not a failed zero-byte send. */
static void test_empty_raw_push(void)
{
    alarm(30);
    pp_config cfg;
    config_upper(&cfg, &RAW, NULL);
    int port;
    pp_server *srv = server_up(&cfg, &port);
    int a = client_connect(port);
    send_all(a, "x", 1);
    unsigned char c;
    recv_exact(a, &c, 1);
    CHECK_EQ(pp_server_broadcast(srv, "", 0), 1);
    CHECK_EQ(pp_server_send(srv, 1, "", 0), 0);
    pp_server_stop(srv, 0);
    expect_eof(a);
    close(a);
    CHECK_EQ(pp_server_join(srv), 0);
    pp_stats st;
    pp_server_stats(srv, &st);
    CHECK_EQ(st.write_errors, 0);
    CHECK_EQ(st.pushes, 0);
    pp_server_free(srv);
}

/* A forced stop refuses pushes at once, also to a connection whose task is
 * still in flight. */
static void test_forced_stop_refuses_pushes(void)
{
    alarm(60);
    pp_config cfg;
    config_upper(&cfg, &LENGTH4, NULL);
    int port;
    pp_server *srv = server_up(&cfg, &port);
    int a = client_connect(port);
    uint64_t id = ask_id(a);
    send_str(a, &LENGTH4, "block");
    while (sem_wait(&H.entered) != 0)
        CHECK(errno == EINTR);
    CHECK_EQ(pp_server_send(srv, id, "before", 6), 0);
    pp_server_stop(srv, 1);
    int64_t until = now_ms() + 10000;
    while (pp_server_send(srv, id, "x", 1) == 0)
        CHECK(now_ms() < until);
    sem_post(&H.gate);
    CHECK_EQ(pp_server_join(srv), 0);
    CHECK(pp_server_was_forced(srv));
    close(a);
    pp_server_free(srv);
}

/* ---- push stress: every push call racing connects, resets and closes ---- */

static pp_server *ps_srv;
static int port_of_ps;
static atomic_int ps_stop;
static _Atomic uint64_t ps_maxid;
static atomic_int ps_opens, ps_closes;

/* Commands: s subscribe, u unsubscribe, p push to self, c close self,
 * q reply and PP_CLOSE; anything else is echoed. */
static int ps_handler(void *ctx, const unsigned char *m, size_t n, pp_reply *r)
{
    (void)ctx;
    uint64_t id = pp_reply_conn_id(r);
    if (n == 1 && m[0] == 's')
        pp_server_subscribe(ps_srv, id, "t", 1);
    else if (n == 1 && m[0] == 'u')
        pp_server_unsubscribe(ps_srv, id, "t", 1);
    else if (n == 1 && m[0] == 'p')
        pp_server_send(ps_srv, id, "self", 4);
    else if (n == 1 && m[0] == 'c')
        pp_server_close_conn(ps_srv, id);
    else if (n == 1 && m[0] == 'q')
        return pp_reply_write(r, "bye", 3) < 0 ? -1 : PP_CLOSE;
    return pp_reply_write(r, m, n) < 0 ? -1 : PP_KEEP;
}

static int ps_open(void *ctx, pp_reply *r)
{
    (void)ctx;
    uint64_t id = pp_reply_conn_id(r), cur = atomic_load(&ps_maxid);
    while (id > cur && !atomic_compare_exchange_weak(&ps_maxid, &cur, id))
        ;
    atomic_fetch_add(&ps_opens, 1);
    pp_server_subscribe(ps_srv, id, "t", 1);
    pp_server_send(ps_srv, id, "hi", 2);
    return PP_KEEP;
}

static void ps_close(void *ctx, uint64_t id)
{
    (void)ctx;
    atomic_fetch_add(&ps_closes, 1);
    /* The connection is gone: both are refused or reach only others. */
    CHECK(pp_server_send(ps_srv, id, "x", 1) == -ENOTCONN);
    pp_server_publish(ps_srv, "t", 1, "gone", 4);
}

static void *ps_producer(void *arg)
{
    uint64_t rng = (uint64_t)(uintptr_t)arg;
    static const char fill[3000] = {0};
    /* Under valgrind (one thread at a time, its lock unfair) producers that
     * never block would hold push_mu nearly always and starve the I/O
     * thread that needs it to register a connection: there they pause. */
    int slow = scale_pct() < 50;
    while (!atomic_load(&ps_stop)) {
        if (slow)
            sleep_ms(1);
        uint64_t id = 1 + check_rand(&rng) % (atomic_load(&ps_maxid) + 1);
        size_t len = check_rand(&rng) % sizeof fill;
        switch (check_rand(&rng) % 8) {
        case 0: CHECK(pp_server_broadcast(ps_srv, fill, len) >= 0); break;
        case 1: CHECK(pp_server_publish(ps_srv, "t", 1, fill, len) >= 0); break;
        case 2: pp_server_close_conn(ps_srv, id); break;
        case 3: pp_server_subscribe(ps_srv, id, "t", 1); break;
        case 4: pp_server_unsubscribe(ps_srv, id, "t", 1); break;
        case 5: pp_server_pending(ps_srv, id); break;
        default: {
            int rc = pp_server_send(ps_srv, id, fill, len);
            CHECKF(rc == 0 || rc == -ENOTCONN || rc == -ENOBUFS, "send: %d", rc);
        }
        }
    }
    return NULL;
}

static void *ps_client(void *arg)
{
    uint64_t rng = (uint64_t)(uintptr_t)arg * 7919;
    static const char *cmds[] = {"s\n", "u\n", "p\n", "hello\n", "c\n", "q\n", "hi\n", "x\n"};
    unsigned char buf[65536];
    while (!atomic_load(&ps_stop)) {
        int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
        CHECK(fd >= 0);
        if (check_rand(&rng) % 3 == 0) {
            int small = 4096;
            setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &small, sizeof small);
        }
        struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port_of_ps)};
        sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
        if (connect(fd, (struct sockaddr *)&sa, sizeof sa) < 0) {
            close(fd);
            continue;
        }
        int n = (int)(check_rand(&rng) % 30);
        for (int i = 0; i < n && !atomic_load(&ps_stop); i++) {
            const char *c = cmds[check_rand(&rng) % 8];
            if (send(fd, c, strlen(c), MSG_NOSIGNAL) < 0)
                break;
            struct pollfd p = {fd, POLLIN, 0};
            if (check_rand(&rng) % 4 && poll(&p, 1, (int)(check_rand(&rng) % 4)) > 0 &&
                recv(fd, buf, sizeof buf, MSG_DONTWAIT) <= 0)
                break;
        }
        if (check_rand(&rng) % 2) { /* a reset, with whatever was unread */
            struct linger l = {1, 0};
            setsockopt(fd, SOL_SOCKET, SO_LINGER, &l, sizeof l);
        }
        close(fd);
    }
    return NULL;
}

/* Every push call from 3 threads, and from handlers and hooks, racing 6
 * clients that connect, subscribe, push to themselves, close, quit and reset
 * at random; then a graceful stop (round 0) or a forced one (round 1).  The
 * sanitizers are the judges; the counters must add up. */
static void test_push_stress(int force)
{
    alarm(120);
    pp_config cfg;
    config_for(&cfg, &LINE_LF);
    cfg.threads = 3;
    cfg.handler = ps_handler;
    cfg.on_open = ps_open;
    cfg.on_close = ps_close;
    cfg.push_limit = 64 * 1024;
    cfg.push_overflow = force ? PP_PUSH_DROP : PP_PUSH_CLOSE;
    ps_srv = server_up(&cfg, &port_of_ps);
    enum { NPROD = 3, NCLI = 6 };
    pthread_t prod[NPROD], cli[NCLI];
    for (int i = 0; i < NPROD; i++)
        CHECK_EQ(pthread_create(&prod[i], NULL, ps_producer, (void *)(uintptr_t)(i + 1)), 0);
    for (int i = 0; i < NCLI; i++)
        CHECK_EQ(pthread_create(&cli[i], NULL, ps_client, (void *)(uintptr_t)(i + 1)), 0);
    sleep_ms((int)scaled(3000, 500));
    /* Under valgrind (one thread at a time) the spinning producers can
     * starve the clients for the whole sleep: race until connections have
     * come and gone, bounded by the alarm. */
    while (atomic_load(&ps_closes) < NCLI)
        sleep_ms(50);
    atomic_store(&ps_stop, 1);
    for (int i = 0; i < NCLI; i++)
        CHECK_EQ(pthread_join(cli[i], NULL), 0);
    /* Producers go on through the stop, racing the drain; under valgrind
     * (a quarter scale, ten times slower) they would keep the drain past
     * its timeout, so there they stop first. */
    int slow = scale_pct() < 50;
    if (!slow)
        atomic_store(&ps_stop, 0);
    else
        for (int i = 0; i < NPROD; i++)
            CHECK_EQ(pthread_join(prod[i], NULL), 0);
    pp_server_stop(ps_srv, force);
    CHECK_EQ(pp_server_join(ps_srv), 0);
    atomic_store(&ps_stop, 1);
    for (int i = 0; !slow && i < NPROD; i++)
        CHECK_EQ(pthread_join(prod[i], NULL), 0);
    CHECK(force || !pp_server_was_forced(ps_srv));
    pp_stats st;
    pp_server_stats(ps_srv, &st);
    printf("  %llu connections, %llu pushes, %llu drops, %llu overflow closes\n",
           (unsigned long long)st.accepted, (unsigned long long)st.pushes,
           (unsigned long long)st.push_drops, (unsigned long long)st.push_overflow_closes);
    /* It did race (under valgrind, at a quarter of the time and a tenth of
     * the speed, a run may be all refusals: only the sanitizers judge it). */
    CHECK(st.accepted > 0);
    if (scale_pct() >= 50)
        CHECK(st.pushes + st.push_drops > 0);
    CHECK_EQ(st.active, 0);
    CHECK_EQ(st.accepted, st.closed);
    CHECK_EQ(atomic_load(&ps_opens), atomic_load(&ps_closes));
    pp_server_free(ps_srv);
    ps_srv = NULL;
}

/* ---- accepts are bounded per round ------------------------------------- */

static pp_server *ab_srv;
static _Atomic uint64_t ab_first; /* accepted, as the first open saw it */
static atomic_int ab_opens;

static int ab_open(void *ctx, pp_reply *r)
{
    (void)ctx;
    (void)r;
    pp_stats st;
    pp_server_stats(ab_srv, &st);
    uint64_t zero = 0;
    atomic_compare_exchange_strong(&ab_first, &zero, st.accepted);
    atomic_fetch_add(&ab_opens, 1);
    return PP_KEEP;
}

static void *ab_run(void *arg)
{
    CHECK_EQ(pp_server_run(arg), 0);
    return NULL;
}

/* A backlog of connections is accepted a bounded number per round, the
 * tasks of each round dispatched before the next: unbounded, clients that
 * connect as fast as the loop accepts (a flood, or valgrind's one thread at
 * a time) keep the server from serving anyone.  The first open hook runs
 * long before the last of N queued connections is accepted; unbounded, it
 * saw all N, always. */
static void test_accepts_bounded(void)
{
    alarm(120);
    enum { N = 1000 };
    pp_config cfg;
    config_for(&cfg, &LINE_LF);
    cfg.threads = 2;
    cfg.backlog = 2 * N;
    cfg.on_open = ab_open;
    CHECK_EQ(pp_server_new(&cfg, &ab_srv), 0);
    CHECK_EQ(pp_server_start_workers(ab_srv), 0);
    char host[64];
    int port;
    CHECK_EQ(pp_server_address(ab_srv, host, sizeof host, &port), 0);
    static int fds[N];
    for (int i = 0; i < N; i++)
        fds[i] = client_connect(port); /* the kernel completes each one */
    pthread_t t;
    CHECK_EQ(pthread_create(&t, NULL, ab_run, ab_srv), 0);
    int64_t until = now_ms() + 60000;
    while (atomic_load(&ab_opens) < N) {
        CHECK(now_ms() < until);
        sleep_ms(5);
    }
    uint64_t first = atomic_load(&ab_first);
    printf("  the first open saw %llu of %d accepted\n", (unsigned long long)first, N);
    /* Under valgrind a woken worker may wait for the I/O thread's time
     * slice to end: there only the sanitizer judges. */
    if (scale_pct() >= 50)
        CHECK(first > 0 && first < N);
    for (int i = 0; i < N; i++)
        close(fds[i]);
    pp_server_stop(ab_srv, 0);
    CHECK_EQ(pthread_join(t, NULL), 0);
    CHECK(!pp_server_was_forced(ab_srv));
    pp_server_free(ab_srv);
    ab_srv = NULL;
}

static void test_connection_events(void)
{
    alarm(120);
    pp_config cfg;
    config_for(&cfg, &LINE_LF);
    cfg.threads = 8;
    cfg.handler = ev_echo;
    cfg.on_open = ev_open;
    cfg.on_close = ev_close;
    int port;
    pp_server *srv = server_up(&cfg, &port);
    enum { NCLIENTS = 24 };
    pthread_t th[NCLIENTS];
    ev_arg args[NCLIENTS];
    for (int i = 0; i < NCLIENTS; i++) {
        args[i] = (ev_arg){port, i};
        CHECK_EQ(pthread_create(&th[i], NULL, ev_client, &args[i]), 0);
    }
    for (int i = 0; i < NCLIENTS; i++)
        pthread_join(th[i], NULL);
    /* Three left open: the stop owes them their close events too. */
    int open_fds[3];
    for (int i = 0; i < 3; i++) {
        open_fds[i] = client_connect(port);
        expect_reply(open_fds[i], &LINE_LF, "hi");
    }
    pp_stats st;
    server_down(srv, &st);
    for (int i = 0; i < 3; i++) {
        expect_eof(open_fds[i]);
        close(open_fds[i]);
    }
    CHECK_EQ(st.accepted, NCLIENTS * 5 + 3);
    CHECK_EQ(atomic_load(&ev_opens), NCLIENTS * 5 + 3);
    CHECK_EQ(atomic_load(&ev_closes), NCLIENTS * 5 + 3);
    CHECK_EQ(atomic_load(&ev_bad), 0);
    CHECK_EQ(st.forced_closes, 0);
}

static void test_stress(void)
{
    enum { NCLIENT = 16 };
    const wire *ws[] = {&LINE_LF, &LENGTH4, &LINE_CRLF, &RAW, &LENGTH4, &LINE_LF};
    size_t nmsg = scaled(250, 12);
    for (int round = 0; round < 6; round++) {
        alarm(90);
        const wire *w = ws[round];
        pp_config cfg;
        config_for(&cfg, w);
        cfg.queue_size = round == 1 || round == 5 ? 2 : 0;   /* a tiny queue fills up */
        cfg.threads = round == 4 ? 1 : 4;
        static const int modes[] = {ECHO, ECHO, UPPER, BATCH, BATCH, UPPER};
        use_handler(&cfg, modes[round]);
        int port;
        pp_server *srv = server_up(&cfg, &port);
        session ss[NCLIENT];
        for (int i = 0; i < NCLIENT; i++)
            ss[i] = (session){.port = port, .w = w, .nmsg = nmsg, .min_len = 1,
                              .max_len = 8192, .upper = modes[round] != ECHO,
                              .half_close = i % 4 == 0,
                              .max_piece = i % 3 == 0 ? 100 : 16384,
                              .seed = (uint64_t)round * 100 + (uint64_t)i, .id = i};
        int64_t t0 = now_ms();
        run_sessions(ss, NCLIENT);
        pp_stats st;
        wait_active(srv, 0);
        server_down(srv, &st);
        CHECK_EQ(st.accepted, NCLIENT);
        if (w->framing != PP_FRAMING_RAW) {
            CHECK_EQ(st.messages, NCLIENT * nmsg);
            CHECK_EQ(st.replies, NCLIENT * nmsg);
        }
        uint64_t in = 0;
        for (int i = 0; i < NCLIENT; i++)
            in += ss[i].out.n;
        CHECK_EQ(st.bytes_in, in);
        printf("  stress round %d: %llu messages, %llu bytes in, %lld ms\n", round,
               (unsigned long long)st.messages, (unsigned long long)in,
               (long long)(now_ms() - t0));
        sessions_free(ss, NCLIENT);
    }
}

/* ---- deferred replies -------------------------------------------------- */

/* Handles waiting for a finisher, taken in random order. */
typedef struct dqueue {
    pthread_mutex_t mu;
    pp_deferred **d;
    const unsigned char **msg;
    size_t *len;
    size_t n, cap;
} dqueue;

static dqueue DQ = {.mu = PTHREAD_MUTEX_INITIALIZER};
static atomic_int dq_stop;
static atomic_int df_opens, df_closes, df_gone, df_in_task;
static _Atomic uint64_t df_gone_id;

static void dq_put(pp_deferred *d, const unsigned char *m, size_t n)
{
    pthread_mutex_lock(&DQ.mu);
    if (DQ.n == DQ.cap) {
        DQ.cap = DQ.cap ? DQ.cap * 2 : 256;
        DQ.d = realloc(DQ.d, DQ.cap * sizeof *DQ.d);
        DQ.msg = realloc(DQ.msg, DQ.cap * sizeof *DQ.msg);
        DQ.len = realloc(DQ.len, DQ.cap * sizeof *DQ.len);
        CHECK(DQ.d && DQ.msg && DQ.len);
    }
    DQ.d[DQ.n] = d;
    DQ.msg[DQ.n] = m;
    DQ.len[DQ.n] = n;
    DQ.n++;
    pthread_mutex_unlock(&DQ.mu);
}

/* Takes a random waiting handle; 0 if there is none. */
static int dq_take(uint64_t *rng, pp_deferred **d, const unsigned char **m, size_t *n)
{
    pthread_mutex_lock(&DQ.mu);
    if (DQ.n == 0) {
        pthread_mutex_unlock(&DQ.mu);
        return 0;
    }
    size_t i = check_rand(rng) % DQ.n;
    *d = DQ.d[i];
    *m = DQ.msg[i];
    *n = DQ.len[i];
    DQ.n--;
    DQ.d[i] = DQ.d[DQ.n];
    DQ.msg[i] = DQ.msg[DQ.n];
    DQ.len[i] = DQ.len[DQ.n];
    pthread_mutex_unlock(&DQ.mu);
    return 1;
}

static void dq_free(void)
{
    free(DQ.d);
    free(DQ.msg);
    free(DQ.len);
    DQ.d = NULL;
    DQ.msg = NULL;
    DQ.len = NULL;
    DQ.n = DQ.cap = 0;
}

/* Writes the uppercased message into d in up to three pieces. */
static void df_write_upper(pp_deferred *d, const unsigned char *m, size_t n, uint64_t *rng)
{
    unsigned char *u = malloc(n ? n : 1);
    CHECK(u);
    memcpy(u, m, n);
    upper_bytes(u, n);
    size_t a = n ? (size_t)check_rand(rng) % (n + 1) : 0;
    size_t b = a + (n - a ? (size_t)check_rand(rng) % (n - a + 1) : 0);
    CHECK_EQ(pp_deferred_write(d, u, a), 0);
    CHECK_EQ(pp_deferred_write(d, u + a, b - a), 0);
    CHECK_EQ(pp_deferred_write(d, u + b, n - b), 0);
    free(u);
}

/* Commands: "now:..." defers and finishes in the call itself (before the
 * task is back); "bad" returns PP_DEFER without deferring; "fail" defers
 * and finishes with an error; "echo:..." replies at once; anything else is
 * deferred to the finishers, who uppercase it.  The message is read by the
 * finisher after the call: it stays valid until the finish. */
static int df_handler(void *ctx, const unsigned char *m, size_t n, pp_reply *r)
{
    (void)ctx;
    atomic_fetch_add(&df_in_task, 1);
    if (n >= 5 && memcmp(m, "echo:", 5) == 0) {
        atomic_fetch_sub(&df_in_task, 1);
        return pp_reply_write(r, m, n) < 0 ? -1 : PP_KEEP;
    }
    if (is(m, n, "bad")) {
        atomic_fetch_sub(&df_in_task, 1);
        return PP_DEFER;
    }
    if (n >= 6 && memcmp(m, "close:", 6) == 0) {
        atomic_fetch_sub(&df_in_task, 1);
        return pp_reply_write(r, m, n) < 0 ? -1 : PP_CLOSE;
    }
    if (is(m, n, "big")) { /* 1 MiB at once */
        static unsigned char mib[1 << 20];
        memset(mib, 'b', sizeof mib);
        atomic_fetch_sub(&df_in_task, 1);
        return pp_reply_write(r, mib, sizeof mib) < 0 ? -1 : PP_KEEP;
    }
    CHECK_EQ(pp_reply_write(r, "", 0), 0); /* an empty start is taken over */
    pp_deferred *d = pp_reply_defer(r);
    CHECK(d != NULL);
    errno = 0;
    CHECK(pp_reply_write(r, "x", 1) < 0 && errno == EINVAL);
    CHECK(pp_reply_defer(r) == NULL && errno == EINVAL);
    uint64_t rng = (uint64_t)(uintptr_t)m;
    if (n >= 4 && memcmp(m, "now:", 4) == 0) {
        df_write_upper(d, m, n, &rng);
        CHECK_EQ(pp_deferred_finish(d, PP_KEEP), 0);
    } else if (is(m, n, "fail")) {
        CHECK_EQ(pp_deferred_write(d, "never", 5), 0);
        CHECK_EQ(pp_deferred_finish(d, -1), 0);
    } else {
        dq_put(d, m, n);
    }
    atomic_fetch_sub(&df_in_task, 1);
    return PP_DEFER;
}

static int df_open(void *ctx, pp_reply *r)
{
    (void)ctx;
    atomic_fetch_add(&df_opens, 1);
    (void)r;
    return PP_KEEP;
}

static void df_close(void *ctx, uint64_t id)
{
    (void)ctx;
    (void)id;
    /* After the task that deferred: none is running for it now. */
    atomic_fetch_add(&df_closes, 1);
}

static void df_gone_hook(void *ctx, uint64_t id)
{
    (void)ctx;
    CHECK(id != 0);
    atomic_store(&df_gone_id, id);
    atomic_fetch_add(&df_gone, 1);
}

static void *df_finisher(void *arg)
{
    uint64_t rng = (uint64_t)(uintptr_t)arg * 0x9e3779b97f4a7c15ull;
    for (;;) {
        pp_deferred *d;
        const unsigned char *m;
        size_t n;
        if (!dq_take(&rng, &d, &m, &n)) {
            if (atomic_load(&dq_stop))
                return NULL;
            sched_yield();
            continue;
        }
        df_write_upper(d, m, n, &rng);
        CHECK_EQ(pp_deferred_finish(d, PP_KEEP), 0);
    }
}

static void df_config(pp_config *cfg, const wire *w)
{
    config_for(cfg, w);
    cfg->handler = df_handler;
    cfg->on_open = df_open;
    cfg->on_close = df_close;
    cfg->deferred_gone = df_gone_hook;
    atomic_store(&df_opens, 0);
    atomic_store(&df_closes, 0);
    atomic_store(&df_gone, 0);
    atomic_store(&dq_stop, 0);
}

/* Every message deferred and finished by other threads in random order,
 * 100 connections pipelining (half of them closing their side after the
 * last request): each reply arrives once, byte-exact, in request order. */
static void test_deferred_stress(const wire *w)
{
    alarm(150);
    pp_config cfg;
    df_config(&cfg, w);
    cfg.threads = 4;
    int port;
    pp_server *srv = server_up(&cfg, &port);
    enum { NFIN = 4, NCONN = 100 };
    pthread_t fin[NFIN];
    for (int i = 0; i < NFIN; i++)
        CHECK_EQ(pthread_create(&fin[i], NULL, df_finisher, (void *)(uintptr_t)(i + 1)), 0);
    size_t nmsg = scale_pct() < 50 ? 60 : scaled(1000, 60); /* valgrind: 6,000 */
    session *ss = calloc(NCONN, sizeof *ss);
    CHECK(ss);
    for (int i = 0; i < NCONN; i++)
        ss[i] = (session){.port = port, .w = w, .nmsg = nmsg, .min_len = 1,
                          .max_len = 300, .upper = 1, .half_close = i % 2,
                          .max_piece = i % 3 == 0 ? 50 : 4096,
                          .seed = 7000 + (uint64_t)i, .id = i};
    run_sessions(ss, NCONN);
    pp_stats st;
    pp_server_stats(srv, &st);
    CHECK_EQ(st.deferred_total, NCONN * nmsg);
    CHECK_EQ(st.replies, NCONN * nmsg);
    wait_active(srv, 0);
    atomic_store(&dq_stop, 1);
    for (int i = 0; i < NFIN; i++)
        CHECK_EQ(pthread_join(fin[i], NULL), 0);
    server_down(srv, &st);
    CHECK_EQ(st.deferred, 0);
    CHECK_EQ(st.handler_errors, 0);
    CHECK_EQ(atomic_load(&df_opens), NCONN);
    CHECK_EQ(atomic_load(&df_closes), NCONN);
    printf("  %llu deferred replies, %llu wake-ups\n",
           (unsigned long long)st.deferred_total, (unsigned long long)st.wakeups);
    sessions_free(ss, NCONN);
    free(ss);
    dq_free();
}

/* Finished in the call itself, an error finish, PP_DEFER without a handle,
 * and a reply at once: in order, then the errors close. */
static void test_deferred_edges(void)
{
    alarm(60);
    pp_config cfg;
    df_config(&cfg, &LINE_LF);
    int port;
    pp_server *srv = server_up(&cfg, &port);
    int a = client_connect(port);
    send_all(a, "now:a\necho:b\nnow:c\n", 19);
    expect_reply(a, &LINE_LF, "NOW:A");
    expect_reply(a, &LINE_LF, "echo:b");
    expect_reply(a, &LINE_LF, "NOW:C");
    /* An error finish: the replies before it go, its own never, then EOF. */
    send_all(a, "now:d\nfail\necho:never\n", 22);
    expect_reply(a, &LINE_LF, "NOW:D");
    expect_eof(a);
    close(a);
    int b = client_connect(port);
    send_all(b, "echo:e\nbad\necho:never\n", 22);
    expect_reply(b, &LINE_LF, "echo:e");
    expect_eof(b);
    close(b);
    pp_stats st;
    wait_active(srv, 0);
    server_down(srv, &st);
    CHECK_EQ(st.handler_errors, 2);
    CHECK_EQ(st.deferred, 0);
    CHECK_EQ(st.deferred_total, 4);
    CHECK_EQ(atomic_load(&df_gone), 0);
    dq_free();
}

static void wait_queued(size_t n)
{
    int64_t until = now_ms() + 10000;
    for (;;) {
        pthread_mutex_lock(&DQ.mu);
        size_t k = DQ.n;
        pthread_mutex_unlock(&DQ.mu);
        if (k >= n)
            return;
        CHECK(now_ms() < until);
        sleep_ms(2);
    }
}

/* A peer that resets while its reply is deferred: the connection goes at
 * once (its close event once, after the task), the gone hook names the
 * handle, and the finish that comes later returns -ENOTCONN, leaking
 * nothing.  A peer that only shuts its side gets the reply, then EOF. */
static void test_deferred_peer_gone(void)
{
    alarm(60);
    pp_config cfg;
    df_config(&cfg, &LINE_LF);
    int port;
    pp_server *srv = server_up(&cfg, &port);
    int a = client_connect(port);
    send_all(a, "echo:1\nwait\necho:2\n", 19);
    expect_reply(a, &LINE_LF, "echo:1");
    wait_queued(1);
    struct linger l = {1, 0};
    CHECK(setsockopt(a, SOL_SOCKET, SO_LINGER, &l, sizeof l) == 0);
    close(a);
    WAIT_STAT(srv, closed, 1, 1);
    int64_t until = now_ms() + 10000;
    while (atomic_load(&df_closes) < 1) {
        CHECK(now_ms() < until);
        sleep_ms(1);
    }
    CHECK_EQ(atomic_load(&df_gone), 1);
    pp_deferred *d;
    const unsigned char *m;
    size_t n;
    uint64_t rng = 1;
    CHECK(dq_take(&rng, &d, &m, &n));
    CHECK_EQ(pp_deferred_id(d), atomic_load(&df_gone_id));
    CHECK(is(m, n, "wait")); /* still readable: it went with the handle */
    CHECK_EQ(pp_deferred_write(d, "late", 4), -ENOTCONN);
    CHECK_EQ(pp_deferred_finish(d, PP_KEEP), -ENOTCONN);
    pp_stats st;
    pp_server_stats(srv, &st);
    CHECK_EQ(st.deferred, 0);

    int b = client_connect(port);
    send_all(b, "wait\n", 5);
    CHECK(shutdown(b, SHUT_WR) == 0);
    wait_queued(1);
    expect_silence(b, 100);
    CHECK(dq_take(&rng, &d, &m, &n));
    CHECK_EQ(pp_deferred_write(d, "later", 5), 0);
    CHECK_EQ(pp_deferred_finish(d, PP_KEEP), 0);
    expect_reply(b, &LINE_LF, "later");
    expect_eof(b);
    close(b);
    wait_active(srv, 0);
    server_down(srv, &st);
    CHECK_EQ(atomic_load(&df_closes), 2);
    CHECK_EQ(atomic_load(&df_gone), 1);
    dq_free();
}

/* reply_timeout closes the connection whose reply never comes, and nothing
 * else: a neighbour is served throughout, and idle_timeout does not count a
 * connection that waits for its reply as idle. */
static void test_reply_timeout(void)
{
    alarm(60);
    pp_config cfg;
    df_config(&cfg, &LINE_LF);
    cfg.reply_timeout = 0.6;
    cfg.idle_timeout = 0.2;
    int port;
    pp_server *srv = server_up(&cfg, &port);
    int a = client_connect(port), b = client_connect(port);
    send_str(a, &LINE_LF, "stuck");
    wait_queued(1);
    /* b keeps talking until a is cut: by reply_timeout, not idle_timeout. */
    struct pollfd p = {a, POLLIN, 0};
    while (poll(&p, 1, 0) == 0) {
        send_str(b, &LINE_LF, "echo:alive");
        expect_reply(b, &LINE_LF, "echo:alive");
        sleep_ms(20);
    }
    expect_eof(a);
    close(a);
    pp_stats st;
    WAIT_STAT(srv, reply_timeouts, 1, 1);
    pp_server_stats(srv, &st);
    CHECK_EQ(st.idle_closes, 0);
    send_str(b, &LINE_LF, "echo:still");
    expect_reply(b, &LINE_LF, "echo:still");
    pp_deferred *d;
    const unsigned char *m;
    size_t n;
    uint64_t rng = 1;
    CHECK(dq_take(&rng, &d, &m, &n));
    CHECK_EQ(pp_deferred_finish(d, PP_KEEP), -ENOTCONN);
    expect_eof(b); /* now silent: idle_timeout */
    close(b);
    wait_active(srv, 0);
    server_down(srv, &st);
    CHECK_EQ(st.reply_timeouts, 1);
    CHECK_EQ(st.idle_closes, 1);
    CHECK_EQ(atomic_load(&df_gone), 1);
    dq_free();
}

static void *df_late_finisher(void *arg)
{
    (void)arg;
    sleep_ms(100);
    pp_deferred *d;
    const unsigned char *m;
    size_t n;
    uint64_t rng = 1;
    while (!dq_take(&rng, &d, &m, &n))
        sleep_ms(1);
    /* "soon" and "never" are queued: finish "soon" only. */
    if (is(m, n, "never")) {
        dq_put(d, m, n);
        while (!dq_take(&rng, &d, &m, &n) || !is(m, n, "soon")) {
            dq_put(d, m, n);
            sleep_ms(1);
        }
    }
    CHECK_EQ(pp_deferred_write(d, "SOON", 4), 0);
    CHECK_EQ(pp_deferred_finish(d, PP_KEEP), 0);
    return NULL;
}

/* A graceful stop waits for deferred replies: one that comes within the
 * drain timeout is delivered, then the goodbye; one that does not is
 * cancelled at the deadline (counted, its connection closed), and the stop
 * is still graceful.  The late finish finds it gone. */
static void test_deferred_drain(void)
{
    alarm(60);
    pp_config cfg;
    df_config(&cfg, &LINE_LF);
    cfg.drain_timeout = 0.6;
    cfg.shutdown_message = (const unsigned char *)"bye";
    cfg.shutdown_message_len = 3;
    int port;
    pp_server *srv = server_up(&cfg, &port);
    int a = client_connect(port), b = client_connect(port);
    send_str(a, &LINE_LF, "soon");
    send_str(b, &LINE_LF, "never");
    wait_queued(2);
    pthread_t t;
    CHECK_EQ(pthread_create(&t, NULL, df_late_finisher, NULL), 0);
    pp_server_stop(srv, 0);
    expect_reply(a, &LINE_LF, "SOON");
    expect_reply(a, &LINE_LF, "bye");
    expect_eof(a);
    expect_eof(b);
    CHECK_EQ(pthread_join(t, NULL), 0);
    CHECK_EQ(pp_server_join(srv), 0);
    CHECK(!pp_server_was_forced(srv));
    pp_stats st;
    pp_server_stats(srv, &st);
    CHECK_EQ(st.deferred_cancelled, 1);
    CHECK_EQ(st.forced_closes, 0);
    CHECK_EQ(st.active, 0);
    pp_deferred *d;
    const unsigned char *m;
    size_t n;
    uint64_t rng = 1;
    CHECK(dq_take(&rng, &d, &m, &n));
    CHECK(is(m, n, "never"));
    pp_server_free(srv);
    /* After the server is freed too: the handle is still the caller's. */
    CHECK_EQ(pp_deferred_finish(d, PP_KEEP), -ENOTCONN);
    close(a);
    close(b);
    dq_free();
}

/* The open hook defers its greeting: a message sent at once waits for it. */
static pp_deferred *greeting;
static int df_open_defer(void *ctx, pp_reply *r)
{
    (void)ctx;
    CHECK_EQ(pp_reply_write(r, "hel", 3), 0); /* taken over with the reply */
    pp_deferred *d = pp_reply_defer(r);
    CHECK(d != NULL);
    __atomic_store_n(&greeting, d, __ATOMIC_RELEASE);
    return PP_KEEP; /* taken as PP_DEFER */
}

static void test_deferred_open(void)
{
    alarm(60);
    pp_config cfg;
    df_config(&cfg, &LENGTH4);
    cfg.on_open = df_open_defer;
    int port;
    pp_server *srv = server_up(&cfg, &port);
    int a = client_connect(port);
    send_str(a, &LENGTH4, "echo:first");
    int64_t until = now_ms() + 10000;
    while (__atomic_load_n(&greeting, __ATOMIC_ACQUIRE) == NULL) {
        CHECK(now_ms() < until);
        sleep_ms(1);
    }
    expect_silence(a, 100);
    pp_deferred *d = __atomic_load_n(&greeting, __ATOMIC_ACQUIRE);
    CHECK_EQ(pp_deferred_write(d, "lo", 2), 0);
    CHECK_EQ(pp_deferred_finish(d, PP_KEEP), 0);
    expect_reply(a, &LENGTH4, "hello");
    expect_reply(a, &LENGTH4, "echo:first");
    close(a);
    pp_stats st;
    wait_active(srv, 0);
    server_down(srv, &st);
    CHECK_EQ(st.deferred_total, 1);
}

/* A batch handler defers the reply of one message; those after it run
 * after the finish, in a batch of their own. */
static atomic_int dfb_calls;
static int df_batch(void *ctx, pp_reply *r, const pp_msg *msgs, size_t n)
{
    (void)ctx;
    atomic_fetch_add(&dfb_calls, 1);
    for (size_t i = 0; i < n; i++) {
        if (is(msgs[i].data, msgs[i].len, "later")) {
            pp_deferred *d = pp_reply_defer_batch(r, i + 1);
            CHECK(d != NULL);
            CHECK(pp_reply_defer_batch(r, i + 1) == NULL);
            dq_put(d, msgs[i].data, msgs[i].len);
            return PP_DEFER;
        }
        if (pp_reply_send(r, msgs[i].data, msgs[i].len) < 0)
            return -1;
    }
    return PP_KEEP;
}

static void test_deferred_batch(void)
{
    alarm(60);
    pp_config cfg;
    df_config(&cfg, &LENGTH4);
    cfg.handler = NULL;
    cfg.batch = df_batch;
    int port;
    pp_server *srv = server_up(&cfg, &port);
    int a = client_connect(port);
    bytes b = {0};
    frame_put(&b, &LENGTH4, "one", 3);
    frame_put(&b, &LENGTH4, "later", 5);
    frame_put(&b, &LENGTH4, "two", 3);
    frame_put(&b, &LENGTH4, "three", 5);
    send_all(a, b.p, b.n);
    bytes_free(&b);
    expect_reply(a, &LENGTH4, "one");
    wait_queued(1);
    expect_silence(a, 50);
    pp_deferred *d;
    const unsigned char *m;
    size_t n;
    uint64_t rng = 1;
    CHECK(dq_take(&rng, &d, &m, &n));
    static const unsigned char framed[] = {0, 0, 0, 1, 'L', 0, 0, 0, 1, 'M'};
    CHECK_EQ(pp_deferred_write_framed(d, framed, sizeof framed, 2), 0);
    CHECK_EQ(pp_deferred_write(d, "N", 1), 0);
    CHECK_EQ(pp_deferred_write_framed(d, framed, 5, 1), -EINVAL);
    CHECK_EQ(pp_deferred_finish(d, PP_KEEP), 0);
    expect_reply(a, &LENGTH4, "L");
    expect_reply(a, &LENGTH4, "M");
    expect_reply(a, &LENGTH4, "N");
    expect_reply(a, &LENGTH4, "two");
    expect_reply(a, &LENGTH4, "three");
    close(a);
    pp_stats st;
    wait_active(srv, 0);
    server_down(srv, &st);
    CHECK_EQ(atomic_load(&dfb_calls), 2);
    CHECK_EQ(st.replies, 6);
    CHECK_EQ(st.messages, 4); /* the two after "later" counted once, when they ran */
    dq_free();
}

/* ---- several deferred replies per connection (max_deferred) -------------- */

/* Takes the waiting handle whose message is s. */
static pp_deferred *dq_take_msg(const char *s)
{
    int64_t until = now_ms() + 10000;
    for (;;) {
        pthread_mutex_lock(&DQ.mu);
        for (size_t i = 0; i < DQ.n; i++) {
            if (is(DQ.msg[i], DQ.len[i], s)) {
                pp_deferred *d = DQ.d[i];
                DQ.n--;
                DQ.d[i] = DQ.d[DQ.n];
                DQ.msg[i] = DQ.msg[DQ.n];
                DQ.len[i] = DQ.len[DQ.n];
                pthread_mutex_unlock(&DQ.mu);
                return d;
            }
        }
        pthread_mutex_unlock(&DQ.mu);
        CHECK(now_ms() < until);
        sleep_ms(1);
    }
}

static size_t dq_count(void)
{
    pthread_mutex_lock(&DQ.mu);
    size_t n = DQ.n;
    pthread_mutex_unlock(&DQ.mu);
    return n;
}

/* Finishes d with its message uppercased. */
static void dq_finish_upper(pp_deferred *d, const char *s, int status)
{
    unsigned char u[64];
    size_t n = strlen(s);
    CHECK(n < sizeof u);
    memcpy(u, s, n);
    upper_bytes(u, n);
    CHECK_EQ(pp_deferred_write(d, u, n), 0);
    CHECK_EQ(pp_deferred_finish(d, status), 0);
}

/* max_deferred = 4: the handler goes on with a read's later messages while
 * the earlier replies are pending; replies finished in reverse leave in
 * request order, a reply made at once waits behind the pending ones, a
 * fifth deferral waits for the four before it, and a close or a peer's
 * reset in the middle ends the rest as the contract says. */
static void test_deferred_multi_edges(void)
{
    alarm(60);
    pp_config cfg;
    df_config(&cfg, &LINE_LF);
    cfg.max_deferred = 4;
    int port;
    pp_server *srv = server_up(&cfg, &port);

    /* Finished in reverse: nothing leaves until the first is in. */
    int a = client_connect(port);
    send_all(a, "a\nb\necho:x\nc\nd\n", 15);
    wait_queued(4);
    dq_finish_upper(dq_take_msg("d"), "d", PP_KEEP);
    dq_finish_upper(dq_take_msg("c"), "c", PP_KEEP);
    dq_finish_upper(dq_take_msg("b"), "b", PP_KEEP);
    expect_silence(a, 100);
    dq_finish_upper(dq_take_msg("a"), "a", PP_KEEP);
    expect_reply(a, &LINE_LF, "A");
    expect_reply(a, &LINE_LF, "B");
    expect_reply(a, &LINE_LF, "echo:x"); /* made at once, held behind B */
    expect_reply(a, &LINE_LF, "C");
    expect_reply(a, &LINE_LF, "D");

    /* A prefix goes as soon as it is in; the fifth waits for the four. */
    send_all(a, "e\nf\ng\nh\ni\necho:y\n", 17);
    wait_queued(4);
    dq_finish_upper(dq_take_msg("e"), "e", PP_KEEP);
    expect_reply(a, &LINE_LF, "E");
    dq_finish_upper(dq_take_msg("g"), "g", PP_KEEP);
    expect_silence(a, 50);
    CHECK_EQ(dq_count(), 2); /* f and h: i is not handled yet */
    dq_finish_upper(dq_take_msg("f"), "f", PP_KEEP);
    expect_reply(a, &LINE_LF, "F");
    expect_reply(a, &LINE_LF, "G");
    sleep_ms(50);
    CHECK_EQ(dq_count(), 1);
    dq_finish_upper(dq_take_msg("h"), "h", PP_KEEP);
    expect_reply(a, &LINE_LF, "H");
    dq_finish_upper(dq_take_msg("i"), "i", PP_KEEP);
    expect_reply(a, &LINE_LF, "I");
    expect_reply(a, &LINE_LF, "echo:y");

    /* A close in the middle: its reply goes, then EOF; the one after it is
     * gone (its finish says so) and so is the reply held behind it. */
    send_all(a, "j\nk\necho:z\nl\n", 13);
    wait_queued(3);
    pp_deferred *l = dq_take_msg("l");
    dq_finish_upper(dq_take_msg("k"), "k", PP_CLOSE);
    dq_finish_upper(dq_take_msg("j"), "j", PP_KEEP);
    expect_reply(a, &LINE_LF, "J");
    expect_reply(a, &LINE_LF, "K");
    expect_eof(a);
    close(a);
    WAIT_STAT(srv, closed, 1, 1);
    CHECK_EQ(atomic_load(&df_gone), 1);
    CHECK_EQ(pp_deferred_finish(l, PP_KEEP), -ENOTCONN);

    /* A reset with three pending: each handle is told, each message stays
     * readable until its own finish, in any order. */
    int b = client_connect(port);
    send_all(b, "m1\nm2\nm3\n", 9);
    wait_queued(3);
    struct linger lg = {1, 0};
    CHECK(setsockopt(b, SOL_SOCKET, SO_LINGER, &lg, sizeof lg) == 0);
    close(b);
    WAIT_STAT(srv, closed, 2, 1);
    CHECK_EQ(atomic_load(&df_gone), 4);
    pp_stats st;
    pp_server_stats(srv, &st);
    CHECK_EQ(st.deferred, 0);
    static const char *const order[] = {"m2", "m1", "m3"};
    for (int i = 0; i < 3; i++) {
        pthread_mutex_lock(&DQ.mu);
        size_t k = 0;
        while (!is(DQ.msg[k], DQ.len[k], order[i]))
            k++; /* reads every waiting message: ASan sees a freed one */
        pthread_mutex_unlock(&DQ.mu);
        pp_deferred *d = dq_take_msg(order[i]);
        CHECK_EQ(pp_deferred_write(d, "late", 4), -ENOTCONN);
        CHECK_EQ(pp_deferred_finish(d, PP_KEEP), -ENOTCONN);
    }
    wait_active(srv, 0);
    server_down(srv, &st);
    CHECK_EQ(st.deferred_total, 4 + 5 + 3 + 3);
    CHECK_EQ(st.handler_errors, 0);
    CHECK_EQ(atomic_load(&df_closes), 2);
    dq_free();
}

/* Found by review: with replies pending, a later message's PP_CLOSE waits
 * for them without hiding a reset; output_limit holds for replies held
 * behind a pending one; the drain's end counts as cancelled only the
 * replies still to come. */
static void test_deferred_multi_review(void)
{
    alarm(60);
    pp_config cfg;
    df_config(&cfg, &LINE_LF);
    cfg.max_deferred = 4;
    cfg.output_limit = 256 * 1024;
    cfg.output_high_water = 16 << 20;
    int port;
    pp_server *srv = server_up(&cfg, &port);

    /* A close after a pending reply: that reply, the ones before the close,
     * the close's own, then EOF; nothing after it runs. */
    int a = client_connect(port);
    send_all(a, "d1\necho:a\nclose:b\necho:never\n", 29);
    wait_queued(1);
    expect_silence(a, 50);
    dq_finish_upper(dq_take_msg("d1"), "d1", PP_KEEP);
    expect_reply(a, &LINE_LF, "D1");
    expect_reply(a, &LINE_LF, "echo:a");
    expect_reply(a, &LINE_LF, "close:b");
    expect_eof(a);
    close(a);
    WAIT_STAT(srv, closed, 1, 1);

    /* The same, and the peer resets meanwhile: seen at once. */
    int b = client_connect(port);
    send_all(b, "d2\nclose:c\n", 11);
    wait_queued(1);
    sleep_ms(50);
    struct linger lg = {1, 0};
    CHECK(setsockopt(b, SOL_SOCKET, SO_LINGER, &lg, sizeof lg) == 0);
    close(b);
    WAIT_STAT(srv, closed, 2, 1);
    CHECK_EQ(atomic_load(&df_gone), 1);
    CHECK_EQ(pp_deferred_finish(dq_take_msg("d2"), PP_KEEP), -ENOTCONN);

    /* 8 MiB made at once behind a pending reply, for a peer that does not
     * read: cut at output_limit, counted, as without the pending one. */
    int c = client_connect_buf(port, 4096);
    send_all(c, "d3\nbig\nbig\nbig\nbig\nbig\nbig\nbig\nbig\n", 35);
    WAIT_STAT(srv, output_overflows, 1, 1);
    WAIT_STAT(srv, closed, 3, 1);
    CHECK_EQ(pp_deferred_finish(dq_take_msg("d3"), PP_KEEP), -ENOTCONN);
    close(c);
    wait_active(srv, 0);
    pp_stats st;
    server_down(srv, &st);
    CHECK_EQ(st.output_overflows, 1);
    CHECK_EQ(atomic_load(&df_gone), 2);

    /* The drain's end with one reply pending and two finished behind it:
     * one cancelled, one gone. */
    df_config(&cfg, &LINE_LF);
    cfg.max_deferred = 4;
    cfg.drain_timeout = 0.3;
    srv = server_up(&cfg, &port);
    int d = client_connect(port);
    send_all(d, "p1\np2\np3\n", 9);
    wait_queued(3);
    pp_deferred *p1 = dq_take_msg("p1");
    dq_finish_upper(dq_take_msg("p3"), "p3", PP_KEEP);
    dq_finish_upper(dq_take_msg("p2"), "p2", PP_KEEP);
    expect_silence(d, 50);
    pp_server_stop(srv, 0);
    expect_eof(d);
    CHECK_EQ(pp_server_join(srv), 0);
    CHECK(!pp_server_was_forced(srv));
    pp_server_stats(srv, &st);
    CHECK_EQ(st.deferred_cancelled, 1);
    CHECK_EQ(atomic_load(&df_gone), 1);
    pp_server_free(srv);
    CHECK_EQ(pp_deferred_finish(p1, PP_KEEP), -ENOTCONN);
    close(d);
    dq_free();
}

/* Deferred or answered at once by a hash of the message, finished by other
 * threads in random order, max_deferred = 16: every reply once, in request
 * order; more than one reply of a connection was pending at a time, never
 * more than 16, and replies made at once were held behind pending ones. */
enum { DM_IDS = 1024 };
static atomic_int dm_pend[DM_IDS];
static atomic_int dm_max, dm_held, dm_deferred;

static int dm_handler(void *ctx, const unsigned char *m, size_t n, pp_reply *r)
{
    (void)ctx;
    uint64_t id = pp_reply_conn_id(r);
    CHECK(id < DM_IDS);
    unsigned sum = 0;
    for (size_t i = 0; i < n; i++)
        sum += m[i];
    if (sum % 3 == 0) {
        if (atomic_load(&dm_pend[id]) > 0)
            atomic_fetch_add(&dm_held, 1);
        unsigned char *u = malloc(n ? n : 1);
        CHECK(u);
        memcpy(u, m, n);
        upper_bytes(u, n);
        int rc = pp_reply_write(r, u, n);
        free(u);
        return rc < 0 ? -1 : PP_KEEP;
    }
    pp_deferred *d = pp_reply_defer(r);
    CHECK(d != NULL);
    int p = atomic_fetch_add(&dm_pend[id], 1) + 1;
    int mx = atomic_load(&dm_max);
    while (p > mx && !atomic_compare_exchange_weak(&dm_max, &mx, p))
        ;
    atomic_fetch_add(&dm_deferred, 1);
    dq_put(d, m, n);
    return PP_DEFER;
}

static void *dm_finisher(void *arg)
{
    uint64_t rng = (uint64_t)(uintptr_t)arg * 0x9e3779b97f4a7c15ull;
    for (;;) {
        pp_deferred *d;
        const unsigned char *m;
        size_t n;
        if (!dq_take(&rng, &d, &m, &n)) {
            if (atomic_load(&dq_stop))
                return NULL;
            sched_yield();
            continue;
        }
        df_write_upper(d, m, n, &rng);
        atomic_fetch_sub(&dm_pend[pp_deferred_conn_id(d)], 1);
        CHECK_EQ(pp_deferred_finish(d, PP_KEEP), 0);
    }
}

static void test_deferred_multi_stress(const wire *w)
{
    alarm(150);
    pp_config cfg;
    df_config(&cfg, w);
    cfg.handler = dm_handler;
    cfg.threads = 4;
    cfg.max_deferred = 16;
    for (int i = 0; i < DM_IDS; i++)
        atomic_store(&dm_pend[i], 0);
    atomic_store(&dm_max, 0);
    atomic_store(&dm_held, 0);
    atomic_store(&dm_deferred, 0);
    int port;
    pp_server *srv = server_up(&cfg, &port);
    enum { NFIN = 4, NCONN = 100 };
    pthread_t fin[NFIN];
    for (int i = 0; i < NFIN; i++)
        CHECK_EQ(pthread_create(&fin[i], NULL, dm_finisher, (void *)(uintptr_t)(i + 1)), 0);
    size_t nmsg = scale_pct() < 50 ? 60 : scaled(1000, 60);
    session *ss = calloc(NCONN, sizeof *ss);
    CHECK(ss);
    for (int i = 0; i < NCONN; i++)
        ss[i] = (session){.port = port, .w = w, .nmsg = nmsg, .min_len = 1,
                          .max_len = 300, .upper = 1, .half_close = i % 2,
                          .max_piece = i % 3 == 0 ? 50 : 4096,
                          .seed = 9000 + (uint64_t)i, .id = i};
    run_sessions(ss, NCONN);
    pp_stats st;
    pp_server_stats(srv, &st);
    CHECK_EQ(st.replies, NCONN * nmsg);
    CHECK_EQ(st.deferred_total, (uint64_t)atomic_load(&dm_deferred));
    wait_active(srv, 0);
    atomic_store(&dq_stop, 1);
    for (int i = 0; i < NFIN; i++)
        CHECK_EQ(pthread_join(fin[i], NULL), 0);
    server_down(srv, &st);
    CHECK_EQ(st.deferred, 0);
    CHECK_EQ(st.handler_errors, 0);
    CHECK_EQ(atomic_load(&df_closes), NCONN);
    CHECK(atomic_load(&dm_max) > 1);
    CHECK(atomic_load(&dm_max) <= 16);
    CHECK(atomic_load(&dm_held) > 0);
    printf("  %llu deferred, %d made at once behind pending ones, at most %d pending\n",
           (unsigned long long)st.deferred_total, atomic_load(&dm_held), atomic_load(&dm_max));
    sessions_free(ss, NCONN);
    free(ss);
    dq_free();
}

/* ---- PROXY protocol ------------------------------------------------------ */

static pthread_mutex_t px_mu = PTHREAD_MUTEX_INITIALIZER;
static char px_peer[64], px_balancer[64];
static int px_port, px_bport, px_bal_rc;
static atomic_int px_opens;

/* The open hook records what the handler would see. */
static int px_open(void *ctx, pp_reply *r)
{
    (void)ctx;
    pthread_mutex_lock(&px_mu);
    CHECK_EQ(pp_reply_peer(r, px_peer, sizeof px_peer, &px_port), 0);
    px_bal_rc = pp_reply_proxy_peer(r, px_balancer, sizeof px_balancer, &px_bport);
    pthread_mutex_unlock(&px_mu);
    atomic_fetch_add(&px_opens, 1);
    return PP_KEEP;
}

static void px_expect(const char *peer, int port, int bal_rc)
{
    pthread_mutex_lock(&px_mu);
    CHECKF(strcmp(px_peer, peer) == 0, "peer %s, want %s", px_peer, peer);
    if (port >= 0)
        CHECK_EQ(px_port, port);
    CHECK_EQ(px_bal_rc, bal_rc);
    if (bal_rc == 0)
        CHECK(strcmp(px_balancer, "127.0.0.1") == 0);
    pthread_mutex_unlock(&px_mu);
}

static void wait_opens(int n)
{
    int64_t until = now_ms() + 10000;
    while (atomic_load(&px_opens) < n) {
        CHECK(now_ms() < until);
        sleep_ms(1);
    }
}

/* A trusted balancer's header names the client: the open hook and the
 * handler see it, the balancer is kept, the stream begins after the header
 * (whole or a byte at a time, v1 or v2); LOCAL keeps the socket's address;
 * a malformed, partial, duplicated or late header, or an untrusted source,
 * closes the connection, counted, and no event is sent for it. */
static void test_proxy_protocol(void)
{
    alarm(60);
    static const pp_cidr lo = {AF_INET, {127, 0, 0, 0}, 8};
    pp_config cfg;
    config_upper(&cfg, &LINE_LF, NULL);
    cfg.on_open = px_open;
    cfg.proxy_protocol = 1;
    cfg.proxy_timeout = 0.3;
    cfg.trusted_proxies = &lo;
    cfg.ntrusted_proxies = 1;
    atomic_store(&px_opens, 0);
    int port;
    pp_server *srv = server_up(&cfg, &port);

    int a = client_connect(port);
    send_all(a, "PROXY TCP4 198.18.0.7 198.18.0.1 40000 9000\r\nhello\n", 51);
    expect_reply(a, &LINE_LF, "HELLO");
    px_expect("198.18.0.7", 40000, 0);
    close(a);

    /* A byte at a time, and v6. */
    static const char h6[] = "PROXY TCP6 2001:db8::9 2001:db8::1 123 9000\r\nsplit\n";
    int b = client_connect(port);
    for (size_t i = 0; i < sizeof h6 - 1; i++) {
        send_all(b, h6 + i, 1);
        if (i % 8 == 0)
            sleep_ms(1);
    }
    expect_reply(b, &LINE_LF, "SPLIT");
    px_expect("2001:db8::9", 123, 0);
    close(b);

    /* v2 with a TLV, the stream's first bytes in the same write. */
    static const unsigned char v2h[] = {
        0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A,
        0x21, 0x11, 0x00, 0x11, 198, 18, 1, 2, 198, 18, 0, 1, 0x13, 0x88, 0x23, 0x28,
        0x04, 0x00, 0x02, 'o', 'k', 'v', '2', '\n'};
    int c = client_connect(port);
    send_all(c, v2h, sizeof v2h);
    expect_reply(c, &LINE_LF, "V2");
    px_expect("198.18.1.2", 5000, 0);
    close(c);

    /* LOCAL (a health check): the socket's own peer, no balancer. */
    static const unsigned char local[] = {
        0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A,
        0x20, 0x00, 0x00, 0x00, 'h', 'c', '\n'};
    int d = client_connect(port);
    send_all(d, local, sizeof local);
    expect_reply(d, &LINE_LF, "HC");
    px_expect("127.0.0.1", -1, -ENOENT);
    close(d);
    wait_opens(4);

    /* Refused: not a header, a partial one then EOF, a second header, and
     * none at all (proxy_timeout).  None reaches the handler. */
    static const char *const bad[] = {
        "GET / HTTP/1.0\r\n\r\n",
        "PROXY TCP4 198.18.0.7 198.18.0.1 40000 9000\r\nPROXY TCP4 1.2.3.4 1.2.3.5 1 2\r\nx\n",
    };
    for (int i = 0; i < 2; i++) {
        int e = client_connect(port);
        send_all(e, bad[i], strlen(bad[i]));
        expect_cut(e);
        close(e);
    }
    int f = client_connect(port);
    send_all(f, "PROXY TCP4 198.18", 17);
    CHECK(shutdown(f, SHUT_WR) == 0);
    expect_cut(f);
    close(f);
    int g = client_connect(port);
    int64_t t0 = now_ms();
    expect_cut(g);
    CHECK(now_ms() - t0 >= 250);
    close(g);
    WAIT_STAT(srv, proxy_errors, 4, 1);
    CHECK_EQ(atomic_load(&px_opens), 4);
    pp_stats st;
    wait_active(srv, 0);
    server_down(srv, &st);
    CHECK_EQ(st.proxy_errors, 4);
    CHECK_EQ(st.messages, 4);

    /* An untrusted source: cut at once, before any event. */
    static const pp_cidr ten = {AF_INET, {10, 0, 0, 0}, 8};
    config_upper(&cfg, &LINE_LF, NULL);
    cfg.on_open = px_open;
    cfg.proxy_protocol = 1;
    cfg.trusted_proxies = &ten;
    cfg.ntrusted_proxies = 1;
    srv = server_up(&cfg, &port);
    int h = client_connect(port);
    send_all(h, "PROXY TCP4 198.18.0.7 198.18.0.1 40000 9000\r\nhello\n", 51);
    expect_cut(h);
    close(h);
    WAIT_STAT(srv, proxy_errors, 1, 1);
    server_down(srv, &st);
    CHECK_EQ(st.accepted, 0);
    CHECK_EQ(atomic_load(&px_opens), 4);

    /* Bad networks are refused at construction. */
    pp_cidr wide = {AF_INET, {0}, 33};
    config_upper(&cfg, &LINE_LF, NULL);
    cfg.proxy_protocol = 1;
    cfg.trusted_proxies = &wide;
    cfg.ntrusted_proxies = 1;
    pp_server *none = NULL;
    CHECK_EQ(pp_server_new(&cfg, &none), -EINVAL);
    wide.family = AF_UNIX;
    wide.prefix = 8;
    CHECK_EQ(pp_server_new(&cfg, &none), -EINVAL);
    CHECK(none == NULL);
}

/* ---- listening sockets given by the caller -------------------------------- */

static atomic_int lf_cred_ok;
static int lf_open(void *ctx, pp_reply *r)
{
    (void)ctx;
    int pid, uid, gid;
    if (pp_reply_peer_cred(r, &pid, &uid, &gid) == 0) {
        CHECK_EQ(pid, (int)getpid());
        CHECK_EQ(uid, (int)getuid());
        CHECK_EQ(gid, (int)getgid());
        atomic_fetch_add(&lf_cred_ok, 1);
    } else {
        char host[64];
        int port;
        CHECK_EQ(pp_reply_peer(r, host, sizeof host, &port), 0);
        CHECK(strcmp(host, "127.0.0.1") == 0);
    }
    return PP_KEEP;
}

/* A Unix and a TCP listener made by the caller feed one I/O thread; a Unix
 * peer's credentials reach the hooks; a socket that is not listening is
 * refused; the drain says STOPPING=1 on the notify socket. */
static void test_listen_fds(void)
{
    alarm(60);
    char path[64];
    snprintf(path, sizeof path, "/tmp/pp-test-%d.sock", (int)getpid());
    unlink(path);
    int ux = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    CHECK(ux >= 0);
    struct sockaddr_un sun = {.sun_family = AF_UNIX};
    memcpy(sun.sun_path, path, strlen(path) + 1);
    CHECK(bind(ux, (struct sockaddr *)&sun, sizeof sun) == 0);
    CHECK(listen(ux, 16) == 0);
    int tcp = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    struct sockaddr_in sin = {.sin_family = AF_INET};
    sin.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    CHECK(bind(tcp, (struct sockaddr *)&sin, sizeof sin) == 0);
    CHECK(listen(tcp, 16) == 0);
    socklen_t sl = sizeof sin;
    CHECK(getsockname(tcp, (struct sockaddr *)&sin, &sl) == 0);
    int notify[2];
    CHECK(socketpair(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0, notify) == 0);

    pp_config cfg;
    config_upper(&cfg, &LINE_LF, NULL);
    cfg.on_open = lf_open;
    int fds[2] = {ux, tcp};
    cfg.listen_fds = fds;
    cfg.nlisten_fds = 2;
    cfg.notify_fd = notify[0];
    atomic_store(&lf_cred_ok, 0);
    pp_server *srv = NULL;
    CHECK_EQ(pp_server_new(&cfg, &srv), 0);
    CHECK_EQ(pp_server_start(srv), 0);

    int u = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    CHECK(connect(u, (struct sockaddr *)&sun, sizeof sun) == 0);
    set_timeouts(u, RECV_TIMEOUT_S * 1000, RECV_TIMEOUT_S * 1000);
    send_all(u, "over unix\n", 10);
    expect_reply(u, &LINE_LF, "OVER UNIX");
    int t = client_connect(ntohs(sin.sin_port));
    send_all(t, "over tcp\n", 9);
    expect_reply(t, &LINE_LF, "OVER TCP");
    CHECK_EQ(atomic_load(&lf_cred_ok), 1);
    close(u);
    close(t);
    wait_active(srv, 0);
    pp_server_stop(srv, 0);
    CHECK_EQ(pp_server_join(srv), 0);
    char msg[32] = {0};
    struct pollfd pfd = {notify[1], POLLIN, 0};
    CHECK(poll(&pfd, 1, 5000) == 1);
    CHECK_EQ(recv(notify[1], msg, sizeof msg, 0), 10);
    CHECK(strcmp(msg, "STOPPING=1") == 0);
    pp_server_free(srv);
    /* The caller's own sockets are still open and its own. */
    int acc = 0;
    socklen_t al = sizeof acc;
    CHECK(getsockopt(ux, SOL_SOCKET, SO_ACCEPTCONN, &acc, &al) == 0 && acc == 1);
    close(ux);
    close(tcp);
    close(notify[0]);
    close(notify[1]);
    unlink(path);

    /* Not listening, not a socket, not a stream: refused. */
    int idle = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    int dg = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    int pipefd[2];
    CHECK(pipe(pipefd) == 0);
    int bad[3] = {idle, dg, pipefd[0]};
    int want[3] = {-EINVAL, -EINVAL, -ENOTSOCK};
    for (int i = 0; i < 3; i++) {
        config_upper(&cfg, &LINE_LF, NULL);
        cfg.listen_fds = &bad[i];
        cfg.nlisten_fds = 1;
        pp_server *none = NULL;
        CHECK_EQ(pp_server_new(&cfg, &none), want[i]);
        CHECK(none == NULL);
    }
    close(idle);
    close(dg);
    close(pipefd[0]);
    close(pipefd[1]);
}

static int g_argc;
static char **g_argv;

static int selected(const char *name)
{
    int any_positive = 0, hit = 0;
    for (int i = 1; i < g_argc; i++) {
        if (g_argv[i][0] == '-') {
            if (strstr(name, g_argv[i] + 1) != NULL)
                return 0;
        } else {
            any_positive = 1;
            if (strstr(name, g_argv[i]) != NULL)
                hit = 1;
        }
    }
    return !any_positive || hit;
}

int main(int argc, char **argv)
{
    signal(SIGPIPE, SIG_IGN);
    CHECK(sem_init(&H.entered, 0, 0) == 0);
    CHECK(sem_init(&H.gate, 0, 0) == 0);
    /* Arguments pick tests by substring; "-name" leaves tests out. */
    g_argc = argc;
    g_argv = argv;
    int nfail = 0;
    char failed[2048] = "";
    /* Each test runs in its own forked process, so one failure (or a leak
     * found at its exit) is reported without hiding the tests after it. */
    int use_fork = getenv("PP_TEST_NO_FORK") == NULL;
#define RUN(name, call)                                                       \
    do {                                                                      \
        if (!selected(name))                                                  \
            break;                                                            \
        int64_t t0_ = now_ms();                                               \
        fflush(stdout);                                                       \
        fflush(stderr);                                                       \
        pid_t pid_ = use_fork ? fork() : 0;                                   \
        CHECK(pid_ >= 0);                                                     \
        if (pid_ == 0) {                                                      \
            call;                                                             \
            alarm(0);                                                         \
            if (use_fork) {                                                   \
                fflush(stdout);                                               \
                exit(0);                                                      \
            }                                                                 \
        } else {                                                              \
            int st_;                                                          \
            while (waitpid(pid_, &st_, 0) < 0)                                \
                CHECK(errno == EINTR);                                        \
            if (!WIFEXITED(st_) || WEXITSTATUS(st_) != 0) {                   \
                nfail++;                                                      \
                if (strlen(failed) + strlen(name) + 2 < sizeof failed) {      \
                    strcat(failed, " ");                                      \
                    strcat(failed, name);                                     \
                }                                                             \
                if (WIFSIGNALED(st_))                                         \
                    printf("  %-32s FAILED (signal %d%s)\n", name,            \
                           WTERMSIG(st_),                                     \
                           WTERMSIG(st_) == SIGALRM ? ": timed out" : "");    \
                else                                                          \
                    printf("  %-32s FAILED (exit %d)\n", name,                \
                           WEXITSTATUS(st_));                                 \
                fflush(stdout);                                               \
                break;                                                        \
            }                                                                 \
        }                                                                     \
        printf("  %-32s %6lld ms\n", name, (long long)(now_ms() - t0_));      \
        fflush(stdout);                                                       \
    } while (0)
    RUN("config_validation", test_config_validation());
    RUN("order_line_lf_echo", test_pipelined_order(&LINE_LF, ECHO));
    RUN("order_line_crlf_echo", test_pipelined_order(&LINE_CRLF, ECHO));
    RUN("order_length4_echo", test_pipelined_order(&LENGTH4, ECHO));
    RUN("order_raw_echo", test_pipelined_order(&RAW, ECHO));
    RUN("order_line_lf_upper", test_pipelined_order(&LINE_LF, UPPER));
    RUN("order_line_crlf_upper", test_pipelined_order(&LINE_CRLF, UPPER));
    RUN("order_length4_upper", test_pipelined_order(&LENGTH4, UPPER));
    RUN("order_raw_upper", test_pipelined_order(&RAW, UPPER));
    RUN("order_line_lf_batch", test_pipelined_order(&LINE_LF, BATCH));
    RUN("order_length4_batch", test_pipelined_order(&LENGTH4, BATCH));
    RUN("batch_close", test_batch_close());
    RUN("empty_partial_line", test_empty_and_partial(&LINE_LF));
    RUN("empty_partial_crlf", test_empty_and_partial(&LINE_CRLF));
    RUN("empty_partial_length", test_empty_and_partial(&LENGTH4));
    RUN("reply_too_big_for_header", test_reply_too_big_for_header());
    RUN("half_close_line", test_half_close(&LINE_LF));
    RUN("half_close_length", test_half_close(&LENGTH4));
    RUN("handler_close_line", test_handler_close_and_errors(&LINE_LF));
    RUN("handler_close_crlf", test_handler_close_and_errors(&LINE_CRLF));
    RUN("handler_close_length", test_handler_close_and_errors(&LENGTH4));
    RUN("failed_partial_line", test_failed_handler_sends_no_partial_reply(&LINE_CRLF));
    RUN("failed_partial_length", test_failed_handler_sends_no_partial_reply(&LENGTH4));
    RUN("huge_max_size", test_huge_max_size_does_not_wrap());
    RUN("free_without_run", test_free_without_run());
    RUN("push_from_threads", test_push_from_threads());
    RUN("publish_and_broadcast", test_publish_and_broadcast());
    RUN("push_limit_close", test_push_limit(0));
    RUN("push_limit_drop", test_push_limit(1));
    RUN("close_from_another_thread", test_close_from_another_thread());
    RUN("pushes_then_stop", test_pushes_then_stop());
    RUN("pushes_to_closing", test_pushes_to_a_closing_connection());
    RUN("output_limit_replies_only", test_output_limit_counts_replies_only());
    RUN("empty_raw_push", test_empty_raw_push());
    RUN("forced_stop_refuses_pushes", test_forced_stop_refuses_pushes());
    RUN("push_stress_graceful", test_push_stress(0));
    RUN("push_stress_forced", test_push_stress(1));
    RUN("accepts_bounded", test_accepts_bounded());
    RUN("deferred_stress_line", test_deferred_stress(&LINE_LF));
    RUN("deferred_stress_length", test_deferred_stress(&LENGTH4));
    RUN("deferred_edges", test_deferred_edges());
    RUN("deferred_peer_gone", test_deferred_peer_gone());
    RUN("reply_timeout", test_reply_timeout());
    RUN("deferred_drain", test_deferred_drain());
    RUN("deferred_open", test_deferred_open());
    RUN("deferred_batch", test_deferred_batch());
    RUN("deferred_multi_edges", test_deferred_multi_edges());
    RUN("proxy_protocol", test_proxy_protocol());
    RUN("listen_fds", test_listen_fds());
    RUN("deferred_multi_review", test_deferred_multi_review());
    RUN("deferred_multi_stress_line", test_deferred_multi_stress(&LINE_LF));
    RUN("deferred_multi_stress_length", test_deferred_multi_stress(&LENGTH4));
    RUN("on_worker", test_on_worker());
    RUN("oversize_line", test_oversize_line());
    RUN("oversize_header4", test_oversize_length_header(4));
    RUN("oversize_header8", test_oversize_length_header(8));
    RUN("shutdown_message_line", test_shutdown_message(&LINE_LF));
    RUN("shutdown_message_length", test_shutdown_message(&LENGTH4));
    RUN("stop_closes_idle", test_stop_closes_idle());
    RUN("stop_answers_unread_input", test_stop_answers_unread_input());
    RUN("close_with_messages_behind", test_close_with_messages_behind());
    RUN("close_while_peer_sends", test_close_while_peer_sends());
    RUN("max_connections", test_max_connections());
    RUN("nonreader_bounded", test_nonreader_is_bounded());
    RUN("peer_reset", test_peer_reset());
    if (getenv("PP_TEST_NO_EMFILE") == NULL)
        RUN("emfile", test_emfile());
    RUN("run_on_caller_thread", test_run_on_caller_thread(0));
    RUN("run_with_signals", test_run_on_caller_thread(1));
    RUN("second_signal_forces", test_second_signal_forces());
    RUN("drain_timeout", test_drain_timeout());
    RUN("connection_events", test_connection_events());
    RUN("idle_timers", test_idle_timers());
    RUN("leaving", test_leaving());
    RUN("full_server_rejecting_quiet", test_full_server_rejecting_stays_quiet());
    RUN("sockets_behind_stuck_queue", test_serves_sockets_behind_a_stuck_queue());
    RUN("stop_answers_during_task", test_stop_answers_what_came_during_a_task());
    RUN("urgent_data", test_urgent_data_does_not_stall());
    RUN("drain_deadline_lingering", test_drain_deadline_with_a_lingering_peer());
    RUN("stress", test_stress());
    RUN("forced_stop_stuck", test_forced_stop_with_stuck_handlers());
    sem_destroy(&H.entered);
    sem_destroy(&H.gate);
    if (nfail) {
        printf("test_server: %d FAILED:%s\n", nfail, failed);
        return 1;
    }
    printf("test_server: all passed\n");
    return 0;
}
