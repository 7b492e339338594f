"""The types of what a user hands to :class:`pollpool.Server`.

These are for editors and type checkers: ``Server(handler)`` accepts a
:data:`Handler`, which is one of

- a :data:`MessageHandler`: ``message -> reply``, a plain function, an
  ``async def`` coroutine function, or a function returning a
  :class:`concurrent.futures.Future` or an :class:`asyncio.Future`;
- a connection-aware object with any of ``on_connect(conn)``,
  ``on_message(conn, message)`` and ``on_disconnect(conn)``, each plain or
  ``async def`` (:class:`OnConnect`, :class:`OnMessage`, :class:`OnDisconnect`);
- a :class:`pollpool.NativeHandler`.

A :data:`Reply` is ``bytes``, ``bytearray``, ``memoryview`` or ``None`` (no
reply).  Nothing here is checked at run time beyond what ``Server`` checks.
"""

from __future__ import annotations

import concurrent.futures
from typing import Awaitable, Callable, Optional, Protocol, Union

from .connection import Connection
from .handlers import NativeHandler

BytesLike = Union[bytes, bytearray, memoryview]
"""The bytes-like types a reply or a push may be."""
Reply = Optional[BytesLike]
"""What a handler answers a message with; ``None`` sends nothing."""
LaterReply = Union[Reply, Awaitable[Reply], concurrent.futures.Future[Reply]]
"""What a handler may return: a reply now, or one that comes later."""
MessageHandler = Callable[[bytes], LaterReply]
"""``message -> reply``: plain, ``async def``, or returning a future."""


class OnConnect(Protocol):
    """A handler with ``on_connect(conn)``: its return value is a greeting."""

    def on_connect(self, conn: Connection) -> Union[Reply, Awaitable[Reply]]: ...


class OnMessage(Protocol):
    """A handler with ``on_message(conn, message)``."""

    def on_message(self, conn: Connection, message: bytes) -> LaterReply: ...


class OnDisconnect(Protocol):
    """A handler with ``on_disconnect(conn)``, called once per connection."""

    def on_disconnect(self, conn: Connection) -> Optional[Awaitable[None]]: ...


ConnectionHandler = Union[OnConnect, OnMessage, OnDisconnect]
"""A connection-aware handler: an object with any of the three methods."""
Handler = Union[MessageHandler, ConnectionHandler, NativeHandler]
"""Everything ``Server(handler)`` accepts."""

__all__ = [
    "BytesLike", "ConnectionHandler", "Handler", "LaterReply", "MessageHandler",
    "OnConnect", "OnDisconnect", "OnMessage", "Reply",
]
