"""``python -m pollpool``: serve a handler from the command line.

Native echo with line framing on 127.0.0.1:9000 by default.  Ctrl+C drains
gracefully (exit status 0); a second Ctrl+C stops at once (exit status 130).
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
from typing import Any, List, Optional

from . import __version__, handlers
from .framing import parse_framing
from .server import Server


def load_handler(spec: str) -> Any:
    """``echo``, ``path/to/lib.so:symbol`` (a native handler) or
    ``module:function`` (a Python callable or connection-aware handler)."""
    if spec == "echo":
        return handlers.echo
    module, sep, attr = spec.rpartition(":")
    if sep and (module.endswith((".so", ".dylib")) or ".so." in module or "/" in module):
        return handlers.NativeHandler.from_library(module, attr)
    module, sep, attr = spec.partition(":")
    if not sep or not module or not attr:
        raise ValueError(f"handler must be 'echo' or 'module:function', got {spec!r}")
    obj: Any = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    if not callable(obj) and not isinstance(obj, handlers.NativeHandler) \
            and not any(hasattr(obj, n) for n in ("on_connect", "on_message", "on_disconnect")):
        raise TypeError(f"{spec} is not a handler")
    return obj


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m pollpool",
        description="Serve a handler over TCP with pollpool's C poll() loop and worker pool.",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; '' = all)")
    p.add_argument("--port", type=int, default=9000, help="port (default 9000; 0 = ephemeral)")
    p.add_argument("--threads", type=int, default=4,
                   help="worker threads (default 4; per process with --processes)")
    p.add_argument("--processes", type=int, default=1,
                   help="server processes sharing the port through SO_REUSEPORT (default 1)")
    p.add_argument("--backend", choices=("poll", "epoll"), default=None,
                   help="I/O backend (default poll, or $POLLPOOL_BACKEND)")
    p.add_argument("--framing", default="line",
                   help="line | line:DELIM (e.g. 'line:\\r\\n') | length | length:1|2|4|8 | raw (default line)")
    p.add_argument("--handler", default="echo",
                   help="echo (native), path/to/lib.so:symbol (native) or module:function (default echo)")
    p.add_argument("--max-message-size", type=int, default=None, help="largest message in bytes")
    p.add_argument("--max-connections", type=int, default=0, help="open connections at most (0 = no limit)")
    p.add_argument("--output-high-water", type=int, default=4 * 1024 * 1024,
                   help="pending output per connection that pauses its reading (bytes)")
    p.add_argument("--queue-size", type=int, default=4096, help="tasks waiting for a worker at most")
    p.add_argument("--backlog", type=int, default=1024, help="listen() backlog")
    p.add_argument("--drain-timeout", type=float, default=10.0,
                   help="seconds a graceful shutdown may take (default 10)")
    p.add_argument("--shutdown-message", default=None,
                   help="text sent, framed, to every client on shutdown")
    p.add_argument("--idle-timeout", type=float, default=0.0,
                   help="close connections silent this many seconds (default 0: never)")
    p.add_argument("--send-timeout", type=float, default=60.0,
                   help="close connections whose pending replies do not move for this "
                        "many seconds (default 60; 0: never)")
    p.add_argument("--output-limit", type=int, default=64 * 1024 * 1024,
                   help="pending output per connection that closes it (bytes; 0: none)")
    p.add_argument("--reply-timeout", type=float, default=0.0,
                   help="close a connection whose deferred or async reply takes this many "
                        "seconds (default 0: no limit)")
    p.add_argument("--bind", action="append", default=None, metavar="ADDRESS",
                   help="listen here instead of --host/--port (repeatable): HOST:PORT, "
                        "[IPv6]:PORT, unix:PATH, fd://N, or systemd (socket activation)")
    p.add_argument("--unix-mode", default=None, metavar="OCTAL",
                   help="permissions of unix: sockets, e.g. 660")
    p.add_argument("--proxy-protocol", action="store_true",
                   help="every connection from a trusted proxy begins with a PROXY header "
                        "(v1 or v2, as HAProxy's send-proxy sends it); handlers see the client")
    p.add_argument("--trusted-proxy", action="append", default=None, metavar="CIDR",
                   help="with --proxy-protocol: a network the header is taken from "
                        "(repeatable; '*' for any; default 127.0.0.0/8 and ::1/128)")
    p.add_argument("--proxy-timeout", type=float, default=5.0,
                   help="seconds a connection may take to send its PROXY header (default 5)")
    p.add_argument("--health", default=None, metavar="HOST:PORT",
                   help="a health-check listener: 'up ready' while serving, 'drain' once a stop "
                        "begins (HAProxy's agent-check); closed as the drain begins")
    p.add_argument("--drain-delay", type=float, default=0.0,
                   help="seconds a stop keeps accepting and serving before the drain begins, "
                        "so a balancer stops sending first (default 0)")
    p.add_argument("--drain-grace", type=float, default=0.5,
                   help="seconds a connection that has sent nothing whole yet gets, once the "
                        "drain begins, for its first message (default 0.5)")
    p.add_argument("--max-deferred", type=int, default=1,
                   help="native handlers: replies a connection may have deferred at once, "
                        "the handler going on with the rest of a read meanwhile; replies "
                        "stay in request order (default 1: later messages wait)")
    p.add_argument("--reject-message", default=None,
                   help="with --max-connections: accept extra clients, send this, close "
                        "(default: pause accepting)")
    p.add_argument("--log-level", default="WARNING", help="logging level (default WARNING)")
    p.add_argument("--version", action="version", version=f"pollpool {__version__}")
    return p


def _octal(text: "str | None") -> "int | None":
    if text is None:
        return None
    try:
        return int(text, 8)
    except ValueError:
        raise ValueError(f"--unix-mode takes octal permissions such as 660, not {text!r}") from None


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        server = Server(
            load_handler(args.handler),
            host=args.host,
            port=args.port,
            threads=args.threads,
            framing=parse_framing(args.framing),
            backlog=args.backlog,
            max_connections=args.max_connections,
            max_message_size=args.max_message_size,
            output_high_water=args.output_high_water,
            queue_size=args.queue_size,
            drain_timeout=args.drain_timeout,
            shutdown_message=None if args.shutdown_message is None else args.shutdown_message.encode(),
            idle_timeout=args.idle_timeout,
            send_timeout=args.send_timeout,
            output_limit=args.output_limit,
            reject_message=None if args.reject_message is None else args.reject_message.encode(),
            backend=args.backend,
            processes=args.processes,
            reply_timeout=args.reply_timeout,
            max_deferred=args.max_deferred,
            proxy_protocol=args.proxy_protocol,
            bind=args.bind,
            unix_mode=_octal(args.unix_mode),
            proxy_timeout=args.proxy_timeout,
            health=args.health,
            drain_delay=args.drain_delay,
            drain_grace=args.drain_grace,
            **({"trusted_proxies": args.trusted_proxy} if args.trusted_proxy else {}),
        )
        host, port = server.listen()
    except (ValueError, TypeError, ImportError, AttributeError) as e:
        print(f"pollpool: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"pollpool: {e}", file=sys.stderr)
        return 1
    addresses = server.addresses

    def ready() -> None:
        # Printed once connections are taken: with --processes, once every
        # process listens.
        for where in addresses:
            print(f"pollpool listening on {where}", flush=True)
        if server.health_address is not None:
            print(f"pollpool health checks on {server.health_address}", flush=True)
        log = logging.getLogger("pollpool")
        if server.processes > 1:
            log.info("%d server processes share the port", server.processes)
        if server.fd_limit is not None:
            log.info("fd limit %d: at most about %d connections",
                     server.fd_limit, server.fd_limit - 16)

    try:
        stats = server.serve_forever(on_ready=ready)
        print("pollpool stopped: " + json.dumps(stats), flush=True)
    except BrokenPipeError:
        # Our stdout is a closed pipe (python -m pollpool | head): the
        # server has stopped.  Point stdout at /dev/null so that the
        # interpreter's last flush does not fail again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        print("pollpool: stdout was closed; stopped", file=sys.stderr)
        return 1
    return 130 if server.forced else 0


if __name__ == "__main__":
    sys.exit(main())
