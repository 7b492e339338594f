/* test_pool.c - the worker pool and its task queue on their own, with a
 * counting task function in place of the server's. */
#include <errno.h>
#include <pthread.h>
#include <semaphore.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "check.h"
#include "pool.h"

static int scale_pct(void)
{
    const char *s = getenv("PP_TEST_SCALE");
    int v = s ? atoi(s) : 100;
    return v > 0 ? v : 100;
}


typedef struct job {
    pp_task link;                 /* first, so a pp_task * is a job * */
    size_t id;
    int block;                    /* wait on the gate before finishing */
} job;

typedef struct counter {
    _Atomic uint32_t *runs;       /* per job id */
    atomic_size_t done;
    atomic_int bad_worker;        /* a task ran with a w that is not a worker */
    atomic_int signals_unblocked; /* a worker could receive SIGINT/SIGTERM */
    pp_pool *pool;
    sem_t entered;                /* posted by a blocking job once it runs */
    sem_t gate;                   /* blocking jobs wait here */
    atomic_int use_scratch;       /* tasks use w->msgs as the server's do */
} counter;

static void run_job(void *arg, pp_worker *w, pp_task *t)
{
    counter *c = arg;
    job *j = (job *)t;
    if (w == NULL || w->pool != c->pool)
        atomic_store(&c->bad_worker, 1);
    if (atomic_load_explicit(&c->use_scratch, memory_order_relaxed)) {
        /* Batch scratch belongs to the worker, as in reply.c. */
        if (w->msgs_cap < 4) {
            pp_msg *m = realloc(w->msgs, 4 * sizeof *m);
            CHECK(m);
            w->msgs = m;
            w->msgs_cap = 4;
        }
        w->msgs[0].len = j->id;
    }
    if (j->block) {
        sem_post(&c->entered);
        while (sem_wait(&c->gate) != 0)
            CHECK(errno == EINTR);
    }
    atomic_fetch_add(&c->runs[j->id], 1);
    atomic_fetch_add(&c->done, 1);
}

static void run_check_mask(void *arg, pp_worker *w, pp_task *t)
{
    counter *c = arg;
    sigset_t cur;
    pthread_sigmask(SIG_SETMASK, NULL, &cur);
    if (!sigismember(&cur, SIGINT) || !sigismember(&cur, SIGTERM))
        atomic_store(&c->signals_unblocked, 1);
    run_job(arg, w, t);
}

static counter *counter_new(size_t n)
{
    counter *c = calloc(1, sizeof *c);
    CHECK(c);
    c->runs = calloc(n ? n : 1, sizeof *c->runs);
    CHECK(c->runs);
    CHECK(sem_init(&c->entered, 0, 0) == 0);
    CHECK(sem_init(&c->gate, 0, 0) == 0);
    return c;
}

static void counter_free(counter *c)
{
    sem_destroy(&c->entered);
    sem_destroy(&c->gate);
    free(c->runs);
    free(c);
}

static void sem_wait_timeout(sem_t *s, int ms)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    ts.tv_sec += ms / 1000;
    ts.tv_nsec += (long)(ms % 1000) * 1000000L;
    if (ts.tv_nsec >= 1000000000L) {
        ts.tv_sec++;
        ts.tv_nsec -= 1000000000L;
    }
    int rc;
    while ((rc = sem_timedwait(s, &ts)) != 0 && errno == EINTR)
        ;
    CHECKF(rc == 0, "semaphore not posted within %d ms", ms);
}

static void wait_done(counter *c, size_t n, int ms)
{
    int64_t until = now_ms() + ms;
    while (atomic_load(&c->done) < n) {
        CHECKF(now_ms() < until, "only %zu of %zu tasks ran within %d ms",
               atomic_load(&c->done), n, ms);
        sleep_ms(1);
    }
}

static void check_each_once(counter *c, size_t n)
{
    for (size_t i = 0; i < n; i++)
        CHECKF(atomic_load(&c->runs[i]) == 1, "task %zu ran %u times", i,
               (unsigned)atomic_load(&c->runs[i]));
    CHECK(!atomic_load(&c->bad_worker));
}

/* Links jobs[from..from+n) and pushes them as one batch. */
static void push_range(pp_pool *p, job *jobs, size_t from, size_t n)
{
    for (size_t i = 0; i + 1 < n; i++)
        jobs[from + i].link.next = &jobs[from + i + 1].link;
    pp__pool_push(p, &jobs[from].link, &jobs[from + n - 1].link, n);
}

