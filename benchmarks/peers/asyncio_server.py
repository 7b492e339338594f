"""asyncio (or uvloop) peer: a Protocol that splits the stream into lines,
calls the handler per message and writes the replies of one read at once.

--executor N hands each message to loop.run_in_executor on an N-thread pool
instead (replies still leave in request order); --tasks runs the handler's
coroutine version in a task per message (create_task), replies in order.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

MAX_LINE = 1 << 20


class Inline(asyncio.Protocol):
    """Handler called on the event loop, one call per message."""

    def __init__(self, handler):
        self.handler = handler
        self.buf = b""
        self.transport = None

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        if self.buf:
            data = self.buf + data
        *lines, self.buf = data.split(b"\n")
        if len(self.buf) > MAX_LINE:
            self.transport.close()
            return
        if lines:
            h = self.handler
            self.transport.write(b"".join([h(m) + b"\n" for m in lines]))


class Executor(Inline):
    """Each message goes to run_in_executor; replies are written in order."""

    def __init__(self, handler, pool, loop):
        super().__init__(handler)
        self.pool = pool
        self.loop = loop
        self.pending = collections.deque()

    def start(self, m):
        return self.loop.run_in_executor(self.pool, self.handler, m)

    def data_received(self, data):
        if self.buf:
            data = self.buf + data
        *lines, self.buf = data.split(b"\n")
        if len(self.buf) > MAX_LINE:
            self.transport.close()
            return
        for m in lines:
            f = self.start(m)
            f.add_done_callback(self._done)
            self.pending.append(f)

    def _done(self, _f):
        out = []
        q = self.pending
        while q and q[0].done():
            out.append(q.popleft().result() + b"\n")
        if out and not self.transport.is_closing():
            self.transport.write(b"".join(out))


class Tasks(Executor):
    """Each message runs the coroutine handler in a task of its own
    (create_task); replies are written in request order."""

    def __init__(self, handler, loop):
        super().__init__(handler, None, loop)

    def start(self, m):
        return self.loop.create_task(self.handler(m))


def main() -> int:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--uvloop", action="store_true", help="run on uvloop")
    p.add_argument("--executor", type=int, default=0, metavar="N",
                   help="hand each message to run_in_executor on an N-thread pool")
    p.add_argument("--tasks", action="store_true",
                   help="run the handler's coroutine version in a task per message")
    args = p.parse_args()
    common.raise_nofile()
    if args.uvloop:
        import uvloop
        loop = uvloop.new_event_loop()
    else:
        loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    handler = common.HANDLERS[args.handler]
    if args.tasks:
        coro = common.ASYNC_HANDLERS[args.handler]
        factory = lambda: Tasks(coro, loop)  # noqa: E731
    elif args.executor:
        pool = concurrent.futures.ThreadPoolExecutor(max_workers=args.executor)
        factory = lambda: Executor(handler, pool, loop)  # noqa: E731
    else:
        factory = lambda: Inline(handler)  # noqa: E731
    server = loop.run_until_complete(
        loop.create_server(factory, args.host, args.port, backlog=args.backlog))
    host, port = server.sockets[0].getsockname()[:2]
    common.announce(host, port)
    try:
        loop.run_forever()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
