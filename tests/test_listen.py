"""Listen anywhere: bind= in every spelling (TCP v4/v6, unix:, fd://, systemd),
sock=, several listeners feeding one server, Unix sockets' permissions,
stale and live socket files, and systemd socket activation with READY=1 and
STOPPING=1 through Debian's systemd-socket-activate."""

from __future__ import annotations

import errno
import os
import shutil
import signal
import socket
import stat
import sys
import time

import pytest

import pollpool
from conftest import Child, Client, free_port, subprocess_env

pytestmark = pytest.mark.timeout(60)


class Who:
    def on_connect(self, conn):
        return None

    def on_message(self, conn, message):
        if message == b"who":
            return repr(conn.peer).encode()
        return message


def unix_client(path: str) -> Client:
    return Client(path)


def has_ipv6() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


def test_tcp_v4_v6_and_unix_listeners_feed_one_server(make_server, tmp_path):
    path = str(tmp_path / "app.sock")
    binds = ["127.0.0.1:0", f"unix:{path}"] + (["[::1]:0"] if has_ipv6() else [])
    srv = make_server(Who(), bind=binds, unix_mode=0o660)
    addrs = srv.addresses
    assert addrs[0].startswith("127.0.0.1:") and addrs[1] == f"unix:{path}"
    assert srv.address == ("127.0.0.1", int(addrs[0].rsplit(":", 1)[1]))
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o660
    c = Client(srv.address)
    u = unix_client(path)
    try:
        assert c.exchange([b"tcp"]) == [b"tcp"]
        assert u.exchange([b"who"]) == [repr(pollpool.PeerCred(os.getpid(), os.getuid(),
                                                               os.getgid())).encode()]
        if has_ipv6():
            port = int(addrs[2].rsplit(":", 1)[1])
            assert addrs[2] == f"[::1]:{port}"
            v6 = Client(("::1", port))
            try:
                assert v6.exchange([b"who"]) == [repr(v6.sock.getsockname()[:2]).encode()]
            finally:
                v6.close()
    finally:
        c.close()
        u.close()
    assert srv.stop()["accepted"] == 2 + has_ipv6()
    assert not os.path.exists(path)          # removed on shutdown


def test_a_stale_socket_file_is_replaced_and_a_live_one_never_taken(make_server, tmp_path):
    path = str(tmp_path / "s.sock")
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(path)
    dead.close()                              # a dead server's file stays behind
    srv = make_server(bind=[f"unix:{path}"])
    u = unix_client(path)
    try:
        assert u.exchange([b"hi"]) == [b"hi"]
    finally:
        u.close()
    with pytest.raises(OSError) as e:         # srv is alive there
        pollpool.Server(pollpool.handlers.echo, bind=[f"unix:{path}"]).listen()
    assert e.value.errno == errno.EADDRINUSE
    srv.stop()
    (tmp_path / "plain").write_text("not a socket")
    with pytest.raises(OSError) as e:
        pollpool.Server(pollpool.handlers.echo, bind=[f"unix:{tmp_path / 'plain'}"]).listen()
    assert e.value.errno == errno.EADDRINUSE
    assert (tmp_path / "plain").read_text() == "not a socket"


def test_fd_and_sock_take_sockets_made_elsewhere(make_server):
    inherited = socket.socket()
    inherited.bind(("127.0.0.1", 0))           # bound, not listening: the server listens
    fd = os.dup(inherited.fileno())            # what a parent process would pass
    mine = socket.socket()
    mine.bind(("127.0.0.1", 0))
    mine.listen(8)
    srv = make_server(bind=[f"fd://{fd}"], sock=mine)
    try:
        for s in (inherited, mine):
            c = Client(s.getsockname())
            try:
                assert c.exchange([b"x"]) == [b"x"]
            finally:
                c.close()
        assert srv.addresses == ["%s:%d" % inherited.getsockname(), "%s:%d" % mine.getsockname()]
    finally:
        srv.stop()
    assert mine.fileno() >= 0 and mine.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
    with pytest.raises(OSError):
        os.fstat(fd)                           # fd:// was the server's to close
    mine.close()
    inherited.close()


def test_proxy_protocol_over_a_unix_socket(make_server, tmp_path):
    path = str(tmp_path / "lb.sock")
    srv = make_server(Who(), bind=[f"unix:{path}"], proxy_protocol=True)
    u = unix_client(path)
    try:
        u.send(b"PROXY TCP4 198.18.0.3 198.18.0.1 777 80\r\nwho\n")
        assert u.recv_message() == b"('198.18.0.3', 777)"
    finally:
        u.close()
    srv.stop()


@pytest.mark.parametrize("spec", ["127.0.0.1", "::1:80", "[::1]80", "unix:", "fd://x",
                                  "fd://-1", "host:99999", "host:port"])
def test_bad_bind_strings_are_refused_at_construction(spec):
    with pytest.raises(ValueError, match="bind"):
        pollpool.Server(pollpool.handlers.echo, bind=[spec])


