"""Must show 3: a client that sends, then shuts its write side, gets every
reply and then EOF -- the server neither drops replies nor hangs up early."""

import random
import time

import pytest

import pollpool
from conftest import LENGTH4, LINE, RAW, assert_same_stream, exchange_many, py_echo

pytestmark = pytest.mark.timeout(60)

HANDLERS = {"native": lambda: pollpool.handlers.echo, "python": lambda: py_echo}


@pytest.mark.parametrize("handler_name", sorted(HANDLERS))
@pytest.mark.parametrize("framer", [LINE, LENGTH4], ids=repr)
def test_half_closed_client_gets_all_1000_replies_then_eof(make_server, connect, handler_name, framer):
    srv = make_server(HANDLERS[handler_name](), framing=framer.server_framing())
    c = connect(srv, framer)
    msgs = [b"msg-%04d" % i for i in range(1000)]
    c.send(framer.frames(msgs))
    c.shutdown_write()
    data = c.recv_until_closed()  # times out (fails) if the server never closes
    assert_same_stream(data, framer.frames(msgs), framer, "half-close")


@pytest.mark.parametrize("handler_name", sorted(HANDLERS))
def test_half_close_with_raw_framing_returns_every_byte(make_server, connect, handler_name):
    srv = make_server(HANDLERS[handler_name](), framing="raw")
    c = connect(srv, RAW)
    payload = random.Random(5).randbytes(300_000)
    c.send(payload)
    c.shutdown_write()
    data = c.recv_until_closed()
    assert len(data) == len(payload)
    assert data == payload


def test_half_close_while_slow_handler_still_busy(make_server, connect):
    """EOF arrives long before the replies are computed."""
    def handler(msg):
        time.sleep(0.0005)
        return msg.upper()

    srv = make_server(handler, threads=4)
    c = connect(srv)
    msgs = [b"slow-%04d" % i for i in range(1000)]
    c.send(LINE.frames(msgs))
    c.shutdown_write()
    data = c.recv_until_closed()
    assert_same_stream(data, LINE.frames([m.upper() for m in msgs]), LINE, "slow half-close")


def test_half_close_with_replies_larger_than_socket_buffers(make_server, connect):
    """4 MB of replies cannot fit in the kernel buffers, so the server must
    keep flushing on POLLOUT after the EOF before it closes."""
    srv = make_server(lambda m: m * 64)  # 64 KiB reply per 1 KiB message
    c = connect(srv, rcvbuf=64 * 1024)
    msgs = [(b"%04d" % i) * 256 for i in range(64)]
    c.send(LINE.frames(msgs))
    c.shutdown_write()
    time.sleep(0.3)  # the client is slow to read: server output piles up
    data = c.recv_until_closed()
    assert_same_stream(data, LINE.frames([m * 64 for m in msgs]), LINE, "big replies")


def test_half_close_sent_in_small_pieces(make_server, connect):
    srv = make_server(py_echo, framing="length")
    c = connect(srv, LENGTH4)
    msgs = [b"piece-%d" % i for i in range(200)]
    stream = LENGTH4.frames(msgs)
    for i in range(0, len(stream), 7):
        c.send(stream[i:i + 7])
    c.shutdown_write()
    assert_same_stream(c.recv_until_closed(), stream, LENGTH4, "pieces")


def test_many_concurrent_half_closing_clients(make_server):
    srv = make_server(py_echo, threads=4)
    payloads = [LINE.frames([b"c%d-%d" % (c, i) for i in range(1000)]) for c in range(30)]
    got = exchange_many(srv.address, payloads, half_close=True, chunk=8192,
                        rng=random.Random(6), timeout=50)
    for c, (g, p) in enumerate(zip(got, payloads)):
        assert_same_stream(g, p, LINE, f"client {c}")
