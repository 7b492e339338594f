"""Native handlers that defer (pp_reply_defer) and max_deferred: a C library
compiled at test time finishes its replies on a thread of its own, newest
first, so that with several replies of a connection pending the core has to
put them back in request order."""

from __future__ import annotations

import ctypes
import signal
import socket
import struct
import threading

import pytest

import pollpool
from conftest import Client, wait_closed, wait_stat
from test_native_handlers import ROOT, build

pytestmark = pytest.mark.timeout(120)

SOURCE = r"""
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "pollpool.h"

POLLPOOL_EXPORT_ABI_VERSION;

/* "now:..." is answered in the call, uppercased; anything else is deferred
 * and answered, uppercased, by the finisher thread, which takes every job
 * queued and finishes them newest first.  Per connection it counts the
 * replies pending at once. */
enum { MSG_MAX = 256, IDS = 4096 };
typedef struct job { pp_deferred *d; uint64_t conn; size_t len; unsigned char msg[MSG_MAX]; } job;

static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cv = PTHREAD_COND_INITIALIZER;
static job *jobs;
static size_t njobs, cap;
static int running, stopping;
static pthread_t thread;
static atomic_int pend[IDS];
static atomic_int max_pend;

static void upper(unsigned char *p, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (p[i] >= 'a' && p[i] <= 'z')
            p[i] = (unsigned char)(p[i] - 32);
}

static void *finisher(void *arg)
{
    (void)arg;
    pthread_mutex_lock(&mu);
    for (;;) {
        while (njobs == 0 && !stopping)
            pthread_cond_wait(&cv, &mu);
        if (njobs == 0)
            break;
        /* Let a pipeline's deferrals gather, so that several of one
         * connection are finished in one round, newest first. */
        pthread_mutex_unlock(&mu);
        struct timespec ts = {0, 200000};
        nanosleep(&ts, NULL);
        pthread_mutex_lock(&mu);
        job *t = jobs;
        size_t n = njobs;
        jobs = NULL;
        njobs = cap = 0;
        pthread_mutex_unlock(&mu);
        for (size_t i = n; i-- > 0;) {
            upper(t[i].msg, t[i].len);
            pp_deferred_write(t[i].d, t[i].msg, t[i].len);
            atomic_fetch_sub(&pend[t[i].conn % IDS], 1);
            pp_deferred_finish(t[i].d, PP_KEEP);
        }
        free(t);
        pthread_mutex_lock(&mu);
    }
    pthread_mutex_unlock(&mu);
    return NULL;
}

POLLPOOL_EXPORT int rev(void *ctx, const unsigned char *msg, size_t len, pp_reply *reply)
{
    (void)ctx;
    if (len > MSG_MAX)
        return -1;
    if (len >= 4 && memcmp(msg, "now:", 4) == 0) {
        unsigned char u[MSG_MAX];
        memcpy(u, msg, len);
        upper(u, len);
        return pp_reply_write(reply, u, len) < 0 ? -1 : PP_KEEP;
    }
    pp_deferred *d = pp_reply_defer(reply);
    if (d == NULL)
        return -1;
    uint64_t conn = pp_reply_conn_id(reply);
    int p = atomic_fetch_add(&pend[conn % IDS], 1) + 1;
    int m = atomic_load(&max_pend);
    while (p > m && !atomic_compare_exchange_weak(&max_pend, &m, p))
        ;
    pthread_mutex_lock(&mu);
    if (!running) {
        stopping = 0;
        running = pthread_create(&thread, NULL, finisher, NULL) == 0;
    }
    if (njobs == cap) {
        size_t nc = cap ? cap * 2 : 256;
        job *v = realloc(jobs, nc * sizeof *v);
        if (v == NULL || !running) {
            pthread_mutex_unlock(&mu);
            atomic_fetch_sub(&pend[conn % IDS], 1);
            pp_deferred_finish(d, -1);
            return PP_DEFER;
        }
        jobs = v;
        cap = nc;
    }
    job *j = &jobs[njobs++];
    j->d = d;
    j->conn = conn;
    j->len = len;
    memcpy(j->msg, msg, len);
    pthread_cond_signal(&cv);
    pthread_mutex_unlock(&mu);
    return PP_DEFER;
}

/* The most replies of one connection pending at once since the last call. */
POLLPOOL_EXPORT int rev_max_pending(void)
{
    return atomic_exchange(&max_pend, 0);
}

/* Finishes what is queued and joins the thread. */
POLLPOOL_EXPORT void rev_stop(void)
{
    pthread_mutex_lock(&mu);
    int was = running;
    stopping = 1;
    running = 0;
    pthread_cond_signal(&cv);
    pthread_mutex_unlock(&mu);
    if (was)
        pthread_join(thread, NULL);
}
"""


