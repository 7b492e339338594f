/* pool.c - worker threads and their task queue. */
#include "pool.h"

#include <errno.h>
#include <sched.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

int pp__sched_batch_wanted(void)
{
    return getenv("POLLPOOL_NO_SCHED_BATCH") == NULL;
}

int pp__pool_init(pp_pool *p, int nthreads, pp_task_fn run, void *arg)
{
    int rc;
    memset(p, 0, sizeof *p);
    if (nthreads < 1)
        return -EINVAL;
    p->nthreads = nthreads;
    p->run = run;
    p->arg = arg;
    p->workers = calloc((size_t)nthreads, sizeof *p->workers);
    if (p->workers == NULL)
        return -ENOMEM;
    if ((rc = pthread_mutex_init(&p->mu, NULL)) != 0)
        goto fail_workers;
    pthread_condattr_t ca;
    if ((rc = pthread_condattr_init(&ca)) != 0)
        goto fail_mutex;
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    if ((rc = pthread_cond_init(&p->exited, &ca)) != 0)
        goto fail_attr;
    int i;
    for (i = 0; i < nthreads; i++) {
        p->workers[i].pool = p;
        if ((rc = pthread_cond_init(&p->workers[i].cv, NULL)) != 0)
            goto fail_cvs;
    }
    pthread_condattr_destroy(&ca);
    return 0;

fail_cvs:
    while (i-- > 0)
        pthread_cond_destroy(&p->workers[i].cv);
    pthread_cond_destroy(&p->exited);
fail_attr:
    pthread_condattr_destroy(&ca);
fail_mutex:
    pthread_mutex_destroy(&p->mu);
fail_workers:
    free(p->workers);
    p->workers = NULL;
    return -rc;
}

/* Takes the first queued task; called with p->mu held. */
static pp_task *do_pop(pp_pool *p)
{
    pp_task *t = p->head;
    p->head = t->next;
    if (p->head == NULL)
        p->tail = NULL;
    t->next = NULL;
    p->queued--;
    atomic_store_explicit(&p->nqueued, p->queued, memory_order_relaxed);
    return t;
}

/* The pool whose worker this thread is, or NULL: lets code a handler calls
 * (a stop) know that it must not wait for the pool to finish. */
static __thread const pp_pool *pp_current_pool;

int pp__pool_on_worker(const pp_pool *p)
{
    return p != NULL && pp_current_pool == p;
}

static void *worker_main(void *arg)
{
    pp_worker *w = arg;
    pp_pool *p = w->pool;
    pp_current_pool = p;
    /* A woken worker then does not preempt the thread running on its core:
     * each finishes its batch before the switch (see pp_server_run()). */
    if (pp__sched_batch_wanted()) {
        struct sched_param sp = {0};
        pthread_setschedparam(pthread_self(), SCHED_BATCH, &sp);
    }

    pthread_mutex_lock(&p->mu);
    for (;;) {
        if (p->abandon)
            break;
        if (p->head != NULL) {
            /* One task at a time: a worker that took the whole queue would
             * serialise every connection behind one slow handler. */
            pp_task *t = do_pop(p);
            pthread_mutex_unlock(&p->mu);
            p->run(p->arg, w, t);
            pthread_mutex_lock(&p->mu);
            continue;
        }
        if (p->stopping)
            break;
        w->wake = 0;
        w->next_idle = p->idle;
        p->idle = w;
        while (!w->wake)
            pthread_cond_wait(&w->cv, &p->mu);
    }
    /* What the handler's host keeps per thread (a Python thread state) goes
     * first, while the pool still stands. */
    if (p->thread_exit) {
        pthread_mutex_unlock(&p->mu);
        p->thread_exit(p->arg);
        pthread_mutex_lock(&p->mu);
    }
    /* Freed before live drops: once it does, the last worker out may free
     * every worker's memory (orphan_free). */
    free(w->msgs);
    w->msgs = NULL;
    int last = --p->live == 0;
    int orphan = last && p->orphaned;
    if (last)
        pthread_cond_broadcast(&p->exited);
    pthread_mutex_unlock(&p->mu);
    /* The pool's owner is gone; this thread is the last user of it all. */
    if (orphan)
        p->orphan_free(p->arg);
    return NULL;
}

