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
            # The answer first (a goodbye may follow it in the same read).
            return "ok" if data.split(b"\n", 1)[0] == msg else "eof"
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


class KeepAlive:
    """Clients that keep one connection and send requests one after the
    other.  A request counts as lost unless its answer came, or the server's
    goodbye came before it (then the client knows, reconnects and sends it
    again): what a balancer's keep-alive connection needs."""

    def __init__(self, addr, threads: int = 4) -> None:
        self.addr = addr
        self.answered = self.lost = self.goodbyes = 0
        self.lock = threading.Lock()
        self.running = True
        self.threads = [threading.Thread(target=self._run, args=(i,)) for i in range(threads)]
        for t in self.threads:
            t.start()

    def _run(self, i: int) -> None:
        n = 0
        s = None
        buf = b""
        while self.running:
            if s is None:
                s = socket.create_connection(self.addr, timeout=20)
                buf = b""
            msg = b"k%d-%d" % (i, n)
            try:
                s.sendall(msg + b"\n")
                while b"\n" not in buf:
                    chunk = s.recv(100)
                    if not chunk:
                        raise ConnectionResetError("EOF")
                    buf += chunk
            except (ConnectionResetError, BrokenPipeError):
                with self.lock:
                    self.lost += 1
                s.close()
                s = None
                n += 1
                continue
            line, buf = buf.split(b"\n", 1)
            if line == b"bye":            # told first: send it again elsewhere
                with self.lock:
                    self.goodbyes += 1
                s.close()
                s = None
                continue
            with self.lock:
                if line == msg:
                    self.answered += 1
                else:
                    self.lost += 1
            n += 1
        if s is not None:
            s.close()

    def stop(self):
        self.running = False
        for t in self.threads:
            t.join(30)
        return self.answered, self.lost, self.goodbyes


def test_restart_workers_replaces_every_child_under_load_and_loses_nothing():
    srv = pollpool.Server(lambda m: m, processes=2, threads=2, port=0, shutdown_message=b"bye")
    srv.start()
    load = keep = None
    try:
        wait_for(lambda: len(children()) == 2)
        before = children()
        load = Load(srv.address, threads=4)
        keep = KeepAlive(srv.address, threads=4)
        wait_for(lambda: load.total_ok() > 200)
        for _ in range(2):
            srv.restart_workers()
        after = children()
        ok_then = load.total_ok()
        wait_for(lambda: load.total_ok() > ok_then + 200)   # the new ones serve
        counts = load.stop()
        answered, lost, goodbyes = keep.stop()
        load = keep = None
        stats = srv.stats()
    finally:
        for x in (load, keep):
            if x is not None:
                x.stop()
        srv.stop(timeout=10)
    assert not (before & after) and len(after) == 2, (before, after)
    assert set(counts) == {"ok"}, counts
    assert lost == 0 and answered > 100, (answered, lost, goodbyes)
    assert goodbyes >= 1          # keep-alive clients were told, each time, and came back
    assert stats["processes"] == 2 and stats["restarts"] == 0


def test_restart_workers_needs_server_processes():
    srv = pollpool.Server(lambda m: m, port=0)
    with pytest.raises(RuntimeError):
        srv.restart_workers()


SIGHUP_SCRIPT = """
import os, sys, pollpool
srv = pollpool.Server(lambda m: m, processes=2, threads=1, port=0)
def ready():
    print("port", srv.address[1], flush=True)
srv.serve_forever(on_ready=ready)
print("exited", flush=True)
"""


def test_sighup_under_serve_forever_replaces_the_children(tmp_path):
    import subprocess
    import sys
    script = tmp_path / "hup.py"
    script.write_text(SIGHUP_SCRIPT)
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("port"), line + proc.stderr.read()
        addr = ("127.0.0.1", int(line.split()[1]))

        def kids():
            try:
                with open(f"/proc/{proc.pid}/task/{proc.pid}/children") as f:
                    return {int(x) for x in f.read().split()}
            except FileNotFoundError:
                return set()
        wait_for(lambda: len(kids()) == 2)
        first = kids()
        load = Load(addr, threads=4)
        try:
            wait_for(lambda: load.total_ok() > 100)
            proc.send_signal(signal.SIGHUP)
            wait_for(lambda: len(kids()) == 2 and not (kids() & first))
            ok_then = load.total_ok()
            wait_for(lambda: load.total_ok() > ok_then + 100)
        finally:
            counts = load.stop()
        assert set(counts) == {"ok"}, counts
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
        assert "exited" in out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_rolling_restart_keeps_health_up_and_skips_the_drain_delay():
    """Only a process of the instance is replaced: the health listener never
    says "drain" (a balancer would take the whole instance out, and with
    every instance restarting its children at once, all of them), and the
    replaced children drain at once, without drain_delay."""
    srv = pollpool.Server(lambda m: m, processes=2, threads=1, port=0, health="127.0.0.1:0",
                          drain_delay=60.0)
    srv.start()
    host, port = srv.health_address.rsplit(":", 1)
    heard = []
    running = True

    def checker():
        while running:
            try:
                with socket.create_connection((host, int(port)), timeout=10) as s:
                    heard.append(s.recv(64))
            except OSError as e:
                heard.append(repr(e).encode())
            time.sleep(0.005)
    t = threading.Thread(target=checker)
    t.start()
    try:
        wait_for(lambda: len(children()) == 2)
        before = children()
        srv.restart_workers()      # would take 2 x 60 s with the delay
        assert not (children() & before)
    finally:
        running = False
        t.join(30)
        srv.stop(timeout=1)        # the delay applies to a real stop: cut short here
    assert heard and set(heard) == {b"up ready\n"}, set(heard)
