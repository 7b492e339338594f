"""Coroutine handlers and futures: replies that come later.

A coroutine handler's messages never take the GIL on a worker thread: the C
glue (``_glue.c``, ``pp_py_async_batch``) defers each task's replies to a
handle and queues one item per task for the event loop, waking it at most
once per batch.  :class:`AsyncRunner` is the loop's side: it takes every item
queued since it last looked in one call, runs each task's messages in order
in one :class:`asyncio.Task`, and finishes the handle with the framed
replies, which the C core sends.  A synchronous handler that returns a
future gets the same handle (:func:`attacher`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import importlib
import inspect
import logging
import sys
import threading
from typing import TYPE_CHECKING, Any, Callable, Coroutine, Dict, List, Optional, Set

from ._core import ffi, lib
from .connection import Connection, PeerCred

if TYPE_CHECKING:  # pragma: no cover
    from .server import Server, _PyHandler

log = logging.getLogger("pollpool")

# Item kinds, as _glue.c's PP_AI_*.
_MESSAGES, _OPEN, _CLOSE, _CANCEL = 0, 1, 2, 3
# 3.12+: a task's first step runs at once, and one that needs no wait is
# done without ever being scheduled.
_EAGER = sys.version_info >= (3, 12)
_HOOKS = ("on_connect", "on_message", "on_disconnect")


def is_async_handler(handler: Any) -> bool:
    """A coroutine function, or a connection-aware handler with any
    coroutine method: then every call of it runs on an event loop."""
    if inspect.iscoroutinefunction(handler):
        return True
    if callable(handler) and not inspect.isfunction(handler) and \
            inspect.iscoroutinefunction(type(handler).__call__):
        return True
    return any(inspect.iscoroutinefunction(getattr(handler, n, None)) for n in _HOOKS)


def new_loop() -> asyncio.AbstractEventLoop:
    """uvloop's loop when it is installed, asyncio's otherwise."""
    try:
        uvloop = importlib.import_module("uvloop")  # optional: typed or not, it is Any here
    except ImportError:
        return asyncio.new_event_loop()
    loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    return loop


def _finish(handle: Any, data: bytes, count: int, status: int) -> None:
    lib.pp_py_finish(handle, data, len(data), count, status)


class AsyncRunner:
    """Runs a coroutine handler's tasks on one event loop: the one given,
    the caller's, or one of its own on a thread of its own."""

    def __init__(self, h: "_PyHandler", handler: Any) -> None:
        self.h = h
        self.aware = h.aware
        self.fn: Any = None if h.aware else handler
        self.q = lib.pp_py_aloop_new(int(h.delim is not None))
        if self.q == ffi.NULL:
            raise MemoryError("cannot create the event loop hand-off")
        self.fd = int(lib.pp_py_aloop_fd(self.q))
        self.loop: Optional[asyncio.AbstractEventLoop] = None
        self.own = False
        self.thread: Optional[threading.Thread] = None
        self.tasks: Dict[int, "asyncio.Task[None]"] = {}   # by handle id
        self.handles: Dict[int, Any] = {}                   # not yet finished, by id
        self.others: Set["asyncio.Task[None]"] = set()     # on_disconnect
        self.conns: Dict[int, Connection] = {}
        self.last: Dict[int, "asyncio.Task[None]"] = {}    # a connection's latest task
        self.server_ref: Any = h.server
        self.closed = False
        self._out = ffi.new("pp_pyitem **")  # _pump's, reused: no allocation per batch

    # -- where it runs ---------------------------------------------------

    def start(self, loop: Optional[asyncio.AbstractEventLoop]) -> None:
        """Attaches to loop (from its thread or any other), or, if None,
        starts a loop of its own on a thread of its own."""
        if loop is None:
            self._start_own()
            return
        self.loop = loop
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            loop.add_reader(self.fd, self._pump)
            return
        fut: "concurrent.futures.Future[None]" = concurrent.futures.Future()

        def attach() -> None:
            try:
                loop.add_reader(self.fd, self._pump)
            except BaseException as e:  # pragma: no cover - a closed loop
                fut.set_exception(e)
            else:
                fut.set_result(None)
        loop.call_soon_threadsafe(attach)
        fut.result()

    def _start_own(self) -> None:
        loop = new_loop()
        ready = threading.Event()

        def main() -> None:
            asyncio.set_event_loop(loop)
            loop.add_reader(self.fd, self._pump)
            loop.call_soon(ready.set)
            try:
                loop.run_forever()
            finally:
                try:
                    loop.run_until_complete(loop.shutdown_asyncgens())
                finally:
                    loop.close()
        self.loop = loop
        self.own = True
        thread = threading.Thread(target=main, name="pollpool-asyncio", daemon=True)
        thread.start()
        self.thread = thread
        ready.wait()

    def on_loop_thread(self) -> bool:
        loop = self.loop
        if loop is None:
            return False
        try:
            return asyncio.get_running_loop() is loop
        except RuntimeError:
            return False

    # -- the hand-off ----------------------------------------------------

    def _pump(self) -> None:
        out = self._out
        n = lib.pp_py_aloop_take(self.q, out)
        items = out[0]
        try:
            for i in range(n):
                it = items[i]
                try:
                    kind = it.kind
                    if kind == _MESSAGES:
                        handle, hid, cid = it.handle, it.handle_id, it.conn_id
                        self._spawn(hid, handle, cid, self._messages(handle, hid, cid,
                                                                     self._unpack(it)))
                    elif kind == _CANCEL:
                        self._cancel(it.handle_id)
                    elif kind == _OPEN:
                        self._open(it)
                    else:
                        self._close(it.conn_id)
                except Exception:
                    # One item's failure (no memory, a closed loop) is its
                    # connection's: its handle is finished as an error, and
                    # the items after it are still served.
                    log.exception("handing connection %d's task to the event loop failed; "
                                  "closing it", it.conn_id)
                    if it.kind in (_MESSAGES, _OPEN) and it.handle_id not in self.handles:
                        _finish(it.handle, b"", 0, -1)
        finally:
            lib.pp_py_aloop_release(items, n)

    def _unpack(self, it: Any) -> List[bytes]:
        # The messages stay in the core's buffer until the handle is
        # finished; the bytes are made here, once.
        n = it.n
        delim = self.h.delim
        if delim is not None:
            if n == 1:
                return [ffi.unpack(it.block, it.block_len)]
            messages: List[bytes] = ffi.unpack(it.block, it.block_len + len(delim)).split(delim)
            messages.pop()
            return messages
        unpack = ffi.unpack
        return [unpack(m.data, m.len) for m in it.msgs[0:n]]

    def _spawn(self, hid: int, handle: Any, conn_id: int,
               coro: Coroutine[Any, Any, None]) -> None:
        loop = self.loop
        assert loop is not None
        if _EAGER:
            task: "asyncio.Task[None]" = asyncio.Task(coro, loop=loop, eager_start=True)  # type: ignore[call-arg]
            if task.done():
                return
        else:
            task = loop.create_task(coro)
        self.tasks[hid] = task
        self.handles[hid] = handle
        if self.aware:
            self.last[conn_id] = task

    def _cancel(self, hid: int) -> None:
        task = self.tasks.get(hid)
        if task is None:
            return
        task.cancel()
        # Cancelled before its first step, a task never runs its coroutine
        # (nor its finally): the handle is finished here then.
        task.add_done_callback(lambda _t: self._finish_gone(hid))

    def _finish_gone(self, hid: int) -> None:
        self.tasks.pop(hid, None)
        handle = self.handles.pop(hid, None)
        if handle is not None:
            _finish(handle, b"", 0, -1)

    # -- running a task ----------------------------------------------------

    async def _messages(self, handle: Any, hid: int, conn_id: int, messages: List[bytes]) -> None:
        h = self.h
        conn: Optional[Connection] = None
        if self.aware:
            conn = self.conns.get(conn_id)
            fn: Any = functools.partial(h.on_message, conn) if h.on_message is not None and \
                conn is not None else None
        else:
            fn = self.fn
        results: List[Any] = []
        status = 0
        try:
            if fn is not None:
                append = results.append
                for msg in messages:
                    out = fn(msg)
                    if out.__class__ is _Coroutine:   # the common case, awaited bare
                        out = await out
                    elif out is not None and out.__class__ is not bytes:
                        out = await _awaited(out)
                    append(out)
                    if conn is not None and conn.closing:
                        break
        except asyncio.CancelledError:
            status = -1  # the connection went (or the drain ended): nobody reads
            raise
        except Exception:
            status = -1
            log.exception("handler %s failed on connection %d; closing it", h.name, conn_id)
        finally:
            self.tasks.pop(hid, None)
            self.handles.pop(hid, None)  # finished here, not by _finish_gone
            self._reply(handle, conn_id, conn, results, status)

    def _reply(self, handle: Any, conn_id: int, conn: Optional[Connection], results: List[Any],
               status: int) -> None:
        h = self.h
        delim = h.delim
        data: Optional[bytes] = None
        count = len(results)
        if delim is not None and status == 0:
            try:
                data = delim.join(results) + delim if results else b""
            except TypeError:
                data = None
        if data is None:
            from .server import _frame_checked
            data, count, ok = _frame_checked(h, results, conn_id)
            if not ok:
                status = -1
        if status == 0 and conn is not None and conn.closing:
            status = 1
        lib.pp_py_finish(handle, data, len(data), count, status)

    def _open(self, it: Any) -> None:
        h = self.h
        proxy = ffi.string(it.proxy_host).decode()
        peer = PeerCred(it.pid, it.uid, it.gid) if it.has_cred else \
            (ffi.string(it.host).decode(), it.port)
        conn = Connection(it.conn_id, peer, self.server_ref, (proxy, it.proxy_port) if proxy else None)
        self.conns[it.conn_id] = conn
        if h.on_connect is None:
            _finish(it.handle, b"", 0, 0)
            return
        handle = it.handle
        self._spawn(it.handle_id, handle, it.conn_id, self._connect(handle, it.handle_id, conn))

    async def _connect(self, handle: Any, hid: int, conn: Connection) -> None:
        h = self.h
        results: List[Any] = []
        status = 0
        on_connect = h.on_connect
        assert on_connect is not None
        try:
            out = on_connect(conn)
            if out is not None and out.__class__ is not bytes:
                out = await _awaited(out)
            if out is not None:
                results.append(out)
        except asyncio.CancelledError:
            status = -1
            raise
        except Exception:
            status = -1
            log.exception("%s.on_connect failed on connection %d; closing it", h.name, conn.id)
        finally:
            self.tasks.pop(hid, None)
            self.handles.pop(hid, None)
            self._reply(handle, conn.id, conn, results, status)

    def _close(self, conn_id: int) -> None:
        conn = self.conns.pop(conn_id, None)
        before = self.last.pop(conn_id, None)
        if conn is None or self.h.on_disconnect is None:
            return
        loop = self.loop
        assert loop is not None
        task = loop.create_task(self._disconnect(conn, before))
        self.others.add(task)
        task.add_done_callback(self.others.discard)

    async def _disconnect(self, conn: Connection, before: Optional["asyncio.Task[None]"]) -> None:
        # After the connection's last task, which a reset has cancelled.
        if before is not None and not before.done():
            await asyncio.wait([before])
        on_disconnect = self.h.on_disconnect
        assert on_disconnect is not None
        try:
            out = on_disconnect(conn)
            if inspect.isawaitable(out):
                await out
        except Exception:
            log.exception("%s.on_disconnect failed on connection %d", self.h.name, conn.id)

    # -- the end ---------------------------------------------------------

    def close(self, timeout: float) -> None:
        """After the core's loop has returned (nothing is queued any more):
        what is left is cancelled and awaited on the loop, the reader is
        removed, and a loop of its own is stopped, closed and its thread
        joined.  Then the hand-off is freed.  Any thread but the loop's."""
        if self.closed:
            return
        self.closed = True
        loop = self.loop
        if loop is not None and not loop.is_closed():
            try:
                fut = asyncio.run_coroutine_threadsafe(self._wind_up(), loop)
            except RuntimeError:  # closed meanwhile
                fut = None
            if fut is not None:
                try:
                    fut.result(max(timeout, 1.0))
                except concurrent.futures.TimeoutError:
                    log.error("coroutines of the handler did not end within %.1f s", timeout)
                except Exception:  # pragma: no cover - reported by the loop
                    log.exception("winding up the handler's coroutines failed")
            if self.own:
                loop.call_soon_threadsafe(loop.stop)
        if self.thread is not None:
            self.thread.join()
        lib.pp_py_aloop_free(self.q)
        self.q = ffi.NULL

    async def _wind_up(self) -> None:
        self._pump()  # handles queued last: finished as gone
        assert self.loop is not None
        self.loop.remove_reader(self.fd)
        pending = list(self.tasks.values()) + list(self.others)
        for hid in list(self.tasks):
            self._cancel(hid)
        for task in self.others:
            task.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)