int pp__pool_start(pp_pool *p)
{
    sigset_t block, old;
    sigemptyset(&block);
    sigaddset(&block, SIGINT);
    sigaddset(&block, SIGTERM);
    /* Threads inherit the creator's mask: block, create, restore. */
    int rc = pthread_sigmask(SIG_BLOCK, &block, &old);
    if (rc != 0)
        return -rc;
    for (int i = 0; i < p->nthreads; i++) {
        pthread_mutex_lock(&p->mu);
        p->live++;
        pthread_mutex_unlock(&p->mu);
        rc = pthread_create(&p->workers[i].tid, NULL, worker_main, &p->workers[i]);
        if (rc != 0) {
            pthread_mutex_lock(&p->mu);
            p->live--;
            pthread_mutex_unlock(&p->mu);
            break;
        }
        p->started++;
    }
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (rc != 0) {
        pp__pool_stop(p, 1, -1);
        return -rc;
    }
    return 0;
}

/* Wakes up to n sleeping workers; called with p->mu held.  The workers are
 * taken off the idle list here, so a second push never wakes them again. */
static void do_wake(pp_pool *p, size_t n)
{
    while (n-- > 0 && p->idle != NULL) {
        pp_worker *w = p->idle;
        p->idle = w->next_idle;
        w->wake = 1;
        pthread_cond_signal(&w->cv);
    }
}

void pp__pool_push(pp_pool *p, pp_task *head, pp_task *tail, size_t n)
{
    if (n == 0)
        return;
    tail->next = NULL;
    pthread_mutex_lock(&p->mu);
    if (p->tail)
        p->tail->next = head;
    else
        p->head = head;
    p->tail = tail;
    p->queued += n;
    atomic_store_explicit(&p->nqueued, p->queued, memory_order_relaxed);
    do_wake(p, n);
    pthread_mutex_unlock(&p->mu);
}

size_t pp__pool_queued(pp_pool *p)
{
    return atomic_load_explicit(&p->nqueued, memory_order_relaxed);
}

int pp__pool_stop(pp_pool *p, int abandon, int timeout_ms)
{
    if (p->workers == NULL || p->joined)
        return 0;
    struct timespec until;
    clock_gettime(CLOCK_MONOTONIC, &until);
    if (timeout_ms > 0) {
        until.tv_sec += timeout_ms / 1000;
        until.tv_nsec += (long)(timeout_ms % 1000) * 1000000L;
        if (until.tv_nsec >= 1000000000L) {
            until.tv_sec++;
            until.tv_nsec -= 1000000000L;
        }
    }
    pthread_mutex_lock(&p->mu);
    p->stopping = 1;
    if (abandon)
        p->abandon = 1;
    do_wake(p, (size_t)p->nthreads);
    int rc = 0;
    while (p->live > 0 && rc != ETIMEDOUT) {
        if (timeout_ms < 0)
            pthread_cond_wait(&p->exited, &p->mu);
        else
            rc = pthread_cond_timedwait(&p->exited, &p->mu, &until);
    }
    int live = p->live;
    pthread_mutex_unlock(&p->mu);
    if (live > 0)
        return 1;
    for (int i = 0; i < p->started; i++)
        pthread_join(p->workers[i].tid, NULL);
    p->joined = 1;
    return 0;
}

int pp__pool_release(pp_pool *p)
{
    if (p->workers == NULL)
        return 1;
    pthread_mutex_lock(&p->mu);
    if (p->live > 0) {
        p->orphaned = 1;
        for (int i = 0; i < p->started; i++)
            pthread_detach(p->workers[i].tid);
        pthread_mutex_unlock(&p->mu);
        return 0;
    }
    pthread_mutex_unlock(&p->mu);
    if (!p->joined) {
        for (int i = 0; i < p->started; i++)
            pthread_join(p->workers[i].tid, NULL);
        p->joined = 1;
    }
    return 1;
}

void pp__pool_destroy(pp_pool *p)
{
    if (p->workers == NULL)
        return;
    for (int i = 0; i < p->nthreads; i++) {
        pthread_cond_destroy(&p->workers[i].cv);
        free(p->workers[i].msgs);
    }
    pthread_cond_destroy(&p->exited);
    pthread_mutex_destroy(&p->mu);
    free(p->workers);
    p->workers = NULL;
}
