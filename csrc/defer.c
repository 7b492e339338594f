/*
 * defer.c - replies that come later: the handle a handler takes its reply
 * over with (pollpool.h's pp_reply_defer), written and finished from any
 * thread.
 *
 * A handle never touches its connection.  It holds the reply in a buffer of
 * its own, and its finish puts it on the hub's finished list and wakes the
 * I/O thread, which alone moves the reply into the connection's output
 * (loop.c, deferred_apply).  Who wins between a finish and the connection's
 * end (a reset, reply_timeout, the drain's end) is decided once, under the
 * hub's lock, by the handle's state: PENDING becomes FINISHED (the finish
 * won; the I/O thread applies it, or drops it if the connection goes before
 * it could) or GONE (the connection went first; the finish only frees the
 * handle and returns -ENOTCONN).  The hub outlives the server for as long as
 * a handle does, so a finish after pp_server_free() is safe too.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <sched.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "core.h"

/* Unique for the process: a handle's id outlives the handle (deferred_gone
 * reports it after another thread may have freed it), so it must never come
 * back for another handle. */
static _Atomic uint64_t next_id;

/* Handles kept for reuse: at most this many in the hub's pool (a worker
 * takes all of it at once), with buffers of at most this capacity (a larger
 * one is freed, so one huge reply pins nothing). */
#define PP_POOL_MAX 1024
#define PP_KEEP_DBUF 2048
/* Ids are taken from next_id this many at a time per thread. */
#define PP_ID_BLOCK 1024

/* A worker's handles, taken from its hub's pool.  A worker serves one
 * server for its whole life, so they all hold a reference to one hub. */
static _Thread_local pp_dimpl *cache;
static _Thread_local uint64_t id_next, id_end;

static void hub_unref(pp_hub *hub)
{
    if (atomic_fetch_sub(&hub->refs, 1) == 1) {
        pthread_mutex_destroy(&hub->pool_mu);
        pthread_mutex_destroy(&hub->mu);
        free(hub);
    }
}

int pp__hub_new(pp_server *srv)
{
    pp_hub *hub = calloc(1, sizeof *hub);
    if (hub == NULL)
        return -ENOMEM;
    int rc = pthread_mutex_init(&hub->mu, NULL);
    if (rc != 0) {
        free(hub);
        return -rc;
    }
    if ((rc = pthread_mutex_init(&hub->pool_mu, NULL)) != 0) {
        pthread_mutex_destroy(&hub->mu);
        free(hub);
        return -rc;
    }
    atomic_init(&hub->refs, 1);
    hub->srv = srv;
    pp__list_init(&hub->finished);
    hub->framing = srv->framing;
    srv->hub = hub;
    return 0;
}

static int d_write(pp_deferred *pub, const void *data, size_t len);
static int d_finish(pp_deferred *pub, int status);

static const pp_deferred_ops ops = {d_write, d_finish};

/* A handle from the worker's cache, refilled from the pool when empty. */
static pp_dimpl *reuse(pp_hub *hub)
{
    if (cache == NULL && atomic_load_explicit(&hub->npool_hint, memory_order_relaxed) > 0) {
        /* The whole pool at once: no walk over handles gone cold. */
        pthread_mutex_lock(&hub->pool_mu);
        cache = hub->pool;
        hub->pool = NULL;
        hub->npool = 0;
        atomic_store_explicit(&hub->npool_hint, 0, memory_order_relaxed);
        pthread_mutex_unlock(&hub->pool_mu);
    }
    pp_dimpl *d = cache;
    if (d != NULL)
        cache = d->qnext;
    return d;
}

