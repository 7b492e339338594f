"""processes=N restarts that lose nothing: the parent owns every listening
socket (one SO_REUSEPORT set per process slot for host/port, the shared
ones for bind=), so a child that exits, is killed or restarted never closes
a socket with a queue; a restarted child drains what it accepted.

Load: client threads making one connection per request, as health checks
and short-lived clients do.  Every outcome is counted: an answer, a reset,
an EOF without the answer, a refusal.
"""

from __future__ import annotations

import glob
import os
import signal
import socket
import threading
import time

import pytest

import pollpool

pytestmark = pytest.mark.timeout(90)


def children() -> set:
    out = set()
    for f in glob.glob(f"/proc/{os.getpid()}/task/*/children"):
        with open(f) as fh:
            out |= {int(x) for x in fh.read().split()}
    return out


def wait_for(cond, limit=30.0):
    end = time.monotonic() + limit
    while not cond():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.02)


def one_request(addr, msg: bytes = b"x") -> str:
    try:
        with socket.create_connection(addr, timeout=20) as s:
            s.sendall(msg + b"\n")
            data = b""
            while not data.endswith(b"\n"):
                chunk = s.recv(100)
                if not chunk:
                    break
                data += chunk
            return "ok" if data == msg + b"\n" else "eof"
    except (ConnectionResetError, BrokenPipeError):
        return "reset"
    except ConnectionRefusedError:
        return "refused"
    except OSError as e:
        return f"other: {e}"


class Load:
    """Threads making one connection per request until stopped."""

    def __init__(self, addr, threads: int = 8) -> None:
        self.addr = addr
        self.counts: dict = {}
        self.lock = threading.Lock()
        self.running = True
        self.threads = [threading.Thread(target=self._run) for _ in range(threads)]
        for t in self.threads:
            t.start()

    def _run(self) -> None:
        while self.running:
            k = one_request(self.addr)
            with self.lock:
                self.counts[k] = self.counts.get(k, 0) + 1

    def total_ok(self) -> int:
        with self.lock:
            return self.counts.get("ok", 0)

    def stop(self) -> dict:
        self.running = False
        for t in self.threads:
            t.join(30)
        return dict(self.counts)


@pytest.mark.parametrize("where", ["host/port", "bind"])
def test_children_restarted_under_load_lose_nothing(where):
    kw = {"bind": ["127.0.0.1:0"]} if where == "bind" else {"port": 0}
    srv = pollpool.Server(lambda m: m, processes=2, threads=2, **kw)
    srv.start()
    load = None
    try:
        wait_for(lambda: len(children()) == 2)
        first = sorted(children())
        load = Load(srv.address)
        wait_for(lambda: load.total_ok() > 200)
        # Each child in turn told to go (SIGTERM: it drains, exits, and the
        # parent starts another).  SIGKILL takes what the child holds with
        # it, whatever the sockets; what it leaves in the queue is tested in
        # test_a_killed_childs_queue_is_served_by_the_next_one.
        for pid in first:
            before = load.total_ok()
            os.kill(pid, signal.SIGTERM)
            wait_for(lambda: pid not in children() and len(children()) == 2)
            wait_for(lambda: load.total_ok() > before + 200)
        counts = load.stop()
        load = None
        stats = srv.stats()
    finally:
        if load is not None:
            load.stop()
        srv.stop(timeout=10)
    assert stats["restarts"] == 2
    assert set(counts) == {"ok"}, counts
    assert counts["ok"] > 600


def test_a_killed_childs_queue_is_served_by_the_next_one():
    """Connections waiting in a killed child's accept queue are answered by
    the child started in its place: the parent's socket kept the queue.
    (A child's own REUSEPORT socket would have reset them all.)  Both
    children are stopped (SIGSTOP) while the connections come in, so they
    are all in the queues and none in a child's hands."""
    srv = pollpool.Server(lambda m: m, processes=2, threads=2, port=0)
    srv.start()
    conns = []
    stopped = []
    try:
        wait_for(lambda: len(children()) == 2)
        pids = sorted(children())
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
            stopped.append(pid)
        for i in range(40):
            c = socket.create_connection(srv.address, timeout=30)
            c.sendall(b"m%d\n" % i)
            conns.append(c)
        os.kill(pids[0], signal.SIGKILL)
        os.kill(pids[1], signal.SIGCONT)
        stopped.clear()
        got = []
        for i, c in enumerate(conns):
            data = b""
            try:
                while not data.endswith(b"\n"):
                    chunk = c.recv(100)
                    if not chunk:
                        break
                    data += chunk
            except ConnectionResetError:
                data = b"<reset>"
            got.append(data == b"m%d\n" % i)
        stats = srv.stats()
    finally:
        for pid in stopped:
            os.kill(pid, signal.SIGCONT)
        for c in conns:
            c.close()
        srv.stop(timeout=10)
    assert all(got), f"{got.count(False)} of {len(got)} lost"
    assert stats["restarts"] == 1
