/*
 * push.c - writes from any thread: pushes to one connection, broadcasts,
 * topics, and closes, handed to the owner of each connection's output.
 *
 * Producers (any thread: handlers, the application's own threads, native
 * code) take srv->push_mu once per call, whatever the number of recipients,
 * and queue a reference to one shared frame in each recipient's outbox.  The
 * consumer of an outbox is the owner of that connection's output: the worker
 * holding its task (at the end of the task, after the task's replies), else
 * the I/O thread, which takes the list of connections with new pushes once
 * per loop round.  A producer writes the wake fd only when it made that list
 * non-empty while the I/O thread may be asleep: a burst of pushes, from any
 * number of threads, costs at most one wake-up syscall per loop round.
 *
 * Guarded by push_mu: the registry (srv->by_id, srv->registry), the topics,
 * and of each connection its outbox, push_flags, push_link and topics.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "core.h"

/* A topic: its name and the connections subscribed to it. */
struct pp_topic {
    pp_conn **members;
    size_t n, cap;
    size_t len;
    unsigned char name[];
};

/* ---- the registry: connections by id ------------------------------------ */

/* Ids are sequential: the multiplier makes the low bits of a run of ids a
 * permutation, so a window of ids never collides. */
static size_t id_slot(uint64_t id, size_t cap)
{
    return (size_t)(id * UINT64_C(0x9E3779B97F4A7C15)) & (cap - 1);
}

static pp_conn *do_find(const pp_server *srv, uint64_t id)
{
    if (srv->by_id_cap == 0)
        return NULL;
    for (size_t i = id_slot(id, srv->by_id_cap);; i = (i + 1) & (srv->by_id_cap - 1)) {
        pp_conn *c = srv->by_id[i];
        if (c == NULL)
            return NULL;
        if (c->id == id)
            return c;
    }
}

static void do_insert(pp_conn **table, size_t cap, pp_conn *c)
{
    size_t i = id_slot(c->id, cap);
    while (table[i] != NULL)
        i = (i + 1) & (cap - 1);
    table[i] = c;
}

static int do_grow_ids(pp_server *srv)
{
    size_t cap = srv->by_id_cap ? srv->by_id_cap * 2 : 64;
    if (cap > SIZE_MAX / sizeof(pp_conn *))
        return -ENOMEM;
    pp_conn **t = calloc(cap, sizeof *t);
    if (t == NULL)
        return -ENOMEM;
    for (size_t i = 0; i < srv->by_id_cap; i++)
        if (srv->by_id[i] != NULL)
            do_insert(t, cap, srv->by_id[i]);
    free(srv->by_id);
    srv->by_id = t;
    srv->by_id_cap = cap;
    return 0;
}

/* Linear probing with backward shift, so that no tombstone ever slows a
 * lookup down. */
static void do_remove_id(pp_server *srv, pp_conn *c)
{
    size_t cap = srv->by_id_cap, mask = cap - 1;
    size_t i = id_slot(c->id, cap);
    while (srv->by_id[i] != c) {
        if (srv->by_id[i] == NULL)
            abort(); /* a registered connection is in the table */
        i = (i + 1) & mask;
    }
    srv->by_id[i] = NULL;
    srv->by_id_n--;
    for (size_t j = (i + 1) & mask; srv->by_id[j] != NULL; j = (j + 1) & mask) {
        size_t home = id_slot(srv->by_id[j]->id, cap);
        /* Move j back to the hole i unless its home lies in (i, j]. */
        int stays = i <= j ? (home > i && home <= j) : (home > i || home <= j);
        if (!stays) {
            srv->by_id[i] = srv->by_id[j];
            srv->by_id[j] = NULL;
            i = j;
        }
    }
}

int pp__push_register(pp_server *srv, pp_conn *c)
{
    int rc = 0;
    pthread_mutex_lock(&srv->push_mu);
    if ((srv->by_id_n + 1) * 2 > srv->by_id_cap)
        rc = do_grow_ids(srv);
    if (rc == 0) {
        do_insert(srv->by_id, srv->by_id_cap, c);
        srv->by_id_n++;
        pp__list_append(&srv->registry, &c->reg_link);
        c->push_flags = PP_P_REG;
    }
    pthread_mutex_unlock(&srv->push_mu);
    return rc;
}

/* ---- topics ------------------------------------------------------------- */

