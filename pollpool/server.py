"""``pollpool.Server``: configure the C core, run it, stop it."""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import errno
import functools
import ipaddress
import logging
import os
import signal
import socket
import threading
import weakref
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Tuple, TypeVar, Union

from ._async import AsyncRunner, attacher, is_async_handler
from ._core import ffi, lib
from .connection import Connection, PeerCred
from .framing import Framing, LengthPrefixed, Lines, Raw, parse_framing
from .handlers import NativeHandler
from .listeners import (
    Listener,
    _spec_of,
    close_all,
    notify,
    notify_socket,
    open_listeners,
    parse_bind,
    systemd_listeners,
)
from .types import BytesLike, Handler

_F = TypeVar("_F", bound=Callable[..., Any])
# cffi has no type hints: its decorator, typed, so that the callbacks keep theirs.
_def_extern: Callable[..., Callable[[_F], _F]] = ffi.def_extern

log = logging.getLogger("pollpool")


STAT_FIELDS = (
    "accepted", "active", "closed", "messages", "replies", "bytes_in", "bytes_out",
    "oversize_frames", "handler_errors", "accept_errors", "read_errors",
    "write_errors", "nomem_errors", "accept_paused", "forced_closes",
    "rejected", "idle_closes", "send_timeouts", "output_overflows",
    "pushes", "push_bytes", "push_drops", "push_overflow_closes", "wakeups",
    "deferred", "deferred_total", "reply_timeouts", "deferred_cancelled", "proxy_errors",
    "health_checks",
)
PUSH_OVERFLOW = {"close": 0, "drop": 1}

# Handles of servers stopped by force: a worker may still be inside their
# Python handler, so what the handle points to must live as long as the process.
_ORPHANS: List[Any] = []
_RUNNING: "weakref.WeakSet[Server]" = weakref.WeakSet()
# The server whose C handlers (pp_signals_install) own SIGINT/SIGTERM now.
_C_SIGNALS: "weakref.WeakSet[Server]" = weakref.WeakSet()
_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def _uninterrupted(take_over: bool = False) -> Iterator[None]:
    """Holds SIGINT and SIGTERM back for a change of a Server's state, so that
    a Ctrl+C cannot leave it half made (bound but marked new, running with no
    loop): their Python handlers are swapped for one that notes the signal,
    and the signals noted are delivered to the old handlers afterwards.

    Only the main thread gets KeyboardInterrupt, so elsewhere this does
    nothing; nor while the core's C handlers own the signals (a stop then
    drains, it raises nothing), unless ``take_over`` says the caller is
    about to put them back."""
    if threading.current_thread() is not threading.main_thread() or \
            (_C_SIGNALS and not take_over):
        yield
        return
    held: List[int] = []

    def hold(signum: int, frame: Any) -> None:
        held.append(signum)

    saved: Dict[int, Any] = {}
    try:
        for sig in _STOP_SIGNALS:
            old = signal.getsignal(sig)
            if old is None:  # not installed from Python: leave it alone
                continue
            signal.signal(sig, hold)
            saved[sig] = old
        yield
    finally:
        for num, old in saved.items():
            signal.signal(num, old)
        for num in held:
            _redeliver(num, saved[num])


def _redeliver(sig: int, handler: Any) -> None:
    if handler is signal.SIG_IGN:
        return
    if handler is signal.SIG_DFL:
        os.kill(os.getpid(), sig)  # the default action: the process ends
        return
    handler(sig, None)  # default_int_handler raises KeyboardInterrupt


class _PyHandler:
    """What it takes to call a Python handler and frame its replies.

    A plain callable gets ``message`` and is called from C (pp_py_fast_batch
    in _build.py; this object only names it in the logs).  A
    connection-aware handler (an object with any of ``on_connect``,
    ``on_message``, ``on_disconnect``) is reached through the ctx pointer by
    the cffi callbacks below, and gets the :class:`Connection` too."""

    __slots__ = ("server", "name", "delim", "header_bytes", "reply_max", "aware", "proxied",
                 "on_connect", "on_message", "on_disconnect", "conns", "attach")

    def __init__(self, handler: Any, framing: Framing, server: "Server") -> None:
        # Connections talk through the server; weak, so that a handler that
        # keeps its connections does not keep the server alive.
        self.server = weakref.ref(server)
        self.aware = is_connection_aware(handler)
        self.proxied = server.proxy_protocol
        self.on_connect = getattr(handler, "on_connect", None) if self.aware else None
        self.on_message = getattr(handler, "on_message", None) if self.aware else None
        self.on_disconnect = getattr(handler, "on_disconnect", None) if self.aware else None
        # Touched only with the GIL held, by the worker running the
        # connection's task: one task per connection is in flight at a time.
        self.conns: Dict[int, Connection] = {}
        self.name = getattr(handler, "__qualname__", None) or type(handler).__qualname__
        self.delim = framing.delimiter if isinstance(framing, Lines) else None
        self.header_bytes = framing.header_bytes if isinstance(framing, LengthPrefixed) else 0
        hb = self.header_bytes
        self.reply_max = (1 << (8 * hb)) - 1 if 0 < hb < 8 else None
        # attach(future, handle, conn_id): a future a handler returned
        self.attach: Optional[Callable[[Any, int, int], None]] = None


def is_connection_aware(handler: Any) -> bool:
    return any(callable(getattr(handler, name, None))
               for name in ("on_connect", "on_message", "on_disconnect"))


def _batch_failed(exc_type: Any, exc: Any, tb: Any) -> None:
    # Only a BaseException (KeyboardInterrupt, SystemExit) gets here: the
    # callbacks catch every Exception themselves.  The connection is closed.
    log.error("handler interrupted; closing its connection", exc_info=(exc_type, exc, tb))


#: Replies a batch may pile up in Python before they are handed to C, where
#: output_limit is enforced, checked every _PY_CHUNK messages.
_PY_FLUSH = 256 * 1024
_PY_CHUNK = 16


def _pending(results: List[Any]) -> int:
    try:
        return sum(map(len, results))
    except TypeError:  # None or a wrong type among them: framing sorts it out
        return sum(len(r) for r in results if isinstance(r, (bytes, bytearray, memoryview)))


def _queue(reply: Any, data: Any, size: int, count: int, conn_id: int) -> bool:
    """Queues size bytes of framed replies in C (the GIL is let go).  Returns
    False if the connection's output limit was passed or memory ran out."""
    if lib.pp_reply_send_framed(reply, data, size, count) >= 0:
        return True
    if ffi.errno == errno.ENOBUFS:
        log.warning("connection %d passed its output limit; closing it", conn_id)
    else:
        log.error("out of memory queueing replies on connection %d; closing it", conn_id)
    return False


def _stage(data: bytes, count: int, reply: Any, conn_id: int, scratch: Any, cap: int,
           res: Any, direct: bool = False) -> bool:
    """The one way framed replies leave Python: ``data`` (``count`` whole
    replies) is copied into the worker's ``cap``-byte scratch buffer when all
    of it fits (res = [bytes, replies]; pp_py_batch queues it once the GIL is
    let go), else, or if ``direct``, queued in C at once, after anything
    staged before it.  Returns False if the connection's output limit was
    passed."""
    size = len(data)
    if size == 0:
        return True
    if size <= cap and not direct and not res[0]:
        ffi.memmove(scratch, data, size)
        res[0] = size
        res[1] = count
        return True
    if res[0]:
        staged, res[0] = res[0], 0
        if not _queue(reply, scratch, staged, res[1], conn_id):
            return False
    return _queue(reply, data, size, count, conn_id)


