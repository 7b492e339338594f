"""A chat server: every line a client sends goes to everyone in its room.

    python examples/chat/chat.py [--port 9000]

Commands: ``/join ROOM`` (everyone starts in "lobby"), ``/quit``.  A clock
thread broadcasts ``tick <unix time>`` to every connection once a second.
Try it with two terminals running ``nc 127.0.0.1 9000``.
"""

from __future__ import annotations

import argparse
import threading
import time
from typing import Optional

import pollpool


class Chat:
    """Connection-aware: pollpool calls on_connect, on_message and
    on_disconnect for each client, in order, on its worker threads."""

    def __init__(self) -> None:
        self.server: Optional[pollpool.Server] = None

    def on_connect(self, conn: pollpool.Connection) -> bytes:
        conn.state = "lobby"
        conn.subscribe("lobby")
        return b"welcome %d, you are in lobby" % conn.id

    def on_message(self, conn: pollpool.Connection, message: bytes) -> Optional[bytes]:
        assert self.server is not None
        if message == b"/quit":
            conn.close()                       # after the reply below
            return b"bye"
        if message.startswith(b"/join "):
            room = message[6:].decode(errors="replace").strip() or "lobby"
            conn.unsubscribe(conn.state)
            conn.subscribe(room)
            conn.state = room
            return b"you are in " + room.encode()
        # To everyone in the room, this client included.
        self.server.publish(conn.state, b"%d: %s" % (conn.id, message))
        return None


def clock(srv: pollpool.Server, interval: float) -> None:
    while not srv.running:
        time.sleep(0.01)
    while srv.running:
        srv.broadcast(b"tick %d" % time.time())
        time.sleep(interval)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=9000)
    p.add_argument("--tick", type=float, default=1.0, help="seconds between ticks (0: none)")
    args = p.parse_args()
    chat = Chat()
    srv = chat.server = pollpool.Server(chat, host=args.host, port=args.port, framing="line")
    if args.tick > 0:
        threading.Thread(target=clock, args=(srv, args.tick), daemon=True).start()
    srv.serve_forever(on_ready=lambda: print("pollpool listening on %s:%d" % srv.address,
                                             flush=True))


if __name__ == "__main__":
    main()
