"""Must show 3, 4 and 5 (issue 5): hostile clients and faults.

Each test puts one misbehaving peer (or resource shortage) next to well-behaved
clients and checks three things: the bad connection is dealt with (closed,
counted), the server's resources stay bounded (memory, fds, CPU), and every
other client keeps getting exact replies promptly.

test_limits.py covers the neighbouring cases: a non-reader against
output_high_water alone, a full task queue, max_connections pausing accepts,
and EMFILE with the limit lowered after start.
"""

from __future__ import annotations

import json
import random
import select
import signal
import socket
import struct
import threading
import time

import pytest

import pollpool
from conftest import (LENGTH4, LINE, Client, assert_no_crash_text, assert_same_stream,
                      cpu_seconds, exchange_many, fd_count, rss_bytes, wait_closed, wait_for,
                      wait_stat)

MiB = 1 << 20


def reset(sock: socket.socket) -> None:
    """Closes sock with an RST (SO_LINGER 0) instead of a FIN."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


class Prober(threading.Thread):
    """A well-behaved client doing round trips in the background: records the
    worst latency, any failure, and the peak RSS of this process."""

    def __init__(self, address, framer=LINE, interval: float = 0.02):
        super().__init__(daemon=True)
        self.client = Client(address, framer, timeout=10)
        self.interval = interval
        self.stop_event = threading.Event()
        self.latencies: list[float] = []
        self.error: BaseException | None = None
        self.peak_rss = rss_bytes()

    def run(self):
        i = 0
        try:
            while not self.stop_event.is_set():
                msg = b"probe-%d" % i
                t0 = time.monotonic()
                got = self.client.exchange([msg])
                self.latencies.append(time.monotonic() - t0)
                assert got == [msg], got
                i += 1
                self.peak_rss = max(self.peak_rss, rss_bytes())
                self.stop_event.wait(self.interval)
        except BaseException as e:  # noqa: BLE001 -- reported by finish()
            self.error = e

    def finish(self) -> None:
        self.stop_event.set()
        self.join(15)
        self.client.close()
        assert not self.is_alive(), "the prober hangs"
        assert self.error is None, f"the well-behaved client failed: {self.error!r}"
        assert self.latencies, "the well-behaved client made no round trip"


def push_without_reading(sock: socket.socket, cap: int, stall_after: float = 0.5,
                         give_up: float = 20.0) -> tuple[int, str]:
    """Sends up to cap bytes of 1 KiB lines, never reading. Returns (bytes
    pushed, why it stopped: "cap" | "stalled" | "closed" | "time")."""
    line = b"x" * 1023 + b"\n"
    block = line * 64
    pushed = 0
    sock.setblocking(False)
    end = time.monotonic() + give_up
    while pushed < cap:
        if time.monotonic() > end:
            return pushed, "time"
        try:
            n = sock.send(block)
        except BlockingIOError:
            _, w, _ = select.select([], [sock], [], stall_after)
            if not w:
                return pushed, "stalled"
            continue
        except (BrokenPipeError, ConnectionResetError):
            return pushed, "closed"
        pushed += n
        if n < len(block):
            block = block[n:] + block[:n]
    return pushed, "cap"


def wait_peer_gone(sock: socket.socket, timeout: float) -> bool:
    """True once the server has closed sock: a send fails (RST) or EOF shows
    after any unread data."""
    end = time.monotonic() + timeout
    sock.setblocking(False)
    while time.monotonic() < end:
        try:
            sock.send(b"\n")
        except BlockingIOError:
            pass
        except (BrokenPipeError, ConnectionResetError):
            return True
        try:
            while True:
                data = sock.recv(1 << 20)
                if not data:
                    return True
        except BlockingIOError:
            pass
        except ConnectionResetError:
            return True
        time.sleep(0.05)
    return False


# ----------------------------------------------------------------------------
# 3. A client that never reads while pushing 200 MB
# ----------------------------------------------------------------------------


@pytest.mark.timeout(90)
@pytest.mark.parametrize("limit", ["send_timeout", "output_limit"])
def test_client_that_never_reads_is_closed_memory_bounded_others_unaffected(make_server, limit):
    """send_timeout: output stops at output_high_water (4 MiB), reading from
    the client stops, and 2 s later the stuck connection is closed.
    output_limit: with the high-water mark above the hard limit (reading goes
    on), pending output crosses output_limit (8 MiB) and the connection is
    closed at once. Either way the server's RSS grows < 64 MiB and a second
    client's round trips stay under 1 s each."""
    if limit == "send_timeout":
        srv = make_server(pollpool.handlers.echo, send_timeout=2.0)
        counter, bound = "send_timeouts", 2.0 + 3.0
    else:
        srv = make_server(pollpool.handlers.echo, send_timeout=0, output_high_water=32 * MiB,
                          output_limit=8 * MiB)
        counter, bound = "output_overflows", 3.0
    rss_before = rss_bytes()
    prober = Prober(srv.address)
    hog = Client(srv.address, rcvbuf=64 * 1024)
    try:
        prober.start()
        t0 = time.monotonic()
        pushed, why = push_without_reading(hog.sock, 200 * 1000 * 1000)
        stopped = time.monotonic()
        rss_at_stop = rss_bytes()
        assert why in ("stalled", "closed"), f"the server kept reading a client that never reads: {why}"
        count = wait_stat(srv, counter, 1, timeout=bound + 5)
        closed_after = time.monotonic() - stopped
        assert count == 1, srv.stats()
        assert wait_peer_gone(hog.sock, 5), "the non-reading client's connection is still open"
        time.sleep(0.3)  # a few more probes after the close
    finally:
        hog.close()
        prober.finish()
    st = srv.stats()
    grown = max(prober.peak_rss, rss_at_stop) - rss_before
    worst = max(prober.latencies)
    print(f"[non-reader, {limit}] pushed {pushed / 1e6:.1f} MB in {stopped - t0:.2f}s ({why}); "
          f"closed {closed_after:.2f}s later; peak RSS growth {grown / MiB:.1f} MiB; "
          f"{len(prober.latencies)} probes, worst {worst * 1000:.0f} ms; {counter}={st[counter]}")
    assert grown < 64 * MiB, f"RSS grew by {grown / MiB:.1f} MiB"
    assert worst < 1.0, f"a well-behaved client waited {worst:.2f}s for a reply"
    assert closed_after < bound, f"closed only {closed_after:.1f}s after the client stalled"
    assert wait_for(lambda: srv.stats()["active"] == 0, 5), srv.stats()
    other = "output_overflows" if counter == "send_timeouts" else "send_timeouts"
    assert st[other] == 0, st