def _emit(h: _PyHandler, results: List[Any], reply: Any, conn_id: int, scratch: Any,
          cap: int, res: Any, direct: bool = False) -> bool:
    """Frames results and stages them (see _stage).  Returns False if a
    result was bad or the connection's output limit was passed."""
    delim = h.delim
    data = None
    ok = True
    if delim is not None:
        try:  # the common case: every result is bytes-like
            data = delim.join(results) + delim if results else b""
            count = len(results)
        except TypeError:
            pass
    if data is None:
        data, count, ok = _frame_checked(h, results, conn_id)
    return _stage(data, count, reply, conn_id, scratch, cap, res, direct) and ok


@_def_extern(error=-1, onerror=_batch_failed)
def _pp_py_batch(ctx: Any, reply: Any, conn_id: int, msgs: Any, n: int, block: Any,
                 block_len: int, scratch: Any, cap: int, res: Any) -> int:
    # A connection-aware handler's messages (plain callables go through
    # pp_py_fast_batch).  Runs on a worker thread with the GIL held, once per
    # task: the whole messages of one connection.  Any C call would release
    # and retake the GIL, so messages come in with one copy (line frames are
    # contiguous and split at C speed) and framed replies leave through
    # scratch, copied with ffi.memmove (which keeps the GIL); pp_py_batch
    # queues them.
    # Returns PP_KEEP (0), PP_CLOSE (1) or -1 to close on an error.
    h: _PyHandler = ffi.from_handle(ctx)
    delim = h.delim
    conn = h.conns[conn_id]
    if h.on_message is None:
        return 0
    fn = functools.partial(h.on_message, conn)
    messages: Optional[List[bytes]]
    results: List[Any]
    if delim is not None and n == 1:
        # The common case under light pipelining: one line, one bytes reply.
        try:
            out = fn(ffi.unpack(block, block_len))
        except Exception:
            log.exception("handler %s failed on connection %d; closing it", h.name, conn_id)
            return -1
        if type(out) is bytes:
            if not _stage(out + delim, 1, reply, conn_id, scratch, cap, res):
                return -1
            return 1 if conn.closing else 0
        if _is_future(out):
            return _defer(h, out, 0, reply, conn_id)
        results = [out]
        messages = None
    elif delim is not None and block_len <= 512 * n:
        # Small lines: one copy of the block and a split beat n unpacks.
        messages = ffi.unpack(block, block_len + len(delim)).split(delim)
        messages.pop()
    else:
        unpack = ffi.unpack
        messages = [unpack(m.data, m.len) for m in msgs[0:n]]
    failed = False
    future: Any = None
    if messages is not None:
        results = []
        append = results.append
        try:
            # Chunks of _PY_CHUNK messages keep the per-message loop bare;
            # between chunks, replies past _PY_FLUSH bytes go to C, which
            # enforces output_limit and starts sending.
            for start in range(0, len(messages), _PY_CHUNK):
                chunk = messages[start:start + _PY_CHUNK] if start or len(messages) > _PY_CHUNK \
                    else messages
                for msg in chunk:
                    out = fn(msg)
                    if out is not None and out.__class__ is not bytes and _is_future(out):
                        future = out  # its reply comes later; the rest wait for it
                        break
                    append(out)
                    if conn.closing:
                        break
                if conn.closing or future is not None:
                    break
                if start + _PY_CHUNK < len(messages) and _pending(results) > _PY_FLUSH:
                    if not _emit(h, results, reply, conn_id, scratch, cap, res, True):
                        return -1
                    results = []
                    append = results.append
        except Exception:
            failed = True
            log.exception("handler %s failed on connection %d; closing it", h.name, conn_id)
    if not _emit(h, results, reply, conn_id, scratch, cap, res) or failed:
        return -1
    if future is not None:
        return _defer(h, future, len(results), reply, conn_id)
    return 1 if conn.closing else 0


def _is_future(out: Any) -> bool:
    return hasattr(out, "add_done_callback")


def _defer(h: _PyHandler, future: Any, index: int, reply: Any, conn_id: int) -> int:
    """Message index of this batch returned a future: its reply is deferred
    to it (see _async.attacher), and the messages after it wait."""
    d = lib.pp_reply_defer_batch(reply, index + 1)
    if d == ffi.NULL:
        log.error("out of memory deferring a reply on connection %d; closing it", conn_id)
        return -1
    assert h.attach is not None
    try:
        h.attach(future, int(ffi.cast("uintptr_t", d)), conn_id)
    except Exception:
        lib.pp_py_finish(d, ffi.NULL, 0, 0, -1)
        log.exception("handler %s returned a future that cannot be waited for; closing "
                      "connection %d", h.name, conn_id)
    return 2  # PP_DEFER


def _peer(reply: Any, host: Any, port: int) -> Any:
    text = ffi.string(host).decode()
    if text:
        return text, port
    cred = ffi.new("int[3]")
    if lib.pp_reply_peer_cred(reply, cred, cred + 1, cred + 2) == 0:
        return PeerCred(cred[0], cred[1], cred[2])
    return text, port


def _proxy_peer(reply: Any) -> Optional[Tuple[str, int]]:
    host = ffi.new("char[64]")
    port = ffi.new("int *")
    if lib.pp_reply_proxy_peer(reply, host, 64, port) < 0:
        return None
    return ffi.string(host).decode(), port[0]


def _trusted_networks(value: Any) -> List[Any]:
    """CIDR strings (or ``"*"``: everywhere) as ipaddress networks."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise TypeError("trusted_proxies must be a list of CIDR strings such as '10.0.0.0/8'")
    nets: List[Any] = []
    for item in value:
        if not isinstance(item, str):
            raise TypeError(f"trusted_proxies entries must be str, not {type(item).__name__}")
        if item.strip() == "*":
            nets += [ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_network("::/0")]
            continue
        try:
            nets.append(ipaddress.ip_network(item.strip(), strict=False))
        except ValueError as e:
            raise ValueError(f"trusted_proxies: {e}") from None
    return nets


@_def_extern(error=-1, onerror=_batch_failed)
def _pp_py_open(ctx: Any, reply: Any, conn_id: int, host: Any, port: int, scratch: Any,
                cap: int, res: Any) -> int:
    # A connection-aware handler's connection arrived: the first task of
    # that connection, so no message of it can come before.
    h: _PyHandler = ffi.from_handle(ctx)
    conn = Connection(conn_id, _peer(reply, host, port), h.server,
                      _proxy_peer(reply) if h.proxied else None)
    h.conns[conn_id] = conn
    if h.on_connect is None:
        return 0
    try:
        out = h.on_connect(conn)
    except Exception:
        log.exception("%s.on_connect failed on connection %d; closing it", h.name, conn_id)
        return -1
    if out is not None and not _emit(h, [out], reply, conn_id, scratch, cap, res):
        return -1
    return 1 if conn.closing else 0


@_def_extern(onerror=_batch_failed)
def _pp_py_close(ctx: Any, conn_id: int) -> None:
    # The connection's last task: after it, nothing of it reaches Python.
    h: _PyHandler = ffi.from_handle(ctx)
    conn = h.conns.pop(conn_id, None)
    if conn is None or h.on_disconnect is None:
        return
    try:
        h.on_disconnect(conn)
    except Exception:
        log.exception("%s.on_disconnect failed on connection %d", h.name, conn_id)


def _reporter(h: _PyHandler) -> Callable[[int, int, Any], None]:
    """What the C fast path (pp_py_fast_batch) calls to log a failure; the
    connection is then closed.  Codes as in _build.py's PP_FAST_*."""
    def report(code: int, conn_id: int, obj: Any) -> None:
        if code == 0:
            exc = (type(obj), obj, obj.__traceback__) if obj is not None else None
            log.error("handler %s failed on connection %d; closing it", h.name, conn_id,
                      exc_info=exc)
        elif code == 1:
            log.error("handler %s returned %s on connection %d; expected bytes, "
                      "bytearray, memoryview or None; closing it",
                      h.name, type(obj).__name__, conn_id,
                      exc_info=TypeError(f"bad reply type {type(obj).__name__}"))
        elif code == 2:
            log.error("handler %s returned %d bytes on connection %d, more than "
                      "a %d-byte length header can carry; closing it",
                      h.name, obj, conn_id, h.header_bytes)
        elif code == 3:
            log.warning("connection %d passed its output limit; closing it", conn_id)
        else:
            log.error("out of memory queueing replies on connection %d; closing it", conn_id)
    return report


