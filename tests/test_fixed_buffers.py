"""Every copy into a fixed-size buffer checks the whole length it writes.

A connection-aware Python handler's replies are staged in a 16 KiB buffer on
the worker's stack (pp_py_batch in _build.py).  The review found the
one-message shortcut checking the reply alone against that buffer, then
copying the reply *and* its delimiter: up to 15 bytes past the end, enough to
overwrite a saved register and crash the process.  The client chooses the
message that produces such a reply, so this sweeps reply sizes across every
fixed buffer's edge (the stack buffer, the 2 KiB read room, the 16 KiB read
chunk, the 64 KiB flush mark) for every delimiter length from 1 to 16, alone
and pipelined.  The servers run in a child process, so a crash is reported
as a failure with the child's stderr rather than taking pytest down.
"""

from __future__ import annotations

import random
import sys
import textwrap

import pytest

import pollpool
from conftest import Client, Framer, assert_no_crash_text, wait_closed

pytestmark = pytest.mark.timeout(240)

#: Sizes of the buffers on a reply's way out; each is swept around its edge.
EDGES = (2048, 16384, 65536)
#: Delimiters of every length 1..16 that share no byte with the digits,
#: spaces and 'y's of the messages and replies.
DELIMS = [b"#$%&'()*+,-./:;<"[:n] for n in range(1, 17)]
#: The built core's stack buffer for staged replies (PP_PY_SCRATCH).
SCRATCH = 16384

SERVERS = textwrap.dedent("""
    import sys, time, pollpool

    class Sized:
        # "N" -> N bytes of b"y"; "N M" -> N bytes, then M more in a
        # separate message of the same task (pipelined by the client).
        def on_message(self, conn, message):
            return b"y" * int(message)

    def plain(message):
        return b"y" * int(message)

    delims = [bytes.fromhex(h) for h in sys.argv[1].split(",")]
    servers = []
    for d in delims:
        for handler in (Sized(), plain):
            srv = pollpool.Server(handler, port=0, threads=2,
                                  framing=pollpool.Lines(delimiter=d))
            srv.start()
            servers.append(srv)
    print("ports", *[s.address[1] for s in servers], flush=True)
    time.sleep(600)
""")


def sizes_around_edges(delim_len: int) -> list[int]:
    """Reply body sizes whose framed size (body + delimiter) lands on each
    edge, just below it and just above it."""
    out = set()
    for edge in EDGES:
        for framed in range(edge - 18, edge + 3):
            if framed - delim_len >= 0:
                out.add(framed - delim_len)
    return sorted(out)


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """One child process serving a connection-aware and a plain-callable
    handler for each delimiter; yields {delimiter: (aware_port, plain_port)}."""
    from conftest import Child, subprocess_env
    tmp = tmp_path_factory.mktemp("fixed_buffers")
    script = tmp / "servers.py"
    script.write_text(SERVERS)
    child = Child([sys.executable, str(script), ",".join(d.hex() for d in DELIMS)],
                  cwd=tmp, env=subprocess_env(), stderr_path=tmp / "stderr")
    try:
        ports = [int(p) for p in child.wait_line(r"^ports ").string.split()[1:]]
        yield child, {d: (ports[2 * i], ports[2 * i + 1]) for i, d in enumerate(DELIMS)}
    finally:
        child.kill()
        assert_no_crash_text(child.stderr())


def exchange(port: int, delim: bytes, requests: list[int], what: str) -> None:
    framer = Framer("line", delimiter=delim)
    c = Client(("127.0.0.1", port), framer)
    try:
        c.send(b"".join(framer.frame(b"%d" % n) for n in requests))
        for n in requests:
            got = c.recv_exactly(n + len(delim))
            assert got == b"y" * n + delim, (what, n, len(got))
    finally:
        c.close()