def amplify(msg):
    return b"A" * (256 * 1024)


@pytest.mark.timeout(60)
def test_output_limit_bounds_memory_within_one_task(make_server):
    """A non-reader whose tiny requests each get a 256 KiB reply: the
    connection must be closed at output_limit (8 MiB) before the server holds
    much more than that (before the fix: RSS +~150 MiB for 50 MiB of replies,
    the limit being checked only when the task completed)."""
    srv = make_server(amplify, threads=1, send_timeout=0, output_limit=8 * MiB)
    rss_before = peak = rss_bytes()
    hog = Client(srv.address, rcvbuf=64 * 1024)
    try:
        hog.send(b"x\n" * 200)
        end = time.monotonic() + 3
        while time.monotonic() < end and not srv.stats()["output_overflows"]:
            peak = max(peak, rss_bytes())
            time.sleep(0.002)
        peak = max(peak, rss_bytes())
        assert wait_stat(srv, "output_overflows", 1, 5) == 1
    finally:
        hog.close()
    grown = peak - rss_before
    print(f"[amplifying non-reader] peak RSS growth {grown / MiB:.0f} MiB with output_limit 8 MiB")
    assert grown < 64 * MiB, f"RSS grew by {grown / MiB:.0f} MiB"


# ----------------------------------------------------------------------------
# 4. EMFILE: RLIMIT_NOFILE 64, 200 connection attempts
# ----------------------------------------------------------------------------

EMFILE_SCRIPT = r'''
import json, os, resource, sys
# Before the server exists: it raises the soft limit to the hard one at start,
# so both are lowered.
resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
import pollpool
srv = pollpool.Server(pollpool.handlers.echo, host="127.0.0.1", port=0, threads=2)
host, port = srv.listen()
print("fd-limit %s open %d" % (srv.fd_limit, len(os.listdir("/proc/self/fd"))), flush=True)
print("pollpool listening on %s:%d" % (host, port), flush=True)
stats = srv.serve_forever()
print("stats " + json.dumps(stats), flush=True)
'''


