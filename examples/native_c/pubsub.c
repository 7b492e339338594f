/*
 * pubsub.c - a native publish/subscribe handler, in the shape of Redis's
 * SUBSCRIBE and PUBLISH (ABI version 2: pushes from a handler).
 *
 *   SUB <topic>            -> "subscribed <topic>"
 *   UNSUB <topic>          -> "unsubscribed <topic>"
 *   PUB <topic> <message>  -> "<n>" (subscribers reached), and every
 *                             subscriber gets "message <topic> <message>"
 *   TICK <n>               -> "ok"; a thread of this library then broadcasts
 *                             "tick <k>" to every connection, k = 0..n-1
 *
 * The server frames each push once and shares that frame among all its
 * recipients; nothing here copies a message per subscriber or locks anything.
 * The TICK thread shows pushing from a thread that is not a handler.  The
 * services it uses live as long as the server (pp_services in pollpool.h),
 * so the thread must end before the server is stopped: it tells the client
 * that asked with "ticked" when it is done.
 *
 * Build:
 *   cc -O2 -shared -fPIC -pthread -I"$(python -c 'import pollpool; print(pollpool.get_include())')" \
 *      -o libpubsub.so pubsub.c
 * Serve:
 *   python -m pollpool --handler ./libpubsub.so:pubsub
 */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <pollpool.h>

POLLPOOL_EXPORT_ABI_VERSION;

static int starts(const unsigned char *msg, size_t len, const char *word)
{
    size_t n = strlen(word);
    return len > n && memcmp(msg, word, n) == 0 && msg[n] == ' ';
}

static int reply_str(pp_reply *reply, const char *a, const unsigned char *b, size_t blen)
{
    if (pp_reply_write(reply, a, strlen(a)) < 0 || pp_reply_write(reply, b, blen) < 0)
        return -1;
    return PP_KEEP;
}

struct ticker {
    const pp_services *svc;
    long count;
    uint64_t asker;
};

static void *tick_main(void *arg)
{
    struct ticker *t = arg;
    char buf[32];
    for (long k = 0; k < t->count; k++) {
        int n = snprintf(buf, sizeof buf, "tick %ld", k);
        pp_broadcast(t->svc, buf, (size_t)n);
    }
    /* Tells the asker it is over, so a client can wait for all ticks. */
    pp_push(t->svc, t->asker, "ticked", 6);
    free(t);
    return NULL;
}

POLLPOOL_EXPORT int pubsub(void *ctx, const unsigned char *msg, size_t len, pp_reply *reply)
{
    (void)ctx;
    const pp_services *svc = pp_reply_services(reply);
    uint64_t id = pp_reply_conn_id(reply);
    if (starts(msg, len, "SUB")) {
        if (pp_subscribe(svc, id, msg + 4, len - 4) < 0)
            return -1;
        return reply_str(reply, "subscribed ", msg + 4, len - 4);
    }
    if (starts(msg, len, "UNSUB")) {
        if (pp_unsubscribe(svc, id, msg + 6, len - 6) < 0)
            return -1;
        return reply_str(reply, "unsubscribed ", msg + 6, len - 6);
    }
    if (starts(msg, len, "PUB")) {
        const unsigned char *topic = msg + 4;
        const unsigned char *sp = memchr(topic, ' ', len - 4);
        if (sp == NULL)
            return reply_str(reply, "error: PUB <topic> <message>", msg, 0);
        size_t tlen = (size_t)(sp - topic);
        /* "message <topic> <message>": built once, pushed to all. */
        size_t body = len - 4 - tlen - 1;
        size_t n = 8 + tlen + 1 + body;
        char *out = malloc(n);
        if (out == NULL)
            return -1;
        memcpy(out, "message ", 8);
        memcpy(out + 8, topic, tlen);
        out[8 + tlen] = ' ';
        memcpy(out + 9 + tlen, sp + 1, body);
        long got = pp_publish(svc, topic, tlen, out, n);
        free(out);
        if (got < 0)
            return -1;
        char count[32];
        int k = snprintf(count, sizeof count, "%ld", got);
        return pp_reply_write(reply, count, (size_t)k) < 0 ? -1 : PP_KEEP;
    }
    if (starts(msg, len, "TICK")) {
        struct ticker *t = malloc(sizeof *t);
        if (t == NULL)
            return -1;
        t->svc = svc;
        t->count = strtol((const char *)msg + 5, NULL, 10);
        t->asker = id;
        pthread_t th;
        if (pthread_create(&th, NULL, tick_main, t) != 0) {
            free(t);
            return -1;
        }
        pthread_detach(th);
        return pp_reply_write(reply, "ok", 2) < 0 ? -1 : PP_KEEP;
    }
    return reply_str(reply, "error: unknown command ", msg, len);
}
