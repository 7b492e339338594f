"""pollpool peer: pollpool.Server with a native or a Python handler.

--handler native is pollpool.handlers.echo (C, no GIL); python is
``lambda m: m``; sleep1ms and sha256 are the Python handlers the other peers
use.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

import pollpool  # noqa: E402


def main() -> int:
    p = common.parser(__doc__.splitlines()[0])
    p.set_defaults(handler="native")
    for a in p._actions:  # widen the choices of the shared --handler option
        if a.dest == "handler":
            a.choices = ["native", "python", "async", "async_sleep1ms"] + sorted(common.HANDLERS)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--framing", default="line", help="line | length (4-byte header)")
    p.add_argument("--backend", default="poll", help="poll | epoll")
    p.add_argument("--processes", type=int, default=1)
    p.add_argument("--native-lib", default=None, metavar="PATH:SYMBOL",
                   help="with --handler native: this native handler instead of echo")
    p.add_argument("--proxy-protocol", action="store_true",
                   help="connections begin with a PROXY header (from 127.0.0.0/8)")
    p.add_argument("--max-deferred", type=int, default=1,
                   help="replies a connection may have deferred at once (native handlers)")
    args = p.parse_args()
    common.raise_nofile()
    if args.handler == "native" and args.native_lib:
        path, _, symbol = args.native_lib.rpartition(":")
        handler = pollpool.NativeHandler.from_library(path, symbol)
    elif args.handler == "native":
        handler = pollpool.handlers.echo
    elif args.handler == "async":
        handler = common.aecho
    elif args.handler == "async_sleep1ms":
        handler = common.asleep1ms
    elif args.handler == "python":
        handler = lambda m: m  # noqa: E731
    else:
        handler = common.HANDLERS[args.handler]
    server = pollpool.Server(handler, host=args.host, port=args.port, threads=args.threads,
                             framing=args.framing, backlog=args.backlog,
                             backend=args.backend, processes=args.processes,
                             max_deferred=args.max_deferred,
                             proxy_protocol=args.proxy_protocol)
    host, port = server.listen()
    server.serve_forever(on_ready=lambda: common.announce(host, port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
