"""Server(processes=N): forked server processes sharing a port (SO_REUSEPORT),
supervised by the parent: stats added up, crashed children restarted, Ctrl+C
forwarded as one graceful stop, no child left behind."""

from __future__ import annotations

import errno
import json
import logging
import os
import signal
import socket
import textwrap
import threading
import time

import pytest

import pollpool

from conftest import LINE, Client, connect_retry, wait_for

pytestmark = pytest.mark.skipif(not hasattr(socket, "SO_REUSEPORT"), reason="no SO_REUSEPORT")


def pid_reply(msg: bytes) -> bytes:
    """Answers with the message and the pid of the process that handled it."""
    return msg + b" " + str(os.getpid()).encode()


def ask_pids(address, n: int, clients: list) -> set[int]:
    """Opens n connections, one message each; returns the pids that answered."""
    pids = set()
    for i in range(n):
        c = Client(address, LINE, timeout=10)
        clients.append(c)
        reply = c.exchange([b"m%d" % i])[0]
        msg, pid = reply.split(b" ")
        assert msg == b"m%d" % i
        c.server_pid = int(pid)
        pids.add(int(pid))
    return pids


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead too: it only waits for its parent to reap it.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.timeout(60)
def test_connections_spread_over_processes_and_stats_add_up(make_server):
    srv = make_server(pid_reply, processes=2, threads=2)
    clients: list = []
    try:
        pids = ask_pids(srv.address, 40, clients)
        # The kernel hashes each connection to one of the two listeners: 40
        # connections all landing on one has odds of 2**-39.
        assert len(pids) == 2 and os.getpid() not in pids, pids
        st = srv.stats()
        assert st["processes"] == 2 and st["restarts"] == 0, st
        assert st["accepted"] == 40 and st["messages"] == 40 and st["replies"] == 40, st
        assert st["active"] == 40, st
    finally:
        for c in clients:
            c.close()
    final = srv.stop(timeout=10)
    assert final["accepted"] == 40 and final["closed"] == 40 and final["active"] == 0, final
    assert final["processes"] == 0 and not srv.forced
    assert wait_for(lambda: not any(alive(p) for p in pids), 5), pids


@pytest.mark.timeout(60)
def test_a_killed_process_is_reported_and_restarted(make_server, caplog):
    caplog.set_level(logging.ERROR, logger="pollpool")
    srv = make_server(pid_reply, processes=2, threads=1)
    clients: list = []
    try:
        pids = ask_pids(srv.address, 20, clients)
        assert len(pids) == 2, pids
        before = srv.stats()  # what each child counted so far, remembered
        assert before["accepted"] == 20
        victim = min(pids)
        os.kill(victim, signal.SIGKILL)
        assert wait_for(lambda: srv.stats()["restarts"] == 1 and srv.stats()["processes"] == 2,
                        15), srv.stats()
        assert any("was killed by SIGKILL; restarting" in r.getMessage() for r in caplog.records), \
            [r.getMessage() for r in caplog.records]
        # The survivors' clients still get answers; new clients reach both
        # processes again, one of them new.
        survivors = [c for c in clients if c.server_pid != victim]
        assert survivors
        for c in survivors:
            assert c.exchange([b"again"]) == [b"again %d" % c.server_pid]
        new_pids = set()
        deadline = time.monotonic() + 20
        while len(new_pids) < 2 and time.monotonic() < deadline:
            new_pids |= ask_pids(srv.address, 10, clients)
        assert len(new_pids) == 2 and victim not in new_pids, (new_pids, victim)
        st = srv.stats()
        # The dead child's counts up to the last stats() are kept.
        assert st["accepted"] >= 20 + 10 and st["messages"] >= st["accepted"] - 10, st
    finally:
        for c in clients:
            c.close()
    srv.stop(timeout=10)


@pytest.mark.timeout(30)
def test_a_busy_port_raises_oserror_with_errno(make_server):
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    try:
        port = holder.getsockname()[1]
        srv = pollpool.Server(pollpool.handlers.echo, port=port, processes=2)
        with pytest.raises(OSError) as info:
            srv.start()
        assert info.value.errno == errno.EADDRINUSE
    finally:
        holder.close()


def test_processes_must_be_positive():
    with pytest.raises(ValueError):
        pollpool.Server(pollpool.handlers.echo, processes=0)


HANDLER_MODULE = textwrap.dedent('''
    import os

    def handle(msg):
        return msg + b" " + str(os.getpid()).encode()
''')


@pytest.mark.timeout(90)
def test_cli_ctrl_c_drains_every_process_then_exits_0(spawn, tmp_path):
    (tmp_path / "pidmod.py").write_text(HANDLER_MODULE)
    child = spawn(["-m", "pollpool", "--port", "0", "--processes", "2", "--threads", "2",
                   "--handler", "pidmod:handle", "--shutdown-message", "bye"])
    host, port = child.wait_listening()
    clients = []
    try:
        pids = set()
        for i in range(30):
            c = connect_retry((host, port), LINE, timeout=10)
            clients.append(c)
            # Pipelined: 20 messages sent at once, all answered in order.
            msgs = [b"c%d-%d" % (i, k) for k in range(20)]
            replies = c.exchange(msgs)
            assert [r.split(b" ")[0] for r in replies] == msgs
            pids |= {int(r.split(b" ")[1]) for r in replies}
        assert len(pids) == 2 and child.pid not in pids, pids
        # The last messages are on their way when the signal comes.
        for c in clients:
            c.send_messages([b"last"])
        child.signal(signal.SIGINT)
        for c in clients:
            assert c.recv_message().startswith(b"last ")
            assert c.recv_message() == b"bye"
            assert c.recv_until_closed() == b""
        rc = child.wait(30)
        assert rc == 0, child.stderr()
        stopped = child.wait_line(r"^pollpool stopped: ")
        stats = json.loads(stopped.string[len("pollpool stopped: "):])
        assert stats["accepted"] == 30 and stats["messages"] == 30 * 21, stats
        assert stats["forced_closes"] == 0 and stats["restarts"] == 0, stats
        assert wait_for(lambda: not any(alive(p) for p in pids), 5), pids
    finally:
        for c in clients:
            c.close()