@pytest.mark.parametrize("delim", DELIMS, ids=[f"delim{len(d)}" for d in DELIMS])
def test_reply_sizes_across_every_buffer_edge_arrive_whole(servers, delim, backend):
    child, ports = servers
    aware, plain = ports[delim]
    sizes = sizes_around_edges(len(delim))
    # The one-message shortcut: one request per task, one at a time.
    for n in sizes:
        exchange(aware, delim, [n], f"aware, alone, {delim!r}")
    # Several messages per task: the batch path frames them together.
    rng = random.Random(len(delim))
    for n in sizes:
        exchange(aware, delim, [n, rng.choice(sizes), 3], f"aware, pipelined, {delim!r}")
    for n in sizes[::3]:
        exchange(plain, delim, [n, 1], f"plain, {delim!r}")
    assert child.proc.poll() is None, child.stderr()[-3000:]


def test_sweep_reaches_the_staging_buffer_edge_exactly():
    # The sweep above must include the framed sizes SCRATCH and SCRATCH + 1
    # for every delimiter length, or it would not catch an off-by-delimiter.
    for delim in DELIMS:
        framed = {n + len(delim) for n in sizes_around_edges(len(delim))}
        assert {SCRATCH - len(delim) + 1, SCRATCH, SCRATCH + 1} <= framed


def test_length_header_of_8_with_the_largest_max_size_serves_a_100k_frame(make_server, connect,
                                                                          backend):
    # in_limit = max_size + framing + 64 KiB wrapped to a few KiB: the frame
    # could never be read whole and its connection stalled forever.
    framer = Framer("length", header_bytes=8)
    srv = make_server(pollpool.handlers.echo,
                      framing=pollpool.LengthPrefixed(8, max_size=2**64 - 1))
    msg = bytes(random.Random(7).getrandbits(8) for _ in range(100_000))
    c = connect(srv, framer)
    c.send(framer.frame(msg))
    assert c.recv_exactly(8 + len(msg)) == framer.frame(msg)
    assert srv.stats()["oversize_frames"] == 0


@pytest.mark.parametrize("size", [2**64, 2**70])
def test_max_size_beyond_what_the_core_can_hold_is_refused_at_construction(size):
    with pytest.raises(ValueError, match="max_size"):
        pollpool.LengthPrefixed(8, max_size=size)
    with pytest.raises(ValueError, match="max_size"):
        pollpool.Lines(max_size=size)
    with pytest.raises(ValueError, match="max_message_size|max_size"):
        pollpool.Server(pollpool.handlers.echo, port=0, max_message_size=size)


NATIVE_PARTIAL = r"""
#include <string.h>
#include "pollpool.h"

/* "pay" writes half a reply, then fails; anything else is echoed. */
int pay(void *ctx, const unsigned char *msg, size_t len, pp_reply *reply)
{
    (void)ctx;
    if (len == 3 && memcmp(msg, "pay", 3) == 0) {
        pp_reply_write(reply, "BALANCE=", 8);
        return -1;
    }
    return pp_reply_write(reply, msg, len) < 0 ? -1 : PP_KEEP;
}

/* A handler whose open hook greets, then refuses the connection. */
int greet(void *ctx, const unsigned char *msg, size_t len, pp_reply *reply)
{
    (void)ctx;
    return pp_reply_write(reply, msg, len) < 0 ? -1 : PP_KEEP;
}

int greet_open(void *ctx, pp_reply *reply)
{
    (void)ctx;
    pp_reply_write(reply, "HELLO", 5);
    return -1;
}
"""


def test_native_handler_that_fails_after_writing_sends_no_part_of_that_reply(
        tmp_path, make_server, connect, backend):
    from test_native_handlers import build
    lib = build(tmp_path, NATIVE_PARTIAL, "partial")
    srv = make_server(pollpool.NativeHandler.from_library(str(lib), "pay"))
    c = connect(srv)
    c.send(b"one\npay\nafter\n")
    assert wait_closed(c) == b"one\n"  # not b"one\nBALANCE=\n"
    st = srv.stats()
    assert st["handler_errors"] == 1 and st["replies"] == 1, st


def test_native_open_hook_that_fails_after_greeting_sends_no_greeting(
        tmp_path, make_server, connect, backend):
    from test_native_handlers import build
    lib = build(tmp_path, NATIVE_PARTIAL, "partial")
    srv = make_server(pollpool.NativeHandler.from_library(str(lib), "greet"))
    c = connect(srv)
    assert wait_closed(c) == b""  # not b"HELLO\n"
    assert srv.stats()["handler_errors"] == 1
