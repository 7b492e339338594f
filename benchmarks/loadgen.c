/* loadgen: a single-threaded epoll load generator for line or length-prefixed
 * request/reply servers.
 *
 * N non-blocking connections each keep `depth` requests outstanding.  Every
 * reply is checked byte for byte against the reply expected for the request at
 * the head of that connection's FIFO (echo: the request itself; sha256: the hex
 * digest of its payload), so reordering, corruption, loss and extra bytes all
 * show up as errors.  Latency is recorded per request in a log-linear
 * histogram.  At the end it prints one JSON object on stdout; diagnostics go
 * to stderr.
 *
 * Timeline: connect all -> warmup (not counted) -> measured window of
 * `duration` seconds (completions inside it are counted, their latency
 * recorded, client CPU and optional server CPU sampled at both edges) -> drain
 * (no new requests; whatever is still outstanding after `grace` seconds is
 * lost).
 *
 * Build: cc -O2 -Wall -Wextra -Werror -o loadgen loadgen.c
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

/* ---------------------------------------------------------------- sha256 */
/* Only to precompute expected replies of the sha256 scenario, once per slot. */

static const uint32_t K256[64] = {
    0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
    0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
    0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
    0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
    0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
    0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
    0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
    0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2,
};

#define ROR(x, n) (((x) >> (n)) | ((x) << (32 - (n))))

static void sha256_block(uint32_t h[8], const unsigned char *p)
{
    uint32_t w[64], a, b, c, d, e, f, g, hh;
    for (int i = 0; i < 16; i++)
        w[i] = (uint32_t)p[4 * i] << 24 | (uint32_t)p[4 * i + 1] << 16 |
               (uint32_t)p[4 * i + 2] << 8 | p[4 * i + 3];
    for (int i = 16; i < 64; i++) {
        uint32_t s0 = ROR(w[i - 15], 7) ^ ROR(w[i - 15], 18) ^ (w[i - 15] >> 3);
        uint32_t s1 = ROR(w[i - 2], 17) ^ ROR(w[i - 2], 19) ^ (w[i - 2] >> 10);
        w[i] = w[i - 16] + s0 + w[i - 7] + s1;
    }
    a = h[0]; b = h[1]; c = h[2]; d = h[3]; e = h[4]; f = h[5]; g = h[6]; hh = h[7];
    for (int i = 0; i < 64; i++) {
        uint32_t t1 = hh + (ROR(e, 6) ^ ROR(e, 11) ^ ROR(e, 25)) + ((e & f) ^ (~e & g)) + K256[i] + w[i];
        uint32_t t2 = (ROR(a, 2) ^ ROR(a, 13) ^ ROR(a, 22)) + ((a & b) ^ (a & c) ^ (b & c));
        hh = g; g = f; f = e; e = d + t1; d = c; c = b; b = a; a = t1 + t2;
    }
    h[0] += a; h[1] += b; h[2] += c; h[3] += d; h[4] += e; h[5] += f; h[6] += g; h[7] += hh;
}

static void sha256_hex(const unsigned char *msg, size_t len, char out[64])
{
    uint32_t h[8] = {0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a,
                     0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19};
    unsigned char tail[128];
    size_t full = len / 64 * 64, rest = len - full;
    for (size_t i = 0; i < full; i += 64)
        sha256_block(h, msg + i);
    memset(tail, 0, sizeof tail);
    memcpy(tail, msg + full, rest);
    tail[rest] = 0x80;
    size_t tl = rest + 9 <= 64 ? 64 : 128;
    uint64_t bits = (uint64_t)len * 8;
    for (int i = 0; i < 8; i++)
        tail[tl - 1 - i] = (unsigned char)(bits >> (8 * i));
    for (size_t i = 0; i < tl; i += 64)
        sha256_block(h, tail + i);
    static const char hex[] = "0123456789abcdef";
    for (int i = 0; i < 8; i++)
        for (int j = 0; j < 4; j++) {
            unsigned char byte = (unsigned char)(h[i] >> (24 - 8 * j));
            out[8 * i + 2 * j] = hex[byte >> 4];
            out[8 * i + 2 * j + 1] = hex[byte & 15];
        }
}

/* ------------------------------------------------------------- histogram */
/* Log-linear: exact below 64 ns, then 32 sub-buckets per power of two
 * (relative error under 3.2%), up to 2^46 ns. */

#define H_SUB 32
#define H_LIN 64
#define H_BUCKETS (H_LIN + (46 - 6 + 1) * H_SUB)

static uint64_t hist[H_BUCKETS];

static int h_index(uint64_t v)
{
    if (v < H_LIN)
        return (int)v;
    int e = 63 - __builtin_clzll(v); /* >= 6 */
    if (e > 46)
        return H_BUCKETS - 1;
    int m = (int)((v >> (e - 5)) & (H_SUB - 1));
    return H_LIN + (e - 6) * H_SUB + m;
}