def test_bind_options_are_checked():
    with pytest.raises(TypeError):
        pollpool.Server(pollpool.handlers.echo, bind=[9000])
    with pytest.raises(TypeError):
        pollpool.Server(pollpool.handlers.echo, sock="127.0.0.1:9000")
    with pytest.raises(ValueError):
        pollpool.Server(pollpool.handlers.echo, bind=["127.0.0.1:0"], unix_mode=0o10000)
    with pytest.raises(ValueError, match="systemd"):
        pollpool.Server(pollpool.handlers.echo, bind=["systemd"]).listen()
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        with pytest.raises(ValueError, match="stream"):
            pollpool.Server(pollpool.handlers.echo, sock=s).listen()
    finally:
        s.close()


def test_systemd_socket_activation_with_ready_and_stopping(tmp_path):
    tool = shutil.which("systemd-socket-activate")
    if tool is None:
        pytest.fail("systemd-socket-activate is not installed (Debian's systemd package)")
    notify_path = str(tmp_path / "notify")
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(notify_path)
    notify.settimeout(20)
    port = free_port()
    path = str(tmp_path / "act.sock")
    env = subprocess_env()
    # systemd-socket-activate passes the command only what -E names.
    child = Child([tool, "-l", f"127.0.0.1:{port}", "-l", path, "--fdname=web:admin",
                   "-E", f"NOTIFY_SOCKET={notify_path}", "-E", f"PYTHONPATH={env['PYTHONPATH']}",
                   "-E", f"POLLPOOL_BACKEND={os.environ.get('POLLPOOL_BACKEND', 'poll')}",
                   sys.executable, "-m", "pollpool", "--bind", "systemd"],
                  cwd=tmp_path, env=env, stderr_path=tmp_path / "ssa.stderr")
    try:
        c = None
        for _ in range(200):   # until systemd-socket-activate listens
            try:
                c = Client(("127.0.0.1", port))
                break
            except ConnectionRefusedError:
                time.sleep(0.05)
        assert c is not None
        try:
            assert c.exchange([b"activated"]) == [b"activated"]   # the first connection execs it
        finally:
            c.close()
        assert notify.recv(100) == b"READY=1"
        child.wait_line(r"pollpool listening on 127\.0\.0\.1:%d$" % port)
        child.wait_line(r"pollpool listening on unix:%s$" % path)
        u = unix_client(path)
        try:
            assert u.exchange([b"admin"]) == [b"admin"]
        finally:
            u.close()
        child.signal(signal.SIGINT)
        assert notify.recv(100) == b"STOPPING=1"
        assert child.wait(20) == 0
        assert os.path.exists(path)     # systemd's socket, not pollpool's to remove
    finally:
        child.kill()
        notify.close()


def test_processes_serve_the_parents_listeners(make_server, tmp_path):
    path = str(tmp_path / "group.sock")
    srv = make_server(Who(), bind=["127.0.0.1:0", f"unix:{path}"], processes=2)
    assert srv.addresses[1] == f"unix:{path}"
    for _ in range(40):
        for target in (srv.address, path):
            c = Client(target)
            try:
                c.send(b"x\n")
                assert c.recv_message() == b"x"
            finally:
                c.close()
    assert srv.stats()["processes"] == 2
    stats = srv.stop()
    assert stats["accepted"] == 80 and stats["messages"] == 80
    assert not os.path.exists(path)   # removed with the parent's listeners


class Pid:
    def on_connect(self, conn):
        return None

    def on_message(self, conn, message):
        return b"%d" % os.getpid()


def test_a_killed_process_comes_back_on_the_same_unix_socket(make_server, tmp_path):
    from conftest import wait_for
    path = str(tmp_path / "restart.sock")
    srv = make_server(Pid(), bind=[f"unix:{path}"], processes=2, threads=1)

    def pids(n: int) -> set:
        seen = set()
        for _ in range(n):
            c = Client(path)
            try:
                seen.add(int(c.exchange([b"pid"])[0]))
            finally:
                c.close()
        return seen

    first = pids(30)
    assert first and all(p != os.getpid() for p in first)
    victim = min(first)
    os.kill(victim, signal.SIGKILL)
    assert wait_for(lambda: srv.stats()["restarts"] == 1 and srv.stats()["processes"] == 2, 15)
    after = set()
    deadline = time.monotonic() + 20
    while len(after) < 2 and time.monotonic() < deadline:
        after |= pids(10)
    assert victim not in after and len(after) == 2, (after, victim)
    assert os.path.exists(path)        # the socket lived through the restart
    srv.stop()
    assert not os.path.exists(path)


def test_more_listeners_than_a_server_serves_are_refused(tmp_path):
    binds = [f"unix:{tmp_path / str(i)}" for i in range(9)]
    with pytest.raises(ValueError, match="at most 8"):
        pollpool.Server(pollpool.handlers.echo, bind=binds).listen()
    assert list(tmp_path.iterdir()) == []       # what was opened is closed and removed


def test_processes_notify_systemd_from_the_parent_only(make_server, tmp_path, monkeypatch):
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify"))
    notify.settimeout(20)
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))
    try:
        srv = make_server(processes=2)
        assert notify.recv(100) == b"READY=1"
        assert "NOTIFY_SOCKET" not in os.environ    # children cannot see it
        c = Client(srv.address)
        try:
            assert c.exchange([b"x"]) == [b"x"]
        finally:
            c.close()
        srv.stop()
        assert notify.recv(100) == b"STOPPING=1"
        notify.settimeout(0.3)
        with pytest.raises(socket.timeout):
            notify.recv(100)                        # nothing from the children
    finally:
        notify.close()