static job *jobs_new(size_t n)
{
    job *j = calloc(n, sizeof *j);
    CHECK(j);
    for (size_t i = 0; i < n; i++)
        j[i].id = i;
    return j;
}

static void test_init_rejects(void)
{
    pp_pool p;
    CHECK_EQ(pp__pool_init(&p, 0, run_job, NULL), -EINVAL);
    CHECK_EQ(pp__pool_init(&p, -3, run_job, NULL), -EINVAL);
    /* A pool that was never started stops, releases and is destroyed. */
    CHECK_EQ(pp__pool_init(&p, 3, run_job, NULL), 0);
    CHECK_EQ(pp__pool_stop(&p, 0, -1), 0);
    CHECK_EQ(pp__pool_release(&p), 1);
    pp__pool_destroy(&p);
    pp__pool_destroy(&p);                 /* idempotent */
}

/* One producer pushes batches of random size; every task runs exactly once,
 * on a worker of this pool whose SIGINT and SIGTERM are blocked, and the
 * producer's own signal mask is left as it was. */
static void test_batches_exactly_once(void)
{
    size_t n = (size_t)100000 * (size_t)scale_pct() / 100;
    counter *c = counter_new(n);
    job *jobs = jobs_new(n);
    pp_pool p;
    c->pool = &p;
    CHECK_EQ(pp__pool_init(&p, 4, run_check_mask, c), 0);
    sigset_t before, after;
    pthread_sigmask(SIG_SETMASK, NULL, &before);
    CHECK(!sigismember(&before, SIGINT));
    CHECK_EQ(pp__pool_start(&p), 0);
    pthread_sigmask(SIG_SETMASK, NULL, &after);
    CHECK(!sigismember(&after, SIGINT) && !sigismember(&after, SIGTERM));

    uint64_t rng = 11;
    size_t i = 0;
    while (i < n) {
        size_t k = (size_t)check_range(&rng, 1, 64);
        if (k > n - i)
            k = n - i;
        push_range(&p, jobs, i, k);
        i += k;
        if (check_rand(&rng) % 64 == 0)
            sleep_ms(1);                  /* let workers go idle, then wake them */
    }
    wait_done(c, n, 30000);
    CHECK_EQ(pp__pool_stop(&p, 0, -1), 0);
    CHECK_EQ(pp__pool_queued(&p), 0);
    CHECK_EQ(pp__pool_release(&p), 1);
    pp__pool_destroy(&p);
    check_each_once(c, n);
    CHECK(!atomic_load(&c->signals_unblocked));
    free(jobs);
    counter_free(c);
}

/* Many tiny tasks, 8 workers, pushed one at a time and in batches by
 * several producers at once (push is documented as callable from any
 * thread). */
typedef struct producer {
    pp_pool *p;
    job *jobs;
    size_t from, n;
    uint64_t seed;
} producer;

static void *producer_main(void *arg)
{
    producer *pr = arg;
    uint64_t rng = pr->seed;
    size_t i = 0;
    while (i < pr->n) {
        size_t k = check_rand(&rng) % 2 ? 1 : (size_t)check_range(&rng, 1, 32);
        if (k > pr->n - i)
            k = pr->n - i;
        push_range(pr->p, pr->jobs, pr->from + i, k);
        i += k;
    }
    return NULL;
}

static void test_stress_tiny_tasks(void)
{
    size_t per = (size_t)50000 * (size_t)scale_pct() / 100, nprod = 4, n = per * nprod;
    for (int round = 0; round < 3; round++) {
        counter *c = counter_new(n);
        job *jobs = jobs_new(n);
        pp_pool p;
        c->pool = &p;
        atomic_store(&c->use_scratch, 1);
        CHECK_EQ(pp__pool_init(&p, 8, run_job, c), 0);
        CHECK_EQ(pp__pool_start(&p), 0);
        pthread_t tid[4];
        producer pr[4];
        for (size_t k = 0; k < nprod; k++) {
            pr[k] = (producer){&p, jobs, k * per, per, 100 + k + (uint64_t)round * 10};
            CHECK(pthread_create(&tid[k], NULL, producer_main, &pr[k]) == 0);
        }
        for (size_t k = 0; k < nprod; k++)
            pthread_join(tid[k], NULL);
        /* Stop without waiting for completion first: a graceful stop must
         * still run everything already queued. */
        CHECK_EQ(pp__pool_stop(&p, 0, -1), 0);
        CHECK_EQ(atomic_load(&c->done), n);
        CHECK_EQ(pp__pool_release(&p), 1);
        pp__pool_destroy(&p);
        check_each_once(c, n);
        free(jobs);
        counter_free(c);
    }
}

