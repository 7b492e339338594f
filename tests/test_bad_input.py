"""Must show 4: oversized or malformed frames close that connection only, are
counted in the stats, and never make the server allocate what the peer claims."""

import socket
import struct
import time

import pytest

import pollpool
from conftest import (LENGTH4, LENGTH8, LINE, Framer, py_echo, rss_bytes, proc_status_kib,
                      wait_closed, wait_stat)

pytestmark = pytest.mark.timeout(60)

MiB = 1 << 20
#: Error replies are allowed before the close, but must be small.
MAX_ERROR_REPLY = 4096


def assert_closed_after(client, expected_prefix: bytes, bad: bytes = b"") -> bytes:
    """The connection is closed (EOF or reset) after exactly the replies owed;
    at most a short error reply may follow them, never an echo of the bad bytes."""
    data = wait_closed(client)
    assert data.startswith(expected_prefix), f"got {data[:200]!r}"
    tail = data[len(expected_prefix):]
    assert len(tail) <= MAX_ERROR_REPLY, f"{len(tail)} unexpected bytes after the owed replies"
    if len(bad) >= 16:
        assert bad[:16] not in tail, "the oversized frame was echoed"
    return data


@pytest.mark.parametrize("handler", [pollpool.handlers.echo, py_echo], ids=["native", "python"])
def test_oversize_line_closes_only_that_connection(make_server, connect, handler):
    srv = make_server(handler, framing=pollpool.Lines(max_size=1024))
    good = connect(srv)
    bad = connect(srv)
    assert good.exchange([b"before"]) == [b"before"]
    good.send(b"half of a good mess")  # a partial frame pending on the good connection
    big = b"x" * 5000
    bad.send(b"fine\n" + big)  # no delimiter anywhere in 5000 bytes
    assert_closed_after(bad, b"fine\n", big)
    good.send(b"age\n")
    assert good.recv_message() == b"half of a good message"
    assert good.exchange([b"after"]) == [b"after"]
    assert wait_stat(srv, "oversize_frames", 1) == 1
    # New connections are served too.
    assert connect(srv).exchange([b"new"]) == [b"new"]


def test_oversize_line_with_its_delimiter_in_the_same_send(make_server, connect):
    srv = make_server(framing=pollpool.Lines(max_size=1024))
    bad = connect(srv)
    big = b"y" * 3000
    bad.send(big + b"\nnext\n")
    assert_closed_after(bad, b"", big)
    assert wait_stat(srv, "oversize_frames", 1) == 1


@pytest.mark.parametrize("framer", [LINE, LENGTH4], ids=repr)
def test_message_of_exactly_max_size_is_accepted_and_one_more_byte_is_not(make_server, connect, framer):
    limit = 1000
    srv = make_server(framing=framer.server_framing(max_size=limit))
    c = connect(srv, framer)
    ok = b"a" * limit
    assert c.exchange([ok]) == [ok]
    c.send(framer.frame(b"b" * (limit + 1)))
    assert_closed_after(c, b"", b"b" * (limit + 1))
    assert wait_stat(srv, "oversize_frames", 1) == 1


def test_max_message_size_option_overrides_the_framing_limit(make_server, connect):
    srv = make_server(framing=pollpool.Lines(max_size=1 << 20), max_message_size=100)
    c = connect(srv)
    assert c.exchange([b"z" * 100]) == [b"z" * 100]
    c.send(b"z" * 101 + b"\n")
    assert_closed_after(c, b"", b"z" * 101)


def test_garbage_length_prefix_closes_only_that_connection(make_server, connect):
    srv = make_server(py_echo, framing="length")
    good = connect(srv, LENGTH4)
    bad = connect(srv, LENGTH4)
    assert good.exchange([b"one"]) == [b"one"]
    good.send(LENGTH4.frame(b"two")[:5])  # header and one byte of body pending
    garbage = b"GET / HTTP/1.1\r\nHost: example\r\n\r\n"  # a 1.2 GB "length"
    bad.send(LENGTH4.frame(b"ok") + garbage)
    assert_closed_after(bad, LENGTH4.frame(b"ok"), garbage)
    good.send(LENGTH4.frame(b"two")[5:])
    assert good.recv_message() == b"two"
    assert good.exchange([b"three"]) == [b"three"]
    assert wait_stat(srv, "oversize_frames", 1) == 1
    assert connect(srv, LENGTH4).exchange([b"new"]) == [b"new"]