pp_dimpl *pp__deferred_new(pp_server *srv, pp_conn *c)
{
    pp_hub *hub = srv->hub;
    pp_dimpl *d = reuse(hub);
    if (d != NULL) {
        /* As recycled: buffers empty, every other field as calloc left it
         * but the ops, the hub and its reference. */
        d->qnext = NULL;
    } else {
        d = calloc(1, sizeof *d);
        if (d == NULL)
            return NULL;
        d->pub.ops = &ops;
        d->hub = hub;
        atomic_fetch_add(&hub->refs, 1);
    }
    d->conn = c;
    d->conn_id = c->id;
    if (id_next == id_end) {
        id_next = atomic_fetch_add_explicit(&next_id, PP_ID_BLOCK, memory_order_relaxed) + 1;
        id_end = id_next + PP_ID_BLOCK;
    }
    d->id = id_next++;
    /* Nobody else sees d yet: the finish that publishes it takes hub->mu. */
    atomic_store_explicit(&d->state, PP_D_PENDING, memory_order_relaxed);
    return d;
}

/* Empties a buffer for reuse, freeing it if it grew large. */
static void dbuf_recycle(pp_buf *b)
{
    if (b->cap > PP_KEEP_DBUF)
        pp__buf_free(b);
    else
        b->off = b->len = 0;
}

void pp__deferred_recycle(pp_server *srv, pp_dimpl *d)
{
    pp_hub *hub = srv->hub;
    dbuf_recycle(&d->out);
    dbuf_recycle(&d->after);
    pp__buf_free(&d->keep); /* empty: only gone handles hold one, never reused */
    d->status = 0;
    d->mark = 0;
    d->open = d->error = 0;
    d->nreplies = d->after_n = 0;
    d->ready = 0;
    d->kprev = d->knext = NULL;
    d->link.next = d->link.prev = NULL;
    d->qnext = hub->local;
    if (hub->local == NULL)
        hub->local_tail = d;
    hub->local = d;
    hub->nlocal++;
}

void pp__deferred_recycled(pp_server *srv)
{
    pp_hub *hub = srv->hub;
    pp_dimpl *extra = hub->local;
    if (extra == NULL)
        return;
    pthread_mutex_lock(&hub->pool_mu);
    if (hub->npool + hub->nlocal <= PP_POOL_MAX) {
        hub->local_tail->qnext = hub->pool; /* spliced whole */
        hub->pool = hub->local;
        hub->npool += hub->nlocal;
        extra = NULL;
    }
    atomic_store_explicit(&hub->npool_hint, hub->npool, memory_order_relaxed);
    pthread_mutex_unlock(&hub->pool_mu);
    hub->local = hub->local_tail = NULL;
    hub->nlocal = 0;
    while (extra != NULL) { /* the pool is full: these go */
        pp_dimpl *next = extra->qnext;
        pp__deferred_free(extra); /* never the hub's last reference: the server holds one */
        extra = next;
    }
}

void pp__deferred_thread_exit(void)
{
    while (cache != NULL) {
        pp_dimpl *d = cache;
        cache = d->qnext;
        pp__deferred_free(d);
    }
}

void pp__deferred_free(pp_dimpl *d)
{
    pp_hub *hub = d->hub;
    pp__buf_free(&d->out);
    pp__buf_free(&d->after);
    pp__buf_free(&d->keep);
    free(d);
    hub_unref(hub);
}

uint64_t pp_deferred_id(const pp_deferred *pub)
{
    return ((const pp_dimpl *)pub)->id;
}

uint64_t pp_deferred_conn_id(const pp_deferred *pub)
{
    return ((const pp_dimpl *)pub)->conn_id;
}

static int gone(const pp_dimpl *d)
{
    return atomic_load_explicit(&d->state, memory_order_relaxed) == PP_D_GONE;
}