/* Midpoint of a bucket, in ns. */
static double h_value(int idx)
{
    if (idx < H_LIN)
        return idx;
    int e = (idx - H_LIN) / H_SUB + 6, m = (idx - H_LIN) % H_SUB;
    double lo = (double)((uint64_t)(H_SUB + m) << (e - 5));
    double width = (double)(1ULL << (e - 5));
    return lo + width / 2;
}

static double h_percentile(uint64_t total, double p)
{
    if (total == 0)
        return 0;
    uint64_t want = (uint64_t)(p * (double)total + 0.999999999);
    if (want < 1)
        want = 1;
    uint64_t cum = 0;
    for (int i = 0; i < H_BUCKETS; i++) {
        cum += hist[i];
        if (cum >= want)
            return h_value(i);
    }
    return h_value(H_BUCKETS - 1);
}

/* ----------------------------------------------------------------- state */

enum { C_CONNECTING, C_OPEN, C_DEAD };
enum { P_CONNECT, P_WARMUP, P_MEASURE, P_DRAIN };

typedef struct {
    unsigned char *wire;  /* request as sent, framing included */
    unsigned char *reply; /* reply expected, framing included */
    size_t reply_len;
} slot;

typedef struct {
    uint32_t slot;
    uint64_t t_send; /* ns, CLOCK_MONOTONIC */
} req;

typedef struct {
    int fd;
    int state;
    int want_out;  /* EPOLLOUT armed */
    uint32_t idx;
    req *fifo;     /* ring of `depth` outstanding requests, oldest at head */
    uint32_t head, count;
    size_t rpos;   /* bytes of the head request's reply matched so far */
    unsigned char *out;
    size_t out_off, out_len; /* unsent bytes: out[out_off, out_len) */
} conn;

static struct {
    const char *host;
    int port, conns, depth, size, cpu, server_pid, length_framing, expect_sha, idle;
    double duration, warmup, grace, connect_timeout;
    uint64_t seed;
} opt = {"127.0.0.1", 0, 50, 1, 64, -1, 0, 0, 0, 0, 5.0, 1.0, 3.0, 10.0, 0x9e3779b97f4a7c15ULL};

static slot *slots;
static uint32_t nslots;
static size_t wire_len;
static conn *cs;
static int ep;
static int phase;
static uint64_t rng_state;
static uint64_t outstanding;
static uint64_t completed, measured, lat_sum_ns, lat_max_ns;
static uint64_t sent_total;
static uint64_t mismatches, lost, closed_early, connect_errors, io_errors, unexpected;
static int reported_mismatch;

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

static uint64_t rng(void)
{
    uint64_t x = rng_state;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    rng_state = x;
    return x * 0x2545F4914F6CDD1DULL;
}

static double cpu_seconds_self(void)
{
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return (double)ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6 +
           (double)ru.ru_stime.tv_sec + ru.ru_stime.tv_usec / 1e6;
}

/* Reads /proc/PID/<name> into buf as a string.  Returns 0, or -1 if the
 * process is gone or the file unreadable. */
static int read_proc(int pid, const char *name, char *buf, size_t size)
{
    char path[64];
    snprintf(path, sizeof path, "/proc/%d/%s", pid, name);
    int fd = open(path, O_RDONLY);
    if (fd < 0)
        return -1;
    ssize_t n = read(fd, buf, size - 1);
    close(fd);
    if (n <= 0)
        return -1;
    buf[n] = 0;
    return 0;
}

/* utime + stime of a whole process (all its threads, dead ones included), in
 * seconds, from /proc/PID/stat; -1 if unreadable.  *ppid gets its parent. */
static double cpu_seconds_one(int pid, int *ppid)
{
    char buf[4096];
    if (read_proc(pid, "stat", buf, sizeof buf) < 0)
        return -1;
    char *p = strrchr(buf, ')'); /* comm may contain spaces */
    if (!p)
        return -1;
    unsigned long long ut = 0, st = 0;
    int pp = 0;
    /* After ')': state(3) ppid pgrp session tty tpgid flags minflt cminflt
     * majflt cmajflt utime(14) stime(15). */
    if (sscanf(p + 2, "%*c %d %*d %*d %*d %*d %*u %*u %*u %*u %*u %llu %llu", &pp, &ut, &st) != 3)
        return -1;
    if (ppid)
        *ppid = pp;
    return (double)(ut + st) / (double)sysconf(_SC_CLK_TCK);
}

/* Resident set size of one process in KiB, from /proc/PID/status; -1 if
 * unreadable.  *ppid gets its parent. */
static double rss_kib_one(int pid, int *ppid)
{
    char buf[4096];
    if (read_proc(pid, "status", buf, sizeof buf) < 0)
        return -1;
    const char *pp = strstr(buf, "\nPPid:"), *rss = strstr(buf, "\nVmRSS:");
    if (!pp || !rss)
        return -1;
    if (ppid)
        *ppid = atoi(pp + 7);
    return atof(rss + 8);
}