async def _probe() -> None:
    pass


_probe_coro = _probe()
_Coroutine: Any = type(_probe_coro)
_probe_coro.close()


async def _awaited(out: Any) -> Any:
    """A handler's result: awaited if it is a coroutine or future."""
    if isinstance(out, concurrent.futures.Future):
        return await asyncio.wrap_future(out)
    if inspect.isawaitable(out):
        return await out
    return out


def attacher(h: "_PyHandler", server: "Server") -> Callable[[Any, int, int], None]:
    """What the C fast path (and _pp_py_batch) calls with a future a
    synchronous handler returned: its result becomes that message's reply,
    sent once it is done; its exception closes the connection, logged.  A
    concurrent future's callback runs on the thread that completes it, an
    asyncio future's on its loop."""
    from .server import _frame_checked

    def attach(fut: Any, handle_addr: int, conn_id: int) -> None:
        handle = ffi.cast("pp_deferred *", handle_addr)

        def done(f: Any) -> None:
            results: List[Any] = []
            status = 0
            try:
                results.append(f.result())
            except BaseException as e:  # CancelledError too
                status = -1
                log.error("handler %s: its future failed on connection %d; closing it",
                          h.name, conn_id, exc_info=e)
            data, count, ok = _frame_checked(h, results, conn_id)
            conn = h.conns.get(conn_id)
            if not ok:
                status = -1
            elif status == 0 and conn is not None and conn.closing:
                status = 1
            _finish(handle, data, count, status)

        if isinstance(fut, asyncio.Future):
            fut.get_loop().call_soon_threadsafe(fut.add_done_callback, done)
        else:
            fut.add_done_callback(done)
    return attach
