/* server.c - creating, running, stopping and freeing a server. */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <unistd.h>
#ifdef __linux__
#include <sys/eventfd.h>
#endif

#include "core.h"

/* Input a connection may hold beyond one largest frame: pipelined messages. */
#define PP_IN_SLACK (64 * 1024)

void pp_config_init(pp_config *cfg)
{
    memset(cfg, 0, sizeof *cfg);
    cfg->host = "127.0.0.1";
    cfg->port = 9000;
    cfg->backlog = 1024;
    cfg->threads = 4;
    cfg->queue_size = 4096;
    cfg->framing = PP_FRAMING_LINE;
    cfg->delimiter[0] = '\n';
    cfg->delimiter_len = 1;
    cfg->header_bytes = 4;
    cfg->max_message_size = 1 << 20;
    cfg->output_high_water = 4 << 20;
    cfg->drain_timeout = 10.0;
    cfg->send_timeout = 60.0;
    cfg->output_limit = 64 << 20;
    cfg->push_limit = 1 << 20;
    cfg->push_overflow = PP_PUSH_CLOSE;
    cfg->handler = pp_handler_echo;
}

static int validate(const pp_config *cfg)
{
    if (cfg->port < 0 || cfg->port > 65535 || cfg->threads < 1 ||
        cfg->threads > 1024 || cfg->output_high_water == 0 ||
        !(cfg->drain_timeout >= 0.0) || cfg->drain_timeout > 86400.0 * 365)
        return -EINVAL;
    if ((cfg->handler == NULL) == (cfg->batch == NULL))
        return -EINVAL;
    if (cfg->shutdown_message_len && cfg->shutdown_message == NULL)
        return -EINVAL;
    if (cfg->reject_message_len && cfg->reject_message == NULL)
        return -EINVAL;
    if (!(cfg->idle_timeout >= 0.0) || !(cfg->send_timeout >= 0.0) ||
        cfg->idle_timeout > 86400.0 * 365 || cfg->send_timeout > 86400.0 * 365 ||
        !(cfg->reply_timeout >= 0.0) || cfg->reply_timeout > 86400.0 * 365)
        return -EINVAL;
    if (pp_backend_name(cfg->backend) == NULL)
        return -EINVAL;
    if (cfg->push_overflow != PP_PUSH_CLOSE && cfg->push_overflow != PP_PUSH_DROP)
        return -EINVAL;
    if (cfg->max_deferred > PP_MAX_DEFERRED || (cfg->max_deferred > 1 && cfg->batch))
        return -EINVAL; /* a batch handler defers once per call */
    if (!(cfg->proxy_timeout >= 0.0) || cfg->proxy_timeout > 86400.0 ||
        (cfg->ntrusted_proxies && cfg->trusted_proxies == NULL))
        return -EINVAL;
    if (cfg->nlisten_fds > PP_MAX_LISTENERS || (cfg->nlisten_fds && cfg->listen_fds == NULL))
        return -EINVAL;
    for (size_t i = 0; i < cfg->nlisten_fds; i++)
        if (cfg->listen_fds[i] < 0)
            return -EBADF;
    if (!(cfg->drain_delay >= 0.0) || cfg->drain_delay > 86400.0 ||
        !(cfg->drain_grace >= 0.0) || cfg->drain_grace > 86400.0 || cfg->health_fd < 0)
        return -EINVAL;
    for (size_t i = 0; i < cfg->ntrusted_proxies; i++) {
        const pp_cidr *n = &cfg->trusted_proxies[i];
        if ((n->family != AF_INET && n->family != AF_INET6) || n->prefix < 0 ||
            n->prefix > (n->family == AF_INET ? 32 : 128))
            return -EINVAL;
    }
    return 0;
}

static const pp_backend *backend_of(int backend)
{
    switch (backend) {
    case PP_BACKEND_POLL:
        return &pp__backend_poll;
#ifdef __linux__
    case PP_BACKEND_EPOLL:
        return &pp__backend_epoll;
#endif
    default:
        return NULL;
    }
}

const char *pp_backend_name(int backend)
{
    const pp_backend *bk = backend_of(backend);
    return bk ? bk->name : NULL;
}

