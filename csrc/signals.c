/*
 * signals.c - SIGINT/SIGTERM to a graceful stop, with sigaction.
 *
 * The handler only counts and calls pp_server_stop(), which sets an atomic
 * and writes the wake fd: both async-signal-safe.  The first signal asks for
 * a graceful drain, the second for an immediate stop.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <sched.h>
#include <signal.h>
#include <stdatomic.h>
#include <stddef.h>

#include "core.h"

static _Atomic(pp_server *) sig_server;
static atomic_int sig_count;
static atomic_int sig_inside;       /* handlers running now */
static struct sigaction old_int, old_term;

static void on_signal(int signo)
{
    (void)signo;
    int saved = errno;
    atomic_fetch_add(&sig_inside, 1);
    pp_server *srv = atomic_load(&sig_server);
    if (srv != NULL)
        pp_server_stop(srv, atomic_fetch_add(&sig_count, 1) >= 1);
    atomic_fetch_sub(&sig_inside, 1);
    errno = saved;
}

int pp_signals_install(pp_server *srv)
{
    pp_server *none = NULL;
    if (!atomic_compare_exchange_strong(&sig_server, &none, srv))
        return -EBUSY;
    atomic_store(&sig_count, 0);
    struct sigaction sa = {0};
    sa.sa_handler = on_signal;
    sigemptyset(&sa.sa_mask);
    sigaddset(&sa.sa_mask, SIGINT);
    sigaddset(&sa.sa_mask, SIGTERM);
    /* SA_RESTART spares other threads' syscalls; the loop learns of the
     * signal through its wake fd, not through EINTR. */
    sa.sa_flags = SA_RESTART;
    if (sigaction(SIGINT, &sa, &old_int) < 0) {
        int e = errno;
        atomic_store(&sig_server, NULL);
        return -e;
    }
    if (sigaction(SIGTERM, &sa, &old_term) < 0) {
        int e = errno;
        sigaction(SIGINT, &old_int, NULL);
        atomic_store(&sig_server, NULL);
        return -e;
    }
    return 0;
}

void pp_signals_restore(void)
{
    if (atomic_load(&sig_server) == NULL)
        return;
    sigaction(SIGINT, &old_int, NULL);
    sigaction(SIGTERM, &old_term, NULL);
    atomic_store(&sig_server, NULL);
    /* A handler on another thread may still hold the server pointer; the
     * server must outlive it, so wait the few instructions it needs. */
    while (atomic_load(&sig_inside) > 0)
        sched_yield();
}
