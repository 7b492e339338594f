"""Leaving without losing anything: the health listener, drain_delay and
drain_grace, one test per rule the documentation states (docs/shutdown.md).

Each test stops a server from a thread and watches, from outside, what a
balancer would see: the health listener's answers, whether the service
still accepts, and what a client waiting on an accepted connection gets.
Nothing here asserts a duration; a phase is waited for by its effect.
"""

from __future__ import annotations

import socket
import threading
import time

import pytest

import pollpool

pytestmark = pytest.mark.timeout(60)


def _hostport(spec: str):
    host, port = spec.rsplit(":", 1)
    return host.strip("[]"), int(port)


def ask_health(spec: str) -> "bytes | str":
    """What one health check hears: the line, 'refused' or 'reset'."""
    try:
        with socket.create_connection(_hostport(spec), timeout=5) as s:
            return read_to_eof(s)
    except ConnectionRefusedError:
        return "refused"
    except ConnectionResetError:
        # Queued in the instant the last holder closed the socket: a check
        # that lands on the transition fails, as a balancer's would.
        return "reset"


def wait_for(what, want, limit=20.0):
    end = time.monotonic() + limit
    while True:
        got = what()
        if got == want:
            return got
        assert time.monotonic() < end, f"still {got!r}, waiting for {want!r}"
        time.sleep(0.02)


def accepts(addr) -> bool:
    try:
        with socket.create_connection(addr, timeout=5):
            return True
    except ConnectionRefusedError:
        return False


def echo_once(addr, msg=b"ping") -> bytes:
    with socket.create_connection(addr, timeout=5) as c:
        c.sendall(msg + b"\n")
        c.settimeout(5)
        return c.recv(100)


def read_to_eof(sock) -> bytes:
    data = b""
    while True:
        chunk = sock.recv(4096)
        if not chunk:
            return data
        data += chunk


class Stopper:
    """stop() on a thread of its own, joined at the end."""

    def __init__(self, srv: pollpool.Server) -> None:
        self.srv = srv
        self.stats = None
        self.thread = threading.Thread(target=self._run)
        self.thread.start()

    def _run(self) -> None:
        self.stats = self.srv.stop()

    def join(self):
        self.thread.join(30)
        assert not self.thread.is_alive()
        return self.stats


@pytest.fixture
def servers():
    made = []
    yield made
    for srv in made:
        srv.stop(timeout=5)


def test_health_says_up_ready_while_serving_and_counts(servers):
    srv = pollpool.Server(pollpool.handlers.echo, port=0, health="127.0.0.1:0")
    servers.append(srv)
    srv.start()
    assert srv.health_address.startswith("127.0.0.1:")
    for _ in range(3):
        assert ask_health(srv.health_address) == b"up ready\n"
    assert srv.stats()["health_checks"] == 3
    assert echo_once(srv.address) == b"ping\n"


def test_without_drain_delay_the_health_listener_closes_with_the_service(servers):
    srv = pollpool.Server(pollpool.handlers.echo, port=0, health="127.0.0.1:0")
    servers.append(srv)
    srv.start()
    health, addr = srv.health_address, srv.address
    held = socket.create_connection(addr)   # keeps the drain open until it says goodbye
    srv_stop = Stopper(srv)
    wait_for(lambda: ask_health(health), "refused")
    assert not accepts(addr)
    held.close()
    srv_stop.join()


@pytest.mark.parametrize("processes", [1, 2])
def test_drain_delay_says_drain_and_keeps_serving_then_both_close(servers, processes, tmp_path):
    """The rule: for drain_delay after a stop begins, health checks hear
    "drain" while new connections are still accepted and served; then the
    drain begins, and the health listener and the service refuse together
    (no connection queued on a socket nobody accepts from any more)."""
    srv = pollpool.Server(pollpool.handlers.echo, bind=["127.0.0.1:0"], health="127.0.0.1:0",
                          drain_delay=3.0, processes=processes, shutdown_message=b"bye")
    servers.append(srv)
    srv.start()
    health, addr = srv.health_address, srv.address
    assert ask_health(health) == b"up ready\n"
    old = socket.create_connection(addr, timeout=10)   # a keep-alive client from before
    assert echo_once(addr) == b"ping\n"
    stopper = Stopper(srv)
    wait_for(lambda: ask_health(health), b"drain\n")
    # Leaving, not gone: a newcomer is served, and so is the old client.
    assert echo_once(addr, b"newcomer") == b"newcomer\n"
    old.sendall(b"still here\n")
    assert old.recv(100) == b"still here\n"
    wait_for(lambda: ask_health(health), "refused")
    assert not accepts(addr)
    # The old client then gets the goodbye, and the stop ends.
    assert read_to_eof(old) == b"bye\n"
    old.close()
    stats = stopper.join()
    assert stats["health_checks"] >= 2     # "up ready" and "drain", at least