static int wake_open(pp_server *srv)
{
#ifdef __linux__
    int fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (fd < 0)
        return -errno;
    srv->wake_rd = srv->wake_wr = fd;
#else
    int p[2];
    if (pipe(p) < 0)
        return -errno;
    for (int i = 0; i < 2; i++) {
        fcntl(p[i], F_SETFL, fcntl(p[i], F_GETFL) | O_NONBLOCK);
        fcntl(p[i], F_SETFD, FD_CLOEXEC);
    }
    srv->wake_rd = p[0];
    srv->wake_wr = p[1];
#endif
    return 0;
}

static void wake_close(pp_server *srv)
{
    if (srv->wake_rd >= 0)
        close(srv->wake_rd);
    if (srv->wake_wr >= 0 && srv->wake_wr != srv->wake_rd)
        close(srv->wake_wr);
    srv->wake_rd = srv->wake_wr = -1;
}

/* Raises the soft fd limit to the hard one: a server's connection count is
 * bounded by it, and the default soft limit (1024) is far below what the
 * hard limit allows.  Returns the limit now in force. */
static long raise_fd_limit(void)
{
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) < 0)
        return -1;
    if (rl.rlim_cur < rl.rlim_max) {
        struct rlimit want = rl;
        want.rlim_cur = rl.rlim_max;
        if (setrlimit(RLIMIT_NOFILE, &want) == 0)
            rl = want;
    }
    return rl.rlim_cur == RLIM_INFINITY ? -1 : (long)rl.rlim_cur;
}

long pp_server_fd_limit(const pp_server *srv)
{
    return srv->fd_limit;
}

static void orphan_free(void *arg)
{
    pp__server_destroy(arg);
}

static void worker_exit(void *arg)
{
    pp_server *srv = arg;
    pp__deferred_thread_exit();
    if (srv->cfg.worker_exit)
        srv->cfg.worker_exit(srv->cfg.ctx);
}

