"""Ten thousand connections held open at once, on every backend: each gets its
reply, the server stays responsive, and a graceful stop closes every one."""

from __future__ import annotations

import json
import resource
import selectors
import signal
import socket
import time

import pytest

from conftest import LINE, Client, proc_status_kib

N_CONNS = 10_000
BATCH = 500  # connects in flight at once: the listen backlog is finite


@pytest.fixture
def fd_room():
    """Raises this process's fd limit to what 10,000 client sockets need (and
    the server subprocess inherits it); restores it after."""
    want = N_CONNS + 512
    saved = resource.getrlimit(resource.RLIMIT_NOFILE)
    soft, hard = saved
    try:
        if hard != resource.RLIM_INFINITY and hard < want:
            hard = want  # needs CAP_SYS_RESOURCE; skipped below if refused
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, want), hard))
    except (ValueError, OSError) as e:
        pytest.skip(f"cannot raise the fd limit to {want}: {e}")
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, saved)


def open_many(address, n: int) -> list[socket.socket]:
    """n connections, each sending one line and reading its echo; all stay open."""
    sel = selectors.DefaultSelector()
    socks: list[socket.socket] = []
    try:
        for base in range(0, n, BATCH):
            pending = {}
            for i in range(base, min(n, base + BATCH)):
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                socks.append(s)
                s.setblocking(False)
                s.connect_ex(address)
                msg = b"conn-%d\n" % i
                pending[s] = [msg, b"", False]
                sel.register(s, selectors.EVENT_WRITE)
            deadline = time.monotonic() + 30
            while pending:
                assert time.monotonic() < deadline, f"{len(pending)} of batch {base} unanswered"
                for key, ev in sel.select(1.0):
                    s = key.fileobj
                    msg, got, sent = pending[s]
                    if not sent:
                        err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                        assert err == 0, f"connect failed: {err}"
                        assert s.send(msg) == len(msg)
                        pending[s][2] = True
                        sel.modify(s, selectors.EVENT_READ)
                        continue
                    chunk = s.recv(64)
                    assert chunk, "closed before replying"
                    got += chunk
                    pending[s][1] = got
                    if len(got) >= len(msg):
                        assert got == msg
                        sel.unregister(s)
                        del pending[s]
        return socks
    except BaseException:
        for s in socks:
            s.close()
        raise
    finally:
        sel.close()


def wait_all_closed(socks: list[socket.socket], timeout: float) -> int:
    """Waits until the server closed every socket (EOF); returns how many did."""
    sel = selectors.DefaultSelector()
    for s in socks:
        sel.register(s, selectors.EVENT_READ)
    closed = 0
    deadline = time.monotonic() + timeout
    try:
        while closed < len(socks) and time.monotonic() < deadline:
            for key, _ in sel.select(1.0):
                try:
                    data = key.fileobj.recv(4096)
                except ConnectionResetError:
                    data = b""
                assert data == b"", f"unexpected bytes {data[:40]!r}"
                sel.unregister(key.fileobj)
                closed += 1
    finally:
        sel.close()
    return closed


@pytest.mark.timeout(180)
def test_ten_thousand_connections_all_answered_then_all_closed_on_stop(spawn, fd_room,
                                                                        backend):
    child = spawn(["-m", "pollpool", "--port", "0", "--threads", "2", "--backlog", "4096"])
    host, port = child.wait_listening()
    rss_before = proc_status_kib("VmRSS", child.pid)
    socks = []
    try:
        t0 = time.monotonic()
        socks = open_many((host, port), N_CONNS)
        took = time.monotonic() - t0
        rss_after = proc_status_kib("VmRSS", child.pid)
        per_conn = (rss_after - rss_before) * 1024 / N_CONNS
        print(f"[{backend}] {N_CONNS} connections opened and answered in {took:.2f} s; "
              f"server RSS +{rss_after - rss_before} KiB, {per_conn:.0f} B per idle connection")
        # With all of them open, a newcomer is served at once.
        c = Client((host, port), LINE, timeout=10)
        try:
            assert c.exchange([b"still here"]) == [b"still here"]
        finally:
            c.close()
        child.signal(signal.SIGINT)
        closed = wait_all_closed(socks, 60)
        assert closed == N_CONNS, f"only {closed} of {N_CONNS} closed by the stop"
        assert child.wait(60) == 0, child.stderr()
        stats = json.loads(child.wait_line(r"^pollpool stopped: ").string[len("pollpool stopped: "):])
        assert stats["accepted"] == N_CONNS + 1 and stats["messages"] == N_CONNS + 1, stats
        assert stats["forced_closes"] == 0 and stats["nomem_errors"] == 0, stats
    finally:
        for s in socks:
            s.close()