/* A figure of a process plus its children (a server with processes=N is a
 * supervisor and N forked servers). */
static double tree_sum(int pid, double (*one)(int, int *))
{
    double total = one(pid, NULL);
    if (total < 0)
        return -1;
    DIR *d = opendir("/proc");
    if (d == NULL)
        return total;
    struct dirent *e;
    while ((e = readdir(d)) != NULL) {
        char *end;
        long child = strtol(e->d_name, &end, 10);
        int ppid = 0;
        if (*end || child <= 0 || child == pid)
            continue;
        double c = one((int)child, &ppid);
        if (c >= 0 && ppid == pid)
            total += c;
    }
    closedir(d);
    return total;
}

static double cpu_seconds_pid(int pid)
{
    return tree_sum(pid, cpu_seconds_one);
}

/* Busy CPU seconds of the whole machine (all CPUs, idle and iowait
 * excluded) and the softirq part of it, from /proc/stat.  What neither the
 * server nor this process accounts for is other processes' work or softirq
 * time not charged to a task: the harness flags runs where it is large. */
static int machine_busy(double *busy, double *softirq)
{
    char buf[512];
    int fd = open("/proc/stat", O_RDONLY);
    if (fd < 0)
        return -1;
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n <= 0)
        return -1;
    buf[n] = 0;
    unsigned long long v[8] = {0};
    if (sscanf(buf, "cpu %llu %llu %llu %llu %llu %llu %llu %llu", &v[0], &v[1], &v[2], &v[3],
               &v[4], &v[5], &v[6], &v[7]) < 8)
        return -1;
    double tck = (double)sysconf(_SC_CLK_TCK);
    /* user nice system idle iowait irq softirq steal */
    *busy = (double)(v[0] + v[1] + v[2] + v[5] + v[6] + v[7]) / tck;
    *softirq = (double)v[6] / tck;
    return 0;
}

/* ----------------------------------------------------------- connections */

static void arm(conn *c, int out)
{
    struct epoll_event ev = {.events = EPOLLIN | (out ? EPOLLOUT : 0), .data.ptr = c};
    if (epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev) < 0) {
        perror("epoll_ctl");
        abort();
    }
    c->want_out = out;
}

static void conn_dead(conn *c, int early)
{
    if (c->state == C_DEAD)
        return;
    lost += c->count;
    outstanding -= c->count;
    c->count = 0;
    if (early)
        closed_early++;
    close(c->fd); /* also leaves the epoll set: the fd is not shared */
    c->state = C_DEAD;
}

static void enqueue(conn *c, uint64_t t)
{
    uint32_t s = nslots > 1 ? (uint32_t)(rng() % nslots) : 0;
    size_t cap = (size_t)opt.depth * wire_len;
    if (c->out_len + wire_len > cap) {
        memmove(c->out, c->out + c->out_off, c->out_len - c->out_off);
        c->out_len -= c->out_off;
        c->out_off = 0;
    }
    memcpy(c->out + c->out_len, slots[s].wire, wire_len);
    c->out_len += wire_len;
    req *r = &c->fifo[(c->head + c->count) % (uint32_t)opt.depth];
    r->slot = s;
    r->t_send = t;
    c->count++;
    outstanding++;
    sent_total++;
}

static void flush(conn *c)
{
    while (c->out_off < c->out_len) {
        ssize_t n = send(c->fd, c->out + c->out_off, c->out_len - c->out_off, MSG_NOSIGNAL);
        if (n > 0) {
            c->out_off += (size_t)n;
            continue;
        }
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
            break;
        io_errors++;
        conn_dead(c, 1);
        return;
    }
    if (c->out_off == c->out_len) {
        c->out_off = c->out_len = 0;
        if (c->want_out)
            arm(c, 0);
    } else if (!c->want_out) {
        arm(c, 1);
    }
}

static void report_mismatch(conn *c, const unsigned char *got, size_t glen, const slot *s)
{
    if (reported_mismatch++ >= 3)
        return;
    size_t show = glen < 48 ? glen : 48;
    size_t eshow = s->reply_len - c->rpos < 48 ? s->reply_len - c->rpos : 48;
    fprintf(stderr, "loadgen: mismatch on connection %u at reply byte %zu (outstanding %u)\n",
            c->idx, c->rpos, c->count);
    fprintf(stderr, "  expected: \"");
    for (size_t i = 0; i < eshow; i++) {
        unsigned char ch = s->reply[c->rpos + i];
        fprintf(stderr, ch >= 32 && ch < 127 ? "%c" : "\\x%02x", ch);
    }
    fprintf(stderr, "\"\n  got:      \"");
    for (size_t i = 0; i < show; i++) {
        unsigned char ch = got[i];
        fprintf(stderr, ch >= 32 && ch < 127 ? "%c" : "\\x%02x", ch);
    }
    fprintf(stderr, "\"\n");
}