int pp_server_new(const pp_config *cfg, pp_server **out)
{
    int rc = validate(cfg);
    if (rc < 0)
        return rc;
    pp_server *srv = calloc(1, sizeof *srv);
    if (srv == NULL)
        return -ENOMEM;
    srv->cfg = *cfg;
    srv->wake_rd = srv->wake_wr = -1;
    srv->epfd = -1;
    for (int i = 0; i < PP_MAX_LISTENERS; i++)
        srv->listen_fd[i] = -1;
    srv->health_fd = -1;
    srv->bk = backend_of(cfg->backend);
    pp__list_init(&srv->fired);
    pp__list_init(&srv->pending);
    pp__list_init(&srv->conns);
    pp__list_init(&srv->ready);
    pp__list_init(&srv->idle_list);
    pp__list_init(&srv->send_list);
    pp__list_init(&srv->linger_list);
    pp__list_init(&srv->defer_list);
    pp__list_init(&srv->proxy_list);
    pp__list_init(&srv->push_ready);
    pp__list_init(&srv->registry);
    srv->idle_ms = (int64_t)(cfg->idle_timeout * 1000.0);
    srv->stall_ms = (int64_t)(cfg->send_timeout * 1000.0);
    /* A timeout below a millisecond still means one. */
    if (srv->idle_ms == 0 && cfg->idle_timeout > 0.0)
        srv->idle_ms = 1;
    if (srv->stall_ms == 0 && cfg->send_timeout > 0.0)
        srv->stall_ms = 1;
    srv->reply_ms = (int64_t)(cfg->reply_timeout * 1000.0);
    if (srv->reply_ms == 0 && cfg->reply_timeout > 0.0)
        srv->reply_ms = 1;
    srv->max_deferred = cfg->max_deferred > 1 ? cfg->max_deferred : 1;
    srv->proxy_ms = cfg->proxy_timeout > 0.0 ? (int64_t)(cfg->proxy_timeout * 1000.0) : 5000;
    if (srv->proxy_ms == 0)
        srv->proxy_ms = 1;
    if (srv->cfg.backlog <= 0)
        srv->cfg.backlog = 1024;
    if (srv->cfg.queue_size == 0)
        srv->cfg.queue_size = 4096;
    /* The host string is the caller's; keep only what the bind needs now. */
    srv->cfg.host = NULL;
    srv->cfg.shutdown_message = NULL;
    srv->cfg.reject_message = NULL;
    srv->cfg.trusted_proxies = NULL;
    if (cfg->ntrusted_proxies) {
        srv->trusted = malloc(cfg->ntrusted_proxies * sizeof *srv->trusted);
        if (srv->trusted == NULL) {
            rc = -ENOMEM;
            goto fail;
        }
        memcpy(srv->trusted, cfg->trusted_proxies,
               cfg->ntrusted_proxies * sizeof *srv->trusted);
    }
    if ((rc = pp__framing_init(&srv->framing, cfg)) < 0)
        goto fail;
    if ((rc = pthread_mutex_init(&srv->push_mu, NULL)) != 0) {
        rc = -rc;
        goto fail;
    }
    srv->push_mu_init = 1;
    pp__push_services_init(srv);
    if ((rc = pp__hub_new(srv)) < 0)
        goto fail;
    /* Room for one largest frame plus its framing, and some pipelining;
     * saturated, so that a max_size near SIZE_MAX means "no limit" rather
     * than wrapping to a limit below the frames it allows. */
    srv->in_limit = srv->framing.max_size > SIZE_MAX - (PP_IN_SLACK + PP_MAX_DELIMITER)
                        ? SIZE_MAX
                        : srv->framing.max_size + PP_MAX_DELIMITER + PP_IN_SLACK;
    if (cfg->shutdown_message != NULL) {
        srv->shutdown_msg = malloc(cfg->shutdown_message_len ? cfg->shutdown_message_len : 1);
        if (srv->shutdown_msg == NULL) {
            rc = -ENOMEM;
            goto fail;
        }
        memcpy(srv->shutdown_msg, cfg->shutdown_message, cfg->shutdown_message_len);
    }
    if (cfg->reject_message != NULL) {
        pp_buf b = {0};
        if ((rc = pp__frame_append(&srv->framing, &b, cfg->reject_message,
                                   cfg->reject_message_len)) < 0) {
            pp__buf_free(&b);
            goto fail;
        }
        srv->reject_msg = b.data; /* off is 0: nothing was consumed */
        srv->reject_len = b.len;
    }
    srv->fd_limit = raise_fd_limit();
    if ((rc = pp__pool_init(&srv->pool, cfg->threads, pp__task_run, srv)) < 0)
        goto fail;
    srv->pool.orphan_free = orphan_free;
    srv->pool.thread_exit = worker_exit;
    if ((rc = wake_open(srv)) < 0)
        goto fail_pool;
    srv->cfg.host = cfg->host;
    rc = cfg->nlisten_fds ? pp__listen_fds(srv, cfg->listen_fds, cfg->nlisten_fds)
                          : pp__listen(srv);
    srv->cfg.host = NULL;
    if (rc < 0)
        goto fail_wake;
    if (cfg->health_fd > 0 && (rc = pp__health_open(srv, cfg->health_fd)) < 0)
        goto fail_listen;
    if ((rc = srv->bk->init(srv)) < 0)
        goto fail_listen;
    srv->wake_w = (pp_watch){.fd = srv->wake_rd, .want = POLLIN, .kind = PP_W_WAKE};
    if ((rc = srv->bk->add(srv, &srv->wake_w)) < 0)
        goto fail_backend;
    for (int i = 0; i < srv->nlisten; i++) {
        srv->listen_w[i] = (pp_watch){.fd = srv->listen_fd[i], .want = POLLIN,
                                      .kind = PP_W_LISTEN, .index = (unsigned char)i};
        if ((rc = srv->bk->add(srv, &srv->listen_w[i])) < 0)
            goto fail_backend;
    }
    if (srv->health_fd >= 0) {
        srv->health_w = (pp_watch){.fd = srv->health_fd, .want = POLLIN, .kind = PP_W_HEALTH};
        if ((rc = srv->bk->add(srv, &srv->health_w)) < 0)
            goto fail_backend;
    }
    *out = srv;
    return 0;

fail_backend:
    srv->bk->destroy(srv);
fail_listen:
    pp__listen_close(srv);
fail_wake:
    wake_close(srv);
fail_pool:
    pp__pool_destroy(&srv->pool);
fail:
    if (srv->push_mu_init)
        pthread_mutex_destroy(&srv->push_mu);
    pp__hub_release(srv);
    free(srv->shutdown_msg);
    free(srv->reject_msg);
    free(srv->trusted);
    free(srv);
    return rc;
}

