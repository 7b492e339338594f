"""The server side of the push benchmarks (benchmarks/push.py), for pollpool
and for an asyncio + uvloop peer doing the same work the way uvloop users do.

    push_server.py --impl pollpool|uvloop --mode broadcast|threads|chat [...]

Every connection is greeted with "ready".  Then, once "go" arrives on stdin:
  broadcast  one thread broadcasts --count 64-byte messages to every
             connection (pollpool: Server.broadcast; uvloop: one
             call_soon_threadsafe per message, writing to every transport);
  threads    4 threads each push --count 64-byte messages to each of the
             first 100 connections (pollpool: Server.send; uvloop:
             call_soon_threadsafe(transport.write, msg) per message);
  chat       no "go": each line a client sends goes to every connection of
             its room (connection index modulo --rooms).
  feed       one thread broadcasts --count 64 KiB messages, 50 a second
             (pollpool only: the slow-subscriber measurement).
Messages start with "<monotonic ns>:<source>:<seq>:" for pushsink.c.  Prints
"listening PORT" when ready and "pushed" when its pushing threads are done.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import threading
import time


def message(source: int, seq: int) -> bytes:
    head = b"%d:%d:%d:" % (time.monotonic_ns(), source, seq)
    return head + b"." * (63 - len(head))   # 64 bytes with the newline


def big_message(seq: int) -> bytes:
    head = b"%d:0:%d:" % (time.monotonic_ns(), seq)
    return head + b"." * (65536 - len(head))


def wait_go() -> None:
    for line in sys.stdin:
        if line.strip() == "go":
            return
    raise SystemExit(0)


def run_pollpool(args) -> None:
    import pollpool

    ids: list = []
    srv = None

    class Handler:
        def on_connect(self, conn):
            ids.append(conn.id)
            if args.mode == "chat":
                conn.subscribe(str(len(ids) % args.rooms))
                conn.state = str(len(ids) % args.rooms)
            return b"ready"

        def on_message(self, conn, msg):
            srv.publish(conn.state, msg)
            return None

    # The throughput scenarios queue far ahead of the receiver, so their
    # limit is high; the slow-subscriber feed keeps the default (1 MiB).
    srv = pollpool.Server(Handler(), port=0, threads=args.threads, backend="epoll",
                          **({} if args.mode == "feed" else {"push_limit": 64 << 20}))

    def pusher() -> None:
        wait_go()
        if args.mode == "broadcast":
            for k in range(args.count):
                srv.broadcast(message(0, k))
        elif args.mode == "feed":
            for k in range(args.count):
                srv.broadcast(big_message(k))
                time.sleep(0.02)
        elif args.mode == "threads":
            targets = ids[:100]

            def one(t: int) -> None:
                send = srv.send
                for k in range(args.count):
                    m = message(t, k)
                    for cid in targets:
                        send(cid, m)

            ts = [threading.Thread(target=one, args=(t,)) for t in range(4)]
            for t in ts:
                t.start()
            for t in ts:
                t.join()
        print("pushed", flush=True)

    def ready() -> None:
        print("listening", srv.address[1], flush=True)
        if args.mode != "chat":
            threading.Thread(target=pusher, daemon=True).start()

    srv.serve_forever(on_ready=ready)


def run_uvloop(args) -> None:
    import uvloop

    transports: list = []
    rooms: dict = {}

    class Proto(asyncio.Protocol):
        def connection_made(self, transport):
            transports.append(transport)
            self.t = transport
            self.room = len(transports) % args.rooms
            rooms.setdefault(self.room, []).append(transport)
            self.buf = b""
            transport.write(b"ready\n")

        def data_received(self, data):
            self.buf += data
            *lines, self.buf = self.buf.split(b"\n")
            members = rooms[self.room]
            for line in lines:
                out = line + b"\n"
                for t in members:
                    t.write(out)

        def connection_lost(self, exc):
            transports.remove(self.t)
            rooms[self.room].remove(self.t)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(Proto, "127.0.0.1", 0, backlog=4096)
        print("listening", server.sockets[0].getsockname()[1], flush=True)

        def bcast(m: bytes) -> None:
            for t in transports:
                t.write(m)

        def pusher() -> None:
            wait_go()
            if args.mode == "broadcast":
                for k in range(args.count):
                    loop.call_soon_threadsafe(bcast, message(0, k) + b"\n")
            elif args.mode == "threads":
                targets = list(transports[:100])

                def one(t: int) -> None:
                    cst = loop.call_soon_threadsafe
                    for k in range(args.count):
                        m = message(t, k) + b"\n"
                        for tr in targets:
                            cst(tr.write, m)

                ts = [threading.Thread(target=one, args=(t,)) for t in range(4)]
                for t in ts:
                    t.start()
                for t in ts:
                    t.join()
            print("pushed", flush=True)

        if args.mode != "chat":
            threading.Thread(target=pusher, daemon=True).start()
        await asyncio.Event().wait()

    uvloop.install()
    asyncio.run(main())


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--impl", choices=["pollpool", "uvloop"], required=True)
    p.add_argument("--mode", choices=["broadcast", "threads", "chat", "feed"], required=True)
    p.add_argument("--count", type=int, default=100)
    p.add_argument("--rooms", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    (run_pollpool if args.impl == "pollpool" else run_uvloop)(args)


if __name__ == "__main__":
    main()