static int d_write(pp_deferred *pub, const void *data, size_t len)
{
    pp_dimpl *d = (pp_dimpl *)pub;
    const pp_framing *f = &d->hub->framing;
    pp_buf *out = &d->out;
    if (gone(d))
        return -ENOTCONN;
    if (d->error)
        return -d->error;
    if (!d->open) {
        size_t prefix = pp__frame_prefix_len(f);
        if (len > SIZE_MAX - prefix - f->delim_len ||
            pp__buf_reserve(out, prefix + len + f->delim_len) < 0)
            return -ENOMEM; /* nothing begun: the handle is as it was */
        out->len += prefix;
        d->mark = pp__buf_size(out);
        d->open = 1;
    } else if (pp__buf_reserve(out, len) < 0) {
        d->error = ENOMEM;
        return -ENOMEM;
    }
    if (len > f->reply_max - (pp__buf_size(out) - d->mark)) {
        d->error = EMSGSIZE;
        return -EMSGSIZE;
    }
    if (len)
        memcpy(out->data + out->len, data, len);
    out->len += len;
    return 0;
}

int pp_deferred_write_framed(pp_deferred *pub, const void *data, size_t len,
                             size_t nreplies)
{
    pp_dimpl *d = (pp_dimpl *)pub;
    if (d->open)
        return -EINVAL;
    if (gone(d))
        return -ENOTCONN;
    if (pp__buf_append(&d->out, data, len) < 0)
        return -ENOMEM;
    d->nreplies += nreplies;
    return 0;
}

/* Ends the open reply: framed if all went well, else taken back, so that
 * only whole replies are ever applied.  Returns the status to apply. */
static int close_open(pp_dimpl *d, int status)
{
    int st = status;
    if (d->error && st >= 0)
        st = -d->error; /* a failed write voids the reply: close, as a handler error */
    if (!d->open)
        return st;
    d->open = 0;
    const pp_framing *f = &d->hub->framing;
    size_t body = pp__buf_size(&d->out) - d->mark;
    if (st >= 0) {
        int rc = pp__frame_finish(f, &d->out, body);
        if (rc == 0) {
            d->nreplies++;
            return st;
        }
        st = rc;
    }
    d->out.len -= body + pp__frame_prefix_len(f);
    return st;
}

/* A gone handle leaves the ring of its task's gone handles (hub->mu held):
 * the task buffer goes to a neighbour still to finish, so that the messages
 * it holds stay readable until the last finish. */
static void ring_leave(pp_dimpl *d)
{
    pp_dimpl *n = d->knext;
    if (n == NULL || n == d)
        return; /* alone: keep is freed with d */
    if (d->keep.data != NULL) {
        n->keep = d->keep;
        memset(&d->keep, 0, sizeof d->keep);
    }
    n->kprev = d->kprev;
    d->kprev->knext = n;
    d->kprev = d->knext = NULL;
}

static int d_finish(pp_deferred *pub, int status)
{
    pp_dimpl *d = (pp_dimpl *)pub;
    pp_hub *hub = d->hub;
    int st = close_open(d, status);
    pthread_mutex_lock(&hub->mu);
    if (atomic_load_explicit(&d->state, memory_order_relaxed) == PP_D_GONE ||
        hub->srv == NULL) {
        ring_leave(d);
        pthread_mutex_unlock(&hub->mu);
        pp__deferred_free(d);
        return -ENOTCONN;
    }
    d->status = st;
    atomic_store_explicit(&d->state, PP_D_FINISHED, memory_order_relaxed);
    pp__list_append(&hub->finished, &d->link);
    atomic_store(&hub->has_finished, 1);
    /* The wake-up goes after the lock: a woken I/O thread that preempts us
     * (one core) would otherwise block on the lock we hold.  The server and
     * its wake fd stay meanwhile: its release waits for notifying to drop.
     * d is not ours past the unlock; the hub is, until notifying drops. */
    pp_server *srv = hub->srv;
    if (!atomic_load(&srv->io_armed) || !atomic_exchange(&srv->io_armed, 0)) {
        pthread_mutex_unlock(&hub->mu); /* awake: it looks at has_finished */
        return 0;
    }
    atomic_fetch_add(&hub->notifying, 1);
    pthread_mutex_unlock(&hub->mu);
    pp__loop_wake(srv);
    atomic_fetch_sub(&hub->notifying, 1);
    return 0;
}