@pytest.mark.parametrize("header_bytes,claimed", [(4, 0xFFFFFFFF), (8, 1 << 62), (8, (1 << 64) - 1)])
def test_huge_length_prefix_allocates_nothing_large(make_server, connect, header_bytes, claimed):
    framer = Framer("length", header_bytes=header_bytes)
    srv = make_server(framing=framer.server_framing())
    good = connect(srv, framer)
    assert good.exchange([b"warm"]) == [b"warm"]
    rss_before = rss_bytes()
    bads = []
    for _ in range(4):
        bad = connect(srv, framer)
        bad.send(claimed.to_bytes(header_bytes, "big") + b"\xab" * 100)
        bads.append(bad)
    for bad in bads:
        assert_closed_after(bad, b"")
    assert good.exchange([b"still here"]) == [b"still here"]
    grown = rss_bytes() - rss_before
    assert grown < 64 * MiB, f"RSS grew by {grown / MiB:.1f} MiB"
    assert wait_stat(srv, "oversize_frames", 4) == 4


def test_4gib_prefix_within_the_limit_is_not_allocated_up_front(make_server, connect):
    """With a limit above 4 GiB the frame is legal, so the server must wait for
    its body -- growing the buffer with what arrives, not with what is claimed."""
    srv = make_server(framing=pollpool.LengthPrefixed(header_bytes=8, max_size=1 << 33))
    good = connect(srv, LENGTH8)
    assert good.exchange([b"warm"]) == [b"warm"]
    rss_before = rss_bytes()
    vm_before = proc_status_kib("VmSize") * 1024
    bads = [connect(srv, LENGTH8) for _ in range(4)]
    for bad in bads:
        bad.send((4 << 30).to_bytes(8, "big") + b"\xcd" * 1000)
    time.sleep(0.3)  # let the server read and (wrongly) reserve
    assert good.exchange([b"still here"]) == [b"still here"]
    rss_grown = rss_bytes() - rss_before
    vm_grown = proc_status_kib("VmSize") * 1024 - vm_before
    assert rss_grown < 64 * MiB, f"RSS grew by {rss_grown / MiB:.1f} MiB"
    # Four 4 GiB reservations would add 16 GiB of address space.
    assert vm_grown < 2048 * MiB, f"virtual size grew by {vm_grown / MiB:.0f} MiB"
    for bad in bads:
        bad.close()
    wait_stat(srv, "closed", 4)


def test_length_frame_split_inside_the_header_is_fine(make_server, connect):
    """A header that arrives one byte at a time is not 'garbage'."""
    srv = make_server(framing=pollpool.LengthPrefixed(header_bytes=8))
    c = connect(srv, LENGTH8)
    c.send_slowly(LENGTH8.frame(b"payload"), step=1, pause=0.002)
    assert c.recv_message() == b"payload"
    assert srv.stats()["oversize_frames"] == 0


def test_peer_reset_mid_reply_does_not_disturb_others(make_server, connect):
    """A client that resets while large replies are still going out."""
    srv = make_server(lambda m: m * 1000)
    good = connect(srv)
    for _ in range(5):
        bad = connect(srv, rcvbuf=8192)
        bad.send(b"0123456789" * 100 + b"\n")
        bad.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        bad.close()  # RST with replies in flight
    assert good.exchange([b"ok"]) == [b"ok" * 1000]
    assert wait_for_active(srv, 1)


def wait_for_active(srv, n, timeout=5.0):
    deadline = time.monotonic() + timeout
    while srv.stats()["active"] != n:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True