def _has_reply(client: Client) -> bool:
    """Non-blocking: has a whole reply arrived on client?"""
    r, _, _ = select.select([client.sock], [], [], 0)
    if not r:
        return False
    client.sock.settimeout(5)
    client.recv_message()
    return True


@pytest.mark.timeout(120)
def test_emfile_no_spin_existing_clients_served_waiting_clients_served_later(spawn, tmp_path):
    script = tmp_path / "emfile_server.py"
    script.write_text(EMFILE_SCRIPT)
    child = spawn([str(script)])
    address = child.wait_listening()
    m = child.wait_line(r"^fd-limit (\d+) open (\d+)$")
    assert int(m.group(1)) == 64, m.string
    existing = [Client(address, timeout=5) for _ in range(4)]
    waiting: list[Client] = []
    try:
        for i, c in enumerate(existing):
            assert c.exchange([b"early-%d" % i]) == [b"early-%d" % i]
        for i in range(200):
            c = Client(address, timeout=5)  # completes in the kernel's listen backlog
            waiting.append(c)
            c.send(b"w%d\n" % i)
        # 5 s with the server out of fds and 200 connections knocking.
        cpu0 = cpu_seconds(child.pid)
        t0 = time.monotonic()
        worst = 0.0
        rounds = 0
        while time.monotonic() - t0 < 5.0:
            for i, c in enumerate(existing):
                msg = b"still-%d-%d" % (i, rounds)
                s = time.monotonic()
                assert c.exchange([msg]) == [msg]
                worst = max(worst, time.monotonic() - s)
            rounds += 1
            time.sleep(0.2)
        cpu_used = cpu_seconds(child.pid) - cpu0
        served_at_limit = [c for c in waiting if _has_reply(c)]
        print(f"[EMFILE] limit 64: {len(served_at_limit)} of 200 served at the limit; server CPU "
              f"{cpu_used:.3f}s over 5s; existing clients: {rounds * len(existing)} round trips, "
              f"worst {worst * 1000:.0f} ms")
        assert cpu_used < 0.5, f"server burned {cpu_used:.2f}s of CPU in 5s while out of fds"
        assert worst < 1.0
        assert 0 < len(served_at_limit) < 64, len(served_at_limit)
        assert child.proc.poll() is None
        # Others leave: close the existing and the served clients; then every
        # waiting client must be served in turn (each closes once answered).
        for c in existing + served_at_limit:
            c.close()
        pending = [c for c in waiting if c not in served_at_limit]
        for c in served_at_limit:
            waiting.remove(c)
        started = time.monotonic()
        while pending:
            assert time.monotonic() - started < 30, f"{len(pending)} clients never served"
            r, _, _ = select.select([c.sock for c in pending], [], [], 1.0)
            for c in [c for c in pending if c.sock in r]:
                c.sock.settimeout(5)
                msg = c.recv_message()  # Closed here would be a refused client: a failure
                assert msg.startswith(b"w")
                c.close()
                pending.remove(c)
        later = time.monotonic() - started
        fresh = Client(address)
        waiting.append(fresh)
        assert fresh.exchange([b"fresh"]) == [b"fresh"]
        child.signal(signal.SIGINT)
        assert child.wait(20) == 0
        stats = json.loads(child.wait_line(r"^stats (.*)$").group(1))
        print(f"[EMFILE] the other {200 - len(served_at_limit)} served within {later:.2f}s "
              f"once fds freed; stats {stats}")
        assert stats["accept_errors"] > 0 and stats["accept_paused"] > 0, stats
        assert stats["accepted"] == 4 + 200 + 1, stats
        assert_no_crash_text(child.stderr())
    finally:
        for c in existing + waiting:
            c.close()


