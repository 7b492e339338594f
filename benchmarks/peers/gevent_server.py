"""gevent StreamServer peer: a greenlet per connection reading a line per
message and writing each reply (the standard library is monkey-patched, as a
gevent user would do, so time.sleep yields)."""

from gevent import monkey

monkey.patch_all()

import os  # noqa: E402
import socket  # noqa: E402
import sys  # noqa: E402

from gevent.server import StreamServer  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402


def main() -> int:
    args = common.parser(__doc__.splitlines()[0]).parse_args()
    common.raise_nofile()
    handler = common.HANDLERS[args.handler]

    def handle(sock, _addr):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        rfile = sock.makefile("rb")
        try:
            while True:
                line = rfile.readline(1 << 20)
                if not line.endswith(b"\n"):
                    return
                sock.sendall(handler(line[:-1]) + b"\n")
        except OSError:
            return
        finally:
            rfile.close()
            sock.close()

    server = StreamServer((args.host, args.port), handle, backlog=args.backlog)
    server.start()
    host, port = server.address[:2]
    common.announce(host, port)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
