"""Talking at any time: pushes to one connection from any thread, publish to
topics, broadcast, close from anywhere, push_limit, and what a stop or a
vanished peer does to queued pushes.  Every test runs on both backends."""

from __future__ import annotations

import os
import random
import selectors
import socket
import struct
import sys
import threading
import time

import pytest

import pollpool
from conftest import LINE, Client, Framer, proc_status_kib, subprocess_env, wait_closed, wait_for

pytestmark = pytest.mark.timeout(180)

LENGTH4 = Framer("length", header_bytes=4)


class Subscriber:
    """on_connect subscribes to "lobby" and greets, so that a client that
    has its greeting knows publishes reach it."""

    def __init__(self) -> None:
        self.disconnects: list[int] = []
        self.conns: dict[int, pollpool.Connection] = {}

    def on_connect(self, conn):
        conn.subscribe("lobby")
        self.conns[conn.id] = conn
        return b"ready"

    def on_message(self, conn, message):
        if message == b"id":
            return b"%d" % conn.id
        return message

    def on_disconnect(self, conn):
        self.disconnects.append(conn.id)


def read_all(socks: list[socket.socket], framer: Framer, want: int, timeout: float = 60.0):
    """Reads from every socket until each has want messages; returns the
    lists of messages, in order."""
    sel = selectors.DefaultSelector()
    bufs = {s.fileno(): bytearray() for s in socks}
    got = {s.fileno(): [] for s in socks}
    for s in socks:
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ)
    left = len(socks)
    deadline = time.monotonic() + timeout
    try:
        while left:
            assert time.monotonic() < deadline, f"{left} clients still waiting"
            for key, _ in sel.select(1.0):
                s = key.fileobj
                data = s.recv(1 << 16)
                assert data, f"connection {s.fileno()} closed early"
                buf = bufs[s.fileno()]
                buf += data
                msgs = got[s.fileno()]
                while True:
                    cut = framer.cut_one(buf)
                    if cut is None:
                        break
                    msg, used = cut
                    del buf[:used]
                    msgs.append(msg)
                if len(msgs) >= want:
                    sel.unregister(s)
                    left -= 1
    finally:
        sel.close()
        for s in socks:
            s.setblocking(True)
    return [got[s.fileno()] for s in socks]


def test_2000_subscribers_get_200_publishes_from_another_thread_in_order(make_server, backend):
    srv = make_server(Subscriber(), threads=2)
    socks = []
    try:
        for _ in range(2000):
            socks.append(socket.create_connection(srv.address))
        # The greeting says the subscription is in.
        assert all(m == [b"ready"] for m in read_all(socks, LINE, 1))
        payloads = [b"news %03d %s" % (k, b"x" * (k % 37)) for k in range(200)]
        counts = []
        t = threading.Thread(target=lambda: counts.extend(srv.publish("lobby", p)
                                                         for p in payloads))
        t.start()
        t.join(60)
        assert counts == [2000] * 200
        for got in read_all(socks, LINE, 200):
            assert got == payloads
    finally:
        for s in socks:
            s.close()
    st = srv.stats()
    assert st["pushes"] == 2000 * 200 and st["push_drops"] == 0, st
    # One publish is one call: it wakes the I/O thread at most once.
    assert st["wakeups"] <= 200 + st["accepted"] + st["messages"] + 10, st


def test_pipelined_replies_and_pushes_from_4_threads_never_tear_or_reorder(make_server, backend):
    srv = make_server(Subscriber(), threads=3, framing="length", push_limit=0)
    nclients, nthreads, npush, nreq = 50, 4, 25, 200
    clients = [Client(srv.address, LENGTH4) for _ in range(nclients)]
    try:
        ids = []
        for c in clients:
            assert c.recv_message() == b"ready"
            ids.append(int(c.exchange([b"id"])[0]))

        def pusher(t: int) -> None:
            rng = random.Random(t)
            for k in range(npush):
                head = b"P%d:%d:" % (t, k)
                size = rng.randrange(len(head), 65536 if rng.random() < 0.2 else 600)
                msg = head + bytes([65 + t]) * (size - len(head))
                for cid in ids:
                    assert srv.send(cid, msg)

        def check(c: Client, errors: list) -> None:
            try:
                next_reply, next_push = 0, [0] * nthreads
                while next_reply < nreq or min(next_push) < npush:
                    m = c.recv_message()
                    if m.startswith(b"r"):
                        assert m == b"r%d" % next_reply, (m[:20], next_reply)
                        next_reply += 1
                        continue
                    t, k, rest = m.split(b":", 2)
                    t, k = int(t[1:]), int(k)
                    assert k == next_push[t], (t, k, next_push[t])
                    assert rest == bytes([65 + t]) * len(rest), "torn push"
                    next_push[t] += 1
            except BaseException as e:  # reported by the main thread
                errors.append(e)

        errors: list = []
        readers = [threading.Thread(target=check, args=(c, errors)) for c in clients]
        for r in readers:
            r.start()
        pushers = [threading.Thread(target=pusher, args=(t,)) for t in range(nthreads)]
        for p in pushers:
            p.start()
        for c in clients:
            c.send(b"".join(LENGTH4.frame(b"r%d" % i) for i in range(nreq)))
        for th in pushers + readers:
            th.join(120)
        assert not errors, errors[:3]
    finally:
        for c in clients:
            c.close()
    st = srv.stats()
    assert st["pushes"] == nclients * nthreads * npush
    print(f"\n  {st['pushes']} pushes, {st['wakeups']} wake-fd writes "
          f"({st['wakeups'] / st['pushes']:.4f} per push)")