# ----------------------------------------------------------------------------
# 5. Idle timeout
# ----------------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_idle_timeout_closes_silent_connections_only(make_server, connect):
    idle = 0.5
    srv = make_server(pollpool.handlers.echo, idle_timeout=idle)
    t0 = time.monotonic()
    silent = connect(srv)
    once = connect(srv)
    chatty = connect(srv)
    assert once.exchange([b"just once"]) == [b"just once"]
    t_once = time.monotonic()
    closed_at = {}
    i = 0
    while time.monotonic() - t0 < 2.5:
        assert chatty.exchange([b"chat %d" % i]) == [b"chat %d" % i]
        i += 1
        watch = {name: c for name, c in (("silent", silent), ("once", once)) if name not in closed_at}
        r, _, _ = select.select([c.sock for c in watch.values()], [], [], 0.1)
        for name, c in watch.items():
            if c.sock in r and name not in closed_at:
                assert c.sock.recv(100) == b"", f"{name}: data instead of EOF"
                closed_at[name] = time.monotonic()
    assert set(closed_at) == {"silent", "once"}, f"idle connections not closed: {closed_at}"
    silent_after = closed_at["silent"] - t0
    once_after = closed_at["once"] - t_once
    print(f"[idle] silent closed after {silent_after:.2f}s, after-one-message after {once_after:.2f}s; "
          f"chatty: {i} exchanges over 2.5s, still open")
    assert idle - 0.05 <= silent_after < idle + 1.0
    assert idle - 0.05 <= once_after < idle + 1.0
    assert chatty.exchange([b"still here"]) == [b"still here"]
    st = srv.stats()
    assert st["idle_closes"] == 2 and st["active"] == 1, st


@pytest.mark.timeout(30)
def test_idle_timeout_spares_a_connection_waiting_for_a_slow_reply(make_server, connect):
    """A client silent because its request is still being handled is not idle."""
    def slow(msg):
        time.sleep(1.2)
        return msg

    srv = make_server(slow, idle_timeout=0.4)
    c = connect(srv)
    assert c.exchange([b"take your time"]) == [b"take your time"]
    assert srv.stats()["idle_closes"] == 0
    assert wait_closed(c, 3) == b""  # idle once answered
    assert srv.stats()["idle_closes"] == 1


# ----------------------------------------------------------------------------
# 5. max_connections
# ----------------------------------------------------------------------------


@pytest.mark.timeout(30)
@pytest.mark.parametrize("framer", [LINE, LENGTH4], ids=["line", "length"])
def test_max_connections_rejects_with_framed_message_then_eof(make_server, connect, framer):
    busy = b"busy, try again later"
    srv = make_server(pollpool.handlers.echo, framing=framer.server_framing(),
                      max_connections=3, reject_message=busy)
    first = [connect(srv, framer) for _ in range(3)]
    for i, c in enumerate(first):
        assert c.exchange([b"in %d" % i]) == [b"in %d" % i]
    extra = connect(srv, framer)
    extra.send(framer.frame(b"let me in"))
    t0 = time.monotonic()
    got = wait_closed(extra, 5)
    assert got == framer.frame(busy), got
    assert time.monotonic() - t0 < 2
    st = srv.stats()
    assert st["rejected"] == 1 and st["active"] == 3, st
    for i, c in enumerate(first):
        assert c.exchange([b"still %d" % i]) == [b"still %d" % i]
    # A burst of extra clients: each refused the same way, none hangs.
    more = [connect(srv, framer) for _ in range(20)]
    for c in more:
        assert wait_closed(c, 5) == framer.frame(busy)
    assert srv.stats()["rejected"] == 21
    # A slot frees: the next newcomer is served.
    first[0].close()
    wait_for(lambda: srv.stats()["active"] == 2, 5)
    late = connect(srv, framer)
    assert late.exchange([b"my turn"]) == [b"my turn"]
    st = srv.stats()
    assert st["rejected"] == 21 and st["active"] == 3, st


@pytest.mark.timeout(30)
def test_max_connections_without_reject_message_waits_without_spinning(make_server, connect):
    srv = make_server(pollpool.handlers.echo, max_connections=2)
    a, b = connect(srv), connect(srv)
    assert a.exchange([b"a"]) == [b"a"] and b.exchange([b"b"]) == [b"b"]
    waiting = connect(srv)
    waiting.send(b"waiting\n")
    t0, c0 = time.monotonic(), time.process_time()
    time.sleep(1.0)
    cpu = (time.process_time() - c0) / (time.monotonic() - t0)
    r, _, _ = select.select([waiting.sock], [], [], 0)
    assert not r, "served or closed beyond max_connections"
    assert cpu < 0.3, f"the process used {cpu:.0%} of a CPU while a client waited for a slot"
    b.close()
    assert waiting.recv_message() == b"waiting"
    assert srv.stats()["rejected"] == 0