/* Matches received bytes against the expected replies, FIFO. Returns 0, or
 * -1 if the connection was killed. */
static int consume(conn *c, const unsigned char *p, size_t n, uint64_t t)
{
    while (n > 0) {
        if (c->count == 0) {
            unexpected++;
            if (reported_mismatch++ < 3)
                fprintf(stderr, "loadgen: %zu unexpected bytes on connection %u\n", n, c->idx);
            conn_dead(c, 0);
            return -1;
        }
        req *r = &c->fifo[c->head];
        const slot *s = &slots[r->slot];
        size_t need = s->reply_len - c->rpos;
        size_t k = need < n ? need : n;
        if (memcmp(s->reply + c->rpos, p, k) != 0) {
            report_mismatch(c, p, k, s);
            mismatches++;
            conn_dead(c, 0);
            return -1;
        }
        c->rpos += k;
        p += k;
        n -= k;
        if (c->rpos < s->reply_len)
            break;
        /* One reply complete. */
        c->rpos = 0;
        uint64_t lat = t - r->t_send;
        c->head = (c->head + 1) % (uint32_t)opt.depth;
        c->count--;
        outstanding--;
        completed++;
        if (phase == P_MEASURE) {
            measured++;
            hist[h_index(lat)]++;
            lat_sum_ns += lat;
            if (lat > lat_max_ns)
                lat_max_ns = lat;
        }
        if (phase == P_WARMUP || phase == P_MEASURE)
            enqueue(c, t);
    }
    return 0;
}

static unsigned char rbuf[256 * 1024];

static void on_readable(conn *c)
{
    for (;;) {
        ssize_t n = read(c->fd, rbuf, sizeof rbuf);
        if (n > 0) {
            if (consume(c, rbuf, (size_t)n, now_ns()) < 0)
                return;
            if ((size_t)n < sizeof rbuf)
                break;
            continue;
        }
        if (n == 0) {
            if (c->count > 0 || phase != P_DRAIN)
                fprintf(stderr, "loadgen: connection %u closed by peer (%u outstanding)\n",
                        c->idx, c->count);
            conn_dead(c, 1);
            return;
        }
        if (errno == EINTR)
            continue;
        if (errno == EAGAIN || errno == EWOULDBLOCK)
            break;
        fprintf(stderr, "loadgen: connection %u: read: %s\n", c->idx, strerror(errno));
        io_errors++;
        conn_dead(c, 1);
        return;
    }
    flush(c);
}

/* ------------------------------------------------------------------ setup */

static void build_slots(void)
{
    size_t hdr = opt.length_framing ? 4 : 0;
    size_t payload = opt.length_framing ? (size_t)opt.size - 4 : (size_t)opt.size - 1;
    wire_len = (size_t)opt.size;
    /* Distinct random messages, enough that consecutive requests on a
     * connection practically never repeat, capped at ~16 MiB. */
    size_t per = wire_len + 80;
    nslots = (uint32_t)((16u << 20) / per);
    if (nslots > 1024)
        nslots = 1024;
    if (nslots < 16)
        nslots = 16;
    slots = calloc(nslots, sizeof *slots);
    if (!slots) {
        perror("calloc");
        exit(2);
    }
    for (uint32_t i = 0; i < nslots; i++) {
        slot *s = &slots[i];
        s->wire = malloc(wire_len);
        if (!s->wire) {
            perror("malloc");
            exit(2);
        }
        unsigned char *pl = s->wire + hdr;
        for (size_t j = 0; j < payload; j++)
            pl[j] = (unsigned char)(33 + rng() % 94); /* printable, never '\n' */
        if (opt.length_framing) {
            uint32_t be = htonl((uint32_t)payload);
            memcpy(s->wire, &be, 4);
        } else {
            s->wire[wire_len - 1] = '\n';
        }
        if (!opt.expect_sha) {
            s->reply = s->wire;
            s->reply_len = wire_len;
        } else {
            s->reply_len = hdr + 64 + (opt.length_framing ? 0 : 1);
            s->reply = malloc(s->reply_len);
            if (!s->reply) {
                perror("malloc");
                exit(2);
            }
            sha256_hex(pl, payload, (char *)s->reply + hdr);
            if (opt.length_framing) {
                uint32_t be = htonl(64);
                memcpy(s->reply, &be, 4);
            } else {
                s->reply[64] = '\n';
            }
        }
    }
}