def _frame_checked(h: _PyHandler, results: List[Any], conn_id: int) -> Tuple[bytes, int, bool]:
    """Frames results one by one, skipping None, up to the first that is not
    bytes-like or does not fit the length header.  Returns the framed bytes,
    how many replies they hold, and whether all results were good."""
    delim, hb, reply_max = h.delim, h.header_bytes, h.reply_max
    parts = []
    for out in results:
        if out is None:
            continue
        if type(out) is not bytes:
            if not isinstance(out, (bytearray, memoryview)):
                log.error("handler %s returned %s on connection %d; expected bytes, "
                          "bytearray, memoryview or None; closing it",
                          h.name, type(out).__name__, conn_id,
                          exc_info=TypeError(f"bad reply type {type(out).__name__}"))
                break
            out = bytes(out)
        if hb:
            if reply_max is not None and len(out) > reply_max:
                log.error("handler %s returned %d bytes on connection %d, more than "
                          "a %d-byte length header can carry; closing it",
                          h.name, len(out), conn_id, hb)
                break
            parts.append(len(out).to_bytes(hb, "big"))
            parts.append(out)
        elif delim is not None:
            parts.append(out)
            parts.append(delim)
        else:
            parts.append(out)
    else:
        return b"".join(parts), len(parts) // (1 if delim is None and not hb else 2), True
    return b"".join(parts), len(parts) // (1 if delim is None and not hb else 2), False


def _push_data(data: Any) -> Any:
    if isinstance(data, (bytes, bytearray)):
        return data
    if isinstance(data, memoryview):
        return ffi.from_buffer(data)
    raise TypeError(f"data must be bytes, bytearray or memoryview, not {type(data).__name__}")


def _topic(topic: Any) -> bytes:
    if isinstance(topic, str):
        return topic.encode()
    if isinstance(topic, (bytes, bytearray)):
        return bytes(topic)
    raise TypeError(f"topic must be str or bytes, not {type(topic).__name__}")


def _push_result(rc: int) -> int:
    """rc as it is, or the exception its error calls for; -ENOTCONN and
    -ENOBUFS (gone, or refused by push_limit) are answers, not errors."""
    if rc >= 0 or rc in (-errno.ENOTCONN, -errno.ENOBUFS):
        return rc
    if rc == -errno.EMSGSIZE:
        raise ValueError("the message is too long for the framing's length header")
    if rc == -errno.ENOMEM:
        raise MemoryError("out of memory queueing a push")
    raise OSError(-rc, os.strerror(-rc))


