"""socketserver.ThreadingTCPServer peer: a thread per connection reading a
line per message (rfile.readline) and writing each reply (wfile.write)."""

from __future__ import annotations

import os
import socketserver
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402


def main() -> int:
    args = common.parser(__doc__.splitlines()[0]).parse_args()
    common.raise_nofile()
    handler = common.HANDLERS[args.handler]

    class Handler(socketserver.StreamRequestHandler):
        # asyncio and uvloop set TCP_NODELAY on every connection; do the same
        # here, or Nagle plus delayed ACKs stall pipelined replies by 40 ms.
        disable_nagle_algorithm = True

        def handle(self):
            readline, write = self.rfile.readline, self.wfile.write
            while True:
                line = readline(1 << 20)
                if not line.endswith(b"\n"):
                    return  # EOF (or an oversized line)
                write(handler(line[:-1]) + b"\n")

    class Server(socketserver.ThreadingTCPServer):
        daemon_threads = True
        allow_reuse_address = True
        request_queue_size = args.backlog

    with Server((args.host, args.port), Handler) as srv:
        host, port = srv.server_address[:2]
        common.announce(host, port)
        try:
            srv.serve_forever()
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