static void usage(FILE *f)
{
    fprintf(f,
            "usage: loadgen --port P [options]\n"
            "  --host H            server address (default 127.0.0.1)\n"
            "  --port P            server port (required)\n"
            "  --conns N           connections (default 50)\n"
            "  --depth D           requests outstanding per connection (default 1)\n"
            "  --size S            bytes per request on the wire, framing included (default 64)\n"
            "  --framing line|length  line: S-1 printable bytes + \\n; length: 4-byte BE header + S-4 bytes\n"
            "  --expect echo|sha256   reply expected: the request, or hex sha256 of its payload (framed)\n"
            "  --duration SEC      measured window (default 5)\n"
            "  --warmup SEC        load before the window, not counted (default 1)\n"
            "  --grace SEC         drain time for outstanding replies after the window (default 3)\n"
            "  --connect-timeout SEC  (default 10)\n"
            "  --cpu N             pin this process to CPU N\n"
            "  --server-pid PID    also report that process's CPU time over the window (/proc)\n"
            "  --idle N            first open N more connections, each sending one message and\n"
            "                      checking its reply, then left idle during the run; with\n"
            "                      --server-pid, the server's RSS before and after is reported\n"
            "  --seed N            random seed\n");
}

static double parse_double(const char *s, const char *name)
{
    char *end;
    double v = strtod(s, &end);
    if (*s == 0 || *end != 0 || v < 0) {
        fprintf(stderr, "loadgen: bad %s: %s\n", name, s);
        exit(2);
    }
    return v;
}

static int parse_int(const char *s, const char *name, long lo, long hi)
{
    char *end;
    long v = strtol(s, &end, 10);
    if (*s == 0 || *end != 0 || v < lo || v > hi) {
        fprintf(stderr, "loadgen: bad %s: %s (allowed %ld..%ld)\n", name, s, lo, hi);
        exit(2);
    }
    return (int)v;
}

static void parse_args(int argc, char **argv)
{
    static const struct option lo[] = {
        {"host", 1, 0, 'h'}, {"port", 1, 0, 'p'}, {"conns", 1, 0, 'c'}, {"depth", 1, 0, 'd'},
        {"size", 1, 0, 's'}, {"framing", 1, 0, 'f'}, {"expect", 1, 0, 'e'},
        {"duration", 1, 0, 'D'}, {"warmup", 1, 0, 'W'}, {"grace", 1, 0, 'G'},
        {"connect-timeout", 1, 0, 'T'}, {"cpu", 1, 0, 'C'}, {"server-pid", 1, 0, 'P'}, {"idle", 1, 0, 'I'},
        {"seed", 1, 0, 'S'}, {"help", 0, 0, 'H'}, {0, 0, 0, 0}};
    int ch;
    while ((ch = getopt_long(argc, argv, "", lo, NULL)) != -1) {
        switch (ch) {
        case 'h': opt.host = optarg; break;
        case 'p': opt.port = parse_int(optarg, "port", 1, 65535); break;
        case 'c': opt.conns = parse_int(optarg, "conns", 1, 100000); break;
        case 'd': opt.depth = parse_int(optarg, "depth", 1, 100000); break;
        case 's': opt.size = parse_int(optarg, "size", 2, 64 << 20); break;
        case 'f':
            if (strcmp(optarg, "line") == 0) opt.length_framing = 0;
            else if (strcmp(optarg, "length") == 0) opt.length_framing = 1;
            else { usage(stderr); exit(2); }
            break;
        case 'e':
            if (strcmp(optarg, "echo") == 0) opt.expect_sha = 0;
            else if (strcmp(optarg, "sha256") == 0) opt.expect_sha = 1;
            else { usage(stderr); exit(2); }
            break;
        case 'D': opt.duration = parse_double(optarg, "duration"); break;
        case 'W': opt.warmup = parse_double(optarg, "warmup"); break;
        case 'G': opt.grace = parse_double(optarg, "grace"); break;
        case 'T': opt.connect_timeout = parse_double(optarg, "connect-timeout"); break;
        case 'C': opt.cpu = parse_int(optarg, "cpu", 0, 4095); break;
        case 'P': opt.server_pid = parse_int(optarg, "server-pid", 1, 1 << 30); break;
        case 'I': opt.idle = parse_int(optarg, "idle", 0, 1000000); break;
        case 'S': opt.seed = strtoull(optarg, NULL, 0) | 1; break;
        case 'H': usage(stdout); exit(0);
        default: usage(stderr); exit(2);
        }
    }
    if (opt.port == 0 || optind != argc || opt.duration <= 0) {
        usage(stderr);
        exit(2);
    }
    if (opt.length_framing && opt.size < 4) {
        fprintf(stderr, "loadgen: --size must be at least 4 with length framing\n");
        exit(2);
    }
}

static void raise_nofile(void)
{
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
}

