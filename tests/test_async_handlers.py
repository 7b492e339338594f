"""Replies that come later: ``async def`` handlers on each of the three loops
they may run on, handlers that return futures, and what happens to a pending
reply when its connection goes, times out, or the server stops."""

from __future__ import annotations

import asyncio
import concurrent.futures
import socket
import textwrap
import threading
import time

import pytest

import pollpool
from conftest import LENGTH4, LINE, Client, wait_closed, wait_for

pytestmark = pytest.mark.timeout(60)

try:
    import uvloop
except ImportError:  # pragma: no cover - the [bench] extra installs it
    uvloop = None


def _own_loop_type():
    return uvloop.Loop if uvloop is not None else asyncio.AbstractEventLoop


class Upper:
    """A coroutine handler that waits, then answers; it notes the loop and
    thread it ran on."""

    def __init__(self, delay=0.001):
        self.delay = delay
        self.loops = set()
        self.threads = set()

    async def __call__(self, message: bytes) -> bytes:
        await asyncio.sleep(self.delay)
        self.loops.add(asyncio.get_running_loop())
        self.threads.add(threading.current_thread().name)
        assert asyncio.current_task() is not None  # a real task: timeouts work
        return message.upper()


@pytest.mark.parametrize("framer", [LINE, LENGTH4], ids=["line", "length"])
def test_coroutine_handler_on_a_loop_of_its_own_keeps_order(make_server, connect, framer):
    h = Upper()
    srv = make_server(h, framing=framer.server_framing(), threads=2)
    clients = [connect(srv, framer) for _ in range(20)]
    msgs = [b"m%03d-" % i + b"x" * (i % 40) for i in range(200)]
    for c in clients:
        c.send_messages(msgs)           # pipelined: each waits for the one before
    for c in clients:
        assert c.recv_messages(len(msgs)) == [m.upper() for m in msgs]
    (loop,) = h.loops
    assert isinstance(loop, _own_loop_type())
    assert h.threads == {"pollpool-asyncio"}
    stats = srv.stop()
    assert stats["deferred_total"] >= 20 and stats["deferred"] == 0
    assert stats["replies"] == 20 * 200
    assert loop.is_closed()
    assert not any(t.name == "pollpool-asyncio" for t in threading.enumerate())


def test_coroutine_handler_on_the_loop_given(make_server, connect):
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="mine")
    thread.start()
    try:
        h = Upper()
        srv = make_server(h, loop=loop)
        c = connect(srv)
        assert c.exchange([b"a", b"b"]) == [b"A", b"B"]
        assert h.loops == {loop} and h.threads == {"mine"}
        srv.stop()
        assert loop.is_running()        # not ours: left running
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def test_coroutine_handler_on_the_running_loop_of_async_with():
    h = Upper()

    async def main():
        async with pollpool.Server(h, port=0) as srv:
            reader, writer = await asyncio.open_connection(*srv.address)
            writer.write(b"x\ny\n")
            got = [await reader.readline(), await reader.readline()]
            writer.close()
            await writer.wait_closed()
            return got, asyncio.get_running_loop(), threading.current_thread().name

    got, loop, name = asyncio.run(main())
    assert got == [b"X\n", b"Y\n"]
    assert h.loops == {loop} and h.threads == {name}


class Chat:
    """Connection-aware, all three hooks coroutines, pushing from them."""

    def __init__(self):
        self.events = []
        self.server = None

    async def on_connect(self, conn):
        await asyncio.sleep(0.01)
        self.events.append(("connect", conn.id))
        return b"welcome"

    async def on_message(self, conn, message):
        if message == b"quit":
            conn.close()
            return b"bye"
        await asyncio.sleep(0)
        assert conn.send(b"push:" + message)   # a push goes out at once
        return b"re:" + message

    async def on_disconnect(self, conn):
        await asyncio.sleep(0)
        self.events.append(("disconnect", conn.id))