/* Tasks queued before the threads exist run once they start; the queue
 * count is exact while no worker runs. */
static void test_queued_before_start(void)
{
    size_t n = 500;
    counter *c = counter_new(n);
    job *jobs = jobs_new(n);
    pp_pool p;
    c->pool = &p;
    CHECK_EQ(pp__pool_init(&p, 2, run_job, c), 0);
    push_range(&p, jobs, 0, 200);
    push_range(&p, jobs, 200, 300);
    CHECK_EQ(pp__pool_queued(&p), 500);
    CHECK_EQ(pp__pool_start(&p), 0);
    CHECK_EQ(pp__pool_stop(&p, 0, -1), 0);
    CHECK_EQ(pp__pool_queued(&p), 0);
    check_each_once(c, n);
    CHECK_EQ(pp__pool_release(&p), 1);
    pp__pool_destroy(&p);
    free(jobs);
    counter_free(c);
}

/* stop(abandon = 0) with a timeout returns 1 while workers are busy, and
 * the workers still run every queued task before exiting; a second stop
 * then joins them. */
static void test_graceful_stop_drains_queue(void)
{
    size_t nblock = 2, n = 2000;
    counter *c = counter_new(n);
    job *jobs = jobs_new(n);
    for (size_t i = 0; i < nblock; i++)
        jobs[i].block = 1;
    pp_pool p;
    c->pool = &p;
    CHECK_EQ(pp__pool_init(&p, 2, run_job, c), 0);
    CHECK_EQ(pp__pool_start(&p), 0);
    push_range(&p, jobs, 0, nblock);
    for (size_t i = 0; i < nblock; i++)
        sem_wait_timeout(&c->entered, 10000);       /* both workers are stuck */
    push_range(&p, jobs, nblock, n - nblock);
    CHECK_EQ(pp__pool_queued(&p), n - nblock);
    int64_t t0 = now_ms();
    CHECK_EQ(pp__pool_stop(&p, 0, 150), 1);
    int64_t waited = now_ms() - t0;
    CHECKF(waited >= 100 && waited < 5000, "stop waited %lld ms", (long long)waited);
    CHECK_EQ(atomic_load(&c->done), 0);
    for (size_t i = 0; i < nblock; i++)
        sem_post(&c->gate);
    CHECK_EQ(pp__pool_stop(&p, 0, -1), 0);
    CHECK_EQ(atomic_load(&c->done), n);             /* nothing dropped */
    check_each_once(c, n);
    CHECK_EQ(pp__pool_release(&p), 1);
    pp__pool_destroy(&p);
    free(jobs);
    counter_free(c);
}

/* A timed stop returns 0 once idle workers exit, long before the timeout. */
static void test_stop_idle_is_prompt(void)
{
    counter *c = counter_new(1);
    pp_pool p;
    c->pool = &p;
    CHECK_EQ(pp__pool_init(&p, 6, run_job, c), 0);
    CHECK_EQ(pp__pool_start(&p), 0);
    sleep_ms(20);                                   /* let them all go idle */
    int64_t t0 = now_ms();
    CHECK_EQ(pp__pool_stop(&p, 0, 20000), 0);
    CHECK(now_ms() - t0 < 5000);
    CHECK_EQ(pp__pool_release(&p), 1);
    pp__pool_destroy(&p);
    counter_free(c);
}

/* thread_exit runs once on every worker thread, on that thread, as it exits
 * (the Python glue frees the thread's interpreter state there). */
static _Atomic int exits;
static _Thread_local int ran_here;
static void count_exit(void *arg)
{
    (void)arg;
    CHECK(!ran_here);
    ran_here = 1;
    atomic_fetch_add(&exits, 1);
}

static void test_thread_exit_hook(void)
{
    counter *c = counter_new(1);
    pp_pool p;
    c->pool = &p;
    CHECK_EQ(pp__pool_init(&p, 5, run_job, c), 0);
    p.thread_exit = count_exit;
    atomic_store(&exits, 0);
    CHECK_EQ(pp__pool_start(&p), 0);
    CHECK_EQ(pp__pool_stop(&p, 0, -1), 0);
    CHECK_EQ(atomic_load(&exits), 5);
    CHECK_EQ(pp__pool_release(&p), 1);
    pp__pool_destroy(&p);
    counter_free(c);
}