static int connect_all(const struct sockaddr_in *sa)
{
    int pending = 0;
    for (int i = 0; i < opt.conns; i++) {
        conn *c = &cs[i];
        c->idx = (uint32_t)i;
        c->fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
        if (c->fd < 0) {
            fprintf(stderr, "loadgen: socket: %s\n", strerror(errno));
            c->state = C_DEAD;
            connect_errors++;
            continue;
        }
        int one = 1;
        setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        c->fifo = calloc((size_t)opt.depth, sizeof *c->fifo);
        c->out = malloc((size_t)opt.depth * wire_len);
        if (!c->fifo || !c->out) {
            perror("malloc");
            exit(2);
        }
        int rc = connect(c->fd, (const struct sockaddr *)sa, sizeof *sa);
        if (rc < 0 && errno != EINPROGRESS) {
            fprintf(stderr, "loadgen: connect: %s\n", strerror(errno));
            close(c->fd);
            c->state = C_DEAD;
            connect_errors++;
            continue;
        }
        c->state = rc == 0 ? C_OPEN : C_CONNECTING;
        struct epoll_event ev = {.events = rc == 0 ? EPOLLIN : EPOLLOUT, .data.ptr = c};
        if (epoll_ctl(ep, EPOLL_CTL_ADD, c->fd, &ev) < 0) {
            perror("epoll_ctl");
            exit(2);
        }
        if (rc < 0)
            pending++;
    }
    uint64_t deadline = now_ns() + (uint64_t)(opt.connect_timeout * 1e9);
    struct epoll_event evs[1024];
    while (pending > 0) {
        uint64_t t = now_ns();
        if (t >= deadline)
            break;
        int n = epoll_wait(ep, evs, 1024, (int)((deadline - t) / 1000000 + 1));
        if (n < 0 && errno == EINTR)
            continue;
        for (int i = 0; i < n; i++) {
            conn *c = evs[i].data.ptr;
            if (c->state != C_CONNECTING)
                continue;
            int err = 0;
            socklen_t el = sizeof err;
            getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &el);
            pending--;
            if (err) {
                fprintf(stderr, "loadgen: connect: %s\n", strerror(err));
                close(c->fd);
                c->state = C_DEAD;
                connect_errors++;
            } else {
                c->state = C_OPEN;
                arm(c, 0);
            }
        }
    }
    int open_conns = 0;
    for (int i = 0; i < opt.conns; i++) {
        if (cs[i].state == C_CONNECTING) {
            close(cs[i].fd);
            cs[i].state = C_DEAD;
            connect_errors++;
        }
        open_conns += cs[i].state == C_OPEN;
    }
    if (pending > 0)
        fprintf(stderr, "loadgen: %d connections timed out\n", pending);
    return open_conns;
}

/* Opens opt.idle connections in batches (the server's backlog is finite),
 * each sending one framed message and checking the echo, and leaves them
 * open, outside the epoll set of the run: they cost this process nothing
 * while the active connections are measured.  Returns how many were
 * answered; the rest count as connect or io errors. */
static int open_idle(const struct sockaddr_in *sa, double *setup_s)
{
    uint64_t t0 = now_ns();
    int iep = epoll_create1(EPOLL_CLOEXEC);
    if (iep < 0) {
        perror("epoll_create1");
        exit(2);
    }
    unsigned char msg[16];
    size_t mlen;
    if (opt.length_framing) {
        memcpy(msg, "\0\0\0\4idle", 8);
        mlen = 8;
    } else {
        memcpy(msg, "idle\n", 5);
        mlen = 5;
    }
    enum { BATCH = 256 };
    typedef struct { int fd, state; size_t got; } idle_conn; /* 0 connecting, 1 waiting reply, 2 done */
    idle_conn b[BATCH];
    int answered = 0;
    for (int base = 0; base < opt.idle; base += BATCH) {
        int n = opt.idle - base < BATCH ? opt.idle - base : BATCH, left = 0;
        for (int i = 0; i < n; i++) {
            b[i].got = 0;
            b[i].state = 2;
            b[i].fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
            if (b[i].fd < 0) {
                fprintf(stderr, "loadgen: idle socket: %s\n", strerror(errno));
                connect_errors++;
                continue;
            }
            if (connect(b[i].fd, (const struct sockaddr *)sa, sizeof *sa) < 0 &&
                errno != EINPROGRESS) {
                fprintf(stderr, "loadgen: idle connect: %s\n", strerror(errno));
                close(b[i].fd);
                b[i].fd = -1;
                connect_errors++;
                continue;
            }
            struct epoll_event ev = {.events = EPOLLOUT | EPOLLIN, .data.u32 = (uint32_t)i};
            if (epoll_ctl(iep, EPOLL_CTL_ADD, b[i].fd, &ev) < 0) {
                perror("epoll_ctl");
                exit(2);
            }
            b[i].state = 0;
            left++;
        }
        uint64_t deadline = now_ns() + (uint64_t)(opt.connect_timeout * 1e9);
        while (left > 0 && now_ns() < deadline) {
            struct epoll_event evs[BATCH];
            int k = epoll_wait(iep, evs, BATCH, 100);
            if (k < 0 && errno != EINTR) {
                perror("epoll_wait");
                exit(2);
            }
            for (int j = 0; j < k; j++) {
                idle_conn *c = &b[evs[j].data.u32];
                if (c->state == 0 && (evs[j].events & (EPOLLOUT | EPOLLERR | EPOLLHUP))) {
                    int err = 0;
                    socklen_t el = sizeof err;
                    getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &el);
                    /* A fresh socket takes a few bytes whole. */
                    if (err || send(c->fd, msg, mlen, MSG_NOSIGNAL) != (ssize_t)mlen) {
                        connect_errors++;
                        c->state = 2;
                        left--;
                        continue;
                    }
                    c->state = 1;
                    struct epoll_event ev = {.events = EPOLLIN, .data.u32 = evs[j].data.u32};
                    epoll_ctl(iep, EPOLL_CTL_MOD, c->fd, &ev);
                } else if (c->state == 1 && (evs[j].events & (EPOLLIN | EPOLLERR | EPOLLHUP))) {
                    unsigned char got[16];
                    ssize_t r = recv(c->fd, got, mlen - c->got, 0);
                    if (r < 0 && (errno == EAGAIN || errno == EINTR))
                        continue;
                    if (r <= 0 || memcmp(got, msg + c->got, (size_t)r) != 0) {
                        r <= 0 ? io_errors++ : mismatches++;
                        c->state = 2;
                        left--;
                        continue;
                    }
                    c->got += (size_t)r;
                    if (c->got == mlen) {
                        c->state = 2;
                        answered++;
                        left--;
                    }
                }
            }
        }
        for (int i = 0; i < n; i++) {
            if (b[i].fd < 0)
                continue;
            epoll_ctl(iep, EPOLL_CTL_DEL, b[i].fd, NULL);
            if (b[i].state != 2) {
                lost++;
                fprintf(stderr, "loadgen: idle connection %d got no reply\n", base + i);
            }
        }
    }
    close(iep);
    *setup_s = (double)(now_ns() - t0) / 1e9;
    return answered;
}