# ----------------------------------------------------------------------------
# 5. RST mid-reply
# ----------------------------------------------------------------------------

BIG = 4 * MiB


def big_reply(msg):
    return b"B" * BIG if msg == b"big" else msg


@pytest.mark.timeout(60)
def test_reset_in_the_middle_of_a_large_reply(make_server, connect):
    srv = make_server(big_reply, threads=2)
    other = connect(srv)
    fds_before = fd_count()
    rss_before = rss_bytes()
    rounds = 10
    for i in range(rounds):
        c = Client(srv.address, rcvbuf=64 * 1024)
        try:
            c.send(b"big\n")
            got = c.recv_exactly(100 * 1024)  # the reply is flowing
            assert got == b"B" * len(got)
        finally:
            reset(c.sock)
        assert other.exchange([b"after %d" % i]) == [b"after %d" % i]
    assert wait_for(lambda: srv.stats()["active"] == 1, 5), srv.stats()
    st = srv.stats()
    grown = rss_bytes() - rss_before
    print(f"[RST mid-reply] {rounds} resets; read_errors={st['read_errors']} "
          f"write_errors={st['write_errors']}; RSS +{grown / MiB:.1f} MiB")
    assert st["read_errors"] + st["write_errors"] >= rounds, st
    assert st["accepted"] == rounds + 1 and st["closed"] == rounds, st
    assert fd_count() <= fds_before + 1
    assert grown < 64 * MiB
    # A full reply still goes out whole to a client that reads it.
    c = connect(srv)
    c.send(b"big\n")
    c.sock.settimeout(20)
    assert c.recv_exactly(BIG + 1) == b"B" * BIG + b"\n"


# ----------------------------------------------------------------------------
# 5. Peer gone while its task is in flight
# ----------------------------------------------------------------------------


class SlowSession:
    """Connection-aware handler: the message takes 0.3 s; records the order of events."""

    def __init__(self):
        self.events = []
        self.lock = threading.Lock()

    def on_connect(self, conn):
        with self.lock:
            self.events.append(("connect", conn.id))

    def on_message(self, conn, message):
        if message == b"slow":
            time.sleep(0.3)
        with self.lock:
            self.events.append(("message-done", conn.id))
        return message

    def on_disconnect(self, conn):
        with self.lock:
            self.events.append(("disconnect", conn.id))


@pytest.mark.timeout(30)
@pytest.mark.parametrize("how", ["close", "rst", "half-close-then-close"])
def test_peer_gone_while_its_task_is_in_flight(make_server, connect, how):
    session = SlowSession()
    srv = make_server(session, threads=2)
    other = connect(srv)
    assert other.exchange([b"hi"]) == [b"hi"]
    for round_ in range(5):
        c = Client(srv.address)
        c.send(b"slow\n")
        time.sleep(0.05)  # the task is in flight now
        if how == "rst":
            reset(c.sock)
        elif how == "close":
            c.close()
        else:
            c.shutdown_write()
            c.close()
        t0 = time.monotonic()
        assert other.exchange([b"meanwhile %d" % round_]) == [b"meanwhile %d" % round_]
        assert time.monotonic() - t0 < 1.0
    assert wait_for(lambda: srv.stats()["closed"] == 5 and srv.stats()["active"] == 1, 5), srv.stats()
    with session.lock:
        events = list(session.events)
    by_conn: dict[int, list[str]] = {}
    for kind, cid in events:
        by_conn.setdefault(cid, []).append(kind)
    gone = [ev for ev in by_conn.values() if "disconnect" in ev]
    assert len(gone) == 5, by_conn
    for ev in gone:
        # The handler call finished, and the disconnect came after it, once.
        assert ev == ["connect", "message-done", "disconnect"], ev
    st = srv.stats()
    assert st["handler_errors"] == 0 and st["messages"] == 5 + 1 + 5, st
    assert other.exchange([b"bye"]) == [b"bye"]


# ----------------------------------------------------------------------------
# 5. A 0-byte read right after accept
# ----------------------------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("make_handler", [lambda: pollpool.handlers.echo, SlowSession],
                         ids=["native", "aware"])
