"""``Server(processes=N)``: N forked server processes sharing one port.

Each child is a whole pollpool server (its own I/O thread and worker pool).
The parent opens every listening socket before forking and keeps it for the
server's whole life: with host/port, one set of SO_REUSEPORT sockets per
process slot (the kernel spreads new connections across the slots); with
``bind=``/``sock=``, the listeners every child shares.  A child serves
duplicates and closes its inherited copies, so a child that exits, crashes
or is restarted never closes a socket with a queue: what waits there is
served by the next child of the slot.  Port 0 resolves once, and a bind
error is raised in the caller.

The parent supervises: it forwards a stop (SIGTERM to each child: the first
drains gracefully, a second one cuts), answers ``stats()`` by asking every
child over a socketpair and adding the answers up, and restarts a child that
dies unasked, with a growing delay if it keeps dying.  Children run in their
own process group, so a terminal's Ctrl+C reaches the parent only and each
child sees exactly the signals the parent forwards; a child whose parent dies
gets SIGTERM from the kernel (Linux).

Children are forked: they inherit the handler and everything it refers to,
and also every fd the parent has open.  Fork before opening what children
must not share.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import select
import signal
import socket
import sys
import threading
import time
import warnings
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple

from ._core import lib

if TYPE_CHECKING:  # pragma: no cover
    from .server import Server

log = logging.getLogger("pollpool")

#: How long a child may take to bind and report ready.
READY_TIMEOUT = 10.0
#: How long stats() waits for one child's answer.
STATS_TIMEOUT = 2.0
#: Restart delay after a quick death, doubled per quick death, capped.
RESTART_DELAY = 0.1
RESTART_DELAY_MAX = 5.0
#: A child that lived this long resets its slot's restart delay.
STABLE_AFTER = 5.0
_TICK = 0.05


def reserve(host: str, port: int) -> Tuple[List[socket.socket], int]:
    """Binds host:port on every address it resolves to, with SO_REUSEPORT and
    without listening, as the core's listen.c would.  Returns the sockets and
    the port (the one chosen when 0 was asked)."""
    try:
        infos = socket.getaddrinfo(host or None, port, socket.AF_UNSPEC,
                                   socket.SOCK_STREAM, 0, socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise OSError(errno.EADDRNOTAVAIL, f"cannot listen on {host}:{port}: {e}") from e
    socks: List[socket.socket] = []
    chosen = port
    first_err: Optional[OSError] = None
    try:
        for family, kind, proto, _, addr in infos:
            if family not in (socket.AF_INET, socket.AF_INET6) or len(socks) >= 8:
                continue
            s = socket.socket(family, kind, proto)
            try:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                if family == socket.AF_INET6:
                    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                s.bind((addr[0], chosen) + tuple(addr[2:]))
            except OSError as e:
                s.close()
                if e.errno in (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL):
                    first_err = first_err or e
                    continue
                raise OSError(e.errno, f"cannot listen on {host}:{port}: "
                                       f"{os.strerror(e.errno or 0)}") from e
            socks.append(s)
            if chosen == 0:
                chosen = s.getsockname()[1]
        if not socks:
            err = first_err.errno if first_err else errno.EADDRNOTAVAIL
            raise OSError(err, f"cannot listen on {host}:{port}: {os.strerror(err or 0)}")
    except BaseException:
        for s in socks:
            s.close()
        raise
    return socks, chosen


class _Child:
    __slots__ = ("slot", "pid", "sock", "lock", "buf", "seq", "last", "final", "forced",
                 "born", "reaped", "stop_asked")

    def __init__(self, slot: int, pid: int, sock: socket.socket) -> None:
        self.slot = slot
        self.pid = pid
        self.sock = sock
        self.lock = threading.Lock()       # the socket and what is read from it
        self.buf = b""
        self.seq = 0                       # of the last stats request
        self.last: Dict[str, int] = {}     # the latest stats it sent
        self.final: Optional[Dict[str, int]] = None
        self.forced = False
        self.born = time.monotonic()
        self.reaped = False                # waited for: its pid may be reused
        self.stop_asked = False            # its handler called stop()


def _send(sock: socket.socket, msg: Dict[str, Any]) -> None:
    sock.sendall(json.dumps(msg).encode() + b"\n")


class ProcessGroup:
    """The parent side of ``Server(processes=N)``."""

    def __init__(self, server: "Server") -> None:
        self.server = server
        self.n = server.processes
        self.port = 0
        self._reserved: List[socket.socket] = []
        # host/port: per slot, SO_REUSEPORT sockets listening on every
        # address, opened by the parent and served by that slot's child
        # (inherited through the fork).  The kernel spreads connections
        # across the slots; a slot whose child died keeps its queue, served
        # by the next child of the slot, instead of resetting it.
        self._slots: List[List[socket.socket]] = []
        # bind= or sock=: listeners the parent opens once and every child
        # serves (inherited through the fork); they outlive the children.
        self._listeners: List[Any] = []
        self.notify: Optional[socket.socket] = None   # systemd's, the parent's alone
        self._children: Dict[int, _Child] = {}   # slot -> live child
        # Rolling restarts (restart_workers, SIGHUP): children replaced and
        # draining, the restart under way, and the callers waiting for it.
        self._retiring: List[_Child] = []
        self._roll_wanted = False                # set by SIGHUP's handler too
        self._rolling: Optional[Dict[str, Any]] = None
        self._roll_waiters: List[threading.Event] = []
        self._serving_thread: Optional[threading.Thread] = None   # in serve()
        self._dead: Dict[str, int] = {}          # totals of children gone
        self._restarts = 0
        self._delay = [RESTART_DELAY] * self.n
        self._due: Dict[int, float] = {}         # slot -> when to restart it
        self._io = threading.Lock()              # the tables above
        self._stop_level = 0
        self._signals = 0                        # bumped by signal handlers
        self._forced = False
        self._thread: Optional[threading.Thread] = None
        self._supervising = False                # a thread is in _supervise
        self._started = threading.Event()
        self._start_error: Optional[BaseException] = None
        self._done = threading.Event()
        self._parent = os.getpid()

    # -- parent ----------------------------------------------------------

    def listen(self) -> Tuple[str, int]:
        srv = self.server
        srv._health_socket()   # opened once here; every child serves it, inherited
        if srv.bind or srv.sock:
            if not self._listeners:
                from .listeners import open_listeners
                self._listeners = open_listeners(srv.bind, srv.sock, srv.backlog, srv.reuse_port,
                                                 srv.unix_mode, lib.PP_MAX_LISTENERS)
            tcp = [lst.tcp for lst in self._listeners if lst.tcp is not None]
            return tcp[0] if tcp else (self._listeners[0].spec, 0)
        if not self._slots:
            self._reserved, self.port = reserve(self.server.host, self.server.port)
            try:
                self._slots.append(self._reserved)
                for _ in range(1, self.n):
                    self._slots.append(reserve(self.server.host, self.port)[0])
                for socks in self._slots:
                    for s in socks:
                        s.listen(srv.backlog)
            except BaseException:
                self._finish()
                raise
        host = self._slots[0][0].getsockname()[0]
        return host, self.port

    @property
    def addresses(self) -> List[str]:
        return [lst.spec for lst in self._listeners]

    def start(self, background: bool) -> None:
        """Forks every child and returns once all listen; a child that cannot
        start makes this raise (the others are stopped).

        Children are forked by the thread that supervises them: the kernel's
        parent-death signal fires when the forking *thread* exits, so that
        thread must outlive them.  In the background that is a thread of our
        own; in the foreground the caller, who then calls serve()."""
        self.listen()
        if not background:
            # Supervised once serve() runs; until then stop() reaps itself.
            self._start_all()
            return
        self._thread = threading.Thread(target=self._background, name="pollpool-supervisor",
                                        daemon=True)
        self._thread.start()
        self._started.wait()
        if self._start_error is not None:
            self._thread.join()
            raise self._start_error

    def _start_all(self) -> None:
        try:
            for slot in range(self.n):
                if self._stop_level:  # stopped while starting: start no more
                    break
                self._start_child(slot)
        except BaseException:
            self.request_stop()
            self._reap_all(self.server._stop_budget)
            self._finish()
            raise

    def _background(self) -> None:
        try:
            self._start_all()
        except BaseException as e:
            self._start_error = e
            return
        finally:
            self._started.set()
        self._supervise()

    def serve(self) -> None:
        """Supervises on this thread until stopped; on the main thread SIGINT
        and SIGTERM are forwarded to the children (the second one forces),
        and SIGHUP replaces them one at a time (restart_workers)."""
        main = threading.current_thread() is threading.main_thread()
        saved = {}
        if main:
            for sig in (signal.SIGINT, signal.SIGTERM):
                saved[sig] = signal.signal(sig, self._on_signal)
            saved[signal.SIGHUP] = signal.signal(signal.SIGHUP, self._on_hangup)
        self._serving_thread = threading.current_thread()
        try:
            self._supervise()
        finally:
            self._serving_thread = None
            for sig, old in saved.items():
                signal.signal(sig, old)

    def _on_signal(self, signum: int, frame: Any) -> None:
        # Runs between bytecodes of the main thread, maybe inside _supervise
        # with _io held: no locks here, the loop acts on it within a tick.
        self._signals += 1

    def _on_hangup(self, signum: int, frame: Any) -> None:
        # "Reload": as _on_signal, a flag the supervising loop acts on.
        self._roll_wanted = True

    def request_stop(self, force: bool = False) -> None:
        """Graceful (SIGTERM to each child), or forced (a second SIGTERM: the
        children's own second signal cuts).  Asking again for the same level
        changes nothing."""
        with self._io:
            want = 2 if force else 1
            if want <= self._stop_level:
                return
            if self._stop_level == 0:
                from .listeners import notify
                notify(self.notify, b"STOPPING=1")
                # The children answer health checks with "drain" until their
                # drains begin, and close their copies of the listeners then;
                # the parent's copies must not keep the sockets open after
                # that, queueing connections nobody accepts (a Unix socket's
                # file goes when the parent stops).
                from .server import _release
                _release(self._listeners + self.server._health)
                for socks in self._slots:
                    for s in socks:
                        s.close()
            self._stop_level = want
            self._due.clear()
            for child in self._children.values():
                if not child.reaped:
                    self._kill(child.pid, signal.SIGTERM)
            if force:   # the replaced ones drain already: a second SIGTERM cuts
                for child in self._retiring:
                    if not child.reaped:
                        self._kill(child.pid, signal.SIGTERM)

    def stop(self, timeout: Optional[float] = None) -> None:
        self.request_stop()
        if self._thread is None and not self._supervising:
            # Nobody supervises (never started, or serve() not or no longer
            # running): reap here.
            self._reap_all(timeout)
            self._finish()
            return
        if timeout is not None and not self._done.wait(timeout):
            self.request_stop(force=True)
        self._done.wait()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()

    def _reap_all(self, timeout: Optional[float]) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._children:
            if deadline is not None and time.monotonic() > deadline:
                self.request_stop(force=True)
                deadline = None
            self._reap()
            time.sleep(_TICK)

    @property
    def background(self) -> bool:
        """True if a thread of this group supervises (start(background=True))."""
        return self._thread is not None

    @property
    def forced(self) -> bool:
        return self._forced

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def stats(self) -> Dict[str, int]:
        from .server import STAT_FIELDS
        # One snapshot of who is alive and what the dead counted, so that a
        # child reaped meanwhile is counted once; then each child is asked
        # under its own lock, which leaves reaping and restarts free to go on.
        with self._io:
            total = dict.fromkeys(STAT_FIELDS, 0)
            for k, v in self._dead.items():
                total[k] = total.get(k, 0) + v
            total["processes"] = len(self._children)
            total["restarts"] = self._restarts
            children = list(self._children.values()) + list(self._retiring)
        for child in children:
            with child.lock:
                got = self._ask(child)
            for k in STAT_FIELDS:
                total[k] += got.get(k, 0)
        return total

    # -- supervision -----------------------------------------------------

    def _supervise(self) -> None:
        self._supervising = True
        try:
            seen = 0
            while True:
                # Each signal is one step: the first drains, the next cuts.
                while seen < self._signals:
                    seen += 1
                    self.request_stop(force=self._stop_level >= 1)
                self._reap()
                with self._io:
                    if self._stop_level and not self._children and not self._retiring:
                        break
                    now = time.monotonic()
                    due = [slot for slot, at in self._due.items() if at <= now]
                for slot in due:
                    with self._io:
                        if self._stop_level or slot not in self._due:
                            continue
                        del self._due[slot]
                    try:
                        self._start_child(slot)
                    except Exception:
                        log.exception("restarting server process %d failed", slot)
                        with self._io:
                            self._schedule(slot)
                self._roll_step()
                self._listen_children(_TICK)
        finally:
            self._supervising = False
            self._finish()

    # -- rolling restarts ------------------------------------------------

    def restart_workers(self, wait: bool = True) -> None:
        """Replaces the children one at a time: each slot's new child is
        serving (its listeners are the parent's, so no connection waits on a
        closed socket) before the old one is told to drain; the next slot
        follows once the old child has exited.  Asked again while one runs,
        another follows it.  Forking is the supervising thread's (see
        start()), so this asks it and, with wait, blocks until it is done or
        the group stops."""
        done = threading.Event()
        with self._io:
            if self._stop_level:
                return
            self._roll_wanted = True
            self._roll_waiters.append(done)
        if wait and threading.current_thread() is not self._supervisor_thread():
            while not done.wait(0.1):
                if self._done.is_set():
                    return

    def _supervisor_thread(self) -> Optional[threading.Thread]:
        return self._thread if self._thread is not None else self._serving_thread

    def _roll_step(self) -> None:
        """One step of a rolling restart, on the supervising thread: start a
        slot's new child, or see whether the old one it replaced is gone."""
        r = self._rolling
        if r is None:
            if not self._roll_wanted or self._stop_level:
                return
            with self._io:
                self._roll_wanted = False
                waiters, self._roll_waiters = self._roll_waiters, []
            log.info("replacing %d server processes one at a time", self.n)
            r = self._rolling = {"slot": 0, "old": None, "waiters": waiters, "deadline": 0.0}
        old = r["old"]
        if old is not None:
            if not old.reaped:
                if time.monotonic() > r["deadline"]:
                    log.error("replaced server process %d (pid %d) did not exit; killing it",
                              old.slot, old.pid)
                    self._kill(old.pid, signal.SIGKILL)
                    r["deadline"] = float("inf")
                return
            r["slot"] += 1
            r["old"] = None
        if r["slot"] >= self.n or self._stop_level:
            self._rolling = None
            for ev in r["waiters"]:
                ev.set()
            return
        slot = r["slot"]
        try:
            child = self._new_child(slot)
        except Exception:
            log.exception("a new server process %d did not start; the restart stops", slot)
            self._rolling = None
            for ev in r["waiters"]:
                ev.set()
            return
        with self._io:
            old = self._children.get(slot)
            self._children[slot] = child
            self._due.pop(slot, None)      # it replaces a restart that was due, too
            if old is not None and not old.reaped:
                self._retiring.append(old)
            else:
                old = None
        if old is not None:
            # Not SIGTERM: a stop would tell the health listener's checkers
            # that this instance is leaving (drain), while only a process of
            # it is being replaced.
            try:
                with old.lock:
                    _send(old.sock, {"cmd": "retire"})
            except OSError:
                self._kill(old.pid, signal.SIGTERM)
        r["old"] = old
        r["deadline"] = time.monotonic() + self.server._stop_budget + 5.0

    def _finish(self) -> None:
        for socks in self._slots:
            for s in socks:
                s.close()
        self._slots = []
        self._reserved = []
        from .listeners import close_all
        close_all(self._listeners)   # Unix socket files go with the last child
        self._done.set()

    def _reap(self) -> None:
        exited = []
        with self._io:
            for child in list(self._children.values()) + self._retiring:
                if child.reaped:
                    continue
                try:
                    pid, status = os.waitpid(child.pid, os.WNOHANG)
                except ChildProcessError:
                    pid, status = child.pid, 0
                if pid != 0:
                    child.reaped = True
                    exited.append((child, status))
        for child, _status in exited:
            with child.lock:
                self._drain(child)
                child.sock.close()
        with self._io:
            # Out of the table and into the totals at once: stats() sees the
            # child in exactly one of them.
            for child, status in exited:
                slot = child.slot
                code = os.waitstatus_to_exitcode(status)
                if child in self._retiring:   # replaced: its exit was asked for
                    self._retiring.remove(child)
                    for k, v in (child.final or child.last).items():
                        if k != "active":
                            self._dead[k] = self._dead.get(k, 0) + v
                    if child.forced or code not in (0, 130):
                        log.warning("replaced server process %d (pid %d) %s", slot, child.pid,
                                    _describe(code))
                    continue
                del self._children[slot]
                if child.forced or code == 130:
                    self._forced = True
                # What it sent last is what it counted: a crash loses at most
                # what happened since the last stats() or its final report.
                for k, v in (child.final or child.last).items():
                    if k != "active":
                        self._dead[k] = self._dead.get(k, 0) + v
                if self._stop_level:
                    if code not in (0, 130):
                        log.warning("server process %d (pid %d) %s while stopping",
                                    slot, child.pid, _describe(code))
                    continue
                self._restarts += 1
                log.error("server process %d (pid %d) %s; restarting it",
                          slot, child.pid, _describe(code))
                if time.monotonic() - child.born >= STABLE_AFTER:
                    self._delay[slot] = RESTART_DELAY
                self._schedule(slot)

    def _schedule(self, slot: int) -> None:
        self._due[slot] = time.monotonic() + self._delay[slot]
        self._delay[slot] = min(self._delay[slot] * 2, RESTART_DELAY_MAX)

    @staticmethod
    def _kill(pid: int, sig: int) -> None:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass

    # -- talking to children ---------------------------------------------

    def _listen_children(self, timeout: float) -> None:
        """Waits up to timeout for what children say unasked: a "stop" (their
        handler called stop() on this server) stops the whole group."""
        with self._io:
            children = [c for c in list(self._children.values()) + self._retiring if not c.reaped]
        socks = {c.sock.fileno(): c for c in children if c.sock.fileno() >= 0}
        if not socks:
            time.sleep(timeout)
            return
        try:
            ready, _, _ = select.select(list(socks), [], [], timeout)
        except (OSError, ValueError):
            return
        for fd in ready:
            child = socks[fd]
            if not child.lock.acquire(blocking=False):
                continue  # stats() is reading it; it hands on what it finds
            try:
                try:
                    data = child.sock.recv(65536, socket.MSG_DONTWAIT)
                except OSError:
                    data = b""
                child.buf += data
                while b"\n" in child.buf:
                    line, child.buf = child.buf.split(b"\n", 1)
                    self._handle(child, json.loads(line))
            finally:
                child.lock.release()
            if child.stop_asked:
                child.stop_asked = False
                self.request_stop()  # graceful; asking again changes nothing
            if not data:
                time.sleep(timeout)  # EOF: reaped soon; do not spin on it

    def _handle(self, child: _Child, msg: Dict[str, Any]) -> None:
        if "stop" in msg:
            child.stop_asked = True
        if "stats" in msg:
            child.last = msg["stats"]
        elif "final" in msg:
            child.final = msg["final"]
            child.last = msg["final"]
            child.forced = bool(msg.get("forced"))

    def _read(self, child: _Child, timeout: float) -> Optional[Dict[str, Any]]:
        """The next message from child, or None on timeout or EOF."""
        deadline = time.monotonic() + timeout
        while b"\n" not in child.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            r, _, _ = select.select([child.sock], [], [], left)
            if not r:
                return None
            try:
                data = child.sock.recv(65536)
            except OSError:
                return None
            if not data:
                return None
            child.buf += data
        line, child.buf = child.buf.split(b"\n", 1)
        msg: Dict[str, Any] = json.loads(line)
        return msg

    def _drain(self, child: _Child) -> None:
        """Takes what an exited child left in its socket (its final report)."""
        while True:
            msg = self._read(child, 0.0 if child.buf else 0.2)
            if msg is None:
                return
            self._handle(child, msg)

    def _ask(self, child: _Child) -> Dict[str, int]:
        """The child's counters now (or the last known).  Answers carry the
        request's number, so a late answer to a timed-out request is not
        taken for the answer to the next one."""
        if child.sock.fileno() < 0:
            return child.last
        child.seq += 1
        try:
            _send(child.sock, {"cmd": "stats", "seq": child.seq})
        except OSError:
            return child.last
        deadline = time.monotonic() + STATS_TIMEOUT
        while True:
            msg = self._read(child, max(0.0, deadline - time.monotonic()))
            if msg is None:
                return child.last
            self._handle(child, msg)
            if "final" in msg or msg.get("seq") == child.seq:
                return child.last

    def _wait_ready(self, child: _Child) -> None:
        msg = self._read(child, READY_TIMEOUT)
        if msg is not None and "ready" in msg:
            return
        if msg is not None and "error" in msg:
            err = int(msg.get("errno") or 0)
            raise OSError(err, f"server process {child.slot}: {msg['error']}")
        raise RuntimeError(f"server process {child.slot} (pid {child.pid}) did not start")

    def _new_child(self, slot: int) -> _Child:
        """Forks a child for slot and waits until it listens; one that does
        not is killed and reaped, and the error raised."""
        child = self._spawn(slot)
        try:
            self._wait_ready(child)
        except BaseException:
            self._kill(child.pid, signal.SIGKILL)
            os.waitpid(child.pid, 0)
            child.sock.close()
            raise
        return child

    def _start_child(self, slot: int) -> None:
        """Forks the child for slot and waits until it listens.  It joins the
        table only then, so that nothing else reads its socket before."""
        child = self._new_child(slot)
        with self._io:
            self._children[slot] = child
            if self._stop_level:
                self._kill(child.pid, signal.SIGTERM)

    def _spawn(self, slot: int) -> _Child:
        parent_end, child_end = socket.socketpair()
        # Children fork from a process whose other threads may hold locks;
        # the child touches only what it builds after the fork.
        sys.stdout.flush()
        sys.stderr.flush()
        try:
            pid = _fork()
        except OSError:
            parent_end.close()
            child_end.close()
            raise
        if pid == 0:  # pragma: no cover - runs in the child, which _exits
            code = 1
            try:
                parent_end.close()
                others = [c.sock for c in self._children.values()]
                for i, socks in enumerate(self._slots):
                    if i != slot:
                        others += socks
                for s in others:
                    s.close()
                code = _child_main(self.server, self.port, child_end, self._parent,
                                   [lst.sock for lst in self._listeners] or
                                   (self._slots[slot] if self._slots else []))
            finally:
                for stream in (sys.stdout, sys.stderr):
                    try:
                        stream.flush()
                    except Exception:
                        pass
                os._exit(code)
        child_end.close()
        return _Child(slot, pid, parent_end)


