"""Must show 1: echo through the native and Python handlers in every framing is
the identity, byte for byte, however the stream is cut into reads."""

import random
import time

import pytest

import pollpool
from conftest import (CRLF, LENGTH1, LENGTH2, LENGTH4, LENGTH8, LINE, RAW, Framer,
                      assert_same_stream, py_echo)

pytestmark = pytest.mark.timeout(60)

HANDLERS = {
    "native": lambda: pollpool.handlers.echo,
    "python": lambda: py_echo,
}

FRAMED = [LINE, CRLF, LENGTH1, LENGTH2, LENGTH4, LENGTH8]
ALL = [RAW] + FRAMED


@pytest.fixture(params=sorted(HANDLERS))
def handler(request):
    return HANDLERS[request.param]()


def sample_messages(framer: Framer) -> list[bytes]:
    """Awkward messages for a framing: empty, binary, delimiter look-alikes."""
    every_byte = bytes(range(256))
    if framer.kind == "line":
        if framer.delimiter == b"\n":
            msgs = [b"hello", b"", b"\x00\xff\r binary \r", every_byte.replace(b"\n", b""), b"\r"]
        else:  # b"\r\n": a lone \r or \n is data
            msgs = [b"hello", b"", b"lone\rcr", b"lone\nlf", b"\r", b"\n", b"end\r",
                    every_byte, b"\n\r"]
        return msgs
    if framer.kind == "length":
        msgs = [b"hello", b"", b"\n\n\r\n", every_byte[:255], b"\x00" * 3, b"\xff" * 7]
        return msgs
    return [b"hello", every_byte, b"\n\r\n", b"x" * 1000]


def small_stream_messages(framer: Framer) -> list[bytes]:
    """A short multi-message stream, so that splitting it at every byte stays cheap."""
    if framer.kind == "line":
        return [b"ab", b"", b"c\rd", b"e"]
    return [b"ab", b"", b"\x00\n", b"e"]


def check_echo(client, framer: Framer, msgs: list[bytes]) -> None:
    stream = framer.frames(msgs)
    if framer.kind == "raw":
        assert client.recv_exactly(len(stream)) == stream
    else:
        got = client.recv_messages(len(msgs))
        assert got == msgs


@pytest.mark.parametrize("framer", ALL, ids=repr)
def test_echo_is_byte_exact(make_server, connect, handler, framer):
    srv = make_server(handler, framing=framer.server_framing())
    c = connect(srv, framer)
    msgs = sample_messages(framer)
    for m in msgs:  # one at a time: a request, then its reply
        c.send(framer.frame(m))
        check_echo(c, framer, [m])
    c.send(framer.frames(msgs))  # then all of them pipelined
    check_echo(c, framer, msgs)


@pytest.mark.parametrize("framer", ALL, ids=repr)
def test_echo_stream_split_at_every_byte_boundary(make_server, connect, handler, framer):
    srv = make_server(handler, framing=framer.server_framing())
    c = connect(srv, framer)
    msgs = small_stream_messages(framer)
    stream = framer.frames(msgs)
    for k in range(1, len(stream)):
        c.send(stream[:k])
        time.sleep(0.002)  # let the server read the first part on its own
        c.send(stream[k:])
        check_echo(c, framer, msgs)


@pytest.mark.parametrize("framer", ALL, ids=repr)
def test_echo_stream_sent_one_byte_at_a_time(make_server, connect, handler, framer):
    srv = make_server(handler, framing=framer.server_framing())
    c = connect(srv, framer)
    msgs = small_stream_messages(framer) * 3
    c.send_slowly(framer.frames(msgs), step=1, pause=0.001)
    check_echo(c, framer, msgs)
    # The connection is still in a sane state afterwards.
    c.send(framer.frames([b"after"]))
    check_echo(c, framer, [b"after"])


@pytest.mark.parametrize("framer", ALL, ids=repr)
def test_many_messages_in_one_send_all_answered(make_server, connect, handler, framer):
    srv = make_server(handler, framing=framer.server_framing())
    c = connect(srv, framer)
    rng = random.Random(1)
    limit = min(300, framer.max_payload)
    msgs = [bytes(rng.getrandbits(8) for _ in range(rng.randint(0, limit))) for _ in range(2000)]
    if framer.kind == "line":
        msgs = [m.replace(b"\r", b"").replace(b"\n", b"") for m in msgs]
    c.send(framer.frames(msgs))
    if framer.kind == "raw":
        assert c.recv_exactly(sum(map(len, msgs))) == b"".join(msgs)
    else:
        got = c.recv_messages(len(msgs))
        assert got == msgs


