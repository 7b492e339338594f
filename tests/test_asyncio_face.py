"""pollpool inside an asyncio program: ``async with Server(...)``,
``await srv.start_async()`` and ``await srv.serve()``, where cancellation is a
graceful stop.  The handlers here are ordinary ones; the I/O stays on
pollpool's threads, so the event loop is never blocked by the server."""

from __future__ import annotations

import asyncio

import pytest

import pollpool

pytestmark = pytest.mark.timeout(60)


async def exchange(address, lines: list[bytes]) -> list[bytes]:
    reader, writer = await asyncio.open_connection(*address)
    try:
        writer.write(b"".join(line + b"\n" for line in lines))
        await writer.drain()
        return [(await reader.readline()).rstrip(b"\n") for _ in lines]
    finally:
        writer.close()
        await writer.wait_closed()


def test_async_with_serves_and_stops(backend):
    async def main():
        async with pollpool.Server(lambda m: m.upper(), port=0) as srv:
            assert srv.running
            got = await exchange(srv.address, [b"a", b"bc"])
        return srv, got

    srv, got = asyncio.run(main())
    assert got == [b"A", b"BC"]
    assert not srv.running and srv.stats()["messages"] == 2


def test_cancelling_serve_is_a_graceful_stop(backend):
    async def main():
        srv = pollpool.Server(pollpool.handlers.echo, port=0, shutdown_message=b"bye")
        task = asyncio.ensure_future(srv.serve())
        while not srv.running:
            await asyncio.sleep(0.01)
        reader, writer = await asyncio.open_connection(*srv.address)
        writer.write(b"hello\n")
        await writer.drain()
        assert await reader.readline() == b"hello\n"
        ticks = 0

        async def ticker():           # the loop stays free while it serves
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0.005)

        t = asyncio.ensure_future(ticker())
        await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        rest = await reader.read()    # goodbye, then EOF
        t.cancel()
        writer.close()
        return srv, rest, ticks

    srv, rest, ticks = asyncio.run(main())
    assert rest == b"bye\n"
    assert ticks > 3
    assert not srv.running and not srv.forced


def test_serve_returns_the_stats_when_stopped_from_elsewhere(backend):
    async def main():
        srv = await pollpool.Server(pollpool.handlers.echo, port=0).start_async()
        loop = asyncio.get_running_loop()
        loop.call_later(0.05, lambda: loop.run_in_executor(None, srv.stop))
        return await srv.serve()

    stats = asyncio.run(main())
    assert stats["accepted"] == 0 and "messages" in stats


def test_serve_on_a_stopped_server_returns_at_once(backend):
    async def main():
        srv = pollpool.Server(pollpool.handlers.echo, port=0)
        srv.start()
        srv.stop()
        return await asyncio.wait_for(srv.serve(), 5)

    assert isinstance(asyncio.run(main()), dict)