/* The abandon path, as after a forced server stop: workers stuck in a
 * handler outlive the owner.  stop(abandon = 1, timeout) returns 1;
 * release() returns 0 and hands the pool to the workers; queued tasks are
 * dropped; once every stuck task returns, the last worker out calls
 * orphan_free exactly once, and it frees everything (ASan/LSan/valgrind
 * check that nothing leaks and nothing is touched after). */
typedef struct orphan_ctx {
    counter *c;
    pp_pool *pool;
    job *jobs;
    atomic_int calls;
    sem_t freed;
} orphan_ctx;

static orphan_ctx *g_orphan;

static void orphan_run(void *arg, pp_worker *w, pp_task *t)
{
    orphan_ctx *o = arg;
    run_job(o->c, w, t);
}

static void orphan_free(void *arg)
{
    orphan_ctx *o = arg;
    CHECK(o == g_orphan);
    atomic_fetch_add(&o->calls, 1);
    pp__pool_destroy(o->pool);
    free(o->pool);
    sem_post(&o->freed);
}

static void test_abandon_orphan(int nworkers, int round)
{
    size_t nblock = (size_t)nworkers, n = nblock + 100;
    orphan_ctx *o = calloc(1, sizeof *o);
    CHECK(o);
    g_orphan = o;
    CHECK(sem_init(&o->freed, 0, 0) == 0);
    o->c = counter_new(n);
    o->jobs = jobs_new(n);
    for (size_t i = 0; i < nblock; i++)
        o->jobs[i].block = 1;
    pp_pool *p = malloc(sizeof *p);
    CHECK(p);
    o->pool = p;
    o->c->pool = p;
    atomic_store(&o->c->use_scratch, round % 2);
    CHECK_EQ(pp__pool_init(p, nworkers, orphan_run, o), 0);
    p->orphan_free = orphan_free;
    CHECK_EQ(pp__pool_start(p), 0);
    push_range(p, o->jobs, 0, nblock);
    for (size_t i = 0; i < nblock; i++)
        sem_wait_timeout(&o->c->entered, 10000);
    push_range(p, o->jobs, nblock, n - nblock);      /* will be abandoned */

    CHECK_EQ(pp__pool_stop(p, 1, 50), 1);
    CHECK_EQ(pp__pool_release(p), 0);
    /* p now belongs to the workers: the test must not touch it again. */
    sleep_ms(5);
    CHECK_EQ(atomic_load(&o->calls), 0);             /* not while tasks still run */
    for (size_t i = 0; i < nblock; i++)
        sem_post(&o->c->gate);                        /* all at once: race to exit */
    sem_wait_timeout(&o->freed, 10000);
    sleep_ms(20);                                     /* a second call would land here */
    CHECK_EQ(atomic_load(&o->calls), 1);
    CHECK_EQ(atomic_load(&o->c->done), nblock);       /* queued tasks were dropped */
    for (size_t i = nblock; i < n; i++)
        CHECKF(atomic_load(&o->c->runs[i]) == 0, "abandoned task %zu ran", i);
    free(o->jobs);
    counter_free(o->c);
    sem_destroy(&o->freed);
    free(o);
    g_orphan = NULL;
}

/* abandon = 1 with idle workers: all exit at once, nothing queued runs. */
static void test_abandon_idle(void)
{
    size_t n = 50;
    counter *c = counter_new(n);
    job *jobs = jobs_new(n);
    pp_pool p;
    c->pool = &p;
    CHECK_EQ(pp__pool_init(&p, 3, run_job, c), 0);
    push_range(&p, jobs, 0, n);                      /* queued before start */
    /* Stopping with abandon before start: nothing may run, nothing leaks. */
    CHECK_EQ(pp__pool_stop(&p, 1, -1), 0);
    CHECK_EQ(pp__pool_release(&p), 1);
    pp__pool_destroy(&p);
    CHECK_EQ(atomic_load(&c->done), 0);
    free(jobs);
    counter_free(c);
}

int main(void)
{
    alarm(90);
    test_init_rejects();
    test_queued_before_start();
    test_batches_exactly_once();
    test_stress_tiny_tasks();
    test_graceful_stop_drains_queue();
    test_stop_idle_is_prompt();
    test_thread_exit_hook();
    test_abandon_idle();
    for (int round = 0; round < 20; round++)
        test_abandon_orphan(round % 3 + 2, round);
    printf("test_pool: all passed\n");
    return 0;
}
