/*
 * counter.c - a native pollpool handler with per-connection state.
 *
 * Each reply is "<n> <MESSAGE IN UPPER CASE>", where n counts the messages
 * of that connection.  "quit" says "bye" and closes (PP_CLOSE); "fail" is an
 * error (the connection is closed, the server's handler_errors counts it);
 * "big N" replies N bytes of 'x'.  A greeting "hello <id>" goes out when a
 * connection opens.
 *
 * Thread-safety: handlers run concurrently on several worker threads, but
 * never two calls for the same connection at once, and open/close bracket
 * every call for a connection.  So the per-connection slot needs no lock once
 * found; the table that maps connection ids to slots does, and gets one.
 *
 * Build:
 *   cc -O2 -shared -fPIC -I"$(python -c 'import pollpool; print(pollpool.get_include())')" \
 *      -o libcounter.so counter.c
 * Serve:
 *   python -m pollpool --handler ./libcounter.so:counter
 */
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <pollpool.h>

POLLPOOL_EXPORT_ABI_VERSION;

struct slot {
    uint64_t conn_id;        /* 0: free */
    uint64_t count;          /* messages seen: touched only by this conn's calls */
    struct slot *next;
};

#define BUCKETS 1024
static struct slot *table[BUCKETS];
static pthread_mutex_t table_lock = PTHREAD_MUTEX_INITIALIZER;
static atomic_ulong opened, closed;

static struct slot *find(uint64_t id)
{
    pthread_mutex_lock(&table_lock);
    struct slot *s = table[id % BUCKETS];
    while (s && s->conn_id != id)
        s = s->next;
    pthread_mutex_unlock(&table_lock);
    return s;
}

POLLPOOL_EXPORT int counter_open(void *ctx, pp_reply *reply)
{
    (void)ctx;
    struct slot *s = calloc(1, sizeof *s);
    if (s == NULL)
        return -1;
    s->conn_id = pp_reply_conn_id(reply);
    pthread_mutex_lock(&table_lock);
    s->next = table[s->conn_id % BUCKETS];
    table[s->conn_id % BUCKETS] = s;
    pthread_mutex_unlock(&table_lock);
    atomic_fetch_add(&opened, 1);
    char hello[64];
    int n = snprintf(hello, sizeof hello, "hello %llu", (unsigned long long)s->conn_id);
    return pp_reply_write(reply, hello, (size_t)n) < 0 ? -1 : PP_KEEP;
}

POLLPOOL_EXPORT void counter_close(void *ctx, uint64_t conn_id)
{
    (void)ctx;
    pthread_mutex_lock(&table_lock);
    struct slot **pp = &table[conn_id % BUCKETS];
    while (*pp && (*pp)->conn_id != conn_id)
        pp = &(*pp)->next;
    struct slot *s = *pp;
    if (s)
        *pp = s->next;
    pthread_mutex_unlock(&table_lock);
    free(s);
    atomic_fetch_add(&closed, 1);
}

POLLPOOL_EXPORT int counter(void *ctx, const unsigned char *msg, size_t len, pp_reply *reply)
{
    (void)ctx;
    struct slot *s = find(pp_reply_conn_id(reply));
    if (s == NULL)
        return -1; /* cannot happen: open comes first */
    if (len == 4 && memcmp(msg, "fail", 4) == 0)
        return -1;
    if (len == 4 && memcmp(msg, "quit", 4) == 0)
        return pp_reply_write(reply, "bye", 3) < 0 ? -1 : PP_CLOSE;
    if (len > 4 && memcmp(msg, "big ", 4) == 0) {
        size_t n = strtoull((const char *)msg + 4, NULL, 10);
        char chunk[4096];
        memset(chunk, 'x', sizeof chunk);
        if (pp_reply_write(reply, chunk, 0) < 0) /* "big 0": an empty reply */
            return -1;
        while (n > 0) {
            size_t k = n < sizeof chunk ? n : sizeof chunk;
            if (pp_reply_write(reply, chunk, k) < 0)
                return -1;
            n -= k;
        }
        return PP_KEEP;
    }
    char head[32];
    int hn = snprintf(head, sizeof head, "%llu ", (unsigned long long)++s->count);
    if (pp_reply_write(reply, head, (size_t)hn) < 0)
        return -1;
    char up[256];
    for (size_t off = 0; off < len; off += sizeof up) {
        size_t k = len - off < sizeof up ? len - off : sizeof up;
        for (size_t i = 0; i < k; i++) {
            unsigned char c = msg[off + i];
            up[i] = (char)(c >= 'a' && c <= 'z' ? c - 32 : c);
        }
        if (pp_reply_write(reply, up, k) < 0)
            return -1;
    }
    return PP_KEEP;
}

/* For tests and monitoring: connections opened and closed so far. */
POLLPOOL_EXPORT unsigned long counter_opened(void) { return atomic_load(&opened); }
POLLPOOL_EXPORT unsigned long counter_closed(void) { return atomic_load(&closed); }