def test_connections_closed_right_after_connect(make_server, connect, make_handler):
    handler = make_handler()  # a fresh one per run: it records events
    srv = make_server(handler)
    fds_before = fd_count()
    n = 300
    for i in range(n):
        s = socket.create_connection(srv.address, timeout=5)
        if i % 3 == 0:
            reset(s)
        elif i % 3 == 1:
            s.shutdown(socket.SHUT_WR)  # EOF first, then close
            s.close()
        else:
            s.close()
    assert wait_for(lambda: srv.stats()["closed"] == n, 10), srv.stats()
    st = srv.stats()
    print(f"[0-byte read] {n} connections closed right after connect: {st}")
    assert st["accepted"] == n and st["active"] == 0 and st["messages"] == 0, st
    assert st["handler_errors"] == 0
    assert wait_for(lambda: fd_count() <= fds_before, 5), (fd_count(), fds_before)
    c = connect(srv)
    assert c.exchange([b"alive"]) == [b"alive"]
    if isinstance(handler, SlowSession):
        kinds = [k for k, _ in handler.events]
        # Each short-lived connection: connect then disconnect, exactly once;
        # the last client is still connected.
        assert kinds.count("connect") == n + 1 and kinds.count("disconnect") == n, kinds[-10:]


# ----------------------------------------------------------------------------
# A slow handler fills the queue; throughput recovers when it speeds up
# ----------------------------------------------------------------------------

FAST = False


def sometimes_slow(msg):
    if not FAST:
        time.sleep(0.002)
    return msg


@pytest.mark.timeout(90)
def test_slow_handler_backpressure_then_recovery(make_server):
    global FAST
    FAST = False
    max_size = 1024
    srv = make_server(sometimes_slow, threads=1, queue_size=2, max_message_size=max_size)
    rng = random.Random(11)
    clients, per_client = 20, 1500
    payloads = [LINE.frames([b"c%d-m%d-" % (c, i) + b"p" * rng.randint(0, 800) for i in range(per_client)])
                for c in range(clients)]
    total = sum(len(p) for p in payloads)
    result: dict = {}

    def run():
        try:
            result["got"] = exchange_many(srv.address, payloads, [len(p) for p in payloads],
                                          chunk=4096, rng=rng, timeout=80)
        except BaseException as e:  # noqa: BLE001
            result["error"] = e

    t = threading.Thread(target=run, daemon=True)
    try:
        t.start()
        time.sleep(0.5)
        r0, s0 = srv.stats()["replies"], time.monotonic()
        held_max = 0
        while time.monotonic() - s0 < 2.0:
            st = srv.stats()
            held_max = max(held_max, st["bytes_in"] - st["bytes_out"])
            time.sleep(0.05)
        st = srv.stats()
        slow_rate = (st["replies"] - r0) / (time.monotonic() - s0)
        read_while_slow = st["bytes_in"]
        FAST = True
        r1, s1 = st["replies"], time.monotonic()
        time.sleep(1.0)
        fast_rate = (srv.stats()["replies"] - r1) / (time.monotonic() - s1)
        t.join(80)
    finally:
        FAST = True
        t.join(10)
    assert "error" not in result, result.get("error")
    for c, (g, p) in enumerate(zip(result["got"], payloads)):
        assert_same_stream(g, p, LINE, f"client {c}")
    print(f"[slow handler] {clients * per_client} messages, none dropped; slow {slow_rate:.0f}/s, "
          f"fast {fast_rate:.0f}/s; server held at most {held_max / 1024:.0f} KiB unanswered; read "
          f"{read_while_slow / 1e6:.2f} of {total / 1e6:.2f} MB while slow")
    assert slow_rate < 600  # at most one 2 ms message at a time
    assert fast_rate > 1000 and fast_rate > 3 * slow_rate
    # Backpressure: while slow, reading paused (the rest waited in the kernel)
    # and what the server held stayed within its per-connection input caps
    # (max_size + 64 KiB each, which a buffer's power-of-two capacity and one
    # last read can round up to twice that).
    assert read_while_slow < total / 3
    assert held_max < clients * 2 * (max_size + 64 * 1024) + MiB
    wait_for(lambda: srv.stats()["messages"] >= clients * per_client, 10)
    assert srv.stats()["messages"] == clients * per_client