def test_drain_grace_answers_a_first_message_that_comes_after_the_stop(servers):
    """A connection accepted before the drain that has not sent a whole
    message yet gets drain_grace for its first one: answered, then the
    goodbye.  A connection that already spoke gets no such wait."""
    srv = pollpool.Server(pollpool.handlers.echo, port=0, shutdown_message=b"bye",
                          drain_grace=10.0)
    servers.append(srv)
    srv.start()
    silent = socket.create_connection(srv.address, timeout=10)
    partial = socket.create_connection(srv.address, timeout=10)
    partial.sendall(b"half a ")                 # not a whole message yet
    spoke = socket.create_connection(srv.address, timeout=10)
    spoke.sendall(b"one\n")
    assert spoke.recv(100) == b"one\n"
    wait_for(lambda: srv.stats()["bytes_in"], len(b"half a one\n"))
    stopper = Stopper(srv)
    # The one that spoke is told goodbye at once, grace or not.
    assert read_to_eof(spoke) == b"bye\n"
    spoke.close()
    silent.sendall(b"late\n")
    assert read_to_eof(silent) == b"late\nbye\n"
    partial.sendall(b"message\n")
    assert read_to_eof(partial) == b"half a message\nbye\n"
    silent.close()
    partial.close()
    stopper.join()


def test_drain_grace_zero_says_goodbye_to_the_silent_at_once(servers):
    srv = pollpool.Server(pollpool.handlers.echo, port=0, shutdown_message=b"bye",
                          drain_grace=0)
    servers.append(srv)
    srv.start()
    silent = socket.create_connection(srv.address, timeout=10)
    wait_for(lambda: srv.stats()["accepted"], 1)
    stopper = Stopper(srv)
    assert read_to_eof(silent) == b"bye\n"
    silent.close()
    stopper.join()


def test_the_grace_ends_and_a_silent_connection_gets_its_goodbye(servers):
    srv = pollpool.Server(pollpool.handlers.echo, port=0, shutdown_message=b"bye",
                          drain_grace=0.3, drain_timeout=30)
    servers.append(srv)
    srv.start()
    silent = socket.create_connection(srv.address, timeout=20)
    wait_for(lambda: srv.stats()["accepted"], 1)
    stopper = Stopper(srv)
    assert read_to_eof(silent) == b"bye\n"   # at the grace's end, not the drain's
    silent.close()
    stats = stopper.join()
    assert stats["forced_closes"] == 0


def test_systemd_hears_stopping_when_the_stop_begins_not_when_the_drain_does(servers, tmp_path,
                                                                             monkeypatch):
    path = str(tmp_path / "notify")
    manager = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    manager.bind(path)
    manager.settimeout(20)
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    try:
        srv = pollpool.Server(pollpool.handlers.echo, port=0, drain_delay=30.0)
        servers.append(srv)
        srv.start()
        assert manager.recv(100) == b"READY=1"
        stopper = Stopper(srv)
        assert manager.recv(100) == b"STOPPING=1"
        assert echo_once(srv.address) == b"ping\n"    # still serving: the delay runs
        srv.stop(timeout=0.1)                          # cut short: not waiting 30 s
        stopper.join()
    finally:
        manager.close()


def test_bad_options_are_refused_at_construction():
    with pytest.raises(ValueError):
        pollpool.Server(pollpool.handlers.echo, drain_delay=-1)
    with pytest.raises(ValueError):
        pollpool.Server(pollpool.handlers.echo, drain_grace=float("nan"))
    with pytest.raises(ValueError):
        pollpool.Server(pollpool.handlers.echo, health="fd://3")
    with pytest.raises(TypeError):
        pollpool.Server(pollpool.handlers.echo, health=9001)


def test_a_health_address_in_use_is_an_oserror_and_frees_the_rest():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        srv = pollpool.Server(pollpool.handlers.echo, port=0, health=f"127.0.0.1:{port}")
        with pytest.raises(OSError) as e:
            srv.start()
        assert e.value.errno == 98   # EADDRINUSE
        srv.stop()