def test_connection_aware_coroutines_greet_answer_push_and_close(make_server, connect):
    chat = Chat()
    srv = make_server(chat)
    c = connect(srv)
    c.send_messages([b"early"])         # waits for the greeting
    assert c.recv_messages(3) == [b"welcome", b"push:early", b"re:early"]
    c.send_messages([b"quit", b"never"])
    assert c.recv_messages(1) == [b"bye"]
    assert wait_closed(c) == b""
    wait_for(lambda: len(chat.events) == 2)
    (_, cid), (_, did) = chat.events
    assert chat.events[0][0] == "connect" and chat.events[1][0] == "disconnect" and cid == did
    assert srv.stop()["handler_errors"] == 0


def test_a_failing_or_cancelled_coroutine_closes_its_connection_only(make_server, connect, caplog):
    async def handler(message):
        await asyncio.sleep(0)
        if message == b"boom":
            raise ValueError("boom")
        if message == b"cancel":
            raise asyncio.CancelledError()
        return message

    srv = make_server(handler)
    good = connect(srv)
    for bad in (b"boom", b"cancel"):
        c = connect(srv)
        c.send_messages([b"before", bad, b"after"])
        assert c.recv_messages(1) == [b"before"]
        assert wait_closed(c) == b""
        assert good.exchange([b"still"]) == [b"still"]
    assert "boom" in caplog.text
    stats = srv.stop()
    assert stats["handler_errors"] == 2


@pytest.mark.parametrize("aware", [False, True], ids=["plain", "aware"])
def test_a_handler_returning_a_future_from_a_thread_pool(make_server, connect, aware):
    pool = concurrent.futures.ThreadPoolExecutor(4)

    def work(message):
        time.sleep(0.002 * (message[-1] % 3))   # finishes out of order
        if message == b"bad":
            raise RuntimeError("bad")
        return message[::-1]

    def plain(message):
        if message.startswith(b"sync"):
            return message                         # bytes at once, in between
        return pool.submit(work, message)

    class Aware:
        def on_message(self, conn, message):
            return plain(message)

    try:
        srv = make_server(Aware() if aware else plain, threads=2)
        clients = [connect(srv) for _ in range(8)]
        msgs = [b"abc%d" % i if i % 5 else b"sync%d" % i for i in range(60)]
        want = [m if m.startswith(b"sync") else m[::-1] for m in msgs]
        for c in clients:
            c.send_messages(msgs)
        for c in clients:
            assert c.recv_messages(len(msgs)) == want
        bad = connect(srv)
        bad.send_messages([b"ok1", b"bad", b"never"])
        assert bad.recv_messages(1) == [b"1ko"]
        assert wait_closed(bad) == b""
        assert clients[0].exchange([b"xyz"]) == [b"zyx"]
        stats = srv.stop()
        assert stats["messages"] == 8 * 60 + 2 + 1
    finally:
        pool.shutdown()


def test_a_handler_returning_an_asyncio_future(make_server, connect):
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever)
    thread.start()
    try:
        def handler(message):
            fut = asyncio.run_coroutine_threadsafe(asyncio.sleep(0.001, result=b"cf"), loop)
            if message == b"raw":
                # An asyncio future made from a worker thread, resolved on its loop.
                af = loop.create_future()
                loop.call_soon_threadsafe(af.set_result, b"af")
                return af
            return fut

        srv = make_server(handler)
        c = connect(srv)
        assert c.exchange([b"x", b"raw", b"y"]) == [b"cf", b"af", b"cf"]
        srv.stop()
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def test_reply_timeout_closes_the_stuck_connection_only(make_server, connect):
    cancelled = []

    async def handler(message):
        if message == b"stuck":
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                cancelled.append(message)
                raise
        return message

    srv = make_server(handler, reply_timeout=0.3)
    stuck, other = connect(srv), connect(srv)
    stuck.send_messages([b"stuck"])
    deadline = time.monotonic() + 0.6
    while time.monotonic() < deadline:
        assert other.exchange([b"alive"]) == [b"alive"]
    assert wait_closed(stuck) == b""
    wait_for(lambda: cancelled == [b"stuck"])
    assert other.exchange([b"still"]) == [b"still"]
    stats = srv.stop()
    assert stats["reply_timeouts"] == 1 and stats["deferred"] == 0