static size_t topic_hash(const unsigned char *p, size_t n)
{
    uint64_t h = UINT64_C(1469598103934665603); /* FNV-1a */
    for (size_t i = 0; i < n; i++)
        h = (h ^ p[i]) * UINT64_C(1099511628211);
    return (size_t)(h ^ (h >> 29));
}

/* The slot of topic name[0..n), or of the empty slot where it would go. */
static size_t topic_slot(const pp_server *srv, const unsigned char *name, size_t n)
{
    size_t mask = srv->topics_cap - 1;
    for (size_t i = topic_hash(name, n) & mask;; i = (i + 1) & mask) {
        pp_topic *t = srv->topics[i];
        if (t == NULL || (t->len == n && memcmp(t->name, name, n) == 0))
            return i;
    }
}

static pp_topic *do_find_topic(const pp_server *srv, const unsigned char *name, size_t n)
{
    if (srv->topics_cap == 0)
        return NULL;
    return srv->topics[topic_slot(srv, name, n)];
}

static int do_grow_topics(pp_server *srv)
{
    size_t cap = srv->topics_cap ? srv->topics_cap * 2 : 16;
    if (cap > SIZE_MAX / sizeof(pp_topic *))
        return -ENOMEM;
    pp_topic **old = srv->topics;
    size_t old_cap = srv->topics_cap;
    pp_topic **t = calloc(cap, sizeof *t);
    if (t == NULL)
        return -ENOMEM;
    srv->topics = t;
    srv->topics_cap = cap;
    for (size_t i = 0; i < old_cap; i++)
        if (old[i] != NULL)
            t[topic_slot(srv, old[i]->name, old[i]->len)] = old[i];
    free(old);
    return 0;
}

static void do_remove_topic(pp_server *srv, pp_topic *t)
{
    size_t mask = srv->topics_cap - 1;
    size_t i = topic_slot(srv, t->name, t->len);
    srv->topics[i] = NULL;
    srv->topics_n--;
    for (size_t j = (i + 1) & mask; srv->topics[j] != NULL; j = (j + 1) & mask) {
        pp_topic *m = srv->topics[j];
        size_t home = topic_hash(m->name, m->len) & mask;
        int stays = i <= j ? (home > i && home <= j) : (home > i || home <= j);
        if (!stays) {
            srv->topics[i] = m;
            srv->topics[j] = NULL;
            i = j;
        }
    }
    free(t->members);
    free(t);
}

static int grow_ptrs(void *pv, size_t *cap, size_t want)
{
    void **p = pv;
    if (*cap >= want)
        return 0;
    size_t n = *cap ? *cap * 2 : 4;
    while (n < want)
        n *= 2;
    if (n > SIZE_MAX / sizeof(void *))
        return -ENOMEM;
    void *q = realloc(*p, n * sizeof(void *));
    if (q == NULL)
        return -ENOMEM;
    *p = q;
    *cap = n;
    return 0;
}

static int do_subscribe(pp_server *srv, pp_conn *c, const unsigned char *name, size_t n)
{
    pp_topic *t = do_find_topic(srv, name, n);
    if (t != NULL) {
        for (size_t i = 0; i < c->ntopics; i++)
            if (c->topics[i] == t)
                return 0; /* already */
    }
    if (grow_ptrs(&c->topics, &c->cap_topics, c->ntopics + 1) < 0)
        return -ENOMEM;
    if (t == NULL) {
        if ((srv->topics_n + 1) * 2 > srv->topics_cap && do_grow_topics(srv) < 0)
            return -ENOMEM;
        if (n > SIZE_MAX - sizeof *t)
            return -ENOMEM;
        t = calloc(1, sizeof *t + n);
        if (t == NULL)
            return -ENOMEM;
        t->len = n;
        if (n)
            memcpy(t->name, name, n);
        srv->topics[topic_slot(srv, name, n)] = t;
        srv->topics_n++;
    }
    if (grow_ptrs(&t->members, &t->cap, t->n + 1) < 0) {
        if (t->n == 0)
            do_remove_topic(srv, t);
        return -ENOMEM;
    }
    t->members[t->n++] = c;
    c->topics[c->ntopics++] = t;
    return 0;
}

