"""Must show 5: a Python handler that raises or returns the wrong type closes
only its own connection; the error is logged on the "pollpool" logger and
counted; the server keeps serving old and new connections."""

import logging

import pytest

import pollpool
from conftest import LENGTH4, Framer, wait_closed, wait_for, wait_stat

pytestmark = pytest.mark.timeout(60)


class Kaboom(Exception):
    pass


def raise_kaboom():
    raise Kaboom("kaboom-marker-7781")


FAILURES = {
    "raises": raise_kaboom,
    "returns_int": lambda: 42,
    "returns_str": lambda: "a str is not bytes",
    "returns_list": lambda: [b"x"],
}


def make_handler(kind):
    def handler(msg):
        if msg == b"boom":
            return FAILURES[kind]()
        return msg.upper()
    return handler


def pollpool_errors(caplog):
    return [r for r in caplog.records
            if r.name.split(".")[0] == "pollpool" and r.levelno >= logging.ERROR]


@pytest.mark.parametrize("kind", sorted(FAILURES))
def test_failing_handler_closes_only_its_connection(make_server, connect, caplog, kind):
    caplog.set_level(logging.ERROR, logger="pollpool")
    srv = make_server(make_handler(kind), threads=4)
    bystander = connect(srv)
    assert bystander.exchange([b"hi"]) == [b"HI"]
    victim = connect(srv)
    victim.send(b"a\nboom\nc\n")
    # The reply owed for "a" arrives, then the close; "c" is never handled.
    assert wait_closed(victim) == b"A\n"
    # Logged at ERROR on the pollpool logger, from whichever worker ran it.
    assert wait_for(lambda: pollpool_errors(caplog), 5), "no ERROR record on the pollpool logger"
    text = caplog.text
    if kind == "raises":
        assert "kaboom-marker-7781" in text
    else:
        assert "TypeError" in text or kind.split("_")[1] in text, text
    assert wait_stat(srv, "handler_errors", 1) == 1
    # The bystander and new connections carry on.
    assert bystander.exchange([b"still", b"there"]) == [b"STILL", b"THERE"]
    assert connect(srv).exchange([b"new"]) == [b"NEW"]
    assert srv.stats()["handler_errors"] == 1


def test_handler_error_with_length_framing_keeps_earlier_replies(make_server, connect, caplog):
    caplog.set_level(logging.ERROR, logger="pollpool")
    srv = make_server(make_handler("raises"), framing="length")
    victim = connect(srv, LENGTH4)
    victim.send(LENGTH4.frames([b"one", b"two", b"boom", b"four"]))
    assert wait_closed(victim) == LENGTH4.frames([b"ONE", b"TWO"])
    assert connect(srv, LENGTH4).exchange([b"x"]) == [b"X"]


def test_many_failing_connections_leave_the_server_healthy(make_server, connect, caplog):
    caplog.set_level(logging.ERROR, logger="pollpool")
    srv = make_server(make_handler("raises"), threads=4)
    bystander = connect(srv)
    victims = [connect(srv) for _ in range(20)]
    for v in victims:
        v.send(b"boom\n")
    for v in victims:
        assert wait_closed(v) == b""
    assert wait_stat(srv, "handler_errors", 20) == 20
    assert len(pollpool_errors(caplog)) >= 20
    assert bystander.exchange([b"ok"]) == [b"OK"]
    assert wait_for(lambda: srv.stats()["active"] == 1, 5), srv.stats()


def test_base_exception_in_handler_is_contained(make_server, connect, caplog):
    """SystemExit raised on a worker thread must not end the server (or the test process)."""
    caplog.set_level(logging.ERROR, logger="pollpool")

    def handler(msg):
        if msg == b"exit":
            raise SystemExit(3)
        return msg

    srv = make_server(handler)
    victim = connect(srv)
    victim.send(b"exit\n")
    assert wait_closed(victim) == b""
    assert connect(srv).exchange([b"alive"]) == [b"alive"]
    assert wait_stat(srv, "handler_errors", 1) == 1


def test_handler_returning_none_is_not_an_error(make_server, connect, caplog):
    caplog.set_level(logging.ERROR, logger="pollpool")
    srv = make_server(lambda m: None)
    c = connect(srv)
    c.send(b"a\nb\n")
    c.send(b"c\n")
    srv_stats = wait_for(lambda: srv.stats()["messages"] >= 3 and srv.stats(), 5)
    assert srv_stats["handler_errors"] == 0
    assert srv_stats["replies"] == 0
    assert srv_stats["active"] == 1  # still open
    assert not pollpool_errors(caplog)


def test_reply_too_large_for_the_length_header_closes_the_connection(make_server, connect, caplog):
    """A 1-byte header cannot carry a 300-byte reply: that is the handler's
    error, so its connection closes after the replies before it."""
    caplog.set_level(logging.ERROR, logger="pollpool")
    srv = make_server(lambda m: m * 300 if m == b"big" else m,
                      framing=pollpool.LengthPrefixed(header_bytes=1, max_size=255))
    framer = Framer("length", header_bytes=1)
    victim = connect(srv, framer)
    victim.send(framer.frames([b"ok", b"big", b"never"]))
    assert wait_closed(victim) == framer.frame(b"ok")
    assert wait_for(lambda: pollpool_errors(caplog), 5)
    assert connect(srv, framer).exchange([b"fine"]) == [b"fine"]