def test_close_from_another_thread_sends_the_tasks_replies_first(make_server, connect, backend):
    entered, release = threading.Event(), threading.Event()
    box: dict = {}

    class Slow:
        def on_connect(self, conn):
            box["conn"] = conn

        def on_message(self, conn, message):
            if message == b"slow":
                entered.set()
                release.wait(10)
            return message.upper()

    srv = make_server(Slow(), threads=2)
    c = connect(srv)
    c.send(b"one\nslow\n")
    assert entered.wait(10)
    c.send(b"late\n")               # arrives while the task is in flight
    assert box["conn"].send(b"pushed")
    box["conn"].close()              # not the handler's thread
    assert not box["conn"].send(b"too late")
    release.set()
    assert wait_closed(c) == b"ONE\nSLOW\npushed\n"


def test_a_peer_that_leaves_with_pushes_queued(make_server, connect, backend):
    handler = Subscriber()
    srv = make_server(handler)
    c = Client(srv.address, LINE, rcvbuf=4096)
    assert c.recv_message() == b"ready"
    cid = int(c.exchange([b"id"])[0])
    for _ in range(200):             # more than it reads: queued in the server
        srv.send(cid, b"y" * 2000)
    c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    c.close()                        # a reset with everything unread
    wait_for(lambda: handler.disconnects == [cid], 10)
    assert not srv.send(cid, b"x")
    assert handler.conns[cid].pending == 0
    assert not handler.conns[cid].send(b"x")
    time.sleep(0.1)
    assert handler.disconnects == [cid]  # exactly once
    assert srv.stats()["active"] == 0


def test_push_limit_drop_keeps_the_connection_and_counts(make_server, connect, backend):
    handler = Subscriber()
    srv = make_server(handler, push_limit=64 * 1024, on_push_overflow="drop")
    c = Client(srv.address, LINE, rcvbuf=4096)
    assert c.recv_message() == b"ready"
    cid = int(c.exchange([b"id"])[0])
    conn = handler.conns[cid]
    # Push until the limit drops one and what is queued then stays in the
    # server: the kernel's buffers are full (on loopback the send buffer
    # starts near 2.5 MB) and the I/O thread cannot drain it.  A fixed count
    # of pushes is not enough: it may all fit in the kernel (nothing dropped),
    # or be dropped while the I/O thread lags and leave nothing pending.
    taken = dropped = 0
    deadline = time.monotonic() + 20
    while True:
        while time.monotonic() < deadline:
            if srv.send(cid, b"z" * 8000):
                taken += 1
                continue
            dropped += 1                 # over the limit: is it draining?
            before = conn.pending
            time.sleep(0.05)
            if before > 0 and conn.pending == before:
                break
        else:
            pytest.fail("the server's send buffer never filled")
        if not srv.send(cid, b"z" * 8000):  # still full: dropped again
            dropped += 1
            break
        # Taken after all: the I/O thread, slowed by a busy machine, had
        # not yet filled the kernel's buffer in those 50 ms.  Fill again.
        taken += 1
    # What it has not read waits in the server, within the limit.
    assert 0 < conn.pending <= 64 * 1024 + 8192
    st = srv.stats()
    assert st["push_drops"] == dropped and st["push_overflow_closes"] == 0
    # Still open: once it reads again it gets the pushes that were taken,
    # whole, then the answer to a ping.
    c.send(b"ping\n")
    for _ in range(taken):
        assert c.recv_message() == b"z" * 8000
    assert c.recv_message() == b"ping"
    c.close()