@pytest.mark.timeout(60)
def test_children_do_not_outlive_a_killed_parent(spawn, tmp_path):
    (tmp_path / "pidmod.py").write_text(HANDLER_MODULE)
    child = spawn(["-m", "pollpool", "--port", "0", "--processes", "2",
                   "--handler", "pidmod:handle"])
    host, port = child.wait_listening()
    clients: list = []
    try:
        pids = set()
        deadline = time.monotonic() + 20
        while len(pids) < 2 and time.monotonic() < deadline:
            pids |= ask_pids((host, port), 10, clients)
        assert len(pids) == 2, pids
        child.signal(signal.SIGKILL)
        child.wait(10)
        # The kernel sends each orphan SIGTERM (PR_SET_PDEATHSIG): it drains
        # and exits, closing its clients.
        assert wait_for(lambda: not any(alive(p) for p in pids), 15), pids
        for c in clients:
            assert c.recv_until_closed() == b""
    finally:
        for c in clients:
            c.close()


def slow_pid_reply(msg: bytes) -> bytes:
    time.sleep(0.3)
    return pid_reply(msg)


@pytest.mark.timeout(60)
def test_a_stop_right_after_start_is_a_graceful_one(make_server, caplog):
    # Each process reports ready only with its signal handlers in place, and
    # holds signals until then: SIGTERM never kills one outright.
    caplog.set_level(logging.WARNING, logger="pollpool")
    for _ in range(3):
        srv = make_server(pid_reply, processes=2)
        final = srv.stop(timeout=10)
        assert not srv.forced and final["processes"] == 0, final
    assert not [r.getMessage() for r in caplog.records if "while stopping" in r.getMessage()]


@pytest.mark.timeout(60)
def test_stop_answers_what_every_process_has_accepted(make_server, caplog):
    caplog.set_level(logging.WARNING, logger="pollpool")
    srv = make_server(slow_pid_reply, processes=2)
    clients = [Client(srv.address, LINE, timeout=10) for _ in range(12)]
    try:
        for i, c in enumerate(clients):
            c.send_messages([b"m%d" % i])
        # Accepted by some process (connections still in a backlog when the
        # stop comes are new ones: refused, like with one process).
        assert wait_for(lambda: srv.stats()["accepted"] == 12, 10), srv.stats()
        final = srv.stop(timeout=10)
        for i, c in enumerate(clients):
            assert c.recv_message().split(b" ")[0] == b"m%d" % i
            assert c.recv_until_closed() == b""
        assert final["messages"] == 12 and not srv.forced, final
        assert not [r for r in caplog.records if "while stopping" in r.getMessage()]
    finally:
        for c in clients:
            c.close()


@pytest.mark.timeout(60)
def test_two_graceful_stops_at_once_do_not_force(make_server):
    srv = make_server(slow_pid_reply, processes=2)
    c = Client(srv.address, LINE, timeout=10)
    try:
        c.send_messages([b"slow"])
        time.sleep(0.1)  # the handler is running
        results = []
        stoppers = [threading.Thread(target=lambda: results.append(srv.stop()))
                    for _ in range(2)]
        for t in stoppers:
            t.start()
        for t in stoppers:
            t.join(30)
        assert c.recv_message().startswith(b"slow ")
        assert len(results) == 2 and not srv.forced
    finally:
        c.close()


@pytest.mark.timeout(60)
def test_processes_outlive_the_thread_that_started_them(make_server):
    box = {}
    t = threading.Thread(target=lambda: box.update(srv=make_server(pid_reply, processes=2)))
    t.start()
    t.join(30)
    srv = box["srv"]
    time.sleep(0.5)  # the kernel's parent-death signal would have come by now
    clients: list = []
    try:
        pids = ask_pids(srv.address, 20, clients)
        st = srv.stats()
        assert st["restarts"] == 0 and st["processes"] == 2, st
        assert all(alive(p) for p in pids)
    finally:
        for c in clients:
            c.close()


@pytest.mark.timeout(60)
def test_stop_from_another_thread_ends_a_foreground_serve(backend):
    srv = pollpool.Server(pid_reply, port=0, processes=2)
    ready = threading.Event()
    out = {}
    t = threading.Thread(target=lambda: out.update(stats=srv.serve_forever(on_ready=ready.set)))
    t.start()
    clients: list = []
    try:
        assert ready.wait(30)
        pids = ask_pids(srv.address, 10, clients)
        final = srv.stop(timeout=10)
        # stop() returns once every process is gone, and serve_forever too.
        assert not any(alive(p) for p in pids), pids
        t.join(10)
        assert not t.is_alive() and out["stats"]["accepted"] == final["accepted"] == 10
    finally:
        for c in clients:
            c.close()
        srv.stop(timeout=5)
        t.join(10)