/* Removes c from t (both sides); frees t when it has no member left. */
static void do_leave(pp_server *srv, pp_conn *c, size_t k)
{
    pp_topic *t = c->topics[k];
    c->topics[k] = c->topics[--c->ntopics];
    for (size_t i = 0; i < t->n; i++) {
        if (t->members[i] == c) {
            t->members[i] = t->members[--t->n];
            break;
        }
    }
    if (t->n == 0)
        do_remove_topic(srv, t);
}

void pp__push_unregister(pp_server *srv, pp_conn *c)
{
    pthread_mutex_lock(&srv->push_mu);
    if (c->push_flags & PP_P_REG) {
        do_remove_id(srv, c);
        pp__list_unlink(&c->reg_link);
        pp__list_unlink(&c->push_link);
        while (c->ntopics > 0)
            do_leave(srv, c, c->ntopics - 1);
        free(c->topics);
        c->topics = NULL;
        c->cap_topics = 0;
        pp__segq_free(&c->outbox);
        c->push_flags = 0;
        atomic_store_explicit(&c->outbox_has, 0, memory_order_relaxed);
    }
    pthread_mutex_unlock(&srv->push_mu);
}

/* ---- producing ---------------------------------------------------------- */

/* Puts c on the list the I/O thread takes; returns 1 if that made the list
 * non-empty (the caller then wakes the I/O thread). */
static int do_list(pp_server *srv, pp_conn *c)
{
    atomic_store_explicit(&c->outbox_has, 1, memory_order_relaxed);
    if (pp__linked(&c->push_link))
        return 0;
    int first = pp__list_empty(&srv->push_ready);
    pp__list_append(&srv->push_ready, &c->push_link);
    if (first)
        atomic_store(&srv->push_pending, 1);
    return first;
}

/* Queues a reference to sh for c (the caller holds one for it to take).
 * Returns 0 (the reference is c's now), 1 (accepted with nothing to send:
 * an empty raw frame; the reference stays the caller's), -ENOTCONN, -ENOBUFS
 * (dropped, or c closes, by push_limit) or -ENOMEM.  *wake is set when the
 * I/O thread must be woken. */
static int do_push(pp_server *srv, pp_conn *c, pp_shared *sh, int *wake)
{
    if (!(c->push_flags & PP_P_REG) ||
        (c->push_flags & (PP_P_OVERFLOW | PP_P_CLOSE_REQ | PP_P_CLOSING)))
        return -ENOTCONN;
    if (sh->len == 0)
        return 1; /* a zero-byte segment would make a zero-byte sendmsg() */
    size_t limit = srv->cfg.push_limit;
    size_t queued = atomic_load_explicit(&c->push_queued, memory_order_relaxed);
    if (limit && (sh->len > limit || queued > limit - sh->len)) {
        if (srv->cfg.push_overflow == PP_PUSH_DROP) {
            pp__stat_add(&srv->push_stats.push_drops, 1);
        } else {
            /* As Redis does for a pub/sub client past its output limit:
             * the slow reader is cut, never the others slowed. */
            c->push_flags |= PP_P_OVERFLOW;
            pp__stat_add(&srv->push_stats.push_overflow_closes, 1);
            *wake |= do_list(srv, c);
        }
        return -ENOBUFS;
    }
    if (pp__segq_push(&c->outbox, sh, 1) < 0)
        return -ENOMEM;
    atomic_fetch_add_explicit(&c->push_queued, sh->len, memory_order_relaxed);
    pp__stat_add(&srv->push_stats.pushes, 1);
    pp__stat_add(&srv->push_stats.push_bytes, sh->len);
    *wake |= do_list(srv, c);
    return 0;
}

static void notify(pp_server *srv, int wake)
{
    if (wake)
        pp__loop_notify(srv);
}

int pp_server_send(pp_server *srv, uint64_t id, const void *data, size_t len)
{
    pp_shared *sh = pp__shared_frame(&srv->framing, data, len);
    if (sh == NULL)
        return -errno;
    int wake = 0, rc = -ENOTCONN;
    pthread_mutex_lock(&srv->push_mu);
    pp_conn *c = srv->push_closed ? NULL : do_find(srv, id);
    if (c != NULL)
        rc = do_push(srv, c, sh, &wake);
    pthread_mutex_unlock(&srv->push_mu);
    notify(srv, wake);
    if (rc != 0)
        pp__shared_unref(sh);
    return rc > 0 ? 0 : rc;
}

/* One recipient of a fan-out: a reference of its own to the shared frame.
 * Returns 1 if c took it. */