def _fork() -> int:
    """os.fork(), without the "multi-threaded fork" DeprecationWarning of
    Python 3.12+, which is about a child that goes on using what other
    threads of the parent held at the fork.  A server process does not:
    it closes what it inherited, builds its own server and threads, and uses
    only what CPython re-initialises in a child (the GIL, the import lock,
    logging's locks).  The parent runs no I/O thread or worker of its own.
    What stays the user's is the handler: locks it shares with other threads
    of the parent (see the README, "Many connections, many cores")."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*multi-threaded, use of fork\(\)",
                                category=DeprecationWarning)
        return os.fork()


def _describe(code: int) -> str:
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"was killed by {name}"
    return f"exited with status {code}"


def _child_main(parent: "Server", port: int, sock: socket.socket, parent_pid: int,
                listeners: List[socket.socket]) -> int:
    """A server process: serves until SIGTERM, reports, returns the exit code."""
    from .server import Server
    # Until the server's own handlers are in place (serve_forever), a stop
    # waits: killed by a default SIGTERM, the child would reset what its
    # backlog holds.  The parent's Python handlers go too.
    stop_signals = {signal.SIGINT, signal.SIGTERM}
    signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)
    for sig in stop_signals:
        signal.signal(sig, signal.SIG_DFL)
    os.setpgid(0, 0)
    lib.pp_py_parent_death_signal(signal.SIGTERM)
    if os.getppid() != parent_pid:  # the parent died before the line above
        return 1
    send_lock = threading.Lock()

    def send(msg: Dict[str, Any]) -> None:
        with send_lock:
            _send(sock, msg)

    try:
        # A loop given to the parent is not this process's: a coroutine
        # handler runs on a loop of the child's own.
        # With bind= or sock=, the parent's listeners, inherited: the child
        # serves duplicates and the parent keeps them open across restarts.
        where: Dict[str, Any] = {"bind": None, "sock": listeners} if listeners else \
            {"port": port, "reuse_port": True}
        health = parent._health_socket()   # inherited, or None
        where["health"] = health
        srv = Server(parent.handler, **{**parent._kwargs, **where, "processes": 1,
                                        "backend": parent.backend, "loop": None})
        srv.listen()
        # The core serves its duplicates and closes them as its drain
        # begins; the inherited copies, kept open until this process exits,
        # would meanwhile queue connections nobody accepts.
        for s in listeners + ([health] if health is not None else []):
            s.close()
    except OSError as e:
        send({"error": str(e), "errno": e.errno})
        return 3
    # A handler that holds the parent's Server (the object the user made)
    # talks to this process's server through it: pushes reach this process's
    # connections, and stop() asks the parent to stop every process.
    parent._in_child = (srv, lambda: send({"stop": True}))

    def answer() -> None:
        buf = b""
        while True:
            try:
                data = sock.recv(4096)
            except OSError:
                data = b""
            if not data:  # the parent is gone: stop like on SIGTERM
                srv.stop()
                return
            buf += data
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                req = json.loads(line)
                if req.get("cmd") == "retire":   # replaced: drain, tell nobody
                    srv._retire()
                elif req.get("cmd") == "stats":
                    try:
                        send({"stats": srv.stats(), "seq": req.get("seq")})
                    except OSError:
                        return

    def ready() -> None:
        # Serving, with the handlers installed: a stop now drains.
        send({"ready": os.getpid()})
        signal.pthread_sigmask(signal.SIG_UNBLOCK, stop_signals)
        threading.Thread(target=answer, name="pollpool-stats", daemon=True).start()

    try:
        final = srv.serve_forever(on_ready=ready)
    except Exception:
        log.exception("server process %d failed", os.getpid())
        return 1
    try:
        send({"final": final, "forced": srv.forced})
    except OSError:
        pass
    return 130 if srv.forced else 0