int main(int argc, char **argv)
{
    parse_args(argc, argv);
    signal(SIGPIPE, SIG_IGN);
    raise_nofile();
    if (opt.cpu >= 0) {
        cpu_set_t set;
        CPU_ZERO(&set);
        CPU_SET(opt.cpu, &set);
        if (sched_setaffinity(0, sizeof set, &set) < 0) {
            fprintf(stderr, "loadgen: sched_setaffinity(%d): %s\n", opt.cpu, strerror(errno));
            return 2;
        }
    }
    rng_state = opt.seed;
    build_slots();

    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)opt.port)};
    if (inet_pton(AF_INET, opt.host, &sa.sin_addr) != 1) {
        fprintf(stderr, "loadgen: bad IPv4 address %s\n", opt.host);
        return 2;
    }
    ep = epoll_create1(EPOLL_CLOEXEC);
    cs = calloc((size_t)opt.conns, sizeof *cs);
    if (ep < 0 || !cs) {
        perror("setup");
        return 2;
    }
    double rss_before = -1, rss_idle = -1, idle_setup_s = 0;
    int idle_answered = 0;
    if (opt.idle > 0) {
        if (opt.server_pid)
            rss_before = tree_sum(opt.server_pid, rss_kib_one);
        idle_answered = open_idle(&sa, &idle_setup_s);
        if (opt.server_pid) {
            struct timespec ts = {0, 200 * 1000000L}; /* let the server settle */
            nanosleep(&ts, NULL);
            rss_idle = tree_sum(opt.server_pid, rss_kib_one);
        }
    }
    phase = P_CONNECT;
    int open_conns = connect_all(&sa);

    uint64_t t_start = now_ns(), t0 = 0, t1 = 0, t_drain_end = 0;
    double cpu0 = 0, cpu1 = 0, srv0 = -1, srv1 = -1, mb0 = 0, mb1 = 0, ms0 = 0, ms1 = 0;
    int mb_ok = 0;
    phase = P_WARMUP;
    if (opt.warmup <= 0) {
        phase = P_MEASURE;
        t0 = t_start;
        mb_ok = machine_busy(&mb0, &ms0) == 0;
        cpu0 = cpu_seconds_self();
        if (opt.server_pid)
            srv0 = cpu_seconds_pid(opt.server_pid);
    }
    for (int i = 0; i < opt.conns; i++) {
        conn *c = &cs[i];
        if (c->state != C_OPEN)
            continue;
        for (int k = 0; k < opt.depth; k++)
            enqueue(c, t_start);
        flush(c);
    }

    struct epoll_event evs[1024];
    uint64_t warm_ns = (uint64_t)(opt.warmup * 1e9), dur_ns = (uint64_t)(opt.duration * 1e9);
    for (;;) {
        uint64_t t = now_ns(), deadline;
        if (phase == P_WARMUP && t >= t_start + warm_ns) {
            phase = P_MEASURE;
            t0 = t;
            mb_ok = machine_busy(&mb0, &ms0) == 0;
            cpu0 = cpu_seconds_self();
            if (opt.server_pid)
                srv0 = cpu_seconds_pid(opt.server_pid);
        }
        if (phase == P_MEASURE && t >= t0 + dur_ns) {
            phase = P_DRAIN;
            t1 = t;
            cpu1 = cpu_seconds_self();
            if (opt.server_pid)
                srv1 = cpu_seconds_pid(opt.server_pid);
            mb_ok = mb_ok && machine_busy(&mb1, &ms1) == 0;
            t_drain_end = t + (uint64_t)(opt.grace * 1e9);
        }
        if (phase == P_DRAIN && (outstanding == 0 || t >= t_drain_end))
            break;
        deadline = phase == P_WARMUP ? t_start + warm_ns : phase == P_MEASURE ? t0 + dur_ns : t_drain_end;
        int timeout = (int)((deadline - t) / 1000000 + 1);
        int n = epoll_wait(ep, evs, 1024, timeout);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            perror("epoll_wait");
            return 2;
        }
        for (int i = 0; i < n; i++) {
            conn *c = evs[i].data.ptr;
            if (c->state != C_OPEN)
                continue;
            if (evs[i].events & (EPOLLIN | EPOLLERR | EPOLLHUP))
                on_readable(c);
            if (c->state == C_OPEN && (evs[i].events & EPOLLOUT))
                flush(c);
        }
    }
    /* Whatever is still outstanding after the grace period is lost. */
    lost += outstanding;
    uint64_t open_at_end = 0;
    for (int i = 0; i < opt.conns; i++)
        if (cs[i].state == C_OPEN) {
            open_at_end++;
            close(cs[i].fd);
        }

    double secs = (double)(t1 - t0) / 1e9;
    double client_cpu = cpu1 - cpu0;
    double srv_cpu = (srv0 >= 0 && srv1 >= 0) ? srv1 - srv0 : -1;
    uint64_t errors = mismatches + lost + closed_early + connect_errors + unexpected + io_errors;
    double per = measured ? 1e6 / (double)measured : 0;
    printf("{\"requests\": %llu, \"duration_s\": %.6f, \"rps\": %.1f, "
           "\"p50_us\": %.2f, \"p90_us\": %.2f, \"p99_us\": %.2f, \"p999_us\": %.2f, "
           "\"max_us\": %.2f, \"mean_us\": %.2f, "
           "\"errors\": %llu, \"mismatches\": %llu, \"lost\": %llu, \"closed_early\": %llu, "
           "\"connect_errors\": %llu, \"unexpected\": %llu, \"io_errors\": %llu, "
           "\"conns\": %d, \"conns_open\": %d, \"conns_open_at_end\": %llu, \"depth\": %d, "
           "\"size\": %d, \"framing\": \"%s\", \"expect\": \"%s\", "
           "\"sent\": %llu, \"completed\": %llu, "
           "\"client_cpu_s\": %.4f, \"client_cpu_us_per_req\": %.4f",
           (unsigned long long)measured, secs, secs > 0 ? (double)measured / secs : 0,
           h_percentile(measured, 0.50) / 1e3, h_percentile(measured, 0.90) / 1e3,
           h_percentile(measured, 0.99) / 1e3, h_percentile(measured, 0.999) / 1e3,
           (double)lat_max_ns / 1e3, measured ? (double)lat_sum_ns / (double)measured / 1e3 : 0,
           (unsigned long long)errors, (unsigned long long)mismatches, (unsigned long long)lost,
           (unsigned long long)closed_early, (unsigned long long)connect_errors,
           (unsigned long long)unexpected, (unsigned long long)io_errors, opt.conns, open_conns,
           (unsigned long long)open_at_end, opt.depth, opt.size,
           opt.length_framing ? "length" : "line", opt.expect_sha ? "sha256" : "echo",
           (unsigned long long)sent_total, (unsigned long long)completed, client_cpu,
           client_cpu * per);
    if (opt.server_pid)
        printf(", \"server_pid\": %d, \"server_cpu_s\": %.4f, \"server_cpu_us_per_req\": %.4f",
               opt.server_pid, srv_cpu, srv_cpu >= 0 ? srv_cpu * per : -1.0);
    if (mb_ok)
        printf(", \"machine_busy_s\": %.3f, \"machine_softirq_s\": %.3f", mb1 - mb0, ms1 - ms0);
    if (opt.idle > 0) {
        printf(", \"idle\": %d, \"idle_answered\": %d, \"idle_setup_s\": %.3f", opt.idle,
               idle_answered, idle_setup_s);
        if (rss_before >= 0 && rss_idle >= 0)
            printf(", \"server_rss_kib_before_idle\": %.0f, \"server_rss_kib_with_idle\": %.0f, "
                   "\"server_rss_bytes_per_idle_conn\": %.0f", rss_before, rss_idle,
                   (rss_idle - rss_before) * 1024.0 / opt.idle);
    }
    printf("}\n");
    return errors ? 1 : 0;
}