int pp_server_address(const pp_server *srv, char *host, size_t hostlen, int *port)
{
    if (srv->nlisten == 0 || srv->listen_fd[0] < 0)
        return -EBADF;
    struct sockaddr_storage ss;
    socklen_t sl = sizeof ss;
    if (getsockname(srv->listen_fd[0], (struct sockaddr *)&ss, &sl) < 0)
        return -errno;
    const void *addr;
    if (ss.ss_family == AF_INET) {
        addr = &((struct sockaddr_in *)&ss)->sin_addr;
        *port = ntohs(((struct sockaddr_in *)&ss)->sin_port);
    } else if (ss.ss_family != AF_INET6) {
        return -EAFNOSUPPORT; /* a Unix socket: its path is the caller's */
    } else {
        addr = &((struct sockaddr_in6 *)&ss)->sin6_addr;
        *port = ntohs(((struct sockaddr_in6 *)&ss)->sin6_port);
    }
    if (inet_ntop(ss.ss_family, addr, host, (socklen_t)hostlen) == NULL)
        return -errno;
    return 0;
}

int pp_server_start_workers(pp_server *srv)
{
    if (srv->pool.started)
        return 0;
    return pp__pool_start(&srv->pool);
}

int pp_server_run(pp_server *srv)
{
    int expected = 0;
    if (!atomic_compare_exchange_strong(&srv->running, &expected, 1))
        return -EALREADY;
    int rc = pp_server_start_workers(srv);
    if (rc == 0) {
        /* The I/O thread, like the workers, runs SCHED_BATCH: a peer's data
         * arriving while a worker runs on the same core then waits for the
         * worker to finish its batch instead of preempting it, and the next
         * poll() round finds many ready sockets rather than one.  Measured:
         * 15% less server CPU per request with one core for the server.
         * The caller's policy is restored after. */
        int policy = SCHED_OTHER, batch = pp__sched_batch_wanted();
        struct sched_param saved = {0}, sp = {0};
        if (batch && pthread_getschedparam(pthread_self(), &policy, &saved) == 0 &&
            policy == SCHED_OTHER)
            pthread_setschedparam(pthread_self(), SCHED_BATCH, &sp);
        else
            batch = 0;
        rc = pp__loop_run(srv);
        if (batch)
            pthread_setschedparam(pthread_self(), policy, &saved);
        /* Graceful: no task is left, so the workers exit at once.  Forced:
         * the queue is dropped; a worker stuck in a handler is left behind. */
        if (srv->forcing || rc < 0)
            pp__pool_stop(&srv->pool, 1, 50);
        else
            pp__pool_stop(&srv->pool, 0, -1);
    }
    atomic_store(&srv->finished, 1);
    return rc;
}

static void *io_main(void *arg)
{
    pp_server *srv = arg;
    pp_server_run(srv);
    return NULL;
}

int pp_server_start(pp_server *srv)
{
    if (srv->io_thread_started || atomic_load(&srv->running))
        return -EALREADY;
    sigset_t block, old;
    sigemptyset(&block);
    sigaddset(&block, SIGINT);
    sigaddset(&block, SIGTERM);
    pthread_sigmask(SIG_BLOCK, &block, &old);
    int rc = pthread_create(&srv->io_thread, NULL, io_main, srv);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (rc != 0)
        return -rc;
    srv->io_thread_started = 1;
    return 0;
}

int pp_server_join(pp_server *srv)
{
    if (!srv->io_thread_started)
        return -ESRCH;
    int rc = pthread_join(srv->io_thread, NULL);
    srv->io_thread_started = 0;
    return -rc;
}

void pp_server_stop(pp_server *srv, int force)
{
    int want = force ? 2 : 1;
    int cur = atomic_load(&srv->stop_level);
    while (cur < want && !atomic_compare_exchange_weak(&srv->stop_level, &cur, want))
        ;
    pp__loop_wake(srv);
}

void pp_server_retire(pp_server *srv)
{
    atomic_store(&srv->retiring, 1); /* read by the loop once it sees the stop */
    pp_server_stop(srv, 0);
}

int pp_server_on_worker(const pp_server *srv)
{
    return pp__pool_on_worker(&srv->pool);
}

int pp_server_done(const pp_server *srv)
{
    return atomic_load(&srv->finished);
}

int pp_server_was_forced(const pp_server *srv)
{
    return atomic_load(&srv->forced);
}