pp_dimpl *pp__deferred_take(pp_server *srv)
{
    pp_hub *hub = srv->hub;
    if (!atomic_load(&hub->has_finished))
        return NULL;
    pp_dimpl *head = NULL, **tail = &head;
    pthread_mutex_lock(&hub->mu);
    atomic_store(&hub->has_finished, 0);
    pp_link *l;
    while ((l = pp__list_first(&hub->finished)) != NULL) {
        pp__list_unlink(l);
        pp_dimpl *d = PP_CONTAINER(l, pp_dimpl, link);
        /* Off every list now: link.next chains the taken ones. */
        d->link.next = NULL;
        *tail = d;
        tail = (pp_dimpl **)(void *)&d->link.next;
    }
    pthread_mutex_unlock(&hub->mu);
    return head;
}

size_t pp__deferred_drop(pp_server *srv, pp_conn *c, uint64_t *gone_ids)
{
    pp_hub *hub = srv->hub;
    pp_dimpl *ring = NULL, *dead = NULL;
    size_t ngone = 0;
    /* One lock for the whole queue: a gone handle may be finished and freed
     * by its finisher the moment the lock is let go, so the ring is built
     * while none can leave it. */
    pthread_mutex_lock(&hub->mu);
    while (c->def_head != NULL) {
        pp_dimpl *d = c->def_head;
        c->def_head = d->qnext;
        d->qnext = NULL;
        pp__stat_add(&srv->stats.deferred_retired, 1);
        if (d->ready ||
            atomic_load_explicit(&d->state, memory_order_relaxed) == PP_D_FINISHED) {
            /* Finished already; on the finished list still unless taken. */
            if (!d->ready)
                pp__list_unlink(&d->link);
            d->qnext = dead;
            dead = d;
            continue;
        }
        /* The finish is still to come, maybe from a handler still reading
         * the message it deferred: the task buffer goes with the gone
         * handles, the first holding it. */
        if (ring == NULL) {
            d->keep = c->task;
            memset(&c->task, 0, sizeof c->task);
            d->kprev = d->knext = d;
            ring = d;
        } else {
            d->knext = ring;
            d->kprev = ring->kprev;
            ring->kprev->knext = d;
            ring->kprev = d;
        }
        d->conn = NULL;
        atomic_store_explicit(&d->state, PP_D_GONE, memory_order_relaxed);
        gone_ids[ngone++] = d->id;
    }
    pthread_mutex_unlock(&hub->mu);
    c->def_tail = NULL;
    c->ndef = 0;
    while (dead != NULL) {
        pp_dimpl *next = dead->qnext;
        pp__deferred_recycle(srv, dead);
        dead = next;
    }
    return ngone;
}

void pp__hub_release(pp_server *srv)
{
    pp_hub *hub = srv->hub;
    if (hub == NULL)
        return;
    pthread_mutex_lock(&hub->mu);
    hub->srv = NULL;
    /* Handles finished for connections that are gone with the server (the
     * refs they drop are not the last: the server's is still held). */
    pp_link *l;
    while ((l = pp__list_first(&hub->finished)) != NULL) {
        pp__list_unlink(l);
        pp__deferred_free(PP_CONTAINER(l, pp_dimpl, link));
    }
    pthread_mutex_unlock(&hub->mu);
    /* A finish that saw the server may still be waking it. */
    while (atomic_load(&hub->notifying) > 0)
        sched_yield();
    /* Handles kept for reuse (workers are gone or going: what their caches
     * hold is freed as each exits). */
    pp__deferred_recycled(srv);
    pthread_mutex_lock(&hub->pool_mu);
    pp_dimpl *pool = hub->pool;
    hub->pool = NULL;
    hub->npool = 0;
    atomic_store(&hub->npool_hint, 0);
    pthread_mutex_unlock(&hub->pool_mu);
    while (pool != NULL) {
        pp_dimpl *next = pool->qnext;
        pp__deferred_free(pool);
        pool = next;
    }
    srv->hub = NULL;
    hub_unref(hub);
}