static int fan_out_one(pp_server *srv, pp_conn *c, pp_shared *sh, int *wake)
{
    pp__shared_ref(sh);
    int rc = do_push(srv, c, sh, wake);
    if (rc == 0)
        return 1;
    pp__shared_unref(sh);
    return rc > 0;
}

/* One frame to many: the members of topic (tlen bytes), or every open
 * connection when topic is NULL.  Returns how many took it, or -errno. */
static long fan_out(pp_server *srv, const void *topic, size_t tlen, const void *data,
                    size_t len)
{
    pp_shared *sh = pp__shared_frame(&srv->framing, data, len);
    if (sh == NULL)
        return -errno;
    int wake = 0;
    long got = 0;
    pthread_mutex_lock(&srv->push_mu);
    if (srv->push_closed) {
        /* draining: nobody takes pushes */
    } else if (topic != NULL) {
        pp_topic *t = do_find_topic(srv, topic, tlen);
        /* do_push() never changes membership, so the array stays put. */
        for (size_t i = 0; t != NULL && i < t->n; i++)
            got += fan_out_one(srv, t->members[i], sh, &wake);
    } else {
        for (pp_link *l = srv->registry.next; l != &srv->registry; l = l->next)
            got += fan_out_one(srv, PP_CONTAINER(l, pp_conn, reg_link), sh, &wake);
    }
    pthread_mutex_unlock(&srv->push_mu);
    notify(srv, wake);
    pp__shared_unref(sh);
    return got;
}

long pp_server_publish(pp_server *srv, const void *topic, size_t tlen, const void *data,
                       size_t len)
{
    /* Any bytes name a topic, the empty name too (also for a NULL topic):
     * only fan_out()'s own NULL means "every connection". */
    if (topic == NULL) {
        topic = "";
        tlen = 0;
    }
    return fan_out(srv, topic, tlen, data, len);
}

long pp_server_broadcast(pp_server *srv, const void *data, size_t len)
{
    return fan_out(srv, NULL, 0, data, len);
}

int pp_server_close_conn(pp_server *srv, uint64_t id)
{
    int wake = 0, rc = -ENOTCONN;
    pthread_mutex_lock(&srv->push_mu);
    pp_conn *c = do_find(srv, id);
    if (c != NULL && !(c->push_flags & (PP_P_OVERFLOW | PP_P_CLOSE_REQ | PP_P_CLOSING))) {
        c->push_flags |= PP_P_CLOSE_REQ | PP_P_CLOSING;
        wake = do_list(srv, c);
        rc = 0;
    }
    pthread_mutex_unlock(&srv->push_mu);
    notify(srv, wake);
    return rc;
}

int pp_server_subscribe(pp_server *srv, uint64_t id, const void *topic, size_t tlen)
{
    int rc = -ENOTCONN;
    pthread_mutex_lock(&srv->push_mu);
    pp_conn *c = do_find(srv, id);
    if (c != NULL)
        rc = do_subscribe(srv, c, topic, tlen);
    pthread_mutex_unlock(&srv->push_mu);
    return rc;
}

int pp_server_unsubscribe(pp_server *srv, uint64_t id, const void *topic, size_t tlen)
{
    int rc = -ENOTCONN;
    pthread_mutex_lock(&srv->push_mu);
    pp_conn *c = do_find(srv, id);
    if (c != NULL) {
        rc = 0;
        pp_topic *t = do_find_topic(srv, topic, tlen);
        for (size_t k = 0; t != NULL && k < c->ntopics; k++) {
            if (c->topics[k] == t) {
                do_leave(srv, c, k);
                break;
            }
        }
    }
    pthread_mutex_unlock(&srv->push_mu);
    return rc;
}

long long pp_server_pending(pp_server *srv, uint64_t id)
{
    long long rc = -ENOTCONN;
    pthread_mutex_lock(&srv->push_mu);
    pp_conn *c = do_find(srv, id);
    if (c != NULL)
        rc = (long long)(c->outbox.bytes +
                         atomic_load_explicit(&c->out_pending, memory_order_relaxed));
    pthread_mutex_unlock(&srv->push_mu);
    return rc;
}

/* ---- consuming ---------------------------------------------------------- */

void pp__push_refuse(pp_server *srv, pp_conn *c)
{
    pthread_mutex_lock(&srv->push_mu);
    if (c->push_flags & PP_P_REG)
        c->push_flags |= PP_P_CLOSING;
    pthread_mutex_unlock(&srv->push_mu);
}

