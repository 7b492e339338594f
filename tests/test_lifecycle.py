"""Must show 7 and the lifecycle contract: stop() from any thread, repeated
start/stop without leaking fds or threads, bind errors with the real errno,
configuration errors at construction, IPv6, exact stats."""

import errno
import gc
import socket
import threading

import pytest

import pollpool
from conftest import (LENGTH4, LINE, Client, assert_no_crash_text, fd_count, ipv6_loopback_available,
                      py_echo, rss_bytes, task_count, wait_closed, wait_for)

pytestmark = pytest.mark.timeout(60)

STATS_KEYS = {"accepted", "active", "closed", "messages", "replies", "bytes_in", "bytes_out",
              "oversize_frames", "handler_errors", "accept_errors", "read_errors", "write_errors",
              "nomem_errors", "accept_paused", "forced_closes"}
ERROR_KEYS = ["oversize_frames", "handler_errors", "accept_errors", "read_errors", "write_errors",
              "nomem_errors", "forced_closes"]


def listening_address(srv):
    try:
        address = srv.address
    except Exception:  # noqa: BLE001 -- not listening yet
        return None
    return address if address and address[1] else None


def python_threads() -> int:
    return sum(1 for t in threading.enumerate() if not isinstance(t, threading._DummyThread))


# -- stopping from other threads --------------------------------------------