def test_configuration_of_pushes_is_checked():
    with pytest.raises(ValueError):
        pollpool.Server(pollpool.handlers.echo, on_push_overflow="ignore")
    with pytest.raises(ValueError):
        pollpool.Server(pollpool.handlers.echo, push_limit=-1)
    srv = pollpool.Server(pollpool.handlers.echo, port=0)
    assert srv.send(1, b"x") is False and srv.broadcast(b"x") == 0   # not running
    with pytest.raises(TypeError):
        srv.send(1, "text")
    with pytest.raises(TypeError):
        srv.publish(3, b"x")


def test_a_push_too_long_for_the_length_header_raises(make_server, backend):
    srv = make_server(pollpool.handlers.echo, framing=pollpool.LengthPrefixed(1))
    with pytest.raises(ValueError, match="length header"):
        srv.broadcast(b"x" * 300)


def test_pushes_before_a_stop_arrive_then_goodbye_and_later_ones_are_refused(
        make_server, connect, backend):
    handler = Subscriber()
    srv = make_server(handler, shutdown_message=b"bye")
    c = connect(srv)
    assert c.recv_message() == b"ready"
    cid = int(c.exchange([b"id"])[0])
    for k in range(300):
        assert srv.send(cid, b"push %d" % k)
    srv.stop()
    assert not srv.send(cid, b"after")
    assert wait_closed(c) == b"".join(b"push %d\n" % k for k in range(300)) + b"bye\n"


SLOW_SUBSCRIBER_SERVER = """
import json, sys, threading, time, pollpool
N = int(sys.argv[1])
srv = None

def publisher():
    payload = bytes(range(256)) * 256                  # 64 KiB
    for k in range(N):
        srv.publish("feed", b"%06d" % k + payload[6:])
        time.sleep(float(sys.argv[3]))

class Sub:
    def on_connect(self, conn):
        conn.subscribe("feed")
        return b"ready"
    def on_message(self, conn, message):
        if message == b"go":
            threading.Thread(target=publisher, daemon=True).start()
            return None
        if message == b"stats":
            return json.dumps(srv.stats()).encode()
        return message                                   # ping

srv = pollpool.Server(Sub(), port=0, framing="length", push_limit=int(sys.argv[2]),
                      threads=2)
srv.serve_forever(on_ready=lambda: print("pollpool listening on %s:%d" % srv.address,
                                         flush=True))
"""


def test_a_subscriber_that_never_reads_is_cut_at_push_limit_and_costs_no_memory(
        spawn, tmp_path, backend):
    import json
    # 10 s of 64 KiB publishes, 20 a second; a limit that a Python reader on
    # a busy 2-core machine never hits (6 s of publishes; 1 MiB would be
    # under a second: a hiccup), while the one that never reads passes it
    # after 128 publishes.
    limit, n, interval = 8 << 20, 200, 0.05
    script = tmp_path / "server.py"
    script.write_text(SLOW_SUBSCRIBER_SERVER)
    child = spawn([str(script), str(n), str(limit), str(interval)])
    address = child.wait_listening()
    slow = Client(address, LENGTH4, rcvbuf=4096)       # never reads
    readers = [Client(address, LENGTH4) for _ in range(100)]
    try:
        assert slow.recv_message() == b"ready"
        for r in readers:
            assert r.recv_message() == b"ready"
        base = proc_status_kib("VmRSS", child.pid) * 1024
        peak = [base]
        sampling = threading.Event()

        def sample():
            while not sampling.wait(0.01):
                peak[0] = max(peak[0], proc_status_kib("VmRSS", child.pid) * 1024)

        sampler = threading.Thread(target=sample)
        sampler.start()
        readers[0].send(LENGTH4.frame(b"go"))
        try:
            got = read_all([r.sock for r in readers], LENGTH4, n)
        finally:
            sampling.set()
            sampler.join()
        payload = bytes(range(256)) * 256
        for msgs in got:
            assert [m[:6] for m in msgs] == [b"%06d" % k for k in range(n)]
            assert all(m[6:] == payload[6:] for m in msgs)
        stats = json.loads(readers[1].exchange([b"stats"])[0])
        assert stats["push_overflow_closes"] == 1, stats
        assert stats["pushes"] >= 100 * n, stats
        # The one that never read cost at most its push_limit (plus what any
        # allocator keeps): 150 x 64 KiB went past it.
        grown = peak[0] - base
        print(f"\n  server RSS grew {grown / 1024:.0f} KiB (push_limit {limit // 1024} KiB)")
        assert grown < limit + 8 * 1024 * 1024, grown
        wait_closed(slow, 10)  # cut by the server: EOF or reset, not a timeout
    finally:
        slow.close()
        for r in readers:
            r.close()