void pp__push_close(pp_server *srv)
{
    pthread_mutex_lock(&srv->push_mu);
    srv->push_closed = 1;
    pthread_mutex_unlock(&srv->push_mu);
}

pp_conn *pp__push_take_ready(pp_server *srv)
{
    if (!atomic_load(&srv->push_pending))
        return NULL;
    pp_conn *chain = NULL;
    pthread_mutex_lock(&srv->push_mu);
    atomic_store(&srv->push_pending, 0);
    pp_link *l;
    while ((l = pp__list_first(&srv->push_ready)) != NULL) {
        pp__list_unlink(l);
        pp_conn *c = PP_CONTAINER(l, pp_conn, push_link);
        c->push_next = chain;
        chain = c;
    }
    pthread_mutex_unlock(&srv->push_mu);
    return chain;
}

unsigned pp__push_take(pp_server *srv, pp_conn *c, int requests)
{
    pp_segq got = {0};
    unsigned req = 0;
    pthread_mutex_lock(&srv->push_mu);
    /* The ring goes whole: one swap, no copy, whatever was queued. */
    got = c->outbox;
    memset(&c->outbox, 0, sizeof c->outbox);
    req = c->push_flags & (PP_P_OVERFLOW | PP_P_CLOSE_REQ);
    if (requests)
        c->push_flags &= ~PP_P_CLOSE_REQ; /* CLOSING and OVERFLOW stay: no more pushes */
    if (requests || req == 0)
        atomic_store_explicit(&c->outbox_has, 0, memory_order_relaxed);
    pthread_mutex_unlock(&srv->push_mu);
    if (got.n > 0) {
        /* What the output holds now was made before these pushes were
         * taken, so it goes first: the open reply buffer becomes a segment
         * of its own, without a copy. */
        int rc = 0;
        if (pp__buf_size(&c->out) > 0) {
            pp_shared *sh = pp__shared_adopt(&c->out);
            if (sh == NULL || pp__segq_push(&c->outq, sh, 0) < 0) {
                if (sh != NULL) {
                    /* Back where it was: nothing is lost but the pushes. */
                    c->out.data = sh->owned;
                    c->out.off = (size_t)(sh->data - sh->owned);
                    c->out.len = c->out.off + sh->len;
                    c->out.cap = c->out.len;
                    free(sh);
                }
                rc = -ENOMEM;
            }
        }
        if (rc == 0)
            rc = pp__segq_move(&c->outq, &got);
        if (rc < 0) {
            atomic_fetch_sub_explicit(&c->push_queued, got.bytes, memory_order_relaxed);
            req |= PP_P_NOMEM;
        }
    }
    pp__segq_free(&got);
    atomic_store_explicit(&c->out_pending, pp__conn_pending(c), memory_order_relaxed);
    return req;
}

/* ---- the native ABI's services (pollpool.h) ----------------------------- */

static int svc_send(void *srv, uint64_t id, const void *data, size_t len)
{
    return pp_server_send(srv, id, data, len);
}

static long svc_broadcast(void *srv, const void *data, size_t len)
{
    return pp_server_broadcast(srv, data, len);
}

static long svc_publish(void *srv, const void *topic, size_t tlen, const void *data,
                        size_t len)
{
    return pp_server_publish(srv, topic, tlen, data, len);
}

static int svc_subscribe(void *srv, uint64_t id, const void *topic, size_t tlen)
{
    return pp_server_subscribe(srv, id, topic, tlen);
}

static int svc_unsubscribe(void *srv, uint64_t id, const void *topic, size_t tlen)
{
    return pp_server_unsubscribe(srv, id, topic, tlen);
}

static int svc_close(void *srv, uint64_t id)
{
    return pp_server_close_conn(srv, id);
}

void pp__push_services_init(pp_server *srv)
{
    srv->services = (pp_services){
        .abi_version = POLLPOOL_ABI_VERSION,
        .server = srv,
        .send = svc_send,
        .broadcast = svc_broadcast,
        .publish = svc_publish,
        .subscribe = svc_subscribe,
        .unsubscribe = svc_unsubscribe,
        .close = svc_close,
        .defer = pp__reply_defer,
        .peer = pp_reply_peer,
        .proxy_peer = pp_reply_proxy_peer,
        .peer_cred = pp_reply_peer_cred,
    };
}
