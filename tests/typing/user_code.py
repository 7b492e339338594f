"""What a user writes, checked by ``mypy --strict`` in CI (pyproject.toml's
[tool.mypy] files): every handler form the README shows type-checks against
``pollpool.Server``, and the wrong ones are errors.  A line marked
``# type: ignore[...]`` must be an error: under --strict (warn_unused_ignores)
an ignore that silences nothing fails the check, so these lines test too.

Never run; only checked.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from typing import Optional

import pollpool
from pollpool import Connection, Reply

pool = concurrent.futures.ThreadPoolExecutor(4)


def upper(message: bytes) -> bytes:
    return message.upper()


def maybe(message: bytes) -> Optional[bytes]:
    return None if message == b"quiet" else message


def view(message: bytes) -> memoryview:
    return memoryview(message)[1:]


async def lookup(message: bytes) -> bytes:
    await asyncio.sleep(0.001)
    return message.upper()


def later(message: bytes) -> concurrent.futures.Future[Reply]:
    return pool.submit(upper, message)


class Session:
    def on_connect(self, conn: Connection) -> bytes:
        conn.state = 0
        return b"hello"

    def on_message(self, conn: Connection, message: bytes) -> bytes:
        conn.state += 1
        if message == b"quit":
            conn.close()
        return b"%d %s" % (conn.state, message)

    def on_disconnect(self, conn: Connection) -> None:
        pass


class OnlyMessages:
    async def on_message(self, conn: Connection, message: bytes) -> bytes:
        ok: bool = conn.send(b"pushed")
        return message if ok else b""


class OnlyGoodbyes:
    async def on_disconnect(self, conn: Connection) -> None:
        await asyncio.sleep(0)


def every_form() -> None:
    for handler in (upper, maybe, view, lookup, later, Session(), OnlyMessages(), OnlyGoodbyes(),
                    pollpool.handlers.echo):
        srv = pollpool.Server(handler, port=0, framing=pollpool.Lines(max_size=1 << 20))
        stats: dict[str, int] = srv.stop()
        print(stats["accepted"])
    pollpool.Server(upper, bind=["127.0.0.1:0", "unix:/tmp/x.sock"], framing="length").start()


def framings_and_peers(conn: Connection) -> str:
    framings: list[pollpool.Lines | pollpool.LengthPrefixed | pollpool.Raw] = [
        pollpool.Lines(b"\r\n", max_size=4096), pollpool.LengthPrefixed(header_bytes=2), pollpool.Raw(),
        pollpool.parse_framing("length:8")]
    peer = conn.peer
    if isinstance(peer, pollpool.PeerCred):
        return f"uid {peer.uid} over {len(framings)} framings"
    host, port = peer
    return f"{host}:{port + 0}"


async def in_asyncio() -> None:
    async with pollpool.Server(lookup, port=0) as srv:
        await srv.serve()


def wrong_forms() -> None:
    def takes_str(message: str) -> bytes:
        return message.encode()

    def returns_str(message: bytes) -> str:
        return message.decode()

    class NoMethods:
        pass

    pollpool.Server(takes_str)  # type: ignore[arg-type]
    pollpool.Server(returns_str)  # type: ignore[arg-type]
    pollpool.Server(NoMethods())  # type: ignore[arg-type]
    pollpool.Server(upper, port="9000")  # type: ignore[arg-type]
    pollpool.Server(upper, threads=4.5)  # type: ignore[arg-type]
    pollpool.Lines(delimiter="\n")  # type: ignore[arg-type]