def test_stop_from_another_thread_ends_serve_forever():
    srv = pollpool.Server(pollpool.handlers.echo, host="127.0.0.1", port=0)
    result = {}

    def run():
        try:
            result["stats"] = srv.serve_forever()
        except BaseException as e:  # noqa: BLE001 -- reported below
            result["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    try:
        address = wait_for(lambda: listening_address(srv), 10)
        assert address, f"serve_forever in a thread never listened: {result}"
        c = Client(address)
        try:
            assert c.exchange([b"in a thread"]) == [b"in a thread"]
            srv.stop(timeout=10)  # from the main thread
            t.join(10)
            assert not t.is_alive(), "serve_forever did not return after stop()"
            assert wait_closed(c) == b""
        finally:
            c.close()
        assert "error" not in result, result
        stats = result["stats"]
        assert STATS_KEYS <= set(stats)
        assert stats["messages"] == 1 and stats["accepted"] == 1
    finally:
        if t.is_alive():
            srv.stop(timeout=5)
            t.join(5)


def test_stop_from_a_worker_thread_of_the_test(connect):
    srv = pollpool.Server(py_echo, host="127.0.0.1", port=0)
    srv.start()
    c = connect(srv)
    assert c.exchange([b"x"]) == [b"x"]
    out = []
    stopper = threading.Thread(target=lambda: out.append(srv.stop(timeout=10)))
    stopper.start()
    stopper.join(15)
    assert not stopper.is_alive()
    assert out and out[0]["messages"] == 1
    assert wait_closed(c) == b""


def test_stop_returns_stats_and_context_manager_stops(connect):
    with pollpool.Server(pollpool.handlers.echo, host="127.0.0.1", port=0) as srv:
        host, port = srv.address[0], srv.address[1]
        assert host == "127.0.0.1" and port > 0
        c = connect(srv)
        assert c.exchange([b"cm"]) == [b"cm"]
    assert wait_closed(c) == b""
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()


# -- no leaks ------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_50_start_stop_cycles_leak_no_fds_threads_or_memory():
    def cycle(i):
        handler = pollpool.handlers.echo if i % 2 else py_echo
        # A short drain timeout keeps this test about leaks: how fast a stop
        # with a connected client is, is tested in test_shutdown.py.
        srv = pollpool.Server(handler, host="127.0.0.1", port=0, threads=4, drain_timeout=2.0)
        srv.start()
        stopped = False
        try:
            c = Client(srv.address)
            try:
                assert c.exchange([b"cycle %d" % i]) == [b"cycle %d" % i]
                if i % 3 == 0:  # stop with the client still connected
                    srv.stop(timeout=10)
                    stopped = True
                    assert wait_closed(c) == b""
            finally:
                c.close()
        finally:
            if not stopped:
                srv.stop(timeout=10)

    for i in range(3):  # warm up lazily created state (logging, cffi, arenas)
        cycle(i)
    gc.collect()
    fds, tasks, pythreads, rss = fd_count(), task_count(), python_threads(), rss_bytes()
    for i in range(50):
        cycle(i)
    gc.collect()
    settled = wait_for(lambda: fd_count() <= fds and task_count() <= tasks, 5)
    assert fd_count() <= fds, f"fds grew from {fds} to {fd_count()}"
    assert task_count() <= tasks, f"threads grew from {tasks} to {task_count()}"
    assert settled
    assert python_threads() <= pythreads
    grown = rss_bytes() - rss
    assert grown < 50 * (1 << 20), f"RSS grew by {grown >> 20} MiB over 50 cycles"


def test_stopped_server_leaves_no_threads_or_fds():
    gc.collect()
    fds, tasks = fd_count(), task_count()
    srv = pollpool.Server(py_echo, host="127.0.0.1", port=0, threads=8)
    srv.start()
    assert task_count() >= tasks + 8, "expected 8 worker threads and an I/O thread"
    srv.stop(timeout=10)
    assert wait_for(lambda: task_count() <= tasks and fd_count() <= fds, 5), \
        f"threads {tasks}->{task_count()}, fds {fds}->{fd_count()}"


# -- errors --------------------------------------------------------------------


def test_bind_to_busy_port_raises_eaddrinuse():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        port = blocker.getsockname()[1]
        gc.collect()
        fds, tasks = fd_count(), task_count()
        srv = pollpool.Server(pollpool.handlers.echo, host="127.0.0.1", port=port)
        with pytest.raises(OSError) as info:
            srv.start()
        assert info.value.errno == errno.EADDRINUSE
        del srv
        gc.collect()
        assert wait_for(lambda: fd_count() <= fds and task_count() <= tasks, 5), \
            "a failed start leaked fds or threads"


def test_second_server_on_the_same_port_raises_eaddrinuse(make_server):
    first = make_server()
    second = pollpool.Server(pollpool.handlers.echo, host="127.0.0.1", port=first.address[1])
    with pytest.raises(OSError) as info:
        second.start()
    assert info.value.errno == errno.EADDRINUSE


def _bad_framing(factory):
    return lambda: {"framing": factory()}


BAD_OPTIONS = {
    "threads=0": lambda: {"threads": 0},
    "threads=-1": lambda: {"threads": -1},
    "threads=1.5": lambda: {"threads": 1.5},
    "threads=str": lambda: {"threads": "4"},
    "framing=bogus": lambda: {"framing": "bogus"},
    "framing=int": lambda: {"framing": 42},
    "port=-1": lambda: {"port": -1},
    "port=65536": lambda: {"port": 65536},
    "port=str": lambda: {"port": "80"},
    "backlog=str": lambda: {"backlog": "many"},
    "max_connections=-1": lambda: {"max_connections": -1},
    "max_message_size=0": lambda: {"max_message_size": 0},
    "max_message_size=-5": lambda: {"max_message_size": -5},
    "output_high_water=-1": lambda: {"output_high_water": -1},
    "queue_size=-1": lambda: {"queue_size": -1},
    "drain_timeout=-1": lambda: {"drain_timeout": -1.0},
    "drain_timeout=str": lambda: {"drain_timeout": "soon"},
    "shutdown_message=int": lambda: {"shutdown_message": 123},
    "host=int": lambda: {"host": 123},
    "backend=select": lambda: {"backend": "select"},
    "backend=int": lambda: {"backend": 1},
    "processes=0": lambda: {"processes": 0},
    "processes=str": lambda: {"processes": "2"},
    "reuse_port=1": lambda: {"reuse_port": 1},
    "Lines(delimiter=b'')": _bad_framing(lambda: pollpool.Lines(delimiter=b"")),
    "Lines(delimiter=17 bytes)": _bad_framing(lambda: pollpool.Lines(delimiter=b"x" * 17)),
    "Lines(delimiter=int)": _bad_framing(lambda: pollpool.Lines(delimiter=1)),
    "Lines(max_size=0)": _bad_framing(lambda: pollpool.Lines(max_size=0)),
    "LengthPrefixed(header_bytes=3)": _bad_framing(lambda: pollpool.LengthPrefixed(header_bytes=3)),
    "LengthPrefixed(header_bytes=0)": _bad_framing(lambda: pollpool.LengthPrefixed(header_bytes=0)),
    "LengthPrefixed(max_size=-1)": _bad_framing(lambda: pollpool.LengthPrefixed(max_size=-1)),
    "Raw(max_size=0)": _bad_framing(lambda: pollpool.Raw(max_size=0)),
}


@pytest.mark.parametrize("name", sorted(BAD_OPTIONS))
def test_bad_option_raises_at_construction(name):
    with pytest.raises((ValueError, TypeError)):
        options = BAD_OPTIONS[name]()
        pollpool.Server(pollpool.handlers.echo, host="127.0.0.1", port=0, **options)


def test_backend_comes_from_the_environment_when_not_given(monkeypatch, backend):
    assert pollpool.Server(pollpool.handlers.echo, port=0).backend == backend
    assert pollpool.Server(pollpool.handlers.echo, port=0, backend="poll").backend == "poll"
    monkeypatch.setenv("POLLPOOL_BACKEND", "kqueue")
    with pytest.raises(ValueError, match="POLLPOOL_BACKEND"):
        pollpool.Server(pollpool.handlers.echo, port=0)


def test_reuse_port_lets_two_servers_share_a_port(make_server, connect):
    a = make_server(reuse_port=True)
    b = make_server(reuse_port=True, port=a.address[1])
    assert a.address == b.address
    clients = [connect(a) for _ in range(20)]
    for i, c in enumerate(clients):
        assert c.exchange([b"m%d" % i]) == [b"m%d" % i]
    # The kernel spread them: 20 connections on one server has odds 2**-19.
    assert a.stats()["accepted"] + b.stats()["accepted"] == 20
    assert a.stats()["accepted"] > 0 and b.stats()["accepted"] > 0


@pytest.mark.parametrize("handler", [None, 42, "echo", b"echo"], ids=repr)
def test_bad_handler_raises_type_error(handler):
    with pytest.raises(TypeError):
        pollpool.Server(handler, host="127.0.0.1", port=0)


def test_good_options_are_accepted(make_server, connect):
    srv = make_server(py_echo, threads=1, framing=pollpool.Lines(delimiter=b"\r\n", max_size=10),
                      backlog=16, max_connections=5, output_high_water=1 << 16, queue_size=8,
                      drain_timeout=0.5, shutdown_message=b"bye")
    c = connect(srv)
    c.send(b"abc\r\n")
    assert c.recv_exactly(5) == b"abc\r\n"


def test_starting_twice_raises_runtime_error(make_server):
    srv = make_server()
    with pytest.raises(RuntimeError):
        srv.start()
    with pytest.raises(RuntimeError):
        srv.serve_forever()
    # And the running server is unharmed by the refused calls.
    c = Client(srv.address)
    try:
        assert c.exchange([b"ok"]) == [b"ok"]
    finally:
        c.close()


# -- addresses -----------------------------------------------------------------


def test_ipv6_loopback(make_server, connect):
    if not ipv6_loopback_available():
        pytest.skip("no IPv6 loopback on this machine")
    srv = make_server(py_echo, host="::1", framing="length")
    host, port = srv.address[0], srv.address[1]
    assert host == "::1" and port > 0
    c = connect(srv, LENGTH4)
    assert c.sock.family == socket.AF_INET6
    assert c.exchange([b"six", b""]) == [b"six", b""]
    # Not reachable over IPv4.
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()


# -- stats ---------------------------------------------------------------------


def test_stats_count_connections_messages_and_bytes(make_server, connect):
    srv = make_server(pollpool.handlers.echo, framing="line")
    before = srv.stats()
    assert STATS_KEYS <= set(before), STATS_KEYS - set(before)
    assert all(before[k] == 0 for k in STATS_KEYS), before
    sent = 0
    clients = [connect(srv) for _ in range(3)]
    for n, c in enumerate(clients):
        msgs = [b"m%d-%d" % (n, i) * (i + 1) for i in range(10)]
        assert c.exchange(msgs) == msgs
        sent += len(LINE.frames(msgs))
    assert wait_for(lambda: srv.stats()["active"] == 3, 5), srv.stats()
    for c in clients:
        c.close()
    assert wait_for(lambda: srv.stats()["active"] == 0, 5), srv.stats()
    st = srv.stats()
    assert (st["accepted"], st["closed"], st["active"]) == (3, 3, 0)
    assert (st["messages"], st["replies"]) == (30, 30)
    assert (st["bytes_in"], st["bytes_out"]) == (sent, sent)
    assert {k: st[k] for k in ERROR_KEYS} == {k: 0 for k in ERROR_KEYS}


# -- interpreter exit ------------------------------------------------------------

ATEXIT_SCRIPT = r'''
import socket, pollpool

def handler(msg):
    return msg * 2

srv = pollpool.Server(handler, host="127.0.0.1", port=0, threads=4)
srv.start()
s = socket.create_connection(srv.address)
s.sendall(b"spin\n" * 50000)
s.recv(100)
print("leaving with the server running", flush=True)
'''


@pytest.mark.timeout(60)
def test_interpreter_exit_with_a_running_python_handler_server_is_clean(spawn, tmp_path):
    script = tmp_path / "atexit_case.py"
    script.write_text(ATEXIT_SCRIPT)
    child = spawn([str(script)])
    child.wait_line("leaving with the server running")
    rc = child.wait(20)
    assert rc == 0, f"exit code {rc}; stderr: {child.stderr()[-3000:]}"
    assert_no_crash_text(child.stderr())


def test_stop_is_idempotent_and_safe_before_start():
    never = pollpool.Server(pollpool.handlers.echo, host="127.0.0.1", port=0)
    assert STATS_KEYS <= set(never.stop())
    srv = pollpool.Server(pollpool.handlers.echo, host="127.0.0.1", port=0)
    srv.start()
    first = srv.stop(timeout=5)
    second = srv.stop(timeout=5)
    assert first == second


def test_importing_a_checkout_without_its_compiled_core_says_how_to_fix_it(tmp_path):
    # A copy of the package's Python files, as in a checkout nobody built.
    import shutil
    import subprocess
    import sys
    from pathlib import Path
    src = Path(pollpool.__file__).resolve().parent
    pkg = tmp_path / "checkout" / "pollpool"
    pkg.mkdir(parents=True)
    for f in src.glob("*.py"):
        shutil.copy(f, pkg / f.name)
    (tmp_path / "checkout" / "setup.py").write_text("")
    # -S: no site-packages, where an editable install would find the built one.
    res = subprocess.run([sys.executable, "-S", "-c", "import pollpool"], cwd=tmp_path / "checkout",
                         capture_output=True, text=True, timeout=60,
                         env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(tmp_path / "checkout")})
    assert res.returncode != 0
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: pollpool's compiled core (pollpool._native) is missing"), \
        res.stderr
    assert "pip install -e" in last, last
