"""Must show 2: replies on one connection leave in request order, each exactly
once, however many workers run the handler."""

import random
import time

import pytest

import pollpool
from conftest import LENGTH4, LINE, assert_same_stream, exchange_many, wait_for

CONNECTIONS = 50
MESSAGES = 2000


def numbered(conn: int, n: int) -> list[bytes]:
    return [b"c%d:m%d" % (conn, i) for i in range(n)]


@pytest.mark.timeout(150)
def test_replies_keep_request_order_with_many_workers(make_server):
    """50 connections x 2,000 pipelined messages, 8 workers, a handler that
    sleeps 0-200 us at random so that workers finish out of order."""
    calls = []

    def handler(msg):
        time.sleep(random.random() * 0.0002)
        calls.append(1)
        return b"r" + msg

    srv = make_server(handler, threads=8, framing="line")
    payloads = [LINE.frames(numbered(c, MESSAGES)) for c in range(CONNECTIONS)]
    expected = [LINE.frames([b"r" + m for m in numbered(c, MESSAGES)]) for c in range(CONNECTIONS)]
    got = exchange_many(srv.address, payloads, [len(e) for e in expected],
                        chunk=4096, rng=random.Random(3), timeout=120)
    for c in range(CONNECTIONS):
        assert_same_stream(got[c], expected[c], LINE, f"connection {c}")
    total = CONNECTIONS * MESSAGES
    # Counters are added after a task's replies are sent: let them catch up.
    wait_for(lambda: srv.stats()["replies"] >= total, 10)
    assert len(calls) == total  # exactly one handler call per message
    stats = srv.stats()
    assert stats["messages"] == total
    assert stats["replies"] == total


@pytest.mark.timeout(60)
def test_native_echo_keeps_order_with_length_framing(make_server):
    srv = make_server(pollpool.handlers.echo, threads=8, framing="length")
    payloads = [LENGTH4.frames(numbered(c, MESSAGES)) for c in range(CONNECTIONS)]
    got = exchange_many(srv.address, payloads, [len(p) for p in payloads],
                        chunk=1500, rng=random.Random(4), timeout=60)
    for c in range(CONNECTIONS):
        assert_same_stream(got[c], payloads[c], LENGTH4, f"connection {c}")


@pytest.mark.timeout(60)
def test_order_kept_when_requests_arrive_while_a_task_is_in_flight(make_server, connect):
    """A slow first message holds a worker; the messages behind it, sent
    separately while it runs, must not overtake it on other workers."""
    def handler(msg):
        if msg == b"slow":
            time.sleep(0.2)
        return msg

    srv = make_server(handler, threads=8)
    c = connect(srv)
    c.send(b"slow\n")
    for i in range(20):
        time.sleep(0.005)
        c.send(b"fast%d\n" % i)
    assert c.recv_messages(21) == [b"slow"] + [b"fast%d" % i for i in range(20)]