def _check_seconds(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number of seconds")
    if not 0 <= value <= 86400 * 365:
        raise ValueError(f"{name} must be between 0 (off) and a year, got {value}")
    return float(value)


BACKENDS = {"poll": 0, "epoll": 1}


def _check_backend(backend: Optional[str]) -> str:
    """The backend name to use: the argument, else $POLLPOOL_BACKEND, else poll."""
    if backend is None:
        backend = os.environ.get("POLLPOOL_BACKEND") or "poll"
        source = "POLLPOOL_BACKEND"
    else:
        source = "backend"
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, not {type(backend).__name__}")
    if backend not in BACKENDS:
        raise ValueError(f"{source} must be one of {sorted(BACKENDS)}, got {backend!r}")
    if lib.pp_backend_name(BACKENDS[backend]) == ffi.NULL:
        raise ValueError(f"the {backend} backend is not available on this system")
    return backend


def _check_int(name: str, value: Any, lo: int, hi: Optional[int] = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    if value < lo or (hi is not None and value > hi):
        rng = f"between {lo} and {hi}" if hi is not None else f"at least {lo}"
        raise ValueError(f"{name} must be {rng}, got {value}")
    return value


class Server:
    """A TCP server whose I/O loop and worker pool run in C.

    ``handler`` is a Python callable ``message -> bytes | None`` (run on a
    worker thread, with the GIL), an ``async def`` coroutine function or a
    callable returning a future (run on an event loop), a connection-aware
    object with ``on_connect``/``on_message``/``on_disconnect`` methods, or a
    :class:`pollpool.NativeHandler` such as :data:`pollpool.handlers.echo`
    (run without the GIL); :data:`pollpool.types.Handler` spells it out.

    Run it with :meth:`serve_forever` (blocks; Ctrl+C drains gracefully) or
    :meth:`start`/:meth:`stop`, or as a context manager (``with``, or
    ``async with`` and :meth:`serve` inside an asyncio program).  A server
    runs once.  Bad options raise ``ValueError`` or ``TypeError`` here, at
    construction; a bind failure raises ``OSError`` with the real errno.

    :param host: the address to listen on; ``""`` is every IPv4 and IPv6 one.
    :param port: the TCP port; 0 picks a free one (see :attr:`address`).
    :param threads: worker threads of the pool (1 to 1,024).
    :param framing: ``"line"``, ``"line:\\r\\n"``, ``"length"``,
        ``"length:2"``, ``"raw"`` or a framing object (:class:`Lines`,
        :class:`LengthPrefixed`, :class:`Raw`).
    :param backlog: the listen queue's length.
    :param max_connections: past it, accepting pauses (or, with
        ``reject_message``, newcomers are told and closed); 0 is no limit.
    :param max_message_size: the largest frame; a larger one closes its
        connection.  Default: the framing's ``max_size`` (1 MiB).
    :param output_high_water: pending reply bytes above which a connection is
        no longer read until they drain.
    :param queue_size: tasks the worker queue holds; when full, reading waits.
    :param drain_timeout: seconds a graceful stop may take before it cuts.
    :param shutdown_message: sent, framed like a reply, to every client when
        a stop begins.
    :param idle_timeout: seconds of silence that close a connection; 0 is off.
    :param send_timeout: seconds pending replies may go unread by the peer
        before its connection is closed.
    :param output_limit: pending reply bytes that close a connection.
    :param reject_message: sent to connections refused by ``max_connections``.
    :param backend: ``"poll"`` (the default, or ``$POLLPOOL_BACKEND``) or
        ``"epoll"`` (Linux), whose cost per round follows the ready
        connections instead of the open ones.
    :param processes: N > 1 forks N server processes that share the
        listeners, each with its own I/O thread and pool; this object then
        supervises them (see :mod:`pollpool.processes`).
    :param reuse_port: SO_REUSEPORT, so that independent servers share a port.
    :param push_limit: bytes of pushes queued for one connection before
        ``on_push_overflow`` applies.
    :param on_push_overflow: ``"close"`` the connection or ``"drop"`` the push.
    :param reply_timeout: seconds a deferred or async reply may take before
        its connection is closed; 0 is off.
    :param max_deferred: replies a native handler may have pending on one
        connection at once (1 to 1,024); Python handlers keep 1.
    :param proxy_protocol: every connection from ``trusted_proxies`` must
        begin with a PROXY v1 or v2 header.
    :param trusted_proxies: networks (CIDR, or ``"*"``) allowed to send it.
    :param proxy_timeout: seconds the header may take to arrive.
    :param bind: addresses to listen on instead of host/port:
        ``HOST:PORT``, ``[IPv6]:PORT``, ``unix:PATH``, ``fd://N``, ``systemd``.
    :param sock: listening Python sockets to serve (they stay yours).
    :param unix_mode: the permissions of Unix socket files, e.g. ``0o660``.
    :param loop: the event loop ``async def`` handlers run on.
    :param drain_delay: seconds a stop keeps accepting and serving as before
        (health checks hear ``drain``, systemd ``STOPPING=1``) before the
        drain begins, so a balancer stops sending first.
    :param drain_grace: seconds, once the drain begins, that a connection
        which has not sent a whole message yet is given for its first one
        (answered before the goodbye); within ``drain_timeout``.
    :param health: ``HOST:PORT`` or ``unix:PATH`` (or a listening socket) of
        a health-check listener: each connection hears ``up ready`` while
        serving and ``drain`` once a stop begins (HAProxy's agent-check), and
        the listener closes as the drain begins.
    """

    def __init__(
        self,
        handler: Handler,
        host: str = "127.0.0.1",
        port: int = 9000,
        *,
        threads: int = 4,
        framing: Union[str, Framing] = "line",
        backlog: int = 1024,
        max_connections: int = 0,
        max_message_size: Optional[int] = None,
        output_high_water: int = 4 * 1024 * 1024,
        queue_size: int = 4096,
        drain_timeout: float = 10.0,
        shutdown_message: Optional[BytesLike] = None,
        idle_timeout: float = 0.0,
        send_timeout: float = 60.0,
        output_limit: int = 64 * 1024 * 1024,
        reject_message: Optional[BytesLike] = None,
        backend: Optional[str] = None,
        processes: int = 1,
        reuse_port: bool = False,
        push_limit: int = 1024 * 1024,
        on_push_overflow: str = "close",
        reply_timeout: float = 0.0,
        max_deferred: int = 1,
        proxy_protocol: bool = False,
        trusted_proxies: Iterable[str] = ("127.0.0.0/8", "::1/128"),
        proxy_timeout: float = 5.0,
        bind: Optional[Iterable[str]] = None,
        sock: Union[socket.socket, Iterable[socket.socket], None] = None,
        unix_mode: Optional[int] = None,
        loop: Optional[asyncio.AbstractEventLoop] = None,
        drain_delay: float = 0.0,
        drain_grace: float = 0.5,
        health: Union[str, socket.socket, None] = None,
    ) -> None:
        # Every argument but the handler, as given: what a forked server
        # process (processes > 1) is built with.
        self._kwargs = {k: v for k, v in locals().items() if k not in ("self", "handler")}
        if not isinstance(handler, NativeHandler) and not callable(handler) \
                and not is_connection_aware(handler):
            raise TypeError("handler must be callable, have on_connect/on_message/"
                            "on_disconnect methods, or be a pollpool.NativeHandler")
        if not isinstance(host, str):
            raise TypeError(f"host must be a str, not {type(host).__name__}")
        self.handler = handler
        self.host = host
        self.port = _check_int("port", port, 0, 65535)
        self.threads = _check_int("threads", threads, 1, 1024)
        self.backlog = _check_int("backlog", backlog, 1)
        self.max_connections = _check_int("max_connections", max_connections, 0)
        self.output_high_water = _check_int("output_high_water", output_high_water, 1)
        self.queue_size = _check_int("queue_size", queue_size, 1)
        f = parse_framing(framing)
        if max_message_size is not None:
            _check_int("max_message_size", max_message_size, 1)
            f = type(f)(**{**f.__dict__, "max_size": max_message_size})
        self.framing: Framing = f
        if isinstance(drain_timeout, bool) or not isinstance(drain_timeout, (int, float)):
            raise TypeError("drain_timeout must be a number of seconds")
        if not 0 <= drain_timeout <= 86400:
            raise ValueError(f"drain_timeout must be between 0 and 86400 s, got {drain_timeout}")
        self.drain_timeout = float(drain_timeout)
        if shutdown_message is not None:
            if not isinstance(shutdown_message, (bytes, bytearray, memoryview)):
                raise TypeError("shutdown_message must be bytes or None")
            shutdown_message = bytes(shutdown_message)
            if isinstance(f, LengthPrefixed) and f.header_bytes < 8 and \
                    len(shutdown_message) >= 1 << (8 * f.header_bytes):
                raise ValueError("shutdown_message is too long for the length header")
        self.shutdown_message: Optional[bytes] = shutdown_message
        self.idle_timeout = _check_seconds("idle_timeout", idle_timeout)
        self.send_timeout = _check_seconds("send_timeout", send_timeout)
        self.output_limit = _check_int("output_limit", output_limit, 0)
        if reject_message is not None:
            if not isinstance(reject_message, (bytes, bytearray, memoryview)):
                raise TypeError("reject_message must be bytes or None")
            reject_message = bytes(reject_message)
            if not max_connections:
                raise ValueError("reject_message needs max_connections")
        self.reject_message: Optional[bytes] = reject_message
        self.backend = _check_backend(backend)
        self.processes = _check_int("processes", processes, 1, 1024)
        if not isinstance(reuse_port, bool):
            raise TypeError("reuse_port must be a bool")
        self.reuse_port = reuse_port
        self.push_limit = _check_int("push_limit", push_limit, 0)
        if on_push_overflow not in PUSH_OVERFLOW:
            raise ValueError(f"on_push_overflow must be 'close' or 'drop', got {on_push_overflow!r}")
        self.on_push_overflow = on_push_overflow
        self.reply_timeout = _check_seconds("reply_timeout", reply_timeout)
        self.max_deferred = _check_int("max_deferred", max_deferred, 1, lib.PP_MAX_DEFERRED)
        if max_deferred > 1 and not isinstance(handler, NativeHandler):
            raise ValueError("max_deferred > 1 needs a pollpool.NativeHandler: a Python "
                             "handler has one reply pending per connection at a time")
        if not isinstance(proxy_protocol, bool):
            raise TypeError("proxy_protocol must be a bool")
        self.proxy_protocol = proxy_protocol
        self.trusted_proxies = tuple(str(n) for n in _trusted_networks(trusted_proxies))
        self.proxy_timeout = _check_seconds("proxy_timeout", proxy_timeout)
        if proxy_protocol and self.proxy_timeout == 0:
            raise ValueError("proxy_timeout must be more than 0 with proxy_protocol")
        self.drain_delay = _check_seconds("drain_delay", drain_delay)
        self.drain_grace = _check_seconds("drain_grace", drain_grace)
        if health is not None and not isinstance(health, (str, socket.socket)):
            raise TypeError("health must be 'HOST:PORT', 'unix:PATH' or a listening socket")
        if isinstance(health, str) and parse_bind(health)[0] not in ("tcp", "unix"):
            raise ValueError(f"health must be 'HOST:PORT' or 'unix:PATH', got {health!r}")
        self.health = health
        self._health: List[Listener] = []   # the health listener opened for it
        if isinstance(bind, str):
            bind = [bind]
        self.bind: Tuple[str, ...] = tuple(bind) if bind is not None else ()
        for spec in self.bind:
            parse_bind(spec)   # ValueError / TypeError now, not at listen()
        if isinstance(sock, socket.socket):
            sock = [sock]
        self.sock: Tuple[socket.socket, ...] = tuple(sock) if sock is not None else ()
        for s in self.sock:
            if not isinstance(s, socket.socket):
                raise TypeError(f"sock must be a socket.socket, not {type(s).__name__}")
        if unix_mode is not None:
            _check_int("unix_mode", unix_mode, 0, 0o7777)
        self.unix_mode = unix_mode
        self._listeners: List[Listener] = []
        self._specs: List[str] = []
        self._notify: Optional[socket.socket] = None
        if loop is not None and not isinstance(loop, asyncio.AbstractEventLoop):
            raise TypeError(f"loop must be an asyncio event loop, not {type(loop).__name__}")
        self.loop = loop
        self._is_async = not isinstance(handler, NativeHandler) and is_async_handler(handler)
        self._runner: Optional[AsyncRunner] = None
        # The loop of the coroutine that started the server (start_async,
        # serve, async with): a coroutine handler runs there.
        self._caller_loop: Optional[asyncio.AbstractEventLoop] = None
        self._fd_limit: Optional[int] = None
        self._group: Any = None        # the supervisor when processes > 1

        self._lock = threading.Lock()
        self._srv: Any = None          # pp_server *, guarded by _lock
        self._handle: Any = None       # keeps the Python handler reachable from C
        self._state = "new"            # new -> running -> stopped
        self._done = threading.Event()
        self._done_callbacks: List[Callable[[], None]] = []   # guarded by _lock
        self._thread: Optional[threading.Thread] = None
        self._serving = 0              # ident of the thread in serve_forever
        # In a server process of processes=N: (its own Server, ask the parent
        # to stop); see processes._child_main.
        self._in_child: Optional[Tuple["Server", Callable[[], None]]] = None
        self._last_stats: Dict[str, int] = dict.fromkeys(STAT_FIELDS, 0)
        self._address: Optional[Tuple[str, int]] = None
        self._forced = False
        self._result: Optional[BaseException] = None

    # -- life cycle ------------------------------------------------------

    def listen(self) -> Tuple[str, int]:
        """Binds and listens now, without serving yet, and returns the address.
        :meth:`serve_forever` and :meth:`start` call it when needed.  Raises
        OSError with the real errno (EADDRINUSE, EACCES, ...) on failure."""
        with _uninterrupted():
            return self._listen()

    def _listen(self) -> Tuple[str, int]:
        with self._lock:
            if self._state == "listening":
                return self.address
            if self._state != "new":
                raise RuntimeError("this server has already been started; create a new one")
            self._state = "binding"
        try:
            return self._bind()
        except BaseException:
            with self._lock:
                if self._state == "binding":
                    self._state = "new"
            if self._srv is None:
                self._close_listeners()
            raise

    def _bind(self) -> Tuple[str, int]:
        if self.processes > 1:
            from .processes import ProcessGroup
            group = ProcessGroup(self)
            # systemd hears from the parent alone (NotifyAccess=main): taken
            # before any fork, so no child sees NOTIFY_SOCKET.
            self._notify = group.notify = notify_socket()
            try:
                self._address = group.listen()
            except BaseException:
                with self._lock:
                    self._state = "new"
                self._close_listeners()
                raise
            with self._lock:
                self._group = group
                self._state = "listening"
            return self.address
        cfg = ffi.new("pp_config *")
        lib.pp_config_init(cfg)
        host = ffi.new("char[]", self.host.encode("idna") if self.host else b"")
        cfg.host = host
        cfg.port = self.port
        cfg.backlog = self.backlog
        cfg.reuse_port = int(self.reuse_port)
        cfg.backend = BACKENDS[self.backend]
        cfg.threads = self.threads
        cfg.queue_size = self.queue_size
        cfg.max_connections = self.max_connections
        cfg.output_high_water = self.output_high_water
        cfg.drain_timeout = self.drain_timeout
        f = self.framing
        cfg.max_message_size = f.max_size
        if isinstance(f, Raw):
            cfg.framing = lib.PP_FRAMING_RAW
        elif isinstance(f, Lines):
            cfg.framing = lib.PP_FRAMING_LINE
            cfg.delimiter_len = len(f.delimiter)
            for i, b in enumerate(f.delimiter):
                cfg.delimiter[i] = b
        else:
            cfg.framing = lib.PP_FRAMING_LENGTH
            cfg.header_bytes = f.header_bytes
        cfg.idle_timeout = self.idle_timeout
        cfg.send_timeout = self.send_timeout
        cfg.output_limit = self.output_limit
        cfg.push_limit = self.push_limit
        cfg.push_overflow = PUSH_OVERFLOW[self.on_push_overflow]
        cfg.reply_timeout = self.reply_timeout
        cfg.max_deferred = self.max_deferred
        cfg.proxy_protocol = int(self.proxy_protocol)
        cfg.proxy_timeout = self.proxy_timeout
        nets = [ipaddress.ip_network(n) for n in self.trusted_proxies]
        trusted = ffi.new("pp_cidr[]", max(len(nets), 1))
        for i, net in enumerate(nets):
            trusted[i].family = socket.AF_INET if net.version == 4 else socket.AF_INET6
            packed = net.network_address.packed
            for k, b in enumerate(packed):
                trusted[i].addr[k] = b
            trusted[i].prefix = net.prefixlen
        cfg.trusted_proxies = trusted
        cfg.ntrusted_proxies = len(nets)
        cfg.proxy_trust_unix = 1   # a Unix socket's permissions say who may connect
        if self.bind or self.sock:
            self._listeners = open_listeners(self.bind, self.sock, self.backlog,
                                             self.reuse_port, self.unix_mode, lib.PP_MAX_LISTENERS)
        else:
            self._listeners = systemd_listeners(self.backlog, lib.PP_MAX_LISTENERS)
        self._specs = [lst.spec for lst in self._listeners]
        fds = ffi.new("int[]", [lst.sock.fileno() for lst in self._listeners] or [0])
        cfg.listen_fds = fds
        cfg.nlisten_fds = len(self._listeners)
        self._notify = notify_socket()
        if self._notify is not None:
            cfg.notify_fd = self._notify.fileno()
        cfg.drain_delay = self.drain_delay
        cfg.drain_grace = self.drain_grace
        health_sock = self._health_socket()
        if health_sock is not None:
            cfg.health_fd = health_sock.fileno()
        reject = None
        if self.reject_message is not None:
            reject = ffi.from_buffer("unsigned char[]", self.reject_message)
            cfg.reject_message = reject
            cfg.reject_message_len = len(self.reject_message)
        msg = None
        if self.shutdown_message is not None:
            msg = ffi.from_buffer("unsigned char[]", self.shutdown_message)
            cfg.shutdown_message = msg
            cfg.shutdown_message_len = len(self.shutdown_message)
        if isinstance(self.handler, NativeHandler):
            cfg.handler, cfg.ctx, cfg.on_open, cfg.on_close = self.handler._pointers()
        elif self._is_async:
            state = _PyHandler(self.handler, self.framing, self)
            runner = AsyncRunner(state, self.handler)
            self._handle = runner
            cfg.handler = ffi.NULL
            cfg.batch = lib.pp_py_async_batch
            cfg.ctx = runner.q
            cfg.deferred_gone = lib.pp_py_async_gone
            if state.aware:
                cfg.on_open = lib.pp_py_async_open
                cfg.on_close = lib.pp_py_async_close
        else:
            state = _PyHandler(self.handler, self.framing, self)
            cfg.handler = ffi.NULL
            if state.aware:
                state.attach = attacher(state, self)
                self._handle = ffi.new_handle(state)
                cfg.batch = lib.pp_py_batch
                cfg.ctx = self._handle
                cfg.on_open = lib.pp_py_open
                cfg.on_close = lib.pp_py_close
            else:
                # The C fast path holds raw PyObject pointers: what they point
                # to lives as long as this handle (see _ORPHANS).
                fast = ffi.new("pp_pyfast *")
                report = _reporter(state)
                attach = attacher(state, self)
                self._handle = (fast, self.handler, report, attach)
                fast.fn = ffi.cast("void *", id(self.handler))
                fast.report = ffi.cast("void *", id(report))
                fast.attach = ffi.cast("void *", id(attach))
                cfg.batch = lib.pp_py_fast_batch
                cfg.ctx = fast
                cfg.worker_exit = lib.pp_py_fast_worker_exit
        out = ffi.new("pp_server **")
        rc = lib.pp_server_new(cfg, out)
        if rc < 0:
            self._close_listeners()
            if isinstance(self._handle, AsyncRunner):
                self._handle.close(0)
            with self._lock:
                self._state = "new"
                self._handle = None
            err = -rc
            if err == errno.EINVAL:
                raise ValueError("the server core refused this configuration")
            where = f"{self.host}:{self.port}"
            raise OSError(err, f"cannot listen on {where}: {os.strerror(err)}")
        srv = out[0]
        # The core serves duplicates of the sockets opened for bind= and
        # health=, and closes them as its drain begins: a copy kept open here
        # would go on queueing connections that nobody accepts, to be reset
        # at the end.  (Unix socket files are removed at the end.)
        _release(self._listeners + self._health)
        if isinstance(self._handle, AsyncRunner):
            self._runner = self._handle
        limit = lib.pp_server_fd_limit(srv)
        self._fd_limit = None if limit < 0 else int(limit)
        buf = ffi.new("char[64]")
        port = ffi.new("int *")
        tcp = [lst.tcp for lst in self._listeners if lst.tcp is not None]
        if tcp:
            self._address = tcp[0]
        elif lib.pp_server_address(srv, buf, 64, port) == 0:
            self._address = (ffi.string(buf).decode(), port[0])
        with self._lock:
            self._srv = srv
            self._state = "listening"
        _RUNNING.add(self)
        return self.address

    def _begin(self) -> None:
        """listen() if needed, then running: the worker threads are started.
        Call with signals held (_uninterrupted); on failure the server is
        left as it was or stopped, never half started."""
        self._listen()
        with self._lock:
            if self._state != "listening":
                raise RuntimeError("this server has already been started; create a new one")
            self._state = "running"
        if self._group is not None:
            return
        if self._runner is not None:
            try:
                self._runner.start(self.loop or self._caller_loop)
            except BaseException:
                self._finish()
                raise
        rc = lib.pp_server_start_workers(self._srv)
        if rc < 0:
            self._finish()
            raise OSError(-rc, f"cannot start worker threads: {os.strerror(-rc)}")

    def _run(self) -> None:
        """The background thread: runs the loop, then frees the core."""
        try:
            self._loop()
        finally:
            self._finish()

    def _health_socket(self) -> Optional[socket.socket]:
        """The health listener: opened here for a name (once), or the
        socket given."""
        if isinstance(self.health, socket.socket):
            return self.health
        if self.health is not None and not self._health:
            self._health = open_listeners([self.health], [], self.backlog, False, self.unix_mode, 1)
        return self._health[0].sock if self._health else None

    @property
    def _stop_budget(self) -> float:
        """How long a graceful stop may take in all."""
        return self.drain_delay + self.drain_timeout

    def _close_listeners(self) -> None:
        """The sockets made for bind= (Unix socket files removed), the health
        listener and the notify socket; sock= is the caller's.  Idempotent."""
        close_all(self._listeners)
        close_all(self._health)
        s, self._notify = self._notify, None
        if s is not None:
            s.close()

    def _loop(self) -> None:
        rc = lib.pp_server_run(self._srv)
        if rc < 0:
            self._result = OSError(-rc, f"server loop failed: {os.strerror(-rc)}")
            log.error("server loop failed: %s", os.strerror(-rc))

    def _finish(self) -> None:
        """Frees the core, from any state it may be in (the loop returned, or
        never ran); the server is stopped after.  Idempotent."""
        with self._lock:
            srv, self._srv = self._srv, None
            if srv is not None:
                self._last_stats = self._read_stats(srv)
                self._forced = bool(lib.pp_server_was_forced(srv))
                if self._forced and self._handle is not None:
                    _ORPHANS.append(self._handle)
                lib.pp_server_free(srv)
            self._state = "stopped"
        self._close_listeners()
        runner, self._runner = self._runner, None
        if runner is not None:
            # The core is gone: its coroutines still running are cancelled
            # and awaited, and a loop of pollpool's own is closed.
            runner.close(self.drain_timeout)
        _RUNNING.discard(self)
        self._set_done()

    def _set_done(self) -> None:
        """The server has stopped: wake whoever waits, in threads or on an
        event loop (serve(), a ``stop()`` awaited through __aexit__)."""
        with self._lock:
            self._done.set()
            callbacks, self._done_callbacks = self._done_callbacks, []
        for cb in callbacks:
            try:
                cb()
            except Exception:  # pragma: no cover - a closed loop, say
                log.exception("a callback waiting for the stop failed")

    def _when_done(self, cb: Callable[[], None]) -> None:
        """Calls cb (from the thread that ends the server) once it is
        stopped, or at once if it is."""
        with self._lock:
            if not self._done.is_set():
                self._done_callbacks.append(cb)
                return
        cb()

    def _group_begin(self, background: bool) -> None:
        _RUNNING.add(self)
        try:
            self._group.start(background)
        except BaseException:
            self._group_end()
            raise
        notify(self._notify, b"READY=1")

    def _group_end(self) -> None:
        """Stops the children, whatever was started of them, and waits for
        them (within the drain timeout); then the server is stopped."""
        if not self._group.done:
            self._group.stop(self._stop_budget)
        with self._lock:
            self._last_stats = self._group.stats()
            self._forced = self._group.forced
            self._state = "stopped"
        self._close_listeners()
        _RUNNING.discard(self)
        self._set_done()

    def start(self) -> "Server":
        """Binds, starts the loop on a background thread, and returns once
        listening.  Raises OSError (with the real errno) if binding fails."""
        with _uninterrupted():
            # Nothing here can be cut short by Ctrl+C: either a thread (or
            # the supervisor) owns the running server, or it is stopped.
            self._begin()
            if self._group is not None:
                self._group_begin(background=True)
                return self
            thread = threading.Thread(target=self._run, name="pollpool-io", daemon=True)
            try:
                thread.start()
            except BaseException:
                self._finish()
                raise
            self._thread = thread
            notify(self._notify, b"READY=1")
        return self

    def serve_forever(self, on_ready: Optional[Callable[[], None]] = None) -> Dict[str, int]:
        """Serves on the calling thread until stopped; returns the final stats.
        ``on_ready`` is called once connections are accepted (with
        processes > 1: once every process listens); if it raises, the
        server stops and the exception propagates.

        On the main thread, SIGINT and SIGTERM are taken over for the
        duration: the first drains gracefully, the second stops at once.
        The previous handlers are restored afterwards.
        """
        if self.processes > 1:
            return self._serve_group(on_ready)
        signals = threading.current_thread() is threading.main_thread()
        try:
            with _uninterrupted():
                self._begin()
                # From here this thread runs the loop or, failing that,
                # finishes the server in the finally below.
                self._serving = threading.get_ident()
            if signals:
                _C_SIGNALS.add(self)
                rc = lib.pp_signals_install(self._srv)
                if rc < 0:
                    _C_SIGNALS.discard(self)
                    raise RuntimeError("another server already owns SIGINT/SIGTERM")
            notify(self._notify, b"READY=1")
            if on_ready is not None:
                on_ready()  # the backlog takes connections from listen() on
            self._loop()
        finally:
            # Taken over from the core's handlers, so that no Ctrl+C cuts
            # the clean-up short: the old handlers go back, then the core
            # (whose handlers point at it) is freed.
            with _uninterrupted(take_over=self in _C_SIGNALS):
                if self in _C_SIGNALS:
                    lib.pp_signals_restore()
                    _C_SIGNALS.discard(self)
                if self._serving:
                    self._serving = 0
                    self._finish()
        if self._result is not None:
            raise self._result
        return dict(self._last_stats)

    def _serve_group(self, on_ready: Optional[Callable[[], None]]) -> Dict[str, int]:
        try:
            with _uninterrupted():
                self._begin()
                self._serving = threading.get_ident()
            self._group_begin(background=False)
            if on_ready is not None:
                on_ready()
            self._group.serve()
        finally:
            with _uninterrupted():
                if self._serving:
                    self._serving = 0
                    self._group_end()
        return dict(self._last_stats)

    def stop(self, timeout: Optional[float] = None) -> Dict[str, int]:
        """Stops gracefully: no new connections, every message already read is
        answered, the shutdown message is sent, connections are closed.  After
        ``timeout`` seconds (default: the drain timeout) the rest is cut.
        Returns the final stats.  Any thread; idempotent.

        Called from one of this server's handlers (or hooks), or from
        ``on_ready``, it starts the shutdown and returns at once with the
        stats so far: it cannot wait for the task it runs in.  In a server
        process of ``processes=N`` (a handler holding this object), it asks
        the parent to stop every process, and returns at once."""
        if self._in_child is not None:
            own, ask_parent = self._in_child
            ask_parent()
            return own.stats()
        with _uninterrupted():
            waiting = self._request_stop()
        if not waiting:
            return self.stats()
        group = self._group
        if group is not None:
            group.stop(timeout)  # the children are gone after this
            if group.background and not self._done.is_set():
                with _uninterrupted():
                    self._group_end()
        elif timeout is not None and not self._done.wait(timeout):
            with self._lock:
                if self._srv is not None:
                    lib.pp_server_stop(self._srv, 1)
        self._done.wait()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()
        return dict(self._last_stats)

    def _retire(self) -> None:
        """In a server process being replaced: a graceful stop that tells
        nobody outside (pp_server_retire)."""
        with self._lock:
            if self._srv is not None and self._state == "running":
                lib.pp_server_retire(self._srv)

    def restart_workers(self, wait: bool = True) -> None:
        """With ``processes=N``: replaces the server processes one at a time,
        each new one serving before the old one drains, so that nothing is
        refused, reset or left unanswered (the listeners are the parent's).
        SIGHUP under :meth:`serve_forever` does the same.  With ``wait``,
        returns once every process is replaced (or the server stops).  The
        new processes are forked from this one: they run the handler this
        process holds."""
        group = self._group
        if group is None:
            raise RuntimeError("restart_workers() needs a running server with processes > 1")
        group.restart_workers(wait)

    def _request_stop(self) -> bool:
        """Starts the stop.  True if the caller is to wait for its end; False
        if it is over, or if the caller is what the end waits for."""
        with self._lock:
            state, srv, group = self._state, self._srv, self._group
            if state in ("stopped", "binding"):
                return False
            if srv is not None and state == "running":
                lib.pp_server_stop(srv, 0)
                if lib.pp_server_on_worker(srv):
                    return False  # a handler of this server: the loop ends it
                runner = self._runner
                if runner is not None and runner.on_loop_thread():
                    return False  # its coroutines: they must go on to drain
        if self._serving == threading.get_ident():
            # on_ready, or a signal handler run meanwhile, on the thread that
            # is to run the loop: it starts, finds the stop, and drains.
            if group is not None:
                group.request_stop()
            return False
        if group is not None:
            if state == "running":
                group.request_stop()
                return True
            group.stop()
            self._group_end()
            return False
        if state == "running" and (self._thread is not None or self._serving):
            return True
        # New, bound but never served, or running with nobody to run the
        # loop: nothing to drain, finish it here.
        self._finish()
        return False

    def __enter__(self) -> "Server":
        if self._state in ("new", "listening"):
            self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # -- inside an asyncio program -----------------------------------------

    async def start_async(self) -> "Server":
        """:meth:`start` for a coroutine: binds and serves on pollpool's own
        threads, and returns once listening, without blocking the event loop
        (with processes > 1 starting takes until every process listens)."""
        loop = asyncio.get_running_loop()
        if self._caller_loop is None:
            self._caller_loop = loop
        await loop.run_in_executor(None, self.start)
        return self

    async def serve(self) -> Dict[str, int]:
        """Serves until the server is stopped (by :meth:`stop` from anywhere)
        or this coroutine is cancelled, which stops it gracefully: every
        message read is answered, the shutdown message sent.  Starts the
        server first if needed.  Returns the final stats (at once if the
        server has stopped already)."""
        if self._state in ("new", "listening"):
            await self.start_async()
        loop = asyncio.get_running_loop()
        done = loop.create_future()

        def wake() -> None:
            def resolve() -> None:
                if not done.done():
                    done.set_result(None)
            try:
                loop.call_soon_threadsafe(resolve)
            except RuntimeError:  # the loop is closed: nobody waits any more
                pass

        self._when_done(wake)
        try:
            await done
        except asyncio.CancelledError:
            # Cancellation is a graceful stop; the stop itself is not to be
            # cut short by a second cancellation.
            await asyncio.shield(loop.run_in_executor(None, self.stop))
            raise
        return dict(self._last_stats)

    async def __aenter__(self) -> "Server":
        if self._state in ("new", "listening"):
            await self.start_async()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self.stop)

    # -- talking at any time ----------------------------------------------

    def send(self, conn_id: int, data: BytesLike) -> bool:
        """Queues ``data``, framed like a reply, to connection ``conn_id``.
        Any thread, inside a handler or not; never waits for the socket.
        True if queued; False if that connection is gone or closing, the
        server is not running or draining, or ``push_limit`` refused it (the
        push is dropped, or the connection closed, per ``on_push_overflow``).
        Pushes from one thread to one connection arrive in the order made."""
        if self._in_child is not None:
            return self._in_child[0].send(conn_id, data)
        buf = _push_data(data)
        with self._lock:
            srv = self._srv
            if srv is None:
                return False
            rc = lib.pp_server_send(srv, conn_id, buf, len(buf))
        return _push_result(rc) == 0

    def broadcast(self, data: BytesLike) -> int:
        """Queues ``data`` to every open connection: one framed copy shared
        by all of them.  Returns how many took it.  Any thread."""
        if self._in_child is not None:
            return self._in_child[0].broadcast(data)
        buf = _push_data(data)
        with self._lock:
            srv = self._srv
            if srv is None:
                return 0
            n = lib.pp_server_broadcast(srv, buf, len(buf))
        return _push_result(n)

    def publish(self, topic: Union[str, bytes], data: BytesLike) -> int:
        """Queues ``data`` to every connection subscribed to ``topic``
        (:meth:`Connection.subscribe`); returns how many took it."""
        if self._in_child is not None:
            return self._in_child[0].publish(topic, data)
        t = _topic(topic)
        buf = _push_data(data)
        with self._lock:
            srv = self._srv
            if srv is None:
                return 0
            n = lib.pp_server_publish(srv, t, len(t), buf, len(buf))
        return _push_result(n)

    def close_connection(self, conn_id: int) -> bool:
        """Closes connection ``conn_id`` once what was queued for it (the
        replies of a task in flight too) is sent.  Any thread; False if it
        is already gone or closing."""
        if self._in_child is not None:
            return self._in_child[0].close_connection(conn_id)
        with self._lock:
            srv = self._srv
            return srv is not None and lib.pp_server_close_conn(srv, conn_id) == 0

    def _subscribe(self, conn_id: int, topic: Union[str, bytes], on: bool) -> bool:
        t = _topic(topic)
        with self._lock:
            srv = self._srv
            if srv is None:
                return False
            fn = lib.pp_server_subscribe if on else lib.pp_server_unsubscribe
            rc = fn(srv, conn_id, t, len(t))
        return _push_result(rc) == 0

    def _pending(self, conn_id: int) -> int:
        with self._lock:
            srv = self._srv
            rc = lib.pp_server_pending(srv, conn_id) if srv is not None else -1
        return max(int(rc), 0)

    # -- inspection ------------------------------------------------------

    @property
    def addresses(self) -> List[str]:
        """Every address listened on, in bind= spelling with real ports
        (``127.0.0.1:9000``, ``[::1]:9000``, ``unix:/run/app.sock``)."""
        if self._specs:
            return list(self._specs)
        if self._group is not None and self._group.addresses:
            return [str(a) for a in self._group.addresses]
        host, port = self.address
        return [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]

    @property
    def health_address(self) -> Optional[str]:
        """The health listener's address in bind= spelling (the real port),
        or None without ``health=``."""
        if self._health:
            return self._health[0].spec
        if isinstance(self.health, socket.socket):
            return _spec_of(self.health, "health")
        return None

    @property
    def address(self) -> Tuple[str, int]:
        """(host, port) the server listens on; the real port when 0 was asked.
        With bind=, the first TCP address, or ``("unix:PATH", 0)`` when it
        listens on Unix sockets only (see :attr:`addresses`)."""
        if self._address is None:
            if self._specs:
                return self._specs[0], 0
            raise RuntimeError("the server is not listening yet")
        return self._address

    @property
    def fd_limit(self) -> Optional[int]:
        """The process's fd limit once listening (the soft RLIMIT_NOFILE,
        raised to the hard limit at start): the ceiling on open connections,
        less the few fds the server itself holds.  None if unlimited."""
        return self._fd_limit

    @property
    def running(self) -> bool:
        """True between start()/serve_forever() and the end of the stop."""
        return self._state == "running"

    @property
    def forced(self) -> bool:
        """True if the last stop cut connections (second signal or timeout)."""
        return self._forced

    @staticmethod
    def _read_stats(srv: Any) -> Dict[str, int]:
        s = ffi.new("pp_stats *")
        lib.pp_server_stats(srv, s)
        return {name: int(getattr(s, name)) for name in STAT_FIELDS}

    def stats(self) -> Dict[str, int]:
        """Counters: connections, messages, replies, bytes, errors by kind.
        With processes > 1, the sum over the server processes (each is asked),
        plus ``processes`` (running now) and ``restarts``; asked from a
        handler of a server process, that process's own counters."""
        if self._in_child is not None:
            return self._in_child[0].stats()
        if self._group is not None:
            if self._state == "running":
                stats: Dict[str, int] = self._group.stats()
                return stats
            with self._lock:
                return dict(self._last_stats)
        with self._lock:
            if self._srv is not None:
                return self._read_stats(self._srv)
            return dict(self._last_stats)

    def __repr__(self) -> str:
        where = f"{self._address[0]}:{self._address[1]}" if self._address else f"{self.host}:{self.port}"
        return f"<pollpool.Server {where} {self._state}>"


def _release(listeners: List[Listener]) -> None:
    """Closes our own copies of listening sockets that something else (the
    core, or server processes) holds duplicates of."""
    for lst in listeners:
        if lst.owned:
            lst.sock.close()


def _stop_all() -> None:
    # A worker calling into a finalizing interpreter crashes the process, so
    # every server still running is stopped before finalization begins.
    for srv in list(_RUNNING):
        try:
            srv.stop(timeout=srv._stop_budget)
        except Exception:  # pragma: no cover - best effort at exit
            log.exception("stopping %r at exit failed", srv)


# Non-daemon threads are joined before atexit hooks run, so a server served
# on one would keep the interpreter from ever reaching them: stop servers
# first, with the hooks threading runs before that join (as
# concurrent.futures does).  atexit too, for an exit that skips it.
_register_early = getattr(threading, "_register_atexit", None)
if _register_early is not None:
    try:
        _register_early(_stop_all)
    except RuntimeError:  # imported while the interpreter shuts down
        pass
atexit.register(_stop_all)