def test_a_reset_cancels_the_pending_coroutine_then_on_disconnect_runs_once(make_server):
    log = []

    class Slow:
        async def on_message(self, conn, message):
            log.append("started")
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                log.append("cancelled")
                raise

        def on_disconnect(self, conn):
            log.append("disconnect")

    srv = make_server(Slow())
    c = Client(srv.address)
    c.send_messages([b"wait"])
    assert wait_for(lambda: log == ["started"])
    c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
    c.close()
    wait_for(lambda: len(log) == 3)
    assert log == ["started", "cancelled", "disconnect"]
    time.sleep(0.05)
    assert log == ["started", "cancelled", "disconnect"]
    assert srv.stop()["deferred"] == 0


def test_stop_from_a_coroutine_starts_the_drain_and_returns(make_server, connect):
    holder = {}

    async def handler(message):
        if message == b"shutdown":
            holder["stats"] = holder["srv"].stop()   # on the loop: must not wait
            return b"stopping"
        return message

    srv = holder["srv"] = make_server(handler, shutdown_message=b"bye")
    c = connect(srv)
    assert c.exchange([b"a", b"shutdown"]) == [b"a", b"stopping"]
    assert c.recv_messages(1) == [b"bye"]
    assert wait_closed(c) == b""
    wait_for(lambda: not srv.running)
    assert not srv.forced and "stats" in holder


SIGINT_SCRIPT = textwrap.dedent("""
    import asyncio, json, sys, threading, warnings
    import pollpool

    started = 0

    async def handler(message):
        global started
        started += 1
        if started == N:
            print("pending", N, flush=True)
        if message.startswith(b"quick"):
            await asyncio.sleep(0.5)
            return message
        await asyncio.sleep(3600)
        return b"never"

    N = int(sys.argv[1])
    srv = pollpool.Server(handler, port=0, drain_timeout=2.0, backlog=2048)
    stats = srv.serve_forever(on_ready=lambda: print("pollpool listening on %s:%d" % srv.address,
                                                      flush=True))
    print("stats", json.dumps(stats), flush=True)
    print("threads", len(threading.enumerate()), flush=True)
""")


def test_sigint_with_a_thousand_coroutines_pending(spawn, tmp_path):
    n = 1000
    script = tmp_path / "server.py"
    script.write_text(SIGINT_SCRIPT)
    child = spawn(["-W", "error::RuntimeWarning", str(script), str(n)])
    address = child.wait_listening()
    socks = []
    try:
        for i in range(n):
            s = socket.create_connection(address, timeout=20)
            s.sendall(b"quick%d\n" % i if i % 2 == 0 else b"stuck%d\n" % i)
            socks.append(s)
        child.wait_line(r"^pending 1000$")
        child.signal(2)
        for i, s in enumerate(socks):
            got = b""
            while True:
                chunk = s.recv(100)
                if not chunk:
                    break
                got += chunk
            assert got == (b"quick%d\n" % i if i % 2 == 0 else b""), (i, got)
    finally:
        for s in socks:
            s.close()
    assert child.wait(30) == 0, child.stderr()[-3000:]
    import json
    stats = json.loads(child.wait_line(r"^stats (.*)$").group(1))
    assert stats["deferred_cancelled"] == n // 2
    assert stats["replies"] == n // 2 and stats["forced_closes"] == 0
    assert child.wait_line(r"^threads (\d+)$").group(1) == "1"
    err = child.stderr()
    assert "Task was destroyed" not in err and "Traceback" not in err, err[-3000:]


def test_a_task_that_cannot_reach_the_loop_closes_its_connection_only(make_server, connect,
                                                                       caplog):
    async def handler(message):
        return message

    srv = make_server(handler)
    runner = srv._runner
    real = runner._unpack

    def unpack(it):
        if it.conn_id == victim_id[0]:
            raise MemoryError("no memory for the messages")
        return real(it)

    victim_id = [0]
    runner._unpack = unpack
    good = connect(srv)
    assert good.exchange([b"hello"]) == [b"hello"]
    victim = connect(srv)
    victim_id[0] = 2  # ids count up from 1 in accept order: good is 1
    victim.send_messages([b"lost"])
    assert wait_closed(victim) == b""
    assert "handing connection 2's task" in caplog.text
    assert good.exchange([b"still"]) == [b"still"]
    stats = srv.stop()
    assert stats["deferred"] == 0 and stats["handler_errors"] == 1