@pytest.fixture(scope="module")
def rev_lib(tmp_path_factory):
    path = build(tmp_path_factory.mktemp("rev"), SOURCE, "rev")
    lib = ctypes.CDLL(str(path))   # the same copy the server loads
    yield path, lib
    lib.rev_stop()


def pipeline(address, conns: int, per_conn: int) -> None:
    """conns clients each send per_conn numbered messages in one write (every
    fourth answered at once) and check every reply, in order."""
    errors: list[BaseException] = []

    def one(i: int) -> None:
        try:
            c = Client(address)
            try:
                msgs = [(b"now:c%d-m%d" if k % 4 == 3 else b"c%d-m%d") % (i, k)
                        for k in range(per_conn)]
                c.send_messages(msgs)
                got = c.recv_messages(per_conn)
                assert got == [m.upper() for m in msgs]
            finally:
                c.close()
        except BaseException as e:  # reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(conns)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads)
    if errors:
        raise errors[0]


@pytest.mark.parametrize("max_deferred", [1, 16])
def test_replies_finished_newest_first_leave_in_request_order(make_server, rev_lib,
                                                               max_deferred):
    path, lib = rev_lib
    srv = make_server(pollpool.NativeHandler.from_library(str(path), "rev"), threads=2,
                      max_deferred=max_deferred)
    lib.rev_max_pending()
    pipeline(srv.address, conns=20, per_conn=400)
    most = lib.rev_max_pending()
    # A worker counts what it sent after the send: the count may trail the bytes.
    wait_stat(srv, "replies", 20 * 400)
    st = srv.stats()
    assert st["deferred_total"] == 20 * 300
    assert st["replies"] == 20 * 400
    assert st["deferred"] == 0 and st["handler_errors"] == 0
    if max_deferred == 1:
        assert most == 1          # later messages waited, as the contract says
    else:
        assert 1 < most <= max_deferred


def test_a_reset_with_several_replies_pending_leaves_the_server_whole(make_server, rev_lib):
    path, lib = rev_lib
    srv = make_server(pollpool.NativeHandler.from_library(str(path), "rev"), threads=2,
                      max_deferred=64)
    for _ in range(20):
        c = Client(srv.address)
        c.send_messages([b"x%d" % k for k in range(200)])
        c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        c.close()
    pipeline(srv.address, conns=4, per_conn=100)
    st = srv.stop()
    assert st["deferred"] == 0
    assert st["active"] == 0


@pytest.mark.parametrize("value,exc", [(0, ValueError), (1025, ValueError), (True, TypeError),
                                       (2.0, TypeError)])
def test_max_deferred_is_checked(value, exc):
    with pytest.raises(exc, match="max_deferred"):
        pollpool.Server(pollpool.handlers.echo, port=0, max_deferred=value)


def test_max_deferred_above_one_needs_a_native_handler():
    with pytest.raises(ValueError, match="NativeHandler"):
        pollpool.Server(lambda m: m, port=0, max_deferred=2)


def test_cli_serves_a_deferring_library_with_max_deferred(spawn, rev_lib):
    path, _ = rev_lib
    child = spawn(["-m", "pollpool", "--port", "0", "--threads", "2",
                   "--handler", f"{path}:rev", "--max-deferred", "8"], cwd=ROOT)
    host, port = child.wait_listening()
    pipeline((host, port), conns=2, per_conn=50)
    child.signal(signal.SIGINT)
    assert child.wait(20) == 0


def test_cli_refuses_a_max_deferred_of_zero(spawn):
    child = spawn(["-m", "pollpool", "--port", "0", "--max-deferred", "0"])
    assert child.wait(20) not in (0, None)
    assert "max_deferred" in child.stderr()


def test_eof_after_a_pipeline_waits_for_every_pending_reply(make_server, rev_lib):
    path, _ = rev_lib
    srv = make_server(pollpool.NativeHandler.from_library(str(path), "rev"), threads=2,
                      max_deferred=32)
    c = Client(srv.address)
    msgs = [b"e%d" % k for k in range(100)]
    c.send_messages(msgs)
    c.shutdown_write()
    assert wait_closed(c) == b"".join(m.upper() + b"\n" for m in msgs)
    c.close()
