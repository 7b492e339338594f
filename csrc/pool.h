/*
 * pool.h - the worker pool and its task queue.
 *
 * Tasks are intrusive (a pp_task inside the caller's struct), so queueing
 * allocates nothing.  The producer pushes a whole batch under one lock and
 * wakes at most one sleeping worker per task, each through its own condition
 * variable: a worker is taken off the idle list by the one who wakes it, so no
 * wake-up is ever spent twice and no herd wakes for one task.
 */
#ifndef PP_POOL_H
#define PP_POOL_H

#include <pthread.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>

#include "pp_server.h"

typedef struct pp_task {
    struct pp_task *next;       /* guarded by the pool mutex while queued */
} pp_task;

typedef struct pp_worker pp_worker;
typedef struct pp_pool pp_pool;

/* Runs one task on a worker thread; the task is the callee's until done. */
typedef void (*pp_task_fn)(void *arg, pp_worker *w, pp_task *t);

/* Per-worker counters: one writer (the worker), read by any thread. */
typedef struct pp_wstats {
    _Atomic uint64_t messages, replies, bytes_out, handler_errors, write_errors;
    _Atomic uint64_t nomem_errors, output_overflows, deferred_total;
} pp_wstats;

struct pp_worker {
    pp_pool *pool;
    pthread_t tid;
    pthread_cond_t cv;
    int wake;                   /* guarded by pool->mu */
    pp_worker *next_idle;       /* guarded by pool->mu */
    pp_msg *msgs;               /* batch scratch: the worker's own */
    size_t msgs_cap;
    pp_wstats stats;
};

struct pp_pool {
    pthread_mutex_t mu;
    pthread_cond_t exited;      /* signalled when live drops to 0 */
    pp_task *head, *tail;       /* queued tasks, guarded by mu */
    size_t queued;              /* guarded by mu; mirrored in nqueued */
    atomic_size_t nqueued;      /* for lock-free reads by the producer */
    pp_worker *idle;            /* sleeping workers, guarded by mu */
    int stopping;               /* guarded by mu: exit once the queue is empty */
    int abandon;                /* guarded by mu: exit, dropping queued tasks */
    int live;                   /* guarded by mu: started and not yet exited */
    int orphaned;               /* guarded by mu: last worker out frees all */
    int nthreads;
    int started;                /* threads created */
    int joined;
    pp_worker *workers;
    pp_task_fn run;
    void *arg;
    void (*orphan_free)(void *arg); /* called by the last orphaned worker */
    void (*thread_exit)(void *arg); /* called by each worker as it exits */
};

/* Prepares nthreads workers; starts none.  Returns 0 or -ENOMEM/-errno. */
int pp__pool_init(pp_pool *p, int nthreads, pp_task_fn run, void *arg);

/* Starts the threads with SIGINT and SIGTERM blocked, so that only the I/O
 * thread's wake-up path ever sees them.  Returns 0 or -errno; on failure
 * the threads already started are stopped and joined. */
int pp__pool_start(pp_pool *p);

/* Queues the n tasks linked from head to tail through next, with one lock
 * and at most n wake-ups.  Any thread. */
void pp__pool_push(pp_pool *p, pp_task *head, pp_task *tail, size_t n);

/* Tasks queued and not yet taken; exact only when no worker runs. */
size_t pp__pool_queued(pp_pool *p);

/* Tells the workers to exit once the queue is empty (abandon = 0) or after
 * their current task, dropping queued ones (abandon = 1), and waits up to
 * timeout_ms (< 0: forever) for them.  Returns 0 when all were joined, 1
 * when some are still running a task. */
int pp__pool_stop(pp_pool *p, int abandon, int timeout_ms);

/* Joins the workers if every one has exited and returns 1: the caller then
 * calls pp__pool_destroy().  Otherwise marks the pool orphaned, detaches the
 * threads, and returns 0: the last worker to exit then calls
 * orphan_free(arg) (set it after pp__pool_init(), which clears the struct),
 * which must destroy the pool and free its memory with the rest. */
int pp__pool_release(pp_pool *p);

/* Nonzero when the calling thread is one of p's workers.  Any thread. */
int pp__pool_on_worker(const pp_pool *p);

/* Frees what pp__pool_init() allocated; only once no worker can run. */
void pp__pool_destroy(pp_pool *p);

/* Nonzero unless POLLPOOL_NO_SCHED_BATCH is set: run the pool and the I/O
 * thread with SCHED_BATCH (no wake-up preemption among them). */
int pp__sched_batch_wanted(void);

/* Fetch-free counter update for a counter with one writer. */
static inline void pp__stat_add(_Atomic uint64_t *c, uint64_t n)
{
    atomic_store_explicit(c, atomic_load_explicit(c, memory_order_relaxed) + n,
                          memory_order_relaxed);
}

#endif