@pytest.mark.parametrize("framer", [RAW, LINE, CRLF, LENGTH2, LENGTH4, LENGTH8], ids=repr)
def test_large_messages_echo_intact(make_server, connect, handler, framer):
    srv = make_server(handler, framing=framer.server_framing())
    c = connect(srv, framer)
    size = min(1_000_000, framer.max_payload)
    rng = random.Random(2)
    big = rng.randbytes(size)
    if framer.kind == "line":
        big = big.replace(b"\r", b"r").replace(b"\n", b"n")
    msgs = [big, b"small", big[::-1]]
    stream = framer.frames(msgs)
    c.send(stream)
    if framer.kind == "raw":
        assert_same_stream(c.recv_exactly(len(stream)), stream, RAW, "raw")
    else:
        got = c.recv_messages(len(msgs))
        assert [len(m) for m in got] == [len(m) for m in msgs]
        assert got == msgs


def test_python_handler_receives_bytes(make_server, connect):
    seen = []

    def handler(msg):
        seen.append(type(msg))
        return msg

    srv = make_server(handler)
    c = connect(srv)
    assert c.exchange([b"a", b"", b"bc"]) == [b"a", b"", b"bc"]
    assert seen == [bytes, bytes, bytes]


@pytest.mark.parametrize("kind", ["bytes", "bytearray", "memoryview"])
@pytest.mark.parametrize("framer", [LINE, LENGTH4], ids=repr)
def test_python_handler_may_return_any_bytes_like(make_server, connect, kind, framer):
    convert = {"bytes": bytes, "bytearray": bytearray, "memoryview": memoryview}[kind]
    srv = make_server(lambda m: convert(b"<" + m + b">"), framing=framer.server_framing())
    c = connect(srv, framer)
    assert c.exchange([b"x", b"", b"yz"]) == [b"<x>", b"<>", b"<yz>"]


def test_python_handler_returning_none_sends_nothing(make_server, connect):
    srv = make_server(lambda m: None if m.startswith(b"quiet") else m.upper())
    c = connect(srv)
    c.send(b"quiet1\nloud\nquiet2\nquiet3\nlast\n")
    assert c.recv_messages(2) == [b"LOUD", b"LAST"]
    # No reply was held back for the quiet messages: the next reply is the next one.
    assert c.exchange([b"more"]) == [b"MORE"]


def test_python_handler_output_differs_from_input(make_server, connect):
    """Replies come from the handler, not from the input buffer."""
    srv = make_server(lambda m: m[::-1] * 2, framing="length")
    c = connect(srv, LENGTH4)
    assert c.exchange([b"abc", b"", b"xy"]) == [b"cbacba", b"", b"yxyx"]


@pytest.mark.parametrize("header_bytes", [1, 2])
def test_narrow_length_header_works_with_the_default_max_size(make_server, connect, header_bytes):
    """LengthPrefixed(header_bytes=1) (and the CLI's "length:1") must be usable
    as written: the default max_size is fitted to what the header can carry."""
    framer = Framer("length", header_bytes=header_bytes)
    srv = make_server(framing=pollpool.LengthPrefixed(header_bytes=header_bytes))
    c = connect(srv, framer)
    top = b"m" * ((1 << (8 * header_bytes)) - 1)
    assert c.exchange([b"x", top]) == [b"x", top]


def test_raw_max_size_caps_each_message(make_server, connect):
    """Raw framing hands the handler chunks of at most max_size bytes, and the
    echoed stream is still the identity."""
    sizes = []

    def handler(msg):
        sizes.append(len(msg))
        return msg

    srv = make_server(handler, framing=pollpool.Raw(max_size=16))
    c = connect(srv, RAW)
    payload = bytes(range(256)) * 20
    c.send(payload)
    assert c.recv_exactly(len(payload)) == payload
    assert sizes and max(sizes) <= 16 and sum(sizes) == len(payload)
