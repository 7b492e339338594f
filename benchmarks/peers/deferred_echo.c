/*
 * deferred_echo.c - a native pollpool handler that answers every message
 * later, from a thread of its own: pp_reply_defer() in the call, then
 * pp_deferred_write() and pp_deferred_finish() on the finisher thread, the
 * way a handler waiting on another service would.  The benchmark's
 * "pollpool native echo, deferred" (compare.py builds it).
 *
 *   cc -O2 -shared -fPIC -I"$(python -c 'import pollpool; print(pollpool.get_include())')" \
 *      -o deferred_echo.so deferred_echo.c -lpthread
 */
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "pollpool.h"

POLLPOOL_EXPORT_ABI_VERSION;

/* The message is copied: pollpool.h promises it only for the call. */
#define MSG_MAX 256

typedef struct job {
    pp_deferred *d;
    size_t len;
    unsigned char msg[MSG_MAX];
} job;

static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cv = PTHREAD_COND_INITIALIZER;
static job *jobs;
static size_t njobs, cap;
static pthread_once_t once = PTHREAD_ONCE_INIT;

static void *finisher(void *arg)
{
    (void)arg;
    job *mine = NULL;
    size_t mine_cap = 0;
    for (;;) {
        pthread_mutex_lock(&mu);
        while (njobs == 0)
            pthread_cond_wait(&cv, &mu);
        /* Take every job queued: one lock per batch, as a real client
         * library completing many requests per read would. */
        job *t = jobs;
        size_t n = njobs;
        size_t c = cap;
        jobs = mine;
        cap = mine_cap;
        njobs = 0;
        pthread_mutex_unlock(&mu);
        for (size_t i = 0; i < n; i++) {
            pp_deferred_write(t[i].d, t[i].msg, t[i].len);
            pp_deferred_finish(t[i].d, PP_KEEP);
        }
        mine = t;
        mine_cap = c;
    }
    return NULL;
}

static void start(void)
{
    pthread_t t;
    if (pthread_create(&t, NULL, finisher, NULL) == 0)
        pthread_detach(t);
}

POLLPOOL_EXPORT int deferred_echo(void *ctx, const unsigned char *msg, size_t len,
                                  pp_reply *reply)
{
    (void)ctx;
    pthread_once(&once, start);
    if (len > MSG_MAX)
        return -1; /* the benchmark's messages are 64 B */
    pp_deferred *d = pp_reply_defer(reply);
    if (d == NULL)
        return -1;
    pthread_mutex_lock(&mu);
    if (njobs == cap) {
        size_t nc = cap ? cap * 2 : 256;
        job *v = realloc(jobs, nc * sizeof *v);
        if (v == NULL) {
            pthread_mutex_unlock(&mu);
            pp_deferred_finish(d, -1);
            return PP_DEFER;
        }
        jobs = v;
        cap = nc;
    }
    job *j = &jobs[njobs++];
    j->d = d;
    j->len = len;
    memcpy(j->msg, msg, len);
    int first = njobs == 1;
    pthread_mutex_unlock(&mu);
    if (first)
        pthread_cond_signal(&cv); /* after the unlock: the woken finisher takes mu at once */
    return PP_DEFER;
}