void pp_server_stats(const pp_server *srv, pp_stats *s)
{
#define PP_LD(x) atomic_load_explicit(&(x), memory_order_relaxed)
    memset(s, 0, sizeof *s);
    const pp_iostats *io = &srv->stats;
    s->accepted = PP_LD(io->accepted);
    s->closed = PP_LD(io->closed);
    int64_t active = atomic_load(&srv->active);
    s->active = active > 0 ? (uint64_t)active : 0;
    s->bytes_in = PP_LD(io->bytes_in);
    s->bytes_out = PP_LD(io->bytes_out);
    s->oversize_frames = PP_LD(io->oversize_frames);
    s->accept_errors = PP_LD(io->accept_errors);
    s->read_errors = PP_LD(io->read_errors);
    s->write_errors = PP_LD(io->write_errors);
    s->accept_paused = PP_LD(io->accept_paused);
    s->forced_closes = PP_LD(io->forced_closes);
    s->nomem_errors = PP_LD(io->nomem_errors);
    s->rejected = PP_LD(io->rejected);
    s->idle_closes = PP_LD(io->idle_closes);
    s->send_timeouts = PP_LD(io->send_timeouts);
    s->output_overflows = PP_LD(io->output_overflows);
    s->pushes = PP_LD(srv->push_stats.pushes);
    s->push_bytes = PP_LD(srv->push_stats.push_bytes);
    s->push_drops = PP_LD(srv->push_stats.push_drops);
    s->push_overflow_closes = PP_LD(srv->push_stats.push_overflow_closes);
    s->wakeups = PP_LD(srv->wakeups);
    s->reply_timeouts = PP_LD(io->reply_timeouts);
    s->proxy_errors = PP_LD(io->proxy_errors);
    s->health_checks = PP_LD(io->health_checks);
    s->deferred_cancelled = PP_LD(io->deferred_cancelled);
    s->handler_errors = PP_LD(io->handler_errors);
    s->replies = PP_LD(io->replies);
    uint64_t retired = PP_LD(io->deferred_retired);
    for (int i = 0; i < srv->pool.nthreads; i++) {
        const pp_wstats *w = &srv->pool.workers[i].stats;
        s->messages += PP_LD(w->messages);
        s->replies += PP_LD(w->replies);
        s->bytes_out += PP_LD(w->bytes_out);
        s->handler_errors += PP_LD(w->handler_errors);
        s->write_errors += PP_LD(w->write_errors);
        s->nomem_errors += PP_LD(w->nomem_errors);
        s->output_overflows += PP_LD(w->output_overflows);
        s->deferred_total += PP_LD(w->deferred_total);
    }
    /* Read apart, the two may cross: a handle is counted as queued at the
     * end of its task, and retired after. */
    s->deferred = s->deferred_total > retired ? s->deferred_total - retired : 0;
#undef PP_LD
}

void pp__server_destroy(pp_server *srv)
{
    pp_link *l;
    while ((l = pp__list_first(&srv->conns)) != NULL) {
        pp__list_unlink(l);
        pp_conn *c = PP_CONTAINER(l, pp_conn, all);
        close(c->fd);
        if (c->def_head != NULL) {
            uint64_t ids[PP_MAX_DEFERRED];
            (void)pp__deferred_drop(srv, c, ids);
        }
        pp__push_unregister(srv, c);
        pp__conn_free(c);
    }
    free(srv->by_id);
    free(srv->topics); /* empty: a topic lives as long as a member */
    pthread_mutex_destroy(&srv->push_mu);
    pp__hub_release(srv);
    srv->bk->destroy(srv);
    pp__listen_close(srv);
    wake_close(srv);
    pp__pool_destroy(&srv->pool);
    free(srv->shutdown_msg);
    free(srv->reject_msg);
    free(srv->trusted);
    free(srv);
}

void pp_server_free(pp_server *srv)
{
    if (srv == NULL)
        return;
    if (srv->io_thread_started) {
        pp_server_stop(srv, 1);
        pp_server_join(srv);
    }
    if (atomic_load(&srv->running) && !atomic_load(&srv->finished))
        abort(); /* freeing a server whose loop runs on another thread */
    /* Workers started for a loop that never ran (its caller was interrupted
     * between the two) wait for tasks that cannot come: stop them, or they
     * would hold the server, and its listening socket, forever. */
    if (!atomic_load(&srv->running))
        pp__pool_stop(&srv->pool, 0, -1);
    if (pp__pool_release(&srv->pool))
        pp__server_destroy(srv);
}
